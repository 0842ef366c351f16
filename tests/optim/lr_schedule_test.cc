// Learning-rate schedules at their key steps (warm-up end, cosine half-way = (peak+min)/2, cosine
// end = min_lr, DeepSeek-V3's tails) and validation messages that name the bad parameter.
#include "optim/lr_schedule.h"

#include <gtest/gtest.h>

namespace fp8pipe::optim {
namespace {

LrSchedule ok(Result<LrSchedule> r) {
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return std::move(r).value();
}

void expect_error_names(Result<LrSchedule> r, const std::string& field) {
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(field), std::string::npos) << r.status().to_string();
}

TEST(LrSchedule, Constant) {
  LrSchedule s = ok(LrSchedule::constant(3e-4));
  EXPECT_FLOAT_EQ(s.lr(1), 3e-4f);
  EXPECT_FLOAT_EQ(s.lr(1000000), 3e-4f);
  LrSchedule w = ok(LrSchedule::constant(3e-4, 10));
  EXPECT_EQ(w.lr(0), 0.0f);
  EXPECT_FLOAT_EQ(w.lr(5), 1.5e-4f);
  EXPECT_FLOAT_EQ(w.lr(10), 3e-4f);
  EXPECT_FLOAT_EQ(w.lr(11), 3e-4f);
}

TEST(LrSchedule, WarmupCosineKeySteps) {
  LrSchedule s = ok(LrSchedule::warmup_cosine(1e-3, 1e-4, 100, 1100));
  EXPECT_EQ(s.lr(0), 0.0f);
  EXPECT_FLOAT_EQ(s.lr(1), 1e-5f);
  EXPECT_FLOAT_EQ(s.lr(50), 5e-4f);
  EXPECT_FLOAT_EQ(s.lr(100), 1e-3f);                // warm-up end = peak
  EXPECT_FLOAT_EQ(s.lr(600), (1e-3f + 1e-4f) / 2);  // half-way through the cosine
  EXPECT_FLOAT_EQ(s.lr(1100), 1e-4f);               // end = min_lr
  EXPECT_FLOAT_EQ(s.lr(50000), 1e-4f);
  for (int t = 101; t <= 1100; ++t) EXPECT_LE(s.lr(t), s.lr(t - 1)) << t;
  LrSchedule no_warmup = ok(LrSchedule::warmup_cosine(1e-3, 0.0, 0, 10));
  EXPECT_FLOAT_EQ(no_warmup.lr(0), 1e-3f);
  EXPECT_FLOAT_EQ(no_warmup.lr(5), 5e-4f);
}

TEST(LrSchedule, ValidationNamesTheParameter) {
  expect_error_names(LrSchedule::constant(-1.0), "lr");
  expect_error_names(LrSchedule::constant(1e-3, -5), "warmup_steps");
  expect_error_names(LrSchedule::warmup_cosine(NAN, 0.0, 1, 2), "peak_lr");
  expect_error_names(LrSchedule::warmup_cosine(1e-3, 1e-2, 1, 2), "min_lr");
  expect_error_names(LrSchedule::warmup_cosine(1e-3, 1e-4, 10, 5), "total_steps");
  expect_error_names(LrSchedule::phases(1e-3, 0, {{100, LrPhase::Shape::kConstant, -1.0, true}}),
                     "a phase's lr");
}

// Step decay by hand: warm-up 0.1 per step to 1.0 at step 10, then x0.5 every 4 steps, floored.
TEST(LrSchedule, StepDecay) {
  LrSchedule s = ok(LrSchedule::step_decay(1.0, 0.2, 10, 4, 0.5));
  EXPECT_EQ(s.kind(), LrSchedule::Kind::kStep);
  EXPECT_FLOAT_EQ(s.lr(5), 0.5f);
  EXPECT_FLOAT_EQ(s.lr(10), 1.0f);
  EXPECT_FLOAT_EQ(s.lr(13), 1.0f);
  EXPECT_FLOAT_EQ(s.lr(14), 0.5f);
  EXPECT_FLOAT_EQ(s.lr(17), 0.5f);
  EXPECT_FLOAT_EQ(s.lr(18), 0.25f);
  EXPECT_FLOAT_EQ(s.lr(22), 0.2f);  // 0.125 floored at min_lr
  EXPECT_FLOAT_EQ(s.lr(1000), 0.2f);
  EXPECT_FALSE(LrSchedule::step_decay(1.0, 0.2, 10, 0, 0.5).ok());
  EXPECT_FALSE(LrSchedule::step_decay(1.0, 0.2, 10, 4, 1.5).ok());
  EXPECT_FALSE(LrSchedule::step_decay(1.0, 2.0, 10, 4, 0.5).ok());
}

// DeepSeek-V3 §4.2 as token-keyed phases: values at the boundaries and mid-cosine by hand.
TEST(LrSchedule, PhasesFollowTheTokensTrained) {
  constexpr int64_t T = 1'000'000'000'000;  // a trillion tokens
  using S = LrPhase::Shape;
  LrSchedule s = ok(LrSchedule::phases(2.2e-4, 2000,
                                       {{10 * T, S::kConstant, 0, false},
                                        {14'300'000'000'000, S::kCosine, 2.2e-5, true},
                                        {14'633'000'000'000, S::kConstant, 2.2e-5, true},
                                        {14'800'000'000'000, S::kConstant, 7.3e-6, true}}));
  EXPECT_EQ(s.kind(), LrSchedule::Kind::kPhases);
  EXPECT_FLOAT_EQ(s.lr(1000, 0), 1.1e-4f) << "warm-up is in steps, whatever the tokens";
  EXPECT_FLOAT_EQ(s.lr(2000, 5 * T), 2.2e-4f);
  EXPECT_FLOAT_EQ(s.lr(2001, 0), 2.2e-4f);
  EXPECT_FLOAT_EQ(s.lr(99999, 10 * T - 1), 2.2e-4f);
  EXPECT_FLOAT_EQ(s.lr(99999, 10 * T), 2.2e-4f) << "cosine starts at the peak";
  EXPECT_FLOAT_EQ(s.lr(99999, 12'150'000'000'000), (2.2e-4f + 2.2e-5f) / 2) << "half-way";
  EXPECT_FLOAT_EQ(s.lr(99999, 14'300'000'000'000), 2.2e-5f);
  EXPECT_FLOAT_EQ(s.lr(99999, 14'632'999'999'999), 2.2e-5f);
  EXPECT_FLOAT_EQ(s.lr(99999, 14'633'000'000'000), 7.3e-6f);
  EXPECT_FLOAT_EQ(s.lr(99999, 20 * T), 7.3e-6f) << "the last lr holds after the phases";
  // A linear phase from the previous end: a quarter of the way from 1e-3 to 2e-4.
  LrSchedule l = ok(LrSchedule::phases(1e-3, 0, {{100, S::kLinear, 2e-4, true}}));
  EXPECT_FLOAT_EQ(l.lr(1, 25), 8e-4f);
  EXPECT_FLOAT_EQ(l.lr(1, 100), 2e-4f);
  // A constant phase without an lr keeps the previous phase's end.
  LrSchedule c = ok(
      LrSchedule::phases(1e-3, 0, {{100, S::kLinear, 5e-4, true}, {200, S::kConstant, 0, false}}));
  EXPECT_FLOAT_EQ(c.lr(1, 150), 5e-4f);
}

TEST(LrSchedule, PhasesAreValidated) {
  using S = LrPhase::Shape;
  expect_error_names(LrSchedule::phases(1e-3, 0, {}), "at least one phase");
  expect_error_names(
      LrSchedule::phases(1e-3, 0, {{100, S::kConstant, 0, false}, {100, S::kConstant, 0, false}}),
      "phase 1 ends at 100 tokens");
  expect_error_names(LrSchedule::phases(1e-3, 0, {{100, S::kCosine, 0, false}}),
                     "needs the lr it ends at");
  expect_error_names(LrSchedule::phases(1e-3, -1, {{100, S::kConstant, 0, false}}), "warmup_steps");
}

}  // namespace
}  // namespace fp8pipe::optim
