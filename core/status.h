// Errors are values: a Status carries a code, a message, the rank and file:line where it was made,
// and an optional hint. Only main() turns one into an exit code (DESIGN.md §3).
#pragma once

#include <fmt/format.h>

#include <optional>
#include <source_location>
#include <string>
#include <utility>
#include <variant>

namespace fp8pipe {

enum class Code { kOk, kInvalidArgument, kNotFound, kIo, kInternal, kUnimplemented, kAborted };

const char* code_name(Code c);

class Status {
 public:
  Status() = default;
  Status(Code code, std::string msg, std::string hint = {},
         std::source_location loc = std::source_location::current());
  static Status Ok() { return Status(); }
  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  const std::string& hint() const { return hint_; }
  // "[rank 3] core/config.cc:120: invalid argument: ... \n  ---> HINT: ..."
  std::string to_string() const;
  // Prepends context ("while loading X: ") keeping the original location.
  Status with_context(const std::string& ctx) const;

 private:
  Code code_ = Code::kOk;
  std::string msg_, hint_, file_;
  int line_ = 0;
  int rank_ = -1;
};

// The process-wide rank used to label errors and log lines; set once at start-up.
void set_process_rank(int rank);
int process_rank();

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Status s) : v_(std::move(s)) {}
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  T& operator*() { return value(); }

 private:
  std::variant<T, Status> v_;
};

template <typename... Args>
Status Error(Code code, std::source_location loc, fmt::format_string<Args...> f, Args&&... args) {
  return Status(code, fmt::format(f, std::forward<Args>(args)...), {}, loc);
}

}  // namespace fp8pipe

#define FP8_INVALID(...)                                                               \
  ::fp8pipe::Status(::fp8pipe::Code::kInvalidArgument, ::fmt::format(__VA_ARGS__), {}, \
                    std::source_location::current())
#define FP8_ERROR(code, ...) \
  ::fp8pipe::Status(code, ::fmt::format(__VA_ARGS__), {}, std::source_location::current())

// Propagate a non-ok Status.
#define FP8_RETURN_IF_ERROR(expr)   \
  do {                              \
    ::fp8pipe::Status _st = (expr); \
    if (!_st.ok()) return _st;      \
  } while (0)

#define FP8_CONCAT_INNER(a, b) a##b
#define FP8_CONCAT(a, b) FP8_CONCAT_INNER(a, b)
// Bind the value of a Result<T> or return its Status.
#define FP8_ASSIGN_OR_RETURN(lhs, expr)                                               \
  auto FP8_CONCAT(_res_, __LINE__) = (expr);                                          \
  if (!FP8_CONCAT(_res_, __LINE__).ok()) return FP8_CONCAT(_res_, __LINE__).status(); \
  lhs = std::move(FP8_CONCAT(_res_, __LINE__)).value()
