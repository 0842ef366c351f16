// fp8pipe CUDA emulation: the runtime API (memory, copies, streams, events, errors) on the CPU.
// See include/cuda_runtime_api.h for what is emulated and what is checked.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime_api.h"

namespace fp8pipe::cuda_emu {
namespace {

constexpr size_t kAlign = 256;           // cudaMalloc's alignment
constexpr unsigned char kFresh = 0xFF;   // never-written device memory reads as NaN
constexpr unsigned char kCanary = 0xA5;  // slack around an allocation; must stay intact

// A device allocation: [ptr, ptr+bytes) inside an mmap'd region whose last page is PROT_NONE,
// placed so the 256-aligned end of the buffer meets that page: any access past the aligned end
// faults at once; writes into the slack before it are caught by the canary check.
struct Alloc {
  size_t bytes;
  void* region;
  size_t region_bytes;
  size_t tail;  // canary bytes after ptr+bytes
};

// Freed regions stay mapped PROT_NONE (their pages released) for the last kQuarantine frees, so
// their addresses are not handed out again at once: a use after free, e.g. on a stream that did
// not wait for the stream that freed the buffer, faults instead of reading a newer buffer.
constexpr size_t kQuarantine = 4096;

struct State {
  std::mutex mu;
  std::map<uintptr_t, Alloc> device;                // by start address
  std::deque<std::pair<void*, size_t>> quarantine;  // freed regions, oldest first
  std::set<void*> pinned;
  std::map<void*, size_t> pinned_bytes;
  cudaError_t last = cudaSuccess;  // reported by the next cudaGetLastError / sync
  int device_index = 0;
};
State& st() {
  static State* s = new State;  // never destroyed: frees may come from static destructors
  return *s;
}
size_t page() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

bool canary_ok(uintptr_t p, const Alloc& a) {
  const auto* t = reinterpret_cast<const unsigned char*>(p + a.bytes);
  for (size_t i = 0; i < a.tail; ++i) {
    if (t[i] != kCanary) return false;
  }
  return true;
}

void set_error(cudaError_t e) {
  if (st().last == cudaSuccess) st().last = e;
}

cudaError_t take_error() {
  std::lock_guard<std::mutex> lk(st().mu);
  const cudaError_t e = st().last;
  st().last = cudaSuccess;
  return e;
}

// Checks every live allocation's canary (at synchronization points and frees).
cudaError_t check_all_canaries() {
  std::lock_guard<std::mutex> lk(st().mu);
  for (const auto& [p, a] : st().device) {
    if (!canary_ok(p, a)) {
      std::fprintf(stderr,
                   "cuda_emu: out-of-bounds write past the end of the %zu-byte device buffer at "
                   "%p\n",
                   a.bytes, reinterpret_cast<void*>(p));
      set_error(cudaErrorIllegalAddress);
    }
  }
  const cudaError_t e = st().last;
  st().last = cudaSuccess;
  return e;
}

cudaError_t device_alloc(void** out, size_t bytes) {
  if (out == nullptr) return cudaErrorInvalidValue;
  if (bytes == 0) {
    *out = nullptr;
    return cudaSuccess;
  }
  const size_t used = (bytes + kAlign - 1) / kAlign * kAlign;
  const size_t data_pages = (used + page() - 1) / page();
  const size_t region_bytes = (data_pages + 1) * page();
  void* region = mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (region == MAP_FAILED) return cudaErrorMemoryAllocation;
  auto* guard = static_cast<unsigned char*>(region) + data_pages * page();
  mprotect(guard, page(), PROT_NONE);
  unsigned char* p = guard - used;
  std::memset(static_cast<unsigned char*>(region), kCanary,
              static_cast<size_t>(p - static_cast<unsigned char*>(region)));
  std::memset(p, kFresh, bytes);
  std::memset(p + bytes, kCanary, used - bytes);
  std::lock_guard<std::mutex> lk(st().mu);
  st().device[reinterpret_cast<uintptr_t>(p)] = Alloc{bytes, region, region_bytes, used - bytes};
  *out = p;
  return cudaSuccess;
}

cudaError_t device_free(void* p) {
  if (p == nullptr) return cudaSuccess;
  Alloc a;
  {
    std::lock_guard<std::mutex> lk(st().mu);
    auto it = st().device.find(reinterpret_cast<uintptr_t>(p));
    if (it == st().device.end()) {
      std::fprintf(stderr, "cuda_emu: cudaFree of %p, which is not a live device allocation\n", p);
      return cudaErrorInvalidValue;
    }
    a = it->second;
    if (!canary_ok(it->first, a)) {
      std::fprintf(stderr,
                   "cuda_emu: out-of-bounds write past the end of the %zu-byte device buffer at "
                   "%p (found at its free)\n",
                   a.bytes, p);
      set_error(cudaErrorIllegalAddress);
    }
    st().device.erase(it);
  }
  madvise(a.region, a.region_bytes, MADV_DONTNEED);
  mprotect(a.region, a.region_bytes, PROT_NONE);
  std::pair<void*, size_t> old{nullptr, 0};
  {
    std::lock_guard<std::mutex> lk(st().mu);
    st().quarantine.emplace_back(a.region, a.region_bytes);
    if (st().quarantine.size() > kQuarantine) {
      old = st().quarantine.front();
      st().quarantine.pop_front();
    }
  }
  if (old.first != nullptr) munmap(old.first, old.second);
  return cudaSuccess;
}

// Where a copy endpoint lives: 1 device, 0 host memory, -1 a pointer into a device buffer whose
// span runs past its end.
int where(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lk(st().mu);
  const auto u = reinterpret_cast<uintptr_t>(p);
  auto it = st().device.upper_bound(u);
  if (it == st().device.begin()) return 0;
  --it;
  if (u >= it->first + it->second.bytes + it->second.tail) return 0;
  return u + bytes <= it->first + it->second.bytes ? 1 : -1;
}

cudaError_t check_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                       const char* fn) {
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  const int wd = where(dst, bytes), ws = where(src, bytes);
  const bool want_dd = kind == cudaMemcpyDeviceToDevice || kind == cudaMemcpyHostToDevice;
  const bool want_sd = kind == cudaMemcpyDeviceToDevice || kind == cudaMemcpyDeviceToHost;
  if (wd < 0 || ws < 0) {
    std::fprintf(stderr, "cuda_emu: %s of %zu bytes runs past the end of a device buffer\n", fn,
                 bytes);
    return cudaErrorInvalidValue;
  }
  if (kind != cudaMemcpyDefault && ((wd == 1) != want_dd || (ws == 1) != want_sd)) {
    std::fprintf(stderr,
                 "cuda_emu: %s kind %d does not match the pointers (dst %s, src %s memory)\n", fn,
                 static_cast<int>(kind), wd == 1 ? "device" : "host", ws == 1 ? "device" : "host");
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

bool is_device_range(const void* p, size_t bytes) { return p != nullptr && where(p, bytes) == 1; }

void raise_fault(cudaError_t e, const char* what) {
  std::fprintf(stderr, "cuda_emu: device fault (%s): %s\n", cudaGetErrorName(e), what);
  std::lock_guard<std::mutex> lk(st().mu);
  set_error(e);
}

void note_launch_error(cudaError_t e) {
  std::lock_guard<std::mutex> lk(st().mu);
  set_error(e);
}

// ---- Streams: work runs when the host must see it, not when it is enqueued ----------------------
// Each stream keeps its pending work in order. It runs when the host synchronizes with it (stream,
// event or device synchronize, a blocking copy, a copy into pageable memory), when work on
// another stream that waits for one of its events runs, or when a stream holds more than
// kMaxPending items (a GPU may run ahead at any time). So a consumer that forgets to wait for its
// producer's stream reads memory that is not written yet (fresh allocations read as NaN), and a
// host buffer handed to an asynchronous copy is read when the copy runs, not at the call.
// The legacy default stream (nullptr) runs everything pending, then its own work, at the call.
// FP8PIPE_EMU_LAZY=0 runs all work at enqueue time instead.
namespace {
constexpr size_t kMaxPending = 4096;
// A queued item returns true once it is done. Only a gated item (submit_gated: an NCCL operation
// waiting for its peers) returns false; it is called again at the next flush, and the stream's
// later work waits behind it.
struct Pending {
  uint64_t seq;
  std::function<bool()> work;
};
struct Queues {
  std::recursive_mutex mu;
  std::map<cudaStream_t, std::deque<Pending>> q;  // node-based: references survive inserts
  uint64_t next_seq = 1;
};
Queues& queues() {
  static Queues* q = new Queues;
  return *q;
}
bool lazy() {
  static const bool on = [] {
    const char* e = std::getenv("FP8PIPE_EMU_LAZY");
    return e == nullptr || std::string(e) != "0";
  }();
  return on;
}
// Depth of flushes on this thread: a flush inside a queued item (cudaStreamWaitEvent's) must not
// wait for a gated item, since it holds the queue lock that the waiting would have to release.
thread_local int flush_depth = 0;

// Runs s's items up to seq while they complete; false if a gated item is still in flight.
bool try_flush_until(cudaStream_t s, uint64_t seq) {
  Queues& Q = queues();
  std::lock_guard<std::recursive_mutex> lk(Q.mu);
  auto it = Q.q.find(s);
  if (it == Q.q.end()) return true;
  std::deque<Pending>& d = it->second;
  ++flush_depth;
  bool reached = true;
  while (!d.empty() && d.front().seq <= seq) {
    if (!d.front().work()) {
      reached = false;
      break;
    }
    d.pop_front();
  }
  --flush_depth;
  return reached;
}
bool try_flush_all() {
  Queues& Q = queues();
  std::lock_guard<std::recursive_mutex> lk(Q.mu);
  bool all = true;
  for (auto& [s, d] : Q.q) all = try_flush_until(s, UINT64_MAX) && all;
  return all;
}
// Retries `attempt` until it succeeds, without the queue lock in between: a gated item completes
// on the NCCL emulation's progress thread. Inside an item (flush_depth > 0) it tries once.
template <class F>
void wait_for(F attempt) {
  for (int spins = 0; !attempt(); ++spins) {
    if (flush_depth > 0) return;
    if (spins < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(spins < 4096 ? 20 : 500));
    }
  }
}
}  // namespace

void flush_until(cudaStream_t s, uint64_t seq) {
  wait_for([&] { return try_flush_until(s, seq); });
}

void flush_stream(cudaStream_t s) {
  if (s == nullptr) {
    flush_all();
  } else {
    flush_until(s, UINT64_MAX);
  }
}

void flush_all() {
  wait_for([] { return try_flush_all(); });
}

bool reached(cudaStream_t s, uint64_t seq) { return try_flush_until(s, seq); }

uint64_t submit_gated(cudaStream_t s, std::function<bool()> work) {
  if (!lazy()) {
    wait_for(work);
    return 0;
  }
  Queues& Q = queues();
  std::unique_lock<std::recursive_mutex> lk(Q.mu);
  if (s == nullptr) {
    lk.unlock();
    flush_all();
    wait_for(work);
    return 0;
  }
  std::deque<Pending>& d = Q.q[s];
  const uint64_t seq = Q.next_seq++;
  d.push_back({seq, std::move(work)});
  // Bounds memory; a gated item in flight may stop it short, and the queue grows meanwhile.
  if (d.size() > kMaxPending) try_flush_until(s, d[d.size() / 2].seq);
  return seq;
}

uint64_t submit(cudaStream_t s, std::function<void()> work) {
  return submit_gated(s, [w = std::move(work)] {
    w();
    return true;
  });
}

void forget_stream(cudaStream_t s) {
  flush_until(s, UINT64_MAX);
  Queues& Q = queues();
  std::lock_guard<std::recursive_mutex> lk(Q.mu);
  try_flush_until(s, UINT64_MAX);  // work queued meanwhile (none in the backend's use)
  Q.q.erase(s);
}

bool is_pinned(const void* p) {
  std::lock_guard<std::mutex> lk(st().mu);
  auto it = st().pinned.upper_bound(const_cast<void*>(p));
  if (it == st().pinned.begin()) return false;
  --it;
  return static_cast<const char*>(p) < static_cast<const char*>(*it) + st().pinned_bytes[*it];
}

}  // namespace fp8pipe::cuda_emu

using namespace fp8pipe::cuda_emu;

struct EmuStream {
  unsigned flags = 0;
};
// An event's last record: the stream and place of its marker (0: nothing pending), shared with the
// marker's work so that destroying the event before it runs is harmless.
struct EventState {
  bool recorded = false;
  std::chrono::steady_clock::time_point when{};
  cudaStream_t stream = nullptr;
  uint64_t seq = 0;
  uint64_t gen = 0;  // records so far
};
struct EmuEvent {
  std::shared_ptr<EventState> st = std::make_shared<EventState>();
};
struct EmuMemPool {
  uint64_t release_threshold = 0;
};

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidPitchValue:
      return "cudaErrorInvalidPitchValue";
    case cudaErrorInvalidDevicePointer:
      return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorNotReady:
      return "device not ready";
    default:
      return "emulated CUDA error";
  }
}
cudaError_t cudaGetLastError() { return take_error(); }
cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lk(st().mu);
  return st().last;
}

