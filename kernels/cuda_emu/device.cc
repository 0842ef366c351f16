// fp8pipe CUDA emulation: kernel execution. A launch's blocks are spread over the calling thread
// and a small worker pool, each OS thread running one block at a time; the threads of a block
// run on fibers (own stacks, switched by a few instructions of assembly) until they finish or
// reach __syncthreads / a warp collective. Blocks
// resume when every thread of the block (or every lane of the warp) has arrived; anything else
// (a warp collective missing a lane, a barrier no thread can reach) is a deadlock on a GPU and is
// reported as a launch failure here.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

namespace fp8pipe::cuda_emu {
void note_launch_error(cudaError_t e);
}

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save and
// continues on `next` (a stack saved the same way). MXCSR and the x87 control word are not
// switched: nothing in a kernel changes the floating-point environment.
extern "C" void fp8pipe_emu_switch(void** save, void* next);
asm(R"(
.pushsection .text
.globl fp8pipe_emu_switch
.type fp8pipe_emu_switch,@function
fp8pipe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fp8pipe_emu_switch,.-fp8pipe_emu_switch
.popsection
)");

namespace fp8pipe::cuda_emu {
namespace {

constexpr size_t kStackBytes = size_t{128} << 10;
constexpr int kMaxThreads = 1024;

enum class Wait { kRunning, kBlock, kWarp, kDone };

// A runner: runs the block's threads one after another (claiming the next unstarted one when its
// thread ends) on its own stack. Only a thread that waits in a barrier or collective keeps its
// runner; then a new runner carries on with the next threads. A kernel without barriers runs
// its whole block on one runner, with no switch per thread.
struct Fiber {
  void* sp = nullptr;
  uint3 tid{};     // of the thread it runs now
  int linear = 0;  // that thread's linear index in the block
  Wait wait = Wait::kRunning;
};

// A warp's collective state. Values go to one of two slot sets by the parity of the collective's
// number: a lane that has passed collective g can write g+1's values while slower lanes still
// read g's, and nobody can reach g+2 before every lane has passed g+1 (so one wait per collective).
struct Warp {
  uint64_t slot[2][32];
  unsigned gen = 0;    // collectives completed
  int arrived = 0;     // lanes waiting in the current one
  unsigned mask = 0;   // the mask the current one was called with
  unsigned lanes = 0;  // existing lanes (bit i: lane i exists)
};

// One launch in progress on this OS thread.
struct Launch {
  uint3 grid{}, block{}, block_idx{};
  const char* name = "";
  const std::function<void()>* body = nullptr;
  int nthreads = 0;
  std::vector<Fiber> fibers;      // runners; at most one per thread
  std::vector<int> runner_of;     // thread -> the runner running it (-1: not started)
  std::vector<int> thread_order;  // the k-th thread to start (FP8PIPE_EMU_ORDER)
  uint64_t key = 0;               // this launch's shuffle seed
  int nrunners = 0, next_thread = 0;
  int fresh = 0;  // runners spawned that have not claimed a thread yet (at most one)
  std::vector<Warp> warps;
  std::vector<int> ready;  // FIFO ring of fiber indices
  size_t ready_head = 0, ready_count = 0;
  int done = 0, at_block = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  bool failed = false;

