// MPI backend of Comm. One comm thread per process (MpiEngine) makes every MPI call after start-up:
// it starts each op with nonblocking MPI, polls all of them with MPI_Testall, advances multi-phase
// ops (counts, then data) and completes their Work. Why one thread: parallel/comm.h.
// The deprecated MPI C++ bindings are not used (and warn under -Wextra).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <deque>
#include <future>
#include <map>
#include <optional>
#include <thread>

#include "core/log.h"
#include "parallel/comm.h"

namespace fp8pipe::parallel {
namespace {

using Clock = std::chrono::steady_clock;

Status mpi_error(int rc, const char* call) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, buf, &len);
  return FP8_ERROR(Code::kInternal, "{} failed: {}", call, std::string(buf, len));
}

#define FP8_MPI(call)                                     \
  do {                                                    \
    int _rc = (call);                                     \
    if (_rc != MPI_SUCCESS) return mpi_error(_rc, #call); \
  } while (0)

MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case DataType::kFloat32:
      return MPI_FLOAT;
    case DataType::kFloat64:
      return MPI_DOUBLE;
    case DataType::kInt32:
      return MPI_INT32_T;
    case DataType::kInt64:
      return MPI_INT64_T;
    case DataType::kBFloat16:
      return MPI_UINT16_T;
    case DataType::kByte:
      return MPI_BYTE;
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

struct Op;
using Phase = std::function<Status(Op&)>;  // starts nonblocking MPI calls, adding to op.reqs

// One comm op: its phases run one after another on the comm thread.
struct Op {
  uint64_t seq = 0;
  int queue = 0;  // the communicator's queue: ops start in issue order per queue
  std::string comm, what;
  bool collective = true;
  int64_t coll_index = 0;  // collectives: 1-based position among its queue's collectives
  Clock::time_point issued;
  std::vector<Phase> phases;
  size_t phase = 0;
  std::vector<MPI_Request> reqs;
  int64_t expect_recv = -1;  // recv: the element count the message must have
  MPI_Datatype recv_type = MPI_DATATYPE_NULL;
  std::vector<MPI_Datatype> owned_types;  // freed when the op ends
  std::shared_ptr<WorkState> work;
  MPI_Request* new_req() { return &reqs.emplace_back(MPI_REQUEST_NULL); }
};

// The last ops of this process, for timeout errors.
class History {
 public:
  void record(const Op& op, const std::string& state) {
    std::lock_guard<std::mutex> lk(mu_);
    Entry& e = ring_[op.seq % ring_.size()];
    if (e.seq != op.seq) e = Entry{op.seq, op.comm, op.what, {}, Clock::now()};
    e.state = state;
  }
  std::string format() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<const Entry*> live;
    for (const Entry& e : ring_) {
      if (e.seq != 0) live.push_back(&e);
    }
    std::sort(live.begin(), live.end(), [](auto* a, auto* b) { return a->seq < b->seq; });
    std::string s;
    const auto now = Clock::now();
    for (const Entry* e : live) {
      const double ago = std::chrono::duration<double>(now - e->submitted).count();
      s += fmt::format("    #{} {} {}: {} (issued {:.3f} s ago)\n", e->seq, e->comm, e->what,
                       e->state, ago);
    }
    return s;
  }

 private:
  struct Entry {
    uint64_t seq = 0;
    std::string comm, what, state;
    Clock::time_point submitted;
  };
  mutable std::mutex mu_;
  std::array<Entry, 16> ring_;
};

// Census messages (comm.h) on the engine's private duplicate of MPI_COMM_WORLD.
constexpr int kCensusAskTag = 1;
int census_reply_tag(int64_t token) { return 2 + static_cast<int>(token % 30000); }
struct CensusAsk {
  int64_t token = 0, queue = 0;
};
// One rank's answer about one queue (communicator); fixed size, sent as bytes.
struct CensusAnswer {
  int64_t issued = -1;  // collectives issued on the queue; -1: the rank has no such comm
  int64_t started = 0, done = 0;
  char last[160] = {};  // its last collective issued on the queue
  char busy[240] = {};  // its oldest unfinished comm op; empty when none is in flight
};
void copy_text(char* dst, size_t n, const std::string& src) {
  const size_t k = std::min(n - 1, src.size());
  std::copy_n(src.data(), k, dst);
  dst[k] = '\0';
}

}  // namespace

// The comm thread of this process, shared by every MpiComm (MPI itself is per process).
class MpiEngine : public std::enable_shared_from_this<MpiEngine> {
 public:
  static Result<std::shared_ptr<MpiEngine>> acquire();
  static bool alive();
  MpiEngine();
  ~MpiEngine();

  int new_queue() { return next_queue_.fetch_add(1); }
  // `group` (optional) lets a timed-out op take a census of its members.
  Work run(int queue, const std::string& comm, std::string what, bool collective,
           std::vector<Phase> phases, double timeout_s,
           std::shared_ptr<const Group> group = nullptr);
  Status call(std::function<Status()> fn);  // runs fn on the comm thread and waits for it
  void drop_queue(int queue);               // comm thread only: aborts the queue's pending ops
  std::string history() const { return history_.format(); }
  // Census (comm.h). The private communicator is set once, by the first make_world.
  bool census_ready() const { return census_ready_.load(); }
  void set_census_comm(MPI_Comm c, int world_rank);  // comm thread only
  // Asks the other members of `group` about collective #coll_index (0: a p2p op) of `queue`;
  // waits up to window_s for their answers. Appends suspects to *headline, returns the details.
  std::string census(int queue, int64_t coll_index, const Group& group, double window_s,
                     std::string* headline);