namespace fp8pipe::cuda_emu {
int device_count() {
  static const int n = [] {
    const char* e = std::getenv("FP8PIPE_EMU_DEVICES");
    const int v = e ? std::atoi(e) : 1;
    return v >= 1 && v <= 64 ? v : 1;
  }();
  return n;
}
}  // namespace fp8pipe::cuda_emu
namespace {
thread_local int current_device = 0;  // CUDA's current device is per host thread
}  // namespace
cudaError_t cudaGetDeviceCount(int* n) {
  *n = device_count();
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= device_count()) return cudaErrorInvalidDevice;
  current_device = d;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = current_device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d < 0 || d >= device_count()) return cudaErrorInvalidDevice;
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof(p->name), "fp8pipe CUDA emulator (CPU)");
  p->major = 9;  // presents itself as Hopper, the only architecture the backend accepts
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->l2CacheSize = 50 << 20;
  p->totalGlobalMem = size_t{80} << 30;
  p->maxThreadsPerBlock = 1024;
  p->sharedMemPerBlock = 48 << 10;
  p->warpSize = 32;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  flush_all();
  return check_all_canaries();
}
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int d) {
  static EmuMemPool p;  // one pool: the devices share the host's memory
  if (d < 0 || d >= device_count()) return cudaErrorInvalidDevice;
  *pool = &p;
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  if (pool == nullptr || value == nullptr) return cudaErrorInvalidValue;
  if (attr == cudaMemPoolAttrReleaseThreshold) {
    pool->release_threshold = *static_cast<uint64_t*>(value);
  }
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  *a = cudaPointerAttributes{};
  if (where(p, 1) == 1) {
    a->type = cudaMemoryTypeDevice;
    a->devicePointer = const_cast<void*>(p);
  } else {
    std::lock_guard<std::mutex> lk(st().mu);
    a->type =
        st().pinned.count(const_cast<void*>(p)) ? cudaMemoryTypeHost : cudaMemoryTypeUnregistered;
    a->hostPointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) { return device_alloc(p, bytes); }
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return device_alloc(p, bytes); }
cudaError_t cudaFree(void* p) {
  flush_all();  // cudaFree synchronizes the device
  return device_free(p);
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  if (p != nullptr && where(p, 1) != 1) {
    std::fprintf(stderr, "cuda_emu: cudaFreeAsync of %p, which is not a live device allocation\n",
                 p);
    return cudaErrorInvalidValue;
  }
  submit(s, [p] { device_free(p); });  // the memory stays usable by the stream's earlier work
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign + kAlign);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lk(st().mu);
  st().pinned.insert(*p);
  st().pinned_bytes[*p] = bytes;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(st().mu);
    if (st().pinned.erase(p) == 0) return cudaErrorInvalidValue;
    st().pinned_bytes.erase(p);
  }
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpy");
  if (e != cudaSuccess) return e;
  flush_all();  // a blocking copy on the legacy stream: after all earlier work
  if (bytes) std::memmove(dst, src, bytes);
  return check_all_canaries();
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s) {
  const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpyAsync");
  if (e != cudaSuccess || bytes == 0) return e;
  const bool dst_host = where(dst, bytes) == 0, src_host = where(src, bytes) == 0;
  if (src_host && !is_pinned(src)) {
    // From pageable memory CUDA stages the source before returning: the caller may reuse it.
    auto copy = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                    static_cast<const char*>(src) + bytes);
    submit(s, [dst, copy] { std::memcpy(dst, copy->data(), copy->size()); });
  } else if (dst_host && !is_pinned(dst)) {
    // Into pageable memory the copy is synchronous for the host.
    flush_stream(s);
    std::memmove(dst, src, bytes);
  } else {
    submit(s, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind, cudaStream_t s) {
  if (width > dpitch || width > spitch) {
    std::fprintf(stderr, "cuda_emu: cudaMemcpy2DAsync width %zu exceeds a pitch (%zu, %zu)\n",
                 width, dpitch, spitch);
    return cudaErrorInvalidPitchValue;
  }
  if (width == 0 || height == 0) return cudaSuccess;
  const size_t dspan = (height - 1) * dpitch + width, sspan = (height - 1) * spitch + width;
  if ((kind != cudaMemcpyDeviceToDevice && kind != cudaMemcpyDefault) ||
      !is_device_range(dst, dspan) || !is_device_range(src, sspan)) {
    std::fprintf(stderr,
                 "cuda_emu: cudaMemcpy2DAsync kind %d: the emulation copies device to device "
                 "only, within one allocation each (%zu rows of %zu bytes)\n",
                 static_cast<int>(kind), height, width);
    return cudaErrorInvalidValue;
  }
  submit(s, [=] {
    for (size_t r = 0; r < height; ++r) {
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                   width);
    }
  });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (!is_device_range(p, bytes)) return cudaErrorInvalidValue;
  flush_all();
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  if (bytes == 0) return cudaSuccess;
  if (!is_device_range(p, bytes)) return cudaErrorInvalidValue;
  submit(s, [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new EmuStream{flags};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s == nullptr) return cudaErrorInvalidResourceHandle;
  forget_stream(s);  // its pending work still runs, as on a GPU
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  flush_stream(s);
  return check_all_canaries();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  // Waits for the event's record as of now: when s's work reaches this point, the recording
  // stream's work up to the marker runs first.
  const cudaStream_t other = e->st->stream;
  const uint64_t seq = e->st->seq;
  if (seq != 0) submit_gated(s, [other, seq] { return reached(other, seq); });
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = new EmuEvent;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  auto state = e->st;
  const uint64_t gen = ++state->gen;  // a marker of an earlier record no longer completes it
  state->recorded = false;
  state->stream = s;
  const uint64_t seq = submit(s, [state, gen] {
    if (state->gen != gen) return;
    state->recorded = true;
    state->when = std::chrono::steady_clock::now();
  });
  state->seq = state->recorded ? 0 : seq;
  return cudaSuccess;
}
namespace {
// Runs the recording stream up to the event's marker.
void reach(const EventState& st) {
  if (st.seq != 0 && !st.recorded) flush_until(st.stream, st.seq);
}
bool try_reach(const EventState& st) {
  return st.seq == 0 || st.recorded || reached(st.stream, st.seq);
}
}  // namespace
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  reach(*e->st);
  return check_all_canaries();
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  // A query lets the device make progress: here, up to the event, unless an NCCL operation in
  // flight before it holds the stream.
  return try_reach(*e->st) ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (a == nullptr || b == nullptr) return cudaErrorInvalidValue;
  if (!a->st->recorded || !b->st->recorded) return cudaErrorNotReady;
  *ms = std::chrono::duration<float, std::milli>(b->st->when - a->st->when).count();
  return cudaSuccess;
}
