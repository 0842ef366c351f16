// libFuzzer target: safetensors::Reader::parse (core/safetensors.h) on arbitrary bytes; every
// tensor a parse accepts is read end to end, so a view outside the buffer trips AddressSanitizer.
// Built and run by tests/fuzz/run_fuzz.sh (clang only; not part of the CMake build).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = fp8pipe::safetensors::Reader::parse(std::span<const uint8_t>(data, size), "fuzz");
  if (!r.ok()) return 0;
  volatile uint8_t sink = 0;
  for (const auto& t : r->tensors()) {
    const size_t es = fp8pipe::safetensors::dtype_size(t.dtype);
    if (es == 0 || t.nbytes != uint64_t(t.numel()) * es) std::abort();  // parse must check these
    for (uint64_t i = 0; i < t.nbytes; ++i) sink = sink ^ t.data[i];
    if (r->find(t.name) != &t) std::abort();
    (void)t.shape_str();
  }
  (void)sink;
  return 0;
}
