// Auxiliary-loss-free balancing: overloaded experts' bias goes down by gamma, underloaded up,
// experts exactly at the mean stay; bad inputs fail without touching the bias.
#include "optim/bias_update.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace fp8pipe::optim {
namespace {

TEST(RouterBias, SignsFollowLoadMinusMean) {
  std::vector<float> b = {0.5f, 0.5f, -0.25f, 0.0f};
  const std::vector<int64_t> counts = {10, 30, 20, 20};  // mean 20
  const float gamma = 0.001f;
  ASSERT_TRUE(update_router_bias(b.data(), counts.data(), 4, gamma).ok());
  EXPECT_EQ(b[0], 0.5f + gamma);  // underloaded: up
  EXPECT_EQ(b[1], 0.5f - gamma);  // overloaded: down
  EXPECT_EQ(b[2], -0.25f);        // at the mean: unchanged
  EXPECT_EQ(b[3], 0.0f);
}

TEST(RouterBias, NonIntegerMeanAndZeroGamma) {
  std::vector<float> b = {0.0f, 0.0f, 0.0f};
  const std::vector<int64_t> counts = {1, 1, 2};  // mean 4/3
  ASSERT_TRUE(update_router_bias(b.data(), counts.data(), 3, 0.5f).ok());
  EXPECT_EQ(b, (std::vector<float>{0.5f, 0.5f, -0.5f}));
  ASSERT_TRUE(update_router_bias(b.data(), counts.data(), 3, 0.0f).ok());
  EXPECT_EQ(b, (std::vector<float>{0.5f, 0.5f, -0.5f}));
  const std::vector<int64_t> zeros = {0, 0, 0};  // no tokens at all: all at the mean
  ASSERT_TRUE(update_router_bias(b.data(), zeros.data(), 3, 0.5f).ok());
  EXPECT_EQ(b, (std::vector<float>{0.5f, 0.5f, -0.5f}));
}

TEST(RouterBias, RejectsBadInput) {
  std::vector<float> b = {1.0f, 2.0f};
  const std::vector<int64_t> neg = {3, -1};
  auto st = update_router_bias(b.data(), neg.data(), 2, 0.001f);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("counts[1]"), std::string::npos);
  EXPECT_EQ(b, (std::vector<float>{1.0f, 2.0f}));
  const std::vector<int64_t> c = {1, 2};
  EXPECT_FALSE(update_router_bias(b.data(), c.data(), 2, NAN).ok());
  EXPECT_FALSE(update_router_bias(b.data(), c.data(), 2, -0.1f).ok());
  EXPECT_FALSE(update_router_bias(b.data(), c.data(), 0, 0.001f).ok());
}

}  // namespace
}  // namespace fp8pipe::optim
