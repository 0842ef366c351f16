// cuBLASLt GEMMs for Hopper in the NT convention of kernels/cpu/fp8_gemm.h
// (out[M][N] = sum_k A[m][k] B[n][k]): FP8 with DeepSeek-style VEC128 / BLK128x128 scales
// (FP8.md §3.6), BF16 for the FP8-vs-BF16 comparison, and a "raw" path for framework-vs-raw timing.
//
// Operand mapping (FP8.md §2.5, §3.2): cuBLASLt runs TN column-major, so our B [N][K] is cuBLASLt's
// A (m = N rows, TRANSA = T), our A [M][K] is cuBLASLt's B (n = M, TRANSB = N), and the column-
// major D (N x M, ldd = N) is our row-major out[M][N]. With this mapping and splitK = 1 the result
// is bit-identical to kernels::fp8_gemm(.., GemmMode::kExact, ..) (incl. the VEC x VEC promotion
// order fma(P*sA_ours, sB_ours, acc)).
//
// LtGemm owns the cuBLASLt handle, one 32 MiB workspace and a small plan cache (descriptors + the
// heuristic's algo per shape / scale modes / formats / output type / splitK=1 flag / pointer
// alignment: the heuristic is told the real alignment of A, B and D, up to 256 B, since by default
// it assumes 256-byte-aligned buffers and a row slice of a tensor is only 16-aligned). It is not
// thread-safe and its workspace is shared by all calls: use one LtGemm per stream.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cuda/cuda_check.h"

namespace fp8pipe::kernels::gpu {

// FP8.md §3.3 / §3.1 preconditions of the FP8 path, checked before any cuBLASLt call. Returns the
// first violated rule by name (e.g. "FP8.md §3.3: K=136 must be a multiple of 16"). Operand
// pointers are device pointers (only their alignment is looked at).
Result check_fp8_gemm_args(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N,
                           int64_t K, const float* out_f32, const uint16_t* out_bf16);

// What the cache chose for a plan (for tests and the benchmark).
struct LtPlanInfo {
  int algo_id = -1;
  int splitk = 0;        // CUBLASLT_ALGO_CONFIG_SPLITK_NUM of the algo in use
  size_t workspace = 0;  // bytes the algo needs
  bool forced_splitk1 = false;
};

class LtGemm {
 public:
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;

  LtGemm() = default;
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Creates the handle and the workspace on the current device.
  Result init();

  // FP8 GEMM. a: 1x128 / 128x128 / per-tensor; b likewise (not 128x128 x 128x128; per-tensor only
  // with per-tensor). Exactly one of out_f32 / out_bf16 (row-major [M][N]). splitk1 forces
  // CUBLASLT_ALGO_CONFIG_SPLITK_NUM = 1 (bit-exact with the CPU kExact model, FP8.md §3.5).
  Result fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                  float* out_f32, uint16_t* out_bf16, cudaStream_t stream, bool splitk1 = false);

  // BF16 x BF16 GEMM of the same NT shape (fp32 accumulation), BF16 or FP32 output.
  Result bf16_gemm(const uint16_t* a, const uint16_t* b, int64_t M, int64_t N, int64_t K,
                   float* out_f32, uint16_t* out_bf16, cudaStream_t stream, bool splitk1 = false);

  const LtPlanInfo& last_plan() const { return last_; }
  size_t cached_plans() const { return plans_.size(); }
  cublasLtHandle_t handle() const { return lt_; }
  void* workspace() const { return ws_; }

 private:
  // mode_a/mode_b are cuBLASLt scale modes of cuBLASLt's A (= our B) and B (= our A); -1: none.
  // The last field is the smallest alignment (bytes, <= 256) of the A, B and D pointers.
  using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int, int, int, bool, uint32_t>;
  struct Plan {  // cached descriptors + algo of one key
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool scaled = false;
    LtPlanInfo info;
    Plan() = default;
    ~Plan();
    Plan(const Plan&) = delete;
    Plan& operator=(const Plan&) = delete;
  };
  Result get_plan(const Key& key, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t td,
                  const void* sa, const void* sb, Plan** out);
  Result run(Plan* p, const void* a_lt, const void* b_lt, void* d, const void* sa, const void* sb,
             cudaStream_t stream);

  cublasLtHandle_t lt_ = nullptr;
  void* ws_ = nullptr;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  std::map<Key, std::string> refused_;  // keys the heuristic had no algorithm for (its message)
  LtPlanInfo last_;
};

// "Raw" cuBLASLt: the FP8.md §3.6 call sequence with descriptors and the heuristic's top-1 algo
// built once in init(); run() is exactly one cublasLtMatmul (no checks, no cache lookup, no
// attribute updates). Same operand conventions as LtGemm::fp8_gemm. Pointers are bound at init.
class RawLtFp8Gemm {
 public:
  RawLtFp8Gemm() = default;
  ~RawLtFp8Gemm();
  RawLtFp8Gemm(const RawLtFp8Gemm&) = delete;
  RawLtFp8Gemm& operator=(const RawLtFp8Gemm&) = delete;

  Result init(cublasLtHandle_t lt, void* workspace, size_t workspace_bytes, const Fp8Operand& a,
              const Fp8Operand& b, int64_t M, int64_t N, int64_t K, float* out_f32,
              uint16_t* out_bf16);
  Result run(cudaStream_t stream);

 private:
  cublasLtHandle_t lt_ = nullptr;
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, ld_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  const void* a_lt_ = nullptr;
  const void* b_lt_ = nullptr;
  void* d_ = nullptr;
};

}  // namespace fp8pipe::kernels::gpu
