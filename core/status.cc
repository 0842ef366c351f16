#include "core/status.h"

#include <atomic>

namespace fp8pipe {
namespace {
std::atomic<int> g_rank{-1};  // set once at start-up, read by errors and logs
}

void set_process_rank(int rank) { g_rank.store(rank); }
int process_rank() { return g_rank.load(); }

const char* code_name(Code c) {
  switch (c) {
    case Code::kOk:
      return "ok";
    case Code::kInvalidArgument:
      return "invalid argument";
    case Code::kNotFound:
      return "not found";
    case Code::kIo:
      return "i/o error";
    case Code::kInternal:
      return "internal error";
    case Code::kUnimplemented:
      return "unimplemented";
    case Code::kAborted:
      return "aborted";
  }
  return "unknown";
}

Status::Status(Code code, std::string msg, std::string hint, std::source_location loc)
    : code_(code),
      msg_(std::move(msg)),
      hint_(std::move(hint)),
      line_(static_cast<int>(loc.line())) {
  // Keep the path from the project root: ".../fp8pipe/core/x.cc" -> "core/x.cc".
  std::string f = loc.file_name();
  for (const char* top : {"/core/", "/kernels/", "/parallel/", "/optim/", "/launch/", "/tests/"}) {
    auto pos = f.rfind(top);
    if (pos != std::string::npos) {
      f = f.substr(pos + 1);
      break;
    }
  }
  file_ = f;
  rank_ = process_rank();
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  std::string s = rank_ >= 0 ? fmt::format("[rank {}] ", rank_) : std::string();
  s += fmt::format("{}:{}: {}: {}", file_, line_, code_name(code_), msg_);
  if (!hint_.empty()) s += fmt::format("\n  ---> HINT: {}", hint_);
  return s;
}

Status Status::with_context(const std::string& ctx) const {
  Status s = *this;
  s.msg_ = ctx + ": " + msg_;
  return s;
}

}  // namespace fp8pipe
