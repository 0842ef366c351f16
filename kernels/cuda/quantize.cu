// Fused FP8 quantize kernels (1x128, 128x1 [+transpose], 128x128, per-tensor), dequantize and the
// exact 128x128 transpose, bit-identical to kernels/cpu/quantize.cc (FP8.md §2.1-2.3, §4).
//
// Design (memory-bound: every input byte is read once, every output byte written once):
// - amax is an integer max over |x| bit patterns (sign cleared). For non-NaN floats the unsigned
//   order of those bits is the order of |x|, and Inf/NaN sort above every finite value, so one
//   integer max is exact, order-independent and is the explicit NaN/Inf check of FP8.md §2.1
//   (no fmaxf). bf16 pairs are maxed per half-word with __vmaxu2 without unpacking.
// - Scale math uses __fdiv_rn and the code multiply __fmul_rn (FP8.md §4; the build also uses
//   -fmad=false). Encoding uses the hardware cvt.rn.satfinite.{e4m3,e5m2}x2.f32, which equals
//   fp8_codec.h's float_to_fp8(.., saturate) on all 2^32 inputs (checked by codec_check.cu).
// - 1x128 (the hot activation path): 16-byte vector loads; a warp covers one fp32 group (32 lanes
//   x 4) or two bf16 groups (16 lanes x 8) per load, and issues 4 independent loads (4 or 8 rows at
//   one k-block) before any use, so 64 B per lane are in flight. Group amax is a warp redux (fp32)
//   or 4 xor-shuffles (bf16). A 256-thread block covers 32 (fp32) / 64 (bf16) rows of one k-block,
//   so its scales s[kb*R + r] are written as one contiguous run. Blocks are ordered k-block
//   fastest, so neighbouring blocks stream adjacent 128-column segments of the same rows.
// - 128x1 (+transpose): 128x64 tiles staged through shared memory with 16-byte loads; each thread
//   owns 32 rows of one column (conflict-free column reads), 4 threads combine the amax through
//   shared memory, and the transposed output is written as 16-byte stores along qt's rows.
// - 128x128: one block per tile, the tile held in registers (64 values per thread), block amax via
//   warp redux + shared memory, then encode from registers.
// - Shapes whose rows are not 16-byte aligned fall back to scalar variants of the same kernels.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cuda/quantize.cuh"

namespace fp8pipe::kernels::gpu {
namespace {

constexpr int kG = 128;
constexpr int kThreads = 256;
constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;
constexpr uint32_t kQuietNaNBits = 0x7FC00000u;  // std::numeric_limits<float>::quiet_NaN()

// ---------------------------------------------------------------------------------------------
// Element helpers

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kPerVec = 4;  // per 16-byte vector
  __device__ static float f32(float v) { return v; }
  __device__ static uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }
};
template <>
struct Elem<uint16_t> {
  static constexpr int kPerVec = 8;
  __device__ static float f32(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  __device__ static uint32_t abs_bits(uint16_t v) {
    return (static_cast<uint32_t>(v) & 0x7FFFu) << 16;
  }
};

// Max |x| bits over one 16-byte vector.
__device__ __forceinline__ uint32_t vec_abs_max(const uint4& v, float*) {
  const uint32_t a = max(v.x & 0x7FFFFFFFu, v.y & 0x7FFFFFFFu);
  const uint32_t b = max(v.z & 0x7FFFFFFFu, v.w & 0x7FFFFFFFu);
  return max(a, b);
}
__device__ __forceinline__ uint32_t vec_abs_max(const uint4& v, uint16_t*) {
  const uint32_t m = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                              __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
  return max(m & 0xFFFFu, m >> 16) << 16;  // as fp32 bits
}

// Two floats -> two FP8 codes (lo in the low byte), RNE + SATFINITE, NaN -> 0x7F.
template <Fp8Format F>
__device__ __forceinline__ uint32_t cvt2(float lo, float hi) {
  uint16_t r;
#ifdef FP8PIPE_CUDA_EMU
  // No PTX on the CPU emulation: fp8_codec.h's encoder (codec_check.cu checks on a GPU that it
  // equals this instruction on all 2^32 inputs).
  r = static_cast<uint16_t>(float_to_fp8(lo, F, true) | (float_to_fp8(hi, F, true) << 8));
#else
  if constexpr (F == Fp8Format::kE4M3) {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  }
#endif
  return r;
}

// Encode one 16-byte input vector scaled by inv: 4 codes (fp32) in a uint32 or 8 (bf16) in a uint2.
template <Fp8Format F>
__device__ __forceinline__ uint32_t encode_vec(const uint4& v, float inv, float*) {
  const uint32_t lo =
      cvt2<F>(__fmul_rn(__uint_as_float(v.x), inv), __fmul_rn(__uint_as_float(v.y), inv));
  const uint32_t hi =
      cvt2<F>(__fmul_rn(__uint_as_float(v.z), inv), __fmul_rn(__uint_as_float(v.w), inv));
  return lo | (hi << 16);
}
template <Fp8Format F>
__device__ __forceinline__ uint32_t encode_bf16x4(uint32_t a, uint32_t b, float inv) {
  const uint32_t lo = cvt2<F>(__fmul_rn(__uint_as_float(a << 16), inv),
                              __fmul_rn(__uint_as_float(a & 0xFFFF0000u), inv));
  const uint32_t hi = cvt2<F>(__fmul_rn(__uint_as_float(b << 16), inv),
                              __fmul_rn(__uint_as_float(b & 0xFFFF0000u), inv));
  return lo | (hi << 16);
}
template <Fp8Format F>
__device__ __forceinline__ uint2 encode_vec(const uint4& v, float inv, uint16_t*) {
  return make_uint2(encode_bf16x4<F>(v.x, v.y, inv), encode_bf16x4<F>(v.z, v.w, inv));
}

template <Fp8Format F>
__device__ __forceinline__ uint8_t encode1(float x, float inv) {
  return static_cast<uint8_t>(cvt2<F>(__fmul_rn(x, inv), 0.0f) & 0xFFu);
}

// Two FP8 codes (lo byte first) -> two floats, exact. Decode through the hardware e4m3/e5m2 ->
// f16 -> f32 cvt (equal to fp8_to_float for all 256 codes: checked by codec_check.cu).
template <Fp8Format F>
__device__ __forceinline__ float2 decode2(uint16_t two) {
#ifdef FP8PIPE_CUDA_EMU
  // No PTX on the CPU emulation: fp8_codec.h's decoder (what codec_check.cu compares with this
  // instruction on a GPU).
  return make_float2(fp8_to_float(static_cast<uint8_t>(two & 0xFFu), F),
                     fp8_to_float(static_cast<uint8_t>(two >> 8), F));
#else
  uint32_t h2;
  if constexpr (F == Fp8Format::kE4M3) {
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(two));
  } else {
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(h2) : "h"(two));
  }
  __half2 h = *reinterpret_cast<__half2*>(&h2);
  return __half22float2(h);
