#include "core/model/transformer.h"

#include <numeric>

namespace fp8pipe::model {
namespace {

// Tokens tok[b][first + i] for i < len, every row b, flattened.
std::vector<int32_t> token_window(const MicroBatch& mb, int64_t first, int64_t len) {
  std::vector<int32_t> out;
  out.reserve(mb.B * len);
  for (int64_t b = 0; b < mb.B; ++b)
    for (int64_t i = 0; i < len; ++i) out.push_back(mb.tokens[b * (mb.T + 1) + first + i]);
  return out;
}

Result<double> sum_host(ModelCtx& c, const Tensor& t) {
  FP8_ASSIGN_OR_RETURN(Tensor h, c.be->to_host(t));
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) s += h.data_as<float>()[i];
  return s;
}

}  // namespace

Status Model::init(ModelCtx& c, const config::Model& m, uint64_t seed, ModelPart part) {
  cfg_ = m;
  if (part.block_end < 0) part.block_end = m.layers();
  if (part.block_begin < 0 || part.block_begin > part.block_end || part.block_end > m.layers()) {
    return FP8_INVALID("model part: blocks [{}, {}) outside [0, {})", part.block_begin,
                       part.block_end, m.layers());
  }
  part_ = part;
  const float std = m.init_std();
  if (part.embed) {
    FP8_RETURN_IF_ERROR(embed_.init(c, "embed.weight", m.vocab_size(), m.hidden(), seed, std));
  }
  if (part.head && !part.embed) {  // the MTP modules' copy of the shared embedding
    FP8_RETURN_IF_ERROR(head_embed_.init(c, "embed.weight", m.vocab_size(), m.hidden(), seed, std));
  }
  if (part.head && part.embed) {
    FP8_ASSIGN_OR_RETURN(mtp_embed_grad_, c.be->zeros({m.vocab_size(), m.hidden()}, DType::kF32));
  }
  const bool has_moe = m.has_moe() && m.moe().routed_experts() > 0;
  for (int i = part.block_begin; i < part.block_end; ++i) {
    blocks_.push_back(std::make_unique<Block>());
    const bool moe = has_moe && i >= m.dense_layers();
    FP8_RETURN_IF_ERROR(blocks_.back()->init(c, "layers." + std::to_string(i), m, moe, seed));
  }
  if (!part.head) return Status::Ok();
  FP8_RETURN_IF_ERROR(final_norm_.init(c, "norm.weight", m.hidden(), m.norm_eps(), seed));
  FP8_RETURN_IF_ERROR(head_.init(c, "head.weight", m.hidden(), m.vocab_size(), seed, std, false));
  mtp_.resize(m.mtp_depth());
  for (int k = 1; k <= m.mtp_depth(); ++k) {
    Mtp& t = mtp_[k - 1];
    const std::string p = "mtp." + std::to_string(k - 1);
    FP8_RETURN_IF_ERROR(t.enorm.init(c, p + ".enorm.weight", m.hidden(), m.norm_eps(), seed));
    FP8_RETURN_IF_ERROR(t.hnorm.init(c, p + ".hnorm.weight", m.hidden(), m.norm_eps(), seed));
    FP8_RETURN_IF_ERROR(t.norm.init(c, p + ".norm.weight", m.hidden(), m.norm_eps(), seed));
    FP8_RETURN_IF_ERROR(t.eh_e.init(c, p + ".eh_proj_e.weight", m.hidden(), m.hidden(), seed, std));
    FP8_RETURN_IF_ERROR(t.eh_h.init(c, p + ".eh_proj_h.weight", m.hidden(), m.hidden(), seed, std));
    t.block = std::make_unique<Block>();
    FP8_RETURN_IF_ERROR(t.block->init(c, p + ".block", m, has_moe, seed));
  }
  return Status::Ok();
}

