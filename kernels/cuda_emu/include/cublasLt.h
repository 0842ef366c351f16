// fp8pipe CUDA emulation (FP8PIPE_CUDA=EMULATE): the subset of cuBLASLt that fp8pipe uses, run
// synchronously on the CPU (kernels/cuda_emu/blas.cc) with the behaviour of cuBLASLt 13.1 on sm_90
// as documented in shared/FP8.md. Enum values are the real ones (cuBLAS 13.1).
//
// What exists (anything else: no algorithm from the heuristic, NOT_SUPPORTED from cublasLtMatmul):
//  * FP8 (A, B in E4M3 / E5M2, not E5M2 x E5M2), TN only, CUBLAS_COMPUTE_32F, scale type 32F,
//    C = D type in {BF16, FP16, FP32}; scale modes SCALAR_32F x SCALAR_32F (FAST_ACCUM 0 or 1),
//    VEC128 x BLK128x128, BLK128x128 x VEC128, VEC128 x VEC128 (FAST_ACCUM 0; batch count 1).
//    FP8.md §3.3: k % 16 == 0, a VEC128 operand's rows % 4 == 0, ld*elsize % 16 == 0 for A, B, C,
//    D, 16-byte-aligned data pointers; cublasLtMatmul also wants 16-byte-aligned block-scale
//    pointers. Numerics: FP8.md §2.4's tensor-core model, bit-exact with cuBLASLt at splitK = 1.
//  * BF16 x BF16, any transposes, CUBLAS_COMPUTE_32F(_PEDANTIC), C = D type in {BF16, FP32}:
//    fp32 accumulation in k order, acc = acc + f32(a*b) (bf16 products are exact in fp32).
//  * Epilogue DEFAULT only, host pointer mode, column order, strided batches.
// The heuristic offers one algorithm (id 0, splitK 1, reduction NONE, no workspace) that assumes
// the MIN_ALIGNMENT_*_BYTES of the preference (default 256): cublasLtMatmul refuses
// (NOT_SUPPORTED) pointers less aligned than the algo was chosen for. SPLITK_NUM / REDUCTION_SCHEME
// set on an algo round-trip and are validated, but the emulator has no split-K numerics: any
// splitK computes exactly as splitK = 1.
#pragma once

#include <cublas_api.h>

#include <cstddef>
#include <cstdint>

struct cublasLtContext;
typedef cublasLtContext* cublasLtHandle_t;

// Descriptors: the emulator's own objects (defined in blas.cc).
struct EmuLtMatrixLayout;
struct EmuLtMatmulDesc;
struct EmuLtMatmulPreference;
typedef EmuLtMatrixLayout* cublasLtMatrixLayout_t;
typedef EmuLtMatmulDesc* cublasLtMatmulDesc_t;
typedef EmuLtMatmulPreference* cublasLtMatmulPreference_t;

// Semi-opaque algo, trivially copyable as the real one; blas.cc encodes its config in data.
typedef struct {
  uint64_t data[8];
} cublasLtMatmulAlgo_t;

typedef struct {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
} cublasLtMatmulHeuristicResult_t;

typedef enum {
  CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F = 0,
  CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3 = 1,
  CUBLASLT_MATMUL_MATRIX_SCALE_VEC32_UE8M0 = 2,
  CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F = 3,
  CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F = 4,
  CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F = 5,
  CUBLASLT_MATMUL_MATRIX_SCALE_END
} cublasLtMatmulMatrixScale_t;

typedef enum {
  CUBLASLT_POINTER_MODE_HOST = CUBLAS_POINTER_MODE_HOST,
  CUBLASLT_POINTER_MODE_DEVICE = CUBLAS_POINTER_MODE_DEVICE,
  CUBLASLT_POINTER_MODE_DEVICE_VECTOR = 2,
  CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO = 3,
  CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST = 4,
} cublasLtPointerMode_t;

typedef enum {
  CUBLASLT_ORDER_COL = 0,
  CUBLASLT_ORDER_ROW = 1,
  CUBLASLT_ORDER_COL32 = 2,
  CUBLASLT_ORDER_COL4_4R2_8C = 3,
  CUBLASLT_ORDER_COL32_2R_4R4 = 4,
} cublasLtOrder_t;

