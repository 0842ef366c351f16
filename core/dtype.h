// Element types of fp8pipe tensors and their names in safetensors ("F32", "BF16", "F8_E4M3",
// "F8_E5M2", "I32" for token ids and routing indices). FP8 tensors carry a scale tensor and its
// granularity (core/tensor.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/status.h"
#include "kernels/cpu/quantize.h"

namespace fp8pipe {

// F64: gradient sums. E5M6: 12-bit codes packed two to three bytes with 1x128 scales, an activation
// cache only (kernels/cpu/fp8_codec.h; never a GEMM operand or a checkpoint tensor).
enum class DType : uint8_t { kF32, kBF16, kE4M3, kE5M2, kI32, kF64, kE5M6 };

size_t dtype_size(DType t);                  // bytes per element; 0 for packed E5M6
size_t dtype_bytes(DType t, int64_t numel);  // bytes of numel elements (E5M6: 1.5 each, rounded up)
const char* dtype_name(DType t);             // "fp32", "bf16", "e4m3", "e5m2", "e5m6"
const char* dtype_safetensors_name(DType t);    // "F32", "BF16", "F8_E4M3", "F8_E5M2"
Result<DType> parse_dtype(std::string_view s);  // accepts either spelling
bool is_fp8(DType t);
kernels::Fp8Format fp8_format(DType t);  // requires is_fp8(t)

using kernels::Granularity;
const char* granularity_name(Granularity g);  // "1x128", "128x1", "128x128", "tensor"
Result<Granularity> parse_granularity(std::string_view s);

}  // namespace fp8pipe
