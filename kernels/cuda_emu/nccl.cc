// fp8pipe CUDA emulation: NCCL between the processes of one host (include/nccl.h).
//
// Rendezvous: the unique id names a file under $TMPDIR; every rank maps it (MAP_SHARED). It holds
// a header (ranks joined, their devices, an abort flag) and one byte ring per ordered pair of
// ranks, with monotonic written / read counters (one writer and one reader each).
//
// An operation is a list of point-to-point tasks plus a finishing step (a collective's reduction):
// a message is a 32-byte header (size, kind, collective number and shape) and its payload, so a
// receive checks that the matching send is the one it expects. Sends complete only when the
// receiver has taken the whole message (NCCL's blocking point-to-point, not an eager buffer). An
// operation (or an ncclGroupStart/End group of them on one communicator) is stream work
// (cuda_emu::submit_gated): it starts when its stream reaches it and holds the stream until a
// progress thread has moved all its bytes.
//
// Device model (FP8PIPE_EMU_NCCL): `serial` (default) progresses one operation at a time per
// process, in the order they were launched (each once its stream has reached it), as a GPU that
// cannot run two NCCL kernels at once: operations of several communicators then deadlock unless
// every rank launches them in a matching order, which is NCCL's documented requirement for using
// communicators concurrently.
// `concurrent` progresses all of them at once. An operation stalled for FP8PIPE_EMU_NCCL_STALL_S
// seconds (default 20) is reported on stderr with what it waits for and what waits behind it.
#include "nccl.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fp8pipe::cuda_emu::nccl_emu {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kRing = 256 << 10;  // bytes of one direction of one pair
constexpr int kMaxRanks = 64;
constexpr double kJoinTimeoutS = 300;

double env_double(const char* name, double dflt) {
  const char* e = std::getenv(name);
  return e ? std::atof(e) : dflt;
}
bool serial_mode() {
  static const bool s = [] {
    const char* e = std::getenv("FP8PIPE_EMU_NCCL");
    return e == nullptr || std::string(e) != "concurrent";
  }();
  return s;
}

struct alignas(64) Channel {  // one direction of one pair: src writes, dst reads
  std::atomic<uint64_t> written;
  char pad0[56];
  std::atomic<uint64_t> read;
  char pad1[56];
  char data[kRing];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "the rings are shared between processes");

struct Slot {
  std::atomic<uint32_t> joined;
  int32_t device;
  int64_t pid;
  char host[64];
};

struct Shared {
  std::atomic<uint32_t> state;  // 0: a fresh (zeroed) file, 1: being set up, 2: ready
  uint32_t nranks;
  std::atomic<uint32_t> joined;
  std::atomic<uint32_t> aborted;  // 1 + the rank that aborted the communicator
  Slot slots[kMaxRanks];
};

size_t header_bytes() { return (sizeof(Shared) + 4095) / 4096 * 4096; }

// Message kinds, and the header that precedes every payload on a ring.
enum Kind : uint32_t { kP2p = 1, kAllReduce, kAllGather, kReduceScatter, kBroadcast };
const char* kind_name(uint32_t k) {
  switch (k) {
    case kP2p:
      return "send/recv";
    case kAllReduce:
      return "all_reduce";
    case kAllGather:
      return "all_gather";
    case kReduceScatter:
      return "reduce_scatter";
    case kBroadcast:
      return "broadcast";
  }
  return "?";
}
struct Hdr {
  uint64_t bytes;
  uint32_t kind;
  uint32_t coll;   // the communicator's collective number (0 for send/recv)
  uint64_t shape;  // collectives: count, type and op; send/recv: 0
  uint64_t magic;
};
static_assert(sizeof(Hdr) == 32);
constexpr uint64_t kMagic = 0x6670387069706521ull;

std::string describe(const Hdr& h) {
  char b[160];
  if (h.kind == kP2p) {
    std::snprintf(b, sizeof(b), "%s of %llu bytes", kind_name(h.kind),
                  static_cast<unsigned long long>(h.bytes));
  } else {
    std::snprintf(b, sizeof(b), "%s #%u (count %llu, type %d, op %d; %llu bytes)",
                  kind_name(h.kind), h.coll, static_cast<unsigned long long>(h.shape >> 16),
                  static_cast<int>((h.shape >> 8) & 0xff), static_cast<int>(h.shape & 0xff),
                  static_cast<unsigned long long>(h.bytes));
  }
  return b;
}

