// fp8pipe: the command-line entry point. `fp8pipe <command> [args]`; `fp8pipe help` lists them.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "launch/commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

constexpr Command kCommands[] = {
    {"train", fp8pipe::cli::cmd_train,
     "CONFIG [--a.b=v ...] [--save PATH]   train (under mpirun: one process per rank)"},
    {"ckpt", fp8pipe::cli::cmd_ckpt,
     "inspect|verify DIR [--step N] | export DIR OUT [--step N] [--format hf --dtype "
     "bf16|fp32|fp8]"},
    {"eval", fp8pipe::cli::cmd_eval,
     "CONFIG --checkpoint PATH [--batches N]   held-out loss of a saved model (or HF folder)"},
    {"generate", fp8pipe::cli::cmd_generate,
     "CONFIG --checkpoint PATH [--prompt TEXT ... | --prompt-file F] [--max-new-tokens N] "
     "[--temperature T] [--top-k K] "
     "[--top-p P] [--seed S] [--speculative none|mtp] [--kv-cache latent|heads] [--kv-cache-dtype "
     "auto|fp32|bf16]   sample text"},
    {"config", fp8pipe::cli::cmd_config,
     "CONFIG [--a.b=v ...]   print the resolved config (after overrides) and validate it"},
    {"quantize", fp8pipe::cli::cmd_quantize,
     "IN.safetensors OUT.safetensors [--granularity 1x128|128x1|128x128|tensor] "
     "[--format e4m3|e5m2] [--scales pow2|fp32]   quantize every float tensor to FP8"},
    {"bench", fp8pipe::cli::cmd_bench,
     "[--filter NAME] [--json FILE]   quantize and FP8 GEMM throughput vs fp32 sgemm"},
    {"prepare-data", fp8pipe::cli::cmd_prepare_data, "OUT FILE... [--help]   text to byte tokens"},
    {"schedule", fp8pipe::cli::cmd_schedule, "--kind K --stages PP --microbatches M  schedule"},
    {"simulate", fp8pipe::cli::cmd_simulate,
     "CONFIG [--a.b=v ...] [--trace F] [--csv F] [--sweep]"},
    {"plot", fp8pipe::cli::cmd_plot, "RUN.jsonl... [-o OUT.svg] [--labels ..] [--floor X]   SVG"},
};

int usage(FILE* out) {
  std::fprintf(out, "usage: fp8pipe <command> [args]\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-9s %s\n", c.name, c.help);
  return out == stdout ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(stderr);
  const std::string_view cmd = argv[1];
  if (cmd == "help" || cmd == "--help" || cmd == "-h") return usage(stdout);
  for (const auto& c : kCommands) {
    if (cmd == c.name) return c.run(argc - 2, argv + 2);
  }
  std::fprintf(stderr, "fp8pipe: unknown command '%s'\n\n", argv[1]);
  return usage(stderr);
}
