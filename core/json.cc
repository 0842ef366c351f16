// JSON document model, strict parser and writer (see json.h). Moved out of safetensors.cc so the
// checkpoint manifest and tools share one parser: exact 64-bit integers, byte-accurate errors,
// duplicate keys preserved for callers that must reject them.
#include "core/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>

namespace fp8pipe::json {

const std::string Value::kEmpty;

bool Value::get_u64(uint64_t* out) const {
  if (kind_ == Kind::kInt && text_.empty()) {  // constructed, not parsed
    if (int_ < 0) return false;
    *out = static_cast<uint64_t>(int_);
    return true;
  }
  if (kind_ != Kind::kInt && kind_ != Kind::kDouble) return false;
  if (text_.empty()) return false;
  uint64_t v = 0;
  for (char c : text_) {
    if (c < '0' || c > '9') return false;
    if (__builtin_mul_overflow(v, 10u, &v) || __builtin_add_overflow(v, uint64_t(c - '0'), &v))
      return false;
  }
  *out = v;
  return true;
}

const Value* Value::find(std::string_view key) const {
  for (const auto& [k, v] : members_) {
    if (k == key) return &v;
  }
  return nullptr;
}

Value& Value::push_back(Value v) {
  items_.push_back(std::move(v));
  return items_.back();
}

Value& Value::set(std::string key, Value v) {
  for (auto& [k, old] : members_) {
    if (k == key) return old = std::move(v);
  }
  members_.emplace_back(std::move(key), std::move(v));
  return members_.back().second;
}

// ---------------------------------------------------------------------------------------------
// Parser

namespace {
constexpr int kMaxDepth = 64;
}  // namespace

class Parser {
 public:
  Parser(std::string_view s, std::string_view label) : s_(s), label_(label) {}
  Status parse(Value& out) {
    ws();
    FP8_RETURN_IF_ERROR(value(out, 0));
    ws();
    if (i_ != s_.size()) return fail("unexpected trailing characters after the JSON value");
    return Status::Ok();
  }

 private:
  Status fail(std::string_view what) const {
    return FP8_INVALID("invalid JSON at {} byte {}: {}", label_, i_, what);
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
  Status value(Value& out, int depth);
  Status object(Value& out, int depth);
  Status array(Value& out, int depth);
  Status string(std::string& out);
  Status escape(std::string& out);
  Status number(Value& out);
  Status hex4(uint32_t& cp);

  std::string_view s_, label_;
  size_t i_ = 0;
};

Status Parser::value(Value& out, int depth) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  out.pos_ = i_;
  if (i_ >= s_.size()) return fail("unexpected end of input, expected a value");
  const char c = s_[i_];
  if (c == '{') return object(out, depth);
  if (c == '[') return array(out, depth);
  if (c == '"') {
    out.kind_ = Value::Kind::kString;
    return string(out.text_);
  }
  if (c == '-' || (c >= '0' && c <= '9')) return number(out);
  for (std::string_view lit : {"true", "false", "null"}) {
    if (s_.substr(i_, lit.size()) == lit) {
      out.kind_ = lit == "null" ? Value::Kind::kNull : Value::Kind::kBool;
      out.bool_ = lit == "true";
      i_ += lit.size();
      return Status::Ok();
    }
  }
  return fail(fmt::format("unexpected character '{}'", c));
}

Status Parser::object(Value& out, int depth) {
  out.kind_ = Value::Kind::kObject;
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
    Value v;
    FP8_RETURN_IF_ERROR(value(v, depth + 1));
    out.members_.emplace_back(std::move(key), std::move(v));
    ws();
    if (eat('}')) return Status::Ok();
    if (!eat(',')) return fail("expected ',' or '}' in an object");
  }
}

Status Parser::array(Value& out, int depth) {
  out.kind_ = Value::Kind::kArray;
  ++i_;  // '['
  ws();
  if (eat(']')) return Status::Ok();
  while (true) {
    ws();
    Value v;
    FP8_RETURN_IF_ERROR(value(v, depth + 1));
    out.items_.push_back(std::move(v));
    ws();
    if (eat(']')) return Status::Ok();
    if (!eat(',')) return fail("expected ',' or ']' in an array");
  }
}

