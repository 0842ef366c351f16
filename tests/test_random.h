// Seeded normal test data shared by the tests: the same mt19937 / normal_distribution<float>
// stream everywhere, so a seed means the same values in every test file.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/backend.h"

namespace fp8pipe::testutil {

// n values ~ N(0, sigma^2) from seed.
inline std::vector<float> randn(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// An fp32 tensor of `shape` on a host-memory backend (the CPU backend), filled as randn.
inline Tensor randn(Backend& be, const Shape& shape, uint32_t seed, float sigma = 1.0f) {
  Tensor t = be.empty(shape, DType::kF32).value();
  const std::vector<float> v = randn(t.numel(), seed, sigma);
  std::copy(v.begin(), v.end(), t.data_as<float>());
  return t;
}

}  // namespace fp8pipe::testutil
