#include "core/model/module.h"

namespace fp8pipe::model {

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFP32:
      return "FP32";
    case Precision::kBF16:
      return "BF16";
    case Precision::kFP8:
      return "FP8";
  }
  return "?";
}

namespace {
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
}  // namespace

Status init_param(Backend& be, Param& p, std::string name, Shape shape, uint64_t seed, float std,
                  float fill) {
  p.name = std::move(name);
  std::mt19937_64 rng(seed ^ fnv1a(p.name));
  auto cpu = make_cpu_backend();
  FP8_ASSIGN_OR_RETURN(Tensor host, cpu->empty(shape, DType::kF32));
  float* h = host.data_as<float>();
  std::normal_distribution<float> dist(0.0f, std > 0 ? std : 1.0f);
  for (int64_t i = 0; i < host.numel(); ++i) h[i] = std > 0 ? dist(rng) : fill;
  FP8_ASSIGN_OR_RETURN(p.value, be.empty(shape, DType::kF32));
  FP8_RETURN_IF_ERROR(be.copy(host, p.value));
  FP8_ASSIGN_OR_RETURN(p.grad, be.zeros(shape, DType::kF32));
  if (be.device() == Device::kCpu) {
    p.host_value = p.value;
    p.host_grad = p.grad;
  } else {
    p.host_value = std::move(host);
    FP8_ASSIGN_OR_RETURN(p.host_grad, cpu->zeros(shape, DType::kF32));
  }
  return Status::Ok();
}

Result<Tensor> new_f32(ModelCtx& c, int64_t rows, int64_t cols) {
  return c.be->empty({rows, cols}, DType::kF32);
}

Result<Tensor> new_zeros(ModelCtx& c, int64_t rows, int64_t cols) {
  return c.be->zeros({rows, cols}, DType::kF32);
}

Result<Tensor> hold_bf16(ModelCtx& c, const Tensor& x) {
  if (c.precision == Precision::kFP32 || x.dtype() != DType::kF32) return x;
  FP8_ASSIGN_OR_RETURN(Tensor h, c.be->empty(x.shape(), DType::kBF16));
  FP8_RETURN_IF_ERROR(c.be->cast(x, h));
  return h;
}

Result<Tensor> held_f32(ModelCtx& c, const Tensor& h) {
  if (h.dtype() == DType::kF32 || h.dtype() == DType::kF64 || h.dtype() == DType::kI32) return h;
  FP8_ASSIGN_OR_RETURN(Tensor x, c.be->empty(h.shape(), DType::kF32));
  FP8_RETURN_IF_ERROR(h.dtype() == DType::kBF16 ? c.be->cast(h, x) : c.be->dequantize(h, x));
  return x;
}

Result<Tensor> hold_fp8(ModelCtx& c, const Tensor& x) {
  return c.be->quantize(x, Granularity::k1x128, c.qp);
}

}  // namespace fp8pipe::model
