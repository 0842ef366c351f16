// `fp8pipe config CONFIG [--world-size N] [--a.b=v ...]`: loads a config, applies overrides and
// defaults, validates it (and its layout against N ranks when given), and prints the resolved
// config in text format. The quickest way to check a config before launching anything.
#include <charconv>
#include <cstdio>
#include <string>
#include <vector>

#include "core/config.h"
#include "launch/commands.h"

namespace fp8pipe::cli {
namespace {

int fail(const Status& st) {
  std::fprintf(stderr, "%s\n", st.to_string().c_str());
  return 2;
}

}  // namespace

Result<int> take_world_size(std::vector<std::string>& args) {
  int world = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string value;
    if (args[i] == "--world-size" && i + 1 < args.size()) {
      value = args[i + 1];
      args.erase(args.begin() + i, args.begin() + i + 2);
    } else if (args[i].starts_with("--world-size=")) {
      value = args[i].substr(13);
      args.erase(args.begin() + i);
    } else {
      continue;
    }
    auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), world);
    if (ec != std::errc() || end != value.data() + value.size() || world < 1) {
      return FP8_INVALID("--world-size={}: must be a positive integer", value);
    }
    --i;
  }
  return world;
}

int cmd_config(int argc, char** argv) {
  if (argc < 1 || std::string(argv[0]).starts_with("-")) {
    std::fprintf(stderr, "usage: fp8pipe config CONFIG [--world-size N] [--a.b=v ...]\n");
    return 2;
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  auto world = take_world_size(args);
  if (!world.ok()) return fail(world.status());
  auto cfg = parse_config(argv[0], args);
  if (!cfg.ok()) return fail(cfg.status());
  if (Status st = validate(*cfg, *world); !st.ok()) return fail(st.with_context(argv[0]));
  std::fputs(to_text(*cfg).c_str(), stdout);
  return 0;
}

}  // namespace fp8pipe::cli
