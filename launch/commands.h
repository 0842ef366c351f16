// The fp8pipe subcommands. Each takes the arguments after its name and returns the process exit
// code; errors are printed (with rank, file:line and hint) by the command itself.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace fp8pipe::cli {

// Removes "--world-size N" / "--world-size=N" from args; returns N (0 = not given) or an error
// (config and train --dry-run).
Result<int> take_world_size(std::vector<std::string>& args);

int cmd_config(int argc, char** argv);        // print the resolved config
int cmd_quantize(int argc, char** argv);      // quantize a safetensors file to FP8
int cmd_bench(int argc, char** argv);         // micro-benchmarks (CPU; GPU when built with CUDA)
int cmd_train(int argc, char** argv);         // train a model from a config
int cmd_eval(int argc, char** argv);          // held-out loss of a saved model
int cmd_generate(int argc, char** argv);      // sample text from a saved model
int cmd_ckpt(int argc, char** argv);          // inspect, verify, export checkpoints
int cmd_prepare_data(int argc, char** argv);  // byte-level text -> token files
int cmd_schedule(int argc, char** argv);      // print + validate a pipeline schedule
int cmd_plot(int argc, char** argv);          // JSONL metrics -> one SVG of curves
int cmd_simulate(int argc, char** argv);      // predict step time, memory, cost on a cluster

}  // namespace fp8pipe::cli