Result<Tensor> Model::embed_forward(ModelCtx& c, int mb, const MicroBatch& batch) {
  FP8_ASSIGN_OR_RETURN(Tensor ids, upload_i32(c, token_window(batch, 0, batch.T)));
  return embed_.forward(c, mb * kSlots, ids);
}

Status Model::embed_backward(ModelCtx& c, int mb, const Tensor& dx) {
  return embed_.backward(c, mb * kSlots, dx);
}

// train.recompute=rmsnorm: the norm's output of `key` again from its kept input, restored as
// the input `reader` keeps for its weight gradient (under reader_key), before the norm's
// backward releases what it kept.
Status Model::restore_norm_output(ModelCtx& c, RMSNorm& norm, int key, Linear& reader,
                                  int reader_key) {
  FP8_ASSIGN_OR_RETURN(Tensor y, norm.recompute(c, key));
  return reader.restore_input(c, reader_key < 0 ? key : reader_key, y);
}

Result<Tensor> Model::logits_and_loss(ModelCtx& c, int key, const Tensor& h, const Tensor& targets,
                                      Tensor* logits, double* ce_sum) {
  FP8_ASSIGN_OR_RETURN(*logits, head_.forward(c, key, h));
  FP8_ASSIGN_OR_RETURN(Tensor loss, c.be->empty({h.rows()}, DType::kF32));
  FP8_RETURN_IF_ERROR(c.be->cross_entropy_fwd(*logits, targets, loss));
  FP8_ASSIGN_OR_RETURN(*ce_sum, sum_host(c, loss));
  // Held for the backward's softmax: the head's output is rounded to bf16 outside FP32, so a
  // bf16 copy holds the same values in half the bytes ([rows, vocab] a depth).
  FP8_ASSIGN_OR_RETURN(*logits, hold_bf16(c, *logits));
  return loss;
}

// One MTP depth k (1-based): returns h^k over B rows of length len_prev - 1.
Result<Tensor> Model::mtp_forward(ModelCtx& c, int mb, int k, const Tensor& h_prev,
                                  int64_t len_prev, const MicroBatch& batch, HeadSaved& hs) {
  Mtp& t = mtp_[k - 1];
  const int key = mb * kSlots + k;
  const int64_t len = len_prev - 1, B = batch.B;
  std::vector<int32_t> keep;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < len; ++i) keep.push_back(static_cast<int32_t>(b * len_prev + i));
  FP8_ASSIGN_OR_RETURN(Tensor keep_t, upload_i32(c, keep));
  FP8_ASSIGN_OR_RETURN(Tensor hk, new_f32(c, B * len, h_prev.cols()));
  FP8_RETURN_IF_ERROR(c.be->gather_rows(h_prev, keep_t, hk));
  FP8_ASSIGN_OR_RETURN(Tensor ids, upload_i32(c, token_window(batch, k, len)));
  Embedding& emb = part_.embed ? embed_ : head_embed_;
  FP8_ASSIGN_OR_RETURN(Tensor e, emb.forward(c, key, ids));
  FP8_ASSIGN_OR_RETURN(Tensor en, t.enorm.forward(c, key, e));
  FP8_ASSIGN_OR_RETURN(Tensor hn, t.hnorm.forward(c, key, hk));
  FP8_ASSIGN_OR_RETURN(Tensor x, t.eh_e.forward(c, key, en));
  FP8_ASSIGN_OR_RETURN(Tensor xh, t.eh_h.forward(c, key, hn));
  if (c.recompute_norm) {  // enorm and hnorm re-run in the backward (head_backward_input)
    FP8_RETURN_IF_ERROR(t.eh_e.drop_input(key));
    FP8_RETURN_IF_ERROR(t.eh_h.drop_input(key));
  }
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, xh, x));
  hs.keep[k] = keep_t;
  hs.rows[k - 1] = h_prev.rows();
  return t.block->forward(c, key, x, B, len);
}

