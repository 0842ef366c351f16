#include "core/dtype.h"

namespace fp8pipe {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kE4M3:
    case DType::kE5M2:
      return 1;
    case DType::kI32:
      return 4;
    case DType::kF64:
      return 8;
    case DType::kE5M6:
      return 0;  // packed: dtype_bytes
  }
  return 0;
}

size_t dtype_bytes(DType t, int64_t numel) {
  if (t == DType::kE5M6) return static_cast<size_t>(kernels::e5m6_bytes(numel));
  return static_cast<size_t>(numel) * dtype_size(t);
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kE4M3:
      return "e4m3";
    case DType::kE5M2:
      return "e5m2";
    case DType::kI32:
      return "i32";
    case DType::kF64:
      return "f64";
    case DType::kE5M6:
      return "e5m6";
  }
  return "?";
}

const char* dtype_safetensors_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kE4M3:
      return "F8_E4M3";
    case DType::kE5M2:
      return "F8_E5M2";
    case DType::kI32:
      return "I32";
    case DType::kF64:
      return "F64";
    case DType::kE5M6:
      return "E5M6";  // not a safetensors dtype: E5M6 tensors are never written
  }
  return "?";
}

Result<DType> parse_dtype(std::string_view s) {
  for (DType t :
       {DType::kF32, DType::kBF16, DType::kE4M3, DType::kE5M2, DType::kI32, DType::kF64}) {
    if (s == dtype_name(t) || s == dtype_safetensors_name(t)) return t;
  }
  return FP8_INVALID(
      "unknown dtype '{}' (valid: fp32|F32, bf16|BF16, e4m3|F8_E4M3, e5m2|F8_E5M2, i32|I32, "
      "f64|F64)",
      s);
}

bool is_fp8(DType t) { return t == DType::kE4M3 || t == DType::kE5M2; }

kernels::Fp8Format fp8_format(DType t) {
  return t == DType::kE5M2 ? kernels::Fp8Format::kE5M2 : kernels::Fp8Format::kE4M3;
}

const char* granularity_name(Granularity g) {
  switch (g) {
    case Granularity::k1x128:
      return "1x128";
    case Granularity::k128x1:
      return "128x1";
    case Granularity::k128x128:
      return "128x128";
    case Granularity::kPerTensor:
      return "tensor";
  }
  return "?";
}

Result<Granularity> parse_granularity(std::string_view s) {
  for (Granularity g :
       {Granularity::k1x128, Granularity::k128x1, Granularity::k128x128, Granularity::kPerTensor}) {
    if (s == granularity_name(g)) return g;
  }
  return FP8_INVALID("unknown granularity '{}' (valid: 1x128, 128x1, 128x128, tensor)", s);
}

}  // namespace fp8pipe
