#include "core/cpu_stream.h"

namespace fp8pipe {

void CpuEvent::synchronize() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_; });
}

bool CpuEvent::query() {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

std::optional<double> CpuEvent::ms_since(Event& start) {
  auto* s = dynamic_cast<CpuEvent*>(&start);
  if (s == nullptr || !query() || !s->query()) return std::nullopt;
  std::scoped_lock lk(mu_, s->mu_);
  return std::chrono::duration<double, std::milli>(at_ - s->at_).count();
}

void CpuEvent::signal() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    at_ = std::chrono::steady_clock::now();
    done_ = true;
  }
  cv_.notify_all();
}

CpuStream::CpuStream(std::string name, bool inline_exec)
    : name_(std::move(name)), inline_(inline_exec) {
  if (!inline_) worker_ = std::thread([this] { worker_loop(); });
}

CpuStream::~CpuStream() {
  if (inline_) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void CpuStream::launch(std::function<void()> fn) {
  if (inline_) {
    fn();
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(std::move(fn));
  }
  cv_.notify_all();
}

std::shared_ptr<Event> CpuStream::record() {
  auto e = std::make_shared<CpuEvent>();
  if (inline_) {
    e->signal();  // inline work is already complete
  } else {
    launch([e] { e->signal(); });
  }
  return e;
}

void CpuStream::wait(const std::shared_ptr<Event>& e) {
  if (inline_) {
    e->synchronize();
  } else {
    launch([e] { e->synchronize(); });
  }
}

void CpuStream::synchronize() {
  if (inline_) return;
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

void CpuStream::worker_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop requested and drained
    auto fn = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lk.unlock();
    fn();
    lk.lock();
    busy_ = false;
    cv_.notify_all();
  }
}

}  // namespace fp8pipe
