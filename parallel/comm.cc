// Backend-independent parts of the Comm interface: wire types, Work completion and timeouts, and
// the agree() decision helper. The MPI backend is parallel/mpi_comm.cc.
#include "parallel/comm.h"

#include <chrono>

namespace fp8pipe::parallel {

int64_t data_type_size(DataType t) {
  switch (t) {
    case DataType::kFloat32:
    case DataType::kInt32:
      return 4;
    case DataType::kFloat64:
    case DataType::kInt64:
      return 8;
    case DataType::kBFloat16:
      return 2;
    case DataType::kByte:
      return 1;
  }
  return 1;
}

const char* data_type_name(DataType t) {
  switch (t) {
    case DataType::kFloat32:
      return "fp32";
    case DataType::kFloat64:
      return "fp64";
    case DataType::kInt32:
      return "int32";
    case DataType::kInt64:
      return "int64";
    case DataType::kBFloat16:
      return "bf16";
    case DataType::kByte:
      return "byte";
  }
  return "?";
}

bool data_type_reducible(DataType t) {
  return t == DataType::kFloat32 || t == DataType::kFloat64 || t == DataType::kInt32 ||
         t == DataType::kInt64;
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "?";
}

WorkState::WorkState(std::string what, double timeout_s, std::function<std::string()> history,
                     Census census)
    : what_(std::move(what)),
      timeout_s_(timeout_s),
      history_(std::move(history)),
      census_(std::move(census)) {}

void WorkState::complete(Status s) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (done_.load(std::memory_order_relaxed)) return;
    status_ = std::move(s);
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

Status WorkState::wait_for(double timeout_s) {
  kick();  // before taking mu_: a backend's flush never runs under this op's lock
  std::unique_lock<std::mutex> lk(mu_);
  const auto limit = std::chrono::duration<double>(timeout_s);
  if (cv_.wait_for(lk, limit, [&] { return done_.load(std::memory_order_relaxed); })) {
    return status_;
  }
  lk.unlock();
  std::string msg = fmt::format("comm timeout: {} not done after {:g} s", what_, timeout_s);
  const std::string peers = census_ ? census_(&msg) : std::string();
  if (history_) msg += "\n  last comm ops of this rank (oldest first):\n" + history_();
  msg += peers;
  return Status(Code::kAborted, msg,
                "a peer never issued the matching op (or issued collectives in another order): "
                "check the schedule, look at the other ranks' errors, or raise fault.timeout_s");
}

Work Work::failed(Status s) {
  auto st = std::make_shared<WorkState>("failed op", 0.0);
  st->complete(std::move(s));
  return Work(std::move(st));
}

Status Work::wait() const {
  if (!state_) return Status::Ok();
  return state_->wait_for(state_->timeout_s());
}

Status Work::wait_for(double timeout_s) const {
  if (!state_) return Status::Ok();
  return state_->wait_for(timeout_s);
}

Status wait_all(std::span<const Work> works) {
  for (const Work& w : works) FP8_RETURN_IF_ERROR(w.wait());
  return Status::Ok();
}

Result<bool> agree(Comm& comm, bool ok) {
  int64_t v = ok ? 1 : 0;
  FP8_RETURN_IF_ERROR(comm.all_reduce(&v, &v, 1, DataType::kInt64, ReduceOp::kMin).wait());
  return v == 1;
}

Comm& CommSet::get(GroupKind k) {
  switch (k) {
    case GroupKind::kWorld:
      return *world;
    case GroupKind::kPipeline:
      return *pp;
    case GroupKind::kData:
      return *dp;
    case GroupKind::kExpert:
      return *ep;
    case GroupKind::kExpertData:
      return *expert_dp;
    case GroupKind::kNode:
      return *node;
  }
  return *world;
}

}  // namespace fp8pipe::parallel
