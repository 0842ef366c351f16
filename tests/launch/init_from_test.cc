// checkpoint.init_from (Megatron's --finetune): a run starts from another run's weights at step
// 0 with fresh optimizer state. References: the source run's own weights (bitwise), AdamW's first
// step from zero moments (a weight moves by lr·|g|/(|g| + eps), i.e. by lr, with weight decay off;
// carried-over moments would not: the source run's own next step is checked to fail this), and
// this run's own checkpoint, which wins over init_from on a restart.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/hf_export.h"
#include "core/safetensors.h"
#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/quantize.h"
#include "launch/trainer.h"
#include "tests/launch/short_run.h"

namespace fp8pipe {
namespace {

using testutil::make_trainer;
using testutil::tiny_short;

// Every parameter value and router bias, in the model's order.
std::vector<float> weights(Trainer& t) {
  std::vector<float> out;
  for (model::Param* p : t.model().params()) {
    const float* v = p->host_value.data_as<float>();
    out.insert(out.end(), v, v + p->host_value.numel());
  }
  for (auto* moe : t.model().moes()) {
    const float* b = moe->bias().host_value.data_as<float>();
    out.insert(out.end(), b, b + moe->bias().host_value.numel());
  }
  return out;
}

std::vector<float> param_values(Trainer& t) {
  std::vector<float> out;
  for (model::Param* p : t.model().params()) {
    const float* v = p->host_value.data_as<float>();
    out.insert(out.end(), v, v + p->host_value.numel());
  }
  return out;
}

// Share of the moved weights that moved by lr within 1%, and share of the weights that moved.
// AdamW from zero moments moves each weight with a gradient g by lr·|g|/(|g| + eps) with weight
// decay 0 (the first step's bias corrections cancel): lr but for gradients within ~100 eps of 0
// (measured on tiny: 95% of the moved weights; 0.2% with the source's moments carried over).
std::pair<double, double> moved_by_lr(const std::vector<float>& before,
                                      const std::vector<float>& after, double lr) {
  int64_t moved = 0, by_lr = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    const double d = std::abs(double(after[i]) - double(before[i]));
    if (d == 0) continue;
    ++moved;
    if (std::abs(d - lr) <= 1e-2 * lr) ++by_lr;
  }
  return {double(by_lr) / std::max<int64_t>(moved, 1), double(moved) / before.size()};
}

class InitFrom : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "init_from_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  std::string root_;
  const std::vector<std::string> kNoDecay = {"--optim.weight_decay=0", "--train.steps=10"};
  std::vector<std::string> dims_;  // model overrides of both the source and the derived runs

  // The source run: 3 steps, a checkpoint and the model-only file; returns its weights.
  std::vector<float> source(std::unique_ptr<Trainer>* keep = nullptr) {
    std::vector<std::string> o = kNoDecay;
    o.insert(o.end(), dims_.begin(), dims_.end());
    o.push_back("--checkpoint.dir=" + root_ + "/a");
    auto a = make_trainer(tiny_short(o));
    EXPECT_TRUE(a);
    for (int s = 0; s < 3; ++s) EXPECT_TRUE(a->train_step().ok());
    EXPECT_TRUE(a->save_checkpoint().ok());
    EXPECT_TRUE(a->finish_checkpoints().ok());
    EXPECT_TRUE(a->save_model(root_ + "/a/model.safetensors").ok());
    std::vector<float> w = weights(*a);
    if (keep) *keep = std::move(a);
    return w;
  }
  // The source run's newest committed checkpoint, opened for export.
  Result<ckpt::Loaded> source_checkpoint() {
    FP8_ASSIGN_OR_RETURN(auto found, ckpt::resolve(root_ + "/a", "", false));
    if (!found) return FP8_INVALID("no checkpoint under {}/a", root_);
    return ckpt::Loaded::open(found->step_dir, std::move(found->manifest));
  }
  std::unique_ptr<Trainer> derived(const std::string& from, const std::string& dir = "b") {
    std::vector<std::string> o = kNoDecay;
    o.insert(o.end(), dims_.begin(), dims_.end());
    o.push_back("--checkpoint.dir=" + root_ + "/" + dir);
    o.push_back("--checkpoint.init_from=" + from);
    auto b = make_trainer(tiny_short(o));
    EXPECT_TRUE(b);
    if (b) {
      const Status s = b->resume(ResumeOptions{});
      EXPECT_TRUE(s.ok()) << s.to_string();
    }
    return b;
  }
};

