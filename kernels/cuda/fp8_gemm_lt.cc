// cuBLASLt FP8 (block-scaled) and BF16 GEMMs with a plan cache (fp8_gemm_lt.h): FP8.md §3 recipe,
// §3.3 constraints checked up front with the rule named in the error, optional forced splitK = 1
// for bit-exactness with the CPU kExact model (§3.5).
#include "kernels/cuda/fp8_gemm_lt.h"

#include <initializer_list>
#include <string>

namespace fp8pipe::kernels::gpu {
namespace {

constexpr int kNoScale = -1;

std::string str(int64_t v) { return std::to_string(v); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Largest power of two <= 256 dividing every pointer: the MIN_ALIGNMENT_*_BYTES preference. Left at
// its default (256), the heuristic may pick a kernel that cublasLtMatmul then refuses (or faults
// in) for a 16-byte-aligned slice.
uint32_t alignment(std::initializer_list<const void*> ptrs) {
  uint32_t a = 256;
  for (const void* p : ptrs) {
    while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a /= 2;
  }
  return a;
}

const char* gran_name(Granularity g) {
  switch (g) {
    case Granularity::k1x128:
      return "1x128 (VEC128)";
    case Granularity::k128x1:
      return "128x1";
    case Granularity::k128x128:
      return "128x128 (BLK128x128)";
    case Granularity::kPerTensor:
      return "per-tensor";
  }
  return "?";
}

int scale_mode(Granularity g) {
  switch (g) {
    case Granularity::k1x128:
      return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    case Granularity::k128x128:
      return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    default:
      return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  }
}

cudaDataType_t fp8_type(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2;
}

template <class T>
Result set_desc(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr, const T& v) {
  FP8PIPE_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(op, attr, &v, sizeof(v)));
  return Result::Ok();
}

// TN descriptor (FP8.md §3.6): compute fp32, scale type fp32; for FP8 the scale modes and
// FAST_ACCUM = 0 (the only mode with block scales, §3.4).
Result make_desc(int mode_a, int mode_b, cublasLtMatmulDesc_t* op) {
  FP8PIPE_CUBLAS_TRY(cublasLtMatmulDescCreate(op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
  FP8PIPE_GPU_TRY(set_desc(*op, CUBLASLT_MATMUL_DESC_TRANSA, t));
  FP8PIPE_GPU_TRY(set_desc(*op, CUBLASLT_MATMUL_DESC_TRANSB, n));
  if (mode_a != kNoScale) {
    const int32_t ma = mode_a, mb = mode_b;
    const int8_t fast = 0;
    FP8PIPE_GPU_TRY(set_desc(*op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, ma));
    FP8PIPE_GPU_TRY(set_desc(*op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mb));
    FP8PIPE_GPU_TRY(set_desc(*op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast));
  }
  return Result::Ok();
}

// Layouts for our NT problem: cuBLASLt A = our B (K x N col-major, ld K), B = our A (K x M), D =
// N x M col-major with ld N (= row-major out[M][N]).
Result make_layouts(int64_t M, int64_t N, int64_t K, cudaDataType_t ta, cudaDataType_t tb,
                    cudaDataType_t td, cublasLtMatrixLayout_t* la, cublasLtMatrixLayout_t* lb,
                    cublasLtMatrixLayout_t* ld) {
  FP8PIPE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(la, ta, K, N, K));
  FP8PIPE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(lb, tb, K, M, K));
  FP8PIPE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(ld, td, N, M, N));
  return Result::Ok();
}

Result algo_info(const cublasLtMatmulAlgo_t& algo, LtPlanInfo* info) {
  size_t written = 0;
  int32_t id = -1, splitk = 0;
  FP8PIPE_CUBLAS_TRY(cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &id,
                                                          sizeof(id), &written));
  FP8PIPE_CUBLAS_TRY(cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                                                          &splitk, sizeof(splitk), &written));
  info->algo_id = id;
  info->splitk = splitk;
  return Result::Ok();
}

