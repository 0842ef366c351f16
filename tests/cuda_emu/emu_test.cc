// Tests of the CPU emulation of CUDA itself (kernels/cuda_emu): that it runs kernels with CUDA's
// semantics (block barriers, warp shuffles, per-block shared memory) and that it reports the
// faults a GPU would (bad launch configurations, mismatched copies, out-of-bounds writes, a warp
// collective missing a lane). Built only with FP8PIPE_CUDA=EMULATE.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace {

// Reverses each 256-element block through shared memory: needs the barrier between the write and
// the read, and one shared array per block.
__global__ void k_reverse_blocks(const float* in, float* out, int n) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? in[i] : -1.0f;
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + t;
  if (j < n) out[j] = buf[blockDim.x - 1 - t];
}

// Butterfly sum and max over each warp.
__global__ void k_warp_sum_max(const float* in, float* sum, unsigned* mx) {
  float v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  const unsigned m = __reduce_max_sync(0xFFFFFFFFu, static_cast<unsigned>(in[threadIdx.x]));
  if (threadIdx.x % 32 == 0) {
    sum[threadIdx.x / 32] = v;
    mx[threadIdx.x / 32] = m;
  }
}

// Lane 0 skips the shuffle the other 31 lanes wait in: a hang on a GPU.
__global__ void k_missing_lane(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 != 0) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void k_write_at(float* p, int i) { p[i] = 1.0f; }
__global__ void k_count(unsigned long long* total, unsigned* hi) {
  atomicAdd(total, 1ull);
  atomicMax(hi, blockIdx.x * blockDim.x + threadIdx.x);
}
__global__ void k_copy(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }

// Each thread publishes its value in shared memory and reads its left neighbour's (within its
// warp). kSync 0: no barrier between (a race: right only if the neighbour happened to run
// first); 1: __syncthreads; 2: __syncwarp.
template <int kSync>
__global__ void k_left_neighbour(const float* in, float* out) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * blockDim.x + t];
  if (kSync == 1) __syncthreads();
  if (kSync == 2) __syncwarp();
  out[blockIdx.x * blockDim.x + t] = buf[t % 32 == 0 ? t : t - 1];
}

// Block b's thread 0 takes the next slot of `seq` and stores its linear block index there.
__global__ void k_block_sequence(unsigned* next, unsigned* seq) {
  if (threadIdx.x != 0) return;
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  seq[atomicAdd(next, 1u)] = b;
}

struct Dev {
  float* p = nullptr;
  explicit Dev(size_t n) { EXPECT_EQ(cudaMalloc(&p, n * sizeof(float)), cudaSuccess); }
  ~Dev() { cudaFree(p); }
};