struct CommState {
  int rank = 0, nranks = 0, device = 0;
  std::string path;
  void* base = nullptr;
  size_t map_bytes = 0;
  Shared* sh = nullptr;
  std::atomic<int> async_error{ncclSuccess};
  std::mutex err_mu;
  std::string last_error;
  std::atomic<bool> aborted{false};
  uint32_t colls = 0;  // collectives issued on this rank (host order, as NCCL requires)
  // The task that owns each ring end of this rank now (progress thread only).
  std::vector<const void*> send_owner, recv_owner;

  ~CommState() {
    if (base) munmap(base, map_bytes);
  }
  Channel& chan(int src, int dst) {
    char* p = static_cast<char*>(base) + header_bytes() +
              (static_cast<size_t>(src) * nranks + dst) * sizeof(Channel);
    return *reinterpret_cast<Channel*>(p);
  }
  std::string tag() const {
    const size_t slash = path.rfind('/');
    return "comm " + path.substr(slash == std::string::npos ? 0 : slash + 1) + " rank " +
           std::to_string(rank);
  }
  // Records the first asynchronous error (what ncclCommGetAsyncError reports).
  void fail(ncclResult_t r, const std::string& msg) {
    int expected = ncclSuccess;
    if (async_error.compare_exchange_strong(expected, r)) {
      {
        std::lock_guard<std::mutex> lk(err_mu);
        last_error = msg;
      }
      std::fprintf(stderr, "cuda_emu NCCL %s: %s\n", tag().c_str(), msg.c_str());
    }
  }
};

}  // namespace
}  // namespace fp8pipe::cuda_emu::nccl_emu

struct ncclComm {
  std::shared_ptr<fp8pipe::cuda_emu::nccl_emu::CommState> s;
};

namespace fp8pipe::cuda_emu::nccl_emu {
namespace {

// One message of an operation. A send moves [header | payload] into the ring to `peer`; a receive
// moves them out of the ring from `peer`, checking the header against `hdr`.
struct Task {
  bool send = false;
  int peer = 0;
  Hdr hdr{};
  const char* src = nullptr;  // send payload
  char* dst = nullptr;        // receive payload
  uint64_t base = 0;          // ring position of the message's first byte
  uint64_t pos = 0;           // bytes of header + payload moved
  bool claimed = false, moved = false, done = false;
  Hdr got{};  // a receive's header as read
  uint64_t total() const { return sizeof(Hdr) + hdr.bytes; }
};

struct Op {
  std::shared_ptr<CommState> comm;
  std::string what;
  std::vector<Task> tasks;
  std::vector<std::function<void()>> finish;  // run once every task is done (reductions, copies)
  std::atomic<bool> reached{false}, done{false};  // its stream got to it; all bytes moved
  Clock::time_point last_progress;
  bool stall_reported = false;
  Clock::time_point last_liveness;
};

// Copies n bytes of a message at position pos out of (send) or into (receive) the task's buffers.
void ring_copy(char* ring, uint64_t ring_pos, char* mem, uint64_t n, bool to_ring) {
  const uint64_t off = ring_pos % kRing, first = std::min(n, kRing - off);
  if (to_ring) {
    std::memcpy(ring + off, mem, first);
    std::memcpy(ring, mem + first, n - first);
  } else {
    std::memcpy(mem, ring + off, first);
    std::memcpy(mem + first, ring, n - first);
  }
}

// Advances one task; true if it moved bytes or finished. Sets *err on a mismatched message.
bool progress_task(CommState& c, Task& t, std::string* err) {
  if (t.done) return false;
  const void*& owner = t.send ? c.send_owner[t.peer] : c.recv_owner[t.peer];
  Channel& ch = t.send ? c.chan(c.rank, t.peer) : c.chan(t.peer, c.rank);
  if (!t.claimed) {
    if (owner != nullptr) return false;  // an earlier message on this ring is still moving
    owner = &t;
    t.claimed = true;
    t.base = t.send ? ch.written.load(std::memory_order_relaxed)
                    : ch.read.load(std::memory_order_relaxed);
  }
  const uint64_t total = t.total();
  if (!t.moved) {
    const uint64_t at = t.base + t.pos;
    uint64_t n;
    if (t.send) {
      n = kRing - (at - ch.read.load(std::memory_order_acquire));  // free space
    } else {
      n = ch.written.load(std::memory_order_acquire) - at;  // bytes waiting
    }
    // Header and payload are copied in separate steps, so the header can be checked first.
    n = std::min(n, t.pos < sizeof(Hdr) ? sizeof(Hdr) - t.pos : total - t.pos);
    if (n == 0) return false;
    char* mem = t.pos < sizeof(Hdr)
                    ? reinterpret_cast<char*>(t.send ? &t.hdr : &t.got) + t.pos
                    : (t.send ? const_cast<char*>(t.src) : t.dst) + (t.pos - sizeof(Hdr));
    ring_copy(ch.data, at, mem, n, t.send);
    t.pos += n;
    if (t.send) {
      ch.written.store(t.base + t.pos, std::memory_order_release);
    } else {
      if (t.pos == sizeof(Hdr)) {
        const Hdr& g = t.got;
        if (g.magic != kMagic || g.bytes != t.hdr.bytes || g.kind != t.hdr.kind ||
            g.coll != t.hdr.coll || g.shape != t.hdr.shape) {
          *err = "rank " + std::to_string(c.rank) + " expected a " + describe(t.hdr) +
                 " from rank " + std::to_string(t.peer) + ", which sent a " + describe(g) +
                 " (mismatched sizes, or operations issued in different orders)";
          t.done = true;
          owner = nullptr;
          return true;
        }
      }
      ch.read.store(t.base + t.pos, std::memory_order_release);
    }
    if (t.pos == total) {
      t.moved = true;
      owner = nullptr;
      if (!t.send) t.done = true;
    }
    return true;
  }
  // A send is done once the receiver has taken all of it.
  if (ch.read.load(std::memory_order_acquire) >= t.base + total) {
    t.done = true;
    return true;
  }
  return false;
}

// The progress thread: moves the bytes of every started operation.
class Engine {
 public:
  static Engine& get() {
    static Engine* e = new Engine;  // never destroyed: the thread runs until the process exits
    return *e;
  }
  // At the launch: the op takes its place in the device's order (the order of launches, as a
  // GPU's work queue), and moves bytes once its stream has reached it.
  void launch(const std::shared_ptr<Op>& op) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      op->last_progress = op->last_liveness = Clock::now();
      active_.push_back(op);
    }
    cv_.notify_one();
  }