 private:
  void loop();
  bool has_pending() const {  // ops held behind a collective that has since failed
    for (const auto& [id, q] : queues_) {
      if (!q.pending.empty()) return true;
    }
    return false;
  }
  void start_ready();
  bool poll();
  bool advance(Op& op, Status& s);
  Status start_phase(Op& op);
  void finish(size_t i, Status s);
  void shutdown_ops();
  // Census, comm thread only: answer the asks that have arrived, advance our own asks.
  struct CensusRun {
    CensusAsk ask;
    std::vector<int> members;  // world ranks asked
    Clock::time_point deadline;
    std::vector<MPI_Request> sends, recvs;
    std::vector<CensusAnswer> answers;
    std::vector<char> answered;
    bool reported = false;
    std::promise<void> done;
  };
  bool serve_census();
  void start_census(CensusRun& c);
  bool poll_census();
  CensusAnswer describe(int64_t queue);
  bool census_busy() const { return !censuses_.empty() || !replies_.empty(); }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> inbox_;
  std::deque<std::function<void()>> calls_;
  bool stop_ = false;
  std::atomic<int> next_queue_{1};
  std::atomic<uint64_t> next_seq_{1};
  // Comm thread only. A multi-phase collective holds later collectives of its queue until its
  // last phase has started, so every rank starts collectives in the same order.
  struct Queue {
    std::deque<std::shared_ptr<Op>> pending;
    uint64_t open_collective = 0;
    int64_t started = 0, done = 0;  // collectives
  };
  std::map<int, Queue> queues_;
  std::vector<std::shared_ptr<Op>> active_;
  // Census state. Under mu_: collectives issued per queue (count, last one), asks to start.
  struct Issued {
    int64_t count = 0;
    std::string last;
  };
  std::map<int, Issued> issued_;
  std::deque<std::shared_ptr<CensusRun>> census_inbox_;
  // Comm thread only.
  MPI_Comm census_comm_ = MPI_COMM_NULL;
  int world_rank_ = -1;
  std::atomic<bool> census_ready_{false};
  std::atomic<int64_t> next_token_{1};
  std::vector<std::shared_ptr<CensusRun>> censuses_;  // ours, until every request completed
  struct Reply {
    std::unique_ptr<CensusAnswer> answer;
    MPI_Request req = MPI_REQUEST_NULL;
  };
  std::vector<Reply> replies_;  // answers to others, until sent
  History history_;
  std::thread thread_;
};

namespace {
std::mutex g_engine_mu;
std::weak_ptr<MpiEngine> g_engine;  // the one comm thread of this process, while comms exist
constexpr int kSpinPolls = 64;      // idle polls with yield() before sleeping between polls
constexpr auto kIdleSleep = std::chrono::microseconds(100);
constexpr auto kCensusIdlePoll = std::chrono::milliseconds(5);
}  // namespace

Result<std::shared_ptr<MpiEngine>> MpiEngine::acquire() {
  std::lock_guard<std::mutex> lk(g_engine_mu);
  if (auto e = g_engine.lock()) return e;
  int inited = 0, finalized = 0, level = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized) {
    return FP8_INVALID(
        "MPI is not initialised (or already finalised); call parallel::mpi_init "
        "before create_comms");
  }
  MPI_Query_thread(&level);
  if (level < MPI_THREAD_SERIALIZED) {
    return FP8_INVALID("MPI thread level {} < MPI_THREAD_SERIALIZED; initialise with mpi_init",
                       level);
  }
  auto e = std::make_shared<MpiEngine>();
  g_engine = e;
  return e;
}

bool MpiEngine::alive() {
  std::lock_guard<std::mutex> lk(g_engine_mu);
  return !g_engine.expired();
}

MpiEngine::MpiEngine() {
  thread_ = std::thread([this] { loop(); });
}

MpiEngine::~MpiEngine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Work MpiEngine::run(int queue, const std::string& comm, std::string what, bool collective,
                    std::vector<Phase> phases, double timeout_s,
                    std::shared_ptr<const Group> group) {
  auto op = std::make_shared<Op>();
  op->queue = queue;
  op->comm = comm;
  op->what = std::move(what);
  op->collective = collective;
  op->phases = std::move(phases);
  op->issued = Clock::now();
  std::weak_ptr<MpiEngine> weak = weak_from_this();
  Work w;
  {
    // Numbering and queueing under one lock, so collective #k is the k-th to start.
    std::lock_guard<std::mutex> lk(mu_);
    op->seq = next_seq_.fetch_add(1);
    if (collective) {
      Issued& is = issued_[queue];
      op->coll_index = ++is.count;
      is.last = fmt::format("#{} {} (op #{})", is.count, op->what, op->seq);
    }
    WorkState::Census census;
    if (group) {
      // A short window: live comm threads answer within milliseconds.
      const double window = std::clamp(timeout_s / 4, 0.2, 2.0);
      census = [weak, queue, k = op->coll_index, group, window](std::string* headline) {
        auto e = weak.lock();
        return e ? e->census(queue, k, *group, window, headline) : std::string();
      };
    }
    op->work = std::make_shared<WorkState>(
        fmt::format("{} on {} (op #{})", op->what, comm, op->seq), timeout_s,
        [weak] {
          auto e = weak.lock();
          return e ? e->history() : std::string("    (comm thread stopped)\n");
        },
        std::move(census));
    w = Work(op->work);
    history_.record(*op, "queued");
    inbox_.push_back(std::move(op));
  }
  cv_.notify_all();
  return w;
}

Status MpiEngine::call(std::function<Status()> fn) {
  std::promise<Status> done;
  auto fut = done.get_future();
  {
    std::lock_guard<std::mutex> lk(mu_);
    calls_.push_back([&] { done.set_value(fn()); });
  }
  cv_.notify_all();
  return fut.get();
}

void MpiEngine::loop() {
  int idle = 0;
  for (;;) {
    std::deque<std::shared_ptr<Op>> inbox;
    std::deque<std::function<void()>> calls;
    std::deque<std::shared_ptr<CensusRun>> asks;
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto input = [&] {
        return stop_ || !inbox_.empty() || !calls_.empty() || !census_inbox_.empty();
      };
      if (active_.empty() && !has_pending() && !census_busy()) {
        // Idle: with a census comm, wake now and then to answer other ranks' asks.
        if (census_ready()) {
          cv_.wait_for(lk, kCensusIdlePoll, input);
        } else {
          cv_.wait(lk, input);
        }
      } else if (idle > kSpinPolls) {
        cv_.wait_for(lk, kIdleSleep, input);
      }
      if (stop_) break;
      inbox.swap(inbox_);
      calls.swap(calls_);
      asks.swap(census_inbox_);
    }
    for (auto& c : calls) c();
    for (auto& op : inbox) queues_[op->queue].pending.push_back(std::move(op));
    for (auto& c : asks) {
      start_census(*c);
      censuses_.push_back(std::move(c));
    }
    start_ready();
    bool progressed = poll() || !inbox.empty();
    if (census_ready()) progressed |= serve_census() | poll_census();
    idle = progressed ? 0 : idle + 1;
    if (!progressed && idle <= kSpinPolls) std::this_thread::yield();
  }
  shutdown_ops();
}

