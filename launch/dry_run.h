// `fp8pipe train CONFIG --dry-run [--world-size N]` (DESIGN.md §7): everything a job decides
// before it touches a device, for every rank, in one process: the validated config, the rank
// layout (Topology::table), the stage partition, each rank's model chunks and expert shard, the
// schedule checked by the validator with each rank's instruction counts, and the work per step.
#pragma once

#include <string>

#include "core/config.h"
#include "core/status.h"

namespace fp8pipe {

// The report for a job of `world` ranks (0: parallel.pp · parallel.dp). `cfg` must be validated
// for that world; the layout and schedule are checked here (an invalid one is the error).
Result<std::string> dry_run_report(const config::Config& cfg, int world);

}  // namespace fp8pipe
