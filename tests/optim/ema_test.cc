// ParamEma (optim/ema.h): the fp32 recurrence against fp64, the asynchronous update's ordering,
// and the checkpoint arrays.
#include "optim/ema.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

namespace fp8pipe::optim {
namespace {

// Two groups over one array, as a ZeRO-1 shard would hold them: [0, 5) of "a" and [2, 7) of "b".
struct Arrays {
  std::vector<float> a = std::vector<float>(5), b = std::vector<float>(9);
  std::vector<ParamGroup> groups() {
    return {{"a", a.data(), nullptr, 0, 5, true}, {"b", b.data() + 2, nullptr, 2, 7, false}};
  }
};

TEST(ParamEma, FollowsTheFp64RecurrenceAndWaitsBeforeWeightsChange) {
  Arrays w;
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& x : w.a) x = d(rng);
  for (float& x : w.b) x = d(rng);
  const double decay = 0.9;
  ParamEma ema(static_cast<float>(decay), w.groups());
  std::vector<double> ref_a(w.a.begin(), w.a.end()), ref_b(w.b.begin() + 2, w.b.begin() + 7);
  for (int step = 0; step < 50; ++step) {
    for (float& x : w.a) x += 0.1f * d(rng);  // the optimizer step
    for (float& x : w.b) x += 0.1f * d(rng);
    ema.update_async();
    for (size_t i = 0; i < ref_a.size(); ++i) ref_a[i] = decay * ref_a[i] + (1 - decay) * w.a[i];
    for (size_t i = 0; i < ref_b.size(); ++i)
      ref_b[i] = decay * ref_b[i] + (1 - decay) * w.b[i + 2];
    ema.wait();  // before the next step writes the weights
  }
  const std::vector<StateArray> s = ema.export_state();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].name, "a.ema");
  EXPECT_EQ(s[1].name, "b.ema");
  EXPECT_EQ(s[1].begin, 2);
  EXPECT_EQ(s[1].end, 7);
  // fp32 rounding of e + a (w - e): a few ulps a step, damped by decay: within 1e-5 of O(1)
  // values; the average lags the weights by far more (their steps are 0.1).
  double lag = 0;
  for (size_t k = 0; k < 2; ++k) {
    const auto& ref = k ? ref_b : ref_a;
    const float* w_now = k ? w.b.data() + 2 : w.a.data();
    for (size_t i = 0; i < ref.size(); ++i) {
      float e;
      std::memcpy(&e, s[k].bytes.data() + 4 * i, 4);
      EXPECT_NEAR(e, ref[i], 1e-5) << s[k].name << "[" << i << "]";
      lag = std::max(lag, std::abs(e - static_cast<double>(w_now[i])));
    }
  }
  EXPECT_GT(lag, 0.05);
}

TEST(ParamEma, StateRoundTripsAndRefusesOtherArrays) {
  Arrays w;
  for (size_t i = 0; i < w.a.size(); ++i) w.a[i] = static_cast<float>(i);
  ParamEma one(0.5f, w.groups());
  for (float& x : w.a) x += 1;
  one.update_async();
  const std::vector<StateArray> s = one.export_state();
  float e0;
  std::memcpy(&e0, s[0].bytes.data(), 4);
  EXPECT_EQ(e0, 0.5f);  // 0 + 0.5 * (1 - 0)

  ParamEma two(0.5f, w.groups());  // starts at the current weights
  ASSERT_TRUE(two.import_state(s).ok());
  EXPECT_EQ(two.export_state()[0].bytes, s[0].bytes);
  std::vector<StateArray> bad = s;
  bad[1].begin = 3;
  EXPECT_FALSE(two.import_state(bad).ok());
  bad = s;
  bad[0].name = "a.exp_avg";
  EXPECT_FALSE(two.import_state(bad).ok());
  EXPECT_FALSE(two.import_state({s[0]}).ok());
  EXPECT_EQ(two.export_state()[0].bytes, s[0].bytes) << "a refused import changes nothing";
  two.reset();
  std::memcpy(&e0, two.export_state()[0].bytes.data(), 4);
  EXPECT_EQ(e0, 1.0f);
}

}  // namespace
}  // namespace fp8pipe::optim
