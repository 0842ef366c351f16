// The whole DeepSeek-V3-style model: embedding -> blocks -> final RMSNorm -> output head ->
// cross-entropy, plus D multi-token-prediction modules sharing the embedding and head
// (DESIGN.md §4, DSV3_FACTS.md "MTP"). Pieces are exposed separately (embed, block i, head+loss)
// so a pipeline stage can hold any contiguous range; `forward`/`backward` run them all.
//
// Tokens: each of the B rows of a micro-batch holds T+1 tokens t_0..t_T; the main model reads
// t_0..t_{T-1} and predicts t_1..t_T. MTP depth k reads h^{k-1} at positions i = 0..T-1-k with
// Emb(t_{i+k}) and predicts t_{i+k+1}: h^k = Block_k(W_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),
// logits Head(norm_k(h^k)) with the module's own final RMSNorm norm_k (DeepSeek-V3's
// shared_head.norm; the head is shared, the norm is not), and h^k (not normed) feeds depth k+1.
// Losses: L_main = mean CE over B*T; L_k = sum CE / (B*T) (the report normalises by T);
// L = L_main + lambda/D * sum_k L_k (+ MoE balance losses).
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "core/model/block.h"

namespace fp8pipe::model {

struct MicroBatch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens;  // host, [B][T+1]
};

struct LossParts {
  double main = 0;          // mean next-token CE (nats)
  std::vector<double> mtp;  // L_k per depth
  double aux = 0;           // MoE sequence-wise balance losses
  double total = 0;         // the objective that gradients are taken of
  int64_t tokens = 0;       // predicted main tokens (B*T)
};

// Which pieces of the model one pipeline chunk holds: blocks [block_begin, block_end), the
// embedding (first stage) and the head with final norm and MTP modules (last stage). MTP also
// reads the embedding: a head chunk without the embedding holds its own copy of "embed.weight",
// whose gradient is summed with the first stage's by global name; a chunk with both keeps the MTP
// path's embedding gradient in a separate buffer (extra_grads) so that the two uses are summed in
// fp64 in every layout alike. block_end < 0 means "through the last block".
struct ModelPart {
  int block_begin = 0, block_end = -1;
  bool embed = true, head = true;
};

// Inference state of a whole model (core/model/decode.h): the attention caches of the main
// blocks and of each MTP depth's block.
struct KvCache {
  std::vector<AttnCache> blocks, mtp;
  int64_t bytes_per_position() const;
};
// One inference forward: the hidden states of its rows (the last block's output, un-normed: h^0,
// or h^k of an MTP depth) and the logits of the rows asked for.
struct DecodeOut {
  Tensor h, logits;
};
// One sequence of a batched decoding call: its tokens at positions past..past+n-1 over its cache,
// and how many of its last rows need logits (< 0: all).
struct DecodeSeq {
  std::vector<int32_t> tokens;
  int64_t past = 0;
  KvCache* cache = nullptr;
  int64_t logits_rows = -1;
};

class Model {
 public:
  Status init(ModelCtx& c, const config::Model& m, uint64_t seed, ModelPart part = {});

  // Full pass of one micro-batch; gradients of loss_scale * L accumulate into Param::grad.
  Result<LossParts> forward(ModelCtx& c, int mb, const MicroBatch& batch);
  Status backward(ModelCtx& c, int mb, float loss_scale);  // dgrad then wgrad of everything

