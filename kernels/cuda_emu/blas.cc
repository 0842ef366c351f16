// fp8pipe CUDA emulation (FP8PIPE_CUDA=EMULATE): cuBLAS and cuBLASLt on the CPU.
//
// Everything runs synchronously at the call. The point is not speed but an independent model of
// what the real libraries do, so that the CUDA backend's use of them can be checked without a GPU:
//  * FP8 cuBLASLt matmuls follow shared/FP8.md §2.4 (tensor-core step, 128-k block partials,
//    promotion) and §3.1-§3.3 (what is supported, scale layouts, constraints), written here in
//    cuBLASLt's own terms (its A, B, m, n, k), independently of kernels/cpu/fp8_gemm.cc.
//  * Refusals mirror the measured ones: the heuristic returns no algorithm (NOT_SUPPORTED, count
//    0) for unsupported configurations and for preferences whose alignment is too small;
//    cublasLtMatmul returns NOT_SUPPORTED for them and for misaligned (scale) pointers.
//  * Operand spans are checked against live device allocations before anything is read or
//    written; a bad span records an asynchronous illegal-address fault (raise_fault) and the call
//    returns SUCCESS without computing, as a real kernel launch would.
// Header comments (cublas_api.h, cublasLt.h) list the numerics of the non-FP8 paths.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

using fp8pipe::cuda_emu::is_device_range;
using fp8pipe::cuda_emu::raise_fault;

// ------------------------------------------------------------------------------------------------
// Object bookkeeping: live handles and descriptors, so that use-after-destroy is an error status
// instead of undefined behaviour.

template <class T>
class Live {
 public:
  void add(const T* p) {
    std::lock_guard<std::mutex> lk(mu_);
    set_.insert(p);
  }
  bool remove(const T* p) {
    std::lock_guard<std::mutex> lk(mu_);
    return set_.erase(p) > 0;
  }
  bool has(const T* p) {
    std::lock_guard<std::mutex> lk(mu_);
    return p != nullptr && set_.count(p) > 0;
  }

 private:
  std::mutex mu_;
  std::unordered_set<const T*> set_;
};

template <class T>
Live<T>& live() {
  static Live<T> registry;
  return registry;
}

}  // namespace

// Named (not anonymous) because the descriptor structs below, which are global, hold one.
namespace fp8pipe::cuda_emu::blas_detail {

// Fixed-size attribute values indexed by attribute id (the real API's Set/GetAttribute contract:
// the buffer size must equal the attribute's size). Size 0 = no such attribute.
constexpr int kMaxAttr = 40;

class Attrs {
 public:
  Attrs(std::initializer_list<std::pair<int, int>> spec) {
    for (const auto& [id, n] : spec) size_[id] = static_cast<uint8_t>(n);
  }
  cublasStatus_t set(int id, const void* buf, size_t n) {
    if (id < 0 || id >= kMaxAttr || size_[id] == 0 || buf == nullptr || n != size_[id])
      return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(val_[id].data(), buf, n);
    return CUBLAS_STATUS_SUCCESS;
  }
  cublasStatus_t get(int id, void* buf, size_t n, size_t* written) const {
    if (id < 0 || id >= kMaxAttr || size_[id] == 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (n == 0) {  // size query
      if (written == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
      *written = size_[id];
      return CUBLAS_STATUS_SUCCESS;
    }
    if (buf == nullptr || n != size_[id]) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(buf, val_[id].data(), n);
    if (written) *written = n;
    return CUBLAS_STATUS_SUCCESS;
  }
  template <class T>
  T as(int id) const {
    assert(sizeof(T) == size_[id]);
    T v;
    std::memcpy(&v, val_[id].data(), sizeof(T));
    return v;
  }
  template <class T>
  void put(int id, T v) {
    assert(sizeof(T) == size_[id]);
    std::memcpy(val_[id].data(), &v, sizeof(T));
  }

 private:
  std::array<uint8_t, kMaxAttr> size_{};
  std::array<std::array<unsigned char, 8>, kMaxAttr> val_{};
};

constexpr int kPtr = sizeof(void*);

}  // namespace fp8pipe::cuda_emu::blas_detail

using fp8pipe::cuda_emu::blas_detail::Attrs;
using fp8pipe::cuda_emu::blas_detail::kPtr;

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

struct cublasLtContext {};

struct EmuLtMatrixLayout {
  Attrs a{{CUBLASLT_MATRIX_LAYOUT_TYPE, 4},
          {CUBLASLT_MATRIX_LAYOUT_ORDER, 4},
          {CUBLASLT_MATRIX_LAYOUT_ROWS, 8},
          {CUBLASLT_MATRIX_LAYOUT_COLS, 8},
          {CUBLASLT_MATRIX_LAYOUT_LD, 8},
          {CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 4},
          {CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, 8},
          {CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, 8},
          {CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, 4}};
};

struct EmuLtMatmulDesc {
  Attrs a{{CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, 4},
          {CUBLASLT_MATMUL_DESC_SCALE_TYPE, 4},
          {CUBLASLT_MATMUL_DESC_POINTER_MODE, 4},
          {CUBLASLT_MATMUL_DESC_TRANSA, 4},
          {CUBLASLT_MATMUL_DESC_TRANSB, 4},
          {CUBLASLT_MATMUL_DESC_TRANSC, 4},
          {CUBLASLT_MATMUL_DESC_FILL_MODE, 4},
          {CUBLASLT_MATMUL_DESC_EPILOGUE, 4},
          {CUBLASLT_MATMUL_DESC_BIAS_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, 8},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, 8},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, 8},
          {CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE, 8},
          {CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, 4},
          {CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_C_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, 4},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_FAST_ACCUM, 1},
          {CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, 4},
          {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_B_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_C_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_D_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER, kPtr},
          {CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE, 4},
          {CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR, kPtr}};
};

struct EmuLtMatmulPreference {
  Attrs a{{CUBLASLT_MATMUL_PREF_SEARCH_MODE, 4},
          {CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, 8},
          {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, 4},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, 4},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, 4},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, 4},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, 4},
          {CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT, 4},
          {CUBLASLT_MATMUL_PREF_IMPL_MASK, 8}};
};

namespace {

// ------------------------------------------------------------------------------------------------
// Element formats.

size_t elem_size(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_64F:
      return 8;
    case CUDA_R_32F:
      return 4;
    case CUDA_R_16F:
    case CUDA_R_16BF:
      return 2;
    case CUDA_R_8F_E4M3:
    case CUDA_R_8F_E5M2:
      return 1;
    default:
      return 0;
  }
}

bool is_fp8(cudaDataType_t t) { return t == CUDA_R_8F_E4M3 || t == CUDA_R_8F_E5M2; }

float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

// __float2bfloat16_rn (FP8.md §4): RNE, any NaN -> 0x7FFF.
uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FFF;
  const uint32_t u = std::bit_cast<uint32_t>(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float f16_to_f32(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (e == 31) return m ? std::numeric_limits<float>::quiet_NaN() : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -24);
  return sign * std::ldexp(static_cast<float>(1024 + m), e - 25);
}

