// Test hooks that inject faults into training, driven by environment variables so that
// end-to-end tests (tests/scripts/fault_*_test.sh) can exercise the fault paths of a real run.
//
//   FP8PIPE_TEST_NAN_GRAD="RANK:STEP"  after the backward pass of the (1-based) training step
//       STEP, world rank RANK writes a NaN into the fp64 gradient accumulator of its first
//       parameter, before the gradients are summed and the global norm is taken. Every rank must
//       then see the non-finite norm (fault.on_nonfinite).
//
// The variable is read and parsed once per process; unset or empty means no injection.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/module.h"
#include "core/status.h"

namespace fp8pipe::fault_inject {

// Applies FP8PIPE_TEST_NAN_GRAD for this rank and step to `params` (this rank's parameters, whose
// grad_acc, or grad_acc_dev on `be` under optim.placement=device, holds the step's accumulated
// gradients). A malformed value is an error.
Status maybe_nan_grad(Backend& be, int rank, int64_t step,
                      const std::vector<model::Param*>& params);

}  // namespace fp8pipe::fault_inject