Status Parser::hex4(uint32_t& cp) {
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

namespace {

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

}  // namespace

// One escape sequence after the backslash (already consumed).
Status Parser::escape(std::string& out) {
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

Status Parser::string(std::string& out) {
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

// RFC 8259 number grammar; an integer token that fits int64 is kInt (exact), anything else kDouble
// (parsed with from_chars, correctly rounded). The token is kept either way.
Status Parser::number(Value& out) {
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
  bool integral = true;
  if (eat('.')) {
    integral = false;
    if (!digits()) return fail("malformed number: digits expected after '.'");
  }
  if (eat('e') || eat('E')) {
    integral = false;
    if (!eat('+')) eat('-');
    if (!digits()) return fail("malformed number: digits expected in the exponent");
  }
  out.text_ = std::string(s_.substr(start, i_ - start));
  const char* b = out.text_.data();
  const char* e = b + out.text_.size();
  if (integral) {
    auto [p, ec] = std::from_chars(b, e, out.int_);
    if (ec == std::errc() && p == e) {
      out.kind_ = Value::Kind::kInt;
      return Status::Ok();
    }
  }
  out.kind_ = Value::Kind::kDouble;
  auto [p, ec] = std::from_chars(b, e, out.double_);
  if (ec == std::errc::result_out_of_range) {
    out.double_ = out.text_[0] == '-' ? -HUGE_VAL : HUGE_VAL;  // e.g. 1e999; token kept
  } else if (ec != std::errc() || p != e) {
    return fail("malformed number");
  }
  return Status::Ok();
}

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
      n = 1, min = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, min = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, min = 0x10000, cp = c & 0x07;
    } else {
      return i;
    }
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

Result<Value> parse(std::string_view text, std::string_view label) {
  if (size_t bad = find_bad_utf8(text); bad != std::string_view::npos) {
    return FP8_INVALID("invalid JSON at {} byte {}: not valid UTF-8", label, bad);
  }
  Value v;
  FP8_RETURN_IF_ERROR(Parser(text, label).parse(v));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Writer

std::string quote(std::string_view s) {
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

namespace {

std::string write_double(double d) {
  if (!std::isfinite(d)) return "null";
  std::string s = fmt::format("{}", d);  // shortest round-trip form
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

// Short arrays and objects of scalars (shapes, offsets, small records) stay on one line when
// pretty-printing; strings count as scalars only while short.
bool is_flat(const Value& v) {
  auto scalar = [](const Value& x) {
    return !x.is_array() && !x.is_object() && (!x.is_string() || x.as_string().size() <= 48);
  };
  if (v.is_array())
    return v.items().size() <= 16 && std::all_of(v.items().begin(), v.items().end(), scalar);
  if (!v.is_object() || v.members().size() > 8) return false;
  for (const auto& [k, x] : v.members()) {
    if (!scalar(x)) return false;
  }
  return true;
}

void write_to(std::string& out, const Value& v, int indent, int level) {
  const bool pretty = indent >= 0 && !is_flat(v);
  auto newline = [&](int lvl) {
    if (pretty) out += "\n" + std::string(size_t(indent) * lvl, ' ');
  };
  switch (v.kind()) {
    case Value::Kind::kNull:
      out += "null";
      return;
    case Value::Kind::kBool:
      out += v.as_bool() ? "true" : "false";
      return;
    case Value::Kind::kInt:
      out += std::to_string(v.as_int());
      return;
    case Value::Kind::kDouble:  // a parsed or exact token is written as it was
      out += v.number_text().empty() ? write_double(v.as_double()) : v.number_text();
      return;
    case Value::Kind::kString:
      out += quote(v.as_string());
      return;
    case Value::Kind::kArray:
      out += '[';
      for (size_t i = 0; i < v.items().size(); ++i) {
        out += i ? (pretty ? "," : (indent >= 0 ? ", " : ",")) : "";
        newline(level + 1);
        write_to(out, v.items()[i], indent, level + 1);
      }
      if (!v.items().empty()) newline(level);
      out += ']';
      return;
    case Value::Kind::kObject:
      out += '{';
      for (size_t i = 0; i < v.members().size(); ++i) {
        out += i ? (indent >= 0 && !pretty ? ", " : ",") : "";
        newline(level + 1);
        out += quote(v.members()[i].first) + (indent >= 0 ? ": " : ":");
        write_to(out, v.members()[i].second, indent, level + 1);
      }
      if (!v.members().empty()) newline(level);
      out += '}';
      return;
  }
}

}  // namespace

std::string write(const Value& v, int indent) {
  std::string out;
  write_to(out, v, indent, 0);
  return out;
}

}  // namespace fp8pipe::json