#endif
}

// FP8.md §2.2 from the amax bits (as computed above); mirrors compute_scale() in quantize.cc.
struct Scale {
  float sf, inv;
  bool finite;
};
__device__ __forceinline__ Scale scale_from_bits(uint32_t m, bool pow2, float fmax) {
  if (m > kMaxFiniteBits) {
    const float nan = __uint_as_float(kQuietNaNBits);
    return {nan, nan, false};
  }
  const float amax = __uint_as_float(m);
  const float a = amax > 1e-4f ? amax : 1e-4f;
  const float t = __fdiv_rn(a, fmax);
  if (!pow2) return {t, __fdiv_rn(1.0f, t), true};
  const uint32_t b = __float_as_uint(t);
  const uint32_t e = (b >> 23) + ((b & 0x7FFFFFu) != 0u ? 1u : 0u);  // t > 0 normal: e in [1,254]
  return {__uint_as_float(e << 23), __uint_as_float((254u - e) << 23), true};
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(static_cast<const uint4*>(p));
}

inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }
inline int blocks_for(int64_t n, int64_t per) { return static_cast<int>((n + per - 1) / per); }

// Largest g in [0, n) with a[g] <= v (a non-decreasing from a[0] <= v): the group holding row v
// (a = offsets; an empty group is never chosen) or 128-row tile v (a = tiles).
__device__ __forceinline__ int find_group(const int32_t* a, int n, int64_t v) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (a[mid] <= v) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Where the 1x128 scale of (row r, k-block kb) lives: s[kb*R + r], or with row groups in the
// VEC128 layout of r's own group, which starts at off[g] * KB.
__device__ __forceinline__ int64_t vec_scale_index(int64_t r, int64_t kb, int64_t R, int64_t KB,
                                                   const GroupsDev& gr) {
  if (!gr.off) return kb * R + r;
  const int g = find_group(gr.off, gr.n, r);
  const int64_t o = gr.off[g], n = gr.off[g + 1] - o;
  return o * KB + kb * n + (r - o);
}

// ---------------------------------------------------------------------------------------------
// 1x128, vectorised. Requirements: cols % kPerVec == 0, x 16-byte aligned, q aligned to the
// per-lane output (4 B fp32, 8 B bf16).

constexpr int kLoads = 4;  // independent 16-byte loads per lane

template <class T, Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    q1x128_vec_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t KB, bool pow2,
                      GroupsDev gr, uint8_t* __restrict__ q, float* __restrict__ s,
                      int* nonfinite) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  constexpr int kLanesPerGroup = kG / kPerVec;           // 32 or 16
  constexpr int kGroupsPerLoad = 32 / kLanesPerGroup;    // 1 or 2
  constexpr int kRowsPerWarp = kGroupsPerLoad * kLoads;  // 4 or 8
  constexpr int kRowsPerBlock = kRowsPerWarp * (kThreads / 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / kLanesPerGroup, li = lane % kLanesPerGroup;
  const int64_t kb = blockIdx.x % KB;
  const int64_t r0 = (blockIdx.x / KB) * kRowsPerBlock + warp * kRowsPerWarp + sub;
  const int64_t c = kb * kG + li * kPerVec;
  const bool col_ok = c < C;

  uint4 v[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int64_t r = r0 + j * kGroupsPerLoad;
    v[j] = (col_ok && r < R) ? ldg16(x + r * C + c) : make_uint4(0, 0, 0, 0);
  }
  const float fmax = fp8_max(F);
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int64_t r = r0 + j * kGroupsPerLoad;
    uint32_t m = vec_abs_max(v[j], static_cast<T*>(nullptr));
    if constexpr (kLanesPerGroup == 32) {
      m = __reduce_max_sync(0xFFFFFFFFu, m);
    } else {
#pragma unroll
      for (int o = kLanesPerGroup / 2; o > 0; o >>= 1)
        m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    }
    const Scale sc = scale_from_bits(m, pow2, fmax);
    if (r < R) {
      if (li == 0) {
        s[vec_scale_index(r, kb, R, KB, gr)] = sc.sf;
        if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
      }
      if (col_ok) {
        auto out = encode_vec<F>(v[j], sc.inv, static_cast<T*>(nullptr));
        *reinterpret_cast<decltype(out)*>(q + r * C + c) = out;
      }
    }
  }
}

// 1x128, scalar fallback: one warp per group, each lane 4 elements (strided by 32).
template <class T, Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    q1x128_scalar_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t KB, bool pow2,
                         GroupsDev gr, uint8_t* __restrict__ q, float* __restrict__ s,
                         int* nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (g >= R * KB) return;
  const int64_t kb = g % KB, r = g / KB;
  float xv[4];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = kb * kG + lane + 32 * i;
    const T e = c < C ? x[r * C + c] : T(0);
    xv[i] = Elem<T>::f32(e);
    m = max(m, Elem<T>::abs_bits(e));
  }
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  const Scale sc = scale_from_bits(m, pow2, fp8_max(F));
  if (lane == 0) {
    s[vec_scale_index(r, kb, R, KB, gr)] = sc.sf;
    if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = kb * kG + lane + 32 * i;
    if (c < C) q[r * C + c] = encode1<F>(xv[i], sc.inv);
  }
}

// ---------------------------------------------------------------------------------------------
// 128x1 groups (a scale per row-block per column), optionally writing the codes transposed.
// Tile: 128 rows x 64 columns through shared memory. Thread t owns column t%64, rows
// (t/64)*32 .. +32 of the tile.

constexpr int kTc = 64;

// An FP8 1x128 input (kFp8In): codes [R][C] and the VEC128 scales of quantize_groups' layout
// (a group's s[kb * n + r] from its first row's offset * KB); the tile holds decode(q) * s, the
// dequantized values (dequant_kernel's bits), so requantizing needs no fp32 copy in memory.
struct Fp8Src {
  const uint8_t* q = nullptr;
  const float* s = nullptr;
  Fp8Format fmt = Fp8Format::kE4M3;
};