TEST_F(InitFrom, StartsAtStepZeroFromTheSourceWeightsWithFreshMoments) {
  std::unique_ptr<Trainer> a;
  const std::vector<float> src = source(&a);
  for (const std::string& from :
       {root_ + "/a", root_ + "/a/step_00000003", root_ + "/a/model.safetensors"}) {
    SCOPED_TRACE(from);
    auto b = derived(from, "b" + std::to_string(from.size()));
    ASSERT_TRUE(b);
    EXPECT_EQ(b->step(), 0);
    EXPECT_EQ(weights(*b), src) << "the weights and router biases are the source's, bitwise";
    const std::vector<float> w0 = param_values(*b);
    auto r = b->train_step();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const auto [share, touched] = moved_by_lr(w0, param_values(*b), r->lr);
    EXPECT_GT(touched, 0.5) << "most weights get a gradient";
    EXPECT_GT(share, 0.9) << "zero moments: each touched weight moves by lr = " << r->lr;
  }
  // The check can fail: the source's own next step carries its moments and does not move every
  // weight by lr.
  const std::vector<float> w0 = param_values(*a);
  auto r = a->train_step();
  ASSERT_TRUE(r.ok());
  const double carried = moved_by_lr(w0, param_values(*a), r->lr).first;
  EXPECT_LT(carried, 0.5);
  std::printf("moved by lr: %.3f of the weights with moments carried\n", carried);
}

TEST_F(InitFrom, ThisRunsOwnCheckpointWinsOnARestart) {
  source();
  std::vector<float> after_two;
  {
    auto b = derived(root_ + "/a");
    ASSERT_TRUE(b);
    for (int s = 0; s < 2; ++s) ASSERT_TRUE(b->train_step().ok());
    ASSERT_TRUE(b->save_checkpoint().ok());
    ASSERT_TRUE(b->finish_checkpoints().ok());
    after_two = weights(*b);
  }
  auto again = derived(root_ + "/a");
  ASSERT_TRUE(again);
  EXPECT_EQ(again->step(), 2);
  EXPECT_EQ(weights(*again), after_two);
}

TEST_F(InitFrom, ErrorsNameTheFieldAndWhatIsWrong) {
  source();
  auto make = [&](std::vector<std::string> extra) {
    std::vector<std::string> o = kNoDecay;
    o.push_back("--checkpoint.dir=" + root_ + "/c");
    o.insert(o.end(), extra.begin(), extra.end());
    return make_trainer(tiny_short(o));
  };
  {
    auto t = make({"--checkpoint.init_from=" + root_ + "/missing"});
    ASSERT_TRUE(t);
    const std::string e = t->resume(ResumeOptions{}).to_string();
    EXPECT_NE(e.find("checkpoint.init_from=" + root_ + "/missing: no such file or directory"),
              std::string::npos)
        << e;
  }
  {
    std::filesystem::create_directories(root_ + "/empty");
    auto t = make({"--checkpoint.init_from=" + root_ + "/empty"});
    ASSERT_TRUE(t);
    const std::string e = t->resume(ResumeOptions{}).to_string();
    EXPECT_NE(e.find("no committed checkpoint there"), std::string::npos) << e;
  }
  {
    auto t = make({"--checkpoint.init_from=" + root_ + "/a", "--model.hidden=128"});
    ASSERT_TRUE(t);
    const std::string e = t->resume(ResumeOptions{}).to_string();
    EXPECT_NE(e.find("tensor 'embed.weight' has shape [256, 64], this model needs [256, 128]"),
              std::string::npos)
        << e;
  }
}

