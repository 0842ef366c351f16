// DeepSeek-V3's training recipe in the trainer (TR §4.2): the batch-size ramp (train.batch_ramp),
// token-keyed learning-rate phases (optim.schedule=phases) and the λ and γ switches
// (model.mtp_lambda_after, model.moe.bias_update_rate_after). References: runs of a constant batch
// of the ramp's size, Megatron's ramp rule and the phase formulas written out here, the loss
// identity total = main + λ·mtp, and an uninterrupted run for resumption.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <numbers>
#include <string>
#include <vector>

#include "core/config.h"
#include "launch/trainer.h"
#include "tests/launch/short_run.h"

namespace fp8pipe {
namespace {

using testutil::make_trainer;

constexpr int64_t kSeq = 64;  // tiny's seq_len

// tiny with one warm-up step, no evals and no periodic checkpoints, then `overrides`; validated
// unless the caller completes it first.
config::Config tiny(std::vector<std::string> overrides, bool check = true) {
  std::vector<std::string> all = {"--optim.warmup_steps=1", "--train.eval_every=0",
                                  "--checkpoint.every=0", "--train.steps=8"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  auto cfg = parse_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto", all);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  if (cfg.ok() && check) {
    EXPECT_TRUE(validate(*cfg).ok()) << validate(*cfg).to_string();
  }
  return cfg.ok() ? *cfg : config::Config();
}

// Global batch 16 in micro-batches of 4, ramping 8 -> 16 by 4 over 32 sequences (2048 tokens).
const std::vector<std::string> kRamp = {
    "--train.global_batch=16", "--parallel.microbatches=4", "--train.batch_ramp.start=8",
    "--train.batch_ramp.increment=4", "--train.batch_ramp.tokens=2048"};

// Megatron's rule for that ramp (2 rises, 16 samples each) after `consumed` sequences.
int64_t ramp_batch(int64_t consumed) { return std::min<int64_t>(16, 8 + 4 * (consumed / 16)); }

std::vector<float> biases(Trainer& t) {
  std::vector<float> out;
  for (auto* moe : t.model().moes()) {
    const float* b = moe->bias().host_value.data_as<float>();
    out.insert(out.end(), b, b + moe->bias().host_value.numel());
  }
  return out;
}

TEST(TrainRecipe, RampStepsFollowTheRuleAndTrainLikeConstantBatchesOfTheirSize) {
  auto ramped = make_trainer(tiny(kRamp));
  // The ramp's first steps hold 8 sequences: a constant batch of 8 (micro-batches of 4) with the
  // same schedule length trains the same samples with the same lr.
  auto eight = make_trainer(tiny({"--train.global_batch=8", "--parallel.microbatches=2"}));
  ASSERT_TRUE(ramped && eight);
  int64_t consumed = 0;
  std::vector<int64_t> batches;
  for (int s = 0; s < 6; ++s) {
    auto r = ramped->train_step();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const int64_t want = ramp_batch(consumed);
    EXPECT_EQ(r->batch, want) << "step " << s + 1;
    EXPECT_EQ(r->loss.tokens, want * kSeq) << "step " << s + 1;
    batches.push_back(r->batch);
    consumed += want;
    if (want == 8) {
      auto e = eight->train_step();
      ASSERT_TRUE(e.ok());
      EXPECT_EQ(r->loss.total, e->loss.total) << "step " << s + 1;
      EXPECT_EQ(r->grad_norm, e->grad_norm) << "step " << s + 1;
      EXPECT_EQ(r->lr, e->lr) << "step " << s + 1;
    }
  }
  EXPECT_EQ(batches, (std::vector<int64_t>{8, 8, 12, 12, 16, 16}));
}

TEST(TrainRecipe, ResumesMidRampToTheBit) {
  std::vector<double> whole;
  {
    auto t = make_trainer(tiny(kRamp));
    ASSERT_TRUE(t);
    for (int s = 0; s < 5; ++s) {
      auto r = t->train_step();
      ASSERT_TRUE(r.ok());
      whole.push_back(r->loss.total);
    }
  }
  const std::string dir = ::testing::TempDir() + "recipe_resume";
  std::filesystem::remove_all(dir);
  std::vector<std::string> with_dir = kRamp;
  with_dir.push_back("--checkpoint.dir=" + dir);
  {
    auto a = make_trainer(tiny(with_dir));
    ASSERT_TRUE(a);
    for (int s = 0; s < 3; ++s) ASSERT_TRUE(a->train_step().ok());  // ends inside the ramp
    ASSERT_TRUE(a->save_checkpoint().ok());
    ASSERT_TRUE(a->finish_checkpoints().ok());
  }
  auto b = make_trainer(tiny(with_dir));
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->resume(ResumeOptions{}).ok());
  ASSERT_EQ(b->step(), 3);
  for (int s = 3; s < 5; ++s) {
    auto r = b->train_step();
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->batch, s == 3 ? 12 : 16);
    EXPECT_EQ(r->loss.total, whole[s]) << "step " << s + 1;
  }
  std::filesystem::remove_all(dir);
}