__device__ __forceinline__ float2 decode2_any(uint16_t two, Fp8Format f) {
  return f == Fp8Format::kE4M3 ? decode2<Fp8Format::kE4M3>(two) : decode2<Fp8Format::kE5M2>(two);
}

template <class T, Fp8Format F, bool kTranspose, bool kFp8In = false>
__global__ void __launch_bounds__(kThreads)
    q128x1_kernel(const T* __restrict__ x, int64_t R, int64_t C, bool pow2, bool vec_in,
                  bool vec_out, GroupsDev gr, uint8_t* __restrict__ q, float* __restrict__ s,
                  int* nonfinite, Fp8Src src) {
  static_assert(!kFp8In || std::is_same_v<T, float>, "FP8 input dequantizes to fp32");
  constexpr int kPerVec = Elem<T>::kPerVec;
  constexpr int kVecPerRow = kTc / kPerVec;  // 16 (fp32) or 8 (bf16)
  __shared__ __align__(16) T tile[kG][kTc];
  __shared__ uint32_t red[kThreads / kTc][kTc];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTc;
  // The tile's group: rows gbeg .. gbeg + gn (ungrouped: all R rows), tiled by 128 from its first
  // row; rb is the tile's row block within the group, whose scales start at row block tbase.
  int64_t gbeg = 0, gn = R, rb = blockIdx.y, tbase = 0;
  if (gr.off) {
    const int g = find_group(gr.tiles, gr.n, blockIdx.y);
    gbeg = gr.off[g];
    gn = gr.off[g + 1] - gbeg;
    tbase = gr.tiles[g];
    rb = blockIdx.y - tbase;
  }
  const int64_t l0 = rb * kG;  // the tile's first row within the group
  const T* xg = x + gbeg * C;
  const int t = threadIdx.x;

  if constexpr (kFp8In) {
    // The tile's 64 columns lie in one k-block: one scale per row. vec_in: 4 codes per load.
    const int64_t KB = (C + kG - 1) / kG;
    const float* sg = src.s + gbeg * KB + (c0 / kG) * gn;  // by row within the group
    const uint8_t* qg = src.q + gbeg * C;
    if (vec_in) {
      for (int idx = t; idx < kG * kTc / 4; idx += kThreads) {
        const int row = idx / (kTc / 4), cv = (idx % (kTc / 4)) * 4;
        const int64_t r = l0 + row, c = c0 + cv;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < gn && c < C) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(qg + r * C + c);
          const float sf = sg[r];
          const float2 a = decode2_any(static_cast<uint16_t>(w & 0xFFFFu), src.fmt);
          const float2 b = decode2_any(static_cast<uint16_t>(w >> 16), src.fmt);
          v = make_float4(__fmul_rn(a.x, sf), __fmul_rn(a.y, sf), __fmul_rn(b.x, sf),
                          __fmul_rn(b.y, sf));
        }
        *reinterpret_cast<float4*>(&tile[row][cv]) = v;
      }
    } else {
      for (int idx = t; idx < kG * kTc; idx += kThreads) {
        const int row = idx / kTc, col = idx % kTc;
        const int64_t r = l0 + row, c = c0 + col;
        tile[row][col] =
            (r < gn && c < C) ? __fmul_rn(decode2_any(qg[r * C + c], src.fmt).x, sg[r]) : 0.0f;
      }
    }
  } else if (vec_in) {
    constexpr int kIters = kG * kVecPerRow / kThreads;  // 8 or 4
    uint4 v[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int idx = i * kThreads + t, row = idx / kVecPerRow, cv = (idx % kVecPerRow) * kPerVec;
      const int64_t r = l0 + row, c = c0 + cv;
      v[i] = (r < gn && c < C) ? ldg16(xg + r * C + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int idx = i * kThreads + t, row = idx / kVecPerRow, cv = (idx % kVecPerRow) * kPerVec;
      *reinterpret_cast<uint4*>(&tile[row][cv]) = v[i];
    }
  } else {
    for (int idx = t; idx < kG * kTc; idx += kThreads) {
      const int row = idx / kTc, col = idx % kTc;
      const int64_t r = l0 + row, c = c0 + col;
      tile[row][col] = (r < gn && c < C) ? xg[r * C + c] : T(0);
    }
  }
  __syncthreads();

  const int col = t % kTc, part = t / kTc;  // part: rows part*32 .. +32
  float xv[32];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const T e = tile[part * 32 + i][col];
    xv[i] = Elem<T>::f32(e);
    m = max(m, Elem<T>::abs_bits(e));
  }
  red[part][col] = m;
  __syncthreads();
  m = max(max(red[0][col], red[1][col]), max(red[2][col], red[3][col]));
  const Scale sc = scale_from_bits(m, pow2, fp8_max(F));
  const int64_t c = c0 + col;
  if (c >= C) return;
  if (part == 0) {
    s[(tbase + rb) * C + c] = sc.sf;
    if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
  }
  const int64_t lr = l0 + part * 32;  // first row (within the group) of this thread's run
  if constexpr (kTranspose) {
    uint8_t* out = q + C * gbeg + c * gn + lr;  // the group's qt[c][lr .. lr+32)
    if (vec_out && gn % 16 == 0 && (C * gbeg) % 16 == 0 && lr + 32 <= gn) {
      uint32_t w[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        w[i] = cvt2<F>(__fmul_rn(xv[4 * i], sc.inv), __fmul_rn(xv[4 * i + 1], sc.inv)) |
               (cvt2<F>(__fmul_rn(xv[4 * i + 2], sc.inv), __fmul_rn(xv[4 * i + 3], sc.inv)) << 16);
      }
      reinterpret_cast<uint4*>(out)[0] = make_uint4(w[0], w[1], w[2], w[3]);
      reinterpret_cast<uint4*>(out)[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        if (lr + i < gn) out[i] = encode1<F>(xv[i], sc.inv);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      if (lr + i < gn) q[(gbeg + lr + i) * C + c] = encode1<F>(xv[i], sc.inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 128x128 blocks: one thread block per tile (blockIdx.x = kb, blockIdx.y = rb).

__device__ __forceinline__ uint32_t block_max(uint32_t m, uint32_t* red8) {
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  if ((threadIdx.x & 31) == 0) red8[threadIdx.x >> 5] = m;
  __syncthreads();
  m = red8[0];
#pragma unroll
  for (int i = 1; i < kThreads / 32; ++i) m = max(m, red8[i]);
  return m;
}

__device__ __forceinline__ void write_block_scale(const Scale& sc, float* s, int64_t rb, int64_t kb,
                                                  int64_t KB, int* nonfinite) {
  if (threadIdx.x != 0) return;
  const int64_t ld = (KB + 3) / 4 * 4;
  s[rb * ld + kb] = sc.sf;
  if (kb == KB - 1) {
    for (int64_t k = KB; k < ld; ++k) s[rb * ld + k] = 0.0f;  // padding, as the CPU writes it
  }
  if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
}

template <class T, Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    q128x128_vec_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t KB, bool pow2,
                        uint8_t* __restrict__ q, float* __restrict__ s, int* nonfinite,
                        const T* const* xs = nullptr) {
  if (xs) {  // batch: tensor blockIdx.z of a pointer table, outputs stacked
    x = xs[blockIdx.z];
    q += static_cast<int64_t>(blockIdx.z) * R * C;
    s += static_cast<int64_t>(blockIdx.z) * ((R + kG - 1) / kG) * ((KB + 3) / 4 * 4);
  }
  constexpr int kPerVec = Elem<T>::kPerVec;
  constexpr int kLanesPerRow = kG / kPerVec;       // 32 or 16
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;  // rows a warp covers per load: 1 or 2
  constexpr int kRowsPerIter = kRowsPerLoad * (kThreads / 32);  // 8 or 16
  constexpr int kIters = kG / kRowsPerIter;                     // 16 or 8
  __shared__ uint32_t red8[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t kb = blockIdx.x, rb = blockIdx.y;
  const int64_t c = kb * kG + (lane % kLanesPerRow) * kPerVec;
  const int64_t rbase = rb * kG + warp * kRowsPerLoad + lane / kLanesPerRow;
  const bool col_ok = c < C;
  uint4 v[kIters];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int64_t r = rbase + i * kRowsPerIter;
    v[i] = (col_ok && r < R) ? ldg16(x + r * C + c) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < kIters; ++i) m = max(m, vec_abs_max(v[i], static_cast<T*>(nullptr)));
  const Scale sc = scale_from_bits(block_max(m, red8), pow2, fp8_max(F));
  write_block_scale(sc, s, rb, kb, KB, nonfinite);
  if (!col_ok) return;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int64_t r = rbase + i * kRowsPerIter;
    if (r < R) {
      auto out = encode_vec<F>(v[i], sc.inv, static_cast<T*>(nullptr));
      *reinterpret_cast<decltype(out)*>(q + r * C + c) = out;
    }
  }
}

template <class T, Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    q128x128_scalar_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t KB, bool pow2,
                           uint8_t* __restrict__ q, float* __restrict__ s, int* nonfinite,
                           const T* const* xs = nullptr) {
  if (xs) {  // batch: as q128x128_vec_kernel
    x = xs[blockIdx.z];
    q += static_cast<int64_t>(blockIdx.z) * R * C;
    s += static_cast<int64_t>(blockIdx.z) * ((R + kG - 1) / kG) * ((KB + 3) / 4 * 4);
  }
  __shared__ uint32_t red8[kThreads / 32];
  const int64_t kb = blockIdx.x, rb = blockIdx.y;
  uint32_t m = 0;
  for (int idx = threadIdx.x; idx < kG * kG; idx += kThreads) {
    const int64_t r = rb * kG + idx / kG, c = kb * kG + idx % kG;
    if (r < R && c < C) m = max(m, Elem<T>::abs_bits(x[r * C + c]));
  }
  const Scale sc = scale_from_bits(block_max(m, red8), pow2, fp8_max(F));
  write_block_scale(sc, s, rb, kb, KB, nonfinite);
  for (int idx = threadIdx.x; idx < kG * kG; idx += kThreads) {
    const int64_t r = rb * kG + idx / kG, c = kb * kG + idx % kG;
    if (r < R && c < C) q[r * C + c] = encode1<F>(Elem<T>::f32(x[r * C + c]), sc.inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-tensor: amax pass (atomicMax of |x| bits into *amax_bits, which is s[0]), encode pass, then a
// one-thread finalize that turns s[0] into the scale. Vector paths need x 16-byte aligned and q
// aligned to the per-vector output; n % kPerVec tail elements are handled by scalar code.

template <class T>
__global__ void __launch_bounds__(kThreads)
    amax_tensor_kernel(const T* __restrict__ x, int64_t n, bool vec, uint32_t* amax_bits) {
  __shared__ uint32_t red8[kThreads / 32];
  constexpr int kPerVec = Elem<T>::kPerVec;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  uint32_t m = 0;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / kPerVec;
    for (int64_t i = tid; i < nv; i += stride)
      m = max(m, vec_abs_max(ldg16(x + i * kPerVec), static_cast<T*>(nullptr)));
    done = nv * kPerVec;
  }
  for (int64_t i = done + tid; i < n; i += stride) m = max(m, Elem<T>::abs_bits(x[i]));
  m = block_max(m, red8);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax_bits, m);
}

template <class T, Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    encode_tensor_kernel(const T* __restrict__ x, int64_t n, bool vec, bool pow2,
                         const uint32_t* amax_bits, uint8_t* __restrict__ q) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  const Scale sc = scale_from_bits(*amax_bits, pow2, fp8_max(F));
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / kPerVec;
    for (int64_t i = tid; i < nv; i += stride) {
      auto out = encode_vec<F>(ldg16(x + i * kPerVec), sc.inv, static_cast<T*>(nullptr));
      *reinterpret_cast<decltype(out)*>(q + i * kPerVec) = out;
    }
    done = nv * kPerVec;
  }
  for (int64_t i = done + tid; i < n; i += stride) q[i] = encode1<F>(Elem<T>::f32(x[i]), sc.inv);
}

