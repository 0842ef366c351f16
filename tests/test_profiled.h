// For tests that count operator calls: the CPU backend wrapped by the op profiler
// (core/op_profile.h) and an FP8 model context on it.
#pragma once

#include <memory>

#include "core/model/module.h"
#include "core/op_profile.h"

namespace fp8pipe::testutil {

struct ProfiledFp8Cpu {
  std::shared_ptr<OpProfile> prof;
  std::unique_ptr<Backend> be = make_profiled_backend(make_cpu_backend(), &prof);
  model::ModelCtx c = [this] {
    model::ModelCtx ctx;
    ctx.be = be.get();
    ctx.precision = model::Precision::kFP8;
    return ctx;
  }();
};

}  // namespace fp8pipe::testutil
