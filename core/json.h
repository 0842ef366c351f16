// A small JSON module: a document tree (null, bool, exact int64, double, string, array, object),
// a strict RFC 8259 parser whose errors point at a byte, and a writer with proper escaping. Used
// by the safetensors header and the checkpoint manifest; integers are never routed through double.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/status.h"

namespace fp8pipe::json {

class Value {
 public:
  enum class Kind { kNull, kBool, kInt, kDouble, kString, kArray, kObject };
  using Member = std::pair<std::string, Value>;

  Value() = default;  // null
  Value(std::nullptr_t) {}
  Value(bool b) : kind_(Kind::kBool), bool_(b) {}
  // Integers are exact; an unsigned value above INT64_MAX is kept as its decimal token (a kDouble
  // whose number_text() is exact: get_u64() and write() use it).
  template <typename T,
            typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>>>
  Value(T v) : kind_(Kind::kInt), int_(static_cast<int64_t>(v)) {
    if constexpr (std::is_unsigned_v<T>) {
      if (uint64_t(v) > uint64_t(INT64_MAX)) {
        kind_ = Kind::kDouble;
        double_ = static_cast<double>(v);
        text_ = std::to_string(uint64_t(v));
      }
    }
  }
  Value(double d) : kind_(Kind::kDouble), double_(d) {}
  Value(std::string s) : kind_(Kind::kString), text_(std::move(s)) {}
  Value(std::string_view s) : Value(std::string(s)) {}
  Value(const char* s) : Value(std::string(s)) {}
  static Value array() { return Value(Kind::kArray); }
  static Value object() { return Value(Kind::kObject); }

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::kNull; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kDouble; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_array() const { return kind_ == Kind::kArray; }
  bool is_object() const { return kind_ == Kind::kObject; }

  bool as_bool() const { return bool_; }
  int64_t as_int() const { return int_; }  // kInt only
  double as_double() const { return kind_ == Kind::kInt ? double(int_) : double_; }
  const std::string& as_string() const { return text_; }  // kString only
  // A parsed number's token as written ("1e3", "18446744073709551615"); empty if constructed.
  const std::string& number_text() const { return kind_ == Kind::kString ? kEmpty : text_; }
  // Exact unsigned integer: digits only (no sign, fraction or exponent), fits in 64 bits.
  bool get_u64(uint64_t* out) const;

  const std::vector<Value>& items() const { return items_; }
  std::vector<Value>& items() { return items_; }
  // In document order; the parser keeps duplicate keys (callers that care check for them).
  const std::vector<Member>& members() const { return members_; }
  std::vector<Member>& members() { return members_; }
  // The first member named `key`, or nullptr (also for non-objects).
  const Value* find(std::string_view key) const;

  Value& push_back(Value v);             // arrays
  Value& set(std::string key, Value v);  // objects: replaces an existing key, else appends
  size_t pos() const { return pos_; }    // byte offset of a parsed value in its text

 private:
  friend class Parser;
  explicit Value(Kind k) : kind_(k) {}
  static const std::string kEmpty;

  Kind kind_ = Kind::kNull;
  bool bool_ = false;
  int64_t int_ = 0;
  double double_ = 0;
  std::string text_;  // string contents, or a parsed number's token
  std::vector<Value> items_;
  std::vector<Member> members_;
  size_t pos_ = 0;
};

// Parses exactly one value (surrounded only by whitespace). Integers that fit int64 become kInt
// (exact); other numbers kDouble with their token kept (number_text()). The text must be valid
// UTF-8; nesting is limited to 64 levels. Errors read "invalid JSON at <label> byte N: what".
Result<Value> parse(std::string_view text, std::string_view label = "input");

// Writes `v` compactly (indent < 0) or pretty-printed with `indent` spaces per level. Doubles are
// written in the shortest form that reads back bitwise (always with '.' or 'e', so they stay
// doubles); non-finite doubles, which JSON cannot express, are written as null.
std::string write(const Value& v, int indent = -1);

// A JSON string literal for `s`, quotes included: ", \ and control characters escaped.
std::string quote(std::string_view s);

// RFC 3629 UTF-8 check (no overlongs, surrogates or code points above U+10FFFF): the offset of
// the first bad byte, or std::string_view::npos.
size_t find_bad_utf8(std::string_view s);

}  // namespace fp8pipe::json