__global__ void finalize_tensor_kernel(float* s, bool pow2, float fmax, int* nonfinite) {
  const Scale sc = scale_from_bits(__float_as_uint(s[0]), pow2, fmax);
  s[0] = sc.sf;
  if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
}

// ---------------------------------------------------------------------------------------------
// Dequantize: out = f32(decode(q) * s), decode2 above.

__device__ __forceinline__ float scale_at(const float* s, Granularity g, int64_t R, int64_t C,
                                          int64_t r, int64_t c, const GroupsDev& gr) {
  switch (g) {
    case Granularity::k1x128:
      return s[vec_scale_index(r, c / kG, R, (C + kG - 1) / kG, gr)];
    case Granularity::k128x1:
      return s[(r / kG) * C + c];
    case Granularity::k128x128:
      return s[(r / kG) * (((C + kG - 1) / kG + 3) / 4 * 4) + c / kG];
    case Granularity::kPerTensor:
      break;
  }
  return s[0];
}

template <Fp8Format F>
__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ s, int64_t R, int64_t C,
                   Granularity g, bool vec, GroupsDev gr, float* __restrict__ out) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  if (vec) {  // C % 4 == 0: 4 codes (one uint32) -> float4
    const int64_t C4 = C / 4, n4 = R * C4;
    for (int64_t i = tid; i < n4; i += stride) {
      const int64_t r = i / C4, c = (i % C4) * 4;
      const uint32_t w = reinterpret_cast<const uint32_t*>(q)[i];
      const float2 a = decode2<F>(static_cast<uint16_t>(w & 0xFFFFu));
      const float2 b = decode2<F>(static_cast<uint16_t>(w >> 16));
      float4 o;
      if (g == Granularity::k128x1) {
        o = make_float4(__fmul_rn(a.x, scale_at(s, g, R, C, r, c, gr)),
                        __fmul_rn(a.y, scale_at(s, g, R, C, r, c + 1, gr)),
                        __fmul_rn(b.x, scale_at(s, g, R, C, r, c + 2, gr)),
                        __fmul_rn(b.y, scale_at(s, g, R, C, r, c + 3, gr)));
      } else {
        const float sf = scale_at(s, g, R, C, r, c, gr);  // 4 | 128: one group
        o = make_float4(__fmul_rn(a.x, sf), __fmul_rn(a.y, sf), __fmul_rn(b.x, sf),
                        __fmul_rn(b.y, sf));
      }
      reinterpret_cast<float4*>(out)[i] = o;
    }
    return;
  }
  for (int64_t i = tid; i < R * C; i += stride) {
    const int64_t r = i / C, c = i % C;
    out[i] = __fmul_rn(decode2<F>(q[i]).x, scale_at(s, g, R, C, r, c, gr));
  }
}