void MpiEngine::start_ready() {
  for (auto& [id, q] : queues_) {
    bool held = q.open_collective != 0;
    for (auto it = q.pending.begin(); it != q.pending.end();) {
      Op& op = **it;
      if (op.collective && held) {  // p2p may pass a held collective; collectives keep order
        ++it;
        continue;
      }
      Status s = start_phase(op);
      if (s.ok() && op.collective && op.phases.size() > 1) {
        q.open_collective = op.seq;
        held = true;
      }
      active_.push_back(std::move(*it));
      it = q.pending.erase(it);
      if (!s.ok()) finish(active_.size() - 1, std::move(s));
    }
  }
}

Status MpiEngine::start_phase(Op& op) {
  op.reqs.clear();
  if (op.phase == 0 && op.collective) ++queues_[op.queue].started;
  history_.record(op, op.phases.size() > 1
                          ? fmt::format("started phase {}/{}", op.phase + 1, op.phases.size())
                          : std::string("started"));
  return op.phases[op.phase](op);
}

// Tests the op's requests; on completion starts its next phase. True when the op is finished
// (s holds its result).
bool MpiEngine::advance(Op& op, Status& s) {
  int flag = 1;
  std::vector<MPI_Status> st(op.reqs.size());
  if (!op.reqs.empty()) {
    const int rc = MPI_Testall(static_cast<int>(op.reqs.size()), op.reqs.data(), &flag, st.data());
    if (rc != MPI_SUCCESS) {
      s = mpi_error(rc, "MPI_Testall");
      return true;
    }
  }
  if (!flag) return false;
  if (op.expect_recv >= 0) {
    int n = 0;
    MPI_Get_count(&st[0], op.recv_type, &n);
    if (n != op.expect_recv) {
      s = FP8_ERROR(Code::kInternal, "received {} elements, expected {}", n, op.expect_recv);
      return true;
    }
  }
  if (++op.phase == op.phases.size()) return true;
  s = start_phase(op);
  if (op.phase + 1 == op.phases.size()) {
    auto q = queues_.find(op.queue);
    if (q != queues_.end() && q->second.open_collective == op.seq) q->second.open_collective = 0;
  }
  return !s.ok();
}

bool MpiEngine::poll() {
  bool progressed = false;
  for (size_t i = 0; i < active_.size();) {
    Status s;
    const size_t phase = active_[i]->phase;
    if (advance(*active_[i], s)) {
      finish(i, std::move(s));
      progressed = true;
      continue;  // finish() moved another op into slot i
    }
    progressed |= active_[i]->phase != phase;
    ++i;
  }
  return progressed;
}

void MpiEngine::finish(size_t i, Status s) {
  std::shared_ptr<Op> op = std::move(active_[i]);
  active_[i] = std::move(active_.back());
  active_.pop_back();
  for (MPI_Datatype& t : op->owned_types) MPI_Type_free(&t);
  auto q = queues_.find(op->queue);
  if (q != queues_.end() && q->second.open_collective == op->seq) q->second.open_collective = 0;
  if (q != queues_.end() && op->collective) ++q->second.done;
  if (!s.ok()) s = s.with_context(fmt::format("{} on {}", op->what, op->comm));
  history_.record(*op, s.ok() ? "done" : "FAILED: " + s.message());
  op->work->complete(std::move(s));
}

void MpiEngine::drop_queue(int queue) {
  auto q = queues_.find(queue);
  if (q == queues_.end()) return;
  for (auto& op : q->second.pending) {
    op->work->complete(FP8_ERROR(Code::kAborted,
                                 "{} on {}: communicator destroyed before it "
                                 "started",
                                 op->what, op->comm));
  }
  queues_.erase(q);
  std::lock_guard<std::mutex> lk(mu_);
  issued_.erase(queue);
}

// At exit: p2p requests are cancelled (receives) and freed; collectives cannot be cancelled in
// MPI and are left to MPI_Finalize / MPI_Abort. Every Work still open fails.
void MpiEngine::shutdown_ops() {
  for (auto& op : active_) {
    for (MPI_Request& r : op->reqs) {
      if (op->collective || r == MPI_REQUEST_NULL) continue;
      if (op->expect_recv >= 0) MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
    history_.record(*op, "abandoned at shutdown");
    op->work->complete(FP8_ERROR(Code::kAborted,
                                 "{} on {}: comm thread stopped with the op in "
                                 "flight",
                                 op->what, op->comm));
  }
  active_.clear();
  while (!queues_.empty()) drop_queue(queues_.begin()->first);
  // Census: our asks end unanswered; requests still open are left to MPI_Finalize / MPI_Abort.
  for (auto& c : censuses_) {
    if (!c->reported) c->done.set_value();
  }
  censuses_.clear();
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& c : census_inbox_) c->done.set_value();
    census_inbox_.clear();
  }
  for (Reply& r : replies_) MPI_Request_free(&r.req);
  replies_.clear();
  if (census_comm_ != MPI_COMM_NULL) MPI_Comm_free(&census_comm_);
  census_ready_ = false;
}

void MpiEngine::set_census_comm(MPI_Comm c, int world_rank) {
  census_comm_ = c;
  world_rank_ = world_rank;
  census_ready_ = true;
}

