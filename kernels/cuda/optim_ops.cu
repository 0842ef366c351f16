// Device kernels of the optimizer placement=device path (declared in kernels/cuda/ops.cuh): the
// fp64 gradient sums, their rounding to fp32 and the squared norm. The fused AdamW is in ops.cu.
#include <cuda_runtime.h>

#include "kernels/cuda/ops.cuh"

namespace fp8pipe::kernels::gpu {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kSumSqThreads, "the sum-of-squares items assume this block size");

int grid_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

__global__ void k_accumulate(float* g, int64_t n, double* acc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    acc[i] += static_cast<double>(g[i]);
    g[i] = 0.0f;
  }
}

__global__ void k_round(const double* acc, int64_t n, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = static_cast<float>(acc[i]);
  }
}

// Fixed-shape tree sum of one value per thread of a kThreads block (same order every run).
__device__ double block_sum(double v) {
  __shared__ double sh[kThreads];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  return sh[0];
}

// One block per row (grid-stride over rows past the grid's limit).
__global__ void k_row_dot(const float* a, const float* b, int64_t R, int64_t C, double* out) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      s += static_cast<double>(a[r * C + c]) * b[r * C + c];  // exact product, separate add
    }
    const double t = block_sum(s);
    if (threadIdx.x == 0) out[r] = t;
    __syncthreads();  // block_sum's shared array is reused by the next row
  }
}

__global__ void k_sumsq_items(const float* const* ptrs, const int64_t* lens, const int32_t* items,
                              double* work) {
  const int slot = items[2 * blockIdx.x], part = items[2 * blockIdx.x + 1];
  const float* g = ptrs[slot];
  const int64_t n = lens[slot];
  const int64_t stride = static_cast<int64_t>(kSumSqBlocks) * kThreads;
  double s = 0.0;
  for (int64_t i = static_cast<int64_t>(part) * kThreads + threadIdx.x; i < n; i += stride) {
    const double x = g[i];
    s += x * x;  // exact square of an fp32 value; -fmad=false keeps the add separate
  }
  const double b = block_sum(s);
  if (threadIdx.x == 0) work[static_cast<int64_t>(slot) * kSumSqBlocks + part] = b;
}

__global__ void k_sumsq_final(double* work, int64_t n) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += work[i];
  const double b = block_sum(s);
  if (threadIdx.x == 0) work[n] = b;
}

}  // namespace

Result accumulate_f64(float* g, int64_t n, double* acc, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_KERNEL(grid_for(n), kThreads, stream, k_accumulate)(g, n, acc);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result round_f64(const double* acc, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_KERNEL(grid_for(n), kThreads, stream, k_round)(acc, n, out);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result row_dot(const float* a, const float* b, int64_t R, int64_t C, double* out,
               cudaStream_t stream) {
  if (R == 0) return Result::Ok();
  const int blocks = static_cast<int>(R < 65535 * 8 ? R : 65535 * 8);
  FP8PIPE_KERNEL(blocks, kThreads, stream, k_row_dot)(a, b, R, C, out);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result sum_squares_items(const float* const* ptrs, const int64_t* lens, const int32_t* items,
                         int64_t n_items, double* work, cudaStream_t stream) {
  if (n_items == 0) return Result::Ok();
  FP8PIPE_KERNEL(static_cast<unsigned>(n_items), kThreads, stream, k_sumsq_items)
  (ptrs, lens, items, work);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result sum_squares_final(double* work, int64_t slots, cudaStream_t stream) {
  FP8PIPE_KERNEL(1, kThreads, stream, k_sumsq_final)(work, slots * kSumSqBlocks);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

}  // namespace fp8pipe::kernels::gpu
