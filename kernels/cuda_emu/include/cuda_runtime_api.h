// fp8pipe CUDA emulation (FP8PIPE_CUDA=EMULATE): the subset of the CUDA runtime API that fp8pipe
// uses, run on the CPU so the CUDA backend's host code and kernels can be executed without a GPU.
// "Device" memory is host memory; each stream queues its work until the host needs it (runtime.cc),
// so a missing stream/event dependency reads memory that is not written yet.
// What it checks that real CUDA would: launch configurations (zero or oversized grids/blocks),
// frees of unknown pointers, writes past the end of an allocation (a guard zone checked at every
// free and synchronize), and reads of never-written memory look like NaN (fresh allocations are
// filled with 0xFF bytes). See kernels/cuda_emu/README.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>

#include "vector_types.h"

#define FP8PIPE_CUDA_EMU 1

struct EmuStream;
struct EmuEvent;
struct EmuMemPool;
typedef EmuStream* cudaStream_t;
typedef EmuEvent* cudaEvent_t;
typedef EmuMemPool* cudaMemPool_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidPitchValue = 12,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
};
typedef cudaError_t cudaError;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};

struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

enum cudaMemPoolAttr {
  cudaMemPoolAttrReleaseThreshold = 4,
};

struct cudaDeviceProp {
  char name[256];
  int major;
  int minor;
  int multiProcessorCount;
  int l2CacheSize;
  size_t totalGlobalMem;
  int maxThreadsPerBlock;
  size_t sharedMemPerBlock;
  int warpSize;
};

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02

const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int d);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFree(void* p);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
template <class T>
inline cudaError_t cudaMallocAsync(T** p, size_t bytes, cudaStream_t s) {
  return cudaMallocAsync(reinterpret_cast<void**>(p), bytes, s);
}
template <class T>
inline cudaError_t cudaMallocHost(T** p, size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s = nullptr);
// Device-to-device only (the one kind the backend uses): `height` rows of `width` bytes.
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);

cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

namespace fp8pipe::cuda_emu {
// Runs `body` once per thread of the grid (blocks spread over a few OS threads; the threads of a
// block as fibers that switch at __syncthreads and warp collectives). A bad configuration is
// reported through cudaGetLastError, as a real launch does.
void run_kernel(dim3 grid, dim3 block, cudaStream_t stream, const char* name,
                std::function<void()> body);

// Stream work (runtime.cc): `work` runs in order with the stream's other work, when the host
// needs it (see there); returns its place, 0 when it already ran.
uint64_t submit(cudaStream_t s, std::function<void()> work);
// Work that may take several calls: `work` returns false while it waits for something outside
// the device (an emulated NCCL operation waiting for its peers); the stream's later work waits
// behind it, and a flush that must finish waits, without holding the queue lock, until it does.
uint64_t submit_gated(cudaStream_t s, std::function<bool()> work);
// Runs s's work up to place seq as far as it completes now; true if it got there.
bool reached(cudaStream_t s, uint64_t seq);
// The number of emulated devices: FP8PIPE_EMU_DEVICES (default 1). They share the host's memory;
// each process's ranks take one each, as NCCL requires (one GPU per rank of a communicator).
int device_count();
// Runs the stream's pending work (all of it, or up to place `seq`); nullptr: every stream's.
void flush_stream(cudaStream_t s);
void flush_until(cudaStream_t s, uint64_t seq);
void flush_all();

// What FP8PIPE_KERNEL(grid, block, stream, kernel)(args...) becomes under the emulation: the
// arguments are converted to the kernel's parameter types once, as a launch copies them.
template <class... P>
struct Launcher {
  dim3 grid, block;
  cudaStream_t stream;
  const char* name;
  void (*fn)(P...);
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P),
                  "pass every kernel argument: a default argument is lost through the pointer");
    // The launch owns its argument copies: the kernel may run after the caller returns.
    std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    run_kernel(grid, block, stream, name, [f = fn, args] { std::apply(f, args); });
  }
};
template <class... P>
Launcher<P...> launch(dim3 grid, dim3 block, cudaStream_t stream, const char* name,
                      void (*fn)(P...)) {
  return {grid, block, stream, name, fn};
}

// True when [p, p+bytes) lies inside one live device allocation (cudaMalloc/cudaMallocAsync).
bool is_device_range(const void* p, size_t bytes);
// Records an error the way an asynchronous device fault would: returned by the next
// cudaGetLastError / synchronize / copy, and printed once to stderr with `what`.
void raise_fault(cudaError_t e, const char* what);
}  // namespace fp8pipe::cuda_emu