// A Hugging Face DeepseekV3 folder as `fp8pipe ckpt export --format hf` writes it (the inverse
// mapping, MTP's eh_proj split back into its halves, the main embed/head rather than the MTP
// layers' copies): fp32 gives the source's weights bitwise, bf16 their round-to-nearest-even.
TEST_F(InitFrom, HuggingFaceFolderGivesTheExportedWeights) {
  const std::vector<float> src = source();
  auto loaded = source_checkpoint();
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  for (const char* dtype : {"fp32", "bf16"}) {
    SCOPED_TRACE(dtype);
    const std::string dir = root_ + "/hf_" + dtype;
    hf::Options opt;
    opt.dtype = dtype;
    ASSERT_TRUE(hf::export_folder(*loaded, dir, opt).ok());
    auto b = derived(dir, std::string("b_") + dtype);
    ASSERT_TRUE(b);
    EXPECT_EQ(b->step(), 0);
    const std::vector<float> got = weights(*b);
    ASSERT_EQ(got.size(), src.size());
    // the router biases (the last elements) stay F32 in both
    const size_t biases = [&] {
      size_t n = 0;
      for (auto* moe : b->model().moes()) n += moe->bias().host_value.numel();
      return n;
    }();
    int64_t off = 0;
    for (size_t i = 0; i < src.size(); ++i) {
      const bool f32 = std::string(dtype) == "fp32" || i >= src.size() - biases;
      const float want = f32 ? src[i] : kernels::bf16_to_float(kernels::float_to_bf16(src[i]));
      off += got[i] != want;
    }
    EXPECT_EQ(off, 0) << "of " << src.size() << " values";
  }
}

// DeepSeek-V3 ships its Linear weights as F8_E4M3 with 128x128 block scales `<name>_scale_inv`
// (w = code x scale_inv of the block). The fp32 export rewritten that way here, block by block
// (scale = block amax / 448; 2 x 2 blocks with partial edge ones), imports as exactly those
// products, within E4M3's 2^-4 relative step of the trained weights; norms, embeddings, head,
// router and biases stay as exported (F32; DeepSeek keeps them BF16, the biases F32).
TEST_F(InitFrom, HuggingFaceFp8BlockScaledWeights) {
  // hidden 192 and expert width 160: matrices of 2 x 2 blocks with partial edge blocks
  dims_ = {"--model.hidden=192", "--model.moe.expert_hidden=160"};
  std::unique_ptr<Trainer> a;
  source(&a);
  auto loaded = source_checkpoint();
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  const std::string dir = root_ + "/hf_fp8";
  hf::Options opt;
  opt.dtype = "fp32";
  ASSERT_TRUE(hf::export_folder(*loaded, dir, opt).ok());
  std::map<std::string, std::vector<float>> expect;  // HF name -> dequantized values
  {
    auto r = safetensors::Reader::open(dir + "/model.safetensors");
    ASSERT_TRUE(r.ok());
    safetensors::Writer w;
    for (const safetensors::TensorView& t : r->tensors()) {
      std::vector<uint8_t> bytes(t.data, t.data + t.nbytes);
      const bool linear = t.shape.size() == 2 && t.name.find("layers.") != std::string::npos &&
                          t.name.find("norm") == std::string::npos &&
                          t.name.find("mlp.gate.") == std::string::npos &&
                          t.name.find("embed") == std::string::npos &&
                          t.name.find("head") == std::string::npos;
      if (!linear) {
        ASSERT_TRUE(w.add(t.name, t.dtype, t.shape, std::move(bytes)).ok());
        continue;
      }
      const int64_t R = t.shape[0], C = t.shape[1], RB = (R + 127) / 128, CB = (C + 127) / 128;
      std::vector<float> v(R * C), deq(R * C), scale(RB * CB);
      std::memcpy(v.data(), t.data, t.nbytes);
      std::vector<uint8_t> codes(R * C);
      for (int64_t rb = 0; rb < RB; ++rb) {
        for (int64_t cb = 0; cb < CB; ++cb) {
          float amax = 0;
          for (int64_t r = rb * 128; r < std::min(R, rb * 128 + 128); ++r)
            for (int64_t c = cb * 128; c < std::min(C, cb * 128 + 128); ++c)
              amax = std::max(amax, std::abs(v[r * C + c]));
          const float s = amax > 0 ? amax / 448.0f : 1.0f;
          scale[rb * CB + cb] = s;
          for (int64_t r = rb * 128; r < std::min(R, rb * 128 + 128); ++r) {
            for (int64_t c = cb * 128; c < std::min(C, cb * 128 + 128); ++c) {
              codes[r * C + c] = kernels::float_to_fp8(v[r * C + c] / s, kernels::Fp8Format::kE4M3);
              deq[r * C + c] =
                  kernels::fp8_to_float(codes[r * C + c], kernels::Fp8Format::kE4M3) * s;
              EXPECT_LE(std::abs(deq[r * C + c] - v[r * C + c]), amax / 16) << t.name;
            }
          }
        }
      }
      std::vector<uint8_t> sb(scale.size() * 4);
      std::memcpy(sb.data(), scale.data(), sb.size());
      ASSERT_TRUE(w.add(t.name, "F8_E4M3", t.shape, std::move(codes)).ok());
      ASSERT_TRUE(w.add(t.name + "_scale_inv", "F32", {RB, CB}, std::move(sb)).ok());
      expect[t.name] = std::move(deq);
    }
    w.set_metadata("format", "pt");
    ASSERT_TRUE(w.write(dir + "/model.safetensors.new").ok());
  }
  std::filesystem::rename(dir + "/model.safetensors.new", dir + "/model.safetensors");
  ASSERT_GT(expect.size(), 10u);
  auto b = derived(dir, "b_fp8");
  ASSERT_TRUE(b);
  // each FP8-stored weight is the product, bitwise; e.g. layer 1's expert 0 w1 (gate_proj)
  int64_t checked = 0;
  for (model::Param* p : b->model().params()) {
    std::string hf;
    for (const auto& [name, deq] : expect) {
      (void)deq;
      if (p->name == "layers.1.ffn.experts.0.w1.weight" &&
          name == "model.layers.1.mlp.experts.0.gate_proj.weight")
        hf = name;
      if (p->name == "layers.0.attn.wkv_b.weight" &&
          name == "model.layers.0.self_attn.kv_b_proj.weight")
        hf = name;
      if (p->name == "mtp.0.eh_proj_h.weight" && name == "model.layers.4.eh_proj.weight") hf = name;
    }
    if (hf.empty()) continue;
    const std::vector<float>& deq = expect.at(hf);
    const float* v = p->host_value.data_as<float>();
    const int64_t rows = p->value.shape()[0], cols = p->value.shape()[1];
    const int64_t C = static_cast<int64_t>(deq.size()) / rows,
                  col0 = C - cols;  // eh_proj: right half
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        EXPECT_EQ(v[r * cols + c], deq[r * C + col0 + c]) << p->name;
    ++checked;
  }
  EXPECT_EQ(checked, 3);
  // and a non-FP8 tensor came through as F32: the final norm
  for (model::Param* p : b->model().params()) {
    if (p->name != "norm.weight") continue;
    for (model::Param* q : a->model().params()) {
      if (q->name == "norm.weight") {
        EXPECT_EQ(
            0, std::memcmp(p->host_value.data(), q->host_value.data(), p->host_value.numel() * 4));
      }
    }
  }
}