// A checkpoint of a constant batch of 16 resumed under the ramp: 2 steps trained 2048 tokens where
// the ramp's first 2 steps make 1024. The trainer says so and goes on at the ramp's step 3 (12
// sequences).
TEST(TrainRecipe, ResumeUnderAnotherBatchPlanWarnsAndGoesOn) {
  const std::string dir = ::testing::TempDir() + "recipe_replan";
  std::filesystem::remove_all(dir);
  {
    auto a = make_trainer(
        tiny({"--train.global_batch=16", "--parallel.microbatches=4", "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(a);
    for (int s = 0; s < 2; ++s) ASSERT_TRUE(a->train_step().ok());
    ASSERT_TRUE(a->save_checkpoint().ok());
    ASSERT_TRUE(a->finish_checkpoints().ok());
  }
  std::vector<std::string> o = kRamp;
  o.push_back("--checkpoint.dir=" + dir);
  auto b = make_trainer(tiny(o));
  ASSERT_TRUE(b);
  ::testing::internal::CaptureStderr();
  const Status st = b->resume(ResumeOptions{});
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_NE(err.find("2048 tokens trained in 2 steps, but this config's batches "
                     "(train.global_batch, train.batch_ramp) make 1024"),
            std::string::npos)
      << err;
  auto r = b->train_step();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->batch, 12);
  std::filesystem::remove_all(dir);
}

// λ = 0.3 and γ = 0.001 for the steps that start below 1024 tokens (2 steps of 8 × 64), then
// λ = 0.1 and γ = 0: the total loss is main + λ·mtp (D = 1) with the step's λ, and the router
// biases move before the switch and stay put after it.
TEST(TrainRecipe, LambdaAndGammaSwitchAtTheirTokenCounts) {
  auto t = make_trainer(
      tiny({"--train.global_batch=8", "--parallel.microbatches=2",
            "--model.mtp_lambda_after.tokens=1024", "--model.mtp_lambda_after.value=0.1",
            "--model.moe.bias_update_rate_after.tokens=1024",
            "--model.moe.bias_update_rate_after.value=0"}));
  ASSERT_TRUE(t);
  for (int s = 0; s < 4; ++s) {
    const std::vector<float> before = biases(*t);
    auto r = t->train_step();
    ASSERT_TRUE(r.ok());
    const double lambda = s < 2 ? 0.3f : 0.1f;  // the config's float
    ASSERT_EQ(r->loss.mtp.size(), 1u);
    EXPECT_NEAR(r->loss.total, r->loss.main + lambda * r->loss.mtp[0], 1e-9) << "step " << s + 1;
    EXPECT_GT(std::abs(r->loss.total - r->loss.main - 0.2 * r->loss.mtp[0]), 0.05)
        << "the two λ must differ measurably here";
    if (s < 2) {
      EXPECT_NE(biases(*t), before) << "step " << s + 1 << ": γ = 0.001 moves the biases";
    } else {
      EXPECT_EQ(biases(*t), before) << "step " << s + 1 << ": γ = 0 freezes them";
    }
  }
}

// optim.schedule=phases under the ramp: each step's lr is the phase formula at the tokens trained
// before it (which the ramp makes uneven in steps).
TEST(TrainRecipe, LrPhasesFollowTheTokensTrainedBeforeEachStep) {
  const double peak = 2e-3;
  std::vector<std::string> o = kRamp;
  o.insert(o.end(), {"--optim.lr=0.002", "--optim.schedule=phases"});
  config::Config cfg = tiny(o, /*check=*/false);
  // constant to 1536 tokens, linear to 1e-4 at 3072, cosine to 1e-5 at 4096, then 5e-6
  auto add = [&](int64_t until, const char* shape, double lr) {
    auto* p = cfg.mutable_optim()->add_phase();
    p->set_until_tokens(until);
    p->set_shape(shape);
    if (lr > 0) p->set_lr(static_cast<float>(lr));
  };
  add(1536, "constant", 0);
  add(3072, "linear", 1e-4);
  add(4096, "cosine", 1e-5);
  add(5000, "constant", 5e-6);
  ASSERT_TRUE(validate(cfg).ok()) << validate(cfg).to_string();
  auto expected = [&](int64_t tokens) {
    const double lo = static_cast<float>(1e-4), lo2 = static_cast<float>(1e-5);
    if (tokens < 1536) return peak;
    if (tokens < 3072) return peak + (lo - peak) * (tokens - 1536) / 1536.0;
    if (tokens < 4096) {
      return lo2 + (lo - lo2) * 0.5 * (1 + std::cos(std::numbers::pi * (tokens - 3072) / 1024.0));
    }
    return static_cast<double>(static_cast<float>(5e-6));
  };
  auto t = make_trainer(cfg);
  ASSERT_TRUE(t);
  int64_t tokens = 0;
  std::vector<int64_t> starts;
  for (int s = 0; s < 8; ++s) {
    auto r = t->train_step();
    ASSERT_TRUE(r.ok());
    // step 1 is the warm-up's last (peak · 1/1)
    EXPECT_FLOAT_EQ(r->lr, static_cast<float>(expected(tokens))) << "step " << s + 1;
    starts.push_back(tokens);
    tokens += r->loss.tokens;
  }
  // Steps start at 0, 512, 1024, 1792, 2560, 3584, 4608, 5632 tokens: every phase is visited.
  EXPECT_EQ(starts, (std::vector<int64_t>{0, 512, 1024, 1792, 2560, 3584, 4608, 5632}));
}

}  // namespace
}  // namespace fp8pipe
