// fp8pipe CUDA emulation: the device side of CUDA C++ as plain C++ (see cuda_runtime_api.h).
// Kernels are ordinary functions; threadIdx & co. read the state of the fiber that runs the
// current thread. __shared__ variables are thread_local statics: a block runs on one OS thread
// (its threads are fibers there) and each OS thread runs one block at a time, so every thread of a
// block sees the same storage.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static thread_local
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

namespace fp8pipe::cuda_emu {
const uint3& cur_thread_idx();
const uint3& cur_block_idx();
const uint3& cur_block_dim();
const uint3& cur_grid_dim();
void syncthreads();
// Exchange within the calling warp: every lane of `mask` must call it (checked); lane i receives
// the value lane src(i) stored. 8-byte slots.
uint64_t warp_exchange(unsigned mask, uint64_t v, int src_lane);
// Max of v over the lanes of `mask` (all must call it).
unsigned warp_reduce_max(unsigned mask, unsigned v);
int lane_id();
// The order blocks start and a block's threads run in (FP8PIPE_EMU_ORDER's values: forward,
// reverse, shuffle[:SEED]); false for an unknown one. Call it while no work is queued or running.
bool set_execution_order(const char* spec);
}  // namespace fp8pipe::cuda_emu

#define threadIdx (::fp8pipe::cuda_emu::cur_thread_idx())
#define blockIdx (::fp8pipe::cuda_emu::cur_block_idx())
#define blockDim (::fp8pipe::cuda_emu::cur_block_dim())
#define gridDim (::fp8pipe::cuda_emu::cur_grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads() { ::fp8pipe::cuda_emu::syncthreads(); }
// A barrier of the lanes of `mask` (all must reach it, as on sm_70+).
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  (void)::fp8pipe::cuda_emu::warp_exchange(mask, 0, 0);
}

template <class T>
inline uint64_t fp8pipe_emu_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T fp8pipe_emu_from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fp8pipe::cuda_emu::lane_id();
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: own value (CUDA rule)
  return fp8pipe_emu_from_bits<T>(
      ::fp8pipe::cuda_emu::warp_exchange(mask, fp8pipe_emu_bits(v), src));
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::fp8pipe::cuda_emu::lane_id();
  const int src = (lane / width) * width + (src_lane % width);
  return fp8pipe_emu_from_bits<T>(
      ::fp8pipe::cuda_emu::warp_exchange(mask, fp8pipe_emu_bits(v), src));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fp8pipe::cuda_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if (src / width != lane / width) src = lane;
  return fp8pipe_emu_from_bits<T>(
      ::fp8pipe::cuda_emu::warp_exchange(mask, fp8pipe_emu_bits(v), src));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return ::fp8pipe::cuda_emu::warp_reduce_max(mask, v);
}

// Bit casts and IEEE-rounded arithmetic (the emulation build uses -ffp-contract=off, so a plain
// a*b is the correctly rounded product, as __fmul_rn).
inline unsigned __float_as_uint(float f) {
  return fp8pipe_emu_from_bits<unsigned>(fp8pipe_emu_bits(f));
}
inline float __uint_as_float(unsigned u) {
  return fp8pipe_emu_from_bits<float>(fp8pipe_emu_bits(u));
}
inline int __float_as_int(float f) { return fp8pipe_emu_from_bits<int>(fp8pipe_emu_bits(f)); }
inline float __int_as_float(int u) { return fp8pipe_emu_from_bits<float>(fp8pipe_emu_bits(u)); }
inline long long __double_as_longlong(double d) {
  return fp8pipe_emu_from_bits<long long>(fp8pipe_emu_bits(d));
}
inline double __longlong_as_double(long long u) {
  return fp8pipe_emu_from_bits<double>(fp8pipe_emu_bits(u));
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// Atomics (blocks run on several OS threads): std::atomic_ref, returning the old value as CUDA's.
template <class T>
inline T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
inline T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v > old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);
  return cmp;
}

// Per-halfword unsigned max.
inline unsigned __vmaxu2(unsigned a, unsigned b) {
  const unsigned lo = std::max(a & 0xFFFFu, b & 0xFFFFu);
  const unsigned hi = std::max(a >> 16, b >> 16);
  return lo | (hi << 16);
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// The global min/max overloads of CUDA's device library.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
