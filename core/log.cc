#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "core/status.h"

namespace fp8pipe::log {
namespace {
Level from_env() {
  const char* e = std::getenv("FP8PIPE_LOG");
  if (!e) return Level::kInfo;
  if (!std::strcmp(e, "debug")) return Level::kDebug;
  if (!std::strcmp(e, "warn")) return Level::kWarn;
  if (!std::strcmp(e, "error")) return Level::kError;
  return Level::kInfo;
}
std::atomic<int> g_level{static_cast<int>(from_env())};
}  // namespace

Level threshold() { return static_cast<Level>(g_level.load(std::memory_order_relaxed)); }
void set_threshold(Level l) { g_level.store(static_cast<int>(l)); }

void write(Level l, std::string_view msg) {
  static const char kTag[] = {'D', 'I', 'W', 'E'};
  const auto now = std::chrono::system_clock::now();
  const auto t = std::chrono::system_clock::to_time_t(now);
  const int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  const int rank = process_rank();
  std::string line =
      fmt::format("[fp8pipe r{} {:02}:{:02}:{:02}.{:03} {}] {}\n", rank < 0 ? 0 : rank, tm.tm_hour,
                  tm.tm_min, tm.tm_sec, ms, kTag[static_cast<int>(l)], msg);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace fp8pipe::log