 private:
  Engine() : stall_s_(env_double("FP8PIPE_EMU_NCCL_STALL_S", 20)) {
    std::thread([this] { loop(); }).detach();
  }

  // Ends an op: its finishing steps run unless it failed; the stream may then go on.
  static void complete(Op& op, bool ok) {
    if (ok) {
      for (auto& f : op.finish) f();
    }
    for (Task& t : op.tasks) {  // release the rings this op held (a failed op)
      const void*& owner = t.send ? op.comm->send_owner[t.peer] : op.comm->recv_owner[t.peer];
      if (owner == &t) owner = nullptr;
    }
    op.done.store(true, std::memory_order_release);
  }

  // One pass over an op; true if it made progress.
  bool advance(Op& op) {
    CommState& c = *op.comm;
    // An aborted communicator's ops end at once, wherever they are in the device's order.
    if (c.aborted.load()) {
      complete(op, false);
      return true;
    }
    if (const uint32_t who = c.sh->aborted.load(); who != 0) {
      c.fail(ncclRemoteError,
             op.what + ": rank " + std::to_string(who - 1) + " aborted the communicator");
      complete(op, false);
      return true;
    }
    if (!op.reached.load(std::memory_order_acquire)) {
      op.last_progress = Clock::now();  // not stalled: its stream has not got to it yet
      return false;
    }
    bool progressed = false;
    std::string err;
    bool all = true;
    for (Task& t : op.tasks) {
      progressed |= progress_task(c, t, &err);
      if (!err.empty()) {
        c.fail(ncclInvalidUsage, op.what + ": " + err);
        complete(op, false);
        return true;
      }
      all = all && t.done;
    }
    const auto now = Clock::now();
    if (all) {
      complete(op, true);
      return true;
    }
    if (progressed) {
      op.last_progress = now;
      op.stall_reported = false;
      return true;
    }
    if (now - op.last_liveness > std::chrono::seconds(1)) {
      op.last_liveness = now;
      for (const Task& t : op.tasks) {
        const int64_t pid = c.sh->slots[t.peer].pid;
        if (!t.done && pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
          c.fail(ncclRemoteError, op.what + ": rank " + std::to_string(t.peer) + " (pid " +
                                      std::to_string(pid) + ") has exited");
          complete(op, false);
          return true;
        }
      }
    }
    if (!op.stall_reported &&
        std::chrono::duration<double>(now - op.last_progress).count() > stall_s_) {
      op.stall_reported = true;
      report_stall(op);
    }
    return false;
  }