// __float2half_rn: RNE with subnormals, overflow to Inf (|x| >= 65520), any NaN -> 0x7FFF.
uint16_t f32_to_f16(float f) {
  if (std::isnan(f)) return 0x7FFF;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00;
  if (a < 0x1p-14) return sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24));
  int e = 0;
  std::frexp(a, &e);                                 // a in [2^(e-1), 2^e)
  double r = std::nearbyint(std::ldexp(a, 11 - e));  // significand in [1024, 2048]
  if (r == 2048.0) {
    r = 1024.0;
    ++e;
  }
  return sign | static_cast<uint16_t>(((e - 1 + 15) << 10) | (static_cast<int>(r) - 1024));
}

float load_f32(const void* base, cudaDataType_t t, int64_t idx) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(base)[idx];
    case CUDA_R_16BF:
      return bf16_to_f32(static_cast<const uint16_t*>(base)[idx]);
    case CUDA_R_16F:
      return f16_to_f32(static_cast<const uint16_t*>(base)[idx]);
    default:
      assert(false);
      return 0.0f;
  }
}

void store_f32(void* base, cudaDataType_t t, int64_t idx, float v) {
  switch (t) {
    case CUDA_R_32F:
      static_cast<float*>(base)[idx] = v;
      break;
    case CUDA_R_16BF:
      static_cast<uint16_t*>(base)[idx] = f32_to_bf16(v);
      break;
    case CUDA_R_16F:
      static_cast<uint16_t*>(base)[idx] = f32_to_f16(v);
      break;
    default:
      assert(false);
  }
}

// FP8 code -> exact value as signed integer significand `sig` times 2^lsb, plus the exponent of
// the format field E (exponent field - bias; subnormals use the min-normal exponent), which is
// what FP8.md §2.4 aligns on. Zero: sig = 0. NaN / Inf: special (value in `val`).
struct Fp8Dec {
  int16_t sig = 0;
  int8_t lsb = 0;
  int8_t e = 0;
};

struct Fp8Table {
  std::array<Fp8Dec, 256> dec{};
  std::array<double, 256> val{};
  std::array<bool, 256> special{};
};

// E4M3 (OCP e4m3fn): bias 7, 3 mantissa bits, no Inf, 0x7F/0xFF NaN, max 448.
// E5M2: bias 15, 2 mantissa bits, IEEE-like (exponent 31: Inf / NaN), max 57344.
Fp8Table make_fp8_table(bool e4m3) {
  const int mbits = e4m3 ? 3 : 2, bias = e4m3 ? 7 : 15;
  Fp8Table t;
  for (int c = 0; c < 256; ++c) {
    const bool neg = (c & 0x80) != 0;
    const int field = (c & 0x7F) >> mbits, mant = c & ((1 << mbits) - 1);
    if (e4m3 ? (c & 0x7F) == 0x7F : field == 31) {
      t.special[c] = true;
      t.val[c] = (!e4m3 && mant == 0) ? (neg ? -INFINITY : INFINITY)
                                      : std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const int sig = field == 0 ? mant : (1 << mbits) + mant;
    const int e = field == 0 ? 1 - bias : field - bias;
    t.dec[c] = {static_cast<int16_t>(neg ? -sig : sig), static_cast<int8_t>(e - mbits),
                static_cast<int8_t>(e)};
    t.val[c] = std::ldexp(neg ? -sig : sig, e - mbits);
  }
  return t;
}

const Fp8Table& fp8_table(cudaDataType_t t) {
  static const Fp8Table e4m3 = make_fp8_table(true), e5m2 = make_fp8_table(false);
  return t == CUDA_R_8F_E4M3 ? e4m3 : e5m2;
}

// ------------------------------------------------------------------------------------------------
// FP8.md §2.4, the tensor-core step of one k=32 group (n <= 32 code pairs), all in exact integer
// arithmetic: with emax the largest E(a)+E(b) over nonzero products and floor(log2|c|),
// u = 2^(emax-13), s = trunc(c/u) + sum trunc(a_t b_t / u) (in units of u), and the result is s
// truncated toward zero to 14 significant bits. |s| < 2^21, so int64 is exact.
float tc_step(float c, const Fp8Dec* a, const Fp8Dec* b, int64_t n) {
  if (!std::isfinite(c)) return c;  // the finite products cannot change Inf / NaN
  int emax = INT_MIN;
  for (int64_t t = 0; t < n; ++t) {
    if (a[t].sig != 0 && b[t].sig != 0) emax = std::max(emax, a[t].e + b[t].e);
  }
  if (c != 0.0f) {
    int ec = 0;
    std::frexp(c, &ec);  // |c| in [2^(ec-1), 2^ec)
    emax = std::max(emax, ec - 1);
  }
  if (emax == INT_MIN) return 0.0f;  // c = 0 and all products zero
  const int u = emax - 13;
  int64_t s = c == 0.0f ? 0 : static_cast<int64_t>(std::trunc(std::ldexp(double{c}, -u)));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t p = int64_t{a[t].sig} * b[t].sig;
    if (p == 0) continue;
    const int sh = a[t].lsb + b[t].lsb - u;  // <= 13 (the product's lsb is below its field exp)
    if (sh >= 0) {
      s += p * (int64_t{1} << sh);
    } else {
      const int64_t mag = sh <= -62 ? 0 : (p < 0 ? -p : p) >> -sh;  // truncation toward zero
      s += p < 0 ? -mag : mag;
    }
  }
  if (s == 0) return 0.0f;
  uint64_t mag = static_cast<uint64_t>(s < 0 ? -s : s);
  const int bits = std::bit_width(mag);
  if (bits > 14) mag = (mag >> (bits - 14)) << (bits - 14);
  const double r = std::ldexp(static_cast<double>(mag), u);  // <= 14 bits: exact in float
  return static_cast<float>(s < 0 ? -r : r);
}

// A group holding NaN / Inf codes: the result is NaN or +-Inf whatever the order, as in IEEE.
float tc_step_special(float c, const uint8_t* a, const uint8_t* b, int64_t n, const Fp8Table& ta,
                      const Fp8Table& tb) {
  double r = c;
  for (int64_t t = 0; t < n; ++t) r += ta.val[a[t]] * tb.val[b[t]];
  return static_cast<float>(r);
}

// Runs f(i) for i in [0, n), on several threads when the work is large. Each i writes its own
// outputs, so the result does not depend on the thread count.
template <class F>
void parallel_for(int64_t n, double work_per_item, F&& f) {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads =
      n * work_per_item < 4e6 ? 1 : std::min<int64_t>({static_cast<int64_t>(hw), n, 32});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
    });
  }
  for (auto& th : pool) th.join();
}