// `ckpt export --format hf --dtype fp8` (DeepSeek-V3's release format) read back: the Linear
// weights are exactly the dequantized 128x128 quantization the run's FP8 forward makes of them
// (the CPU kernels' quantize then dequantize, with the run's scale rule), the other tensors their
// bf16 rounding, the router biases F32. Dims as in the FP8 test above (multi-block, partial).
TEST_F(InitFrom, HuggingFaceFp8ExportReadsBackAsTheForwardsWeights) {
  dims_ = {"--model.hidden=192", "--model.moe.expert_hidden=160"};
  std::unique_ptr<Trainer> a;
  source(&a);
  auto loaded = source_checkpoint();
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  hf::Options opt;
  opt.dtype = "fp8";
  ASSERT_TRUE(hf::export_folder(*loaded, root_ + "/hf8", opt).ok());
  auto b = derived(root_ + "/hf8", "b8");
  ASSERT_TRUE(b);
  std::map<std::string, model::Param*> src;
  for (model::Param* p : a->model().params()) src[p->name] = p;
  const kernels::QuantParams qp = a->ctx().qp;
  int64_t linear = 0, other = 0;
  for (model::Param* p : b->model().params()) {
    const model::Param& s = *src.at(p->name);
    const float* v = s.host_value.data_as<float>();
    const int64_t n = s.host_value.numel();
    const std::string& nm = p->name;
    const bool is_linear =
        s.value.shape().size() == 2 && nm.find("norm") == std::string::npos &&
        nm.find("eh_proj") == std::string::npos && nm.find("embed") == std::string::npos &&
        nm.find("head") == std::string::npos && nm.find("ffn.gate.") == std::string::npos;
    std::vector<float> want(n);
    if (is_linear) {
      const int64_t R = s.value.shape()[0], C = s.value.shape()[1];
      std::vector<uint8_t> q(n);
      std::vector<float> sc(kernels::scale_count(kernels::Granularity::k128x128, R, C));
      kernels::quantize(v, R, C, kernels::Granularity::k128x128, qp, q.data(), sc.data());
      kernels::dequantize(q.data(), sc.data(), R, C, kernels::Granularity::k128x128, qp.fmt,
                          want.data());
      ++linear;
    } else {
      for (int64_t i = 0; i < n; ++i)
        want[i] = kernels::bf16_to_float(kernels::float_to_bf16(v[i]));
      ++other;
    }
    const float* got = p->host_value.data_as<float>();
    EXPECT_EQ(0, std::memcmp(got, want.data(), n * 4)) << nm;
  }
  EXPECT_GT(linear, 20);
  EXPECT_GT(other, 5);
}

