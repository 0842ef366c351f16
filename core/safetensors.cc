// safetensors reader and writer (see safetensors.h). The header JSON is parsed by core/json.h's
// strict parser rather than protobuf's Struct, so that offsets are exact 64-bit integers, duplicate
// names are detected, and errors can point at a byte of the header.
#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "core/json.h"

namespace fp8pipe::safetensors {
namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

size_t dtype_size(std::string_view dtype) {
  static constexpr std::pair<std::string_view, size_t> kSizes[] = {
      {"F64", 8},  {"F32", 4},     {"F16", 2},     {"BF16", 2}, {"I64", 8}, {"I32", 4},
      {"I16", 2},  {"I8", 1},      {"U64", 8},     {"U32", 4},  {"U16", 2}, {"U8", 1},
      {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"C64", 8}};
  for (const auto& [name, size] : kSizes) {
    if (name == dtype) return size;
  }
  return 0;
}

std::string json_quote(std::string_view s) { return json::quote(s); }

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const { return shape_string(shape); }

// ---------------------------------------------------------------------------------------------
// Reader

namespace {

// Parses one header entry {"dtype", "shape", "data_offsets"} into `t` (data pointer unset).
// Unknown extra keys are ignored, as the reference reader does.
Status parse_entry(const std::string& file, const std::string& name, const json::Value& j,
                   uint64_t buffer_bytes, TensorView& t) {
  auto bad = [&](std::string_view what) {
    return FP8_INVALID("{}: tensor '{}': {}", file, name, what);
  };
  if (!j.is_object()) return bad("header entry is not a JSON object");
  const json::Value *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
  for (const auto& [k, v] : j.members()) {
    if (k == "dtype") dtype = &v;
    if (k == "shape") shape = &v;
    if (k == "data_offsets") offsets = &v;
  }
  if (!dtype || !shape || !offsets)
    return bad("entry needs \"dtype\", \"shape\" and \"data_offsets\"");
  if (!dtype->is_string()) return bad("\"dtype\" is not a string");
  t.name = name;
  t.dtype = dtype->as_string();
  const size_t esize = dtype_size(t.dtype);
  if (esize == 0) {
    return bad(
        fmt::format("unknown dtype \"{}\" (known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 "
                    "U16 U8 BOOL F8_E4M3 F8_E5M2 C64)",
                    t.dtype));
  }
  if (!shape->is_array()) return bad("\"shape\" is not an array");
  uint64_t numel = 1;
  for (const json::Value& d : shape->items()) {
    uint64_t v;
    if (!d.get_u64(&v) || v > uint64_t(INT64_MAX)) {
      return bad(fmt::format("shape entry '{}' is not a non-negative integer", json::write(d)));
    }
    t.shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(numel, v, &numel)) return bad("shape product overflows 64 bits");
  }
  uint64_t b, e, want;
  if (!offsets->is_array() || offsets->items().size() != 2 || !offsets->items()[0].get_u64(&b) ||
      !offsets->items()[1].get_u64(&e)) {
    return bad("\"data_offsets\" must be [begin, end] with non-negative integers");
  }
  if (e < b) return bad(fmt::format("data_offsets [{}, {}] end before begin", b, e));
  if (e > buffer_bytes) {
    return bad(fmt::format("data_offsets [{}, {}] out of range: the data buffer is {} bytes", b, e,
                           buffer_bytes));
  }
  if (__builtin_mul_overflow(numel, esize, &want) || want != e - b) {
    return bad(
        fmt::format("shape {} x {} ({} bytes/element) needs {} bytes but data_offsets "
                    "[{}, {}] span {}",
                    shape_string(t.shape), t.dtype, esize, want, b, e, e - b));
  }
  t.offset = b;
  t.nbytes = e - b;
  return Status::Ok();
}

Status parse_metadata(const std::string& file, const json::Value& j,
                      std::map<std::string, std::string>& out) {
  if (!j.is_object()) return FP8_INVALID("{}: \"__metadata__\" is not an object", file);
  for (const auto& [k, v] : j.members()) {
    if (!v.is_string()) {
      return FP8_INVALID("{}: __metadata__ value of '{}' is not a string", file, k);
    }
    if (!out.emplace(k, v.as_string()).second) {
      return FP8_INVALID("{}: duplicate __metadata__ key '{}'", file, k);
    }
  }
  return Status::Ok();
}

// Tensors sorted by offset must tile [0, buffer_bytes) exactly (the reference's rule).
Status check_coverage(const std::string& file, std::vector<TensorView>& ts, uint64_t buffer_bytes) {
  std::stable_sort(ts.begin(), ts.end(), [](const TensorView& a, const TensorView& b) {
    return a.offset != b.offset ? a.offset < b.offset : a.nbytes < b.nbytes;
  });
  uint64_t cursor = 0;
  const TensorView* prev = nullptr;
  for (const TensorView& t : ts) {
    if (t.offset < cursor) {
      return FP8_INVALID("{}: tensor '{}' bytes [{}, {}) overlap tensor '{}' which ends at {}",
                         file, t.name, t.offset, t.offset + t.nbytes, prev->name, cursor);
    }
    if (t.offset > cursor) {
      return FP8_INVALID(
          "{}: tensor '{}' starts at {} but the previous tensor ends at {}: "
          "safetensors requires tensors to cover the data buffer without gaps",
          file, t.name, t.offset, cursor);
    }
    cursor = t.offset + t.nbytes;
    prev = &t;
  }
  if (cursor != buffer_bytes) {
    return FP8_INVALID(
        "{}: tensors cover {} bytes but the data buffer is {} bytes (truncated or "
        "trailing data)",
        file, cursor, buffer_bytes);
  }
  return Status::Ok();
}

}  // namespace

