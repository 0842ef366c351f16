// Tests of the safetensors reader and writer: round trips, metadata, alignment, atomic writes and
// every validation error (each must name the file and, where there is one, the tensor).
#include "core/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "tests/test_files.h"

namespace fp8pipe::safetensors {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir() { return fp8pipe::testing::temp_dir("st"); }
using fp8pipe::testing::read_file;

// A file image: u64le length, the header as given (not padded), then `data`.
std::vector<uint8_t> image(std::string_view header, std::vector<uint8_t> data = {},
                           uint64_t declared = UINT64_MAX) {
  const uint64_t n = declared == UINT64_MAX ? header.size() : declared;
  std::vector<uint8_t> out(8);
  for (int k = 0; k < 8; ++k) out[k] = static_cast<uint8_t>(n >> (8 * k));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// Parses an image and returns the error message ("" if it parsed).
std::string parse_error(const std::vector<uint8_t>& bytes) {
  auto r = Reader::parse(bytes, "mem.safetensors");
  return r.ok() ? std::string() : r.status().message();
}

std::vector<uint8_t> bytes_of(std::initializer_list<float> v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), std::data(v), b.size());
  return b;
}

TEST(SafetensorsTest, RoundTripTensorsAndMetadata) {
  const fs::path path = temp_dir() / "rt.safetensors";
  Writer w;
  const std::vector<uint8_t> f32 = bytes_of({1.f, -2.f, 3.5f, 0.f, 1e-30f, 7.f});
  std::vector<uint8_t> bf16 = {0x80, 0x3f, 0x00, 0x40, 0x40, 0x40};  // 1, 2, 3
  ASSERT_TRUE(w.add("layer.0.weight", "F32", {2, 3}, std::span<const uint8_t>(f32)).ok());
  ASSERT_TRUE(w.add("b\"ias\\\n\u00e9", "BF16", {3}, bf16).ok());
  ASSERT_TRUE(w.add("scalar", "F8_E4M3", {}, std::vector<uint8_t>{0x38}).ok());
  ASSERT_TRUE(w.add("empty", "I64", {0, 4}, std::vector<uint8_t>{}).ok());
  ASSERT_TRUE(w.add("mask", "BOOL", {1, 1, 3}, std::vector<uint8_t>{1, 0, 1}).ok());
  w.set_metadata("format", "pt");
  w.set_metadata("note \"quoted\"", "line\nbreak");
  ASSERT_TRUE(w.write(path.string()).ok());
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));

  auto r = Reader::open(path.string());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->tensors().size(), 5u);
  const char* order[] = {"layer.0.weight", "b\"ias\\\n\u00e9", "scalar", "empty", "mask"};
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(r->tensors()[i].name, order[i]);
  const TensorView* t = r->find("layer.0.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, "F32");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->numel(), 6);
  EXPECT_EQ(t->shape_str(), "[2, 3]");
  ASSERT_EQ(t->nbytes, f32.size());
  EXPECT_EQ(std::memcmp(t->data, f32.data(), f32.size()), 0);
  const TensorView* b = r->find("b\"ias\\\n\u00e9");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(std::vector<uint8_t>(b->data, b->data + b->nbytes), bf16);
  EXPECT_EQ(r->find("scalar")->numel(), 1);
  EXPECT_EQ(r->find("scalar")->data[0], 0x38);
  EXPECT_EQ(r->find("empty")->nbytes, 0u);
  EXPECT_EQ(r->find("mask")->shape, (std::vector<int64_t>{1, 1, 3}));
  EXPECT_EQ(r->metadata().at("format"), "pt");
  EXPECT_EQ(r->metadata().at("note \"quoted\""), "line\nbreak");
  EXPECT_EQ(r->find("nope"), nullptr);
  auto missing = r->get("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("rt.safetensors"), std::string::npos);
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
}

TEST(SafetensorsTest, HeaderIsSpacePaddedToEightBytes) {
  const fs::path dir = temp_dir();
  for (int len = 1; len <= 9; ++len) {
    Writer w;
    ASSERT_TRUE(w.add(std::string(len, 'x'), "U8", {3}, std::vector<uint8_t>{1, 2, 3}).ok());
    const std::string h = w.header();
    EXPECT_EQ(h.size() % 8, 0u) << h;
    EXPECT_EQ(h[h.find_last_not_of(' ')], '}') << h;
    const fs::path p = dir / fmt::format("a{}.safetensors", len);
    ASSERT_TRUE(w.write(p.string()).ok());
    const auto bytes = read_file(p);
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | bytes[k];
    EXPECT_EQ(n, h.size());
    EXPECT_EQ((8 + n) % 8, 0u);  // data buffer starts aligned
    EXPECT_EQ(bytes.size(), 8 + n + 3);
    auto r = Reader::open(p.string());
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r->tensors()[0].data) % 8, 0u);
  }
}