Result<LossParts> Model::head_forward(ModelCtx& c, int mb, const Tensor& h,
                                      const MicroBatch& batch) {
  const int D = static_cast<int>(mtp_.size());
  HeadSaved& hs = head_saved_.put(mb);
  hs.B = batch.B;
  hs.T = batch.T;
  hs.logits.assign(D + 1, Tensor());
  hs.targets.assign(D + 1, Tensor());
  hs.keep.assign(D + 1, Tensor());
  hs.rows.assign(D + 1, 0);
  LossParts lp;
  lp.tokens = batch.B * batch.T;
  FP8_ASSIGN_OR_RETURN(Tensor hn, final_norm_.forward(c, mb, h));
  FP8_ASSIGN_OR_RETURN(hs.targets[0], upload_i32(c, token_window(batch, 1, batch.T)));
  double ce = 0;
  FP8_RETURN_IF_ERROR(
      logits_and_loss(c, mb * kSlots, hn, hs.targets[0], &hs.logits[0], &ce).status());
  if (c.recompute_norm) FP8_RETURN_IF_ERROR(head_.drop_input(mb * kSlots));  // the norm re-runs
  lp.main = ce / lp.tokens;
  Tensor prev = h;
  for (int k = 1; k <= D; ++k) {
    const int64_t len_prev = batch.T - (k - 1);
    FP8_ASSIGN_OR_RETURN(Tensor hk, mtp_forward(c, mb, k, prev, len_prev, batch, hs));
    FP8_ASSIGN_OR_RETURN(hs.targets[k], upload_i32(c, token_window(batch, k + 1, len_prev - 1)));
    FP8_ASSIGN_OR_RETURN(Tensor hkn, mtp_[k - 1].norm.forward(c, mb * kSlots + k, hk));
    FP8_RETURN_IF_ERROR(
        logits_and_loss(c, mb * kSlots + k, hkn, hs.targets[k], &hs.logits[k], &ce).status());
    if (c.recompute_norm) FP8_RETURN_IF_ERROR(head_.drop_input(mb * kSlots + k));
    lp.mtp.push_back(ce / lp.tokens);
    prev = hk;
  }
  lp.total = lp.main;
  for (double l : lp.mtp) lp.total += cfg_.mtp_lambda() / D * l;
  return lp;
}

