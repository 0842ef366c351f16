// The CUDA backend: the Backend interface (core/backend.h) on one GPU, with the numerics of the
// CPU backend (kernels/cuda: fused quantize kernels bit-identical to kernels/cpu/quantize, the
// cuBLASLt FP8 GEMM bit-identical to GemmMode::kExact with splitK forced to 1, and the model
// operators of kernels/cuda/ops.cuh, whose bounds against the CPU are stated there).
//
// Streams. Every Stream is a CUDA stream (non-blocking w.r.t. the legacy stream). launch(fn) calls
// fn at once on the calling thread with that stream made "current" (a thread-local), so every
// backend op fn issues is enqueued on it; outside a launch the current stream is the compute
// stream. record() records a cudaEvent; wait(e) is cudaStreamWaitEvent (a host wait for a foreign
// Event). An op whose result the host needs (to_host, copies to host memory, the `nonfinite`
// counts, the index range checks of embedding_fwd / cross_entropy_fwd) synchronizes the current
// stream; copies from host memory up to 16 MiB go through pinned staging (StagingRing) and do not.
//
// Memory. Tensors come from the device's stream-ordered pool (cudaMallocAsync on the current
// stream, the pool keeps freed memory cached) and are freed with cudaFreeAsync on the compute
// stream when the last handle goes. So a tensor used on a side stream must be ordered back into
// the compute stream (compute().wait(side.record())) before its last handle is dropped: the rule
// of every stream-ordered caching allocator (PyTorch's record_stream). Temporaries of one op are
// freed on the stream that used them. The device context (compute stream, cuBLAS handle, the
// cuBLASLt plans and workspace) is shared by the backend and every buffer's deleter, so tensors
// may outlive the Backend object.
//
// FP8 GEMM. One gpu::LtGemm (handle, 32 MiB workspace, cached descriptors + algorithm per shape)
// per stream that runs GEMMs; GemmMode::kExact forces splitK = 1 (bit-identical to the CPU model),
// kFast takes cuBLASLt's first heuristic. Shapes outside cuBLASLt's FP8 rules (FP8.md §3.3: K % 16,
// VEC128 rows % 4, 16-byte alignments; E5M2 x E5M2) run as the CPU's kFast does: exact dequantize
// to fp32, then an fp32 GEMM (logged once per shape). 128x128 x 128x128 is refused, as on the CPU.
// Grouped GEMMs (the MoE's per-expert products) fork onto FP8PIPE_GEMM_STREAMS lanes and join
// back (fan_out), each lane with its own cuBLAS handles and cuBLASLt workspace.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/cuda_status.h"
#include "core/log.h"
#include "core/op_checks.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "kernels/cuda/ops.cuh"
#include "kernels/cuda/quantize.cuh"

namespace fp8pipe {
namespace {

namespace k = kernels;
namespace g = kernels::gpu;

// The stream of the enclosing CudaStream::launch on this thread (null: the compute stream).
thread_local cudaStream_t tl_current = nullptr;

// A gpu::Result from kernels/cuda as a Status naming the backend op.
#define FP8_GPU(op, expr)                                                           \
  do {                                                                              \
    const ::fp8pipe::kernels::gpu::Result r_ = (expr);                              \
    if (!r_.ok) return FP8_ERROR(::fp8pipe::Code::kInternal, "{}: {}", op, r_.msg); \
  } while (0)

// Stream and event methods return void: a CUDA error there is a broken device, reported loudly.
void check_or_die(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  log::error("CUDA error in {}: {} ({})", what, cudaGetErrorName(e), cudaGetErrorString(e));
  std::abort();
}

// ---- device context
// ------------------------------------------------------------------------------

// Page-locked staging for host -> device copies. A cudaMemcpyAsync from pageable memory first
// synchronizes its stream (the CUDA runtime's documented behaviour), so every small upload of
// the model (MoE indices and offsets, balance counts, token ids) drained the GPU's queue. Here an
// upload is a memcpy into a ring of pinned memory plus an asynchronous copy; the chunk's event
// marks when the ring may reuse it, so the caller's buffer is free at return as before.
class StagingRing {
 public:
  static constexpr size_t kBytes = size_t{64} << 20;
  static constexpr size_t kMaxCopy = kBytes / 4;  // larger uploads take the synchronous path

  ~StagingRing() {
    for (Chunk& c : used_) cudaEventDestroy(c.ev);
    for (cudaEvent_t e : spare_) cudaEventDestroy(e);
    if (base_) cudaFreeHost(base_);
  }

  // Copies n bytes (0 < n <= kMaxCopy) from host src to device dst in stream order on s. Without
  // pinned memory (cudaMallocHost failed) it falls back to a synchronous copy.
  cudaError_t upload(void* dst, const void* src, size_t n, cudaStream_t s) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!base_ && !no_pinned_ && cudaMallocHost(&base_, kBytes) != cudaSuccess) {
      base_ = nullptr;
      no_pinned_ = true;
      cudaGetLastError();  // clear the allocation error
    }
    if (!base_) {
      const cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s);
      return e != cudaSuccess ? e : cudaStreamSynchronize(s);
    }
    size_t off = (head_ + 255) / 256 * 256;
    if (off + n > kBytes) off = 0;
    // Finished chunks go, oldest first; chunks the new one overlaps must finish first.
    for (auto it = used_.begin(); it != used_.end();) {
      const bool overlap = it->off < off + n && off < it->off + it->n;
      const cudaError_t e = overlap ? cudaEventSynchronize(it->ev) : cudaEventQuery(it->ev);
      if (e == cudaErrorNotReady) {
        if (it == used_.begin() && !overlap) break;  // younger chunks are queued behind it
        ++it;
        continue;
      }
      if (e != cudaSuccess) return e;
      spare_.push_back(it->ev);
      it = used_.erase(it);
    }
    for (auto it = used_.begin(); it != used_.end();) {  // any overlap beyond a pending head
      if (!(it->off < off + n && off < it->off + it->n)) {
        ++it;
        continue;
      }
      const cudaError_t e = cudaEventSynchronize(it->ev);
      if (e != cudaSuccess) return e;
      spare_.push_back(it->ev);
      it = used_.erase(it);
    }
    cudaEvent_t ev = nullptr;
    cudaError_t e = cudaSuccess;
    if (!spare_.empty()) {
      ev = spare_.back();
      spare_.pop_back();
    } else if ((e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming)) != cudaSuccess) {
      return e;
    }
    std::memcpy(static_cast<char*>(base_) + off, src, n);
    e = cudaMemcpyAsync(dst, static_cast<char*>(base_) + off, n, cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess) e = cudaEventRecord(ev, s);
    if (e != cudaSuccess) {
      cudaStreamSynchronize(s);  // a copy from [off, off + n) may be in flight, untracked
      spare_.push_back(ev);
      return e;
    }
    used_.push_back({off, n, ev});
    head_ = off + n;
    return cudaSuccess;
  }

 private:
  struct Chunk {
    size_t off, n;
    cudaEvent_t ev;
  };
  std::mutex mu_;
  void* base_ = nullptr;
  bool no_pinned_ = false;
  size_t head_ = 0;
  std::list<Chunk> used_;
  std::vector<cudaEvent_t> spare_;
};

struct DeviceCtx {
  int device = 0;
  cudaStream_t compute = nullptr;
  cublasHandle_t blas = nullptr;       // fp32 GEMMs, pedantic math (no TF32)
  cublasHandle_t blas_bf16 = nullptr;  // bf16 GEMMs, default math (tensor cores)
  std::mutex mu;                       // guards the maps below
  std::map<cudaStream_t, std::unique_ptr<g::LtGemm>> lt;
  std::map<std::string, double*> freq;  // rope tables by their bytes
  std::set<std::tuple<int64_t, int64_t, int64_t>> fallback_logged, padded_logged;
  StagingRing staging;  // host -> device uploads without a stream synchronization
  // Grouped GEMMs (CudaBackend::fan_out): FP8PIPE_GEMM_STREAMS lanes, the caller's stream and
  // gemm_streams - 1 side streams, each with its own cuBLAS handles (a handle's workspace must
  // not serve two streams at once) and, through lt_for, its own cuBLASLt workspace.
  struct Lane {
    cudaStream_t s = nullptr;
    cudaEvent_t done = nullptr;
    cublasHandle_t blas = nullptr, blas_bf16 = nullptr;
  };
  int gemm_streams = 4;
  std::mutex fan_mu;  // one grouped call at a time (guards lanes and fork)
  std::vector<Lane> lanes;
  cudaEvent_t fork = nullptr;

  ~DeviceCtx() {
    cudaSetDevice(device);
    if (compute) cudaStreamSynchronize(compute);
    for (Lane& l : lanes) {
      cudaStreamSynchronize(l.s);
      if (l.blas) cublasDestroy(l.blas);
      if (l.blas_bf16) cublasDestroy(l.blas_bf16);
      cudaEventDestroy(l.done);
    }
    if (fork) cudaEventDestroy(fork);
    lt.clear();
    for (Lane& l : lanes) cudaStreamDestroy(l.s);
    for (auto& [key, p] : freq) cudaFree(p);
    if (blas) cublasDestroy(blas);
    if (blas_bf16) cublasDestroy(blas_bf16);
    if (compute) cudaStreamDestroy(compute);
  }

  // At least n side lanes (under fan_mu).
  Status make_lanes(size_t n) {
    if (!fork) FP8_CUDA("grouped gemm", cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    while (lanes.size() < n) {
      Lane l;
      FP8_CUDA("grouped gemm", cudaStreamCreateWithFlags(&l.s, cudaStreamNonBlocking));
      lanes.push_back(l);  // destroyed with the context from here on
      Lane& m = lanes.back();
      FP8_CUDA("grouped gemm", cudaEventCreateWithFlags(&m.done, cudaEventDisableTiming));
      if (cublasCreate(&m.blas) != CUBLAS_STATUS_SUCCESS ||
          cublasSetMathMode(m.blas, CUBLAS_PEDANTIC_MATH) != CUBLAS_STATUS_SUCCESS ||
          cublasCreate(&m.blas_bf16) != CUBLAS_STATUS_SUCCESS) {
        return FP8_ERROR(Code::kInternal, "grouped gemm: cublasCreate failed on cuda:{}", device);
      }
    }
    return Status::Ok();
  }

  // The cuBLAS handle (pedantic fp32 or bf16) for work on stream s: a lane's own, else the shared.
  cublasHandle_t blas_for(cudaStream_t s, bool bf16) const {
    for (const Lane& l : lanes) {
      if (l.s == s) return bf16 ? l.blas_bf16 : l.blas;
    }
    return bf16 ? blas_bf16 : blas;
  }

  Result<g::LtGemm*> lt_for(cudaStream_t s) {
    std::lock_guard<std::mutex> lk(mu);
    auto& slot = lt[s];
    if (!slot) {
      auto gm = std::make_unique<g::LtGemm>();
      const g::Result r = gm->init();
      if (!r.ok) return FP8_ERROR(Code::kInternal, "cuBLASLt init: {}", r.msg);
      slot = std::move(gm);
    }
    return slot.get();
  }
};

// ---- streams and events
// ----------------------------------------------------------------------------

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(bool timing = false) : timing_(timing) {
    check_or_die(cudaEventCreateWithFlags(&ev_, timing ? cudaEventDefault : cudaEventDisableTiming),
                 "event");
  }
  std::optional<double> ms_since(Event& start) override {
    auto* s = dynamic_cast<CudaEvent*>(&start);
    if (s == nullptr || !timing_ || !s->timing_) return std::nullopt;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, s->ev_, ev_) != cudaSuccess) return std::nullopt;
    return static_cast<double>(ms);
  }
  ~CudaEvent() override { cudaEventDestroy(ev_); }
  void synchronize() override { check_or_die(cudaEventSynchronize(ev_), "event synchronize"); }
  bool query() override {
    const cudaError_t e = cudaEventQuery(ev_);
    if (e == cudaErrorNotReady) return false;
    check_or_die(e, "event query");
    return true;
  }
  cudaEvent_t get() const { return ev_; }

 private:
  bool timing_ = false;
  cudaEvent_t ev_ = nullptr;
};