TEST(CudaEmu, BarrierAndSharedMemoryPerBlock) {
  const int n = 1000;  // four blocks, the last one partial
  std::vector<float> h(n);
  std::iota(h.begin(), h.end(), 0.0f);
  Dev a(n), b(n);
  ASSERT_EQ(cudaMemcpy(a.p, h.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  FP8PIPE_KERNEL((n + 255) / 256, 256, nullptr, k_reverse_blocks)(a.p, b.p, n);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<float> out(n);
  ASSERT_EQ(cudaMemcpy(out.data(), b.p, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int j = 0; j < n; ++j) {
    const int base = j / 256 * 256, src = base + 255 - (j - base);
    ASSERT_EQ(out[j], src < n ? static_cast<float>(src) : -1.0f) << j;
  }
}

TEST(CudaEmu, WarpShuffleAndReduce) {
  const int n = 96;  // three warps
  std::vector<float> h(n);
  for (int i = 0; i < n; ++i) h[i] = static_cast<float>((i * 37) % 101);
  Dev a(n), s(3);
  unsigned* m = nullptr;
  ASSERT_EQ(cudaMalloc(&m, 3 * sizeof(unsigned)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(a.p, h.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  FP8PIPE_KERNEL(1, n, nullptr, k_warp_sum_max)(a.p, s.p, m);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  float sums[3];
  unsigned maxes[3];
  ASSERT_EQ(cudaMemcpy(sums, s.p, sizeof sums, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(maxes, m, sizeof maxes, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int w = 0; w < 3; ++w) {
    float es = 0;
    unsigned em = 0;
    for (int i = 32 * w; i < 32 * w + 32; ++i) {
      es += h[i];  // small integers: every order gives the same sum
      em = std::max(em, static_cast<unsigned>(h[i]));
    }
    EXPECT_EQ(sums[w], es) << w;
    EXPECT_EQ(maxes[w], em) << w;
  }
  cudaFree(m);
}

// Blocks run on several OS threads at once: atomics must be atomic across them.
TEST(CudaEmu, AtomicsAcrossBlocks) {
  unsigned long long* total = nullptr;
  unsigned* hi = nullptr;
  ASSERT_EQ(cudaMalloc(&total, sizeof *total), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&hi, sizeof *hi), cudaSuccess);
  ASSERT_EQ(cudaMemset(total, 0, sizeof *total), cudaSuccess);
  ASSERT_EQ(cudaMemset(hi, 0, sizeof *hi), cudaSuccess);
  const int blocks = 2000, threads = 128;
  FP8PIPE_KERNEL(blocks, threads, nullptr, k_count)(total, hi);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  unsigned long long t = 0;
  unsigned h = 0;
  ASSERT_EQ(cudaMemcpy(&t, total, sizeof t, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&h, hi, sizeof h, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(t, 1ull * blocks * threads);
  EXPECT_EQ(h, static_cast<unsigned>(blocks * threads - 1));
  cudaFree(total);
  cudaFree(hi);
}

// Work runs when the host needs it: a reader on another stream that does not wait for the
// writer's event sees unwritten memory (NaN); with the wait, the values.
TEST(CudaEmu, StreamsRunLazilyAndEventsOrderThem) {
  if (const char* e = std::getenv("FP8PIPE_EMU_LAZY"); e && std::string(e) == "0") {
    GTEST_SKIP() << "FP8PIPE_EMU_LAZY=0: work runs at enqueue time";
  }
  cudaStream_t a = nullptr, b = nullptr;
  cudaEvent_t done = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), cudaSuccess);
  std::vector<float> h(64, 3.0f), out(64);
  Dev src(64), mid(64), dst(64);
  ASSERT_EQ(cudaMemcpy(src.p, h.data(), 64 * 4, cudaMemcpyHostToDevice), cudaSuccess);

  FP8PIPE_KERNEL(1, 64, a, k_copy)(src.p, mid.p);  // writer on a
  FP8PIPE_KERNEL(1, 64, b, k_copy)(mid.p, dst.p);  // reader on b, no wait: a has not run
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dst.p, 64 * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(std::isnan(out[0]));

  Dev mid2(64), dst2(64);
  FP8PIPE_KERNEL(1, 64, a, k_copy)(src.p, mid2.p);
  ASSERT_EQ(cudaEventRecord(done, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, done, 0), cudaSuccess);
  FP8PIPE_KERNEL(1, 64, b, k_copy)(mid2.p, dst2.p);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dst2.p, 64 * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 3.0f);
  EXPECT_EQ(out[63], 3.0f);

  // An asynchronous copy from pinned host memory reads it when the copy runs.
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 64 * 4), cudaSuccess);
  for (int i = 0; i < 64; ++i) pinned[i] = 1.0f;
  ASSERT_EQ(cudaMemcpyAsync(mid.p, pinned, 64 * 4, cudaMemcpyHostToDevice, a), cudaSuccess);
  for (int i = 0; i < 64; ++i) pinned[i] = 2.0f;  // before the copy has run: a bug on a GPU
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), mid.p, 64 * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 2.0f);
  cudaFreeHost(pinned);
  cudaEventDestroy(done);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

TEST(CudaEmu, FreshMemoryReadsAsNaN) {
  Dev a(64), b(64);
  FP8PIPE_KERNEL(1, 64, nullptr, k_copy)(a.p, b.p);
  std::vector<float> out(64);
  ASSERT_EQ(cudaMemcpy(out.data(), b.p, 64 * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (float v : out) EXPECT_TRUE(std::isnan(v));
}

TEST(CudaEmu, ReportsBadLaunchesAndCopies) {
  Dev a(32), b(32);
  FP8PIPE_KERNEL(0, 32, nullptr, k_copy)(a.p, b.p);  // zero blocks
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  FP8PIPE_KERNEL(1, 2048, nullptr, k_copy)(a.p, b.p);  // over 1024 threads
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // launch errors are not sticky
  float h[32];
  EXPECT_EQ(cudaMemcpy(h, a.p, sizeof h, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(a.p, h, 33 * 4, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(a.p, h, sizeof h, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaFree(h), cudaErrorInvalidValue);
}

// Restores the order the environment asked for when a test that changes it ends.
struct OrderGuard {
  ~OrderGuard() {
    const char* env = std::getenv("FP8PIPE_EMU_ORDER");
    if (env == nullptr || !fp8pipe::cuda_emu::set_execution_order(env)) {
      fp8pipe::cuda_emu::set_execution_order("forward");
    }
  }
};

// FP8PIPE_EMU_ORDER: a missing barrier reads what the neighbour has not written yet in reverse
// and shuffled order (ascending order hides this one); with either barrier every order is right.
TEST(CudaEmu, ExecutionOrderExposesAMissingBarrier) {
  OrderGuard guard;
  const int blocks = 3, threads = 256, n = blocks * threads;
  Dev in(n), out(n);
  std::vector<float> h(n), got(n);
  int salt = 0;
  // Mismatches of one launch; every launch gets new values, so a stale shared-memory value from an
  // earlier launch is never right.
  auto mismatches = [&](auto kernel) {
    ++salt;
    for (int i = 0; i < n; ++i) h[i] = static_cast<float>(i + 1000 * salt);
    EXPECT_EQ(cudaMemcpy(in.p, h.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    FP8PIPE_KERNEL(blocks, threads, nullptr, kernel)(in.p, out.p);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(got.data(), out.p, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    int bad = 0;
    for (int i = 0; i < n; ++i) bad += got[i] != h[i % 32 == 0 ? i : i - 1];
    return bad;
  };
  for (const char* o : {"forward", "reverse", "shuffle", "shuffle:12345"}) {
    ASSERT_TRUE(fp8pipe::cuda_emu::set_execution_order(o));
    EXPECT_EQ(mismatches(k_left_neighbour<1>), 0) << o;
    EXPECT_EQ(mismatches(k_left_neighbour<2>), 0) << o;
    const int racy = mismatches(k_left_neighbour<0>);
    if (std::string(o) == "forward") {
      EXPECT_EQ(racy, 0);
    } else {
      EXPECT_GT(racy, 0) << o;
    }
  }
  // In reverse every thread but a warp's first runs before its left neighbour.
  ASSERT_TRUE(fp8pipe::cuda_emu::set_execution_order("reverse"));
  EXPECT_EQ(mismatches(k_left_neighbour<0>), n - n / 32);
  EXPECT_FALSE(fp8pipe::cuda_emu::set_execution_order("sideways"));
  EXPECT_FALSE(fp8pipe::cuda_emu::set_execution_order("shuffle:x"));
}

// Every order starts each block exactly once, in 1-D and 3-D grids.
TEST(CudaEmu, EveryOrderRunsEachBlockOnce) {
  OrderGuard guard;
  for (const char* o : {"forward", "reverse", "shuffle:3"}) {
    ASSERT_TRUE(fp8pipe::cuda_emu::set_execution_order(o));
    for (const dim3 grid : {dim3(1), dim3(7), dim3(1000), dim3(5, 3, 2), dim3(64, 1, 3)}) {
      const unsigned nb = grid.x * grid.y * grid.z;
      unsigned *next = nullptr, *seq = nullptr;
      ASSERT_EQ(cudaMalloc(&next, sizeof *next), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&seq, nb * sizeof *seq), cudaSuccess);
      ASSERT_EQ(cudaMemset(next, 0, sizeof *next), cudaSuccess);
      FP8PIPE_KERNEL(grid, 32, nullptr, k_block_sequence)(next, seq);
      ASSERT_EQ(cudaGetLastError(), cudaSuccess);
      std::vector<unsigned> got(nb);
      ASSERT_EQ(cudaMemcpy(got.data(), seq, nb * sizeof *seq, cudaMemcpyDeviceToHost), cudaSuccess);
      std::sort(got.begin(), got.end());
      for (unsigned b = 0; b < nb; ++b) ASSERT_EQ(got[b], b) << o << " grid of " << nb;
      cudaFree(next);
      cudaFree(seq);
    }
  }
}

TEST(CudaEmu, WarpCollectiveMissingALaneFails) {
  Dev a(32);
  FP8PIPE_KERNEL(1, 32, nullptr, k_missing_lane)(a.p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
}

TEST(CudaEmu, WritePastTheEndIsCaught) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 100 * sizeof(float)), cudaSuccess);  // 400 B in a 512 B slot
  FP8PIPE_KERNEL(1, 1, nullptr, k_write_at)(p, 100);            // into the slack: canary
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  EXPECT_EQ(cudaFree(p), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaErrorIllegalAddress);  // found again at the free
  ASSERT_EQ(cudaMalloc(&p, 128 * sizeof(float)), cudaSuccess);
  // Past the 256-byte-aligned end: the guard page stops it at the faulting access.
  EXPECT_DEATH(FP8PIPE_KERNEL(1, 1, nullptr, k_write_at)(p, 130),
               "kernel k_write_at, block \\(0,0,0\\), thread \\(0,0,0\\)");
  EXPECT_EQ(cudaFree(p), cudaSuccess);
}

// A buffer freed on one stream while another stream's queued kernel still reads it (no event
// between them): on a GPU the pool may hand the memory out again; here the freed pages stay
// inaccessible, so the late reader faults. (One block: the death test's child has no workers.)
TEST(CudaEmu, UseAfterFreeOnAnotherStreamIsCaught) {
  if (const char* e = std::getenv("FP8PIPE_EMU_LAZY"); e && std::string(e) == "0") {
    GTEST_SKIP() << "FP8PIPE_EMU_LAZY=0: work runs at enqueue time";
  }
  auto race = [] {
    cudaStream_t a = nullptr, b = nullptr;
    cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
    cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);
    float *x = nullptr, *y = nullptr;
    cudaMalloc(&x, 64 * sizeof(float));
    cudaMalloc(&y, 64 * sizeof(float));
    FP8PIPE_KERNEL(1, 64, a, k_copy)(x, y);  // the reader, queued on a
    cudaFreeAsync(x, b);                     // freed on b, which did not wait for a
    cudaStreamSynchronize(b);
    float* z = nullptr;  // a new allocation must not reuse x's pages
    cudaMalloc(&z, 64 * sizeof(float));
    cudaStreamSynchronize(a);
  };
  EXPECT_DEATH(race(),
               "kernel k_copy, block \\(0,0,0\\), thread \\(0,0,0\\): an access outside "
               "every live device buffer");
  // With the event, the free waits for the reader.
  cudaStream_t a = nullptr, b = nullptr;
  cudaEvent_t read = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&read, cudaEventDisableTiming), cudaSuccess);
  float *x = nullptr, *y = nullptr;
  ASSERT_EQ(cudaMalloc(&x, 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&y, 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemset(x, 0, 64 * sizeof(float)), cudaSuccess);
  FP8PIPE_KERNEL(1, 64, a, k_copy)(x, y);
  ASSERT_EQ(cudaEventRecord(read, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, read, 0), cudaSuccess);
  ASSERT_EQ(cudaFreeAsync(x, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  float out = 1.0f;
  ASSERT_EQ(cudaMemcpy(&out, y, sizeof out, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out, 0.0f);
  cudaFree(y);
  cudaEventDestroy(read);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

}  // namespace
