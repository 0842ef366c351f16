// fp8pipe CUDA emulation: the runtime API (memory, copies, streams, events, errors) on the CPU.
// See include/cuda_runtime_api.h for what is emulated and what is checked.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

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

struct State {
  std::mutex mu;
  std::map<uintptr_t, Alloc> device;  // by start address
  std::set<void*> pinned;
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
  munmap(a.region, a.region_bytes);
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

}  // namespace fp8pipe::cuda_emu

using namespace fp8pipe::cuda_emu;

struct EmuStream {
  unsigned flags = 0;
};
struct EmuEvent {
  bool recorded = false;
  std::chrono::steady_clock::time_point when{};
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

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
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
cudaError_t cudaDeviceSynchronize() { return check_all_canaries(); }
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int d) {
  static EmuMemPool p;
  if (d != 0) return cudaErrorInvalidDevice;
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
cudaError_t cudaFree(void* p) { return device_free(p); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return device_free(p); }
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign + kAlign);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lk(st().mu);
  st().pinned.insert(*p);
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(st().mu);
    if (st().pinned.erase(p) == 0) return cudaErrorInvalidValue;
  }
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpy");
  if (e != cudaSuccess) return e;
  if (bytes) std::memmove(dst, src, bytes);
  return check_all_canaries();  // a blocking copy synchronizes
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
  const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpyAsync");
  if (e != cudaSuccess) return e;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (!is_device_range(p, bytes)) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  return cudaMemset(p, value, bytes);
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new EmuStream{flags};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s == nullptr) return cudaErrorInvalidResourceHandle;
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return check_all_canaries(); }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned) {
  return e == nullptr ? cudaErrorInvalidResourceHandle : cudaSuccess;
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
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  e->recorded = true;
  e->when = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  return check_all_canaries();
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  return cudaSuccess;  // all work is done at enqueue time
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (a == nullptr || b == nullptr || !a->recorded || !b->recorded) return cudaErrorInvalidValue;
  *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return cudaSuccess;
}
