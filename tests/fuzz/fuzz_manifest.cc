// libFuzzer target: the checkpoint manifest parser ckpt::Manifest::from_json (core/checkpoint.h)
// on arbitrary bytes. An accepted manifest must survive to_json -> from_json unchanged, and its
// tensors' sizes must be computable. Built and run by tests/fuzz/run_fuzz.sh (clang only).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto m = fp8pipe::ckpt::Manifest::from_json(text, "fuzz");
  if (!m.ok()) return 0;
  for (const auto& t : m->tensors) (void)t.numel();
  (void)m->find("embed.weight");
  const std::string again = m->to_json();
  auto m2 = fp8pipe::ckpt::Manifest::from_json(again, "fuzz-roundtrip");
  if (!m2.ok() || m2->to_json() != again) std::abort();  // what we accept we must write back
  return 0;
}