// A folder whose FP8 tensor lacks its scales, has them in another shape, or holds a dtype the
// reader does not take: each refused, naming the tensor and what was expected.
TEST_F(InitFrom, HuggingFaceFolderWithBadTensorsIsRefusedNamingThem) {
  source();
  auto loaded = source_checkpoint();
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  const std::string target = "model.layers.0.self_attn.o_proj.weight";
  struct Case {
    std::string label, dtype;
    std::vector<int64_t> scale_shape;  // empty: no scale tensor
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"no_scale", "F8_E4M3", {}, "no tensor '" + target + "_scale_inv'"},
      {"bad_scale", "F8_E4M3", {2, 1}, "DeepSeek's 128x128 block scales of '" + target},
      {"f16", "F16", {}, "'" + target + "' is F16 (readable: F32, BF16, F8_E4M3, F8_E5M2)"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.label);
    const std::string dir = root_ + "/hf_" + k.label;
    hf::Options opt;
    opt.dtype = "fp32";
    ASSERT_TRUE(hf::export_folder(*loaded, dir, opt).ok());
    {
      auto r = safetensors::Reader::open(dir + "/model.safetensors");
      ASSERT_TRUE(r.ok());
      safetensors::Writer w;
      for (const safetensors::TensorView& t : r->tensors()) {
        if (t.name != target) {
          ASSERT_TRUE(
              w.add(t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes))
                  .ok());
          continue;
        }
        const size_t n = static_cast<size_t>(t.numel()) * (k.dtype == "F16" ? 2 : 1);
        ASSERT_TRUE(w.add(t.name, k.dtype, t.shape, std::vector<uint8_t>(n, 0)).ok());
        if (!k.scale_shape.empty()) {
          const size_t m = static_cast<size_t>(k.scale_shape[0] * k.scale_shape[1]) * 4;
          ASSERT_TRUE(
              w.add(t.name + "_scale_inv", "F32", k.scale_shape, std::vector<uint8_t>(m, 0)).ok());
        }
      }
      w.set_metadata("format", "pt");
      ASSERT_TRUE(w.write(dir + "/model.safetensors").ok());
    }
    std::vector<std::string> o = kNoDecay;
    o.insert(o.end(),
             {"--checkpoint.dir=" + root_ + "/c_" + k.label, "--checkpoint.init_from=" + dir});
    auto t = make_trainer(tiny_short(o));
    ASSERT_TRUE(t);
    const std::string e = t->resume(ResumeOptions{}).to_string();
    EXPECT_NE(e.find(k.expect), std::string::npos) << e;
    EXPECT_NE(e.find("checkpoint.init_from=" + dir), std::string::npos) << e;
  }
}

TEST_F(InitFrom, HuggingFaceFolderOfAnotherModelIsRefusedNamingTheField) {
  source();
  auto loaded = source_checkpoint();
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  ASSERT_TRUE(hf::export_folder(*loaded, root_ + "/hf", hf::Options{}).ok());
  std::vector<std::string> o = kNoDecay;
  o.insert(o.end(), {"--checkpoint.dir=" + root_ + "/c", "--checkpoint.init_from=" + root_ + "/hf",
                     "--model.moe.expert_hidden=64"});
  auto t = make_trainer(tiny_short(o));
  ASSERT_TRUE(t);
  const std::string e = t->resume(ResumeOptions{}).to_string();
  EXPECT_NE(e.find("moe_intermediate_size is 32, model.moe.expert_hidden=64"), std::string::npos)
      << e;
}

}  // namespace
}  // namespace fp8pipe