// This rank's state for an ask about `queue`.
CensusAnswer MpiEngine::describe(int64_t queue) {
  CensusAnswer a;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = issued_.find(static_cast<int>(queue));
    if (it == issued_.end()) return a;  // issued = -1: no such comm here
    a.issued = it->second.count;
    copy_text(a.last, sizeof a.last, it->second.last);
  }
  auto q = queues_.find(static_cast<int>(queue));
  if (q != queues_.end()) a.started = q->second.started, a.done = q->second.done;
  // The oldest op not finished, on any comm: what this rank waits for.
  const Op* oldest = nullptr;
  bool in_flight = false;
  for (const auto& op : active_) {
    if (!oldest || op->seq < oldest->seq) oldest = op.get(), in_flight = true;
  }
  for (const auto& [id, qq] : queues_) {
    for (const auto& op : qq.pending) {
      if (!oldest || op->seq < oldest->seq) oldest = op.get(), in_flight = false;
    }
  }
  if (oldest) {
    const double age = std::chrono::duration<double>(Clock::now() - oldest->issued).count();
    copy_text(a.busy, sizeof a.busy,
              fmt::format("op #{} {} on {}, {} for {:.1f} s", oldest->seq, oldest->what,
                          oldest->comm, in_flight ? "in flight" : "queued", age));
  }
  return a;
}

// Answers every ask that has arrived. True when there was one.
bool MpiEngine::serve_census() {
  bool any = false;
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kCensusAskTag, census_comm_, &flag, &st) != MPI_SUCCESS || !flag)
      break;
    CensusAsk ask;
    if (MPI_Recv(&ask, sizeof ask, MPI_BYTE, st.MPI_SOURCE, kCensusAskTag, census_comm_,
                 MPI_STATUS_IGNORE) != MPI_SUCCESS)
      break;
    Reply r{std::make_unique<CensusAnswer>(describe(ask.queue))};
    if (MPI_Isend(r.answer.get(), sizeof(CensusAnswer), MPI_BYTE, st.MPI_SOURCE,
                  census_reply_tag(ask.token), census_comm_, &r.req) == MPI_SUCCESS) {
      replies_.push_back(std::move(r));
    }
    any = true;
  }
  for (size_t i = 0; i < replies_.size();) {
    int done = 0;
    MPI_Test(&replies_[i].req, &done, MPI_STATUS_IGNORE);
    if (done) {
      replies_[i] = std::move(replies_.back());
      replies_.pop_back();
    } else {
      ++i;
    }
  }
  return any;
}

void MpiEngine::start_census(CensusRun& c) {
  const size_t n = c.members.size();
  c.sends.assign(n, MPI_REQUEST_NULL);
  c.recvs.assign(n, MPI_REQUEST_NULL);
  c.answers.assign(n, CensusAnswer{});
  c.answered.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    MPI_Isend(&c.ask, sizeof c.ask, MPI_BYTE, c.members[i], kCensusAskTag, census_comm_,
              &c.sends[i]);
    MPI_Irecv(&c.answers[i], sizeof(CensusAnswer), MPI_BYTE, c.members[i],
              census_reply_tag(c.ask.token), census_comm_, &c.recvs[i]);
  }
}

// Collects answers; at the deadline (or when all are in) cancels the rest and reports. A run is
// kept until its asks are sent, since MPI reads c.ask until then. True when something changed.
bool MpiEngine::poll_census() {
  bool any = false;
  for (size_t i = 0; i < censuses_.size();) {
    CensusRun& c = *censuses_[i];
    bool all = true, sent = true;
    for (size_t m = 0; m < c.members.size(); ++m) {
      int flag = 0;
      if (!c.answered[m] && c.recvs[m] != MPI_REQUEST_NULL) {
        MPI_Test(&c.recvs[m], &flag, MPI_STATUS_IGNORE);
        if (flag) c.answered[m] = 1, any = true;
      }
      all &= c.answered[m] != 0;
      if (c.sends[m] != MPI_REQUEST_NULL) {
        MPI_Test(&c.sends[m], &flag, MPI_STATUS_IGNORE);
        sent &= flag != 0;
      }
    }
    if (!c.reported && (all || Clock::now() >= c.deadline)) {
      for (size_t m = 0; m < c.members.size(); ++m) {
        if (c.answered[m] || c.recvs[m] == MPI_REQUEST_NULL) continue;
        MPI_Cancel(&c.recvs[m]);
        MPI_Wait(&c.recvs[m], MPI_STATUS_IGNORE);  // a cancelled receive completes locally
      }
      c.reported = true;
      c.done.set_value();
      any = true;
    }
    if (c.reported && sent) {
      censuses_[i] = std::move(censuses_.back());
      censuses_.pop_back();
    } else {
      ++i;
    }
  }
  return any;
}