// Heuristic top results; with splitk1 the first that passes cublasLtMatmulAlgoCheck after forcing
// SPLITK_NUM = 1 and REDUCTION_SCHEME = NONE (FP8.md §3.5).
Result pick_algo(cublasLtHandle_t lt, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                 cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t ld, size_t ws_bytes,
                 uint32_t align, bool splitk1, const std::string& what, cublasLtMatmulAlgo_t* algo,
                 LtPlanInfo* info) {
  cublasLtMatmulPreference_t pref = nullptr;
  FP8PIPE_CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = ws_bytes;
  cublasStatus_t ps = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  for (const auto attr :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (ps == CUBLAS_STATUS_SUCCESS)
      ps = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align));
  }
  constexpr int kWant = 16;
  cublasLtMatmulHeuristicResult_t res[kWant] = {};
  int n = 0;
  const cublasStatus_t hs = ps != CUBLAS_STATUS_SUCCESS
                                ? ps
                                : cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref,
                                                                 splitk1 ? kWant : 1, res, &n);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS || n == 0) {
    return Result::Unsupported(what + ": cublasLtMatmulAlgoGetHeuristic found no algorithm (" +
                               cublas_status_name(hs) + ", " + str(n) +
                               " results): unsupported shape, alignment or scale-mode combination");
  }
  if (!splitk1) {
    *algo = res[0].algo;
    info->workspace = res[0].workspaceSize;
    info->forced_splitk1 = false;
    return algo_info(*algo, info);
  }
  for (int i = 0; i < n; ++i) {
    cublasLtMatmulAlgo_t a = res[i].algo;
    const int32_t one = 1;
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one,
                                             sizeof(one)) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none,
                                             sizeof(none)) != CUBLAS_STATUS_SUCCESS) {
      continue;
    }
    cublasLtMatmulHeuristicResult_t chk = {};
    if (cublasLtMatmulAlgoCheck(lt, op, la, lb, ld, ld, &a, &chk) != CUBLAS_STATUS_SUCCESS ||
        chk.workspaceSize > ws_bytes) {
      continue;
    }
    *algo = a;
    info->workspace = chk.workspaceSize;
    info->forced_splitk1 = true;
    return algo_info(*algo, info);
  }
  return Result::Unsupported(
      what + ": none of the " + str(n) +
      " heuristic algorithms passes cublasLtMatmulAlgoCheck with splitK forced to 1");
}

std::string shape_str(int64_t M, int64_t N, int64_t K) {
  return "M=" + str(M) + " N=" + str(N) + " K=" + str(K);
}

}  // namespace

Result check_fp8_gemm_args(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N,
                           int64_t K, const float* out_f32, const uint16_t* out_bf16) {
  // Built only for a failure message: this runs on every GEMM call.
  const auto sh = [&] { return " (" + shape_str(M, N, K) + ")"; };
  FP8PIPE_REQUIRE((out_f32 == nullptr) != (out_bf16 == nullptr),
                  "fp8_gemm: exactly one of out_f32 / out_bf16 must be given");
  FP8PIPE_REQUIRE(M >= 0 && N >= 0 && K >= 0, "fp8_gemm: negative dimension" + sh());
  for (const Fp8Operand* x : {&a, &b}) {
    const char* name = x == &a ? "A" : "B";
    FP8PIPE_REQUIRE(x->gran == Granularity::k1x128 || x->gran == Granularity::k128x128 ||
                        x->gran == Granularity::kPerTensor,
                    std::string("fp8_gemm: operand ") + name + " granularity " +
                        gran_name(x->gran) +
                        " is not a GEMM operand layout (1x128, 128x128 or per-tensor)");
  }
  FP8PIPE_REQUIRE(!(a.gran == Granularity::k128x128 && b.gran == Granularity::k128x128),
                  "FP8.md §3.1: BLK128x128 x BLK128x128 has no cuBLASLt algorithm; one operand "
                  "must be 1x128");
  FP8PIPE_REQUIRE((a.gran == Granularity::kPerTensor) == (b.gran == Granularity::kPerTensor),
                  "FP8.md §3.1: per-tensor scaling cannot be mixed with block scaling");
  FP8PIPE_REQUIRE(!(a.fmt == Fp8Format::kE5M2 && b.fmt == Fp8Format::kE5M2),
                  "FP8.md §3.1: E5M2 x E5M2 is not supported by cuBLASLt");
  if (M == 0 || N == 0 || K == 0) return Result::Ok();
  FP8PIPE_REQUIRE(K % 16 == 0,
                  "FP8.md §3.3: K=" + str(K) + " (cuBLASLt k) must be a multiple of 16" + sh());
  FP8PIPE_REQUIRE(a.gran != Granularity::k1x128 || M % 4 == 0,
                  "FP8.md §3.3: a VEC128 (1x128) operand's row count must be a multiple of 4: "
                  "A has M=" +
                      str(M) + " rows" + sh());
  FP8PIPE_REQUIRE(b.gran != Granularity::k1x128 || N % 4 == 0,
                  "FP8.md §3.3: a VEC128 (1x128) operand's row count must be a multiple of 4: "
                  "B has N=" +
                      str(N) + " rows" + sh());
  const int64_t out_bytes = out_f32 ? 4 : 2;
  FP8PIPE_REQUIRE(N * out_bytes % 16 == 0, "FP8.md §3.3: output leading dimension ldd=N=" + str(N) +
                                               " times " + str(out_bytes) +
                                               " bytes must be a multiple of 16 bytes" + sh());
  FP8PIPE_REQUIRE(a.q && b.q && a.s && b.s, "fp8_gemm: null operand or scale pointer");
  FP8PIPE_REQUIRE(aligned16(a.s) && aligned16(b.s),
                  "FP8.md §3.3: scale pointers must be 16-byte aligned");
  FP8PIPE_REQUIRE(aligned16(a.q) && aligned16(b.q) &&
                      aligned16(out_f32 ? static_cast<const void*>(out_f32) : out_bf16),
                  "FP8.md §3.3: A, B and D data pointers must be 16-byte aligned");
  return Result::Ok();
}

