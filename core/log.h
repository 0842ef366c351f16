// Rank-aware logging on fmt: "[fp8pipe r0 12:00:01.123 I] message". Level from FP8PIPE_LOG
// (debug|info|warn|error, default info). Lines go to stderr whole, so ranks do not interleave
// mid-line under mpirun.
#pragma once

#include <fmt/format.h>

#include <string_view>

namespace fp8pipe::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

Level threshold();
void set_threshold(Level l);
void write(Level l, std::string_view msg);

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... a) {
  if (threshold() <= Level::kDebug) write(Level::kDebug, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... a) {
  if (threshold() <= Level::kInfo) write(Level::kInfo, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... a) {
  if (threshold() <= Level::kWarn) write(Level::kWarn, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... a) {
  write(Level::kError, fmt::format(f, std::forward<Args>(a)...));
}

}  // namespace fp8pipe::log
