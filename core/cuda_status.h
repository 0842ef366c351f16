// CUDA runtime errors as Status, shared by the CUDA backend and the NCCL communicator (CUDA
// builds only).
#pragma once

#include <cuda_runtime_api.h>

#include "core/status.h"

namespace fp8pipe {

inline Status cuda_error(cudaError_t e, const char* what) {
  return FP8_ERROR(Code::kInternal, "{}: {} ({})", what, cudaGetErrorName(e),
                   cudaGetErrorString(e));
}

}  // namespace fp8pipe

// Returns the error of a CUDA runtime call from the enclosing function, naming `what`.
#define FP8_CUDA(what, expr)                                       \
  do {                                                             \
    const cudaError_t e_ = (expr);                                 \
    if (e_ != cudaSuccess) return ::fp8pipe::cuda_error(e_, what); \
  } while (0)
