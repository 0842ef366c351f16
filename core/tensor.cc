#include "core/tensor.h"

#include <fmt/format.h>

namespace fp8pipe {

const char* device_name(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }

void MemoryCounter::track(const std::shared_ptr<MemoryCounter>& counter, Buffer& buf) {
  if (!buf.ptr || !buf.bytes) return;
  const auto bytes = static_cast<int64_t>(buf.bytes);
  counter->add(bytes);
  buf.release = [counter, bytes, free = std::move(buf.release)](void* p) {
    if (free) free(p);
    counter->in_use_.fetch_sub(bytes, std::memory_order_relaxed);
  };
}

void MemoryCounter::add(int64_t bytes) {
  const int64_t now = in_use_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  int64_t peak = peak_.load(std::memory_order_relaxed);
  while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

MemoryUse MemoryCounter::read() const {
  return {in_use_.load(std::memory_order_relaxed), peak_.load(std::memory_order_relaxed)};
}

void MemoryCounter::reset_peak() { peak_.store(in_use_.load(std::memory_order_relaxed)); }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

Tensor::Tensor(Shape shape, DType dtype, std::shared_ptr<Buffer> buf, size_t offset)
    : shape_(std::move(shape)), dtype_(dtype), buf_(std::move(buf)), offset_(offset) {}

Result<Tensor> Tensor::reshape(Shape s) const {
  if (fp8pipe::numel(s) != numel()) {
    return FP8_INVALID("cannot reshape {} ({} elements) to {} ({} elements)", shape_str(shape_),
                       numel(), shape_str(s), fp8pipe::numel(s));
  }
  Tensor t = *this;
  t.shape_ = std::move(s);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  Tensor t = *this;
  const int64_t row_elems = shape_.empty() ? 1 : numel() / shape_[0];
  t.shape_[0] = end - begin;
  // (a packed E5M6 row of odd length would start inside a byte; its tensors are never sliced)
  t.offset_ = offset_ + dtype_bytes(dtype_, begin * row_elems);
  t.scale_.reset();  // a row slice of an FP8 tensor does not keep a consistent scale layout
  return t;
}

std::string Tensor::describe() const {
  std::string s =
      fmt::format("{}{} {}", dtype_name(dtype_), shape_str(shape_), device_name(device()));
  if (scale_) s += fmt::format(" ({} {} scales)", granularity_name(gran_), pow2_ ? "pow2" : "fp32");
  return s;
}

}  // namespace fp8pipe
