// fp8pipe CUDA emulation (FP8PIPE_CUDA=EMULATE): cuBLAS v2 API. The real header maps cublasCreate
// etc. to their *_v2 symbols; here the API is declared under its plain names (cublas_api.h).
#pragma once

#include <cublas_api.h>
