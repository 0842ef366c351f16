// fp8pipe CUDA emulation: the fp16 types and conversions the kernels use.
#pragma once

#include <cmath>
#include <cstdint>

#include "vector_types.h"

struct __half_raw {
  unsigned short x;
};
struct __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  operator __half_raw() const { return {__x}; }
};
struct alignas(4) __half2 {
  __half x, y;
};

// IEEE binary16 -> float (exact).
inline float __half2float(__half h) {
  const unsigned s = h.__x >> 15, e = (h.__x >> 10) & 0x1Fu, m = h.__x & 0x3FFu;
  float v;
  if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 31) {
    v = m ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(m | 0x400u), static_cast<int>(e) - 25);
  }
  return s ? -v : v;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