// cuBLAS-style epilogue d = alpha*acc + beta*c, in CUTLASS LinearCombination order (fp32 scale
// type); C is not read when beta == 0. With alpha = 1, beta = 0 it is exactly acc (FP8.md §2.4).
float epilogue(float acc, float alpha, float beta, const void* c, cudaDataType_t ct, int64_t idx) {
  if (beta == 0.0f) return alpha * acc;
  const float bc = beta * load_f32(c, ct, idx);
  return std::fma(alpha, acc, bc);
}

// ------------------------------------------------------------------------------------------------
// Memory checks.

// Is the column-major rows x cols matrix (ld, `batch` matrices `stride` elements apart) inside
// one device allocation?
bool matrix_on_device(const void* p, int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                      int64_t stride, size_t es) {
  if (rows <= 0 || cols <= 0 || batch <= 0) return true;
  const int64_t last = (batch - 1) * stride;
  const int64_t lo = std::min<int64_t>(0, last);
  const int64_t hi = std::max<int64_t>(0, last) + (cols - 1) * ld + (rows - 1);
  const auto start = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(lo * int64_t(es));
  return is_device_range(reinterpret_cast<const void*>(start),
                         static_cast<size_t>(hi - lo + 1) * es);
}

std::string matrix_str(const char* api, const char* name, const void* p, int64_t rows, int64_t cols,
                       int64_t ld, int64_t batch, int64_t stride) {
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "%s: operand %s (%lld x %lld, ld %lld, batch %lld, stride %lld) at %p is not "
                "inside a device allocation",
                api, name, static_cast<long long>(rows), static_cast<long long>(cols),
                static_cast<long long>(ld), static_cast<long long>(batch),
                static_cast<long long>(stride), p);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// Float GEMM core (cuBLAS Sgemm / GemmEx and cuBLASLt BF16): column-major, op(A) m x k,
// op(B) k x n, D = alpha op(A) op(B) + beta C.

enum class Accum {
  kFma,     // acc = fma(a, b, acc): an FFMA kernel (fp32 inputs)
  kMulAdd,  // acc = acc + f32(a*b): bf16 inputs, whose products are exact in fp32
};

struct Operand {
  const void* p;
  cudaDataType_t t;
  int64_t ld;
  int64_t stride;  // batch stride, elements
};

struct FloatGemm {
  bool ta, tb;  // op(A) = A^T, op(B) = B^T
  int64_t m, n, k, batch;
  Operand a, b, c, d;  // c.p may equal d.p (same ld, same type)
  float alpha, beta;
  Accum accum;
};

void run_float_gemm(const FloatGemm& g) {
  const bool read_ab = g.k > 0 && g.alpha != 0.0f;  // BLAS: alpha = 0 does not read A, B
  std::vector<float> a, b;
  for (int64_t bi = 0; bi < g.batch; ++bi) {
    if (read_ab) {  // op(A) rows and op(B) columns, each k-contiguous
      a.resize(g.m * g.k);
      b.resize(g.n * g.k);
      const int64_t oa = bi * g.a.stride, ob = bi * g.b.stride;
      for (int64_t i = 0; i < g.m; ++i) {
        for (int64_t kk = 0; kk < g.k; ++kk)
          a[i * g.k + kk] = load_f32(g.a.p, g.a.t, oa + (g.ta ? kk + i * g.a.ld : i + kk * g.a.ld));
      }
      for (int64_t j = 0; j < g.n; ++j) {
        for (int64_t kk = 0; kk < g.k; ++kk)
          b[j * g.k + kk] = load_f32(g.b.p, g.b.t, ob + (g.tb ? j + kk * g.b.ld : kk + j * g.b.ld));
      }
    }
    const int64_t oc = bi * g.c.stride, od = bi * g.d.stride;
    parallel_for(g.n, double(g.m) * double(g.k), [&](int64_t j) {
      for (int64_t i = 0; i < g.m; ++i) {
        float acc = 0.0f;
        if (read_ab) {
          const float* ar = a.data() + i * g.k;
          const float* bc = b.data() + j * g.k;
          if (g.accum == Accum::kFma) {
            for (int64_t kk = 0; kk < g.k; ++kk) acc = std::fma(ar[kk], bc[kk], acc);
          } else {
            for (int64_t kk = 0; kk < g.k; ++kk) {
              const float p = ar[kk] * bc[kk];
              acc = acc + p;
            }
          }
        }
        const float v = epilogue(acc, g.alpha, g.beta, g.c.p, g.c.t, oc + i + j * g.c.ld);
        store_f32(const_cast<void*>(g.d.p), g.d.t, od + i + j * g.d.ld, v);  // d: the output
      }
    });
  }
}