Status Reader::validate(std::span<const uint8_t> bytes) {
  const std::string& f = path_;
  if (bytes.size() < 8) {
    return FP8_INVALID("{}: file is {} bytes, too short for the 8-byte header length (truncated?)",
                       f, bytes.size());
  }
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | bytes[k];
  if (n > kMaxHeaderBytes) {
    return FP8_INVALID("{}: header length {} exceeds the {}-byte limit (not a safetensors file?)",
                       f, n, kMaxHeaderBytes);
  }
  if (n > bytes.size() - 8) {
    return FP8_INVALID(
        "{}: header length {} exceeds the {} bytes after the length field "
        "(truncated file?)",
        f, n, bytes.size() - 8);
  }
  const std::string_view header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  if (n == 0 || header[0] != '{') return FP8_INVALID("{}: header does not start with '{{'", f);
  if (size_t bad = json::find_bad_utf8(header); bad != std::string_view::npos) {
    return FP8_INVALID("{}: header is not valid UTF-8 (byte {})", f, bad);
  }
  auto parsed = json::parse(header, "header");
  if (!parsed.ok()) return parsed.status().with_context(f);
  const json::Value& doc = *parsed;
  const uint64_t buffer_bytes = bytes.size() - 8 - n;
  if (!doc.is_object()) return FP8_INVALID("{}: header is not a JSON object", f);
  bool seen_metadata = false;
  for (const auto& [name, entry] : doc.members()) {
    if (name == "__metadata__") {
      if (seen_metadata) return FP8_INVALID("{}: duplicate \"__metadata__\"", f);
      seen_metadata = true;
      FP8_RETURN_IF_ERROR(parse_metadata(f, entry, metadata_));
      continue;
    }
    if (!index_.emplace(name, 0).second)
      return FP8_INVALID("{}: duplicate tensor name '{}'", f, name);
    TensorView t;
    FP8_RETURN_IF_ERROR(parse_entry(f, name, entry, buffer_bytes, t));
    tensors_.push_back(std::move(t));
  }
  FP8_RETURN_IF_ERROR(check_coverage(f, tensors_, buffer_bytes));
  const uint8_t* data = bytes.data() + 8 + n;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    tensors_[i].data = data + tensors_[i].offset;
    index_[tensors_[i].name] = i;
  }
  bytes_ = bytes;
  header_bytes_ = n;
  return Status::Ok();
}

Result<Reader> Reader::parse(std::span<const uint8_t> bytes, std::string label) {
  Reader r;
  r.path_ = std::move(label);
  FP8_RETURN_IF_ERROR(r.validate(bytes));
  return r;
}

Result<Reader> Reader::open(const std::string& path) {
  Reader r;
  r.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return FP8_ERROR(Code::kIo, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return FP8_ERROR(Code::kIo, "{}: not a regular file", path);
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return FP8_ERROR(Code::kIo, "{}: mmap of {} bytes failed: {}", path, size,
                       std::strerror(err));
    }
    r.map_ = p;
    r.map_len_ = size;
  }
  ::close(fd);
  const auto* base = static_cast<const uint8_t*>(r.map_);
  FP8_RETURN_IF_ERROR(r.validate({base, size}));
  return r;
}

Reader::Reader(Reader&& o) noexcept { *this = std::move(o); }

Reader& Reader::operator=(Reader&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    bytes_ = o.bytes_;
    map_ = std::exchange(o.map_, nullptr);
    map_len_ = std::exchange(o.map_len_, 0);
    header_bytes_ = o.header_bytes_;
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
    o.bytes_ = {};
  }
  return *this;
}

Reader::~Reader() { release(); }

void Reader::release() {
  if (map_) ::munmap(map_, map_len_);
  map_ = nullptr;
  map_len_ = 0;
}