  // Pieces for pipeline stages (the executor composes these).
  Result<Tensor> embed_forward(ModelCtx& c, int mb, const MicroBatch& batch);
  Status embed_backward(ModelCtx& c, int mb, const Tensor& dx);
  // Blocks held by this chunk, indexed from 0 (global index = part().block_begin + i).
  Block& block(int i) { return *blocks_[i]; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  const ModelPart& part() const { return part_; }
  Result<LossParts> head_forward(ModelCtx& c, int mb, const Tensor& h, const MicroBatch& batch);
  Result<Tensor> head_backward_input(ModelCtx& c, int mb, float loss_scale);  // -> dh
  Status head_backward_weight(ModelCtx& c, int mb);

  // Inference over a key/value cache (whole models only; layers keep nothing for a backward).
  // new_cache: room for `capacity` positions; latent: MLA's latent cache; dtype fp32 or bf16
  // (AttnCache).
  Result<KvCache> new_cache(int64_t capacity, bool latent, DType dtype = DType::kF32) const;
  // The sequences' tokens (rows in order) -> h^0 and the main head's logits of each sequence's
  // last `logits_rows` rows (a prefill needs its last row's), in order.
  Result<DecodeOut> decode(ModelCtx& c, std::span<const DecodeSeq> seqs);
  // MTP depth k (1-based) over each sequence's own positions past..: row i reads h^{k-1}_i (the
  // rows of h_prev, in order) and the token t_{i+k} (tokens[i]); -> h^k and logits predicting
  // t_{i+k+1}.
  Result<DecodeOut> mtp_decode(ModelCtx& c, int k, const Tensor& h_prev,
                               std::span<const DecodeSeq> seqs);
  // One sequence.
  Result<DecodeOut> decode(ModelCtx& c, const std::vector<int32_t>& tokens, int64_t past,
                           KvCache& cache, int64_t logits_rows = -1) {
    const DecodeSeq s{tokens, past, &cache, logits_rows};
    return decode(c, {&s, 1});
  }
  Result<DecodeOut> mtp_decode(ModelCtx& c, int k, const Tensor& h_prev,
                               const std::vector<int32_t>& tokens, int64_t past, KvCache& cache,
                               int64_t logits_rows = -1) {
    const DecodeSeq s{tokens, past, &cache, logits_rows};
    return mtp_decode(c, k, h_prev, {&s, 1});
  }
  // The logits of depth `depth` (0: main) that forward computed for micro-batch mb, as fp32
  // (held until its backward).
  Result<Tensor> held_logits(ModelCtx& c, int mb, int depth);

  std::vector<Param*> params();  // every trained parameter, in a fixed order, names unique
  // Gradient buffers that belong to a parameter but are kept apart (the MTP path's embedding
  // gradient in a chunk holding both uses): the executor flushes each into its Param's grad_acc.
  std::vector<std::pair<Param*, Tensor*>> extra_grads();
  std::vector<MoE*> moes();  // MoE layers of the main blocks and MTP blocks
  const config::Model& config() const { return cfg_; }
  // The MTP loss weight λ of the following micro-batches (model.mtp_lambda_after switches it).
  void set_mtp_lambda(float lambda) { cfg_.set_mtp_lambda(lambda); }

 private:
  struct Mtp {
    RMSNorm enorm, hnorm, norm;  // norm: before the shared head (HF: shared_head.norm)
    Linear eh_e, eh_h;           // W_k split over the concatenation: W_k[e; h] = W_e e + W_h h
    std::unique_ptr<Block> block;
  };
  struct HeadSaved {
    std::vector<Tensor> logits;   // per depth (0 = main); bf16 outside FP32 (hold_bf16)
    std::vector<Tensor> targets;  // i32 per depth
    std::vector<Tensor> keep;     // i32 row indices of h^{k-1} kept for depth k
    std::vector<int64_t> rows;    // h^{k-1} rows per depth
    int64_t B = 0, T = 0;
  };
  Result<Tensor> mtp_forward(ModelCtx& c, int mb, int k, const Tensor& h_prev, int64_t len_prev,
                             const MicroBatch& batch, HeadSaved& hs);
  Status restore_norm_output(ModelCtx& c, RMSNorm& norm, int key, Linear& reader,
                             int reader_key = -1);
  Result<Tensor> logits_and_loss(ModelCtx& c, int key, const Tensor& h, const Tensor& targets,
                                 Tensor* logits, double* ce_sum);
  // Inference: the head over the rows of hn that seqs ask logits of; the per-layer sequences of
  // the attention caches (blocks, or mtp when depth > 0).
  Result<Tensor> decode_head(ModelCtx& c, int key, const Tensor& hn,
                             std::span<const DecodeSeq> seqs);
  static std::vector<CachedSeq> layer_seqs(std::span<const DecodeSeq> seqs, bool mtp, size_t i);

  config::Model cfg_;
  ModelPart part_;
  Embedding embed_, head_embed_;  // head_embed_: the MTP copy of a head chunk without embed_
  Tensor mtp_embed_grad_;         // chunks with both: the MTP path's embedding gradient
  std::vector<std::unique_ptr<Block>> blocks_;
  RMSNorm final_norm_;
  Linear head_;
  std::vector<Mtp> mtp_;
  PerMicrobatch<HeadSaved> head_saved_;
  PerMicrobatch<Tensor> block_out_;  // main-model output h^0 per micro-batch (full-model path)
};

// Slot keys so that a layer shared by the main model and the MTP depths (embedding, head) keeps
// separate saved state per use: key = mb * kSlots + depth.
constexpr int kSlots = 16;

}  // namespace fp8pipe::model