std::string MpiEngine::census(int queue, int64_t coll_index, const Group& group, double window_s,
                              std::string* headline) {
  if (!census_ready()) return "";
  auto run = std::make_shared<CensusRun>();
  run->ask = CensusAsk{next_token_.fetch_add(1), queue};
  std::vector<int> index;  // group index of each member asked
  for (int i = 0; i < group.size(); ++i) {
    if (group.ranks[i] == world_rank_) continue;
    run->members.push_back(group.ranks[i]);
    index.push_back(i);
  }
  if (run->members.empty()) return "";
  run->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(window_s));
  auto done = run->done.get_future();
  {
    std::lock_guard<std::mutex> lk(mu_);
    census_inbox_.push_back(run);
  }
  cv_.notify_all();
  // The comm thread reports at the deadline; a stuck comm thread must not stall the error.
  if (done.wait_for(std::chrono::duration<double>(window_s + 2.0)) != std::future_status::ready)
    return "\n  census: this rank's comm thread did not run it (stuck in MPI?)\n";
  std::vector<std::string> silent, absent, lines;
  for (size_t m = 0; m < run->members.size(); ++m) {
    const std::string who = fmt::format("rank {} [world {}]", index[m], run->members[m]);
    if (!run->answered[m]) {
      silent.push_back(who);
      lines.push_back(
          fmt::format("{}: no answer within {:g} s (stopped, hung, or dead)", who, window_s));
      continue;
    }
    const CensusAnswer& a = run->answers[m];
    std::string line = who + ": ";
    if (a.issued < 0) {
      line += fmt::format("has no {} comm (destroyed)", group.name);
    } else if (coll_index > 0) {
      if (a.issued < coll_index) {
        absent.push_back(who);
        line += fmt::format("has not issued collective #{} on {} (its last: {})", coll_index,
                            group.name, a.last[0] ? a.last : "none");
      } else if (a.started < coll_index) {
        line += fmt::format("issued collective #{}, held behind an earlier one", coll_index);
      } else if (a.done < coll_index) {
        line += fmt::format("has collective #{} in flight", coll_index);
      } else {
        line += fmt::format("finished collective #{}", coll_index);
      }
    }
    if (a.issued >= 0) {
      if (coll_index > 0) line += "; ";
      line += a.busy[0] ? fmt::format("waits on {}", a.busy)
                        : std::string("no comm op in flight (computing?)");
    }
    lines.push_back(std::move(line));
  }
  // The suspects go on the first line, so a one-line log names them.
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
    if (v.size() > 8) s += fmt::format(" and {} more", v.size() - 8);
    return s;
  };
  if (!silent.empty()) *headline += "; no answer from " + list(silent);
  if (!absent.empty()) *headline += "; not yet issued by " + list(absent);
  if (coll_index > 0 && silent.empty() && absent.empty())
    *headline += fmt::format("; every other rank of {} has issued it", group.name);
  std::string out =
      fmt::format("\n  census of {} (answers within {:g} s):\n", group.name, window_s);
  for (size_t i = 0; i < lines.size() && i < 64; ++i) out += "    " + lines[i] + "\n";
  if (lines.size() > 64) out += fmt::format("    ... and {} more\n", lines.size() - 64);
  return out;
}

namespace {

Status check_count(int64_t count, const void* buf, const char* what) {
  if (count < 0 || count > INT_MAX) {
    return FP8_INVALID("{}: count {} outside [0, {}] (MPI counts are int); split the op", what,
                       count, INT_MAX);
  }
  if (count > 0 && buf == nullptr)
    return FP8_INVALID("{}: null buffer for {} elements", what, count);
  return Status::Ok();
}

// Counts (rows) to MPI's int counts and exclusive-prefix displacements.
struct IntCounts {
  std::vector<int> counts, displs;
  int64_t total = 0;
};

Result<IntCounts> to_int_counts(std::span<const int64_t> c, int size, const char* what) {
  if (static_cast<int>(c.size()) != size) {
    return FP8_INVALID("{}: {} counts for a comm of {} ranks", what, c.size(), size);
  }
  IntCounts out;
  for (int64_t v : c) {
    if (v < 0) return FP8_INVALID("{}: negative count {}", what, v);
    out.counts.push_back(static_cast<int>(v));
    out.displs.push_back(static_cast<int>(out.total));
    out.total += v;
    if (out.total > INT_MAX) {
      return FP8_INVALID(
          "{}: {} rows in total exceed MPI's int limit; split the op or use "
          "larger rows",
          what, out.total);
    }
  }
  return out;
}

// The element type of one row; owned by the op when it is a derived type.
Result<MPI_Datatype> row_type(Op& op, DataType t, int64_t row_elems) {
  if (row_elems == 1) return mpi_type(t);
  MPI_Datatype rt;
  FP8_MPI(MPI_Type_contiguous(static_cast<int>(row_elems), mpi_type(t), &rt));
  FP8_MPI(MPI_Type_commit(&rt));
  op.owned_types.push_back(rt);
  return rt;
}

class MpiComm final : public Comm {
 public:
  MpiComm(std::shared_ptr<MpiEngine> engine, MPI_Comm comm, Group group, double timeout_s)
      : engine_(std::move(engine)),
        comm_(comm),
        group_(std::move(group)),
        census_group_(std::make_shared<const Group>(group_)),
        timeout_s_(timeout_s),
        queue_(engine_->new_queue()) {}
  ~MpiComm() override {
    (void)engine_->call([this] {
      engine_->drop_queue(queue_);
      MPI_Comm_free(&comm_);
      return Status::Ok();
    });
  }
  const Group& group() const override { return group_; }
  double timeout_s() const override { return timeout_s_; }

  Work send(const void* buf, int64_t count, DataType t, int peer, int tag) override;
  Work recv(void* buf, int64_t count, DataType t, int peer, int tag) override;
  Work all_to_all_v(const void* send, std::span<const int64_t> send_counts, void* recv,
                    std::span<const int64_t> recv_counts, DataType t, int64_t row_elems) override;
  Work exchange_counts(std::span<const int64_t> send_counts,
                       std::span<int64_t> recv_counts) override;
  Work all_to_all_v_counted(const void* send, std::span<const int64_t> send_counts, DataType t,
                            int64_t row_elems, RecvAlloc alloc,
                            std::vector<int64_t>* recv_counts) override;
  Work all_reduce(const void* send, void* recv, int64_t count, DataType t, ReduceOp op) override;
  Work reduce_scatter(const void* send, void* recv, int64_t block, DataType t,
                      ReduceOp op) override;
  Work all_gather(const void* send, void* recv, int64_t block, DataType t) override;
  Work broadcast(void* buf, int64_t count, DataType t, int root) override;
  Work barrier() override;

 private:
  Work submit(std::string what, bool collective, std::vector<Phase> phases) {
    return engine_->run(queue_, group_.name, std::move(what), collective, std::move(phases),
                        timeout_s_, census_group_);
  }
  Work fail(const std::string& what, const Status& s) {
    return Work::failed(s.with_context(fmt::format("{} on {}", what, group_.name)));
  }
  std::string peer_str(int peer) const {
    if (peer < 0 || peer >= size()) return fmt::format("{} [not in {}]", peer, group_.name);
    return fmt::format("{} [world {}]", peer, group_.ranks[peer]);
  }
  Status check_p2p(int peer, int tag) const {
    if (peer < 0 || peer >= size()) {
      return FP8_INVALID("peer {} outside [0, {}) of {}", peer, size(), group_.name);
    }
    if (tag < 0 || tag > 32767) return FP8_INVALID("tag {} outside [0, 32767]", tag);
    return Status::Ok();
  }