// Device-span checks of a FloatGemm's operands; false after recording a fault.
bool float_gemm_on_device(const FloatGemm& g, const char* api) {
  struct Span {
    const char* name;
    const Operand& o;
    int64_t rows, cols;
    bool used;
  };
  const bool read_ab = g.k > 0 && g.alpha != 0.0f;
  const Span spans[] = {
      {"A", g.a, g.ta ? g.k : g.m, g.ta ? g.m : g.k, read_ab},
      {"B", g.b, g.tb ? g.n : g.k, g.tb ? g.k : g.n, read_ab},
      {"C", g.c, g.m, g.n, g.beta != 0.0f},
      {"D", g.d, g.m, g.n, true},
  };
  for (const Span& s : spans) {
    if (s.used &&
        !matrix_on_device(s.o.p, s.rows, s.cols, s.o.ld, g.batch, s.o.stride, elem_size(s.o.t))) {
      raise_fault(
          cudaErrorIllegalAddress,
          matrix_str(api, s.name, s.o.p, s.rows, s.cols, s.o.ld, g.batch, s.o.stride).c_str());
      return false;
    }
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// cuBLAS argument checks (cuBLAS's own rules: INVALID_VALUE for bad enums / sizes / ld).

bool valid_op(cublasOperation_t op) {
  return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C;
}

cublasStatus_t check_gemm_args(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                               int n, int k, int lda, int ldb, int ldc, int batch,
                               const void* alpha, const void* beta) {
  if (!live<cublasContext>().has(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!valid_op(ta) || !valid_op(tb) || m < 0 || n < 0 || k < 0 || batch < 0)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

bool valid_gemm_algo(cublasGemmAlgo_t a) {
  const int v = a;
  return v == -1 || (v >= 0 && v <= 23) || (v >= 99 && v <= 115) || v == 999;
}

cublasStatus_t gemm_ex(const char* api, cublasHandle_t h, cublasOperation_t ta,
                       cublasOperation_t tb, int m, int n, int k, const void* alpha, const void* A,
                       cudaDataType at, int lda, long long sa, const void* B, cudaDataType bt,
                       int ldb, long long sb, const void* beta, void* C, cudaDataType ct, int ldc,
                       long long sc, int batch, cublasComputeType_t compute,
                       cublasGemmAlgo_t algo) {
  const cublasStatus_t st = check_gemm_args(h, ta, tb, m, n, k, lda, ldb, ldc, batch, alpha, beta);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (!valid_gemm_algo(algo)) return CUBLAS_STATUS_INVALID_VALUE;
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  Accum accum;
  if (at == CUDA_R_16BF && bt == CUDA_R_16BF && (ct == CUDA_R_32F || ct == CUDA_R_16BF)) {
    accum = Accum::kMulAdd;
  } else if (at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F) {
    accum = Accum::kFma;
  } else {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const FloatGemm g{ta != CUBLAS_OP_N,
                    tb != CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    batch,
                    {A, at, lda, sa},
                    {B, bt, ldb, sb},
                    {C, ct, ldc, sc},
                    {C, ct, ldc, sc},
                    *static_cast<const float*>(alpha),
                    *static_cast<const float*>(beta),
                    accum};
  // Runs with the handle's stream (FloatGemm holds values and device pointers only).
  fp8pipe::cuda_emu::submit(h->stream, [g, api] {
    if (float_gemm_on_device(g, api)) run_float_gemm(g);
  });
  return CUBLAS_STATUS_SUCCESS;
}

const char* status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "<unrecognized cublasStatus_t>";
}

const char* status_string(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "an error was detected when checking the current licensing";
  }
  return "<unrecognized cublasStatus_t>";
}

}  // namespace

// ================================================================================================
// cuBLAS

const char* cublasGetStatusName(cublasStatus_t status) { return status_name(status); }
const char* cublasGetStatusString(cublasStatus_t status) { return status_string(status); }

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext;
  live<cublasContext>().add(*handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (!live<cublasContext>().remove(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetVersion(cublasHandle_t handle, int* version) {
  if (!live<cublasContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (version == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *version = CUBLAS_VERSION;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (!live<cublasContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;  // each call runs after this stream's earlier work
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t* stream) {
  if (!live<cublasContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (stream == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!live<cublasContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int base = mode & 0xF, flags = mode & ~0xF;
  if (flags & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) return CUBLAS_STATUS_INVALID_VALUE;
  if (base > CUBLAS_FP32_EMULATED_BF16X9_MATH && base != CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH)
    return CUBLAS_STATUS_INVALID_VALUE;
  // Reduced-precision fp32 modes (TF32, fp16 down-conversion, BF16x9) are not emulated.
  if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_PEDANTIC_MATH)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (!live<cublasContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long int strideA, const float* B, int ldb,
                                         long long int strideB, const float* beta, float* C,
                                         int ldc, long long int strideC, int batchCount) {
  const cublasStatus_t st =
      check_gemm_args(handle, transa, transb, m, n, k, lda, ldb, ldc, batchCount, alpha, beta);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
  const FloatGemm g{transa != CUBLAS_OP_N,
                    transb != CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    batchCount,
                    {A, CUDA_R_32F, lda, strideA},
                    {B, CUDA_R_32F, ldb, strideB},
                    {C, CUDA_R_32F, ldc, strideC},
                    {C, CUDA_R_32F, ldc, strideC},
                    *alpha,
                    *beta,
                    Accum::kFma};
  fp8pipe::cuda_emu::submit(handle->stream, [g] {
    if (float_gemm_on_device(g, "cublasSgemm")) run_float_gemm(g);
  });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const float* alpha,
                           const float* A, int lda, const float* B, int ldb, const float* beta,
                           float* C, int ldc) {
  return cublasSgemmStridedBatched(handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0,
                                   beta, C, ldc, 0, 1);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) {
  return gemm_ex("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype,
                 ldb, 0, beta, C, Ctype, ldc, 0, 1, computeType, algo);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B,
                                          cudaDataType Btype, int ldb, long long int strideB,
                                          const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  return gemm_ex("cublasGemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, Atype,
                 lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                 computeType, algo);
}

// ================================================================================================
// cuBLASLt

namespace {

// The algo: data[0] a marker, then the config attributes at byte 8 + 4*id (sizes <= 4), and the
// pointer alignment (bytes) the algo was chosen for, per matrix A, B, C, D, at bytes 48..55.
constexpr uint64_t kAlgoMarker = 0x31554d4550385046ull;  // "FP8PEMU1"
constexpr int kAlgoAttrs = 9;
constexpr std::array<uint8_t, kAlgoAttrs> kAlgoAttrSize = {4, 4, 4, 4, 4, 4, 4, 2, 2};
constexpr size_t kAlgoAlignOffset = 48;

unsigned char* algo_bytes(cublasLtMatmulAlgo_t* a) {
  return reinterpret_cast<unsigned char*>(a->data);
}
const unsigned char* algo_bytes(const cublasLtMatmulAlgo_t* a) {
  return reinterpret_cast<const unsigned char*>(a->data);
}

template <class T>
T algo_get(const cublasLtMatmulAlgo_t& a, int id) {
  T v;
  std::memcpy(&v, algo_bytes(&a) + 8 + 4 * id, sizeof(T));
  return v;
}

template <class T>
void algo_put(cublasLtMatmulAlgo_t* a, int id, T v) {
  std::memcpy(algo_bytes(a) + 8 + 4 * id, &v, sizeof(T));
}

std::array<uint16_t, 4> algo_align(const cublasLtMatmulAlgo_t& a) {
  std::array<uint16_t, 4> al;
  std::memcpy(al.data(), algo_bytes(&a) + kAlgoAlignOffset, sizeof(al));
  return al;
}

cublasLtMatmulAlgo_t make_algo(const std::array<uint16_t, 4>& align) {
  cublasLtMatmulAlgo_t a{};
  a.data[0] = kAlgoMarker;
  algo_put<int32_t>(&a, CUBLASLT_ALGO_CONFIG_ID, 0);
  algo_put<int32_t>(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 1);
  algo_put<uint32_t>(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, CUBLASLT_REDUCTION_SCHEME_NONE);
  std::memcpy(algo_bytes(&a) + kAlgoAlignOffset, align.data(), sizeof(align));
  return a;
}

struct LtMatrix {
  cudaDataType_t t;
  int64_t rows, cols, ld;
  int64_t batch, stride;
};

// A supported, consistent cuBLASLt problem (classify()).
struct LtProblem {
  bool fp8 = false;
  bool ta = false, tb = false;  // op(A) = A^T, op(B) = B^T
  int64_t m = 0, n = 0, k = 0, batch = 1;
  LtMatrix a{}, b{}, c{}, d{};
  int32_t mode_a = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  int32_t mode_b = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  bool fast_accum = false;
  const float* scale_a = nullptr;
  const float* scale_b = nullptr;
  std::array<uint16_t, 4> min_align{};  // least pointer alignment the kernels work with
};

bool is_block_mode(int32_t m) {
  return m == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F ||
         m == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pad4(int64_t v) { return (v + 3) / 4 * 4; }

// Floats of a scale array that a kernel reads (FP8.md §3.2); R = the operand's row count.
int64_t scale_floats(int32_t mode, int64_t rows, int64_t k) {
  const int64_t kb = ceil_div(k, 128);
  switch (mode) {
    case CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F:
      return kb * rows;
    case CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F:  // the last row's padding is never read
      return (ceil_div(rows, 128) - 1) * pad4(kb) + kb;
    default:
      return 1;
  }
}

cublasStatus_t read_layout(cublasLtMatrixLayout_t l, LtMatrix* out) {
  if (!live<EmuLtMatrixLayout>().has(l)) return CUBLAS_STATUS_INVALID_VALUE;
  const Attrs& a = l->a;
  const uint64_t rows = a.as<uint64_t>(CUBLASLT_MATRIX_LAYOUT_ROWS);
  const uint64_t cols = a.as<uint64_t>(CUBLASLT_MATRIX_LAYOUT_COLS);
  const int64_t ld = a.as<int64_t>(CUBLASLT_MATRIX_LAYOUT_LD);
  const int32_t batch = a.as<int32_t>(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT);
  if (rows == 0 || cols == 0 || rows > INT32_MAX || cols > INT32_MAX || batch < 1 ||
      ld < static_cast<int64_t>(rows))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (a.as<int32_t>(CUBLASLT_MATRIX_LAYOUT_ORDER) != CUBLASLT_ORDER_COL ||
      a.as<int64_t>(CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET) != 0 ||
      a.as<uint32_t>(CUBLASLT_MATRIX_LAYOUT_BATCH_MODE) != CUBLASLT_BATCH_MODE_STRIDED)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  *out = {static_cast<cudaDataType_t>(a.as<uint32_t>(CUBLASLT_MATRIX_LAYOUT_TYPE)),
          static_cast<int64_t>(rows),
          static_cast<int64_t>(cols),
          ld,
          batch,
          a.as<int64_t>(CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET)};
  if (elem_size(out->t) == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}

// Checks a problem (descriptor + layouts) for consistency (INVALID_VALUE) and support
// (NOT_SUPPORTED: FP8.md §3.1 and §3.3 for FP8), and fills *p. Pointers are not looked at.
cublasStatus_t classify(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t la,
                        cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc,
                        cublasLtMatrixLayout_t ldesc, LtProblem* p) {
  if (!live<EmuLtMatmulDesc>().has(desc)) return CUBLAS_STATUS_INVALID_VALUE;
  const cublasLtMatrixLayout_t layouts[4] = {la, lb, lc, ldesc};
  LtMatrix* mats[4] = {&p->a, &p->b, &p->c, &p->d};
  cublasStatus_t unsupported = CUBLAS_STATUS_SUCCESS;  // reported after the INVALID_VALUE checks
  for (int i = 0; i < 4; ++i) {
    const cublasStatus_t st = read_layout(layouts[i], mats[i]);
    if (st == CUBLAS_STATUS_INVALID_VALUE) return st;
    if (st != CUBLAS_STATUS_SUCCESS) unsupported = st;
  }
  const Attrs& o = desc->a;
  const int32_t opa = o.as<int32_t>(CUBLASLT_MATMUL_DESC_TRANSA);
  const int32_t opb = o.as<int32_t>(CUBLASLT_MATMUL_DESC_TRANSB);
  if (!valid_op(static_cast<cublasOperation_t>(opa)) ||
      !valid_op(static_cast<cublasOperation_t>(opb)) ||
      o.as<int32_t>(CUBLASLT_MATMUL_DESC_TRANSC) != CUBLAS_OP_N)
    return CUBLAS_STATUS_INVALID_VALUE;
  p->ta = opa != CUBLAS_OP_N;
  p->tb = opb != CUBLAS_OP_N;
  // Shapes: D m x n, op(A) m x k, op(B) k x n, C like D; equal batch counts.
  p->m = p->d.rows;
  p->n = p->d.cols;
  p->k = p->ta ? p->a.rows : p->a.cols;
  p->batch = p->d.batch;
  if ((p->ta ? p->a.cols : p->a.rows) != p->m || (p->tb ? p->b.cols : p->b.rows) != p->k ||
      (p->tb ? p->b.rows : p->b.cols) != p->n || p->c.rows != p->m || p->c.cols != p->n ||
      p->a.batch != p->batch || p->b.batch != p->batch || p->c.batch != p->batch)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (unsupported != CUBLAS_STATUS_SUCCESS) return unsupported;

  // Features the emulator does not model: epilogues, C/D scaling, amax, aux outputs.
  const int32_t ptr_mode = o.as<int32_t>(CUBLASLT_MATMUL_DESC_POINTER_MODE);
  if (ptr_mode != CUBLASLT_POINTER_MODE_HOST ||
      o.as<uint32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE) != CUBLASLT_EPILOGUE_DEFAULT ||
      o.as<int32_t>(CUBLASLT_MATMUL_DESC_FILL_MODE) != CUBLAS_FILL_MODE_FULL)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  for (int attr :
       {CUBLASLT_MATMUL_DESC_C_SCALE_POINTER, CUBLASLT_MATMUL_DESC_D_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER, CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR}) {
    if (o.as<const void*>(attr) != nullptr) return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  for (int attr :
       {CUBLASLT_MATMUL_DESC_C_SCALE_MODE, CUBLASLT_MATMUL_DESC_D_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE, CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE}) {
    if (o.as<int32_t>(attr) != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F)
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const int32_t compute = o.as<int32_t>(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE);
  if (o.as<int32_t>(CUBLASLT_MATMUL_DESC_SCALE_TYPE) != CUDA_R_32F)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  p->mode_a = o.as<int32_t>(CUBLASLT_MATMUL_DESC_A_SCALE_MODE);
  p->mode_b = o.as<int32_t>(CUBLASLT_MATMUL_DESC_B_SCALE_MODE);
  p->fast_accum = o.as<int8_t>(CUBLASLT_MATMUL_DESC_FAST_ACCUM) != 0;
  p->scale_a = static_cast<const float*>(o.as<const void*>(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER));
  p->scale_b = static_cast<const float*>(o.as<const void*>(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER));
  const cudaDataType_t at = p->a.t, bt = p->b.t, ct = p->c.t, dt = p->d.t;
  const bool out_ok = ct == dt && (dt == CUDA_R_32F || dt == CUDA_R_16BF || dt == CUDA_R_16F);

  if (!is_fp8(at) && !is_fp8(bt)) {  // BF16 x BF16 -> BF16 / FP32
    if (at != CUDA_R_16BF || bt != CUDA_R_16BF || !out_ok || dt == CUDA_R_16F ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) ||
        p->mode_a != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F ||
        p->mode_b != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F)
      return CUBLAS_STATUS_NOT_SUPPORTED;
    // cuBLASLt.h: A/B scale pointers with non-FP8 data are an invalid combination.
    if (p->scale_a || p->scale_b) return CUBLAS_STATUS_INVALID_VALUE;
    const auto es = static_cast<uint16_t>(elem_size(dt));
    p->min_align = {2, 2, es, es};
    return CUBLAS_STATUS_SUCCESS;
  }

  // FP8 (FP8.md §3.1): TN, not E5M2 x E5M2, compute / scale fp32, C = D in {BF16, FP16, FP32}.
  p->fp8 = true;
  if (!is_fp8(at) || !is_fp8(bt) || (at == CUDA_R_8F_E5M2 && bt == CUDA_R_8F_E5M2) ||
      compute != CUBLAS_COMPUTE_32F || !p->ta || p->tb || !out_ok)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const int32_t ma = p->mode_a, mb = p->mode_b;
  const bool scalar = ma == CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F &&
                      mb == CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  const bool block = is_block_mode(ma) && is_block_mode(mb) &&
                     !(ma == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F &&
                       mb == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F);
  if (!scalar && !block) return CUBLAS_STATUS_NOT_SUPPORTED;  // incl. BLK x BLK, mixed modes
  if (block && (p->fast_accum || p->batch != 1)) return CUBLAS_STATUS_NOT_SUPPORTED;
  // FP8.md §3.3.
  if (p->k % 16 != 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  if ((ma == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F && p->m % 4 != 0) ||
      (mb == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F && p->n % 4 != 0))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  for (const LtMatrix* x : {&p->a, &p->b, &p->c, &p->d}) {
    const int64_t es = static_cast<int64_t>(elem_size(x->t));
    if (x->ld * es % 16 != 0 || (p->batch > 1 && x->stride * es % 16 != 0))
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  p->min_align = {16, 16, 16, 16};
  return CUBLAS_STATUS_SUCCESS;
}

// Validates an algo against a problem, as cublasLtMatmulAlgoCheck does.
cublasStatus_t check_algo(const cublasLtMatmulAlgo_t& algo, const LtProblem& p) {
  if (algo.data[0] != kAlgoMarker) return CUBLAS_STATUS_INVALID_VALUE;  // not from this library
  const int32_t splitk = algo_get<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
  const uint32_t scheme = algo_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME);
  if (splitk < 1 ||
      (scheme != CUBLASLT_REDUCTION_SCHEME_NONE && scheme != CUBLASLT_REDUCTION_SCHEME_INPLACE &&
       scheme != CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE &&
       scheme != CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (splitk > 1 && scheme == CUBLASLT_REDUCTION_SCHEME_NONE) return CUBLAS_STATUS_INVALID_VALUE;
  if (algo_get<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID) != 0 || splitk > p.k)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const auto al = algo_align(algo);
  for (int i = 0; i < 4; ++i) {
    if (al[i] < p.min_align[i]) return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Device utilization estimate for the heuristic result: 128 x 128 tiles over 132 SMs (H100 SXM).
float waves(const LtProblem& p) {
  return static_cast<float>(ceil_div(p.m, 128) * ceil_div(p.n, 128) * p.batch) / 132.0f;
}

uint16_t pointer_alignment(const void* ptr) {
  uint16_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(ptr) % a != 0) a /= 2;
  return a;
}

// ------------------------------------------------------------------------------------------------
// FP8 matmul per FP8.md §2.4, in cuBLASLt's terms: TN, so row i of op(A) is A[i*lda + kk] and
// column j of op(B) is B[j*ldb + kk], both k-contiguous.

// One k-contiguous FP8 operand, decoded: `rows` rows of k codes, plus per row and 32-group a flag
// for NaN / Inf codes.
struct Fp8Rows {
  const uint8_t* raw;
  int64_t ld;
  std::vector<Fp8Dec> dec;
  std::vector<uint8_t> special;
};

Fp8Rows decode_rows(const uint8_t* raw, int64_t rows, int64_t k, int64_t ld, cudaDataType_t t) {
  const Fp8Table& tab = fp8_table(t);
  const int64_t groups = ceil_div(k, 32);
  Fp8Rows r{raw, ld, std::vector<Fp8Dec>(rows * k), std::vector<uint8_t>(rows * groups, 0)};
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t kk = 0; kk < k; ++kk) {
      const uint8_t c = raw[i * ld + kk];
      r.dec[i * k + kk] = tab.dec[c];
      if (tab.special[c]) r.special[i * groups + kk / 32] = 1;
    }
  }
  return r;
}

// Scale of operand row r (of R) in k-block kb (of KB), FP8.md §3.2. SCALAR with no pointer: 1.
float scale_at(int32_t mode, const float* s, int64_t r, int64_t kb, int64_t rows, int64_t kbs) {
  switch (mode) {
    case CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F:
      return s[kb * rows + r];
    case CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F:
      return s[(r / 128) * pad4(kbs) + kb];
    default:
      return s ? s[0] : 1.0f;
  }
}

void run_fp8(const LtProblem& p, const uint8_t* A, const uint8_t* B, const void* C, void* D,
             float alpha, float beta) {
  const int64_t m = p.m, n = p.n, k = p.k, kbs = ceil_div(k, 128), groups = ceil_div(k, 32);
  const Fp8Table& ta = fp8_table(p.a.t);
  const Fp8Table& tb = fp8_table(p.b.t);
  const bool vec_vec = p.mode_a == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F &&
                       p.mode_b == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  for (int64_t bi = 0; bi < p.batch; ++bi) {
    const Fp8Rows a = decode_rows(A + bi * p.a.stride, m, k, p.a.ld, p.a.t);
    const Fp8Rows b = decode_rows(B + bi * p.b.stride, n, k, p.b.ld, p.b.t);
    // The tensor-core step over k in [k0, k1) (one group of <= 32) of output (i, j).
    const auto step = [&](float c, int64_t i, int64_t j, int64_t k0, int64_t k1) {
      if (a.special[i * groups + k0 / 32] || b.special[j * groups + k0 / 32])
        return tc_step_special(c, a.raw + i * a.ld + k0, b.raw + j * b.ld + k0, k1 - k0, ta, tb);
      return tc_step(c, a.dec.data() + i * k + k0, b.dec.data() + j * k + k0, k1 - k0);
    };
    parallel_for(n, double(m) * double(k), [&](int64_t j) {
      for (int64_t i = 0; i < m; ++i) {
        float acc = 0.0f;
        if (p.fast_accum) {  // per-tensor only: no promotion, c carried over the whole k
          float c = 0.0f;
          for (int64_t k0 = 0; k0 < k; k0 += 32) c = step(c, i, j, k0, std::min(k, k0 + 32));
          const float sab = scale_at(p.mode_a, p.scale_a, i, 0, m, kbs) *
                            scale_at(p.mode_b, p.scale_b, j, 0, n, kbs);
          acc = c * sab;  // scales applied once (exact for unit scales; others unverified)
        } else {
          for (int64_t kb = 0; kb < kbs; ++kb) {
            float pb = 0.0f;  // block partial P_b over k in [128kb, 128kb + 128)
            const int64_t kend = std::min(k, 128 * kb + 128);
            for (int64_t k0 = 128 * kb; k0 < kend; k0 += 32)
              pb = step(pb, i, j, k0, std::min(kend, k0 + 32));
            const float sa = scale_at(p.mode_a, p.scale_a, i, kb, m, kbs);
            const float sb = scale_at(p.mode_b, p.scale_b, j, kb, n, kbs);
            if (vec_vec) {  // acc = fma(f32(P_b * sB), sA, acc)
              const float t = pb * sb;
              acc = std::fma(t, sa, acc);
            } else {  // VEC x BLK, BLK x VEC, per-tensor: acc = fma(P_b, f32(sA * sB), acc)
              const float sab = sa * sb;
              acc = std::fma(pb, sab, acc);
            }
          }
        }
        const int64_t oc = bi * p.c.stride + i + j * p.c.ld;
        const int64_t od = bi * p.d.stride + i + j * p.d.ld;
        store_f32(D, p.d.t, od, epilogue(acc, alpha, beta, C, p.c.t, oc));
      }
    });
  }
}

}  // namespace

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasLtContext;
  live<cublasLtContext>().add(*handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  if (!live<cublasLtContext>().remove(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasLtGetStatusName(cublasStatus_t status) { return status_name(status); }
const char* cublasLtGetStatusString(cublasStatus_t status) { return status_string(status); }
size_t cublasLtGetVersion(void) { return CUBLAS_VERSION; }

// Descriptors: creation, destruction (of an unknown pointer: INVALID_VALUE and a note on stderr,
// where real cuBLASLt would corrupt its heap) and attributes.
namespace {

template <class T>
cublasStatus_t destroy_desc(T* d, const char* api) {
  if (d == nullptr) return CUBLAS_STATUS_SUCCESS;
  if (!live<T>().remove(d)) {
    std::fprintf(stderr, "cuda_emu: %s(%p): not a live descriptor (destroyed twice?)\n", api,
                 static_cast<const void*>(d));
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}

// Set/GetAttribute of any descriptor kind: INVALID_VALUE for a pointer that is not live.
template <class T, class A>
cublasStatus_t set_attr(T* d, A attr, const void* buf, size_t bytes) {
  if (!live<T>().has(d)) return CUBLAS_STATUS_INVALID_VALUE;
  return d->a.set(attr, buf, bytes);
}
template <class T, class A>
cublasStatus_t get_attr(T* d, A attr, void* buf, size_t bytes, size_t* written) {
  if (!live<T>().has(d)) return CUBLAS_STATUS_INVALID_VALUE;
  return d->a.get(attr, buf, bytes, written);
}

}  // namespace

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  if (layout == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* l = new EmuLtMatrixLayout;
  l->a.put<uint32_t>(CUBLASLT_MATRIX_LAYOUT_TYPE, static_cast<uint32_t>(type));
  l->a.put<int32_t>(CUBLASLT_MATRIX_LAYOUT_ORDER, CUBLASLT_ORDER_COL);
  l->a.put<uint64_t>(CUBLASLT_MATRIX_LAYOUT_ROWS, rows);
  l->a.put<uint64_t>(CUBLASLT_MATRIX_LAYOUT_COLS, cols);
  l->a.put<int64_t>(CUBLASLT_MATRIX_LAYOUT_LD, ld);
  l->a.put<int32_t>(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 1);
  live<EmuLtMatrixLayout>().add(l);
  *layout = l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  return destroy_desc(layout, "cublasLtMatrixLayoutDestroy");
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t sizeInBytes) {
  return set_attr(layout, attr, buf, sizeInBytes);
}

cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t layout,
                                                cublasLtMatrixLayoutAttribute_t attr, void* buf,
                                                size_t sizeInBytes, size_t* sizeWritten) {
  return get_attr(layout, attr, buf, sizeInBytes, sizeWritten);
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType) {
  if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* d = new EmuLtMatmulDesc;
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, computeType);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_SCALE_TYPE, scaleType);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_N);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_TRANSC, CUBLAS_OP_N);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_FILL_MODE, CUBLAS_FILL_MODE_FULL);
  d->a.put<uint32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_DEFAULT);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, -1);
  d->a.put<int32_t>(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, -1);
  live<EmuLtMatmulDesc>().add(d);
  *desc = d;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  return destroy_desc(desc, "cublasLtMatmulDescDestroy");
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t sizeInBytes) {
  return set_attr(desc, attr, buf, sizeInBytes);
}

cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, void* buf,
                                              size_t sizeInBytes, size_t* sizeWritten) {
  return get_attr(desc, attr, buf, sizeInBytes, sizeWritten);
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* p = new EmuLtMatmulPreference;
  p->a.put<uint32_t>(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, CUBLASLT_REDUCTION_SCHEME_MASK);
  for (int attr :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    p->a.put<uint32_t>(attr, 256);
  p->a.put<uint64_t>(CUBLASLT_MATMUL_PREF_IMPL_MASK, ~uint64_t{0});
  live<EmuLtMatmulPreference>().add(p);
  *pref = p;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  return destroy_desc(pref, "cublasLtMatmulPreferenceDestroy");
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t sizeInBytes) {
  return set_attr(pref, attr, buf, sizeInBytes);
}

cublasStatus_t cublasLtMatmulPreferenceGetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    void* buf, size_t sizeInBytes,
                                                    size_t* sizeWritten) {
  return get_attr(pref, attr, buf, sizeInBytes, sizeWritten);
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t operationDesc, cublasLtMatrixLayout_t Adesc,
    cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
    cublasLtMatmulPreference_t preference, int requestedAlgoCount,
    cublasLtMatmulHeuristicResult_t heuristicResultsArray[], int* returnAlgoCount) {
  if (!live<cublasLtContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (requestedAlgoCount <= 0 || heuristicResultsArray == nullptr || returnAlgoCount == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  *returnAlgoCount = 0;
  if (!live<EmuLtMatmulPreference>().has(preference)) return CUBLAS_STATUS_INVALID_VALUE;
  LtProblem p;
  const cublasStatus_t st = classify(operationDesc, Adesc, Bdesc, Cdesc, Ddesc, &p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  // The one algorithm needs no workspace; it is offered only if the preference's alignments are
  // at least what the kernels need, and it then assumes them (capped at 256 B).
  const Attrs& pa = preference->a;
  std::array<uint16_t, 4> align{};
  const int align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    const uint32_t want = pa.as<uint32_t>(align_attr[i]);
    if (want < p.min_align[i]) return CUBLAS_STATUS_NOT_SUPPORTED;
    align[i] = static_cast<uint16_t>(std::min<uint32_t>(want, 256));
  }
  const float max_waves = pa.as<float>(CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT);
  if (max_waves > 0.0f && waves(p) > max_waves) return CUBLAS_STATUS_NOT_SUPPORTED;
  cublasLtMatmulHeuristicResult_t& r = heuristicResultsArray[0];
  r = cublasLtMatmulHeuristicResult_t{};
  r.algo = make_algo(align);
  r.workspaceSize = 0;
  r.state = CUBLAS_STATUS_SUCCESS;
  r.wavesCount = waves(p);
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t handle, cublasLtMatmulDesc_t operationDesc,
                                       cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                       cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                       const cublasLtMatmulAlgo_t* algo,
                                       cublasLtMatmulHeuristicResult_t* result) {
  if (!live<cublasLtContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (algo == nullptr || result == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  LtProblem p;
  cublasStatus_t st = classify(operationDesc, Adesc, Bdesc, Cdesc, Ddesc, &p);
  if (st == CUBLAS_STATUS_SUCCESS) st = check_algo(*algo, p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  result->workspaceSize = 0;
  result->state = CUBLAS_STATUS_SUCCESS;
  result->wavesCount = waves(p);
  std::fill(std::begin(result->reserved), std::end(result->reserved), 0);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoConfigSetAttribute(cublasLtMatmulAlgo_t* algo,
                                                    cublasLtMatmulAlgoConfigAttributes_t attr,
                                                    const void* buf, size_t sizeInBytes) {
  const int id = attr;
  if (algo == nullptr || buf == nullptr || id < 0 || id >= kAlgoAttrs ||
      sizeInBytes != kAlgoAttrSize[id])
    return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(algo_bytes(algo) + 8 + 4 * id, buf, sizeInBytes);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute(const cublasLtMatmulAlgo_t* algo,
                                                    cublasLtMatmulAlgoConfigAttributes_t attr,
                                                    void* buf, size_t sizeInBytes,
                                                    size_t* sizeWritten) {
  const int id = attr;
  if (algo == nullptr || id < 0 || id >= kAlgoAttrs) return CUBLAS_STATUS_INVALID_VALUE;
  if (sizeInBytes == 0) {
    if (sizeWritten == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *sizeWritten = kAlgoAttrSize[id];
    return CUBLAS_STATUS_SUCCESS;
  }
  if (buf == nullptr || sizeInBytes != kAlgoAttrSize[id]) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(buf, algo_bytes(algo) + 8 + 4 * id, sizeInBytes);
  if (sizeWritten) *sizeWritten = sizeInBytes;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t computeDesc,
                              const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                              const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                              const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo,
                              void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream) {
  // Runs at the call, after the stream's earlier work (later work on other streams that does not
  // wait for this one may therefore see its result early: this hides no ordering bug of the
  // inputs, only of the outputs' consumers).
  fp8pipe::cuda_emu::flush_stream(stream);
  if (!live<cublasLtContext>().has(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  LtProblem p;
  cublasStatus_t st = classify(computeDesc, Adesc, Bdesc, Cdesc, Ddesc, &p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  if (b != 0.0f && C == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  // In place (C == D) needs the same layout.
  if (C == D && (p.c.ld != p.d.ld || p.c.t != p.d.t || p.c.stride != p.d.stride))
    return CUBLAS_STATUS_INVALID_VALUE;
  // No algo: the implicit heuristic, for the actual pointers.
  const cublasLtMatmulAlgo_t chosen = algo
                                          ? *algo
                                          : make_algo({pointer_alignment(A), pointer_alignment(B),
                                                       pointer_alignment(C), pointer_alignment(D)});
  st = check_algo(chosen, p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  // Pointers must be as aligned as the algo was chosen for (C only when it is read).
  const auto al = algo_align(chosen);
  const void* ptrs[4] = {A, B, C, D};
  for (int i = 0; i < 4; ++i) {
    if ((i != 2 || b != 0.0f) && reinterpret_cast<uintptr_t>(ptrs[i]) % al[i] != 0)
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool block = p.fp8 && is_block_mode(p.mode_a);
  if (block) {  // FP8.md §3.3: block scales must be given and 16-byte aligned
    if (p.scale_a == nullptr || p.scale_b == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (reinterpret_cast<uintptr_t>(p.scale_a) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(p.scale_b) % 16 != 0)
      return CUBLAS_STATUS_NOT_SUPPORTED;
  } else if (reinterpret_cast<uintptr_t>(p.scale_a) % 4 != 0 ||
             reinterpret_cast<uintptr_t>(p.scale_b) % 4 != 0) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }

  // Everything the kernel would touch must be device memory; else an asynchronous fault.
  const char* api = "cublasLtMatmul";
  struct Span {
    const char* name;
    const void* ptr;
    const LtMatrix& mat;
    bool used;
  };
  const Span spans[] = {
      {"A", A, p.a, true}, {"B", B, p.b, true}, {"C", C, p.c, b != 0.0f}, {"D", D, p.d, true}};
  for (const Span& s : spans) {
    if (s.used && !matrix_on_device(s.ptr, s.mat.rows, s.mat.cols, s.mat.ld, s.mat.batch,
                                    s.mat.stride, elem_size(s.mat.t))) {
      raise_fault(cudaErrorIllegalAddress, matrix_str(api, s.name, s.ptr, s.mat.rows, s.mat.cols,
                                                      s.mat.ld, s.mat.batch, s.mat.stride)
                                               .c_str());
      return CUBLAS_STATUS_SUCCESS;
    }
  }
  if (p.fp8) {
    const struct {
      const char* name;
      const float* s;
      int32_t mode;
      int64_t rows;
    } scales[] = {{"A scale", p.scale_a, p.mode_a, p.m}, {"B scale", p.scale_b, p.mode_b, p.n}};
    for (const auto& s : scales) {
      if (!block && s.s == nullptr) continue;  // per-tensor default scale 1
      const int64_t floats = scale_floats(s.mode, s.rows, p.k);
      if (!is_device_range(s.s, static_cast<size_t>(floats) * sizeof(float))) {
        char msg[256];
        std::snprintf(msg, sizeof(msg),
                      "%s: %s (mode %d, %lld floats for %lld rows, k %lld) at %p is not inside a "
                      "device allocation",
                      api, s.name, s.mode, static_cast<long long>(floats),
                      static_cast<long long>(s.rows), static_cast<long long>(p.k),
                      static_cast<const void*>(s.s));
        raise_fault(cudaErrorIllegalAddress, msg);
        return CUBLAS_STATUS_SUCCESS;
      }
    }
  }
  if (workspace != nullptr && workspaceSizeInBytes > 0 &&
      !is_device_range(workspace, workspaceSizeInBytes)) {
    char msg[160];
    std::snprintf(msg, sizeof(msg),
                  "%s: workspace (%zu bytes) at %p is not inside a device allocation", api,
                  workspaceSizeInBytes, workspace);
    raise_fault(cudaErrorIllegalAddress, msg);
    return CUBLAS_STATUS_SUCCESS;
  }

  // Any splitK computes as splitK = 1: the emulator has no split-K numerics.
  if (p.fp8) {
    run_fp8(p, static_cast<const uint8_t*>(A), static_cast<const uint8_t*>(B), C, D, a, b);
  } else {
    const FloatGemm g{p.ta,
                      p.tb,
                      p.m,
                      p.n,
                      p.k,
                      p.batch,
                      {A, p.a.t, p.a.ld, p.a.stride},
                      {B, p.b.t, p.b.ld, p.b.stride},
                      {C, p.c.t, p.c.ld, p.c.stride},
                      {D, p.d.t, p.d.ld, p.d.stride},
                      a,
                      b,
                      Accum::kMulAdd};
    run_float_gemm(g);
  }
  return CUBLAS_STATUS_SUCCESS;
}