class CudaStream final : public Stream {
 public:
  // owned: created here and destroyed with this object; else it wraps the context's compute stream.
  CudaStream(std::string name, std::shared_ptr<DeviceCtx> ctx, bool owned)
      : name_(std::move(name)), ctx_(std::move(ctx)), owned_(owned) {
    if (owned_) {
      check_or_die(cudaSetDevice(ctx_->device), "cudaSetDevice");
      check_or_die(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "stream create");
    } else {
      s_ = ctx_->compute;
    }
  }
  ~CudaStream() override {
    if (!owned_) return;
    cudaSetDevice(ctx_->device);
    cudaStreamSynchronize(s_);
    {
      std::lock_guard<std::mutex> lk(ctx_->mu);
      ctx_->lt.erase(s_);
    }
    cudaStreamDestroy(s_);
  }
  const std::string& name() const override { return name_; }
  void launch(std::function<void()> fn) override {
    check_or_die(cudaSetDevice(ctx_->device), "cudaSetDevice");
    const cudaStream_t prev = tl_current;
    tl_current = s_;
    fn();
    tl_current = prev;
  }
  std::shared_ptr<Event> record() override { return record_event(false); }
  std::shared_ptr<Event> record_timed() override { return record_event(true); }
  std::shared_ptr<Event> record_event(bool timing) {
    check_or_die(cudaSetDevice(ctx_->device), "cudaSetDevice");  // the event's device = stream's
    auto e = std::make_shared<CudaEvent>(timing);
    check_or_die(cudaEventRecord(e->get(), s_), "event record");
    return e;
  }
  void wait(const std::shared_ptr<Event>& e) override {
    if (auto* ce = dynamic_cast<CudaEvent*>(e.get())) {
      check_or_die(cudaStreamWaitEvent(s_, ce->get(), 0), "stream wait event");
    } else {
      e->synchronize();  // a CPU event: the host waits before enqueuing more
    }
  }
  void synchronize() override { check_or_die(cudaStreamSynchronize(s_), "stream synchronize"); }

 private:
  std::string name_;
  std::shared_ptr<DeviceCtx> ctx_;
  bool owned_;
  cudaStream_t s_ = nullptr;
};

// ---- argument checks: device placement here, then the shared rules of core/op_checks.h

// Every tensor an op reads or writes is in device memory, and so are an FP8 tensor's scales.
Status on_gpu(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    FP8_RETURN_IF_ERROR(
        checks::need(t->defined() && t->device() == Device::kCuda, op,
                     "a CUDA tensor is required (copy host data with Backend::copy)", *t));
    FP8_RETURN_IF_ERROR(checks::need(!t->scale() || t->scale()->device() == Device::kCuda, op,
                                     "an FP8 tensor's scales must be CUDA tensors too", *t));
  }
  return Status::Ok();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

k::Fp8Operand operand(const Tensor& t) {
  return k::Fp8Operand{t.data_as<uint8_t>(), t.scale()->data_as<float>(), t.granularity(),
                       fp8_format(t.dtype())};
}

DType fp8_dtype(QuantParams p) {
  return p.fmt == k::Fp8Format::kE4M3 ? DType::kE4M3 : DType::kE5M2;
}