  void report_stall(const Op& op) {
    std::string s = "cuda_emu NCCL " + op.comm->tag() + ": " + op.what +
                    " has made no progress for " + std::to_string(static_cast<int>(stall_s_)) +
                    " s; waiting on:";
    for (const Task& t : op.tasks) {
      if (t.done) continue;
      s += std::string("\n    ") + (t.send ? "send to" : "recv from") + " rank " +
           std::to_string(t.peer) + ": " + describe(t.hdr) +
           (t.moved ? " (written; the receiver has not taken it)" : "");
    }
    std::lock_guard<std::mutex> lk(mu_);
    if (serial_mode() && active_.size() > 1) {
      s += "\n  behind it on this device (FP8PIPE_EMU_NCCL=serial runs one NCCL operation at a "
           "time, as a GPU may; every rank must start operations of different communicators in "
           "a matching order):";
      for (size_t i = 1; i < active_.size() && i < 9; ++i) {
        s += "\n    " + active_[i]->what + " on " + active_[i]->comm->tag();
      }
    }
    std::fprintf(stderr, "%s\n", s.c_str());
  }

  void loop() {
    int idle = 0;
    for (;;) {
      std::vector<std::shared_ptr<Op>> ops;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return !active_.empty(); });
        if (serial_mode()) {
          ops.push_back(active_.front());
          for (size_t i = 1; i < active_.size(); ++i) {  // and those an abort ends
            const CommState& c = *active_[i]->comm;
            if (c.aborted.load() || c.sh->aborted.load() != 0) ops.push_back(active_[i]);
          }
        } else {
          ops.assign(active_.begin(), active_.end());
        }
      }
      bool progressed = false;
      for (auto& op : ops) progressed |= advance(*op);
      {
        std::lock_guard<std::mutex> lk(mu_);
        active_.erase(std::remove_if(active_.begin(), active_.end(),
                                     [](const std::shared_ptr<Op>& o) { return o->done.load(); }),
                      active_.end());
      }
      if (progressed) {
        idle = 0;
      } else if (++idle < 64) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(idle < 4096 ? 20 : 200));
      }
    }
  }

  const double stall_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> active_;  // in launch order
};

// ---- groups and enqueueing ----

struct GroupState {
  int depth = 0;
  ncclResult_t first_error = ncclSuccess;
  // One op per communicator in the group, with the stream of its first call.
  std::vector<std::pair<std::shared_ptr<Op>, cudaStream_t>> ops;
};
thread_local GroupState group;
thread_local std::string last_error_copy;
std::mutex global_err_mu;
std::string global_last_error;  // errors without a communicator (init, arguments)

ncclResult_t usage(ncclResult_t r, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lk(global_err_mu);
    global_last_error = msg;
  }
  std::fprintf(stderr, "cuda_emu NCCL: %s\n", msg.c_str());
  if (group.depth > 0 && group.first_error == ncclSuccess) group.first_error = r;
  return r;
}

void launch(const std::shared_ptr<Op>& op, cudaStream_t stream) {
  Engine::get().launch(op);
  submit_gated(stream, [op] {
    op->reached.store(true, std::memory_order_release);
    return op->done.load(std::memory_order_acquire);
  });
}

// The op that a call on `comm` adds to: the group's (made on first use), or a new one launched
// by `done_call` right away outside a group.
std::shared_ptr<Op> op_for(ncclComm_t comm, cudaStream_t stream, const char* what) {
  if (group.depth > 0) {
    for (auto& [op, s] : group.ops) {
      if (op->comm == comm->s) {
        op->what += std::string(" + ") + what;
        return op;
      }
    }
    auto op = std::make_shared<Op>();
    op->comm = comm->s;
    op->what = std::string("group: ") + what;
    group.ops.emplace_back(op, stream);
    return op;
  }
  auto op = std::make_shared<Op>();
  op->comm = comm->s;
  op->what = what;
  return op;
}
void done_call(const std::shared_ptr<Op>& op, cudaStream_t stream) {
  if (group.depth == 0) launch(op, stream);
}

size_t type_bytes(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;
  }
}

