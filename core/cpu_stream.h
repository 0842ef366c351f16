// CPU streams: the compute stream runs work inline on the calling thread; other streams own a
// worker thread that runs launched closures in order, so communication driven there overlaps the
// caller's computation. Events are shared completion flags.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "core/backend.h"

namespace fp8pipe {

class CpuEvent final : public Event {
 public:
  void synchronize() override;
  bool query() override;
  std::optional<double> ms_since(Event& start) override;  // host time between the two signals
  void signal();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::chrono::steady_clock::time_point at_;  // when signalled
};

class CpuStream final : public Stream {
 public:
  // inline_exec: run closures on the caller (the compute stream); otherwise on a worker thread.
  CpuStream(std::string name, bool inline_exec);
  ~CpuStream() override;
  const std::string& name() const override { return name_; }
  void launch(std::function<void()> fn) override;
  std::shared_ptr<Event> record() override;
  void wait(const std::shared_ptr<Event>& e) override;
  void synchronize() override;

 private:
  void worker_loop();

  std::string name_;
  bool inline_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool busy_ = false;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace fp8pipe