Result<Tensor> Model::head_backward_input(ModelCtx& c, int mb, float loss_scale) {
  FP8_ASSIGN_OR_RETURN(HeadSaved * hs, head_saved_.get(mb, "head"));
  c.loss_scale = loss_scale;  // also scales the MoE balance losses' gradients
  const int D = static_cast<int>(mtp_.size());
  const float row_scale = loss_scale / static_cast<float>(hs->B * hs->T);
  Tensor carry;  // gradient w.r.t. h^k flowing from depth k+1
  for (int k = D; k >= 1; --k) {
    Mtp& t = mtp_[k - 1];
    const int key = mb * kSlots + k;
    FP8_ASSIGN_OR_RETURN(Tensor lg, held_f32(c, hs->logits[k]));
    hs->logits[k] = Tensor();
    FP8_ASSIGN_OR_RETURN(Tensor dl, new_f32(c, lg.rows(), lg.cols()));
    FP8_RETURN_IF_ERROR(
        c.be->cross_entropy_bwd(lg, hs->targets[k], row_scale * cfg_.mtp_lambda() / D, dl));
    FP8_ASSIGN_OR_RETURN(Tensor dhkn, head_.backward_input(c, key, dl));
    if (c.recompute_norm) FP8_RETURN_IF_ERROR(restore_norm_output(c, t.norm, key, head_));
    FP8_ASSIGN_OR_RETURN(Tensor dh, t.norm.backward(c, key, dhkn));
    if (carry.defined()) FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, carry, dh));
    FP8_ASSIGN_OR_RETURN(Tensor dx, t.block->backward_input(c, key, dh));
    FP8_ASSIGN_OR_RETURN(Tensor den, t.eh_e.backward_input(c, key, dx));
    FP8_ASSIGN_OR_RETURN(Tensor dhn, t.eh_h.backward_input(c, key, dx));
    if (c.recompute_norm) {
      FP8_RETURN_IF_ERROR(restore_norm_output(c, t.enorm, key, t.eh_e));
      FP8_RETURN_IF_ERROR(restore_norm_output(c, t.hnorm, key, t.eh_h));
    }
    FP8_ASSIGN_OR_RETURN(Tensor de, t.enorm.backward(c, key, den));
    if (part_.embed) {
      FP8_RETURN_IF_ERROR(embed_.backward(c, key, de, &mtp_embed_grad_));
    } else {
      FP8_RETURN_IF_ERROR(head_embed_.backward(c, key, de));
    }
    FP8_ASSIGN_OR_RETURN(Tensor dhk, t.hnorm.backward(c, key, dhn));
    FP8_ASSIGN_OR_RETURN(carry, new_zeros(c, hs->rows[k - 1], dhk.cols()));
    FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(dhk, hs->keep[k], Tensor(), carry));
  }
  FP8_ASSIGN_OR_RETURN(Tensor lg0, held_f32(c, hs->logits[0]));
  hs->logits[0] = Tensor();
  FP8_ASSIGN_OR_RETURN(Tensor dl, new_f32(c, lg0.rows(), lg0.cols()));
  FP8_RETURN_IF_ERROR(c.be->cross_entropy_bwd(lg0, hs->targets[0], row_scale, dl));
  FP8_ASSIGN_OR_RETURN(Tensor dhn, head_.backward_input(c, mb * kSlots, dl));
  if (c.recompute_norm)
    FP8_RETURN_IF_ERROR(restore_norm_output(c, final_norm_, mb, head_, mb * kSlots));
  FP8_ASSIGN_OR_RETURN(Tensor dh, final_norm_.backward(c, mb, dhn));
  if (carry.defined()) FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, carry, dh));
  return dh;
}

Status Model::head_backward_weight(ModelCtx& c, int mb) {
  for (int k = 0; k <= static_cast<int>(mtp_.size()); ++k) {
    const int key = mb * kSlots + k;
    FP8_RETURN_IF_ERROR(head_.backward_weight(c, key));
    if (k == 0) continue;
    Mtp& t = mtp_[k - 1];
    FP8_RETURN_IF_ERROR(t.block->backward_weight(c, key));
    FP8_RETURN_IF_ERROR(t.eh_e.backward_weight(c, key));
    FP8_RETURN_IF_ERROR(t.eh_h.backward_weight(c, key));
  }
  head_saved_.erase(mb);
  return Status::Ok();
}

Result<LossParts> Model::forward(ModelCtx& c, int mb, const MicroBatch& batch) {
  FP8_ASSIGN_OR_RETURN(Tensor x, embed_forward(c, mb, batch));
  for (auto& b : blocks_) {
    FP8_ASSIGN_OR_RETURN(x, b->forward(c, mb, x, batch.B, batch.T));
  }
  return head_forward(c, mb, x, batch);
}

Status Model::backward(ModelCtx& c, int mb, float loss_scale) {
  FP8_ASSIGN_OR_RETURN(Tensor dx, head_backward_input(c, mb, loss_scale));
  FP8_RETURN_IF_ERROR(head_backward_weight(c, mb));
  for (int i = num_blocks() - 1; i >= 0; --i) {
    FP8_ASSIGN_OR_RETURN(dx, blocks_[i]->backward_input(c, mb, dx));
    FP8_RETURN_IF_ERROR(blocks_[i]->backward_weight(c, mb));
  }
  FP8_RETURN_IF_ERROR(embed_backward(c, mb, dx));
  for (auto [p, grad] : extra_grads()) {  // one process, one pass: fold the MTP path back in
    FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, *grad, p->grad));
    FP8_RETURN_IF_ERROR(c.be->fill_zero(*grad));
  }
  return Status::Ok();
}