ncclResult_t check_comm(ncclComm_t comm, const char* call) {
  if (comm == nullptr || !comm->s)
    return usage(ncclInvalidArgument, std::string(call) + ": null comm");
  if (comm->s->aborted.load()) {
    return usage(ncclInvalidUsage, std::string(call) + ": the communicator was aborted");
  }
  return ncclSuccess;
}
ncclResult_t check_buf(const void* p, size_t bytes, const char* call, const char* which) {
  if (bytes == 0) return ncclSuccess;
  if (!is_device_range(p, bytes)) {
    char b[200];
    std::snprintf(b, sizeof(b),
                  "%s: %s %p (%zu bytes) is not inside one device allocation (NCCL takes device "
                  "memory only)",
                  call, which, p, bytes);
    return usage(ncclInvalidArgument, b);
  }
  return ncclSuccess;
}

Task make_task(bool send, int peer, const Hdr& h, const void* src, void* dst) {
  Task t;
  t.send = send;
  t.peer = peer;
  t.hdr = h;
  t.src = static_cast<const char*>(src);
  t.dst = static_cast<char*>(dst);
  return t;
}

// ---- reductions, in rank order so every rank gets the same bits ----

float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

template <class T>
T apply(T a, T b, ncclRedOp_t op) {
  switch (op) {
    case ncclSum:
    case ncclAvg:
      return a + b;
    case ncclProd:
      return a * b;
    case ncclMax:
      return std::max(a, b);
    case ncclMin:
      return std::min(a, b);
  }
  return a;
}

template <class T>
void reduce_typed(char* out, const std::vector<const char*>& in, size_t count, ncclRedOp_t op) {
  std::vector<T> acc(count);
  std::memcpy(acc.data(), in[0], count * sizeof(T));
  for (size_t r = 1; r < in.size(); ++r) {
    const T* x = reinterpret_cast<const T*>(in[r]);
    for (size_t i = 0; i < count; ++i) acc[i] = apply(acc[i], x[i], op);
  }
  if (op == ncclAvg) {
    for (auto& v : acc) v = static_cast<T>(v / static_cast<T>(in.size()));
  }
  std::memcpy(out, acc.data(), count * sizeof(T));
}
void reduce_bf16(char* out, const std::vector<const char*>& in, size_t count, ncclRedOp_t op) {
  std::vector<uint16_t> acc(count);
  std::memcpy(acc.data(), in[0], count * 2);
  for (size_t r = 1; r < in.size(); ++r) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(in[r]);
    for (size_t i = 0; i < count; ++i) {
      acc[i] = float_to_bf16(apply(bf16_to_float(acc[i]), bf16_to_float(x[i]), op));
    }
  }
  if (op == ncclAvg) {
    for (auto& v : acc) v = float_to_bf16(bf16_to_float(v) / static_cast<float>(in.size()));
  }
  std::memcpy(out, acc.data(), count * 2);
}
// out = op over in[0..n) (rank order); out may alias any input.
bool reduce(char* out, const std::vector<const char*>& in, size_t count, ncclDataType_t t,
            ncclRedOp_t op) {
  switch (t) {
    case ncclInt8:
      reduce_typed<int8_t>(out, in, count, op);
      return true;
    case ncclUint8:
      reduce_typed<uint8_t>(out, in, count, op);
      return true;
    case ncclInt32:
      reduce_typed<int32_t>(out, in, count, op);
      return true;
    case ncclUint32:
      reduce_typed<uint32_t>(out, in, count, op);
      return true;
    case ncclInt64:
      reduce_typed<int64_t>(out, in, count, op);
      return true;
    case ncclUint64:
      reduce_typed<uint64_t>(out, in, count, op);
      return true;
    case ncclFloat32:
      reduce_typed<float>(out, in, count, op);
      return true;
    case ncclFloat64:
      reduce_typed<double>(out, in, count, op);
      return true;
    case ncclBfloat16:
      reduce_bf16(out, in, count, op);
      return true;
    default:
      return false;
  }
}

Hdr coll_hdr(uint32_t kind, CommState& c, size_t count, ncclDataType_t t, int op, size_t bytes) {
  Hdr h{};
  h.bytes = bytes;
  h.kind = kind;
  h.coll = c.colls;
  h.shape = (static_cast<uint64_t>(count) << 16) | (static_cast<uint64_t>(t) << 8) |
            static_cast<uint64_t>(op & 0xff);
  h.magic = kMagic;
  return h;
}

