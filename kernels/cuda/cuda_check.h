// Error plumbing for the CUDA kernels layer: kernels/ is a leaf and does not know core::Status, so
// every CUDA / cuBLASLt entry point returns a small `gpu::Result` (ok flag + message with
// file:line), filled in by the FP8PIPE_CUDA_TRY / FP8PIPE_CUBLAS_TRY / FP8PIPE_REQUIRE macros.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>
#include <utility>

namespace fp8pipe::kernels::gpu {

// Outcome of a host-side CUDA call sequence. Default-constructed = success.
struct [[nodiscard]] Result {
  bool ok = true;
  std::string msg;           // "file:line: what failed: why" when !ok
  bool unsupported = false;  // refused before anything was enqueued: another path may be taken

  explicit operator bool() const { return ok; }
  static Result Ok() { return {}; }
  static Result Error(std::string m) { return Result{false, std::move(m)}; }
  static Result Unsupported(std::string m) { return Result{false, std::move(m), true}; }
};

inline std::string where(const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line) + ": ";
}

// cuBLAS's own name of a status ("CUBLAS_STATUS_NOT_SUPPORTED").
inline const char* cublas_status_name(cublasStatus_t s) { return cublasGetStatusName(s); }

}  // namespace fp8pipe::kernels::gpu

// Evaluate a cudaError_t expression; on failure return gpu::Result with file:line and the error.
#define FP8PIPE_CUDA_TRY(expr)                                                         \
  do {                                                                                 \
    const cudaError_t fp8pipe_e_ = (expr);                                             \
    if (fp8pipe_e_ != cudaSuccess)                                                     \
      return ::fp8pipe::kernels::gpu::Result::Error(                                   \
          ::fp8pipe::kernels::gpu::where(__FILE__, __LINE__) + #expr + ": " +          \
          cudaGetErrorName(fp8pipe_e_) + " (" + cudaGetErrorString(fp8pipe_e_) + ")"); \
  } while (0)

// Same for cublasStatus_t (cuBLAS / cuBLASLt).
#define FP8PIPE_CUBLAS_TRY(expr)                                              \
  do {                                                                        \
    const cublasStatus_t fp8pipe_s_ = (expr);                                 \
    if (fp8pipe_s_ != CUBLAS_STATUS_SUCCESS)                                  \
      return ::fp8pipe::kernels::gpu::Result::Error(                          \
          ::fp8pipe::kernels::gpu::where(__FILE__, __LINE__) + #expr + ": " + \
          ::fp8pipe::kernels::gpu::cublas_status_name(fp8pipe_s_));           \
  } while (0)

// A kernel launch: FP8PIPE_KERNEL(grid, block, stream, kernel)(args...) is
// kernel<<<grid, block, 0, stream>>>(args...); under the CPU emulation of CUDA (kernels/cuda_emu,
// FP8PIPE_CUDA=EMULATE) it runs the kernel there instead.
#ifdef FP8PIPE_CUDA_EMU
#define FP8PIPE_KERNEL(grid, block, stream, ...) \
  ::fp8pipe::cuda_emu::launch((grid), (block), (stream), #__VA_ARGS__, __VA_ARGS__)
#else
#define FP8PIPE_KERNEL(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

// Check a launch: picks up configuration errors of the last <<<>>> (not asynchronous faults).
#define FP8PIPE_CUDA_LAUNCH_CHECK() FP8PIPE_CUDA_TRY(cudaGetLastError())

// Precondition: return an error naming the violated rule (a string literal or std::string).
#define FP8PIPE_REQUIRE(cond, rule)                                                \
  do {                                                                             \
    if (!(cond))                                                                   \
      return ::fp8pipe::kernels::gpu::Result::Error(                               \
          ::fp8pipe::kernels::gpu::where(__FILE__, __LINE__) + std::string(rule)); \
  } while (0)

// Propagate a gpu::Result.
#define FP8PIPE_GPU_TRY(expr)                            \
  do {                                                   \
    ::fp8pipe::kernels::gpu::Result fp8pipe_r_ = (expr); \
    if (!fp8pipe_r_.ok) return fp8pipe_r_;               \
  } while (0)
