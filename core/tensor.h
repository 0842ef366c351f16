// Tensor: a row-major contiguous array with shape, dtype and device, whose storage is owned by a
// backend allocator (shared, so views and copies of the handle are cheap). FP8 tensors carry their
// dequantization scales (an fp32 tensor in the layout of kernels/cpu/quantize.h) and granularity.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace fp8pipe {

enum class Device : uint8_t { kCpu, kCuda };
const char* device_name(Device d);

// A block of memory and how to free it; owned through shared_ptr by every Tensor that uses it.
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device = Device::kCpu;
  std::function<void(void*)> release;
  ~Buffer() {
    if (release && ptr) release(ptr);
  }
};

// Bytes held by a backend's live buffers (their requested sizes, not what an allocator reserves):
// now, and the most since the last reset_peak(). Thread-safe: buffers die on any thread.
struct MemoryUse {
  int64_t in_use = 0, peak = 0;
};
class MemoryCounter {
 public:
  // Counts `buf` from now until it is freed (wraps its release; the counter outlives the backend
  // through the wrapper's reference).
  static void track(const std::shared_ptr<MemoryCounter>& counter, Buffer& buf);
  MemoryUse read() const;
  void reset_peak();

 private:
  void add(int64_t bytes);
  std::atomic<int64_t> in_use_{0}, peak_{0};
};

using Shape = std::vector<int64_t>;
int64_t numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[2, 3]"

class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype, std::shared_ptr<Buffer> buf, size_t offset = 0);

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  DType dtype() const { return dtype_; }
  Device device() const { return buf_ ? buf_->device : Device::kCpu; }
  int64_t numel() const { return fp8pipe::numel(shape_); }
  size_t nbytes() const { return dtype_bytes(dtype_, numel()); }
  bool defined() const { return buf_ != nullptr; }
  // [rows, cols] view of a tensor as a matrix: rows = product of leading dims, cols = last dim.
  int64_t rows() const { return shape_.empty() ? 1 : numel() / shape_.back(); }
  int64_t cols() const { return shape_.empty() ? 1 : shape_.back(); }

  void* data() const { return static_cast<char*>(buf_->ptr) + offset_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data());
  }

  // Same storage, new shape with the same element count.
  Result<Tensor> reshape(Shape s) const;
  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;

  // FP8 scale metadata (undefined for non-FP8 tensors).
  const std::shared_ptr<Tensor>& scale() const { return scale_; }
  Granularity granularity() const { return gran_; }
  bool pow2_scales() const { return pow2_; }
  void set_scale(std::shared_ptr<Tensor> s, Granularity g, bool pow2) {
    scale_ = std::move(s);
    gran_ = g;
    pow2_ = pow2;
  }

  std::string describe() const;  // "e4m3[256, 512] cpu (1x128 scales)"

 private:
  Shape shape_;
  DType dtype_ = DType::kF32;
  std::shared_ptr<Buffer> buf_;
  size_t offset_ = 0;
  std::shared_ptr<Tensor> scale_;
  Granularity gran_ = Granularity::k1x128;
  bool pow2_ = true;
};

}  // namespace fp8pipe