// ---- inference ----------------------------------------------------------------------------------

int64_t KvCache::bytes_per_position() const {
  int64_t b = 0;
  for (const auto* v : {&blocks, &mtp})
    for (const AttnCache& a : *v) b += a.bytes_per_position();
  return b;
}

Result<KvCache> Model::new_cache(int64_t capacity, bool latent, DType dtype) const {
  if (!part_.embed || !part_.head || part_.block_begin != 0 ||
      static_cast<int>(blocks_.size()) != cfg_.layers()) {
    return FP8_INVALID(
        "decoding needs the whole model in one chunk (embedding, every block, head)");
  }
  if (capacity <= 0) return FP8_INVALID("decode cache: capacity {} must be > 0", capacity);
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return FP8_INVALID("decode cache: dtype {} is not one of: fp32, bf16", dtype_name(dtype));
  }
  KvCache kv;
  kv.blocks.resize(blocks_.size());
  kv.mtp.resize(mtp_.size());
  for (auto* v : {&kv.blocks, &kv.mtp}) {
    for (AttnCache& a : *v) {
      a.capacity = capacity;
      a.latent = latent;
      a.dtype = dtype;
    }
  }
  return kv;
}

Result<Tensor> Model::decode_head(ModelCtx& c, int key, const Tensor& hn,
                                  std::span<const DecodeSeq> seqs) {
  std::vector<int32_t> keep;
  int64_t r0 = 0;
  for (const DecodeSeq& q : seqs) {
    const int64_t n = static_cast<int64_t>(q.tokens.size());
    const int64_t k = q.logits_rows < 0 ? n : std::min(n, q.logits_rows);
    for (int64_t r = r0 + n - k; r < r0 + n; ++r) keep.push_back(static_cast<int32_t>(r));
    r0 += n;
  }
  if (static_cast<int64_t>(keep.size()) == hn.rows()) return head_.forward(c, key, hn);
  FP8_ASSIGN_OR_RETURN(Tensor idx, upload_i32(c, keep));
  FP8_ASSIGN_OR_RETURN(Tensor rows, new_f32(c, static_cast<int64_t>(keep.size()), hn.cols()));
  if (!keep.empty()) FP8_RETURN_IF_ERROR(c.be->gather_rows(hn, idx, rows));
  return head_.forward(c, key, rows);
}

std::vector<CachedSeq> Model::layer_seqs(std::span<const DecodeSeq> seqs, bool mtp, size_t i) {
  std::vector<CachedSeq> out;
  for (const DecodeSeq& q : seqs) {
    out.push_back({mtp ? &q.cache->mtp[i] : &q.cache->blocks[i], q.past,
                   static_cast<int64_t>(q.tokens.size())});
  }
  return out;
}

Result<DecodeOut> Model::decode(ModelCtx& c, std::span<const DecodeSeq> seqs) {
  std::vector<int32_t> tokens;
  for (const DecodeSeq& q : seqs) {
    if (!q.cache || q.cache->blocks.size() != blocks_.size()) {
      return FP8_INVALID("decode: a sequence without a cache of this model's {} blocks",
                         blocks_.size());
    }
    tokens.insert(tokens.end(), q.tokens.begin(), q.tokens.end());
  }
  const int mb = kInferenceMb;
  DecodeOut out;
  FP8_ASSIGN_OR_RETURN(Tensor ids, upload_i32(c, tokens));
  FP8_ASSIGN_OR_RETURN(out.h, embed_.forward(c, mb * kSlots, ids));
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const std::vector<CachedSeq> layer = layer_seqs(seqs, false, i);
    FP8_ASSIGN_OR_RETURN(out.h, blocks_[i]->forward_cached(c, mb, out.h, layer));
  }
  FP8_ASSIGN_OR_RETURN(Tensor hn, final_norm_.forward(c, mb, out.h));
  FP8_ASSIGN_OR_RETURN(out.logits, decode_head(c, mb * kSlots, hn, seqs));
  return out;
}