// ---------------------------------------------------------------------------------------------
// FP8 row gather into the grouped 1x128 layout (gather_fp8_rows): codes 16 bytes per thread when
// rows are 16-byte multiples, scales one per (row, k-block) into the row's group's VEC128 place.

__global__ void __launch_bounds__(kThreads)
    gather_fp8_rows_kernel(const uint8_t* __restrict__ q, const float* __restrict__ s, int64_t n,
                           int64_t K, GroupsDev in_gr, const int32_t* __restrict__ rows,
                           const int32_t* __restrict__ pad, int64_t M, GroupsDev gr,
                           float zero_scale, bool vec, uint8_t* __restrict__ out,
                           float* __restrict__ so) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  auto source = [&](int64_t r) -> int64_t {
    const int64_t i = pad ? pad[r] : r;
    return i < 0 ? -1 : rows[i];
  };
  const int64_t nv = vec ? K / 16 : K;
  for (int64_t i = tid; i < M * nv; i += stride) {
    const int64_t r = i / nv, c = i - r * nv, src = source(r);
    if (vec) {
      reinterpret_cast<uint4*>(out + r * K)[c] =
          src < 0 ? make_uint4(0, 0, 0, 0) : ldg16(q + src * K + c * 16);
    } else {
      out[r * K + c] = src < 0 ? uint8_t{0} : q[src * K + c];
    }
  }
  const int64_t KB = (K + kG - 1) / kG;
  for (int64_t i = tid; i < M * KB; i += stride) {
    const int64_t r = i / KB, kb = i - r * KB, src = source(r);
    so[vec_scale_index(r, kb, M, KB, gr)] =
        src < 0 ? zero_scale : s[vec_scale_index(src, kb, n, KB, in_gr)];
  }
}

// ---------------------------------------------------------------------------------------------
// Exact byte transpose (32x32 tiles) and block-scale transpose of a 128x128-quantized tensor.

__global__ void transpose_bytes_kernel(const uint8_t* __restrict__ q, int64_t R, int64_t C,
                                       uint8_t* __restrict__ qt) {
  q += static_cast<int64_t>(blockIdx.z) * R * C;  // batch: stacked tensors
  qt += static_cast<int64_t>(blockIdx.z) * R * C;
  __shared__ uint8_t tile[32][33];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32,
                r0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int64_t r = r0 + ty + i, c = c0 + tx;
    if (r < R && c < C) tile[ty + i][tx] = q[r * C + c];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int64_t c = c0 + ty + i, r = r0 + tx;
    if (r < R && c < C) qt[c * R + r] = tile[tx][ty + i];
  }
}

