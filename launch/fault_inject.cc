#include "launch/fault_inject.h"

#include <charconv>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

#include "core/log.h"

namespace fp8pipe::fault_inject {
namespace {

struct NanGrad {
  bool on = false;
  int rank = -1;
  int64_t step = -1;
  Status error;  // a malformed variable, reported on every call
};

template <typename T>
bool parse_int(std::string_view s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

NanGrad parse_nan_grad() {
  NanGrad n;
  const char* v = std::getenv("FP8PIPE_TEST_NAN_GRAD");
  if (!v || !*v) return n;
  const std::string_view s(v);
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos || !parse_int(s.substr(0, colon), &n.rank) ||
      !parse_int(s.substr(colon + 1), &n.step) || n.rank < 0 || n.step < 1) {
    n.error =
        FP8_INVALID("FP8PIPE_TEST_NAN_GRAD='{}': expected RANK:STEP (rank >= 0, step >= 1)", s);
    return n;
  }
  n.on = true;
  return n;
}

}  // namespace

Status maybe_nan_grad(Backend& be, int rank, int64_t step,
                      const std::vector<model::Param*>& params) {
  static const NanGrad cfg = parse_nan_grad();
  if (!cfg.error.ok()) return cfg.error;
  if (!cfg.on || cfg.rank != rank || cfg.step != step) return Status::Ok();
  for (auto* p : params) {
    if (p->grad_acc_dev.defined()) {  // the sum lives on the backend: copy a NaN into element 0
      auto cpu = make_cpu_backend();
      FP8_ASSIGN_OR_RETURN(Tensor nan, cpu->empty({1}, DType::kF64));
      nan.data_as<double>()[0] = std::numeric_limits<double>::quiet_NaN();
      FP8_ASSIGN_OR_RETURN(Tensor flat, p->grad_acc_dev.reshape({p->grad_acc_dev.numel()}));
      Tensor first = flat.slice_rows(0, 1);
      FP8_RETURN_IF_ERROR(be.copy(nan, first));
    } else if (!p->grad_acc.empty()) {
      p->grad_acc[0] = std::numeric_limits<double>::quiet_NaN();
    } else {
      continue;
    }
    log::warn("FP8PIPE_TEST_NAN_GRAD: injected NaN into the gradient of {} at step {}", p->name,
              step);
    return Status::Ok();
  }
  return FP8_ERROR(Code::kInternal, "FP8PIPE_TEST_NAN_GRAD: rank {} has no gradient to poison",
                   rank);
}

}  // namespace fp8pipe::fault_inject