Result<DecodeOut> Model::mtp_decode(ModelCtx& c, int k, const Tensor& h_prev,
                                    std::span<const DecodeSeq> seqs) {
  std::vector<int32_t> tokens;
  for (const DecodeSeq& q : seqs) {
    if (!q.cache || k < 1 || k > static_cast<int>(mtp_.size()) ||
        q.cache->mtp.size() != mtp_.size()) {
      return FP8_INVALID("mtp_decode: depth {} of a model with {} MTP modules", k, mtp_.size());
    }
    tokens.insert(tokens.end(), q.tokens.begin(), q.tokens.end());
  }
  if (h_prev.rows() != static_cast<int64_t>(tokens.size())) {
    return FP8_INVALID("mtp_decode: {} hidden rows for {} tokens", h_prev.rows(), tokens.size());
  }
  Mtp& t = mtp_[k - 1];
  const int key = kInferenceMb * kSlots + k;
  FP8_ASSIGN_OR_RETURN(Tensor ids, upload_i32(c, tokens));
  FP8_ASSIGN_OR_RETURN(Tensor e, embed_.forward(c, key, ids));
  FP8_ASSIGN_OR_RETURN(Tensor en, t.enorm.forward(c, key, e));
  FP8_ASSIGN_OR_RETURN(Tensor hn, t.hnorm.forward(c, key, h_prev));
  FP8_ASSIGN_OR_RETURN(Tensor x, t.eh_e.forward(c, key, en));
  FP8_ASSIGN_OR_RETURN(Tensor xh, t.eh_h.forward(c, key, hn));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, xh, x));
  DecodeOut out;
  const std::vector<CachedSeq> layer = layer_seqs(seqs, true, k - 1);
  FP8_ASSIGN_OR_RETURN(out.h, t.block->forward_cached(c, key, x, layer));
  FP8_ASSIGN_OR_RETURN(Tensor hkn, t.norm.forward(c, key, out.h));
  FP8_ASSIGN_OR_RETURN(out.logits, decode_head(c, key, hkn, seqs));
  return out;
}

Result<Tensor> Model::held_logits(ModelCtx& c, int mb, int depth) {
  FP8_ASSIGN_OR_RETURN(HeadSaved * hs, head_saved_.get(mb, "held_logits"));
  if (depth < 0 || depth >= static_cast<int>(hs->logits.size()) || !hs->logits[depth].defined()) {
    return FP8_INVALID("held_logits: no logits of depth {} for micro-batch {}", depth, mb);
  }
  return held_f32(c, hs->logits[depth]);
}

std::vector<Param*> Model::params() {
  std::vector<Param*> ps;
  if (part_.embed) ps.push_back(&embed_.weight());
  for (auto& b : blocks_)
    for (Param* p : b->params()) ps.push_back(p);
  if (!part_.head) return ps;
  if (!part_.embed) ps.push_back(&head_embed_.weight());
  ps.push_back(&final_norm_.weight());
  ps.push_back(&head_.weight());
  for (auto& t : mtp_) {
    for (Param* p : {&t.enorm.weight(), &t.hnorm.weight(), &t.norm.weight(), &t.eh_e.weight(),
                     &t.eh_h.weight()})
      ps.push_back(p);
    for (Param* p : t.block->params()) ps.push_back(p);
  }
  return ps;
}

std::vector<std::pair<Param*, Tensor*>> Model::extra_grads() {
  if (!mtp_embed_grad_.defined()) return {};
  return {{&embed_.weight(), &mtp_embed_grad_}};
}

std::vector<MoE*> Model::moes() {
  std::vector<MoE*> out;
  for (auto& b : blocks_)
    if (b->moe()) out.push_back(b->moe());
  for (auto& t : mtp_)
    if (t.block->moe()) out.push_back(t.block->moe());
  return out;
}

}  // namespace fp8pipe::model
