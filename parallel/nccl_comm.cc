// NCCL backend of Comm (parallel/nccl_comm.h): a queue of ops issued in order on one CUDA stream
// by one thread per communicator, which also polls each op's cudaEvent (and NCCL's asynchronous
// error state) and completes the ops' Work. Host buffers are staged through device memory.
// Point-to-point ops are deferred and issued as one NCCL group per batch (see the header).
#include "parallel/nccl_comm.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "core/cuda_status.h"
#include "core/log.h"

namespace fp8pipe::parallel {
namespace {

using Clock = std::chrono::steady_clock;

class NcclComm;

// What a Work's kick (WorkState::set_kick, trigger (a) of nccl_comm.h) reaches: shared by the
// comm and its ops, so a Work tested after its comm is gone finds `comm` null instead of freed
// memory. `unflushed` is the fast path of a thread spinning on test(): no lock unless a batch is
// waiting for a trigger.
struct KickTarget {
  std::mutex mu;
  NcclComm* comm = nullptr;
  std::atomic<bool> unflushed{false};
};

// The process's issue order (nccl_comm.h, "Issue order"): every op of every NcclComm takes a
// ticket when it is posted, and a comm thread enqueues an op on the device only when every op
// posted before it, on any comm, has been enqueued. So the device receives NCCL operations in
// the order the program posted them, the same on every rank that posts alike, whichever comm
// thread runs first. Also the list of live comms for the process-wide kick.
class IssueOrder {
 public:
  static IssueOrder& get() {
    static IssueOrder* o = new IssueOrder;  // never destroyed: comms may outlive static teardown
    return *o;
  }
  uint64_t take() {
    std::lock_guard<std::mutex> lk(mu_);
    const uint64_t t = next_++;
    unissued_.insert(t);
    return t;
  }
  // True when every ticket before t has been issued. FP8PIPE_NCCL_ISSUE_ORDER=per_comm drops the
  // rule (each comm thread issues as soon as its own ops allow, as before): only for showing the
  // deadlock it prevents (kernels/cuda_emu's serial NCCL; CTest mpi.comm_nccl_per_comm_order).
  bool turn_of(uint64_t t) {
    if (per_comm_) return true;
    std::lock_guard<std::mutex> lk(mu_);
    return unissued_.empty() || *unissued_.begin() >= t;
  }
  void issued(uint64_t t) {
    std::lock_guard<std::mutex> lk(mu_);
    unissued_.erase(t);
  }
  void add(const std::shared_ptr<KickTarget>& k) {
    std::lock_guard<std::mutex> lk(mu_);
    comms_.push_back(k);
  }
  void remove(const KickTarget* k) {
    std::lock_guard<std::mutex> lk(mu_);
    std::erase_if(comms_, [k](const std::shared_ptr<KickTarget>& c) { return c.get() == k; });
  }
  // Trigger (a) for every comm of the process: a wait on one comm may need an earlier batch of
  // another issued first (its turn comes after it).
  void kick_all();
  // A comm now holds an unflushed batch: the next kick_all looks (a spinning test() otherwise
  // costs one atomic load).
  void note_unflushed() { maybe_unflushed_.store(true, std::memory_order_release); }