LtGemm::Plan::~Plan() {
  if (d) cublasLtMatrixLayoutDestroy(d);
  if (b) cublasLtMatrixLayoutDestroy(b);
  if (a) cublasLtMatrixLayoutDestroy(a);
  if (op) cublasLtMatmulDescDestroy(op);
}

LtGemm::~LtGemm() {
  plans_.clear();
  if (ws_) cudaFree(ws_);
  if (lt_) cublasLtDestroy(lt_);
}

Result LtGemm::init() {
  if (!lt_) FP8PIPE_CUBLAS_TRY(cublasLtCreate(&lt_));
  if (!ws_) FP8PIPE_CUDA_TRY(cudaMalloc(&ws_, kWorkspaceBytes));
  return Result::Ok();
}

Result LtGemm::get_plan(const Key& key, cudaDataType_t ta, cudaDataType_t tb, cudaDataType_t td,
                        const void* sa, const void* sb, Plan** out) {
  auto it = plans_.find(key);
  if (it != plans_.end()) {
    *out = it->second.get();
    return Result::Ok();
  }
  if (auto r = refused_.find(key); r != refused_.end()) return Result::Unsupported(r->second);
  FP8PIPE_REQUIRE(lt_ != nullptr, "LtGemm: init() was not called");
  FP8PIPE_REQUIRE(ws_ != nullptr, "LtGemm: init() failed to allocate the workspace");
  const auto [M, N, K, mode_a, mode_b, fa, fb, out_t, splitk1, align] = key;
  (void)fa;
  (void)fb;
  (void)out_t;
  auto p = std::make_unique<Plan>();
  p->scaled = mode_a != kNoScale;
  FP8PIPE_GPU_TRY(make_desc(mode_a, mode_b, &p->op));
  if (p->scaled) {  // the heuristic sees the real pointers of the first call
    FP8PIPE_GPU_TRY(set_desc(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, sa));
    FP8PIPE_GPU_TRY(set_desc(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, sb));
  }
  FP8PIPE_GPU_TRY(make_layouts(M, N, K, ta, tb, td, &p->a, &p->b, &p->d));
  const std::string what =
      std::string(p->scaled ? "fp8_gemm" : "bf16_gemm") + " (" + shape_str(M, N, K) + ")";
  const Result picked = pick_algo(lt_, p->op, p->a, p->b, p->d, kWorkspaceBytes, align, splitk1,
                                  what, &p->algo, &p->info);
  if (!picked.ok) {
    if (picked.unsupported) refused_.emplace(key, picked.msg);  // do not ask the heuristic again
    return picked;
  }
  *out = p.get();
  plans_.emplace(key, std::move(p));
  return Result::Ok();
}

Result LtGemm::run(Plan* p, const void* a_lt, const void* b_lt, void* d, const void* sa,
                   const void* sb, cudaStream_t stream) {
  if (p->scaled) {
    FP8PIPE_GPU_TRY(set_desc(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, sa));
    FP8PIPE_GPU_TRY(set_desc(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, sb));
  }
  const float alpha = 1.0f, beta = 0.0f;
  FP8PIPE_CUBLAS_TRY(cublasLtMatmul(lt_, p->op, &alpha, a_lt, p->a, b_lt, p->b, &beta, d, p->d, d,
                                    p->d, &p->algo, ws_, kWorkspaceBytes, stream));
  last_ = p->info;
  return Result::Ok();
}

Result LtGemm::fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                        float* out_f32, uint16_t* out_bf16, cudaStream_t stream, bool splitk1) {
  FP8PIPE_GPU_TRY(check_fp8_gemm_args(a, b, M, N, K, out_f32, out_bf16));
  void* out = out_f32 ? static_cast<void*>(out_f32) : static_cast<void*>(out_bf16);
  if (M == 0 || N == 0) return Result::Ok();
  if (K == 0) {  // as the CPU: zeros
    FP8PIPE_CUDA_TRY(cudaMemsetAsync(out, 0, M * N * (out_f32 ? 4 : 2), stream));
    return Result::Ok();
  }
  // cuBLASLt A = our B, cuBLASLt B = our A.
  const int mode_a = scale_mode(b.gran), mode_b = scale_mode(a.gran);
  const cudaDataType_t td = out_f32 ? CUDA_R_32F : CUDA_R_16BF;
  const Key key{M,
                N,
                K,
                mode_a,
                mode_b,
                static_cast<int>(b.fmt),
                static_cast<int>(a.fmt),
                static_cast<int>(td),
                splitk1,
                alignment({a.q, b.q, out})};
  Plan* p = nullptr;
  FP8PIPE_GPU_TRY(get_plan(key, fp8_type(b.fmt), fp8_type(a.fmt), td, b.s, a.s, &p));
  return run(p, b.q, a.q, out, b.s, a.s, stream);
}