  void push_ready(int i) {
    size_t at = ready_head + ready_count;
    if (at >= ready.size()) at -= ready.size();
    ready[at] = i;
    ++ready_count;
  }
  int pop_ready() {
    const int i = ready[ready_head];
    if (++ready_head == ready.size()) ready_head = 0;
    --ready_count;
    return i;
  }
  // The most recently readied fiber (reverse order: a warp that leaves a collective runs on at
  // once, ahead of the others).
  int pop_newest() {
    size_t at = ready_head + ready_count - 1;
    if (at >= ready.size()) at -= ready.size();
    --ready_count;
    return ready[at];
  }
  // A ready fiber drawn by r (shuffle order).
  int pop_any(uint64_t r) {
    size_t at = ready_head + r % ready_count;
    if (at >= ready.size()) at -= ready.size();
    std::swap(ready[at], ready[ready_head]);
    return pop_ready();
  }
};

thread_local Launch* g_launch = nullptr;

// FP8PIPE_EMU_ORDER: the order in which a launch's blocks start and a block's threads run between
// waits. A GPU promises no order, so a kernel that is only right in one (a shared-memory read
// without the barrier that orders it after the write, a block that relies on another block
// having run) gives other results under another. forward (default): ascending; reverse:
// descending; shuffle[:SEED]: a permutation drawn per launch and block from SEED (default 1).
struct Order {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  uint64_t seed = 1;
  // Parses forward | reverse | shuffle[:SEED]; false (and no change) for anything else.
  bool parse(const char* s) {
    if (std::strcmp(s, "forward") == 0) {
      kind = kForward;
    } else if (std::strcmp(s, "reverse") == 0) {
      kind = kReverse;
    } else if (std::strncmp(s, "shuffle", 7) == 0 && (s[7] == '\0' || s[7] == ':')) {
      char* end = nullptr;
      const uint64_t v = s[7] == ':' ? std::strtoull(s + 8, &end, 10) : 1;
      if (s[7] == ':' && (end == s + 8 || *end != '\0')) return false;
      kind = kShuffle;
      seed = v;
    } else {
      return false;
    }
    return true;
  }
  Order() {
    const char* env = std::getenv("FP8PIPE_EMU_ORDER");
    if (env != nullptr && !parse(env)) {
      std::fprintf(stderr,
                   "cuda_emu: FP8PIPE_EMU_ORDER=%s is not one of forward, reverse, "
                   "shuffle[:SEED]; using forward\n",
                   env);
    }
  }
};
Order& order() {
  static Order o;
  return o;
}

// splitmix64: the shuffles' random numbers.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// FP8PIPE_EMU_STATS=1: launches, blocks and threads run, printed per kernel at exit.
struct Stats {
  struct Row {
    uint64_t launches = 0, blocks = 0, threads = 0;
  };
  std::mutex mu;
  std::map<std::string, Row> rows;
  const bool on = std::getenv("FP8PIPE_EMU_STATS") != nullptr;
  ~Stats() {
    if (!on) return;
    std::vector<std::pair<std::string, Row>> v(rows.begin(), rows.end());
    std::sort(v.begin(), v.end(),
              [](const auto& a, const auto& b) { return a.second.threads > b.second.threads; });
    std::fprintf(stderr, "cuda_emu: %-60s %10s %12s %14s\n", "kernel", "launches", "blocks",
                 "threads");
    for (const auto& [name, r] : v) {
      std::fprintf(stderr, "cuda_emu: %-60s %10llu %12llu %14llu\n", name.c_str(),
                   static_cast<unsigned long long>(r.launches),
                   static_cast<unsigned long long>(r.blocks),
                   static_cast<unsigned long long>(r.threads));
    }
  }
  void add(const char* name, uint64_t blocks, uint64_t threads) {
    if (!on) return;
    std::lock_guard<std::mutex> lk(mu);
    Row& r = rows[name];
    ++r.launches;
    r.blocks += blocks;
    r.threads += blocks * threads;
  }
};
Stats g_stats;

// Stacks are kept per OS thread and reused by every launch (mapped lazily, never touched pages
// cost nothing).
struct Stacks {
  char* base = nullptr;
  Stacks() {
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cuda_emu: cannot map fiber stacks\n");
      std::abort();
    }
    base = static_cast<char*>(p);
  }
  ~Stacks() { munmap(base, kStackBytes * kMaxThreads); }
};
thread_local Stacks g_stacks;

// A block barrier completes when every thread that has not exited is waiting in it (exited
// threads count as arrived, as on sm_70+).
void release_block(Launch* l) {
  for (int k = 0; k < l->nrunners; ++k) {
    if (l->fibers[k].wait == Wait::kBlock) {
      l->fibers[k].wait = Wait::kRunning;
      l->push_ready(k);
    }
  }
  l->at_block = 0;
}
void maybe_release_block(Launch* l) {
  if (l->at_block > 0 && l->at_block + l->done == l->nthreads) release_block(l);
}

[[noreturn]] void fiber_main() {
  Launch* l = g_launch;
  Fiber* me = l->cur;
  const int runner = static_cast<int>(me - l->fibers.data());
  --l->fresh;
  while (l->next_thread < l->nthreads) {
    const int i = l->thread_order[l->next_thread++];
    me->linear = i;
    me->tid = {static_cast<unsigned>(i) % l->block.x,
               static_cast<unsigned>(i) / l->block.x % l->block.y,
               static_cast<unsigned>(i) / (l->block.x * l->block.y)};
    me->wait = Wait::kRunning;
    l->runner_of[i] = runner;
    (*l->body)();
    ++l->done;
    maybe_release_block(l);
  }
  me->wait = Wait::kDone;
  void* dummy;
  fp8pipe_emu_switch(&dummy, l->sched_sp);
  std::abort();  // never resumed
}

// Lays out a fresh stack so that switching to it "returns" into fiber_main with the ABI's
// alignment (rsp = 8 mod 16 at function entry).
void* fresh_stack(int i) {
  // Stack tops are staggered by 64 bytes a fiber: equal offsets 128 KiB apart would all map to
  // the same cache sets.
  char* top = g_stacks.base + kStackBytes * static_cast<size_t>(i + 1) - 64 * (i % 64);
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // return address, 16-aligned
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  slot[1] = 0;
  uint64_t* sp = slot - 6;  // rbp rbx r12 r13 r14 r15
  std::memset(sp, 0, 6 * sizeof(uint64_t));
  return sp;
}

void yield_to_scheduler(Wait why) {
  Launch* l = g_launch;
  l->cur->wait = why;
  fp8pipe_emu_switch(&l->cur->sp, l->sched_sp);
}

void fail(Launch* l, const char* what) {
  if (!l->failed) {
    std::fprintf(stderr, "cuda_emu: kernel %s block (%u,%u,%u): %s\n", l->name, l->block_idx.x,
                 l->block_idx.y, l->block_idx.z, what);
  }
  l->failed = true;
}

// Runs one block to completion (or to a detected deadlock).
void run_block(Launch* l) {
  const int n = l->nthreads;
  l->ready_head = l->ready_count = 0;
  l->done = l->at_block = 0;
  l->nrunners = l->next_thread = l->fresh = 0;
  auto spawn = [l] {
    const int k = l->nrunners++;
    ++l->fresh;
    l->fibers[k].wait = Wait::kRunning;
    l->fibers[k].sp = fresh_stack(k);
    l->push_ready(k);
  };
  for (Warp& w : l->warps) {
    w.gen = 0;
    w.arrived = 0;
  }
  std::fill(l->runner_of.begin(), l->runner_of.end(), -1);
  std::iota(l->thread_order.begin(), l->thread_order.end(), 0);
  const Order& o = order();
  uint64_t r = mix(l->key ^ mix(l->block_idx.x + (uint64_t{l->block_idx.y} << 32) +
                                (uint64_t{l->block_idx.z} << 48)));
  if (o.kind == Order::kReverse) {
    std::reverse(l->thread_order.begin(), l->thread_order.end());
  } else if (o.kind == Order::kShuffle) {
    for (int i = n - 1; i > 0; --i) {  // Fisher-Yates
      r = mix(r);
      std::swap(l->thread_order[i], l->thread_order[r % static_cast<uint64_t>(i + 1)]);
    }
  }
  spawn();
  while (l->ready_count > 0) {
    int next;
    if (o.kind == Order::kReverse) {
      next = l->pop_newest();
    } else if (o.kind == Order::kShuffle) {
      r = mix(r);
      next = l->pop_any(r);
    } else {
      next = l->pop_ready();
    }
    Fiber* f = &l->fibers[next];
    l->cur = f;
    fp8pipe_emu_switch(&l->sched_sp, f->sp);
    // A runner whose thread now waits: the threads not yet started need another one.
    // (Runners are bounded by the threads + 1: at most one unstarted runner exists.)
    if (f->wait != Wait::kDone && l->next_thread < n && l->fresh == 0) spawn();
  }
  l->cur = nullptr;
  if (l->done != n) {
    fail(l,
         "deadlock: a warp collective is missing lanes of its mask, or threads wait at "
         "different barriers");
  }
}

// Waits in the calling lane's warp collective; returns the slot set of this collective.
uint64_t* warp_arrive(unsigned mask, uint64_t v) {
  Launch* l = g_launch;
  Fiber* f = l->cur;
  Warp& w = l->warps[f->linear / 32];
  const unsigned gen = w.gen;
  w.slot[gen & 1][f->linear % 32] = v;
  if (w.arrived == 0) w.mask = mask;
  const unsigned named = w.mask & w.lanes;
  if (++w.arrived == __builtin_popcount(named)) {  // the last lane: release the others
    w.arrived = 0;
    ++w.gen;
    const int base = f->linear / 32 * 32;
    for (int i = 0; i < 32; ++i) {
      if (!((named >> i) & 1u)) continue;
      const int k = l->runner_of[base + i];
      if (k < 0) continue;  // not started yet
      Fiber& o = l->fibers[k];
      if (o.wait == Wait::kWarp && o.linear == base + i) {
        o.wait = Wait::kRunning;
        l->push_ready(k);
      }
    }
  } else {
    yield_to_scheduler(Wait::kWarp);
  }
  return w.slot[gen & 1];
}

// SIGSEGV/SIGBUS inside a kernel: say which kernel, block and thread, then die as before.
void on_fault(int sig) {
  Launch* l = g_launch;
  if (l != nullptr && l->cur != nullptr) {
    char buf[256];
    const int len = std::snprintf(
        buf, sizeof buf,
        "cuda_emu: signal %d in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): an access outside "
        "every live device buffer (out of bounds, or freed)\n",
        sig, l->name, l->block_idx.x, l->block_idx.y, l->block_idx.z, l->cur->tid.x, l->cur->tid.y,
        l->cur->tid.z);
    if (len > 0) (void)!write(2, buf, static_cast<size_t>(len));
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// The fault may happen on a fiber stack: every thread that runs blocks handles it on a stack of
// its own.
void use_alt_stack() {
  thread_local std::vector<char> alt(64 << 10);
  thread_local bool set = false;
  if (set) return;
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  set = true;
}

struct FaultHandler {
  FaultHandler() {
    struct sigaction sa {};
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  }
};

// The blocks of one launch; run_blocks_from runs blocks taken from `next` until none is left (the
// calling thread and the pool's workers share the counter).
struct BlockRange {
  dim3 grid, block;
  const char* name;
  const std::function<void()>* body;
  uint64_t blocks;
  uint64_t key;               // the launch's shuffle seed
  uint64_t mul = 1, add = 0;  // the k-th block to start is (mul * k + add) mod blocks

  BlockRange(dim3 g, dim3 b, const char* n, const std::function<void()>* f, uint64_t nb, uint64_t k)
      : grid(g), block(b), name(n), body(f), blocks(nb), key(k) {
    const Order& o = order();
    if (o.kind == Order::kReverse) {
      mul = blocks - 1;  // -1 mod blocks
      add = blocks - 1;
    } else if (o.kind == Order::kShuffle && blocks > 1) {
      uint64_t r = mix(key);
      do {
        r = mix(r);
        mul = r % blocks;
      } while (std::gcd(mul, blocks) != 1);  // a bijection needs mul coprime to blocks
      add = mix(r) % blocks;
    }
  }

  void run_blocks_from(std::atomic<uint64_t>& next) const {
    use_alt_stack();
    Launch l;
    l.grid = grid;
    l.block = block;
    l.name = name;
    l.body = body;
    l.nthreads = static_cast<int>(uint64_t{block.x} * block.y * block.z);
    l.fibers.resize(l.nthreads + 1);
    l.runner_of.resize(l.nthreads);
    l.thread_order.resize(l.nthreads);
    l.key = key;
    l.ready.resize(l.nthreads + 1);
    l.warps.resize((l.nthreads + 31) / 32);
    for (size_t w = 0; w < l.warps.size(); ++w) {
      const int lanes = std::min(32, l.nthreads - static_cast<int>(w) * 32);
      l.warps[w].lanes = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
    }
    g_launch = &l;
    for (uint64_t k; !l.failed && (k = next.fetch_add(1)) < blocks;) {
      const uint64_t b =
          static_cast<uint64_t>((static_cast<unsigned __int128>(mul) * k + add) % blocks);
      l.block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
      run_block(&l);
    }
    g_launch = nullptr;
    if (l.failed) {
      next.store(blocks);  // the other threads stop too
      note_launch_error(cudaErrorLaunchFailure);
    }
  }
};

// Worker threads that run a launch's blocks next to the launching thread
// (FP8PIPE_EMU_THREADS, default: the hardware threads, at most 8). Blocks are independent on a
// GPU too; __shared__ storage is per OS thread, so each block still has its own. A launch from a
// second host thread while the pool is busy runs on that thread alone.
class Pool {
 public:
  Pool() {
    // FP8PIPE_EMU_THREADS: 1..64; anything else (unset, not a number) is the default.
    unsigned n = std::min(8u, std::max(1u, std::thread::hardware_concurrency()));
    if (const char* env = std::getenv("FP8PIPE_EMU_THREADS")) {
      const long v = std::strtol(env, nullptr, 10);
      if (v >= 1 && v <= 64) {
        n = static_cast<unsigned>(v);
      } else {
        std::fprintf(stderr, "cuda_emu: FP8PIPE_EMU_THREADS=%s is not in 1..64; using %u\n", env,
                     n);
      }
    }
    for (unsigned i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  std::atomic<uint64_t>& counter_for_inline() {
    thread_local std::atomic<uint64_t> c;
    c.store(0);
    return c;
  }
  // Runs every block of `r` on this thread and the workers; false if the pool is in use.
  bool try_run(const BlockRange& r) {
    if (workers_.empty()) return false;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &r;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      ++gen_;
    }
    cv_.notify_all();
    r.run_blocks_from(next_);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const BlockRange* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
        if (stop_) return;
        seen = gen_;
        job = job_;
      }
      job->run_blocks_from(next_);
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_, done_cv_;
  const BlockRange* job_ = nullptr;
  std::atomic<uint64_t> next_{0};
  uint64_t gen_ = 0;
  int active_ = 0;
  bool stop_ = false;
};
Pool& pool() {
  static Pool p;  // started at the first launch
  return p;
}

}  // namespace

const uint3& cur_thread_idx() { return g_launch->cur->tid; }
const uint3& cur_block_idx() { return g_launch->block_idx; }
const uint3& cur_block_dim() { return g_launch->block; }
const uint3& cur_grid_dim() { return g_launch->grid; }
int lane_id() { return g_launch->cur->linear % 32; }

bool set_execution_order(const char* spec) { return order().parse(spec); }

void syncthreads() {
  Launch* l = g_launch;
  if (l->at_block + 1 + l->done == l->nthreads) {  // the last thread: release the others
    release_block(l);
    return;
  }
  ++l->at_block;
  yield_to_scheduler(Wait::kBlock);
}

uint64_t warp_exchange(unsigned mask, uint64_t v, int src_lane) {
  return warp_arrive(mask, v)[src_lane & 31];
}

unsigned warp_reduce_max(unsigned mask, unsigned v) {
  const uint64_t* slot = warp_arrive(mask, v);
  unsigned m = 0;
  const unsigned named = mask & g_launch->warps[g_launch->cur->linear / 32].lanes;
  for (int i = 0; i < 32; ++i) {
    if ((named >> i) & 1u) m = std::max(m, static_cast<unsigned>(slot[i]));
  }
  return m;
}

void run_kernel(dim3 grid, dim3 block, cudaStream_t stream, const char* name,
                std::function<void()> body) {
  static FaultHandler handler;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (threads == 0 || blocks == 0 || threads > kMaxThreads || block.z > 64 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u) {
    std::fprintf(stderr,
                 "cuda_emu: kernel %s: invalid launch configuration grid (%u,%u,%u) block "
                 "(%u,%u,%u)\n",
                 name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    note_launch_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (g_launch != nullptr) {
    std::fprintf(stderr, "cuda_emu: kernel %s launched from inside kernel %s\n", name,
                 g_launch->name);
    std::abort();
  }
  g_stats.add(name, blocks, threads);
  // The configuration is checked at the launch; the blocks run with the stream's work.
  static std::atomic<uint64_t> launches{0};
  const uint64_t key = mix(order().seed ^ mix(launches.fetch_add(1)));
  submit(stream, [grid, block, name, blocks, key, body = std::move(body)] {
    const BlockRange all{grid, block, name, &body, blocks, key};
    if (blocks > 1 && pool().try_run(all)) return;
    all.run_blocks_from(pool().counter_for_inline());
  });
}

}  // namespace fp8pipe::cuda_emu