 private:
  std::atomic<bool> maybe_unflushed_{false};
  const bool per_comm_ = [] {
    const char* e = std::getenv("FP8PIPE_NCCL_ISSUE_ORDER");
    if (e != nullptr && std::string(e) != "per_comm" && std::string(e) != "process")
      log::warn("FP8PIPE_NCCL_ISSUE_ORDER='{}' ignored (valid: process, per_comm)", e);
    return e != nullptr && std::string(e) == "per_comm";
  }();
  std::mutex mu_;
  uint64_t next_ = 1;
  std::set<uint64_t> unissued_;
  std::vector<std::shared_ptr<KickTarget>> comms_;
};

#define FP8_NCCL(expr)                                                                   \
  do {                                                                                   \
    const ncclResult_t r_ = (expr);                                                      \
    if (r_ != ncclSuccess)                                                               \
      return FP8_ERROR(Code::kInternal, "{} failed: {}", #expr, ncclGetErrorString(r_)); \
  } while (0)

ncclDataType_t nccl_type(DataType t) {
  switch (t) {
    case DataType::kFloat32:
      return ncclFloat32;
    case DataType::kFloat64:
      return ncclFloat64;
    case DataType::kInt32:
      return ncclInt32;
    case DataType::kInt64:
      return ncclInt64;
    case DataType::kBFloat16:
      return ncclBfloat16;
    case DataType::kByte:
      return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

// Device (or managed) memory that NCCL can use directly; anything else is staged.
bool is_device_ptr(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// The last ops of one communicator, for timeout messages.
class History {
 public:
  void record(const std::string& line) {
    std::lock_guard<std::mutex> lk(mu_);
    lines_.push_back(line);
    if (lines_.size() > 16) lines_.pop_front();
  }
  std::string format() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::string s;
    for (const auto& l : lines_) s += "    " + l + "\n";
    return s;
  }

 private:
  mutable std::mutex mu_;
  std::deque<std::string> lines_;
};

struct Staged {
  void* host = nullptr;
  void* dev = nullptr;
  size_t bytes = 0;
  bool copy_out = false;
};

struct Op;
using IssueFn = std::function<Status(Op&)>;

struct Op {
  std::string what;
  std::shared_ptr<WorkState> state;
  std::shared_ptr<Event> ready;  // the producer stream's point at issue time (may be null)
  IssueFn issue;                 // enqueues the op (or its first phase) on the comm stream
  // Multi-phase ops (all_to_all_v_counted): after the current phase has completed, returns the
  // next phase's issue function; later ops of the comm wait until it is enqueued.
  std::function<Result<IssueFn>()> next;
  std::function<void()> after;  // host work once the op is complete (copy counts out, ...)
  cudaEvent_t ev = nullptr;
  std::vector<Staged> staged;
  bool p2p = false;        // send / recv: deferred, and issued in a group with its batch
  bool batch_end = false;  // the last op of a flushed batch: later ones form another group
  uint64_t seq = 0;        // position in the comm's issue order (1, 2, ...)
  uint64_t ticket = 0;     // position in the process's issue order (IssueOrder), 0 once issued
};

// Marks the op enqueued on the device (or failed) in the process's issue order.
void release_ticket(Op& op) {
  if (op.ticket == 0) return;
  IssueOrder::get().issued(op.ticket);
  op.ticket = 0;
}

class NcclComm final : public Comm {
  friend class IssueOrder;  // kick_all flushes every comm's pending batch

 public:
  NcclComm(ncclComm_t comm, Group group, const NcclOptions& opts, cudaStream_t stream)
      : comm_(comm),
        group_(std::move(group)),
        timeout_s_(opts.timeout_s),
        device_(opts.device),
        order_after_(opts.order_after),
        stream_(stream),
        history_(std::make_shared<History>()),
        kick_(std::make_shared<KickTarget>()) {
    kick_->comm = this;
    IssueOrder::get().add(kick_);
    worker_ = std::thread([this] { loop(); });
  }

  ~NcclComm() override {
    {  // from now on a kick from a Work is a no-op
      std::lock_guard<std::mutex> lk(kick_->mu);
      kick_->comm = nullptr;
    }
    IssueOrder::get().remove(kick_.get());
    flush_pending();  // (c): the pending point-to-point batch is issued, then drained
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    // Let in-flight ops finish for up to the timeout, then abort the NCCL comm so a hung peer
    // cannot hang this process's shutdown.
    wait_finished(timeout_s_);
    if (!finished_.load()) {
      log::warn("nccl comm {}: ops still in flight at shutdown after {:g} s: aborting it",
                group_.name, timeout_s_);
      // The comm thread stops calling NCCL and fails its ops at its next check; only then is the
      // comm aborted (ncclCommAbort frees it). A thread stuck inside an NCCL call is unblocked by
      // the abort itself.
      aborted_.store(true);
      wait_finished(2.0);
      release_comm(/*abort=*/true);  // also stops the ops' kernels still running on the device
    }
    worker_.join();
    release_comm(/*abort=*/false);  // a no-op when the comm was aborted
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  const Group& group() const override { return group_; }
  double timeout_s() const override { return timeout_s_; }
  bool device_buffers() const override { return true; }
  bool p2p_matched_groups() const override { return true; }

  Work send(const void* buf, int64_t count, DataType t, int peer, int tag) override {
    const std::string what =
        fmt::format("send {} x {} to {} tag {}", count, data_type_name(t), peer, tag);
    Status s = check_peer(peer, tag);
    if (s.ok()) s = check_count(count, buf, "send");
    if (!s.ok()) return fail(what, s);
    const size_t bytes = count * data_type_size(t);
    return submit(
        what,
        [=, this](Op& op) -> Status {
          FP8_ASSIGN_OR_RETURN(void* d, stage(op, const_cast<void*>(buf), bytes, true, false));
          FP8_NCCL(ncclSend(d, bytes, ncclUint8, peer, comm_, stream_));
          return Status::Ok();
        },
        /*p2p=*/true);
  }

  Work recv(void* buf, int64_t count, DataType t, int peer, int tag) override {
    const std::string what =
        fmt::format("recv {} x {} from {} tag {}", count, data_type_name(t), peer, tag);
    Status s = check_peer(peer, tag);
    if (s.ok()) s = check_count(count, buf, "recv");
    if (!s.ok()) return fail(what, s);
    const size_t bytes = count * data_type_size(t);
    return submit(
        what,
        [=, this](Op& op) -> Status {
          FP8_ASSIGN_OR_RETURN(void* d, stage(op, buf, bytes, false, true));
          FP8_NCCL(ncclRecv(d, bytes, ncclUint8, peer, comm_, stream_));
          return Status::Ok();
        },
        /*p2p=*/true);
  }

  Work all_to_all_v(const void* send, std::span<const int64_t> send_counts, void* recv,
                    std::span<const int64_t> recv_counts, DataType t, int64_t row_elems) override {
    const std::string what = fmt::format("all_to_all_v {}", data_type_name(t));
    int64_t st = 0, rt = 0;
    Status s = check_row_elems(row_elems);
    if (s.ok()) s = check_rows(send_counts, "send_counts", &st);
    if (s.ok()) s = check_rows(recv_counts, "recv_counts", &rt);
    if (s.ok() && ((st > 0 && !send) || (rt > 0 && !recv))) s = FP8_INVALID("null buffer");
    if (s.ok() && send_counts[rank()] != recv_counts[rank()]) {
      s = FP8_INVALID("{} rows to self but {} from self", send_counts[rank()], recv_counts[rank()]);
    }
    if (!s.ok()) return fail(what, s);
    const size_t row_bytes = row_elems * data_type_size(t);
    std::vector<int64_t> sc(send_counts.begin(), send_counts.end());
    std::vector<int64_t> rc(recv_counts.begin(), recv_counts.end());
    return submit(
        what, [=, this](Op& op) { return issue_all_to_all(op, send, sc, recv, rc, row_bytes); });
  }

  Work exchange_counts(std::span<const int64_t> send_counts,
                       std::span<int64_t> recv_counts) override {
    const std::string what = "exchange_counts";
    if (Status s = check_counts(send_counts, recv_counts); !s.ok()) return fail(what, s);
    // Copied now, as the MPI comm does: the caller may reuse send_counts once this returns.
    auto sc = std::make_shared<std::vector<int64_t>>(send_counts.begin(), send_counts.end());
    int64_t* rc = recv_counts.data();
    return submit(what, [=, this](Op& op) { return issue_counts(op, sc->data(), rc); });
  }

  Work all_to_all_v_counted(const void* send, std::span<const int64_t> send_counts, DataType t,
                            int64_t row_elems, RecvAlloc alloc,
                            std::vector<int64_t>* recv_counts) override {
    const std::string what = fmt::format("all_to_all_v_counted {}", data_type_name(t));
    if (!recv_counts || !alloc) {
      return fail(what, FP8_INVALID("need a recv_counts vector and an allocator"));
    }
    int64_t st = 0;
    Status s = check_row_elems(row_elems);
    if (s.ok()) s = check_rows(send_counts, "send_counts", &st);
    if (s.ok() && st > 0 && !send) s = FP8_INVALID("null send buffer");
    if (!s.ok()) return fail(what, s);
    recv_counts->assign(size(), 0);
    const size_t row_bytes = row_elems * data_type_size(t);
    std::vector<int64_t> sc(send_counts.begin(), send_counts.end());
    auto op = make_op(what);
    const int64_t* scp = nullptr;  // filled below from the op-owned copy
    auto owned = std::make_shared<std::vector<int64_t>>(std::move(sc));
    scp = owned->data();
    op->issue = [=, this](Op& o) { return issue_counts(o, scp, recv_counts->data()); };
    op->next = [=, this]() -> Result<IssueFn> {
      int64_t total = 0;
      FP8_RETURN_IF_ERROR(check_rows(*recv_counts, "received counts", &total));
      void* recv = alloc(total);
      if (total > 0 && !recv) {
        return FP8_ERROR(Code::kInternal,
                         "all_to_all_v_counted: allocator returned null for {} rows", total);
      }
      std::vector<int64_t> rc = *recv_counts;
      return IssueFn(
          [=, this](Op& o) { return issue_all_to_all(o, send, *owned, recv, rc, row_bytes); });
    };
    return enqueue(std::move(op));
  }

  Work all_reduce(const void* send, void* recv, int64_t count, DataType t, ReduceOp rop) override {
    const std::string what =
        fmt::format("all_reduce {} x {} {}", count, data_type_name(t), reduce_op_name(rop));
    if (!data_type_reducible(t)) {
      return fail(what, FP8_INVALID("{} does not reduce", data_type_name(t)));
    }
    Status s = check_count(count, send, "all_reduce");
    if (s.ok()) s = check_count(count, recv, "all_reduce");
    if (!s.ok()) return fail(what, s);
    const size_t bytes = count * data_type_size(t);
    return submit(what, [=, this](Op& op) -> Status {
      void *ds, *dr;
      FP8_RETURN_IF_ERROR(stage_pair(op, send, bytes, recv, bytes, &ds, &dr));
      FP8_NCCL(ncclAllReduce(ds, dr, count, nccl_type(t), nccl_op(rop), comm_, stream_));
      return Status::Ok();
    });
  }

  Work reduce_scatter(const void* send, void* recv, int64_t block, DataType t,
                      ReduceOp rop) override {
    const std::string what =
        fmt::format("reduce_scatter {} x {} {}", block, data_type_name(t), reduce_op_name(rop));
    if (!data_type_reducible(t)) {
      return fail(what, FP8_INVALID("{} does not reduce", data_type_name(t)));
    }
    Status s = check_count(block, send, "reduce_scatter");
    if (s.ok()) s = check_count(block, recv, "reduce_scatter");
    // NCCL's in-place reduce-scatter is recv == send + rank * block, not send == recv (which the
    // MPI comm refuses too): the staged "in place" path would reduce into the wrong block.
    if (s.ok() && send == recv && block > 0) s = FP8_INVALID("send and recv must not alias");
    if (!s.ok()) return fail(what, s);
    const size_t bytes = block * data_type_size(t);
    return submit(what, [=, this](Op& op) -> Status {
      void *ds, *dr;
      FP8_RETURN_IF_ERROR(stage_pair(op, send, bytes * size(), recv, bytes, &ds, &dr));
      FP8_NCCL(ncclReduceScatter(ds, dr, block, nccl_type(t), nccl_op(rop), comm_, stream_));
      return Status::Ok();
    });
  }

  Work all_gather(const void* send, void* recv, int64_t block, DataType t) override {
    const std::string what = fmt::format("all_gather {} x {}", block, data_type_name(t));
    Status s = check_count(block, send, "all_gather");
    if (s.ok()) s = check_count(block, recv, "all_gather");
    if (!s.ok()) return fail(what, s);
    const size_t bytes = block * data_type_size(t);
    return submit(what, [=, this](Op& op) -> Status {
      void *ds, *dr;
      FP8_RETURN_IF_ERROR(stage_pair(op, send, bytes, recv, bytes * size(), &ds, &dr));
      FP8_NCCL(ncclAllGather(ds, dr, block, nccl_type(t), comm_, stream_));
      return Status::Ok();
    });
  }

  Work broadcast(void* buf, int64_t count, DataType t, int root) override {
    const std::string what =
        fmt::format("broadcast {} x {} from {}", count, data_type_name(t), root);
    Status s = check_count(count, buf, "broadcast");
    if (s.ok() && (root < 0 || root >= size())) {
      s = FP8_INVALID("root {} outside [0, {})", root, size());
    }
    if (!s.ok()) return fail(what, s);
    const size_t bytes = count * data_type_size(t);
    return submit(what, [=, this](Op& op) -> Status {
      FP8_ASSIGN_OR_RETURN(void* d, stage(op, buf, bytes, rank() == root, rank() != root));
      FP8_NCCL(ncclBroadcast(d, d, bytes, ncclUint8, root, comm_, stream_));
      return Status::Ok();
    });
  }

  Work barrier() override {
    return submit("barrier", [this](Op& op) -> Status {
      FP8_ASSIGN_OR_RETURN(void* d, stage(op, nullptr, sizeof(int32_t), false, false));
      FP8_CUDA("barrier", cudaMemsetAsync(d, 0, sizeof(int32_t), stream_));
      FP8_NCCL(ncclAllReduce(d, d, 1, ncclInt32, ncclSum, comm_, stream_));
      return Status::Ok();
    });
  }

 private:
  // ---- queueing ----

  std::unique_ptr<Op> make_op(const std::string& what) {
    auto op = std::make_unique<Op>();
    op->what = fmt::format("{} on {}", what, group_.name);
    std::shared_ptr<History> h = history_;
    op->state = std::make_shared<WorkState>(op->what, timeout_s_, [h] { return h->format(); });
    // (a): a wait or test on any Work of this comm issues the pending point-to-point batch, and
    // those of the process's other comms (their turn may come before this op's).
    op->state->set_kick([] { IssueOrder::get().kick_all(); });
    if (order_after_) op->ready = order_after_->record();
    return op;
  }

  Work submit(const std::string& what, IssueFn issue, bool p2p = false) {
    auto op = make_op(what);
    op->issue = std::move(issue);
    op->p2p = p2p;
    return enqueue(std::move(op));
  }

  Work enqueue(std::unique_ptr<Op> op) {
    Work w(op->state);
    history_->record(op->what + ": queued");
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_ || closed_) {
        op->state->complete(
            stop_ ? FP8_ERROR(Code::kAborted, "{}: the comm is shutting down", op->what)
                  : closed_status_.with_context(
                        fmt::format("{}: the comm failed earlier", op->what)));
        return w;
      }
      op->seq = ++last_seq_;
      op->ticket = IssueOrder::get().take();
      // (b): any other op issues the point-to-point batch posted before it, as a group, first.
      if (!op->p2p) flush_upto_ = op->seq;
      kick_->unflushed.store(flush_upto_ < last_seq_, std::memory_order_release);
      if (flush_upto_ < last_seq_) IssueOrder::get().note_unflushed();
      queue_.push_back(std::move(op));
    }
    cv_.notify_all();
    return w;
  }

  // Every op posted so far is to be issued, the pending point-to-point batch as one group:
  // triggers (a) (a Work's kick) and (c) (the destructor). Any
  // thread, any time: it only marks the batch (it never waits for the comm thread or calls CUDA /
  // NCCL), so a wait that flushes first cannot deadlock with that thread.
  void flush_pending() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (flush_upto_ >= last_seq_) return;
      flush_upto_ = last_seq_;
      queue_.back()->batch_end = true;  // the newest op is the batch's last (still queued)
      kick_->unflushed.store(false, std::memory_order_release);
    }
    cv_.notify_all();
  }

  Work fail(const std::string& what, const Status& s) {
    return Work::failed(s.with_context(fmt::format("{} on {}", what, group_.name)));
  }

  Status check_peer(int peer, int tag) const {
    if (peer < 0 || peer >= size()) return FP8_INVALID("peer {} outside [0, {})", peer, size());
    // peer == rank() is fine: a send to self and its receive issue in one group (nccl_comm.h).
    if (tag < 0) return FP8_INVALID("tag {} must be >= 0", tag);
    return Status::Ok();
  }
  static Status check_count(int64_t count, const void* buf, const char* what) {
    if (count < 0) return FP8_INVALID("{}: negative count {}", what, count);
    if (count > 0 && !buf) return FP8_INVALID("{}: null buffer for {} elements", what, count);
    return Status::Ok();
  }
  static Status check_row_elems(int64_t row_elems) {
    if (row_elems < 1) return FP8_INVALID("row_elems {} must be >= 1", row_elems);
    return Status::Ok();
  }
  // One non-negative count per rank; *total gets their sum.
  Status check_rows(std::span<const int64_t> c, const char* what, int64_t* total) const {
    if (static_cast<int>(c.size()) != size()) {
      return FP8_INVALID("{}: {} counts for a comm of {} ranks", what, c.size(), size());
    }
    *total = 0;
    for (int64_t v : c) {
      if (v < 0) return FP8_INVALID("{}: negative count {}", what, v);
      *total += v;
    }
    return Status::Ok();
  }
  Status check_counts(std::span<const int64_t> a, std::span<const int64_t> b) const {
    if (static_cast<int>(a.size()) != size() || static_cast<int>(b.size()) != size()) {
      return FP8_INVALID("need {} counts each way, got {} and {}", size(), a.size(), b.size());
    }
    return Status::Ok();
  }

  // ---- staging (runs on the comm thread, in stream order) ----

  // A device pointer for `bytes` at p. Host memory (or p == null: scratch) gets a device buffer
  // from the stream-ordered pool: filled from p now when `in`, copied back to p at completion
  // when `out`.
  Result<void*> stage(Op& op, void* p, size_t bytes, bool in, bool out) {
    if (bytes == 0) return p;
    if (p && is_device_ptr(p)) return p;
    void* d = nullptr;
    FP8_CUDA("staging alloc", cudaMallocAsync(&d, bytes, stream_));
    op.staged.push_back({p, d, bytes, out && p != nullptr});
    if (in && p) {
      FP8_CUDA("staging copy in", cudaMemcpyAsync(d, p, bytes, cudaMemcpyHostToDevice, stream_));
    }
    return d;
  }
  Status stage_pair(Op& op, const void* send, size_t sbytes, void* recv, size_t rbytes, void** ds,
                    void** dr) {
    if (send == recv) {  // in place
      FP8_ASSIGN_OR_RETURN(*ds, stage(op, recv, std::max(sbytes, rbytes), true, true));
      *dr = *ds;
      return Status::Ok();
    }
    FP8_ASSIGN_OR_RETURN(*ds, stage(op, const_cast<void*>(send), sbytes, true, false));
    FP8_ASSIGN_OR_RETURN(*dr, stage(op, recv, rbytes, false, true));
    return Status::Ok();
  }

  Status issue_counts(Op& op, const int64_t* send_counts, int64_t* recv_counts) {
    const size_t bytes = size() * sizeof(int64_t);
    FP8_ASSIGN_OR_RETURN(void* ds,
                         stage(op, const_cast<int64_t*>(send_counts), bytes, true, false));
    FP8_ASSIGN_OR_RETURN(void* dr, stage(op, recv_counts, bytes, false, true));
    FP8_NCCL(ncclGroupStart());
    ncclResult_t r = ncclSuccess;
    for (int p = 0; p < size() && r == ncclSuccess; ++p) {
      r = ncclSend(static_cast<int64_t*>(ds) + p, 1, ncclInt64, p, comm_, stream_);
      if (r == ncclSuccess)
        r = ncclRecv(static_cast<int64_t*>(dr) + p, 1, ncclInt64, p, comm_, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (r != ncclSuccess) {
      return FP8_ERROR(Code::kInternal, "exchange_counts: ncclSend/ncclRecv failed: {}",
                       ncclGetErrorString(r));
    }
    FP8_NCCL(end);
    return Status::Ok();
  }

  Status issue_all_to_all(Op& op, const void* send, const std::vector<int64_t>& sc, void* recv,
                          const std::vector<int64_t>& rc, size_t row_bytes) {
    const int64_t st = std::accumulate(sc.begin(), sc.end(), int64_t{0});
    const int64_t rt = std::accumulate(rc.begin(), rc.end(), int64_t{0});
    FP8_ASSIGN_OR_RETURN(void* ds, stage(op, const_cast<void*>(send), st * row_bytes, true, false));
    FP8_ASSIGN_OR_RETURN(void* dr, stage(op, recv, rt * row_bytes, false, true));
    const char* s = static_cast<const char*>(ds);
    char* r = static_cast<char*>(dr);
    // Checked before the group: ending a group half built would still launch its sends.
    if (sc[rank()] != rc[rank()]) {
      return FP8_INVALID("all_to_all_v: {} rows to self but {} from self", sc[rank()], rc[rank()]);
    }
    FP8_NCCL(ncclGroupStart());
    size_t so = 0, ro = 0;
    ncclResult_t nr = ncclSuccess;
    cudaError_t ce = cudaSuccess;
    for (int p = 0; p < size() && nr == ncclSuccess && ce == cudaSuccess; ++p) {
      const size_t sb = sc[p] * row_bytes, rb = rc[p] * row_bytes;
      if (p == rank()) {
        if (sb) ce = cudaMemcpyAsync(r + ro, s + so, sb, cudaMemcpyDeviceToDevice, stream_);
      } else {
        if (sb) nr = ncclSend(s + so, sb, ncclUint8, p, comm_, stream_);
        if (rb && nr == ncclSuccess) nr = ncclRecv(r + ro, rb, ncclUint8, p, comm_, stream_);
      }
      so += sb;
      ro += rb;
    }
    const ncclResult_t end = ncclGroupEnd();
    if (ce != cudaSuccess) return cuda_error(ce, "all_to_all_v self copy");
    if (nr != ncclSuccess) {
      return FP8_ERROR(Code::kInternal, "all_to_all_v: ncclSend/ncclRecv failed: {}",
                       ncclGetErrorString(nr));
    }
    FP8_NCCL(end);
    return Status::Ok();
  }

  // ---- the comm thread ----

  Status start(Op& op) {
    if (!op.ev) FP8_CUDA("event", cudaEventCreateWithFlags(&op.ev, cudaEventDisableTiming));
    FP8_RETURN_IF_ERROR(op.issue(op));
    FP8_CUDA("event record", cudaEventRecord(op.ev, stream_));
    return Status::Ok();
  }

  // Issues a point-to-point batch (in issue order) as one NCCL group, so that NCCL progresses its
  // sends and receives together; then records each op's event. Each op goes in flight, or is
  // finished with its error (an op that failed to stage is left out of the group, the rest go).
  void start_group(std::vector<std::unique_ptr<Op>>& ops) {
    std::vector<Status> st(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      if (!ops[i]->ev) {
        const cudaError_t e = cudaEventCreateWithFlags(&ops[i]->ev, cudaEventDisableTiming);
        if (e != cudaSuccess) st[i] = cuda_error(e, "event");
      }
    }
    const ncclResult_t begin = ncclGroupStart();
    if (begin == ncclSuccess) {
      for (size_t i = 0; i < ops.size(); ++i) {
        if (st[i].ok()) st[i] = ops[i]->issue(*ops[i]);
      }
    }
    const ncclResult_t end = begin == ncclSuccess ? ncclGroupEnd() : begin;
    Status group_status;
    if (end != ncclSuccess) {
      group_status = FP8_ERROR(Code::kInternal, "point-to-point group of {} ops: {}: {}",
                               ops.size(), begin == ncclSuccess ? "ncclGroupEnd" : "ncclGroupStart",
                               ncclGetErrorString(end));
    }
    history_->record(fmt::format("point-to-point batch of {} ops on {}: issued as one group",
                                 ops.size(), group_.name));
    for (auto& op : ops) release_ticket(*op);
    for (size_t i = 0; i < ops.size(); ++i) {
      if (st[i].ok()) st[i] = group_status;
      if (st[i].ok()) {
        const cudaError_t e = cudaEventRecord(ops[i]->ev, stream_);
        if (e != cudaSuccess) st[i] = cuda_error(e, "event record");
      }
      if (st[i].ok()) {
        inflight_.push_back(std::move(ops[i]));
      } else {
        finish(*ops[i], st[i]);
      }
    }
  }

  // Copies staged outputs back to host memory and releases the staging buffers.
  Status unstage(Op& op) {
    Status st;
    for (const Staged& s : op.staged) {
      if (s.copy_out && st.ok()) {
        // The op's event has completed: a plain copy (legacy stream, which does not wait for our
        // non-blocking streams) reads finished data.
        const cudaError_t e = cudaMemcpy(s.host, s.dev, s.bytes, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) st = cuda_error(e, "staging copy out");
      }
      cudaFreeAsync(s.dev, stream_);
    }
    op.staged.clear();
    return st;
  }

  void finish(Op& op, Status s) {
    release_ticket(op);
    Status u = unstage(op);
    if (s.ok()) s = u;
    if (s.ok() && op.after) op.after();
    if (op.ev) cudaEventDestroy(op.ev);
    op.ev = nullptr;
    history_->record(op.what + (s.ok() ? ": done" : ": FAILED: " + s.message()));
    op.state->complete(std::move(s));
  }

  // Polls the in-flight ops once; true if any completed.
  bool poll() {
    bool progressed = false;
    if (blocked_) {
      const cudaError_t e = cudaEventQuery(blocked_->ev);
      if (e == cudaSuccess) {
        progressed = true;
        Status s = unstage(*blocked_);
        Result<IssueFn> nx = s.ok() ? blocked_->next() : Result<IssueFn>(s);
        if (nx.ok()) {
          blocked_->issue = std::move(nx.value());
          blocked_->next = nullptr;
          s = start(*blocked_);
        } else {
          s = nx.status();
        }
        if (s.ok()) {
          release_ticket(*blocked_);  // its last phase is on the device
          inflight_.push_back(std::move(blocked_));
        } else {
          finish(*blocked_, s);
        }
        blocked_.reset();
      } else if (e != cudaErrorNotReady) {
        finish(*blocked_, cuda_error(e, "event query"));
        blocked_.reset();
      }
    }
    for (auto it = inflight_.begin(); it != inflight_.end();) {
      const cudaError_t e = cudaEventQuery((*it)->ev);
      if (e == cudaErrorNotReady) {
        ++it;
        continue;
      }
      progressed = true;
      finish(**it, e == cudaSuccess ? Status::Ok() : cuda_error(e, "event query"));
      it = inflight_.erase(it);
    }
    return progressed;
  }

  // NCCL's asynchronous error (a peer died, a network error), or Ok.
  Status async_error() {
    ncclResult_t r = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess) return Status::Ok();
    if (r == ncclSuccess || r == ncclInProgress) return Status::Ok();
    return FP8_ERROR(Code::kAborted, "NCCL asynchronous error on {}: {} ({})", group_.name,
                     ncclGetErrorString(r), ncclGetLastError(comm_));
  }

  // Frees the NCCL comm once (from the comm thread after an error, or from the destructor).
  void release_comm(bool abort) {
    if (released_.exchange(true)) return;
    if (abort) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }

  void wait_finished(double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    while (!finished_.load() && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  // Fails every op, and every op submitted later (the comm thread exits after this).
  void fail_all(const Status& s) {
    if (blocked_) finish(*blocked_, s);
    blocked_.reset();
    for (auto& op : inflight_) finish(*op, s);
    inflight_.clear();
    std::deque<std::unique_ptr<Op>> q;
    {
      std::lock_guard<std::mutex> lk(mu_);
      q.swap(queue_);
      closed_ = true;
      closed_status_ = s;
    }
    for (auto& op : q) {
      release_ticket(*op);
      op->state->complete(s);
    }
  }

  void loop() {
    cudaSetDevice(device_);
    for (;;) {
      if (aborted_.load()) {
        fail_all(FP8_ERROR(Code::kAborted, "nccl comm {} aborted", group_.name));
        break;
      }
      if (Status s = async_error(); !s.ok()) {
        // Abort before failing the ops: their kernels must stop before a caller that sees the
        // error reuses or frees the buffers (and so that a hung kernel cannot hang shutdown).
        release_comm(/*abort=*/true);
        fail_all(s);
        break;
      }
      bool progressed = false;
      // Issue queued ops in order: one op, or a flushed point-to-point batch as one group (each
      // waits for its producer event: the group is enqueued once all of them have completed).
      while (!blocked_ && !aborted_.load()) {
        std::vector<std::unique_ptr<Op>> ops;
        if (!take_next(&ops)) break;
        progressed = true;
        if (ops.front()->p2p) {
          start_group(ops);
          continue;
        }
        std::unique_ptr<Op> op = std::move(ops.front());
        if (Status s = start(*op); !s.ok()) {
          finish(*op, s);
        } else if (op->next) {
          blocked_ = std::move(op);  // its turn in the issue order ends with its last phase
        } else {
          release_ticket(*op);
          inflight_.push_back(std::move(op));
        }
      }
      progressed |= poll();
      std::unique_lock<std::mutex> lk(mu_);
      const bool busy = !inflight_.empty() || blocked_;
      const bool idle = queue_.empty() && !busy;
      if (idle && stop_) break;
      if (idle) {
        cv_.wait_for(lk, std::chrono::milliseconds(50));
      } else if (!busy && deferred_locked()) {
        // Only a pending batch: sleep until a trigger (a new op, a wait, a flush).
        cv_.wait_for(lk, std::chrono::milliseconds(50));
      } else if (!progressed) {
        lk.unlock();
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
    finished_.store(true);
  }

  // The head of the queue is a point-to-point op that no trigger has flushed yet. Needs mu_.
  bool deferred_locked() const {
    return !queue_.empty() && queue_.front()->p2p && queue_.front()->seq > flush_upto_;
  }

  // Moves the next ops to issue out of the queue, if they can go now: the head op once its
  // producer event has completed, or, when the head is point-to-point, the flushed batch (the
  // consecutive point-to-point ops posted up to the flush point) once all of theirs have; and in
  // either case only when its turn has come in the process's issue order (a batch takes the
  // turn of its first op).
  bool take_next(std::vector<std::unique_ptr<Op>>* ops) {
    std::lock_guard<std::mutex> lk(mu_);
    if (queue_.empty()) return false;
    if (!IssueOrder::get().turn_of(queue_.front()->ticket)) return false;
    size_t n = 1;
    if (queue_.front()->p2p) {
      if (deferred_locked()) return false;  // no trigger yet
      while (n < queue_.size() && !queue_[n - 1]->batch_end && queue_[n]->p2p &&
             queue_[n]->seq <= flush_upto_)
        ++n;
    }
    for (size_t i = 0; i < n; ++i) {
      if (queue_[i]->ready && !queue_[i]->ready->query()) return false;
    }
    for (size_t i = 0; i < n; ++i) {
      ops->push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    return true;
  }

  ncclComm_t comm_;
  Group group_;
  double timeout_s_;
  int device_;
  Stream* order_after_;
  cudaStream_t stream_;
  std::shared_ptr<History> history_;
  std::shared_ptr<KickTarget> kick_;

  std::mutex mu_;  // guards queue_, the sequence numbers, stop_, closed_ ...
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Op>> queue_;  // posted, not issued yet (with the pending batch)
  uint64_t last_seq_ = 0;                  // seq of the last posted op
  uint64_t flush_upto_ = 0;                // point-to-point ops with seq <= this are flushed
  bool stop_ = false;
  bool closed_ = false;  // the comm thread has failed every op and exited
  Status closed_status_;
  // Comm-thread only:
  std::deque<std::unique_ptr<Op>> inflight_;
  std::unique_ptr<Op> blocked_;
  std::atomic<bool> finished_{false};
  std::atomic<bool> aborted_{false};
  std::atomic<bool> released_{false};  // comm_ destroyed or aborted
  std::thread worker_;
};

void IssueOrder::kick_all() {
  if (!maybe_unflushed_.exchange(false, std::memory_order_acq_rel)) return;
  std::vector<std::shared_ptr<KickTarget>> cs;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& k : comms_) {
      if (k->unflushed.load(std::memory_order_acquire)) cs.push_back(k);
    }
  }
  for (const auto& k : cs) {
    std::lock_guard<std::mutex> lk(k->mu);
    if (k->comm) k->comm->flush_pending();
  }
}

}  // namespace

Result<std::unique_ptr<Comm>> create_nccl_comm(Comm& mpi, const NcclOptions& opts) {
  if (!(opts.timeout_s > 0)) {
    return FP8_INVALID("fault.timeout_s must be > 0, got {}", opts.timeout_s);
  }
  int count = 0;
  FP8_CUDA("cudaGetDeviceCount", cudaGetDeviceCount(&count));
  if (opts.device < 0 || opts.device >= count) {
    return Status(Code::kInvalidArgument,
                  fmt::format("nccl comm {}: CUDA device {} does not exist ({} visible)",
                              mpi.name(), opts.device, count),
                  "one GPU per local rank: start at most as many ranks per node as GPUs");
  }
  FP8_CUDA("cudaSetDevice", cudaSetDevice(opts.device));
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (mpi.rank() == 0) FP8_NCCL(ncclGetUniqueId(&id));
  FP8_RETURN_IF_ERROR(
      mpi.broadcast(&id, sizeof(id), DataType::kByte, 0).wait().with_context("ncclUniqueId"));
  ncclComm_t comm = nullptr;
  FP8_NCCL(ncclCommInitRank(&comm, mpi.size(), id, mpi.rank()));
  cudaStream_t stream = nullptr;
  const cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    ncclCommDestroy(comm);
    return cuda_error(e, "comm stream");
  }
  return std::unique_ptr<Comm>(std::make_unique<NcclComm>(comm, mpi.group(), opts, stream));
}

Result<CommSet> create_nccl_comms(CommSet& mpi, const NcclOptions& opts) {
  CommSet set;
  std::unique_ptr<Comm>* dst[] = {&set.world, &set.pp, &set.dp, &set.ep, &set.expert_dp, &set.node};
  for (size_t i = 0; i < kGroupKinds.size(); ++i) {
    FP8_ASSIGN_OR_RETURN(*dst[i], create_nccl_comm(mpi.get(kGroupKinds[i]), opts));
  }
  return set;
}

}  // namespace fp8pipe::parallel