// all_reduce and reduce_scatter: every rank sends the part each peer reduces and keeps the parts
// it receives; the finishing step reduces them in rank order.
ncclResult_t reducing(uint32_t kind, const void* send, void* recv, size_t count, ncclDataType_t t,
                      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream, const char* call) {
  if (ncclResult_t r = check_comm(comm, call); r != ncclSuccess) return r;
  const size_t tb = type_bytes(t), part = count * tb;
  if (tb == 0 || t == ncclFloat16 || op < ncclSum || op > ncclAvg) {
    return usage(ncclInvalidArgument, std::string(call) + ": unsupported type or op");
  }
  CommState& c = *comm->s;
  const int n = c.nranks;
  const bool scatter = kind == kReduceScatter;
  const size_t send_bytes = scatter ? part * n : part;
  if (ncclResult_t r = check_buf(send, send_bytes, call, "sendbuff"); r != ncclSuccess) return r;
  if (ncclResult_t r = check_buf(recv, part, call, "recvbuff"); r != ncclSuccess) return r;
  auto op_ = op_for(comm, stream, call);
  const Hdr h = coll_hdr(kind, c, count, t, op, part);
  ++c.colls;
  auto parts = std::make_shared<std::vector<std::vector<char>>>(n);
  const char* s = static_cast<const char*>(send);
  for (int p = 0; p < n; ++p) {
    if (p == c.rank || part == 0) continue;
    (*parts)[p].resize(part);
    op_->tasks.push_back(make_task(true, p, h, s + (scatter ? p * part : 0), nullptr));
    op_->tasks.push_back(make_task(false, p, h, nullptr, (*parts)[p].data()));
  }
  const int me = c.rank;
  op_->finish.push_back([=] {
    std::vector<const char*> in(n);
    for (int p = 0; p < n; ++p)
      in[p] = p == me ? s + (scatter ? me * part : 0) : (*parts)[p].data();
    if (part) reduce(static_cast<char*>(recv), in, count, t, op);
  });
  done_call(op_, stream);
  return ncclSuccess;
}

}  // namespace
}  // namespace fp8pipe::cuda_emu::nccl_emu

