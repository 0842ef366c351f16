// The safetensors file format (8-byte little-endian header length, JSON header, one data buffer):
// a validating, zero-copy mmap reader and an atomic writer. Used by `fp8pipe quantize` and by
// checkpoints; files load with the standard Python `safetensors` package and vice versa.
//
// Layout: u64le N | N bytes of JSON | data buffer. The JSON is an object mapping each tensor name
// to
// {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]} (byte offsets into the data
// buffer) plus an optional "__metadata__": {string: string}. As in the reference implementation the
// tensors must cover the data buffer exactly: sorted by offset, each begins where the previous
// ends, the first at 0, the last at the end of the file. Offsets and sizes are parsed as exact
// unsigned 64-bit integers (no 2^53 limit).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace fp8pipe::safetensors {

// Element size in bytes of a safetensors dtype name ("F32" -> 4, "F8_E4M3" -> 1), 0 if unknown.
// Known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E4M3 F8_E5M2 C64.
size_t dtype_size(std::string_view dtype);

// The reference reader's cap on the JSON header (100 MB); longer headers are rejected.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// One tensor of a file: a view into the mapped data (valid while its Reader lives).
struct TensorView {
  std::string name;
  std::string dtype;  // safetensors name as written in the file, e.g. "BF16"
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // not necessarily aligned to the element size
  uint64_t nbytes = 0;
  uint64_t offset = 0;  // begin offset within the data buffer

  int64_t numel() const;
  std::string shape_str() const;  // "[2, 3]"
};

// A validated, memory-mapped safetensors file. Move-only; views stay valid while it lives.
class Reader {
 public:
  // Maps `path` and validates everything (see the file comment); errors name the file and tensor.
  static Result<Reader> open(const std::string& path);
  // Validates an in-memory image (e.g. for tests); `label` names it in errors. No copy is made:
  // `bytes` must outlive the Reader.
  static Result<Reader> parse(std::span<const uint8_t> bytes, std::string label);

  Reader(Reader&&) noexcept;
  Reader& operator=(Reader&&) noexcept;
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  ~Reader();

  const std::string& path() const { return path_; }
  // Tensors in data-buffer order (for files from our Writer, also the order they were added).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr if absent.
  const TensorView* find(std::string_view name) const;
  // Like find(), but a missing tensor is a NotFound error naming the file.
  Result<const TensorView*> get(std::string_view name) const;
  uint64_t header_bytes() const { return header_bytes_; }
  uint64_t file_bytes() const { return bytes_.size(); }

 private:
  Reader() = default;
  Status validate(std::span<const uint8_t> bytes);
  void release();

  std::string path_;
  std::span<const uint8_t> bytes_;
  void* map_ = nullptr;  // mmap base when the Reader owns a mapping
  size_t map_len_ = 0;
  uint64_t header_bytes_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and metadata, then writes one file atomically: `path.tmp`, fsync, rename,
// fsync of the directory. The header is padded with spaces so the data buffer starts 8-byte
// aligned (as the reference writer does); tensors are laid out in the order they were added.
class Writer {
 public:
  // Borrowed bytes: `bytes` must stay alive until write() returns.
  Status add(std::string name, std::string dtype, std::vector<int64_t> shape,
             std::span<const uint8_t> bytes);
  // Owned bytes.
  Status add(std::string name, std::string dtype, std::vector<int64_t> shape,
             std::vector<uint8_t> bytes);
  void set_metadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
  }
  // The JSON header including its space padding (exposed for tests).
  std::string header() const;
  // Writes the file; on any error no file is left at `path` or `path.tmp`.
  Status write(const std::string& path) const;
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::span<const uint8_t> bytes;
    std::shared_ptr<std::vector<uint8_t>> owned;
  };
  Status check_new(const std::string& name, const std::string& dtype,
                   const std::vector<int64_t>& shape, size_t nbytes) const;

  std::vector<Entry> entries_;
  std::map<std::string, size_t, std::less<>> names_;
  std::map<std::string, std::string> metadata_;
};

// Escapes a string as a JSON string literal, quotes included.
std::string json_quote(std::string_view s);

}  // namespace fp8pipe::safetensors