// ---- the backend
// ---------------------------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<DeviceCtx> ctx, std::string name)
      : ctx_(std::move(ctx)), name_(std::move(name)), compute_("compute", ctx_, /*owned=*/false) {}

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return name_; }

  Result<Tensor> empty(const Shape& shape, DType dtype) override {
    FP8_RETURN_IF_ERROR(checks::empty(shape));
    const size_t bytes = dtype_bytes(dtype, numel(shape));
    FP8_ASSIGN_OR_RETURN(auto buf, alloc(bytes, ctx_->compute));
    return Tensor(shape, dtype, std::move(buf));
  }

  MemoryUse memory() const override { return memory_->read(); }
  void reset_peak_memory() override { memory_->reset_peak(); }

  Status fill_zero(Tensor& t) override {
    if (!t.nbytes()) return Status::Ok();
    if (t.device() == Device::kCpu) {
      std::memset(t.data(), 0, t.nbytes());
      return Status::Ok();
    }
    FP8_CUDA("fill_zero", cudaMemsetAsync(t.data(), 0, t.nbytes(), cur()));
    return Status::Ok();
  }

  // Ranges between tensors of this GPU in one launch (a table of segments and 16 KB chunks);
  // any range with a host tensor takes the one-by-one default.
  Status copy_ranges(std::span<const CopyRange> rs) override {
    std::vector<g::CopySeg> segs;
    std::vector<int32_t> items;
    for (const CopyRange& r : rs) {
      FP8_RETURN_IF_ERROR(checks::copy_range(r));
      if (r.src.device() == Device::kCpu || r.dst.device() == Device::kCpu) {
        return Backend::copy_ranges(rs);
      }
      FP8_RETURN_IF_ERROR(on_gpu("copy_ranges", {&r.src, &r.dst}));
      const int64_t es = dtype_size(r.src.dtype());
      const int64_t bytes = r.n * es;
      if (bytes == 0) continue;
      FP8_RETURN_IF_ERROR(add_chunk_items(
          items, segs.size(), (bytes + g::kCopyChunk - 1) / g::kCopyChunk, "copy_ranges"));
      segs.push_back({static_cast<const char*>(r.src.data()) + r.src_off * es,
                      static_cast<char*>(r.dst.data()) + r.dst_off * es, bytes});
    }
    if (segs.empty()) return Status::Ok();
    const size_t seg_bytes = segs.size() * sizeof(g::CopySeg);
    FP8_ASSIGN_OR_RETURN(auto table, upload_tables(segs.data(), seg_bytes, items, "copy_ranges"));
    auto* base = static_cast<char*>(table->ptr);
    FP8_GPU("copy_ranges", g::copy_ranges(reinterpret_cast<const g::CopySeg*>(base),
                                          reinterpret_cast<const int32_t*>(base + seg_bytes),
                                          static_cast<int64_t>(items.size() / 2), cur()));
    return Status::Ok();
  }

  Status copy(const Tensor& src, Tensor& dst) override {
    FP8_RETURN_IF_ERROR(checks::copy(src, dst));
    if (!src.nbytes()) return Status::Ok();
    const bool hs = src.device() == Device::kCpu, hd = dst.device() == Device::kCpu;
    if (hs && hd) {
      std::memmove(dst.data(), src.data(), src.nbytes());
      return Status::Ok();
    }
    const cudaMemcpyKind kind = hs   ? cudaMemcpyHostToDevice
                                : hd ? cudaMemcpyDeviceToHost
                                     : cudaMemcpyDeviceToDevice;
    FP8_CUDA("cudaSetDevice", cudaSetDevice(ctx_->device));
    if (hs && !hd && src.nbytes() <= StagingRing::kMaxCopy) {  // no synchronization
      FP8_CUDA("copy (staged upload)",
               ctx_->staging.upload(dst.data(), src.data(), src.nbytes(), cur()));
      return Status::Ok();
    }
    FP8_CUDA("copy", cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), kind, cur()));
    // Host memory is pageable and may be reused as soon as we return: finish the copy.
    if (hs || hd) FP8_CUDA("copy (synchronize)", cudaStreamSynchronize(cur()));
    return Status::Ok();
  }

  Stream& compute() override { return compute_; }
  std::unique_ptr<Stream> create_stream(const std::string& name) override {
    return std::make_unique<CudaStream>(name, ctx_, /*owned=*/true);
  }

  // ---- FP8 numerics ----

  Result<Tensor> quantize(const Tensor& x, Granularity gr, QuantParams p,
                          int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(on_gpu("quantize", {&x}));
    FP8_RETURN_IF_ERROR(checks::quantize(x));
    const int64_t R = x.rows(), C = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty(x.shape(), fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(gr, R, C)}, DType::kF32));
    FP8_ASSIGN_OR_RETURN(auto cnt, counter(nonfinite));
    int* bad = cnt ? static_cast<int*>(cnt->ptr) : nullptr;
    if (R * C > 0) {
      FP8_GPU("quantize",
              x.dtype() == DType::kF32
                  ? g::quantize(x.data_as<float>(), R, C, gr, p, q.data_as<uint8_t>(),
                                s.data_as<float>(), bad, cur())
                  : g::quantize_bf16(x.data_as<uint16_t>(), R, C, gr, p, q.data_as<uint8_t>(),
                                     s.data_as<float>(), bad, cur()));
    }
    FP8_RETURN_IF_ERROR(read_counter(bad, nonfinite));
    q.set_scale(std::make_shared<Tensor>(std::move(s)), gr, p.pow2);
    return q;
  }

  Result<Tensor> quantize_transposed(const Tensor& x, QuantParams p, int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(on_gpu("quantize_transposed", {&x}));
    FP8_RETURN_IF_ERROR(checks::quantize_transposed(x));
    const int64_t R = x.rows(), C = x.cols();
    return transposed_128x1(
        "quantize_transposed", R, C, p, nonfinite, [&](uint8_t* qt, float* s, int* bad) {
          return x.dtype() == DType::kF32
                     ? g::quantize_128x1_transposed(x.data_as<float>(), R, C, p, qt, s, bad, cur())
                     : g::quantize_128x1_transposed_bf16(x.data_as<uint16_t>(), R, C, p, qt, s, bad,
                                                         cur());
        });
  }

  Result<Tensor> transpose_fp8(const Tensor& q) override {
    FP8_RETURN_IF_ERROR(on_gpu("transpose_fp8", {&q}));
    FP8_RETURN_IF_ERROR(checks::transpose_fp8(q));
    const int64_t R = q.dim(0), C = q.dim(1);
    FP8_ASSIGN_OR_RETURN(Tensor t, empty({C, R}, q.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s,
                         empty({k::scale_count(Granularity::k128x128, C, R)}, DType::kF32));
    if (R * C > 0) {
      FP8_GPU("transpose_fp8",
              g::transpose_128x128(q.data_as<uint8_t>(), q.scale()->data_as<float>(), R, C,
                                   t.data_as<uint8_t>(), s.data_as<float>(), cur()));
    }
    t.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k128x128, q.pow2_scales());
    return t;
  }

  Result<Tensor> quantize_e5m6(const Tensor& x, int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(on_gpu("quantize_e5m6", {&x}));
    FP8_RETURN_IF_ERROR(checks::quantize_e5m6(x));
    const int64_t R = x.rows(), C = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty(x.shape(), DType::kE5M6));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(Granularity::k1x128, R, C)}, DType::kF32));
    FP8_ASSIGN_OR_RETURN(auto cnt, counter(nonfinite));
    int* bad = cnt ? static_cast<int*>(cnt->ptr) : nullptr;
    FP8_GPU("quantize_e5m6",
            x.dtype() == DType::kF32
                ? g::quantize_e5m6(x.data_as<float>(), R, C, q.data_as<uint8_t>(),
                                   s.data_as<float>(), bad, cur())
                : g::quantize_e5m6_bf16(x.data_as<uint16_t>(), R, C, q.data_as<uint8_t>(),
                                        s.data_as<float>(), bad, cur()));
    FP8_RETURN_IF_ERROR(read_counter(bad, nonfinite));
    q.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k1x128, /*pow2=*/true);
    return q;
  }

  Status dequantize(const Tensor& q, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("dequantize", {&q, &out}));
    FP8_RETURN_IF_ERROR(checks::dequantize(q, out));
    if (!q.numel()) return Status::Ok();
    if (q.dtype() == DType::kE5M6) {
      FP8_GPU("dequantize", g::dequantize_e5m6(q.data_as<uint8_t>(), q.scale()->data_as<float>(),
                                               q.rows(), q.cols(), out.data_as<float>(), cur()));
      return Status::Ok();
    }
    FP8_GPU("dequantize",
            g::dequantize(q.data_as<uint8_t>(), q.scale()->data_as<float>(), q.rows(), q.cols(),
                          q.granularity(), fp8_format(q.dtype()), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Result<GroupedFp8> quantize_blocks_batch(std::span<const Tensor* const> ws, QuantParams p,
                                           int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(checks::quantize_blocks_batch(ws));
    for (const Tensor* w : ws) FP8_RETURN_IF_ERROR(on_gpu("quantize_blocks_batch", {w}));
    const int64_t n = static_cast<int64_t>(ws.size()), R = ws[0]->rows(), C = ws[0]->cols();
    const int64_t sc = k::scale_count(Granularity::k128x128, R, C);
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({n * R, C}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({n * sc}, DType::kF32));
    if (n > 65535) return FP8_INVALID("quantize_blocks_batch: {} tensors, at most 65535", n);
    FP8_ASSIGN_OR_RETURN(auto cnt, counter(nonfinite));
    int* bad = cnt ? static_cast<int*>(cnt->ptr) : nullptr;
    if (R * C > 0) {
      std::vector<const float*> ptrs;
      for (const Tensor* w : ws) ptrs.push_back(w->data_as<float>());
      // The pointer table: a temporary of this op, uploaded through the staging ring.
      FP8_ASSIGN_OR_RETURN(auto table, alloc(ptrs.size() * sizeof(float*), cur()));
      FP8_CUDA("quantize_blocks_batch (table)",
               ctx_->staging.upload(table->ptr, ptrs.data(), ptrs.size() * sizeof(float*), cur()));
      FP8_GPU(
          "quantize_blocks_batch",
          g::quantize_128x128_batch(static_cast<const float* const*>(table->ptr), ptrs.data(), n, R,
                                    C, p, q.data_as<uint8_t>(), s.data_as<float>(), bad, cur()));
    }
    FP8_RETURN_IF_ERROR(read_counter(bad, nonfinite));
    return stacked_block_views(std::move(q), std::move(s), n, R, C, p.pow2);
  }

  Result<GroupedFp8> transpose_fp8_batch(const GroupedFp8& q) override {
    FP8_RETURN_IF_ERROR(checks::transpose_fp8_batch(q));
    FP8_RETURN_IF_ERROR(on_gpu("transpose_fp8_batch", {&q.codes, &q.scales}));
    const int64_t n = static_cast<int64_t>(q.group.size());
    const int64_t R = q.group[0].rows(), C = q.group[0].cols();
    const int64_t st = k::scale_count(Granularity::k128x128, C, R);
    FP8_ASSIGN_OR_RETURN(Tensor t, empty({n * C, R}, q.codes.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({n * st}, DType::kF32));
    if (R * C > 0) {
      FP8_GPU("transpose_fp8_batch",
              g::transpose_128x128_batch(q.codes.data_as<uint8_t>(), q.scales.data_as<float>(), n,
                                         R, C, t.data_as<uint8_t>(), s.data_as<float>(), cur()));
    }
    return stacked_block_views(std::move(t), std::move(s), n, C, R, q.group[0].pow2_scales());
  }

  static g::GroupsDev groups_dev(const RowGroups& gr) {
    const int32_t* d = gr.dev.data_as<int32_t>();
    return {d, d + gr.offsets.size(), static_cast<int>(gr.count())};
  }

  Result<GroupedFp8> quantize_groups(const Tensor& x, const RowGroups& groups,
                                     QuantParams p) override {
    FP8_RETURN_IF_ERROR(on_gpu("quantize_groups", {&x, &groups.dev}));
    FP8_RETURN_IF_ERROR(checks::grouped_input("quantize_groups", x, groups));
    const int64_t M = x.rows(), K = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({M, K}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({M * k::ceil_div(K, 128)}, DType::kF32));
    if (M * K > 0) {
      FP8_GPU("quantize_groups",
              g::quantize_1x128_groups(x.data_as<float>(), M, K, groups_dev(groups), p,
                                       q.data_as<uint8_t>(), s.data_as<float>(), nullptr, cur()));
    }
    return group_views(std::move(q), std::move(s), groups, K, /*transposed=*/false, p.pow2);
  }

  Result<GroupedFp8> quantize_transposed_groups(const Tensor& x, const RowGroups& groups,
                                                QuantParams p) override {
    FP8_RETURN_IF_ERROR(on_gpu("quantize_transposed_groups", {&x, &groups.dev}));
    FP8_RETURN_IF_ERROR(checks::grouped_input("quantize_transposed_groups", x, groups));
    const int64_t M = x.rows(), K = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({K * M}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({K * groups.tiles.back()}, DType::kF32));
    if (M * K > 0) {
      FP8_GPU("quantize_transposed_groups",
              g::quantize_128x1_transposed_groups(x.data_as<float>(), M, K, groups_dev(groups),
                                                  groups.tiles.back(), p, q.data_as<uint8_t>(),
                                                  s.data_as<float>(), nullptr, cur()));
    }
    return group_views(std::move(q), std::move(s), groups, K, /*transposed=*/true, p.pow2);
  }

  Result<GroupedFp8> gather_fp8_groups(const Tensor& codes, const Tensor& scales,
                                       const RowGroups& in_groups, bool pow2, const Tensor& rows,
                                       const Tensor& pad, const RowGroups& groups) override {
    FP8_RETURN_IF_ERROR(
        on_gpu("gather_fp8_groups", {&codes, &scales, &in_groups.dev, &rows, &groups.dev}));
    if (pad.defined()) FP8_RETURN_IF_ERROR(on_gpu("gather_fp8_groups", {&pad}));
    FP8_RETURN_IF_ERROR(checks::gather_fp8_groups(codes, scales, in_groups, rows, pad, groups));
    const int64_t n = codes.rows(), K = codes.cols(), M = groups.total_rows();
    FP8_ASSIGN_OR_RETURN(Tensor out, empty({M, K}, codes.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({M * k::ceil_div(K, 128)}, DType::kF32));
    float zero_scale = 0, inv = 0;  // an all-zero block's scale, as the quantize kernels make it
    k::compute_scale(0.0f, {fp8_format(codes.dtype()), pow2}, &zero_scale, &inv);
    FP8_GPU("gather_fp8_groups",
            g::gather_fp8_rows(
                codes.data_as<uint8_t>(), scales.data_as<float>(), n, K, groups_dev(in_groups),
                rows.data_as<int32_t>(), pad.defined() ? pad.data_as<int32_t>() : nullptr, M,
                groups_dev(groups), zero_scale, out.data_as<uint8_t>(), s.data_as<float>(), cur()));
    return group_views(std::move(out), std::move(s), groups, K, /*transposed=*/false, pow2);
  }

  Result<Tensor> requantize_transposed(const Tensor& q, QuantParams p,
                                       int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(on_gpu("requantize_transposed", {&q}));
    FP8_RETURN_IF_ERROR(checks::requantize_transposed(q));
    const int64_t R = q.rows(), C = q.cols();
    return transposed_128x1(
        "requantize_transposed", R, C, p, nonfinite, [&](uint8_t* qt, float* s, int* bad) {
          return g::requantize_128x1_transposed(q.data_as<uint8_t>(), q.scale()->data_as<float>(),
                                                fp8_format(q.dtype()), R, C, p, qt, s, bad, cur());
        });
  }

  Result<GroupedFp8> requantize_transposed_groups(const GroupedFp8& q, const RowGroups& groups,
                                                  QuantParams p) override {
    FP8_RETURN_IF_ERROR(on_gpu("requantize_transposed_groups", {&q.codes, &q.scales, &groups.dev}));
    FP8_RETURN_IF_ERROR(checks::requantize_transposed_groups(q, groups));
    const int64_t M = q.codes.rows(), K = q.codes.cols();
    FP8_ASSIGN_OR_RETURN(Tensor qt, empty({K * M}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({K * groups.tiles.back()}, DType::kF32));
    if (M * K > 0) {
      FP8_GPU("requantize_transposed_groups",
              g::requantize_128x1_transposed_groups(
                  q.codes.data_as<uint8_t>(), q.scales.data_as<float>(),
                  fp8_format(q.codes.dtype()), M, K, groups_dev(groups), groups.tiles.back(), p,
                  qt.data_as<uint8_t>(), s.data_as<float>(), cur()));
    }
    return group_views(std::move(qt), std::move(s), groups, K, /*transposed=*/true, p.pow2);
  }

  Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("dequantize_groups", {&q.codes, &q.scales, &groups.dev, &out}));
    FP8_RETURN_IF_ERROR(checks::dequantize_groups(q, groups, out));
    if (!out.numel()) return Status::Ok();
    FP8_GPU("dequantize_groups",
            g::dequantize_1x128_groups(q.codes.data_as<uint8_t>(), q.scales.data_as<float>(),
                                       out.rows(), out.cols(), groups_dev(groups),
                                       fp8_format(q.codes.dtype()), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status gemm_fp8(const Tensor& a, const Tensor& b, Tensor& out, GemmMode mode) override {
    FP8_RETURN_IF_ERROR(on_gpu("gemm_fp8", {&a, &b, &out}));
    FP8_RETURN_IF_ERROR(checks::gemm_fp8(a, b, out));
    const int64_t M = a.rows(), N = b.rows(), K = a.cols();
    const k::Fp8Operand oa = operand(a), ob = operand(b);
    float* of = out.dtype() == DType::kF32 ? out.data_as<float>() : nullptr;
    uint16_t* ob16 = out.dtype() == DType::kBF16 ? out.data_as<uint16_t>() : nullptr;
    const g::Result args = g::check_fp8_gemm_args(oa, ob, M, N, K, of, ob16);
    if (!args.ok) return gemm_fp8_padded(a, b, out, mode, args.msg);
    FP8_ASSIGN_OR_RETURN(g::LtGemm * lt, ctx_->lt_for(cur()));
    const g::Result r =
        lt->fp8_gemm(oa, ob, M, N, K, of, ob16, cur(), /*splitk1=*/mode == GemmMode::kExact);
    // No algorithm for this shape / alignment (nothing was enqueued): the fallback, logged once.
    if (!r.ok && r.unsupported) return gemm_fp8_fallback(a, b, out, r.msg);
    FP8_GPU("gemm_fp8", r);
    return Status::Ok();
  }

  Status gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs, GemmMode mode) override {
    for (const Fp8GemmArgs& g : gs) FP8_RETURN_IF_ERROR(on_gpu("gemm_fp8", {&g.a, &g.b, &g.out}));
    FP8_RETURN_IF_ERROR(checks::gemm_fp8_grouped(gs));
    return fan_out(gs.size(), [&](size_t i) {
      Tensor out = gs[i].out;
      return gemm_fp8(gs[i].a, gs[i].b, out, mode);
    });
  }

  Status gemm_grouped(std::span<const GemmArgs> gs) override {
    for (const GemmArgs& g : gs) FP8_RETURN_IF_ERROR(on_gpu("gemm", {&g.a, &g.b, &g.c}));
    FP8_RETURN_IF_ERROR(checks::gemm_grouped(gs));
    return fan_out(gs.size(), [&](size_t i) {
      const GemmArgs& g = gs[i];
      Tensor c = g.c;
      return gemm(g.a, g.trans_a, g.b, g.trans_b, c, g.alpha, g.beta);
    });
  }

  Status gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, float alpha,
              float beta) override {
    FP8_RETURN_IF_ERROR(on_gpu("gemm", {&a, &b, &c}));
    FP8_RETURN_IF_ERROR(checks::gemm(a, ta, b, tb, c));
    const int64_t M = ta ? a.cols() : a.rows(), K = ta ? a.rows() : a.cols();
    const int64_t N = tb ? b.rows() : b.cols();
    if (a.dtype() == DType::kBF16) {
      return bf16_gemm(a.data(), a.cols(), ta, b.data(), b.cols(), tb, c.data_as<float>(), M, N, K,
                       alpha, beta);
    }
    return sgemm(a.data_as<float>(), a.cols(), ta, b.data_as<float>(), b.cols(), tb,
                 c.data_as<float>(), M, N, K, alpha, beta);
  }

  // cublasSgemmStridedBatched (pedantic fp32) on the column-major transposes, as sgemm.
  Status gemm_batched(const Tensor& a, const Tensor& b, Tensor& c, const GemmBatch& bg, float alpha,
                      float beta) override {
    FP8_RETURN_IF_ERROR(on_gpu("gemm_batched", {&a, &b, &c}));
    FP8_RETURN_IF_ERROR(checks::gemm_batched(a, b, c, bg));
    if (bg.batch == 0 || bg.M == 0 || bg.N == 0) return Status::Ok();
    std::lock_guard<std::mutex> lk(blas_mu_);
    if (a.dtype() == DType::kBF16) {  // tensor cores, fp32 accumulation and output (as bf16_gemm)
      const auto* ap = static_cast<const uint16_t*>(a.data()) + bg.offset_a;
      const auto* bp = static_cast<const uint16_t*>(b.data()) + bg.offset_b;
      const cublasStatus_t t1 = cublasSetStream(ctx_->blas_bf16, cur());
      const cublasStatus_t t2 = cublasGemmStridedBatchedEx(
          ctx_->blas_bf16, bg.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
          bg.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(bg.N), static_cast<int>(bg.M),
          static_cast<int>(bg.K), &alpha, bp, CUDA_R_16BF,
          static_cast<int>(std::max<int64_t>(bg.ldb, 1)), bg.stride_b, ap, CUDA_R_16BF,
          static_cast<int>(std::max<int64_t>(bg.lda, 1)), bg.stride_a, &beta,
          c.data_as<float>() + bg.offset_c, CUDA_R_32F,
          static_cast<int>(std::max<int64_t>(bg.ldc, 1)), bg.stride_c, static_cast<int>(bg.batch),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (t1 != CUBLAS_STATUS_SUCCESS || t2 != CUBLAS_STATUS_SUCCESS) {
        return FP8_ERROR(Code::kInternal,
                         "gemm_batched: cublasGemmStridedBatchedEx (bf16) {} x {}x{}x{}: {}",
                         bg.batch, bg.M, bg.N, bg.K,
                         g::cublas_status_name(t2 != CUBLAS_STATUS_SUCCESS ? t2 : t1));
      }
      return Status::Ok();
    }
    const cublasStatus_t s1 = cublasSetStream(ctx_->blas, cur());
    const cublasStatus_t s2 = cublasSgemmStridedBatched(
        ctx_->blas, bg.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, bg.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        static_cast<int>(bg.N), static_cast<int>(bg.M), static_cast<int>(bg.K), &alpha,
        b.data_as<float>() + bg.offset_b, static_cast<int>(std::max<int64_t>(bg.ldb, 1)),
        bg.stride_b, a.data_as<float>() + bg.offset_a,
        static_cast<int>(std::max<int64_t>(bg.lda, 1)), bg.stride_a, &beta,
        c.data_as<float>() + bg.offset_c, static_cast<int>(std::max<int64_t>(bg.ldc, 1)),
        bg.stride_c, static_cast<int>(bg.batch));
    if (s1 != CUBLAS_STATUS_SUCCESS || s2 != CUBLAS_STATUS_SUCCESS) {
      return FP8_ERROR(Code::kInternal, "gemm_batched: cublasSgemmStridedBatched {} x {}x{}x{}: {}",
                       bg.batch, bg.M, bg.N, bg.K,
                       g::cublas_status_name(s2 != CUBLAS_STATUS_SUCCESS ? s2 : s1));
    }
    return Status::Ok();
  }

  Status attention_cached(const Tensor& q, const Tensor& kk, const Tensor& v, int64_t H, int64_t G,
                          int64_t dv, float scale, Tensor& o) override {
    FP8_RETURN_IF_ERROR(on_gpu("attention_cached", {&q, &kk, &v, &o}));
    FP8_RETURN_IF_ERROR(checks::attention_cached(q, kk, v, H, G, dv, o));
    if (kk.dtype() == DType::kBF16) {
      FP8_GPU("attention_cached",
              g::attention_cached(q.data_as<float>(), kk.data_as<uint16_t>(), v.data_as<uint16_t>(),
                                  q.rows(), kk.rows(), H, G, q.cols() / H, dv, v.cols(), scale,
                                  o.data_as<float>(), cur()));
    } else {
      FP8_GPU("attention_cached",
              g::attention_cached(q.data_as<float>(), kk.data_as<float>(), v.data_as<float>(),
                                  q.rows(), kk.rows(), H, G, q.cols() / H, dv, v.cols(), scale,
                                  o.data_as<float>(), cur()));
    }
    return Status::Ok();
  }

  Status causal_softmax(const Tensor& s, Tensor& p, Tensor& lse, bool recompute) override {
    FP8_RETURN_IF_ERROR(on_gpu("causal_softmax", {&s, &p, &lse}));
    FP8_RETURN_IF_ERROR(checks::causal_softmax(s, p, lse));
    FP8_GPU("causal_softmax",
            g::causal_softmax(s.data_as<float>(), s.rows(), s.cols(), p.data_as<float>(),
                              lse.data_as<float>(), recompute, cur()));
    return Status::Ok();
  }

  Status softmax_bwd(const Tensor& p, const Tensor& dp, Tensor& ds) override {
    FP8_RETURN_IF_ERROR(on_gpu("softmax_bwd", {&p, &dp, &ds}));
    FP8_RETURN_IF_ERROR(checks::softmax_bwd(p, dp, ds));
    FP8_GPU("softmax_bwd", g::softmax_bwd(p.data_as<float>(), dp.data_as<float>(), p.rows(),
                                          p.cols(), ds.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status cast(const Tensor& src, Tensor& dst) override {
    FP8_RETURN_IF_ERROR(on_gpu("cast", {&src, &dst}));
    FP8_RETURN_IF_ERROR(checks::cast(src, dst));
    if (src.dtype() == DType::kF32) {
      FP8_GPU("cast",
              g::f32_to_bf16(src.data_as<float>(), src.numel(), dst.data_as<uint16_t>(), cur()));
    } else {
      FP8_GPU("cast",
              g::bf16_to_f32(src.data_as<uint16_t>(), src.numel(), dst.data_as<float>(), cur()));
    }
    return Status::Ok();
  }

  // ---- model operators ----

  Status embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("embedding_fwd", {&table, &ids, &out}));
    FP8_RETURN_IF_ERROR(checks::embedding_fwd(table, ids, out));
    FP8_ASSIGN_OR_RETURN(auto bad, first_bad(ids, 0, table.rows()));
    if (bad.first >= 0) return checks::bad_token_id(bad.first, bad.second, table.rows());
    FP8_GPU("embedding_fwd",
            g::embedding_fwd(table.data_as<float>(), ids.data_as<int32_t>(), ids.numel(),
                             table.cols(), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) override {
    FP8_RETURN_IF_ERROR(on_gpu("embedding_bwd", {&dout, &ids, &dtable}));
    FP8_RETURN_IF_ERROR(checks::embedding_bwd_acc(dout, ids, dtable));
    FP8_GPU("embedding_bwd",
            g::embedding_bwd_acc(dout.data_as<float>(), ids.data_as<int32_t>(), ids.numel(),
                                 dtable.cols(), dtable.rows(), dtable.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                     Tensor& rstd) override {
    FP8_RETURN_IF_ERROR(on_gpu("rmsnorm_fwd", {&x, &w, &y, &rstd}));
    FP8_RETURN_IF_ERROR(checks::rmsnorm_fwd(x, w, y, rstd));
    FP8_GPU("rmsnorm_fwd",
            g::rmsnorm_fwd(x.data_as<float>(), w.data_as<float>(), x.rows(), x.cols(), eps,
                           y.data_as<float>(), rstd.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                     Tensor& dx, Tensor& dw_acc) override {
    FP8_RETURN_IF_ERROR(on_gpu("rmsnorm_bwd", {&dy, &x, &w, &rstd, &dx, &dw_acc}));
    FP8_RETURN_IF_ERROR(checks::rmsnorm_bwd(dy, x, w, rstd, dx, dw_acc));
    FP8_GPU("rmsnorm_bwd",
            g::rmsnorm_bwd(dy.data_as<float>(), x.data_as<float>(), w.data_as<float>(),
                           rstd.data_as<float>(), x.rows(), x.cols(), dx.data_as<float>(),
                           dw_acc.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status rope(Tensor& x, const Tensor& pos, int64_t heads, const kernels::RopeSpec& r,
              bool inverse) override {
    FP8_RETURN_IF_ERROR(on_gpu("rope", {&x, &pos}));
    FP8_RETURN_IF_ERROR(checks::rope(x, pos, heads));
    const int64_t d = x.cols() / heads;
    FP8_ASSIGN_OR_RETURN(const double* freq, rope_freq(d, r));
    FP8_GPU("rope", g::rope(x.data_as<float>(), pos.data_as<int32_t>(), x.rows(), heads, d, freq,
                            kernels::rope_magnitude(r), inverse, cur()));
    return Status::Ok();
  }

  Status attention_fwd(const Tensor& q, const Tensor& kk, const Tensor& v, int64_t B, int64_t T,
                       int64_t H, float scale, Tensor& o, Tensor& lse) override {
    FP8_RETURN_IF_ERROR(on_gpu("attention_fwd", {&q, &kk, &v, &o, &lse}));
    FP8_RETURN_IF_ERROR(checks::attention_fwd(q, kk, v, B, T, H, o, lse));
    if (B * T * H == 0) return Status::Ok();
    const int64_t dk = q.numel() / (B * T * H), dv = v.numel() / (B * T * H);
    FP8_GPU("attention_fwd",
            g::attention_fwd(q.data_as<float>(), kk.data_as<float>(), v.data_as<float>(), B, T, H,
                             dk, dv, scale, o.data_as<float>(), lse.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& kk, const Tensor& v,
                       const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                       float scale, Tensor& dq, Tensor& dk, Tensor& dv) override {
    FP8_RETURN_IF_ERROR(on_gpu("attention_bwd", {&dout, &q, &kk, &v, &o, &lse, &dq, &dk, &dv}));
    FP8_RETURN_IF_ERROR(checks::attention_bwd(dout, q, kk, v, o, lse, B, T, H, dq, dk, dv));
    if (B * T * H == 0) return Status::Ok();
    const int64_t dkk = q.numel() / (B * T * H), dvv = v.numel() / (B * T * H);
    FP8_ASSIGN_OR_RETURN(auto scratch, alloc(B * H * T * sizeof(float), cur()));
    FP8_GPU("attention_bwd",
            g::attention_bwd(dout.data_as<float>(), q.data_as<float>(), kk.data_as<float>(),
                             v.data_as<float>(), o.data_as<float>(), lse.data_as<float>(), B, T, H,
                             dkk, dvv, scale, dq.data_as<float>(), dk.data_as<float>(),
                             dv.data_as<float>(), static_cast<float*>(scratch->ptr), cur()));
    return Status::Ok();
  }

  Status swiglu_fwd(const Tensor& gt, const Tensor& u, Tensor& h) override {
    FP8_RETURN_IF_ERROR(on_gpu("swiglu_fwd", {&gt, &u, &h}));
    FP8_RETURN_IF_ERROR(checks::swiglu_fwd(gt, u, h));
    FP8_GPU("swiglu_fwd", g::swiglu_fwd(gt.data_as<float>(), u.data_as<float>(), gt.numel(),
                                        h.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status swiglu_bwd(const Tensor& dh, const Tensor& gt, const Tensor& u, Tensor& dg,
                    Tensor& du) override {
    FP8_RETURN_IF_ERROR(on_gpu("swiglu_bwd", {&dh, &gt, &u, &dg, &du}));
    FP8_RETURN_IF_ERROR(checks::swiglu_bwd(dh, gt, u, dg, du));
    FP8_GPU("swiglu_bwd",
            g::swiglu_bwd(dh.data_as<float>(), gt.data_as<float>(), u.data_as<float>(), gt.numel(),
                          dg.data_as<float>(), du.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) override {
    FP8_RETURN_IF_ERROR(on_gpu("cross_entropy_fwd", {&logits, &targets, &loss}));
    FP8_RETURN_IF_ERROR(checks::cross_entropy_fwd(logits, targets, loss));
    FP8_ASSIGN_OR_RETURN(auto bad, first_bad(targets, INT32_MIN, logits.cols()));
    if (bad.first >= 0) return checks::bad_target(bad.first, bad.second, logits.cols());
    FP8_GPU("cross_entropy_fwd",
            g::cross_entropy_fwd(logits.data_as<float>(), targets.data_as<int32_t>(), logits.rows(),
                                 logits.cols(), loss.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                           Tensor& dlogits) override {
    FP8_RETURN_IF_ERROR(on_gpu("cross_entropy_bwd", {&logits, &targets, &dlogits}));
    FP8_RETURN_IF_ERROR(checks::cross_entropy_bwd(logits, targets, dlogits));
    FP8_GPU("cross_entropy_bwd",
            g::cross_entropy_bwd(logits.data_as<float>(), targets.data_as<int32_t>(), logits.rows(),
                                 logits.cols(), row_scale, dlogits.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                     int64_t max_groups, float route_scale, Tensor& scores, Tensor& idx,
                     Tensor& gates) override {
    FP8_RETURN_IF_ERROR(on_gpu("router_topk", {&logits, &bias, &scores, &idx, &gates}));
    FP8_RETURN_IF_ERROR(
        checks::router_topk(logits, bias, topk, n_groups, max_groups, scores, idx, gates));
    const int64_t n = logits.rows(), E = logits.cols();
    FP8_GPU("router_topk",
            g::router_topk(logits.data_as<float>(), bias.data_as<float>(), n, E, topk, n_groups,
                           max_groups, route_scale, scores.data_as<float>(), idx.data_as<int32_t>(),
                           gates.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status sort_assignments(const Tensor& idx, int64_t E, Tensor& order, Tensor& rows, Tensor& slot,
                          Tensor& counts) override {
    FP8_RETURN_IF_ERROR(on_gpu("sort_assignments", {&idx, &order, &rows, &slot, &counts}));
    FP8_RETURN_IF_ERROR(checks::sort_assignments(idx, E, order, rows, slot, counts));
    FP8_GPU("sort_assignments",
            g::sort_assignments(idx.data_as<int32_t>(), idx.rows(), idx.cols(), E,
                                order.data_as<int32_t>(), rows.data_as<int32_t>(),
                                slot.data_as<int32_t>(), counts.data_as<int32_t>(), cur()));
    return Status::Ok();
  }

  Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                     const Tensor& dgate, const Tensor& slot, const Tensor& f,
                     const kernels::RouterGradParams& p, Tensor& dlogits) override {
    FP8_RETURN_IF_ERROR(on_gpu("router_grad", {&scores, &idx, &gates, &dgate, &dlogits}));
    if (slot.defined()) FP8_RETURN_IF_ERROR(on_gpu("router_grad", {&slot}));
    if (p.alpha != 0.0f) FP8_RETURN_IF_ERROR(on_gpu("router_grad", {&f}));
    FP8_RETURN_IF_ERROR(checks::router_grad(scores, idx, gates, dgate, slot, f, p, dlogits));
    FP8_GPU("router_grad", g::router_grad(scores.data_as<float>(), idx.data_as<int32_t>(),
                                          gates.data_as<float>(), dgate.data_as<double>(),
                                          slot.defined() ? slot.data_as<int32_t>() : nullptr,
                                          p.alpha != 0.0f ? f.data_as<double>() : nullptr, p,
                                          dlogits.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T, float alpha,
                       Tensor& f, Tensor& loss) override {
    FP8_RETURN_IF_ERROR(on_gpu("balance_stats", {&scores, &idx, &f, &loss}));
    FP8_RETURN_IF_ERROR(checks::balance_stats(scores, idx, B, T, f, loss));
    const int64_t E = scores.cols();
    // A temporary of this op: freed on the stream that uses it.
    FP8_ASSIGN_OR_RETURN(auto work, alloc((B * T + B * E) * sizeof(double), cur()));
    FP8_GPU("balance_stats",
            g::balance_stats(scores.data_as<float>(), idx.data_as<int32_t>(), B, T, E, idx.cols(),
                             alpha, f.data_as<double>(), loss.data_as<double>(),
                             static_cast<double*>(work->ptr), cur()));
    return Status::Ok();
  }

  Status gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("gather_rows", {&in, &rows, &out}));
    FP8_RETURN_IF_ERROR(checks::gather_rows(in, rows, out));
    FP8_GPU("gather_rows", g::gather_rows(in.data_as<float>(), rows.data_as<int32_t>(),
                                          rows.numel(), in.cols(), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                            Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("gather_rows_scaled", {&in, &rows, &out}));
    if (w.defined()) FP8_RETURN_IF_ERROR(on_gpu("gather_rows_scaled", {&w}));
    FP8_RETURN_IF_ERROR(checks::gather_rows_scaled(in, rows, w, out));
    FP8_GPU("gather_rows_scaled",
            g::gather_rows_scaled(in.data_as<float>(), rows.data_as<int32_t>(),
                                  w.defined() ? w.data_as<float>() : nullptr, rows.numel(),
                                  in.cols(), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                          Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("scatter_add_rows", {&in, &rows, &out}));
    if (w.defined()) FP8_RETURN_IF_ERROR(on_gpu("scatter_add_rows", {&w}));
    FP8_RETURN_IF_ERROR(checks::scatter_add_rows(in, rows, w, out));
    FP8_GPU("scatter_add_rows",
            g::scatter_add_rows(in.data_as<float>(), rows.data_as<int32_t>(),
                                w.defined() ? w.data_as<float>() : nullptr, rows.numel(),
                                out.cols(), out.rows(), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status add(const Tensor& a, const Tensor& b, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("add", {&a, &b, &out}));
    FP8_RETURN_IF_ERROR(checks::add(a, b, out));
    if (a.dtype() == DType::kF64) {
      FP8_GPU("add", g::add(a.data_as<double>(), b.data_as<double>(), a.numel(),
                            out.data_as<double>(), cur()));
    } else {
      FP8_GPU("add", g::add(a.data_as<float>(), b.data_as<float>(), a.numel(), out.data_as<float>(),
                            cur()));
    }
    return Status::Ok();
  }

  Status axpy(float alpha, const Tensor& x, Tensor& y) override {
    FP8_RETURN_IF_ERROR(on_gpu("axpy", {&x, &y}));
    FP8_RETURN_IF_ERROR(checks::axpy(x, y));
    FP8_GPU("axpy", g::axpy(alpha, x.data_as<float>(), x.numel(), y.data_as<float>(), cur()));
    return Status::Ok();
  }

  Status axpy_batch(float alpha, const Tensor& x, std::span<Tensor* const> ys) override {
    FP8_RETURN_IF_ERROR(checks::axpy_batch(x, ys));
    FP8_RETURN_IF_ERROR(on_gpu("axpy_batch", {&x}));
    for (Tensor* y : ys) FP8_RETURN_IF_ERROR(on_gpu("axpy_batch", {y}));
    const int64_t count = static_cast<int64_t>(ys.size()), n = ys[0]->numel();
    if (count > 65535) return FP8_INVALID("axpy_batch: {} outputs, at most 65535", count);
    if (n == 0) return Status::Ok();
    std::vector<float*> ptrs;
    for (Tensor* y : ys) ptrs.push_back(y->data_as<float>());
    // The pointer table: a temporary of this op, uploaded through the staging ring.
    FP8_ASSIGN_OR_RETURN(auto table, alloc(ptrs.size() * sizeof(float*), cur()));
    FP8_CUDA("axpy_batch (table)",
             ctx_->staging.upload(table->ptr, ptrs.data(), ptrs.size() * sizeof(float*), cur()));
    FP8_GPU("axpy_batch", g::axpy_batch(alpha, x.data_as<float>(), n,
                                        static_cast<float* const*>(table->ptr), count, cur()));
    return Status::Ok();
  }

  Status round_bf16(const Tensor& x, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("round_bf16", {&x, &out}));
    FP8_RETURN_IF_ERROR(checks::round_bf16(x, out));
    FP8_GPU("round_bf16",
            g::round_bf16(x.data_as<float>(), x.numel(), out.data_as<float>(), cur()));
    return Status::Ok();
  }

  // ---- the optimizer on the device (optim.placement=device)
  Status accumulate_grad(Tensor& grad, Tensor& acc) override {
    FP8_RETURN_IF_ERROR(on_gpu("accumulate_grad", {&grad, &acc}));
    FP8_RETURN_IF_ERROR(checks::accumulate_grad(grad, acc));
    FP8_GPU("accumulate_grad",
            g::accumulate_f64(grad.data_as<float>(), grad.numel(), acc.data_as<double>(), cur()));
    return Status::Ok();
  }
  Status row_dot(const Tensor& a, const Tensor& b, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("row_dot", {&a, &b, &out}));
    FP8_RETURN_IF_ERROR(checks::row_dot(a, b, out));
    FP8_GPU("row_dot", g::row_dot(a.data_as<float>(), b.data_as<float>(), a.rows(), a.cols(),
                                  out.data_as<double>(), cur()));
    return Status::Ok();
  }

  Status round_f64(const Tensor& acc, Tensor& out) override {
    FP8_RETURN_IF_ERROR(on_gpu("round_f64", {&acc, &out}));
    FP8_RETURN_IF_ERROR(checks::round_f64(acc, out));
    FP8_GPU("round_f64",
            g::round_f64(acc.data_as<double>(), acc.numel(), out.data_as<float>(), cur()));
    return Status::Ok();
  }
  // One partial-sum launch per tensor, one final reduction, one synchronizing copy.
  Status sum_squares(std::span<const Tensor* const> gs, double* total) override {
    FP8_RETURN_IF_ERROR(checks::sum_squares(gs, total));
    for (const Tensor* t : gs) FP8_RETURN_IF_ERROR(on_gpu("sum_squares", {t}));
    if (gs.empty()) return Status::Ok();
    const int64_t slots = static_cast<int64_t>(gs.size());
    if (slots > (int64_t{1} << 30) / g::kSumSqBlocks) {  // the partials' int32 indices
      return FP8_INVALID("sum_squares: {} tensors, at most {}", slots,
                         (int64_t{1} << 30) / g::kSumSqBlocks);
    }
    FP8_ASSIGN_OR_RETURN(auto work, alloc((slots * g::kSumSqBlocks + 1) * sizeof(double), cur()));
    auto* w = static_cast<double*>(work->ptr);
    FP8_CUDA("sum_squares", cudaMemsetAsync(w, 0, slots * g::kSumSqBlocks * sizeof(double), cur()));
    // One launch for all tensors: a table of their pointers and lengths, then one (tensor,
    // partial) item per partial that holds elements (a small tensor has few).
    std::vector<int64_t> table(2 * slots);  // pointers, then lengths
    std::vector<int32_t> items;
    for (int64_t i = 0; i < slots; ++i) {
      const int64_t n = gs[i]->numel();
      table[i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(gs[i]->data()));
      table[slots + i] = n;
      FP8_RETURN_IF_ERROR(add_chunk_items(
          items, static_cast<size_t>(i),
          std::min<int64_t>(g::kSumSqBlocks, (n + g::kSumSqThreads - 1) / g::kSumSqThreads),
          "sum_squares"));
    }
    const size_t table_bytes = table.size() * sizeof(int64_t);
    FP8_ASSIGN_OR_RETURN(auto dev, upload_tables(table.data(), table_bytes, items, "sum_squares"));
    auto* base = static_cast<char*>(dev->ptr);
    FP8_GPU("sum_squares",
            g::sum_squares_items(reinterpret_cast<const float* const*>(base),
                                 reinterpret_cast<const int64_t*>(base) + slots,
                                 reinterpret_cast<const int32_t*>(base + table_bytes),
                                 static_cast<int64_t>(items.size() / 2), w, cur()));
    FP8_GPU("sum_squares", g::sum_squares_final(w, slots, cur()));
    double h = 0.0;
    FP8_CUDA("sum_squares", cudaMemcpyAsync(&h, w + slots * g::kSumSqBlocks, sizeof(h),
                                            cudaMemcpyDeviceToHost, cur()));
    FP8_CUDA("sum_squares", cudaStreamSynchronize(cur()));
    *total += h;
    return Status::Ok();
  }
  // Every run in one launch: a table of runs and kAdamWChunk-element chunks.
  Status adamw_runs(Tensor& p, const Tensor& gr, Tensor& m, Tensor& v,
                    std::span<const AdamWRun> runs, const kernels::AdamWScalars s[2]) override {
    FP8_RETURN_IF_ERROR(on_gpu("adamw_runs", {&p, &gr, &m, &v}));
    std::vector<g::AdamWRunDev> table;
    std::vector<int32_t> items;
    for (const AdamWRun& r : runs) {
      FP8_RETURN_IF_ERROR(checks::adamw_run(p, gr, m, v, r));
      if (r.end == r.begin) continue;
      FP8_RETURN_IF_ERROR(add_chunk_items(items, table.size(),
                                          (r.end - r.begin + g::kAdamWChunk - 1) / g::kAdamWChunk,
                                          "adamw_runs"));
      table.push_back({r.begin, r.end, r.moment, r.weight_decay ? 1 : 0});
    }
    if (table.empty()) return Status::Ok();
    const size_t run_bytes = table.size() * sizeof(g::AdamWRunDev);
    FP8_ASSIGN_OR_RETURN(auto dev, upload_tables(table.data(), run_bytes, items, "adamw_runs"));
    auto* base = static_cast<char*>(dev->ptr);
    FP8_GPU("adamw_runs",
            g::adamw_runs(p.data_as<float>(), gr.data_as<float>(), m.data_as<uint16_t>(),
                          v.data_as<uint16_t>(), reinterpret_cast<const g::AdamWRunDev*>(base),
                          reinterpret_cast<const int32_t*>(base + run_bytes),
                          static_cast<int64_t>(items.size() / 2), s[0], s[1], cur()));
    return Status::Ok();
  }

  Status adamw(Tensor& p, const Tensor& gr, Tensor& m, Tensor& v,
               const kernels::AdamWScalars& s) override {
    FP8_RETURN_IF_ERROR(on_gpu("adamw", {&p, &gr, &m, &v}));
    FP8_RETURN_IF_ERROR(checks::adamw(p, gr, m, v));
    FP8_GPU("adamw", g::adamw_step(p.data_as<float>(), gr.data_as<float>(), m.data_as<uint16_t>(),
                                   v.data_as<uint16_t>(), p.numel(), s, cur()));
    return Status::Ok();
  }

 private:
  // The block work items of a one-launch op over many pieces (copy_ranges, sum_squares,
  // adamw_runs): `chunks` (piece, chunk) int32 pairs for `piece`; an error past 2^30 items.
  static Status add_chunk_items(std::vector<int32_t>& items, size_t piece, int64_t chunks,
                                const char* op) {
    if (static_cast<int64_t>(items.size() / 2) + chunks > (int64_t{1} << 30) ||
        piece >= (size_t{1} << 30)) {
      return FP8_INVALID("{}: more than 2^30 pieces or chunks in one call", op);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      items.push_back(static_cast<int32_t>(piece));
      items.push_back(static_cast<int32_t>(c));
    }
    return Status::Ok();
  }

  // A host table (table_bytes, a multiple of 8) followed by its work items in one device buffer,
  // in stream order: each part through the staging ring (no synchronization) up to its largest
  // copy, else a synchronous copy; the host vectors may go at return.
  Result<std::shared_ptr<Buffer>> upload_tables(const void* table, size_t table_bytes,
                                                const std::vector<int32_t>& items, const char* op) {
    const size_t item_bytes = items.size() * sizeof(int32_t);
    FP8_ASSIGN_OR_RETURN(auto buf, alloc(table_bytes + std::max<size_t>(item_bytes, 4), cur()));
    auto* base = static_cast<char*>(buf->ptr);
    for (const auto& [at, from, n] :
         {std::tuple<char*, const void*, size_t>{base, table, table_bytes},
          {base + table_bytes, items.data(), item_bytes}}) {
      if (n == 0) continue;
      if (n <= StagingRing::kMaxCopy) {
        FP8_CUDA(op, ctx_->staging.upload(at, from, n, cur()));
      } else {
        FP8_CUDA(op, cudaMemcpyAsync(at, from, n, cudaMemcpyHostToDevice, cur()));
        FP8_CUDA(op, cudaStreamSynchronize(cur()));
      }
    }
    return buf;
  }

  // The stream ops of this thread run on, with the backend's device made current first: the
  // current device is per host thread and a new thread starts on device 0, so a thread that has
  // not allocated yet (the FB overlap's backward half, parallel/executor.cc) would otherwise
  // launch onto another device's stream on a multi-GPU node. cudaGetDevice is a host-side read.
  cudaStream_t cur() const {
    int d = -1;
    if (cudaGetDevice(&d) != cudaSuccess || d != ctx_->device) {
      check_or_die(cudaSetDevice(ctx_->device), "cudaSetDevice");
    }
    return tl_current ? tl_current : ctx_->compute;
  }

  // one(i) for i in [0, n): call i on lane (i + 1) % L, L = min(FP8PIPE_GEMM_STREAMS, n). Lane 0 is
  // the calling stream; lanes 1.. are side streams that first wait for the calling stream's work so
  // far, and the calling stream then waits for all of them (fork / join), so to every later op
  // the group is one step of the calling stream. Concurrent small GEMMs fill the SMs that one
  // expert's few output tiles leave idle. Temporaries of a call are freed on its lane (temp()),
  // inputs and outputs after the join. On an error the lanes started are still joined. The side
  // lanes are shared by every calling stream (the model issues all compute on the compute
  // stream): groups from two streams would queue one after the other there, correct but less
  // concurrent.
  template <class F>
  Status fan_out(size_t n, F&& one) {
    const size_t L = std::min<size_t>(static_cast<size_t>(ctx_->gemm_streams), n);
    if (L <= 1) {
      for (size_t i = 0; i < n; ++i) FP8_RETURN_IF_ERROR(one(i));
      return Status::Ok();
    }
    std::lock_guard<std::mutex> lk(ctx_->fan_mu);
    FP8_RETURN_IF_ERROR(ctx_->make_lanes(L - 1));
    const cudaStream_t home = cur(), prev = tl_current;
    FP8_CUDA("grouped gemm (fork)", cudaEventRecord(ctx_->fork, home));
    for (size_t l = 1; l < L; ++l) {
      FP8_CUDA("grouped gemm (fork)", cudaStreamWaitEvent(ctx_->lanes[l - 1].s, ctx_->fork, 0));
    }
    Status st;
    for (size_t i = 0; i < n && st.ok(); ++i) {  // side lanes first: call 0 on lane 1
      const size_t l = (i + 1) % L;
      tl_current = l == 0 ? home : ctx_->lanes[l - 1].s;
      st = one(i);
    }
    tl_current = prev;
    for (size_t l = 1; l < L; ++l) {
      const DeviceCtx::Lane& lane = ctx_->lanes[l - 1];
      FP8_CUDA("grouped gemm (join)", cudaEventRecord(lane.done, lane.s));
      FP8_CUDA("grouped gemm (join)", cudaStreamWaitEvent(home, lane.done, 0));
    }
    return st;
  }

  // A device buffer from the stream-ordered pool, allocated on `alloc_stream`, freed on the
  // compute stream (tensors) or on `alloc_stream` (temporaries: see the file comment).
  Result<std::shared_ptr<Buffer>> alloc(size_t bytes, cudaStream_t alloc_stream) {
    auto buf = std::make_shared<Buffer>();
    buf->bytes = bytes;
    buf->device = Device::kCuda;
    if (!bytes) return buf;
    FP8_CUDA("cudaSetDevice", cudaSetDevice(ctx_->device));
    const cudaStream_t s = alloc_stream == ctx_->compute ? cur() : alloc_stream;
    const cudaError_t e = cudaMallocAsync(&buf->ptr, bytes, s);
    if (e != cudaSuccess) {
      return Status(Code::kInternal,
                    fmt::format("out of device memory allocating {} bytes on cuda:{}: {}", bytes,
                                ctx_->device, cudaGetErrorString(e)),
                    "reduce the micro-batch or sequence length, or use more pipeline stages");
    }
    const cudaStream_t free_on = alloc_stream == ctx_->compute ? ctx_->compute : alloc_stream;
    std::shared_ptr<DeviceCtx> ctx = ctx_;
    buf->release = [ctx, free_on](void* p) {
      cudaSetDevice(ctx->device);
      cudaFreeAsync(p, free_on);
    };
    MemoryCounter::track(memory_, *buf);  // every device buffer, tensors and scratch alike
    return buf;
  }

  // A 128x1 quantization of [R, C] written transposed: the [C, R] codes and their 1x128 scales
  // allocated, launch(codes, scales, nonfinite counter or null) run when there is anything to
  // do, and the non-finite groups counted into *nonfinite when asked.
  template <class F>
  Result<Tensor> transposed_128x1(const char* op, int64_t R, int64_t C, QuantParams p,
                                  int64_t* nonfinite, F&& launch) {
    FP8_ASSIGN_OR_RETURN(Tensor qt, empty({C, R}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(Granularity::k128x1, R, C)}, DType::kF32));
    FP8_ASSIGN_OR_RETURN(auto cnt, counter(nonfinite));
    int* bad = cnt ? static_cast<int*>(cnt->ptr) : nullptr;
    if (R * C > 0) FP8_GPU(op, launch(qt.data_as<uint8_t>(), s.data_as<float>(), bad));
    FP8_RETURN_IF_ERROR(read_counter(bad, nonfinite));
    qt.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k1x128, p.pow2);
    return qt;
  }

  // A temporary of one op (fp32 unless asked otherwise), freed on the stream that uses it.
  Result<Tensor> temp(const Shape& shape, DType dt = DType::kF32) {
    FP8_ASSIGN_OR_RETURN(auto buf, alloc(dtype_bytes(dt, numel(shape)), cur()));
    return Tensor(shape, dt, std::move(buf));
  }

  // A zeroed device counter for the kernels' non-finite group count (null when not asked for).
  Result<std::shared_ptr<Buffer>> counter(int64_t* wanted) {
    if (!wanted) return std::shared_ptr<Buffer>();
    FP8_ASSIGN_OR_RETURN(auto buf, alloc(sizeof(int), cur()));
    FP8_CUDA("counter", cudaMemsetAsync(buf->ptr, 0, sizeof(int), cur()));
    return buf;
  }
  Status read_counter(int* dev, int64_t* out) {
    if (!dev) return Status::Ok();
    int h = 0;
    FP8_CUDA("nonfinite count",
             cudaMemcpyAsync(&h, dev, sizeof(int), cudaMemcpyDeviceToHost, cur()));
    FP8_CUDA("nonfinite count", cudaStreamSynchronize(cur()));
    *out = h;
    return Status::Ok();
  }

  // (position, value) of the first id outside [lo, hi), or (-1, 0). Synchronizes the stream.
  Result<std::pair<int64_t, int32_t>> first_bad(const Tensor& ids, int64_t lo, int64_t hi) {
    const int64_t n = ids.numel();
    if (n == 0) return std::pair<int64_t, int32_t>{-1, 0};
    FP8_ASSIGN_OR_RETURN(auto buf, alloc(sizeof(int64_t), cur()));
    int64_t h = n;
    FP8_CUDA("index check",
             cudaMemcpyAsync(buf->ptr, &h, sizeof(h), cudaMemcpyHostToDevice, cur()));
    FP8_GPU("index check", g::find_bad_index(ids.data_as<int32_t>(), n, lo, hi,
                                             static_cast<int64_t*>(buf->ptr), cur()));
    FP8_CUDA("index check",
             cudaMemcpyAsync(&h, buf->ptr, sizeof(h), cudaMemcpyDeviceToHost, cur()));
    FP8_CUDA("index check", cudaStreamSynchronize(cur()));
    if (h >= n) return std::pair<int64_t, int32_t>{-1, 0};
    int32_t v = 0;
    FP8_CUDA("index check", cudaMemcpyAsync(&v, ids.data_as<int32_t>() + h, sizeof(v),
                                            cudaMemcpyDeviceToHost, cur()));
    FP8_CUDA("index check", cudaStreamSynchronize(cur()));
    return std::pair<int64_t, int32_t>{h, v};
  }

  // Pair frequencies in double, computed on the host by kernels/cpu/rope.h as the CPU backend
  // does, uploaded once per table (keyed by its bits).
  Result<const double*> rope_freq(int64_t d, const kernels::RopeSpec& r) {
    const std::vector<double> freq = kernels::rope_frequencies(r, d);
    const int64_t half = static_cast<int64_t>(freq.size());
    std::string key(reinterpret_cast<const char*>(freq.data()), freq.size() * sizeof(double));
    std::lock_guard<std::mutex> lk(ctx_->mu);
    auto it = ctx_->freq.find(key);
    if (it != ctx_->freq.end()) return static_cast<const double*>(it->second);
    void* raw = nullptr;
    FP8_CUDA("rope table", cudaMalloc(&raw, std::max<int64_t>(half, 1) * sizeof(double)));
    double* p = static_cast<double*>(raw);
    // A synchronous cudaMemcpy from pageable memory may return before the DMA lands, and it runs on
    // the legacy stream, which our non-blocking streams do not wait for: copy on the current stream
    // and wait, so the table is complete before any stream reads it.
    cudaError_t e =
        cudaMemcpyAsync(p, freq.data(), half * sizeof(double), cudaMemcpyHostToDevice, cur());
    if (e == cudaSuccess) e = cudaStreamSynchronize(cur());
    if (e != cudaSuccess) {
      cudaFree(raw);
      return cuda_error(e, "rope table");
    }
    ctx_->freq[key] = p;
    return static_cast<const double*>(p);
  }

  // Row-major C[M][N] = alpha op(A) op(B) + beta C as the column-major C^T = op(B)^T op(A)^T.
  Status sgemm(const float* a, int64_t lda, bool ta, const float* b, int64_t ldb, bool tb, float* c,
               int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    if (M == 0 || N == 0) return Status::Ok();
    std::lock_guard<std::mutex> lk(blas_mu_);
    cublasHandle_t h = ctx_->blas_for(cur(), false);
    const cublasStatus_t s1 = cublasSetStream(h, cur());
    const cublasStatus_t s2 =
        cublasSgemm(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                    static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, b,
                    static_cast<int>(std::max<int64_t>(ldb, 1)), a,
                    static_cast<int>(std::max<int64_t>(lda, 1)), &beta, c, static_cast<int>(N));
    if (s1 != CUBLAS_STATUS_SUCCESS || s2 != CUBLAS_STATUS_SUCCESS) {
      return FP8_ERROR(Code::kInternal, "gemm: cublasSgemm M={} N={} K={}: {}", M, N, K,
                       g::cublas_status_name(s2 != CUBLAS_STATUS_SUCCESS ? s2 : s1));
    }
    return Status::Ok();
  }

  // Row-major C[M][N] = alpha op(A) op(B) + beta C with bf16 A, B: cublasGemmEx on the column-major
  // transpose (C^T = op(B)^T op(A)^T), fp32 C and fp32 accumulation.
  Status bf16_gemm(const void* a, int64_t lda, bool ta, const void* b, int64_t ldb, bool tb,
                   float* c, int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    if (M == 0 || N == 0) return Status::Ok();
    std::lock_guard<std::mutex> lk(blas_mu_);
    cublasHandle_t h = ctx_->blas_for(cur(), true);
    const cublasStatus_t s1 = cublasSetStream(h, cur());
    const cublasStatus_t s2 =
        cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                     static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, b,
                     CUDA_R_16BF, static_cast<int>(std::max<int64_t>(ldb, 1)), a, CUDA_R_16BF,
                     static_cast<int>(std::max<int64_t>(lda, 1)), &beta, c, CUDA_R_32F,
                     static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s1 != CUBLAS_STATUS_SUCCESS || s2 != CUBLAS_STATUS_SUCCESS) {
      return FP8_ERROR(Code::kInternal, "gemm: cublasGemmEx (bf16) M={} N={} K={}: {}", M, N, K,
                       g::cublas_status_name(s2 != CUBLAS_STATUS_SUCCESS ? s2 : s1));
    }
    return Status::Ok();
  }

  // A shape or alignment that FP8.md §3.3 refuses, met by zero padding rather than leaving
  // cuBLASLt: K up to a multiple of 16, a VEC128 operand's rows up to a multiple of 4, N up to 16
  // bytes of output row, all in fresh (aligned) buffers. Zero codes add exact zeros to every
  // 128-element block's sum, and 16 divides 128, so the scale blocks stay where they are (a
  // VEC128 operand's scales, row-fastest, move to the padded row count); the padded output rows
  // and columns are dropped. So the result is bitwise that of the unpadded GEMM (the MoE's zero
  // expert rows rely on the same). Costs one copy of each padded operand; what padding cannot
  // fix, or a shape with no algorithm even so, takes the fallback below.
  Status gemm_fp8_padded(const Tensor& a, const Tensor& b, Tensor& out, GemmMode mode,
                         const std::string& why) {
    const int64_t M = a.rows(), N = b.rows(), K = a.cols();
    const bool f32 = out.dtype() == DType::kF32;
    auto up = [](int64_t n, int64_t m) { return (n + m - 1) / m * m; };
    const int64_t K2 = up(K, 16);
    const int64_t M2 = a.granularity() == k::Granularity::k1x128 ? up(M, 4) : M;
    const int64_t N2 = up(b.granularity() == k::Granularity::k1x128 ? up(N, 4) : N, f32 ? 4 : 8);
    std::vector<Tensor> keep;  // the padded buffers, alive until the GEMM is enqueued
    FP8_ASSIGN_OR_RETURN(k::Fp8Operand pa, padded_operand(a, M2, K2, keep));
    FP8_ASSIGN_OR_RETURN(k::Fp8Operand pb, padded_operand(b, N2, K2, keep));
    const bool direct = M2 == M && N2 == N && aligned16(out.data());
    Tensor dst = out;
    if (!direct) {
      FP8_ASSIGN_OR_RETURN(dst, temp({M2, N2}, out.dtype()));
    }
    float* of = f32 ? dst.data_as<float>() : nullptr;
    uint16_t* ob16 = f32 ? nullptr : dst.data_as<uint16_t>();
    if (!g::check_fp8_gemm_args(pa, pb, M2, N2, K2, of, ob16).ok) {
      return gemm_fp8_fallback(a, b, out, why);  // not a shape rule: padding does not help
    }
    FP8_ASSIGN_OR_RETURN(g::LtGemm * lt, ctx_->lt_for(cur()));
    const g::Result r =
        lt->fp8_gemm(pa, pb, M2, N2, K2, of, ob16, cur(), /*splitk1=*/mode == GemmMode::kExact);
    if (!r.ok && r.unsupported) return gemm_fp8_fallback(a, b, out, why + "; padded: " + r.msg);
    FP8_GPU("gemm_fp8", r);
    {
      std::lock_guard<std::mutex> lk(ctx_->mu);
      if (ctx_->padded_logged.insert({M, N, K}).second) {
        log::info("gemm_fp8 {}x{}x{}: runs on cuBLASLt zero-padded to {}x{}x{} ({})", M, N, K, M2,
                  N2, K2, why);
      }
    }
    if (direct) return Status::Ok();
    const size_t es = dtype_size(out.dtype());
    FP8_CUDA("gemm_fp8", cudaMemcpy2DAsync(out.data(), N * es, dst.data(), N2 * es, N * es, M,
                                           cudaMemcpyDeviceToDevice, cur()));
    return Status::Ok();
  }

  // Operand t ([rows][K] codes) as cuBLASLt may take it with `rows2` rows of `K2` codes: t itself
  // when nothing changes and its pointers are 16-byte aligned, else zero-padded copies (in keep).
  Result<k::Fp8Operand> padded_operand(const Tensor& t, int64_t rows2, int64_t K2,
                                       std::vector<Tensor>& keep) {
    const k::Fp8Operand op = operand(t);
    const int64_t rows = t.rows(), K = t.cols();
    const bool vec = t.granularity() == k::Granularity::k1x128;
    k::Fp8Operand p = op;
    if (rows2 != rows || K2 != K || !aligned16(op.q)) {
      FP8_ASSIGN_OR_RETURN(Tensor q, temp({rows2 * K2}, t.dtype()));
      FP8_CUDA("gemm_fp8", cudaMemsetAsync(q.data(), 0, q.nbytes(), cur()));
      if (rows * K > 0) {
        FP8_CUDA("gemm_fp8", cudaMemcpy2DAsync(q.data(), K2, op.q, K, K, rows,
                                               cudaMemcpyDeviceToDevice, cur()));
      }
      p.q = q.data_as<uint8_t>();
      keep.push_back(std::move(q));
    }
    // VEC128 scales s[kb*rows + r] move with the row count; the others keep their layout (the
    // block count along rows and K is unchanged: rows2 and K2 stay within the last block).
    if ((vec && rows2 != rows) || !aligned16(op.s)) {
      const int64_t KB = k::ceil_div(K, 128);
      const int64_t n = vec ? KB * rows2 : k::scale_count(t.granularity(), rows, K);
      FP8_ASSIGN_OR_RETURN(Tensor sc, temp({n}, DType::kF32));
      FP8_CUDA("gemm_fp8", cudaMemsetAsync(sc.data(), 0, sc.nbytes(), cur()));
      const int64_t width = vec ? rows : k::scale_count(t.granularity(), rows, K);
      const int64_t height = vec ? KB : 1, pitch = vec ? rows2 : width;
      if (width * height > 0) {
        FP8_CUDA("gemm_fp8", cudaMemcpy2DAsync(sc.data(), pitch * 4, op.s, width * 4, width * 4,
                                               height, cudaMemcpyDeviceToDevice, cur()));
      }
      p.s = sc.data_as<float>();
      keep.push_back(std::move(sc));
    }
    return p;
  }

  // The CPU's kFast path for shapes cuBLASLt's FP8 kernels do not take: exact dequantize of both
  // operands, fp32 GEMM, and (for a bf16 output) one RNE rounding of the fp32 result.
  Status gemm_fp8_fallback(const Tensor& a, const Tensor& b, Tensor& out, const std::string& why) {
    const int64_t M = a.rows(), N = b.rows(), K = a.cols();
    {
      std::lock_guard<std::mutex> lk(ctx_->mu);
      if (ctx_->fallback_logged.insert({M, N, K}).second) {
        log::warn("gemm_fp8 {}x{}x{}: not a cuBLASLt FP8 shape ({}); using dequantize + fp32 GEMM",
                  M, N, K, why);
      }
    }
    FP8_ASSIGN_OR_RETURN(Tensor da, temp({M, K}));
    FP8_ASSIGN_OR_RETURN(Tensor db, temp({N, K}));
    FP8_RETURN_IF_ERROR(dequantize(a, da));
    FP8_RETURN_IF_ERROR(dequantize(b, db));
    if (out.dtype() == DType::kF32) {
      return sgemm(da.data_as<float>(), K, false, db.data_as<float>(), K, true,
                   out.data_as<float>(), M, N, K, 1.0f, 0.0f);
    }
    FP8_ASSIGN_OR_RETURN(Tensor tmp, temp({M, N}));
    FP8_RETURN_IF_ERROR(sgemm(da.data_as<float>(), K, false, db.data_as<float>(), K, true,
                              tmp.data_as<float>(), M, N, K, 1.0f, 0.0f));
    FP8_GPU("gemm_fp8",
            g::f32_to_bf16(tmp.data_as<float>(), M * N, out.data_as<uint16_t>(), cur()));
    return Status::Ok();
  }

  std::shared_ptr<DeviceCtx> ctx_;
  std::string name_;
  CudaStream compute_;
  std::mutex blas_mu_;
  std::shared_ptr<MemoryCounter> memory_ = std::make_shared<MemoryCounter>();
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

Result<std::unique_ptr<Backend>> make_cuda_backend(int device_index) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    return Status(
        Code::kUnimplemented,
        fmt::format("no CUDA device ({})", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e)),
        "run on a GPU machine, or use the CPU backend");
  }
  if (device_index < 0 || device_index >= count) {
    return FP8_INVALID("CUDA device {} does not exist: {} device(s) visible", device_index, count);
  }
  cudaDeviceProp prop{};
  FP8_CUDA("cudaGetDeviceProperties", cudaGetDeviceProperties(&prop, device_index));
  if (prop.major != 9 || prop.minor != 0) {
    return Status(Code::kUnimplemented,
                  fmt::format("CUDA device {} ({}) is sm_{}{}; fp8pipe's kernels are built for "
                              "sm_90a (Hopper) only",
                              device_index, prop.name, prop.major, prop.minor),
                  "FP8 block scaling in cuBLASLt needs sm_90 (FP8.md §3.1)");
  }
  FP8_CUDA("cudaSetDevice", cudaSetDevice(device_index));
  // Keep freed memory in the device's pool instead of returning it to the driver at every sync.
  cudaMemPool_t pool = nullptr;
  FP8_CUDA("cudaDeviceGetDefaultMemPool", cudaDeviceGetDefaultMemPool(&pool, device_index));
  uint64_t threshold = UINT64_MAX;
  FP8_CUDA("cudaMemPoolSetAttribute",
           cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  auto ctx = std::make_shared<DeviceCtx>();
  ctx->device = device_index;
  if (const char* v = std::getenv("FP8PIPE_GEMM_STREAMS"); v && *v) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*end != '\0' || n < 1 || n > 16) {
      return FP8_INVALID(
          "FP8PIPE_GEMM_STREAMS='{}': expected an integer in 1..16 (the CUDA streams a grouped "
          "GEMM, e.g. the MoE's per-expert GEMMs, spreads over; 1 runs them in order)",
          v);
    }
    ctx->gemm_streams = static_cast<int>(n);
  }
  FP8_CUDA("cudaStreamCreate", cudaStreamCreateWithFlags(&ctx->compute, cudaStreamNonBlocking));
  if (cublasCreate(&ctx->blas) != CUBLAS_STATUS_SUCCESS) {
    return FP8_ERROR(Code::kInternal, "cublasCreate failed on cuda:{}", device_index);
  }
  // fp32 GEMMs stay fp32 (no TF32): the CPU backend is the reference.
  if (cublasSetMathMode(ctx->blas, CUBLAS_PEDANTIC_MATH) != CUBLAS_STATUS_SUCCESS) {
    return FP8_ERROR(Code::kInternal, "cublasSetMathMode failed on cuda:{}", device_index);
  }
  // bf16 operands (the BF16 twin): tensor cores with fp32 accumulation (CUBLAS_COMPUTE_32F).
  if (cublasCreate(&ctx->blas_bf16) != CUBLAS_STATUS_SUCCESS) {
    return FP8_ERROR(Code::kInternal, "cublasCreate failed on cuda:{}", device_index);
  }
  return std::unique_ptr<Backend>(
      std::make_unique<CudaBackend>(ctx, fmt::format("cuda:{} ({})", device_index, prop.name)));
}

}  // namespace fp8pipe