__global__ void transpose_block_scales_kernel(const float* __restrict__ s, int64_t RB, int64_t KB,
                                              float* __restrict__ st) {
  const int64_t ld = (KB + 3) / 4 * 4, ldt = (RB + 3) / 4 * 4;
  s += static_cast<int64_t>(blockIdx.y) * RB * ld;  // batch: stacked tensors
  st += static_cast<int64_t>(blockIdx.y) * KB * ldt;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // over KB x ldt
  if (i >= KB * ldt) return;
  const int64_t kb = i / ldt, rb = i % ldt;
  st[i] = rb < RB ? s[rb * ld + kb] : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Host dispatch

template <class T, Fp8Format F>
Result quantize_t(const T* x, int64_t R, int64_t C, Granularity g, QuantParams p, uint8_t* q,
                  float* s, int* nonfinite, cudaStream_t st, GroupsDev gr = {}) {
  constexpr int kPerVec = Elem<T>::kPerVec;
  const int64_t KB = ceil_div(C, kG), RB = ceil_div(R, kG);
  const size_t out_align = kPerVec;  // bytes of codes per 16-byte input vector
  switch (g) {
    case Granularity::k1x128: {
      if (C % kPerVec == 0 && aligned(x, 16) && aligned(q, out_align)) {
        constexpr int64_t kRowsPerBlock = (32 / (kG / kPerVec)) * kLoads * (kThreads / 32);
        const int64_t nb = ceil_div(R, kRowsPerBlock) * KB;
        FP8PIPE_REQUIRE(nb < (1ll << 31), "quantize 1x128: tensor too large for one launch");
        FP8PIPE_KERNEL(static_cast<int>(nb), kThreads, st, q1x128_vec_kernel<T, F>)
        (x, R, C, KB, p.pow2, gr, q, s, nonfinite);
      } else {
        const int64_t nb = ceil_div(R * KB, kThreads / 32);
        FP8PIPE_REQUIRE(nb < (1ll << 31), "quantize 1x128: tensor too large for one launch");
        FP8PIPE_KERNEL(static_cast<int>(nb), kThreads, st, q1x128_scalar_kernel<T, F>)
        (x, R, C, KB, p.pow2, gr, q, s, nonfinite);
      }
      break;
    }
    case Granularity::k128x1: {
      FP8PIPE_REQUIRE(RB <= 65535 && ceil_div(C, kTc) < (1ll << 31),
                      "quantize 128x1: too many rows");
      const dim3 grid(static_cast<unsigned>(ceil_div(C, kTc)), static_cast<unsigned>(RB));
      const bool vec_in = C % kPerVec == 0 && aligned(x, 16);
      FP8PIPE_KERNEL(grid, kThreads, st, q128x1_kernel<T, F, false>)
      (x, R, C, p.pow2, vec_in, false, GroupsDev{}, q, s, nonfinite, Fp8Src{});
      break;
    }
    case Granularity::k128x128: {
      FP8PIPE_REQUIRE(RB <= 65535 && KB < (1ll << 31), "quantize 128x128: too many rows");
      const dim3 grid(static_cast<unsigned>(KB), static_cast<unsigned>(RB));
      if (C % kPerVec == 0 && aligned(x, 16) && aligned(q, out_align)) {
        FP8PIPE_KERNEL(grid, kThreads, st, q128x128_vec_kernel<T, F>)
        (x, R, C, KB, p.pow2, q, s, nonfinite, nullptr);
      } else {
        FP8PIPE_KERNEL(grid, kThreads, st, q128x128_scalar_kernel<T, F>)
        (x, R, C, KB, p.pow2, q, s, nonfinite, nullptr);
      }
      break;
    }
    case Granularity::kPerTensor: {
      const int64_t n = R * C;
      const bool vec = aligned(x, 16) && aligned(q, out_align);
      FP8PIPE_CUDA_TRY(cudaMemsetAsync(s, 0, sizeof(float), st));
      const int grid =
          static_cast<int>(std::min<int64_t>(ceil_div(n, kThreads * kPerVec), 132 * 16));
      auto* amax = reinterpret_cast<uint32_t*>(s);
      if (grid > 0) {
        FP8PIPE_KERNEL(grid, kThreads, st, amax_tensor_kernel<T>)(x, n, vec, amax);
        FP8PIPE_CUDA_LAUNCH_CHECK();
        FP8PIPE_KERNEL(grid, kThreads, st, encode_tensor_kernel<T, F>)(x, n, vec, p.pow2, amax, q);
        FP8PIPE_CUDA_LAUNCH_CHECK();
      }
      FP8PIPE_KERNEL(1, 1, st, finalize_tensor_kernel)(s, p.pow2, fp8_max(F), nonfinite);
      break;
    }
  }
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

template <class T>
Result quantize_any(const T* x, int64_t R, int64_t C, Granularity g, QuantParams p, uint8_t* q,
                    float* s, int* nonfinite, cudaStream_t st, GroupsDev gr = {}) {
  if (R <= 0 || C <= 0) {  // as the CPU: no codes; per-tensor s[0] is the scale of amax 0
    const int64_t ns = std::max<int64_t>(0, scale_count(g, R, C));
    if (ns > 0) FP8PIPE_CUDA_TRY(cudaMemsetAsync(s, 0, ns * sizeof(float), st));
    if (g == Granularity::kPerTensor) {
      FP8PIPE_KERNEL(1, 1, st, finalize_tensor_kernel)(s, p.pow2, fp8_max(p.fmt), nullptr);
      FP8PIPE_CUDA_LAUNCH_CHECK();
    }
    return Result::Ok();
  }
  if (p.fmt == Fp8Format::kE4M3)
    return quantize_t<T, Fp8Format::kE4M3>(x, R, C, g, p, q, s, nonfinite, st, gr);
  return quantize_t<T, Fp8Format::kE5M2>(x, R, C, g, p, q, s, nonfinite, st, gr);
}

template <class T, Fp8Format F>
Result q128x1_t_launch(const T* x, int64_t R, int64_t C, QuantParams p, uint8_t* qt, float* s,
                       int* nonfinite, cudaStream_t st, GroupsDev gr = {}, int64_t tiles = 0) {
  // One block row per 128-row tile: of the tensor, or of each group (`tiles` in all).
  const int64_t RB = gr.off ? tiles : ceil_div(R, kG);
  FP8PIPE_REQUIRE(RB <= 65535 && ceil_div(C, kTc) < (1ll << 31), "quantize 128x1: too many rows");
  if (RB == 0) return Result::Ok();
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kTc)), static_cast<unsigned>(RB));
  const bool vec_in = C % Elem<T>::kPerVec == 0 && aligned(x, 16);
  const bool vec_out = R % 16 == 0 && aligned(qt, 16);  // grouped: each group's rows checked too
  FP8PIPE_KERNEL(grid, kThreads, st, q128x1_kernel<T, F, true>)
  (x, R, C, p.pow2, vec_in, vec_out, gr, qt, s, nonfinite, Fp8Src{});
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

// The 128x1 transposed quantization of an FP8 1x128 tensor (or of its row groups), dequantized
// in the tile.
template <Fp8Format F>
Result requant_t_launch(const Fp8Src& src, int64_t R, int64_t C, GroupsDev gr, int64_t tiles,
                        QuantParams p, uint8_t* qt, float* s, int* nonfinite, cudaStream_t st) {
  FP8PIPE_REQUIRE(tiles <= 65535 && ceil_div(C, kTc) < (1ll << 31), "requantize: too many rows");
  if (tiles == 0) return Result::Ok();
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kTc)), static_cast<unsigned>(tiles));
  const bool vec_in = C % 4 == 0 && aligned(src.q, 4);
  const bool vec_out = R % 16 == 0 && aligned(qt, 16);
  FP8PIPE_KERNEL(grid, kThreads, st, q128x1_kernel<float, F, true, true>)
  (nullptr, R, C, p.pow2, vec_in, vec_out, gr, qt, s, nonfinite, src);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