Result LtGemm::bf16_gemm(const uint16_t* a, const uint16_t* b, int64_t M, int64_t N, int64_t K,
                         float* out_f32, uint16_t* out_bf16, cudaStream_t stream, bool splitk1) {
  FP8PIPE_REQUIRE((out_f32 == nullptr) != (out_bf16 == nullptr),
                  "bf16_gemm: exactly one of out_f32 / out_bf16 must be given");
  FP8PIPE_REQUIRE(M >= 0 && N >= 0 && K >= 0, "bf16_gemm: negative dimension");
  void* out = out_f32 ? static_cast<void*>(out_f32) : static_cast<void*>(out_bf16);
  if (M == 0 || N == 0) return Result::Ok();
  if (K == 0) {
    FP8PIPE_CUDA_TRY(cudaMemsetAsync(out, 0, M * N * (out_f32 ? 4 : 2), stream));
    return Result::Ok();
  }
  FP8PIPE_REQUIRE(a && b, "bf16_gemm: null operand pointer");
  const cudaDataType_t td = out_f32 ? CUDA_R_32F : CUDA_R_16BF;
  const Key key{M,
                N,
                K,
                kNoScale,
                kNoScale,
                static_cast<int>(CUDA_R_16BF),
                static_cast<int>(CUDA_R_16BF),
                static_cast<int>(td),
                splitk1,
                alignment({a, b, out})};
  Plan* p = nullptr;
  FP8PIPE_GPU_TRY(get_plan(key, CUDA_R_16BF, CUDA_R_16BF, td, nullptr, nullptr, &p));
  return run(p, b, a, out, nullptr, nullptr, stream);
}

// ------------------------------------------------------------------------------------------------

RawLtFp8Gemm::~RawLtFp8Gemm() {
  if (ld_) cublasLtMatrixLayoutDestroy(ld_);
  if (lb_) cublasLtMatrixLayoutDestroy(lb_);
  if (la_) cublasLtMatrixLayoutDestroy(la_);
  if (op_) cublasLtMatmulDescDestroy(op_);
}

Result RawLtFp8Gemm::init(cublasLtHandle_t lt, void* workspace, size_t workspace_bytes,
                          const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                          float* out_f32, uint16_t* out_bf16) {
  FP8PIPE_REQUIRE(op_ == nullptr, "RawLtFp8Gemm: init() called twice");
  // The same named preconditions as LtGemm (else a violation reads "no algorithm").
  FP8PIPE_GPU_TRY(check_fp8_gemm_args(a, b, M, N, K, out_f32, out_bf16));
  lt_ = lt;
  ws_ = workspace;
  ws_bytes_ = workspace_bytes;
  a_lt_ = b.q;
  b_lt_ = a.q;
  d_ = out_f32 ? static_cast<void*>(out_f32) : static_cast<void*>(out_bf16);
  FP8PIPE_GPU_TRY(make_desc(scale_mode(b.gran), scale_mode(a.gran), &op_));
  FP8PIPE_GPU_TRY(
      set_desc(op_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(b.s)));
  FP8PIPE_GPU_TRY(
      set_desc(op_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(a.s)));
  FP8PIPE_GPU_TRY(make_layouts(M, N, K, fp8_type(b.fmt), fp8_type(a.fmt),
                               out_f32 ? CUDA_R_32F : CUDA_R_16BF, &la_, &lb_, &ld_));
  LtPlanInfo info;
  return pick_algo(lt_, op_, la_, lb_, ld_, ws_bytes_, alignment({a_lt_, b_lt_, d_}), false,
                   "raw fp8 (" + shape_str(M, N, K) + ")", &algo_, &info);
}

Result RawLtFp8Gemm::run(cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;
  FP8PIPE_CUBLAS_TRY(cublasLtMatmul(lt_, op_, &alpha, a_lt_, la_, b_lt_, lb_, &beta, d_, ld_, d_,
                                    ld_, &algo_, ws_, ws_bytes_, stream));
  return Result::Ok();
}

}  // namespace fp8pipe::kernels::gpu
