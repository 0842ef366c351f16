// Small file helpers shared by the CLI subcommands.
#pragma once

#include <fstream>
#include <string>

#include "core/status.h"

namespace fp8pipe::cli {

// Writes `text` to `path` (truncating); an error names the path.
inline Status write_text_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  if (!f) return FP8_ERROR(Code::kIo, "cannot write {}", path);
  return Status::Ok();
}

}  // namespace fp8pipe::cli
