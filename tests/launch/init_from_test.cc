// checkpoint.init_from (Megatron's --finetune): a run starts from another run's weights at step
// 0 with fresh optimizer state. References: the source run's own weights (bitwise), AdamW's first
// step from zero moments (a weight moves by lr·|g|/(|g| + eps), i.e. by lr, with weight decay off;
// carried-over moments would not: the source run's own next step is checked to fail this), and
// this run's own checkpoint, which wins over init_from on a restart.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

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

  // The source run: 3 steps, a checkpoint and the model-only file; returns its weights.
  std::vector<float> source(std::unique_ptr<Trainer>* keep = nullptr) {
    std::vector<std::string> o = kNoDecay;
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
  std::unique_ptr<Trainer> derived(const std::string& from, const std::string& dir = "b") {
    std::vector<std::string> o = kNoDecay;
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
  for (const std::string from :
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

}  // namespace
}  // namespace fp8pipe