const TensorView* Reader::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<const TensorView*> Reader::get(std::string_view name) const {
  if (const TensorView* t = find(name)) return t;
  return FP8_ERROR(Code::kNotFound, "{}: no tensor named '{}' ({} tensors in the file)", path_,
                   name, tensors_.size());
}

// ---------------------------------------------------------------------------------------------
// Writer

Status Writer::check_new(const std::string& name, const std::string& dtype,
                         const std::vector<int64_t>& shape, size_t nbytes) const {
  if (name.empty() || name == "__metadata__") {
    return FP8_INVALID("safetensors writer: invalid tensor name '{}'", name);
  }
  if (json::find_bad_utf8(name) != std::string_view::npos) {
    return FP8_INVALID("safetensors writer: tensor name '{}' is not valid UTF-8", name);
  }
  if (names_.count(name)) return FP8_INVALID("safetensors writer: duplicate tensor '{}'", name);
  const size_t esize = dtype_size(dtype);
  if (esize == 0)
    return FP8_INVALID("safetensors writer: tensor '{}': unknown dtype '{}'", name, dtype);
  uint64_t want = esize;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(want, uint64_t(d), &want)) {
      return FP8_INVALID("safetensors writer: tensor '{}': bad shape {}", name,
                         shape_string(shape));
    }
  }
  if (want != nbytes) {
    return FP8_INVALID("safetensors writer: tensor '{}': shape {} x {} needs {} bytes, got {}",
                       name, shape_string(shape), dtype, want, nbytes);
  }
  return Status::Ok();
}

Status Writer::add(std::string name, std::string dtype, std::vector<int64_t> shape,
                   std::span<const uint8_t> bytes) {
  FP8_RETURN_IF_ERROR(check_new(name, dtype, shape, bytes.size()));
  names_.emplace(name, entries_.size());
  entries_.push_back({std::move(name), std::move(dtype), std::move(shape), bytes, nullptr});
  return Status::Ok();
}

Status Writer::add(std::string name, std::string dtype, std::vector<int64_t> shape,
                   std::vector<uint8_t> bytes) {
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  FP8_RETURN_IF_ERROR(
      add(std::move(name), std::move(dtype), std::move(shape), std::span<const uint8_t>(*owned)));
  entries_.back().owned = std::move(owned);
  return Status::Ok();
}

std::string Writer::header() const {
  std::string h = "{";
  if (!metadata_.empty()) {
    h += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata_) {
      h += fmt::format("{}{}:{}", first ? "" : ",", json_quote(k), json_quote(v));
      first = false;
    }
    h += "}";
  }
  uint64_t off = 0;
  for (const Entry& e : entries_) {
    if (h.size() > 1) h += ",";
    h += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                     json_quote(e.name), e.dtype, fmt::join(e.shape, ","), off,
                     off + e.bytes.size());
    off += e.bytes.size();
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  return h;
}

namespace {

Status write_all(int fd, const void* p, size_t n, const std::string& path) {
  const auto* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return FP8_ERROR(Code::kIo, "{}: write failed: {}", path, std::strerror(errno));
    c += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

}  // namespace

Status Writer::write(const std::string& path) const {
  for (const auto& [k, v] : metadata_) {
    if (json::find_bad_utf8(k) != std::string_view::npos ||
        json::find_bad_utf8(v) != std::string_view::npos) {
      return FP8_INVALID("safetensors writer: metadata '{}' is not valid UTF-8", k);
    }
  }
  const std::string h = header();
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return FP8_ERROR(Code::kIo, "{}: cannot create: {}", tmp, std::strerror(errno));
  uint8_t len[8];
  for (int k = 0; k < 8; ++k) len[k] = static_cast<uint8_t>(uint64_t(h.size()) >> (8 * k));
  Status st = write_all(fd, len, 8, tmp);
  if (st.ok()) st = write_all(fd, h.data(), h.size(), tmp);
  for (size_t i = 0; st.ok() && i < entries_.size(); ++i) {
    st = write_all(fd, entries_[i].bytes.data(), entries_[i].bytes.size(), tmp);
  }
  if (st.ok() && ::fsync(fd) != 0)
    st = FP8_ERROR(Code::kIo, "{}: fsync: {}", tmp, std::strerror(errno));
  if (::close(fd) != 0 && st.ok())
    st = FP8_ERROR(Code::kIo, "{}: close: {}", tmp, std::strerror(errno));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = FP8_ERROR(Code::kIo, "{}: rename to {} failed: {}", tmp, path, std::strerror(errno));
  }
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  // Make the rename durable.
  std::string dir = std::filesystem::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

}  // namespace fp8pipe::safetensors