template <class T>
Result q128x1_t_any(const T* x, int64_t R, int64_t C, QuantParams p, uint8_t* qt, float* s,
                    int* nonfinite, cudaStream_t st, GroupsDev gr = {}, int64_t tiles = 0) {
  if (R <= 0 || C <= 0) return Result::Ok();  // as the CPU
  if (p.fmt == Fp8Format::kE4M3)
    return q128x1_t_launch<T, Fp8Format::kE4M3>(x, R, C, p, qt, s, nonfinite, st, gr, tiles);
  return q128x1_t_launch<T, Fp8Format::kE5M2>(x, R, C, p, qt, s, nonfinite, st, gr, tiles);
}

}  // namespace

Result quantize(const float* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                uint8_t* q, float* s, int* nonfinite, cudaStream_t stream) {
  return quantize_any(x, rows, cols, g, p, q, s, nonfinite, stream);
}

Result quantize_bf16(const uint16_t* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                     uint8_t* q, float* s, int* nonfinite, cudaStream_t stream) {
  return quantize_any(x, rows, cols, g, p, q, s, nonfinite, stream);
}

Result quantize_128x1_transposed(const float* x, int64_t rows, int64_t cols, QuantParams p,
                                 uint8_t* qt, float* s, int* nonfinite, cudaStream_t stream) {
  return q128x1_t_any(x, rows, cols, p, qt, s, nonfinite, stream);
}

Result quantize_128x1_transposed_bf16(const uint16_t* x, int64_t rows, int64_t cols, QuantParams p,
                                      uint8_t* qt, float* s, int* nonfinite, cudaStream_t stream) {
  return q128x1_t_any(x, rows, cols, p, qt, s, nonfinite, stream);
}

namespace {
Result dequantize_any(const uint8_t* q, const float* s, int64_t rows, int64_t cols, Granularity g,
                      Fp8Format fmt, float* out, cudaStream_t stream, GroupsDev gr) {
  if (rows <= 0 || cols <= 0) return Result::Ok();
  const bool vec = cols % 4 == 0 && aligned(q, 4) && aligned(out, 16);
  const int grid =
      static_cast<int>(std::min<int64_t>(ceil_div(rows * cols, kThreads * 4), 132 * 32));
  if (fmt == Fp8Format::kE4M3) {
    FP8PIPE_KERNEL(grid, kThreads, stream, dequant_kernel<Fp8Format::kE4M3>)
    (q, s, rows, cols, g, vec, gr, out);
  } else {
    FP8PIPE_KERNEL(grid, kThreads, stream, dequant_kernel<Fp8Format::kE5M2>)
    (q, s, rows, cols, g, vec, gr, out);
  }
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}
}  // namespace

Result dequantize(const uint8_t* q, const float* s, int64_t rows, int64_t cols, Granularity g,
                  Fp8Format fmt, float* out, cudaStream_t stream) {
  return dequantize_any(q, s, rows, cols, g, fmt, out, stream, GroupsDev{});
}

// ---------------------------------------------------------------------------------------------
// E5M6 1x128 (the attention-output cache). Two launches, so that any shape works: a warp per
// group writes its scale (as q1x128_scalar_kernel, fmax 65024, pow2), then a thread per pair of
// elements encodes both into their three bytes (a pair may straddle rows when cols is odd).
// The inverse scale is 1/sf, exact for a power of two, so the codes are the CPU's.

namespace {
template <class T>
__global__ void __launch_bounds__(kThreads)
    e5m6_scale_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t KB,
                      float* __restrict__ s, int* nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (g >= R * KB) return;
  const int64_t kb = g % KB, r = g / KB;
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = kb * kG + lane + 32 * i;
    if (c < C) m = max(m, Elem<T>::abs_bits(x[r * C + c]));
  }
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  const Scale sc = scale_from_bits(m, /*pow2=*/true, kE5M6Max);
  if (lane == 0) {
    s[kb * R + r] = sc.sf;
    if (!sc.finite && nonfinite) atomicAdd(nonfinite, 1);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    e5m6_encode_kernel(const T* __restrict__ x, int64_t R, int64_t C, const float* __restrict__ s,
                       uint8_t* __restrict__ packed) {
  const int64_t n = R * C, pairs = (n + 1) / 2;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < pairs;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    uint16_t code[2] = {0, 0};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = 2 * j + h;
      if (i < n) {
        const int64_t r = i / C, c = i % C;
        const float inv = __fdiv_rn(1.0f, s[(c / kG) * R + r]);
        code[h] = float_to_e5m6(__fmul_rn(Elem<T>::f32(x[i]), inv));
      }
    }
    uint8_t b[3];
    e5m6_pack_pair(code[0], code[1], b);
    uint8_t* p = packed + 3 * j;
    p[0] = b[0];
    p[1] = b[1];
    if (2 * j + 1 < n) p[2] = b[2];
  }
}

__global__ void __launch_bounds__(kThreads)
    e5m6_dequant_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ s, int64_t R,
                        int64_t C, float* __restrict__ out) {
  const int64_t n = R * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / C, c = i % C;
    out[i] = __fmul_rn(e5m6_to_float(e5m6_load(packed, i)), s[(c / kG) * R + r]);
  }
}

int grid_for(int64_t items) {
  return static_cast<int>(std::min<int64_t>(ceil_div(items, kThreads), 132 * 32));
}

template <class T>
Result quantize_e5m6_any(const T* x, int64_t R, int64_t C, uint8_t* packed, float* s,
                         int* nonfinite, cudaStream_t stream) {
  if (R <= 0 || C <= 0) return Result::Ok();
  const int64_t KB = ceil_div(C, kG);
  FP8PIPE_KERNEL(blocks_for(R * KB, kThreads / 32), kThreads, stream, e5m6_scale_kernel<T>)
  (x, R, C, KB, s, nonfinite);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  FP8PIPE_KERNEL(grid_for((R * C + 1) / 2), kThreads, stream, e5m6_encode_kernel<T>)
  (x, R, C, s, packed);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}
}  // namespace