TEST(SafetensorsTest, EmptyFileAndUnknownKeysAreAccepted) {
  Writer w;
  EXPECT_EQ(w.header(), "{}      ");
  EXPECT_EQ(parse_error(image("{}")), "");
  EXPECT_EQ(
      parse_error(image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"x":1}})", {1, 2})),
      "");
  // Offsets above 2^53 are compared exactly (here: out of range, reported to the byte).
  const std::string msg = parse_error(image(
      R"({"a":{"dtype":"U8","shape":[9007199254740993],"data_offsets":[0,9007199254740993]}})"));
  EXPECT_NE(msg.find("9007199254740993"), std::string::npos) << msg;
}

TEST(SafetensorsTest, JsonEscapesAreDecoded) {
  auto bytes = image(
      R"({"a\u00e9\ud83d\ude00\/\t\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} )", {9});
  auto r = Reader::parse(bytes, "mem");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->tensors()[0].name, "a\u00e9\U0001F600/\t\"");
}

TEST(SafetensorsTest, WriterRejectsBadTensors) {
  Writer w;
  ASSERT_TRUE(w.add("a", "F32", {1}, bytes_of({1.f})).ok());
  EXPECT_FALSE(w.add("a", "F32", {1}, bytes_of({1.f})).ok());          // duplicate
  EXPECT_FALSE(w.add("b", "F32", {2}, bytes_of({1.f})).ok());          // size mismatch
  EXPECT_FALSE(w.add("c", "F12", {1}, std::vector<uint8_t>{0}).ok());  // unknown dtype
  EXPECT_FALSE(w.add("", "U8", {1}, std::vector<uint8_t>{0}).ok());    // empty name
  EXPECT_FALSE(w.add("__metadata__", "U8", {1}, std::vector<uint8_t>{0}).ok());
  EXPECT_FALSE(w.add("d", "U8", {-1}, std::vector<uint8_t>{}).ok());     // negative dim
  EXPECT_FALSE(w.add("\xff", "U8", {1}, std::vector<uint8_t>{0}).ok());  // not UTF-8
  EXPECT_EQ(w.size(), 1u);
}

TEST(SafetensorsTest, FailedWriteLeavesNoFile) {
  const fs::path dir = temp_dir();
  Writer w;
  ASSERT_TRUE(w.add("a", "U8", {1}, std::vector<uint8_t>{7}).ok());
  const fs::path bad = dir / "no_such_dir" / "x.safetensors";
  EXPECT_FALSE(w.write(bad.string()).ok());
  EXPECT_FALSE(fs::exists(bad));
  // Overwriting an existing file replaces it whole.
  const fs::path p = dir / "x.safetensors";
  { std::ofstream(p) << "old contents"; }
  ASSERT_TRUE(w.write(p.string()).ok());
  auto r = Reader::open(p.string());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->tensors()[0].data[0], 7);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(SafetensorsTest, TruncatedFilesNameTheFile) {
  const fs::path dir = temp_dir();
  Writer w;
  ASSERT_TRUE(w.add("w", "F32", {4}, bytes_of({1.f, 2.f, 3.f, 4.f})).ok());
  const fs::path p = dir / "t.safetensors";
  ASSERT_TRUE(w.write(p.string()).ok());
  const auto full = read_file(p);
  for (size_t keep : {size_t{0}, size_t{5}, size_t{20}, full.size() - 1}) {
    std::ofstream(p, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(full.data()), static_cast<std::streamsize>(keep));
    auto r = Reader::open(p.string());
    ASSERT_FALSE(r.ok()) << keep;
    EXPECT_NE(r.status().message().find(p.string()), std::string::npos) << r.status().message();
  }
  auto r = Reader::open((dir / "absent.safetensors").string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kIo);
}

// Each malformed image must be rejected with a message containing all of `needles`.
struct BadCase {
  const char* what;
  std::vector<uint8_t> bytes;
  std::vector<std::string> needles;
};

