// The CPU backend's optimizer ops (Backend::accumulate_grad .. adamw): the loops the host
// optimizer runs, behind the shared checks (core/op_checks.h), so optim.placement=device on the
// CPU takes the same code path as on a GPU and gives the host placement's bits.
#include "core/cpu_ops.h"
#include "core/op_checks.h"

namespace fp8pipe {

Status CpuOps::accumulate_grad(Tensor& grad, Tensor& acc) {
  FP8_RETURN_IF_ERROR(checks::accumulate_grad(grad, acc));
  float* g = grad.data_as<float>();
  double* a = acc.data_as<double>();
  for (int64_t i = 0; i < grad.numel(); ++i) {
    a[i] += g[i];
    g[i] = 0.0f;
  }
  return Status::Ok();
}

Status CpuOps::row_dot(const Tensor& a, const Tensor& b, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::row_dot(a, b, out));
  const int64_t rows = a.rows(), cols = a.cols();
  const float* x = a.data_as<float>();
  const float* y = b.data_as<float>();
  double* o = out.data_as<double>();
  for (int64_t i = 0; i < rows; ++i) {
    double dot = 0.0;
    for (int64_t j = 0; j < cols; ++j) dot += double{x[i * cols + j]} * y[i * cols + j];
    o[i] = dot;
  }
  return Status::Ok();
}

Status CpuOps::round_f64(const Tensor& acc, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::round_f64(acc, out));
  const double* a = acc.data_as<double>();
  float* o = out.data_as<float>();
  for (int64_t i = 0; i < acc.numel(); ++i) o[i] = static_cast<float>(a[i]);
  return Status::Ok();
}

Status CpuOps::sum_squares(std::span<const Tensor* const> gs, double* total) {
  FP8_RETURN_IF_ERROR(checks::sum_squares(gs, total));
  double s = *total;  // continues the caller's running sum: one index-ordered sum over tensors
  for (const Tensor* g : gs) {
    const float* x = g->data_as<float>();
    for (int64_t i = 0; i < g->numel(); ++i) s += static_cast<double>(x[i]) * x[i];
  }
  *total = s;
  return Status::Ok();
}

Status CpuOps::adamw(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                     const kernels::AdamWScalars& s) {
  FP8_RETURN_IF_ERROR(checks::adamw(p, g, m, v));
  kernels::adamw_step(p.data_as<float>(), g.data_as<float>(), m.data_as<uint16_t>(),
                      v.data_as<uint16_t>(), p.numel(), s);
  return Status::Ok();
}

}  // namespace fp8pipe