Result quantize_e5m6(const float* x, int64_t rows, int64_t cols, uint8_t* packed, float* s,
                     int* nonfinite, cudaStream_t stream) {
  return quantize_e5m6_any(x, rows, cols, packed, s, nonfinite, stream);
}
Result quantize_e5m6_bf16(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* packed, float* s,
                          int* nonfinite, cudaStream_t stream) {
  return quantize_e5m6_any(x, rows, cols, packed, s, nonfinite, stream);
}
Result dequantize_e5m6(const uint8_t* packed, const float* s, int64_t rows, int64_t cols,
                       float* out, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return Result::Ok();
  FP8PIPE_KERNEL(grid_for(rows * cols), kThreads, stream, e5m6_dequant_kernel)
  (packed, s, rows, cols, out);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result quantize_1x128_groups(const float* x, int64_t rows, int64_t cols, GroupsDev groups,
                             QuantParams p, uint8_t* q, float* s, int* nonfinite,
                             cudaStream_t stream) {
  return quantize_any(x, rows, cols, Granularity::k1x128, p, q, s, nonfinite, stream, groups);
}

Result quantize_128x1_transposed_groups(const float* x, int64_t rows, int64_t cols,
                                        GroupsDev groups, int64_t tiles, QuantParams p, uint8_t* qt,
                                        float* s, int* nonfinite, cudaStream_t stream) {
  return q128x1_t_any(x, rows, cols, p, qt, s, nonfinite, stream, groups, tiles);
}

Result requantize_128x1_transposed_groups(const uint8_t* q, const float* s, Fp8Format in_fmt,
                                          int64_t rows, int64_t cols, GroupsDev groups,
                                          int64_t tiles, QuantParams p, uint8_t* qt, float* so,
                                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return Result::Ok();
  const Fp8Src src{q, s, in_fmt};
  if (p.fmt == Fp8Format::kE4M3) {
    return requant_t_launch<Fp8Format::kE4M3>(src, rows, cols, groups, tiles, p, qt, so, nullptr,
                                              stream);
  }
  return requant_t_launch<Fp8Format::kE5M2>(src, rows, cols, groups, tiles, p, qt, so, nullptr,
                                            stream);
}

Result requantize_128x1_transposed(const uint8_t* q, const float* s, Fp8Format in_fmt, int64_t rows,
                                   int64_t cols, QuantParams p, uint8_t* qt, float* so,
                                   int* nonfinite, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return Result::Ok();
  const Fp8Src src{q, s, in_fmt};
  const int64_t tiles = ceil_div(rows, kG);
  if (p.fmt == Fp8Format::kE4M3) {
    return requant_t_launch<Fp8Format::kE4M3>(src, rows, cols, GroupsDev{}, tiles, p, qt, so,
                                              nonfinite, stream);
  }
  return requant_t_launch<Fp8Format::kE5M2>(src, rows, cols, GroupsDev{}, tiles, p, qt, so,
                                            nonfinite, stream);
}

Result gather_fp8_rows(const uint8_t* q, const float* s, int64_t n, int64_t K, GroupsDev in_groups,
                       const int32_t* rows, const int32_t* pad, int64_t M, GroupsDev groups,
                       float zero_scale, uint8_t* out, float* so, cudaStream_t stream) {
  if (M <= 0 || K <= 0) return Result::Ok();
  const bool vec = K % 16 == 0 && aligned(q, 16) && aligned(out, 16);
  const int grid =
      static_cast<int>(std::min<int64_t>(ceil_div(M * (vec ? K / 16 : K), kThreads), 132 * 32));
  FP8PIPE_KERNEL(grid, kThreads, stream, gather_fp8_rows_kernel)
  (q, s, n, K, in_groups, rows, pad, M, groups, zero_scale, vec, out, so);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result dequantize_1x128_groups(const uint8_t* q, const float* s, int64_t rows, int64_t cols,
                               GroupsDev groups, Fp8Format fmt, float* out, cudaStream_t stream) {
  return dequantize_any(q, s, rows, cols, Granularity::k1x128, fmt, out, stream, groups);
}

Result transpose_128x128(const uint8_t* q, const float* s, int64_t rows, int64_t cols, uint8_t* qt,
                         float* st, cudaStream_t stream) {
  return transpose_128x128_batch(q, s, 1, rows, cols, qt, st, stream);
}

Result transpose_128x128_batch(const uint8_t* q, const float* s, int64_t count, int64_t rows,
                               int64_t cols, uint8_t* qt, float* st, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || count <= 0) return Result::Ok();
  FP8PIPE_REQUIRE(ceil_div(rows, 32) <= 65535 && count <= 65535,
                  "transpose_128x128: too many rows or tensors");
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, 32)),
                  static_cast<unsigned>(ceil_div(rows, 32)), static_cast<unsigned>(count));
  FP8PIPE_KERNEL(grid, dim3(32, 8), stream, transpose_bytes_kernel)(q, rows, cols, qt);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  const int64_t RB = ceil_div(rows, kG), KB = ceil_div(cols, kG);
  const int64_t n = KB * pad4(RB);
  const dim3 sgrid(static_cast<unsigned>(blocks_for(n, kThreads)), static_cast<unsigned>(count));
  FP8PIPE_KERNEL(sgrid, kThreads, stream, transpose_block_scales_kernel)(s, RB, KB, st);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result quantize_128x128_batch(const float* const* xs, const float* const* host_xs, int64_t count,
                              int64_t rows, int64_t cols, QuantParams p, uint8_t* q, float* s,
                              int* nonfinite, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || count <= 0) return Result::Ok();
  const int64_t KB = ceil_div(cols, kG), RB = ceil_div(rows, kG);
  FP8PIPE_REQUIRE(RB <= 65535 && KB < (1ll << 31) && count <= 65535,
                  "quantize 128x128 batch: too many rows or tensors");
  bool vec = cols % 4 == 0 && aligned(q, 4);
  for (int64_t z = 0; z < count; ++z) vec = vec && aligned(host_xs[z], 16);
  const dim3 grid(static_cast<unsigned>(KB), static_cast<unsigned>(RB),
                  static_cast<unsigned>(count));
  auto launch = [&](auto f) {
    constexpr Fp8Format F = decltype(f)::value;
    if (vec) {
      FP8PIPE_KERNEL(grid, kThreads, stream, q128x128_vec_kernel<float, F>)
      (nullptr, rows, cols, KB, p.pow2, q, s, nonfinite, xs);
    } else {
      FP8PIPE_KERNEL(grid, kThreads, stream, q128x128_scalar_kernel<float, F>)
      (nullptr, rows, cols, KB, p.pow2, q, s, nonfinite, xs);
    }
  };
  if (p.fmt == Fp8Format::kE4M3) {
    launch(std::integral_constant<Fp8Format, Fp8Format::kE4M3>{});
  } else {
    launch(std::integral_constant<Fp8Format, Fp8Format::kE5M2>{});
  }
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

}  // namespace fp8pipe::kernels::gpu