std::vector<BadCase> bad_cases() {
  const std::string a2 = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]})";
  return {
      {"shorter than 8 bytes", {1, 2, 3}, {"too short"}},
      {"header length past the end", image("{}", {}, 100), {"header length 100", "truncated"}},
      {"header length over the cap", image("{}", {}, 200'000'000), {"exceeds the 100000000"}},
      {"not an object", image("[1]"), {"does not start with '{'"}},
      {"empty header", image(""), {"does not start"}},
      {"unterminated object", image(R"({"a":{"dtype":"U8")"), {"invalid JSON", "expected ','"}},
      {"trailing comma", image(R"({"a":1,})"), {"invalid JSON", "quoted key"}},
      {"trailing garbage", image(a2 + "}x", {1, 2}), {"trailing characters"}},
      {"bad escape", image(R"({"a\q":1})"), {"invalid escape"}},
      {"control char", image("{\"a\tb\":1}"), {"control character"}},
      {"lone surrogate", image(R"({"\udc00":1})"), {"surrogate"}},
      {"invalid UTF-8", image("{\"\xc3\x28\":1}"), {"UTF-8"}},
      {"entry not object", image(R"({"a":5})"), {"tensor 'a'", "not a JSON object"}},
      {"missing field",
       image(R"({"a":{"dtype":"U8","shape":[0]}})"),
       {"tensor 'a'", "data_offsets"}},
      {"unknown dtype",
       image(R"({"w":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}})", {0}),
       {"tensor 'w'", "unknown dtype \"F12\""}},
      {"negative dim",
       image(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})"),
       {"tensor 'w'", "shape entry '-1'"}},
      {"fractional dim",
       image(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})"),
       {"tensor 'w'", "shape entry"}},
      {"shape/offset mismatch",
       image(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
             std::vector<uint8_t>(20)),
       {"tensor 'w'", "needs 24 bytes", "span 20"}},
      {"end before begin",
       image(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})"),
       {"tensor 'w'", "end before begin"}},
      {"offset out of range",
       image(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", {1, 2}),
       {"tensor 'w'", "out of range", "2 bytes"}},
      {"overlap",
       image(R"({"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
             R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
             {1, 2, 3, 4}),
       {"tensor 'b'", "overlap tensor 'a'"}},
      {"gap",
       image(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", {1, 2}),
       {"tensor 'a'", "without gaps"}},
      {"trailing data", image(a2 + "}", {1, 2, 3}), {"cover 2 bytes", "buffer is 3 bytes"}},
      {"duplicate name",
       image(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
             R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
             {1, 2}),
       {"duplicate tensor name 'a'"}},
      {"metadata not strings", image(R"({"__metadata__":{"k":1}})"), {"__metadata__", "'k'"}},
      {"metadata twice", image(R"({"__metadata__":{},"__metadata__":{}})"), {"duplicate"}},
  };
}

TEST(SafetensorsTest, ValidationErrorsNameFileAndTensor) {
  for (const BadCase& c : bad_cases()) {
    const std::string msg = parse_error(c.bytes);
    ASSERT_FALSE(msg.empty()) << c.what << ": accepted";
    EXPECT_NE(msg.find("mem.safetensors"), std::string::npos) << c.what << ": " << msg;
    for (const std::string& n : c.needles) {
      EXPECT_NE(msg.find(n), std::string::npos) << c.what << ": '" << n << "' not in: " << msg;
    }
  }
}

TEST(SafetensorsTest, ReadsTensorsInOffsetOrderWhateverTheHeaderOrder) {
  // The reference writer may list tensors in any order; views follow the data buffer.
  const auto bytes = image(R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                           R"("a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                           {1, 2, 3});
  auto r = Reader::parse(bytes, "mem");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->tensors().size(), 2u);
  EXPECT_EQ(r->tensors()[0].name, "a");
  EXPECT_EQ(r->find("b")->data[0], 3);
  EXPECT_EQ(r->header_bytes(), bytes.size() - 8 - 3);
}

TEST(SafetensorsTest, DtypeSizes) {
  EXPECT_EQ(dtype_size("F64"), 8u);
  EXPECT_EQ(dtype_size("BF16"), 2u);
  EXPECT_EQ(dtype_size("F8_E4M3"), 1u);
  EXPECT_EQ(dtype_size("F8_E5M2"), 1u);
  EXPECT_EQ(dtype_size("BOOL"), 1u);
  EXPECT_EQ(dtype_size("f32"), 0u);
  EXPECT_EQ(json_quote("a\"b\\c\x01"), "\"a\\\"b\\\\c\\u0001\"");
}

}  // namespace
}  // namespace fp8pipe::safetensors