using namespace fp8pipe::cuda_emu;
using namespace fp8pipe::cuda_emu::nccl_emu;

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInternalError:
      return "internal error";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
    default:
      return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  if (comm && comm->s) {
    std::lock_guard<std::mutex> lk(comm->s->err_mu);
    if (!comm->s->last_error.empty()) {
      last_error_copy = comm->s->last_error;
      return last_error_copy.c_str();
    }
  }
  std::lock_guard<std::mutex> lk(global_err_mu);
  last_error_copy = global_last_error;
  return last_error_copy.c_str();
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (id == nullptr) return usage(ncclInvalidArgument, "ncclGetUniqueId: null id");
  static std::atomic<unsigned> counter{0};
  std::random_device rd;
  const unsigned long long salt = (static_cast<unsigned long long>(rd()) << 32) | rd();
  const char* dir = std::getenv("TMPDIR");
  std::string d = dir && *dir ? dir : "/tmp";
  if (d.size() > 60) d = "/tmp";
  std::memset(id, 0, sizeof(*id));
  std::snprintf(id->internal, sizeof(id->internal), "%s/fp8pipe-nccl-emu.%d.%u.%016llx", d.c_str(),
                static_cast<int>(getpid()), counter++, salt);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
  if (out == nullptr) return usage(ncclInvalidArgument, "ncclCommInitRank: null comm");
  *out = nullptr;
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) {
    return usage(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) + " of " +
                                          std::to_string(nranks) + " (the emulation takes up to " +
                                          std::to_string(kMaxRanks) + " ranks)");
  }
  id.internal[NCCL_UNIQUE_ID_BYTES - 1] = 0;
  if (std::strncmp(id.internal, "/", 1) != 0 || !std::strstr(id.internal, "fp8pipe-nccl-emu.")) {
    return usage(ncclInvalidArgument, "ncclCommInitRank: not a unique id from ncclGetUniqueId");
  }
  auto c = std::make_shared<CommState>();
  c->rank = rank;
  c->nranks = nranks;
  cudaGetDevice(&c->device);
  c->path = id.internal;
  c->map_bytes = header_bytes() + static_cast<size_t>(nranks) * nranks * sizeof(Channel);
  const int fd = open(c->path.c_str(), O_RDWR | O_CREAT, 0600);
  if (fd < 0) {
    return usage(ncclSystemError,
                 "ncclCommInitRank: open " + c->path + ": " + std::strerror(errno));
  }
  // Every rank sizes the file alike: a fresh file's bytes are zero (the counters start at 0).
  struct stat stt {};
  if (fstat(fd, &stt) != 0 ||
      (static_cast<size_t>(stt.st_size) < c->map_bytes && ftruncate(fd, c->map_bytes) != 0)) {
    close(fd);
    return usage(ncclSystemError,
                 "ncclCommInitRank: sizing " + c->path + ": " + std::strerror(errno));
  }
  c->base = mmap(nullptr, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (c->base == MAP_FAILED) {
    c->base = nullptr;
    return usage(ncclSystemError, "ncclCommInitRank: mmap: " + std::string(std::strerror(errno)));
  }
  c->sh = static_cast<Shared*>(c->base);
  c->send_owner.assign(nranks, nullptr);
  c->recv_owner.assign(nranks, nullptr);
  Shared& sh = *c->sh;
  uint32_t fresh = 0;
  if (sh.state.compare_exchange_strong(fresh, 1)) {
    sh.nranks = static_cast<uint32_t>(nranks);
    sh.state.store(2, std::memory_order_release);
  }
  const auto deadline = Clock::now() + std::chrono::duration<double>(kJoinTimeoutS);
  while (sh.state.load(std::memory_order_acquire) != 2) {
    if (Clock::now() > deadline) return usage(ncclSystemError, "ncclCommInitRank: setup timed out");
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  if (sh.nranks != static_cast<uint32_t>(nranks)) {
    return usage(ncclInvalidUsage, "ncclCommInitRank: rank " + std::to_string(rank) + " says " +
                                       std::to_string(nranks) + " ranks, another said " +
                                       std::to_string(sh.nranks));
  }
  Slot& me = sh.slots[rank];
  if (me.joined.load() != 0) {
    return usage(ncclInvalidUsage,
                 "ncclCommInitRank: rank " + std::to_string(rank) + " joined twice");
  }
  me.device = c->device;
  me.pid = getpid();
  gethostname(me.host, sizeof(me.host) - 1);
  me.joined.store(1, std::memory_order_release);
  sh.joined.fetch_add(1);
  while (sh.joined.load(std::memory_order_acquire) < static_cast<uint32_t>(nranks)) {
    if (Clock::now() > deadline) {
      return usage(ncclSystemError, "ncclCommInitRank: rank " + std::to_string(rank) + ": only " +
                                        std::to_string(sh.joined.load()) + " of " +
                                        std::to_string(nranks) + " ranks joined in " +
                                        std::to_string(static_cast<int>(kJoinTimeoutS)) + " s");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  for (int q = 0; q < nranks; ++q) {
    const Slot& o = sh.slots[q];
    if (q != rank && o.device == me.device && std::strcmp(o.host, me.host) == 0) {
      return usage(ncclInvalidUsage,
                   "ncclCommInitRank: Duplicate GPU detected: rank " + std::to_string(rank) +
                       " and rank " + std::to_string(q) + " both on CUDA device " +
                       std::to_string(me.device) +
                       " (set FP8PIPE_EMU_DEVICES to emulate one device per rank)");
    }
  }
  if (rank == 0) unlink(c->path.c_str());  // everyone has it mapped: the name is not needed
  *out = new ncclComm{std::move(c)};
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return usage(ncclInvalidArgument, "ncclCommDestroy: null comm");
  delete comm;  // operations still in flight keep the mapping until they end
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  if (comm->s) {
    comm->s->aborted.store(true);
    uint32_t none = 0;
    comm->s->sh->aborted.compare_exchange_strong(none, static_cast<uint32_t>(comm->s->rank + 1));
  }
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
  if (comm == nullptr || err == nullptr) return ncclInvalidArgument;
  *err = static_cast<ncclResult_t>(comm->s->async_error.load());
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  if (group.depth++ == 0) group.first_error = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (group.depth == 0) return usage(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--group.depth > 0) return ncclSuccess;
  auto ops = std::move(group.ops);
  group.ops.clear();
  const ncclResult_t r = group.first_error;
  group.first_error = ncclSuccess;
  if (r != ncclSuccess) return r;  // NCCL launches nothing of a group that failed
  for (auto& [op, stream] : ops) launch(op, stream);
  return ncclSuccess;
}

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t t, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  if (ncclResult_t r = check_comm(comm, "ncclSend"); r != ncclSuccess) return r;
  const size_t bytes = count * type_bytes(t);
  if (type_bytes(t) == 0 || peer < 0 || peer >= comm->s->nranks) {
    return usage(ncclInvalidArgument, "ncclSend: bad type or peer " + std::to_string(peer));
  }
  if (ncclResult_t r = check_buf(sendbuff, bytes, "ncclSend", "sendbuff"); r != ncclSuccess)
    return r;
  if (bytes == 0) return ncclSuccess;  // NCCL moves nothing for an empty message
  auto op = op_for(comm, stream, "send");
  Hdr h{bytes, kP2p, 0, 0, kMagic};
  op->tasks.push_back(make_task(true, peer, h, sendbuff, nullptr));
  done_call(op, stream);
  return ncclSuccess;
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t t, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  if (ncclResult_t r = check_comm(comm, "ncclRecv"); r != ncclSuccess) return r;
  const size_t bytes = count * type_bytes(t);
  if (type_bytes(t) == 0 || peer < 0 || peer >= comm->s->nranks) {
    return usage(ncclInvalidArgument, "ncclRecv: bad type or peer " + std::to_string(peer));
  }
  if (ncclResult_t r = check_buf(recvbuff, bytes, "ncclRecv", "recvbuff"); r != ncclSuccess)
    return r;
  if (bytes == 0) return ncclSuccess;
  auto op = op_for(comm, stream, "recv");
  Hdr h{bytes, kP2p, 0, 0, kMagic};
  op->tasks.push_back(make_task(false, peer, h, nullptr, recvbuff));
  done_call(op, stream);
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t t,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return reducing(kAllReduce, sendbuff, recvbuff, count, t, op, comm, stream, "ncclAllReduce");
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                               ncclDataType_t t, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream) {
  return reducing(kReduceScatter, sendbuff, recvbuff, recvcount, t, op, comm, stream,
                  "ncclReduceScatter");
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t t,
                           ncclComm_t comm, cudaStream_t stream) {
  const char* call = "ncclAllGather";
  if (ncclResult_t r = check_comm(comm, call); r != ncclSuccess) return r;
  const size_t tb = type_bytes(t), block = sendcount * tb;
  if (tb == 0) return usage(ncclInvalidArgument, "ncclAllGather: bad type");
  CommState& c = *comm->s;
  const int n = c.nranks, me = c.rank;
  if (ncclResult_t r = check_buf(sendbuff, block, call, "sendbuff"); r != ncclSuccess) return r;
  if (ncclResult_t r = check_buf(recvbuff, block * n, call, "recvbuff"); r != ncclSuccess) return r;
  auto op = op_for(comm, stream, call);
  const Hdr h = coll_hdr(kAllGather, c, sendcount, t, 0, block);
  ++c.colls;
  char* out = static_cast<char*>(recvbuff);
  for (int p = 0; p < n && block > 0; ++p) {
    if (p == me) continue;
    op->tasks.push_back(make_task(true, p, h, sendbuff, nullptr));
    op->tasks.push_back(make_task(false, p, h, nullptr, out + p * block));
  }
  op->finish.push_back([=] {
    if (block) std::memmove(out + me * block, sendbuff, block);
  });
  done_call(op, stream);
  return ncclSuccess;
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t t,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  const char* call = "ncclBroadcast";
  if (ncclResult_t r = check_comm(comm, call); r != ncclSuccess) return r;
  const size_t tb = type_bytes(t), bytes = count * tb;
  CommState& c = *comm->s;
  if (tb == 0 || root < 0 || root >= c.nranks) {
    return usage(ncclInvalidArgument, "ncclBroadcast: bad type or root " + std::to_string(root));
  }
  if (c.rank == root) {
    if (ncclResult_t r = check_buf(sendbuff, bytes, call, "sendbuff"); r != ncclSuccess) return r;
  }
  if (ncclResult_t r = check_buf(recvbuff, bytes, call, "recvbuff"); r != ncclSuccess) return r;
  auto op = op_for(comm, stream, call);
  const Hdr h = coll_hdr(kBroadcast, c, count, t, root, bytes);
  ++c.colls;
  if (bytes > 0) {
    if (c.rank == root) {
      for (int p = 0; p < c.nranks; ++p) {
        if (p != root) op->tasks.push_back(make_task(true, p, h, sendbuff, nullptr));
      }
      if (sendbuff != recvbuff) {
        op->finish.push_back([=] { std::memmove(recvbuff, sendbuff, bytes); });
      }
    } else {
      op->tasks.push_back(make_task(false, root, h, nullptr, recvbuff));
    }
  }
  done_call(op, stream);
  return ncclSuccess;
}