  std::shared_ptr<MpiEngine> engine_;
  MPI_Comm comm_;
  Group group_;
  std::shared_ptr<const Group> census_group_;
  double timeout_s_;
  int queue_;
};

Work MpiComm::send(const void* buf, int64_t count, DataType t, int peer, int tag) {
  std::string what =
      fmt::format("send(to {}, tag {}, {} x {})", peer_str(peer), tag, count, data_type_name(t));
  Status s = check_p2p(peer, tag);
  if (s.ok()) s = check_count(count, buf, "send");
  if (!s.ok()) return fail(what, s);
  MPI_Comm c = comm_;
  return submit(
      std::move(what), false, {[=](Op& op) {
        FP8_MPI(MPI_Isend(buf, static_cast<int>(count), mpi_type(t), peer, tag, c, op.new_req()));
        return Status::Ok();
      }});
}

Work MpiComm::recv(void* buf, int64_t count, DataType t, int peer, int tag) {
  std::string what =
      fmt::format("recv(from {}, tag {}, {} x {})", peer_str(peer), tag, count, data_type_name(t));
  Status s = check_p2p(peer, tag);
  if (s.ok()) s = check_count(count, buf, "recv");
  if (!s.ok()) return fail(what, s);
  MPI_Comm c = comm_;
  return submit(
      std::move(what), false, {[=](Op& op) {
        op.expect_recv = count;
        op.recv_type = mpi_type(t);
        FP8_MPI(MPI_Irecv(buf, static_cast<int>(count), mpi_type(t), peer, tag, c, op.new_req()));
        return Status::Ok();
      }});
}

Work MpiComm::all_to_all_v(const void* send, std::span<const int64_t> send_counts, void* recv,
                           std::span<const int64_t> recv_counts, DataType t, int64_t row_elems) {
  std::string what =
      fmt::format("all_to_all_v({} ranks, rows of {} x {})", size(), row_elems, data_type_name(t));
  if (row_elems < 1 || row_elems > INT_MAX)
    return fail(what, FP8_INVALID("row_elems {}", row_elems));
  auto sc = to_int_counts(send_counts, size(), "send_counts");
  if (!sc.ok()) return fail(what, sc.status());
  auto rc = to_int_counts(recv_counts, size(), "recv_counts");
  if (!rc.ok()) return fail(what, rc.status());
  if ((sc->total > 0 && !send) || (rc->total > 0 && !recv)) {
    return fail(what, FP8_INVALID("null buffer"));
  }
  auto c = std::make_shared<std::pair<IntCounts, IntCounts>>(std::move(*sc), std::move(*rc));
  MPI_Comm comm = comm_;
  return submit(std::move(what), true, {[=](Op& op) -> Status {
                  FP8_ASSIGN_OR_RETURN(MPI_Datatype rt, row_type(op, t, row_elems));
                  auto& [s, r] = *c;
                  FP8_MPI(MPI_Ialltoallv(send, s.counts.data(), s.displs.data(), rt, recv,
                                         r.counts.data(), r.displs.data(), rt, comm, op.new_req()));
                  return Status::Ok();
                }});
}

Work MpiComm::exchange_counts(std::span<const int64_t> send_counts,
                              std::span<int64_t> recv_counts) {
  std::string what = fmt::format("exchange_counts({} ranks)", size());
  if (static_cast<int>(send_counts.size()) != size() ||
      static_cast<int>(recv_counts.size()) != size()) {
    return fail(what, FP8_INVALID("{} send / {} recv counts for a comm of {} ranks",
                                  send_counts.size(), recv_counts.size(), size()));
  }
  auto sc = std::make_shared<std::vector<int64_t>>(send_counts.begin(), send_counts.end());
  int64_t* out = recv_counts.data();
  MPI_Comm comm = comm_;
  return submit(
      std::move(what), true, {[=](Op& op) {
        FP8_MPI(MPI_Ialltoall(sc->data(), 1, MPI_INT64_T, out, 1, MPI_INT64_T, comm, op.new_req()));
        return Status::Ok();
      }});
}

Work MpiComm::all_to_all_v_counted(const void* send, std::span<const int64_t> send_counts,
                                   DataType t, int64_t row_elems, RecvAlloc alloc,
                                   std::vector<int64_t>* recv_counts) {
  std::string what = fmt::format("all_to_all_v_counted({} ranks, rows of {} x {})", size(),
                                 row_elems, data_type_name(t));
  if (row_elems < 1 || row_elems > INT_MAX)
    return fail(what, FP8_INVALID("row_elems {}", row_elems));
  if (!alloc || !recv_counts) return fail(what, FP8_INVALID("alloc and recv_counts are required"));
  auto sc = to_int_counts(send_counts, size(), "send_counts");
  if (!sc.ok()) return fail(what, sc.status());
  if (sc->total > 0 && !send) return fail(what, FP8_INVALID("null send buffer"));
  struct State {
    std::vector<int64_t> send64, recv64;
    IntCounts s, r;
  };
  auto st = std::make_shared<State>();
  st->send64.assign(send_counts.begin(), send_counts.end());
  st->recv64.resize(size());
  st->s = std::move(*sc);
  MPI_Comm comm = comm_;
  const int n = size();
  Phase counts = [=](Op& op) {
    FP8_MPI(MPI_Ialltoall(st->send64.data(), 1, MPI_INT64_T, st->recv64.data(), 1, MPI_INT64_T,
                          comm, op.new_req()));
    return Status::Ok();
  };
  Phase data = [=](Op& op) -> Status {
    FP8_ASSIGN_OR_RETURN(st->r, to_int_counts(st->recv64, n, "received counts"));
    *recv_counts = st->recv64;
    void* recv = alloc(st->r.total);
    if (st->r.total > 0 && !recv) return FP8_INVALID("alloc({}) returned null", st->r.total);
    FP8_ASSIGN_OR_RETURN(MPI_Datatype rt, row_type(op, t, row_elems));
    FP8_MPI(MPI_Ialltoallv(send, st->s.counts.data(), st->s.displs.data(), rt, recv,
                           st->r.counts.data(), st->r.displs.data(), rt, comm, op.new_req()));
    return Status::Ok();
  };
  return submit(std::move(what), true, {std::move(counts), std::move(data)});
}

Work MpiComm::all_reduce(const void* send, void* recv, int64_t count, DataType t, ReduceOp rop) {
  std::string what =
      fmt::format("all_reduce({}, {} x {})", reduce_op_name(rop), count, data_type_name(t));
  if (!data_type_reducible(t))
    return fail(what, FP8_INVALID("{} does not reduce", data_type_name(t)));
  Status s = check_count(count, recv, "all_reduce");
  if (!s.ok()) return fail(what, s);
  const void* in = send == recv ? MPI_IN_PLACE : send;
  MPI_Comm comm = comm_;
  return submit(std::move(what), true, {[=](Op& op) {
                  FP8_MPI(MPI_Iallreduce(in, recv, static_cast<int>(count), mpi_type(t),
                                         mpi_op(rop), comm, op.new_req()));
                  return Status::Ok();
                }});
}

Work MpiComm::reduce_scatter(const void* send, void* recv, int64_t block, DataType t,
                             ReduceOp rop) {
  std::string what = fmt::format("reduce_scatter({}, {} blocks of {} x {})", reduce_op_name(rop),
                                 size(), block, data_type_name(t));
  if (!data_type_reducible(t))
    return fail(what, FP8_INVALID("{} does not reduce", data_type_name(t)));
  Status s = check_count(block * size(), send, "reduce_scatter");
  if (s.ok()) s = check_count(block, recv, "reduce_scatter");
  if (s.ok() && send == recv) s = FP8_INVALID("send and recv must not alias");
  if (!s.ok()) return fail(what, s);
  MPI_Comm comm = comm_;
  return submit(std::move(what), true, {[=](Op& op) {
                  FP8_MPI(MPI_Ireduce_scatter_block(send, recv, static_cast<int>(block),
                                                    mpi_type(t), mpi_op(rop), comm, op.new_req()));
                  return Status::Ok();
                }});
}

Work MpiComm::all_gather(const void* send, void* recv, int64_t block, DataType t) {
  std::string what =
      fmt::format("all_gather({} blocks of {} x {})", size(), block, data_type_name(t));
  Status s = check_count(block * size(), recv, "all_gather");
  if (s.ok()) s = check_count(block, send, "all_gather");
  if (!s.ok()) return fail(what, s);
  // Sending from this rank's own block of recv is MPI_IN_PLACE.
  const auto* mine = static_cast<const char*>(recv) + rank() * block * data_type_size(t);
  const void* in = send == mine ? MPI_IN_PLACE : send;
  MPI_Comm comm = comm_;
  return submit(
      std::move(what), true, {[=](Op& op) {
        const int n = static_cast<int>(block);
        FP8_MPI(MPI_Iallgather(in, n, mpi_type(t), recv, n, mpi_type(t), comm, op.new_req()));
        return Status::Ok();
      }});
}

Work MpiComm::broadcast(void* buf, int64_t count, DataType t, int root) {
  std::string what =
      fmt::format("broadcast(root {}, {} x {})", peer_str(root), count, data_type_name(t));
  Status s = check_count(count, buf, "broadcast");
  if (s.ok() && (root < 0 || root >= size()))
    s = FP8_INVALID("root {} outside [0, {})", root, size());
  if (!s.ok()) return fail(what, s);
  MPI_Comm comm = comm_;
  return submit(
      std::move(what), true, {[=](Op& op) {
        FP8_MPI(MPI_Ibcast(buf, static_cast<int>(count), mpi_type(t), root, comm, op.new_req()));
        return Status::Ok();
      }});
}

Work MpiComm::barrier() {
  MPI_Comm comm = comm_;
  return submit("barrier()", true, {[=](Op& op) {
                  FP8_MPI(MPI_Ibarrier(comm, op.new_req()));
                  return Status::Ok();
                }});
}

// MPI_Comm_idup of MPI_COMM_WORLD as a timed op (the first collective of create_comms, so a
// rank that never arrives is reported instead of hanging).
Result<std::unique_ptr<Comm>> make_world(const std::shared_ptr<MpiEngine>& engine,
                                         const Topology& topo, double timeout_s) {
  auto handle = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
  Work w = engine->run(0, "world", "MPI_Comm_idup(MPI_COMM_WORLD)", true, {[handle](Op& op) {
                         FP8_MPI(MPI_Comm_idup(MPI_COMM_WORLD, handle.get(), op.new_req()));
                         return Status::Ok();
                       }},
                       timeout_s);
  FP8_RETURN_IF_ERROR(w.wait());
  FP8_RETURN_IF_ERROR(engine->call([handle] {
    FP8_MPI(MPI_Comm_set_errhandler(*handle, MPI_ERRORS_RETURN));
    return Status::Ok();
  }));
  // The census comm (comm.h): once per process; every rank takes the same branch, since every
  // rank has made the same make_world calls.
  if (!engine->census_ready()) {
    auto census = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
    Work c = engine->run(0, "world", "MPI_Comm_idup(MPI_COMM_WORLD) for the census", true,
                         {[census](Op& op) {
                           FP8_MPI(MPI_Comm_idup(MPI_COMM_WORLD, census.get(), op.new_req()));
                           return Status::Ok();
                         }},
                         timeout_s);
    FP8_RETURN_IF_ERROR(c.wait());
    FP8_RETURN_IF_ERROR(engine->call([&] {
      FP8_MPI(MPI_Comm_set_errhandler(*census, MPI_ERRORS_RETURN));
      engine->set_census_comm(*census, topo.rank());
      return Status::Ok();
    }));
  }
  return std::unique_ptr<Comm>(
      new MpiComm(engine, *handle, topo.group(GroupKind::kWorld), timeout_s));
}

// Every rank must have built the same layout: MIN of (v, -v) gives each field's min and max.
Status check_same_layout(Comm& world, const Topology& topo) {
  const std::array<int64_t, 4> mine = {topo.pp(), topo.dp(), topo.ep(), topo.ranks_per_node()};
  std::array<int64_t, 8> v;
  for (int i = 0; i < 4; ++i) v[i] = mine[i], v[4 + i] = -mine[i];
  FP8_RETURN_IF_ERROR(
      world.all_reduce(v.data(), v.data(), 8, DataType::kInt64, ReduceOp::kMin).wait());
  static const char* names[] = {"pp", "dp", "ep", "ranks_per_node"};
  for (int i = 0; i < 4; ++i) {
    if (v[i] != -v[4 + i]) {
      return Status(Code::kInvalidArgument,
                    fmt::format("ranks disagree on the layout: {} ranges over [{}, {}] (this rank: "
                                "{})",
                                names[i], v[i], -v[4 + i], mine[i]),
                    "every rank must load the same config and overrides");
    }
  }
  return Status::Ok();
}

Result<std::unique_ptr<Comm>> split(const std::shared_ptr<MpiEngine>& engine, const Group& g,
                                    double timeout_s) {
  MPI_Comm c = MPI_COMM_NULL;
  FP8_RETURN_IF_ERROR(engine->call([&]() -> Status {
    FP8_MPI(MPI_Comm_split(MPI_COMM_WORLD, g.id, g.index, &c));
    FP8_MPI(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
    int r = -1, n = -1;
    MPI_Comm_rank(c, &r);
    MPI_Comm_size(c, &n);
    if (r != g.index || n != g.size()) {
      return FP8_ERROR(Code::kInternal, "{}: MPI gave rank {} of {}, topology says {} of {}",
                       g.name, r, n, g.index, g.size());
    }
    return Status::Ok();
  }));
  return std::unique_ptr<Comm>(new MpiComm(engine, c, g, timeout_s));
}

// Ranks per host when every host holds the same number of consecutive ranks, else 0.
Result<int> detect_ranks_per_host(int rank) {
  MPI_Comm host;
  FP8_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &host));
  int local_size = 0, lo = 0, hi = 0;
  MPI_Comm_size(host, &local_size);
  FP8_MPI(MPI_Allreduce(&rank, &lo, 1, MPI_INT, MPI_MIN, host));
  FP8_MPI(MPI_Allreduce(&rank, &hi, 1, MPI_INT, MPI_MAX, host));
  MPI_Comm_free(&host);
  // MIN over the world of (size, -size, consecutive): equal sizes and all consecutive.
  int v[3] = {local_size, -local_size, hi - lo + 1 == local_size ? 1 : 0};
  FP8_MPI(MPI_Allreduce(MPI_IN_PLACE, v, 3, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  return (v[0] == -v[1] && v[2] == 1) ? local_size : 0;
}

const char* thread_level_name(int level) {
  if (level == MPI_THREAD_SINGLE) return "MPI_THREAD_SINGLE";
  if (level == MPI_THREAD_FUNNELED) return "MPI_THREAD_FUNNELED";
  if (level == MPI_THREAD_SERIALIZED) return "MPI_THREAD_SERIALIZED";
  return "MPI_THREAD_MULTIPLE";
}

}  // namespace

Result<MpiWorld> mpi_init(int* argc, char*** argv) {
  int inited = 0, provided = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    FP8_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  } else {
    MPI_Query_thread(&provided);
  }
  MpiWorld w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  set_process_rank(w.rank);
  w.thread_level = provided;
  if (provided < MPI_THREAD_SERIALIZED) {
    return Status(Code::kUnimplemented,
                  fmt::format("MPI provides {}; fp8pipe's comm thread needs at least "
                              "MPI_THREAD_SERIALIZED (MPI_THREAD_MULTIPLE requested)",
                              thread_level_name(provided)),
                  "use an MPI built with thread support (Open MPI >= 3 has it by default; "
                  "check `ompi_info | grep -i thread`)");
  }
  FP8_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  FP8_ASSIGN_OR_RETURN(w.ranks_per_host, detect_ranks_per_host(w.rank));
  return w;
}