typedef enum {
  CUBLASLT_BATCH_MODE_STRIDED = 0,
  CUBLASLT_BATCH_MODE_POINTER_ARRAY = 1,
} cublasLtBatchMode_t;

typedef enum {
  CUBLASLT_MATRIX_LAYOUT_TYPE = 0,                  // uint32_t (cudaDataType)
  CUBLASLT_MATRIX_LAYOUT_ORDER = 1,                 // int32_t
  CUBLASLT_MATRIX_LAYOUT_ROWS = 2,                  // uint64_t
  CUBLASLT_MATRIX_LAYOUT_COLS = 3,                  // uint64_t
  CUBLASLT_MATRIX_LAYOUT_LD = 4,                    // int64_t
  CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,           // int32_t
  CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,  // int64_t (elements)
  CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET = 7,          // int64_t
  CUBLASLT_MATRIX_LAYOUT_BATCH_MODE = 8,            // uint32_t
} cublasLtMatrixLayoutAttribute_t;

typedef enum {
  CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,                 // int32_t
  CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,                   // int32_t
  CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,                 // int32_t
  CUBLASLT_MATMUL_DESC_TRANSA = 3,                       // int32_t
  CUBLASLT_MATMUL_DESC_TRANSB = 4,                       // int32_t
  CUBLASLT_MATMUL_DESC_TRANSC = 5,                       // int32_t
  CUBLASLT_MATMUL_DESC_FILL_MODE = 6,                    // int32_t
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,                     // uint32_t
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,                 // void*
  CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE = 10,           // int64_t
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,        // void*
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,             // int64_t
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,   // int64_t
  CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE = 14,   // int64_t
  CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET = 15,             // int32_t
  CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17,             // const void*
  CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18,             // const void*
  CUBLASLT_MATMUL_DESC_C_SCALE_POINTER = 19,             // const void*
  CUBLASLT_MATMUL_DESC_D_SCALE_POINTER = 20,             // const void*
  CUBLASLT_MATMUL_DESC_AMAX_D_POINTER = 21,              // void*
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE = 22,      // int32_t
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER = 23,  // void*
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER = 24,   // void*
  CUBLASLT_MATMUL_DESC_FAST_ACCUM = 25,                  // int8_t
  CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,              // int32_t
  CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31,                // int32_t (cublasLtMatmulMatrixScale_t)
  CUBLASLT_MATMUL_DESC_B_SCALE_MODE = 32,                // int32_t
  CUBLASLT_MATMUL_DESC_C_SCALE_MODE = 33,                // int32_t
  CUBLASLT_MATMUL_DESC_D_SCALE_MODE = 34,                // int32_t
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE = 35,     // int32_t
  CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER = 36,         // void*
  CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE = 37,            // int32_t
  CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR = 38,        // pointer
} cublasLtMatmulDescAttributes_t;

typedef enum {
  CUBLASLT_REDUCTION_SCHEME_NONE = 0,
  CUBLASLT_REDUCTION_SCHEME_INPLACE = 1,
  CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE = 2,
  CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE = 4,
  CUBLASLT_REDUCTION_SCHEME_MASK = 0x7,
} cublasLtReductionScheme_t;

typedef enum {
  CUBLASLT_EPILOGUE_DEFAULT = 1,  // the only one emulated
  CUBLASLT_EPILOGUE_RELU = 2,
  CUBLASLT_EPILOGUE_RELU_AUX = (CUBLASLT_EPILOGUE_RELU | 128),
  CUBLASLT_EPILOGUE_BIAS = 4,
  CUBLASLT_EPILOGUE_RELU_BIAS = (CUBLASLT_EPILOGUE_RELU | CUBLASLT_EPILOGUE_BIAS),
  CUBLASLT_EPILOGUE_RELU_AUX_BIAS = (CUBLASLT_EPILOGUE_RELU_AUX | CUBLASLT_EPILOGUE_BIAS),
  CUBLASLT_EPILOGUE_DRELU = 8 | 128,
  CUBLASLT_EPILOGUE_DRELU_BGRAD = CUBLASLT_EPILOGUE_DRELU | 16,
  CUBLASLT_EPILOGUE_GELU = 32,
  CUBLASLT_EPILOGUE_GELU_AUX = (CUBLASLT_EPILOGUE_GELU | 128),
  CUBLASLT_EPILOGUE_GELU_BIAS = (CUBLASLT_EPILOGUE_GELU | CUBLASLT_EPILOGUE_BIAS),
  CUBLASLT_EPILOGUE_GELU_AUX_BIAS = (CUBLASLT_EPILOGUE_GELU_AUX | CUBLASLT_EPILOGUE_BIAS),
  CUBLASLT_EPILOGUE_DGELU = 64 | 128,
  CUBLASLT_EPILOGUE_DGELU_BGRAD = CUBLASLT_EPILOGUE_DGELU | 16,
  CUBLASLT_EPILOGUE_BGRADA = 256,
  CUBLASLT_EPILOGUE_BGRADB = 512,
} cublasLtEpilogue_t;

