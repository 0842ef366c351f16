// Comm: one communicator = one Topology group, with nonblocking operations that each return a
// Work handle, so the executor keeps communication in flight while it computes (DESIGN.md §3, §5).
// One small interface for every backend (STYLE.md 6): MPI here (parallel/mpi_comm.cc), NCCL later.
//
// Contract shared by all backends:
//   - Buffers passed to an op must stay valid (and unread / unwritten) until its Work is done.
//   - Collectives: every rank of the comm issues the same ones in the same order. Ops issued on
//     one comm start in issue order; messages between two ranks with one tag arrive in order.
//   - Errors are values: an invalid argument yields an already-failed Work; a wait that outlives
//     the comm's timeout (config fault.timeout_s) fails naming the op, the peer and group, and
//     the last comm ops of this process. The caller decides; a fatal error calls abort_all().
//   - Census (MPI): before a timeout is reported, the rank asks every other member of the op's
//     group what it is doing, on a private duplicate of MPI_COMM_WORLD that each comm thread
//     serves even while its compute thread is busy. Members that do not answer (stopped, hung in
//     a system call, dead) and, for a collective, members that have not issued it yet are named
//     in the first line of the error; the others' answers follow it. So a hang inside a world
//     all-reduce names the hung rank, not just the collective.
//
// MPI threading (the choice, and why): every MPI call after start-up is made by ONE comm thread
// per process, shared by all communicators. It starts ops with nonblocking MPI (MPI_Isend,
// MPI_Ialltoallv, MPI_Iallreduce, ...) and polls them with MPI_Testall, so MPI progresses while
// the compute thread works and never calls into MPI. One poller avoids OpenMPI 4.1's lock
// contention between threads polling the same progress engine, and needs only
// MPI_THREAD_SERIALIZED; mpi_init() asks for MPI_THREAD_MULTIPLE (so abort_all() may call
// MPI_Abort from any thread) and fails clearly below SERIALIZED. Communicator creation also runs
// on the comm thread (blocking MPI_Comm_split, after a timed check that every rank arrived). The
// comm thread is the CPU "comm stream" of DESIGN.md §3; it is not a core/cpu_stream.h CpuStream,
// which runs one closure at a time, because it keeps many ops in flight and polls them together.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "parallel/topology.h"

namespace fp8pipe::parallel {

// Element types on the wire. bf16 and bytes (FP8 payloads, packed structs) move but do not reduce.
enum class DataType { kFloat32, kFloat64, kInt32, kInt64, kBFloat16, kByte };
int64_t data_type_size(DataType t);
const char* data_type_name(DataType t);
bool data_type_reducible(DataType t);  // fp32, fp64, int32, int64

enum class ReduceOp { kSum, kMax, kMin };
const char* reduce_op_name(ReduceOp op);

// The completion state of one op, shared by its Work handles and the backend, which completes it
// exactly once. `history` (optional) describes the process's recent comm ops for timeout errors;
// `census` (optional) asks the op's peers what they are doing once a wait has timed out: it may
// append to the error's first line (`headline`) and returns lines for its body.
class WorkState {
 public:
  using Census = std::function<std::string(std::string* headline)>;
  WorkState(std::string what, double timeout_s, std::function<std::string()> history = {},
            Census census = {});
  // Called from the waiting or testing thread before a wait blocks and whenever a test finds the
  // op not done: a backend that defers ops (the NCCL comm's grouped point-to-point batch) issues
  // them here. Must be cheap, must not block, must not call into MPI. Set before the op is shared.
  void set_kick(std::function<void()> kick) { kick_ = std::move(kick); }
  void kick() const {
    if (kick_ && !done()) kick_();
  }
  void complete(Status s);
  bool done() const { return done_.load(std::memory_order_acquire); }
  Status wait_for(double timeout_s);
  double timeout_s() const { return timeout_s_; }
  const std::string& what() const { return what_; }

 private:
  std::string what_;
  double timeout_s_;
  std::function<std::string()> history_;
  Census census_;
  std::function<void()> kick_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> done_{false};
  Status status_;
};

// A handle to one nonblocking op. Copies share the op. Dropping every handle does not cancel it.
class Work {
 public:
  Work() = default;  // an op that is already done, successfully
  explicit Work(std::shared_ptr<WorkState> s) : state_(std::move(s)) {}
  static Work failed(Status s);  // an op that is already done, with an error

  // Done (successfully or not)? Never blocks and never calls into MPI: a compute thread may spin
  // on it.
  bool test() const {
    if (!state_ || state_->done()) return true;
    state_->kick();
    return state_->done();
  }
  // Blocks until done or the comm's timeout (fault.timeout_s); the op's error, or a timeout error
  // naming the op, its peer and group, and the last comm ops. After a timeout the op is still in
  // flight: waiting again may succeed; buffers stay in use.
  Status wait() const;
  Status wait_for(double timeout_s) const;

