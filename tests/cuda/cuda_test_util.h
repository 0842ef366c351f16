// Shared helpers of the CUDA tests (GPU machine only): RAII device buffers, gpu::Result assertions,
// deterministic random data with a wide dynamic range, and NaN-aware bitwise comparisons.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cuda/cuda_check.h"

namespace fp8pipe::kernels::gpu::testing {

#define ASSERT_GPU_OK(expr)                            \
  do {                                                 \
    const ::fp8pipe::kernels::gpu::Result r_ = (expr); \
    ASSERT_TRUE(r_.ok) << r_.msg;                      \
  } while (0)
#define ASSERT_CUDA_OK(expr)                                               \
  do {                                                                     \
    const cudaError_t e_ = (expr);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

// Device buffer of n elements of T (plus `pad` spare bytes), freed on scope exit.
template <class T>
class DevBuf {
 public:
  explicit DevBuf(size_t n, size_t pad = 0) : n_(n) {
    if (cudaMalloc(&p_, n * sizeof(T) + pad + 16) != cudaSuccess) p_ = nullptr;
  }
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  T* get() const { return static_cast<T*>(p_); }
  size_t size() const { return n_; }
  cudaError_t upload(const T* h, size_t n) {
    return cudaMemcpy(p_, h, n * sizeof(T), cudaMemcpyHostToDevice);
  }
  cudaError_t upload(const std::vector<T>& h) { return upload(h.data(), h.size()); }
  cudaError_t download(T* h, size_t n) const {
    return cudaMemcpy(h, p_, n * sizeof(T), cudaMemcpyDeviceToHost);
  }
  std::vector<T> to_host() const {
    std::vector<T> h(n_);
    download(h.data(), n_);
    return h;
  }
  cudaError_t fill_bytes(int v) { return cudaMemset(p_, v, n_ * sizeof(T)); }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline bool same_bits_nan_eq(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || bits(a) == bits(b);
}

// Row-wise random data: each 32-element run gets its own magnitude 2^U(-lo, hi), N(0,1) values,
// plus sprinkled exact zeros and a few float-subnormal values; deterministic for a seed.
inline std::vector<float> random_wide(size_t n, uint32_t seed, int lo = 24, int hi = 24) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ed(-lo, hi);
  std::uniform_int_distribution<int> pick(0, 999);
  std::vector<float> v(n);
  float mag = 1.0f;
  for (size_t i = 0; i < n; ++i) {
    if (i % 32 == 0) mag = std::ldexp(1.0f, ed(rng));
    const int p = pick(rng);
    if (p == 0) {
      v[i] = 0.0f;
    } else if (p == 1) {
      v[i] = std::ldexp(nd(rng), -130);  // float subnormal
    } else if (p == 2) {
      v[i] = -0.0f;
    } else {
      v[i] = nd(rng) * mag;
    }
  }
  return v;
}

inline std::vector<float> random_normal(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  return b;
}

}  // namespace fp8pipe::kernels::gpu::testing