typedef enum {
  CUBLASLT_SEARCH_BEST_FIT = 0,
  CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID = 1,
} cublasLtMatmulSearch_t;

typedef enum {
  CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,            // uint32_t
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,    // uint64_t, default 0
  CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,  // uint32_t
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,  // uint32_t, default 256
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,  // uint32_t, default 256
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,  // uint32_t, default 256
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,  // uint32_t, default 256
  CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT = 9,        // float, default 0 (no limit)
  CUBLASLT_MATMUL_PREF_IMPL_MASK = 12,             // uint64_t (ignored)
} cublasLtMatmulPreferenceAttributes_t;

typedef enum {
  CUBLASLT_ALGO_CONFIG_ID = 0,                // int32_t
  CUBLASLT_ALGO_CONFIG_TILE_ID = 1,           // uint32_t
  CUBLASLT_ALGO_CONFIG_SPLITK_NUM = 2,        // int32_t
  CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME = 3,  // uint32_t
  CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING = 4,     // uint32_t
  CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION = 5,     // uint32_t
  CUBLASLT_ALGO_CONFIG_STAGES_ID = 6,         // uint32_t
  CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID = 7,    // uint16_t
  CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID = 8,  // uint16_t
} cublasLtMatmulAlgoConfigAttributes_t;

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle);
const char* cublasLtGetStatusName(cublasStatus_t status);
const char* cublasLtGetStatusString(cublasStatus_t status);
size_t cublasLtGetVersion(void);  // CUBLAS_VERSION, 130100

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t layout,
                                                cublasLtMatrixLayoutAttribute_t attr, void* buf,
                                                size_t sizeInBytes, size_t* sizeWritten);

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t sizeInBytes);
cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, void* buf,
                                              size_t sizeInBytes, size_t* sizeWritten);

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatmulPreferenceGetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    void* buf, size_t sizeInBytes,
                                                    size_t* sizeWritten);

// No algorithm fits: CUBLAS_STATUS_NOT_SUPPORTED with *returnAlgoCount = 0.
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t operationDesc, cublasLtMatrixLayout_t Adesc,
    cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
    cublasLtMatmulPreference_t preference, int requestedAlgoCount,
    cublasLtMatmulHeuristicResult_t heuristicResultsArray[], int* returnAlgoCount);

// result->algo is never written (as documented for the real one).
cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t handle, cublasLtMatmulDesc_t operationDesc,
                                       cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                       cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                       const cublasLtMatmulAlgo_t* algo,
                                       cublasLtMatmulHeuristicResult_t* result);

cublasStatus_t cublasLtMatmulAlgoConfigSetAttribute(cublasLtMatmulAlgo_t* algo,
                                                    cublasLtMatmulAlgoConfigAttributes_t attr,
                                                    const void* buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute(const cublasLtMatmulAlgo_t* algo,
                                                    cublasLtMatmulAlgoConfigAttributes_t attr,
                                                    void* buf, size_t sizeInBytes,
                                                    size_t* sizeWritten);

// D = alpha op(A) op(B) + beta C (alpha, beta: host floats). algo == nullptr: the heuristic's
// choice for the actual pointers. Operands outside device allocations record an asynchronous
// cudaErrorIllegalAddress (fp8pipe::cuda_emu::raise_fault) and return SUCCESS without computing.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t computeDesc,
                              const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                              const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                              const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo,
                              void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream);