 private:
  std::shared_ptr<WorkState> state_;
};

// Waits for the ops in order (each with its own timeout); stops at the first error.
Status wait_all(std::span<const Work> works);

class Comm {
 public:
  virtual ~Comm() = default;
  virtual const Group& group() const = 0;  // name, world ranks, this rank's position
  virtual double timeout_s() const = 0;
  // Buffers may be device memory (NCCL). False (MPI): host memory only; a caller holding device
  // tensors stages them through the host (the pipeline executor, the MoE's exchange).
  virtual bool device_buffers() const { return false; }
  // Point-to-point ops block until matched and are issued in groups (NCCL, nccl_comm.h): a caller
  // that sends and receives in both directions must post matched groups (the pipeline executor
  // does, parallel/p2p_plan.h). False (MPI): sends and receives progress independently.
  virtual bool p2p_matched_groups() const { return false; }
  int rank() const { return group().index; }
  int size() const { return group().size(); }
  const std::string& name() const { return group().name; }

  // Point to point; peer is a rank of this comm, tag >= 0. The receive must match the sent count.
  virtual Work send(const void* buf, int64_t count, DataType t, int peer, int tag) = 0;
  virtual Work recv(void* buf, int64_t count, DataType t, int peer, int tag) = 0;

  // All-to-all with known counts, in rows of `row_elems` elements: send_counts[i] rows of `send`
  // go to rank i and recv_counts[i] rows of `recv` come from rank i; blocks are contiguous in
  // rank order in both buffers. Zero counts are fine.
  virtual Work all_to_all_v(const void* send, std::span<const int64_t> send_counts, void* recv,
                            std::span<const int64_t> recv_counts, DataType t,
                            int64_t row_elems = 1) = 0;
  // One int64 to and from each rank: recv_counts[i] = rank i's send_counts[rank()].
  virtual Work exchange_counts(std::span<const int64_t> send_counts,
                               std::span<int64_t> recv_counts) = 0;
  // Counts first, then data, as one op: exchanges the counts, fills *recv_counts, calls
  // alloc(total rows) on the comm thread for the receive buffer (may return null when the total
  // is 0), then runs all_to_all_v into it. Later collectives on this comm start after its data
  // phase, so every rank keeps the same collective order.
  using RecvAlloc = std::function<void*(int64_t total_rows)>;
  virtual Work all_to_all_v_counted(const void* send, std::span<const int64_t> send_counts,
                                    DataType t, int64_t row_elems, RecvAlloc alloc,
                                    std::vector<int64_t>* recv_counts) = 0;

  // Reductions (fp32, fp64, int32, int64). send == recv reduces in place.
  virtual Work all_reduce(const void* send, void* recv, int64_t count, DataType t, ReduceOp op) = 0;
  // send holds size() blocks of `block` elements; recv gets the reduced block rank().
  virtual Work reduce_scatter(const void* send, void* recv, int64_t block, DataType t,
                              ReduceOp op = ReduceOp::kSum) = 0;
  // recv gets size() blocks of `block` elements, block i from rank i.
  virtual Work all_gather(const void* send, void* recv, int64_t block, DataType t) = 0;
  virtual Work broadcast(void* buf, int64_t count, DataType t, int root) = 0;
  virtual Work barrier() = 0;
};

// A control-flow decision taken together (STYLE.md 8): a MIN all-reduce of `ok`; true only when
// every rank of the comm passed true. Blocking, with the comm's timeout.
Result<bool> agree(Comm& comm, bool ok);

// ---- MPI backend (parallel/mpi_comm.cc) ----

struct MpiWorld {
  int rank = 0;
  int size = 1;
  // Ranks per host (MPI_Comm_split_type) when every host holds the same number of consecutive
  // ranks; else 0. Resolves config parallel.ranks_per_node = 0.
  int ranks_per_host = 0;
  int thread_level = 0;  // MPI_THREAD_* provided
};

// MPI_Init_thread asking for MPI_THREAD_MULTIPLE; fails below MPI_THREAD_SERIALIZED. Sets the
// process rank used by Status and log lines. If MPI is already initialised, checks its level.
Result<MpiWorld> mpi_init(int* argc, char*** argv);
// MPI_Finalize; fails if a CommSet is still alive.
Status mpi_finalize();

struct CommOptions {
  double timeout_s = 600;  // config fault.timeout_s: the default timeout of every Work::wait
};

// One communicator per group of the Topology, created eagerly in the fixed kGroupKinds order on
// every rank.
struct CommSet {
  std::unique_ptr<Comm> world, pp, dp, ep, expert_dp, node;
  Comm& get(GroupKind k);
};

// Checks that the started ranks match the layout and that every rank passed the same layout
// (a MIN/MAX all-reduce, with the timeout), then splits MPI_COMM_WORLD into every group.
Result<CommSet> create_comms(const Topology& topo, const CommOptions& opts = {});

// Logs `why` and calls MPI_Abort on MPI_COMM_WORLD, so peers exit instead of hanging (STYLE.md 7).
[[noreturn]] void abort_all(const Status& why);

}  // namespace fp8pipe::parallel
