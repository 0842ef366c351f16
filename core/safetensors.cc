// safetensors reader and writer (see safetensors.h). The header JSON is parsed by a small strict
// parser here rather than protobuf's Struct, so that offsets are exact 64-bit integers, duplicate
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

namespace fp8pipe::safetensors {
namespace {

// ---------------------------------------------------------------------------------------------
// A minimal JSON document model and a strict RFC 8259 parser (UTF-8 validated up front).

struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  std::string text;  // decoded string, or the number token as written
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;  // in document order, duplicates kept
  size_t pos = 0;                                     // byte offset in the header
};

constexpr int kMaxDepth = 64;

class JsonParser {
 public:
  explicit JsonParser(std::string_view s) : s_(s) {}
  // Parses one value followed only by whitespace. On error, `error_pos()` is the failing byte.
  Status parse(Json& out) {
    ws();
    FP8_RETURN_IF_ERROR(value(out, 0));
    ws();
    if (i_ != s_.size()) return fail("unexpected trailing characters after the JSON object");
    return Status::Ok();
  }
  size_t error_pos() const { return i_; }

 private:
  Status fail(std::string_view what) const {
    return FP8_INVALID("invalid JSON at header byte {}: {}", i_, what);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }
  bool eat(char c) {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  Status value(Json& out, int depth);
  Status object(Json& out, int depth);
  Status array(Json& out, int depth);
  Status string(std::string& out);
  Status escape(std::string& out);
  Status number(Json& out);
  Status hex4(uint32_t& cp);

  std::string_view s_;
  size_t i_ = 0;
};

Status JsonParser::value(Json& out, int depth) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  out.pos = i_;
  if (i_ >= s_.size()) return fail("unexpected end of header, expected a value");
  const char c = s_[i_];
  if (c == '{') return object(out, depth);
  if (c == '[') return array(out, depth);
  if (c == '"') {
    out.kind = Json::Kind::kString;
    return string(out.text);
  }
  if (c == '-' || (c >= '0' && c <= '9')) return number(out);
  for (std::string_view lit : {"true", "false", "null"}) {
    if (s_.substr(i_, lit.size()) == lit) {
      out.kind = lit == "null" ? Json::Kind::kNull : Json::Kind::kBool;
      out.text = lit;
      i_ += lit.size();
      return Status::Ok();
    }
  }
  return fail(fmt::format("unexpected character '{}'", c));
}

Status JsonParser::object(Json& out, int depth) {
  out.kind = Json::Kind::kObject;
  ++i_;  // '{'
  ws();
  if (eat('}')) return Status::Ok();
  while (true) {
    ws();
    if (i_ >= s_.size() || s_[i_] != '"') return fail("expected a quoted key");
    std::string key;
    FP8_RETURN_IF_ERROR(string(key));
    ws();
    if (!eat(':')) return fail("expected ':' after a key");
    ws();
    Json v;
    FP8_RETURN_IF_ERROR(value(v, depth + 1));
    out.members.emplace_back(std::move(key), std::move(v));
    ws();
    if (eat('}')) return Status::Ok();
    if (!eat(',')) return fail("expected ',' or '}' in an object");
  }
}

Status JsonParser::array(Json& out, int depth) {
  out.kind = Json::Kind::kArray;
  ++i_;  // '['
  ws();
  if (eat(']')) return Status::Ok();
  while (true) {
    ws();
    Json v;
    FP8_RETURN_IF_ERROR(value(v, depth + 1));
    out.items.push_back(std::move(v));
    ws();
    if (eat(']')) return Status::Ok();
    if (!eat(',')) return fail("expected ',' or ']' in an array");
  }
}

Status JsonParser::hex4(uint32_t& cp) {
  if (i_ + 4 > s_.size()) return fail("truncated \\u escape");
  cp = 0;
  for (int k = 0; k < 4; ++k) {
    const char h = s_[i_++];
    cp <<= 4;
    if (h >= '0' && h <= '9')
      cp |= h - '0';
    else if (h >= 'a' && h <= 'f')
      cp |= h - 'a' + 10;
    else if (h >= 'A' && h <= 'F')
      cp |= h - 'A' + 10;
    else
      return fail("bad hex digit in \\u escape");
  }
  return Status::Ok();
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// One escape sequence after the backslash (already consumed).
Status JsonParser::escape(std::string& out) {
  if (i_ >= s_.size()) return fail("unterminated escape");
  const char e = s_[i_++];
  static constexpr std::string_view kFrom = "\"\\/bfnrt", kTo = "\"\\/\b\f\n\r\t";
  if (const size_t k = kFrom.find(e); k != std::string_view::npos) {
    out += kTo[k];
    return Status::Ok();
  }
  if (e != 'u') {
    --i_;
    return fail(fmt::format("invalid escape '\\{}'", e));
  }
  uint32_t cp;
  FP8_RETURN_IF_ERROR(hex4(cp));
  if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("lone low surrogate in \\u escape");
  if (cp >= 0xD800 && cp <= 0xDBFF) {
    uint32_t lo;
    if (!(eat('\\') && eat('u'))) return fail("high surrogate without a low surrogate");
    FP8_RETURN_IF_ERROR(hex4(lo));
    if (lo < 0xDC00 || lo > 0xDFFF) return fail("high surrogate without a low surrogate");
    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
  }
  append_utf8(out, cp);
  return Status::Ok();
}

Status JsonParser::string(std::string& out) {
  ++i_;  // opening quote
  while (true) {
    if (i_ >= s_.size()) return fail("unterminated string");
    const auto c = static_cast<unsigned char>(s_[i_++]);
    if (c == '"') return Status::Ok();
    if (c < 0x20) {
      --i_;
      return fail("unescaped control character in a string");
    }
    if (c == '\\') {
      FP8_RETURN_IF_ERROR(escape(out));
    } else {
      out += static_cast<char>(c);
    }
  }
}

Status JsonParser::number(Json& out) {
  out.kind = Json::Kind::kNumber;
  const size_t start = i_;
  auto digits = [&] {
    const size_t d = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    return i_ > d;
  };
  eat('-');
  if (eat('0')) {
  } else if (!digits()) {
    return fail("malformed number");
  }
  if (eat('.') && !digits()) return fail("malformed number: digits expected after '.'");
  if (eat('e') || eat('E')) {
    if (!eat('+')) eat('-');
    if (!digits()) return fail("malformed number: digits expected in the exponent");
  }
  out.text = std::string(s_.substr(start, i_ - start));
  return Status::Ok();
}

// RFC 3629 UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. Returns the first bad
// byte's offset, or npos.
size_t find_bad_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n;
    uint32_t min, cp;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      min = 0x80;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      min = 0x800;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      min = 0x10000;
      cp = c & 0x07;
    } else
      return i;
    if (i + n >= s.size()) return i;
    for (int k = 1; k <= n; ++k) {
      const auto t = static_cast<unsigned char>(s[i + k]);
      if ((t & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (t & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return std::string_view::npos;
}

// An exact non-negative JSON integer (no sign, fraction or exponent) that fits in uint64.
bool as_u64(const Json& j, uint64_t& out) {
  if (j.kind != Json::Kind::kNumber || j.text.empty()) return false;
  uint64_t v = 0;
  for (char c : j.text) {
    if (c < '0' || c > '9') return false;
    if (__builtin_mul_overflow(v, 10u, &v) || __builtin_add_overflow(v, uint64_t(c - '0'), &v))
      return false;
  }
  out = v;
  return true;
}

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

std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20)
          out += fmt::format("\\u{:04x}", c);
        else
          out += ch;
    }
  }
  return out + "\"";
}

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
Status parse_entry(const std::string& file, const std::string& name, const Json& j,
                   uint64_t buffer_bytes, TensorView& t) {
  auto bad = [&](std::string_view what) {
    return FP8_INVALID("{}: tensor '{}': {}", file, name, what);
  };
  if (j.kind != Json::Kind::kObject) return bad("header entry is not a JSON object");
  const Json *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
  for (const auto& [k, v] : j.members) {
    if (k == "dtype") dtype = &v;
    if (k == "shape") shape = &v;
    if (k == "data_offsets") offsets = &v;
  }
  if (!dtype || !shape || !offsets)
    return bad("entry needs \"dtype\", \"shape\" and \"data_offsets\"");
  if (dtype->kind != Json::Kind::kString) return bad("\"dtype\" is not a string");
  t.name = name;
  t.dtype = dtype->text;
  const size_t esize = dtype_size(t.dtype);
  if (esize == 0) {
    return bad(
        fmt::format("unknown dtype \"{}\" (known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 "
                    "U16 U8 BOOL F8_E4M3 F8_E5M2 C64)",
                    t.dtype));
  }
  if (shape->kind != Json::Kind::kArray) return bad("\"shape\" is not an array");
  uint64_t numel = 1;
  for (const Json& d : shape->items) {
    uint64_t v;
    if (!as_u64(d, v) || v > uint64_t(INT64_MAX)) {
      return bad(fmt::format("shape entry '{}' is not a non-negative integer", d.text));
    }
    t.shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(numel, v, &numel)) return bad("shape product overflows 64 bits");
  }
  uint64_t b, e, want;
  if (offsets->kind != Json::Kind::kArray || offsets->items.size() != 2 ||
      !as_u64(offsets->items[0], b) || !as_u64(offsets->items[1], e)) {
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

Status parse_metadata(const std::string& file, const Json& j,
                      std::map<std::string, std::string>& out) {
  if (j.kind != Json::Kind::kObject)
    return FP8_INVALID("{}: \"__metadata__\" is not an object", file);
  for (const auto& [k, v] : j.members) {
    if (v.kind != Json::Kind::kString) {
      return FP8_INVALID("{}: __metadata__ value of '{}' is not a string", file, k);
    }
    if (!out.emplace(k, v.text).second) {
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
  if (size_t bad = find_bad_utf8(header); bad != std::string_view::npos) {
    return FP8_INVALID("{}: header is not valid UTF-8 (byte {})", f, bad);
  }
  Json doc;
  JsonParser parser(header);
  if (Status st = parser.parse(doc); !st.ok()) return st.with_context(f);
  const uint64_t buffer_bytes = bytes.size() - 8 - n;
  if (doc.kind != Json::Kind::kObject) return FP8_INVALID("{}: header is not a JSON object", f);
  bool seen_metadata = false;
  for (const auto& [name, entry] : doc.members) {
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
  if (find_bad_utf8(name) != std::string_view::npos) {
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
    if (find_bad_utf8(k) != std::string_view::npos || find_bad_utf8(v) != std::string_view::npos) {
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