Status mpi_finalize() {
  if (MpiEngine::alive()) {
    return FP8_ERROR(Code::kInternal,
                     "mpi_finalize: communicators are still alive; destroy every CommSet first");
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) FP8_MPI(MPI_Finalize());
  return Status::Ok();
}

Result<CommSet> create_comms(const Topology& topo, const CommOptions& opts) {
  if (!(opts.timeout_s > 0))
    return FP8_INVALID("fault.timeout_s must be > 0, got {}", opts.timeout_s);
  FP8_ASSIGN_OR_RETURN(std::shared_ptr<MpiEngine> engine, MpiEngine::acquire());
  int size = 0, rank = 0;
  FP8_RETURN_IF_ERROR(engine->call([&] {
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return Status::Ok();
  }));
  FP8_RETURN_IF_ERROR(topo.check_world_size(size));
  if (rank != topo.rank()) {
    return FP8_INVALID("create_comms: topology built for rank {} on MPI rank {}", topo.rank(),
                       rank);
  }
  CommSet set;
  FP8_ASSIGN_OR_RETURN(set.world, make_world(engine, topo, opts.timeout_s));
  FP8_RETURN_IF_ERROR(check_same_layout(*set.world, topo));
  FP8_ASSIGN_OR_RETURN(set.pp, split(engine, topo.group(GroupKind::kPipeline), opts.timeout_s));
  FP8_ASSIGN_OR_RETURN(set.dp, split(engine, topo.group(GroupKind::kData), opts.timeout_s));
  FP8_ASSIGN_OR_RETURN(set.ep, split(engine, topo.group(GroupKind::kExpert), opts.timeout_s));
  FP8_ASSIGN_OR_RETURN(set.expert_dp,
                       split(engine, topo.group(GroupKind::kExpertData), opts.timeout_s));
  FP8_ASSIGN_OR_RETURN(set.node, split(engine, topo.group(GroupKind::kNode), opts.timeout_s));
  return set;
}

void abort_all(const Status& why) {
  log::error("aborting all ranks: {}", why.to_string());
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (inited && !finalized) MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

}  // namespace fp8pipe::parallel
