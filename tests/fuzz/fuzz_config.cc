// libFuzzer target: the text-format config parser (core/config.h) on arbitrary bytes, then the
// defaulting, validation and printing every loaded config goes through. Built and run by
// tests/fuzz/run_fuzz.sh (clang only; not part of the CMake build).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto cfg = fp8pipe::parse_config_text(text, "fuzz");
  if (!cfg.ok()) return 0;
  fp8pipe::apply_defaults(*cfg);
  (void)fp8pipe::validate(*cfg);
  (void)fp8pipe::validate(*cfg, 4);
  (void)fp8pipe::to_text(*cfg);
  return 0;
}
