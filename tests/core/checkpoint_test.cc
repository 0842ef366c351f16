// Tests of checkpoints (core/checkpoint.h) and the JSON module under the manifest: bitwise round
// trips, retention, the COMMITTED rule, corruption reported by file name, checksums against an
// independent zlib crc32, re-slicing by global name across shards, async saves and a mid-save
// crash.
#include "core/checkpoint.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "core/json.h"
#include "tests/test_files.h"

namespace fp8pipe::ckpt {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir() { return fp8pipe::testing::temp_dir("ckpt"); }
using fp8pipe::testing::read_file;

void write_bytes(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream(p, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

// A model-like state: two fp32 params, their bf16 moments, a router bias. Buffers are kept here
// so slices can borrow them.
struct FakeState {
  std::map<std::string, std::vector<uint8_t>> bufs;
  std::vector<Slice> slices;

  void add(const std::string& name, Kind kind, const std::string& dtype, std::vector<int64_t> shape,
           uint32_t seed) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    auto& b = bufs[name] = random_bytes(size_t(n) * safetensors::dtype_size(dtype), seed);
    slices.push_back({name, kind, dtype, std::move(shape), 0, n, 0, b, nullptr});
  }
};

FakeState fake_state(uint32_t seed) {
  FakeState s;
  s.add("embed.weight", Kind::kParam, "F32", {16, 8}, seed);
  s.add("layers.0.attn.wq.weight", Kind::kParam, "F32", {8, 8}, seed + 1);
  s.add("embed.weight.exp_avg", Kind::kExpAvg, "BF16", {16, 8}, seed + 2);
  s.add("embed.weight.exp_avg_sq", Kind::kExpAvgSq, "BF16", {16, 8}, seed + 3);
  s.add("layers.0.attn.wq.weight.exp_avg", Kind::kExpAvg, "BF16", {8, 8}, seed + 4);
  s.add("layers.0.attn.wq.weight.exp_avg_sq", Kind::kExpAvgSq, "BF16", {8, 8}, seed + 5);
  s.add("layers.1.ffn.bias", Kind::kRouterBias, "F32", {8}, seed + 6);
  return s;
}

SaveRequest request(int64_t step, const FakeState& s) {
  SaveRequest r;
  r.step = step;
  r.tokens_seen = step * 2048;
  r.optimizer_step = step - 1;
  r.skipped_steps = 1;
  r.config = "train {\n  steps: 12\n}\n";
  r.rank = {0, 0, 0, step, 1234, step, 1};
  r.slices = s.slices;
  return r;
}

Options options(const fs::path& root, int keep_last = 0, int64_t keep_every = 0) {
  return {root.string(), keep_last, keep_every, false};
}

// Writes a 2-rank checkpoint at `step`: each tensor of `s` split at `cut(numel)` between ranks.
void save_two_ranks(const fs::path& root, int64_t step, const FakeState& s) {
  const fs::path dir = root / step_dir_name(step);
  fs::create_directories(dir);
  SaveRequest req = request(step, s);
  req.topology = {1, 2, 1, 2};
  std::vector<RankFile> files;
  for (int rank = 0; rank < 2; ++rank) {
    SaveRequest r = req;
    r.rank.rank = r.rank.dp_rank = rank;
    r.slices.clear();
    for (const Slice& sl : s.slices) {
      const int64_t cut = sl.end * 5 / 11, b = rank ? cut : 0, e = rank ? sl.end : cut;
      const size_t es = safetensors::dtype_size(sl.dtype);
      r.slices.push_back({sl.name, sl.kind, sl.dtype, sl.shape, b, e, 0,
                          sl.bytes.subspan(size_t(b) * es, size_t(e - b) * es), nullptr});
    }
    auto rf = write_rank_file(dir.string(), r);
    ASSERT_TRUE(rf.ok()) << rf.status().to_string();
    files.push_back(std::move(*rf));
  }
  ASSERT_TRUE(commit(root.string(), req, std::move(files)).ok());
}

// Every tensor of `s` read back from `dir` equals the original bytes.
void expect_same(const std::string& dir, const FakeState& s) {
  auto m = verify(dir);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  auto l = Loaded::open(dir, std::move(*m));
  ASSERT_TRUE(l.ok()) << l.status().to_string();
  for (const Slice& sl : s.slices) {
    std::vector<uint8_t> got(sl.bytes.size());
    ASSERT_TRUE(l->read(sl.name, sl.dtype, 0, sl.end, got.data()).ok()) << sl.name;
    EXPECT_EQ(0, std::memcmp(got.data(), s.bufs.at(sl.name).data(), got.size())) << sl.name;
  }
}

std::string resolve_error(const fs::path& root, bool fallback = false) {
  auto r = resolve(root.string(), "", fallback);
  return r.ok() ? std::string() : r.status().message();
}

int64_t resolved_step(const fs::path& root, bool fallback = false) {
  auto r = resolve(root.string(), "", fallback);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() && r->has_value() ? (*r)->manifest.step : -1;
}

TEST(CheckpointTest, SaveLoadRoundTripIsBitwise) {
  const fs::path root = temp_dir();
  const FakeState s = fake_state(7);
  ASSERT_TRUE(save(options(root), request(100, s)).ok());
  EXPECT_TRUE(fs::exists(root / "step_00000100" / "COMMITTED"));
  EXPECT_EQ(read_file(root / "latest"), (std::vector<uint8_t>{'s', 't', 'e', 'p', '_', '0', '0',
                                                              '0', '0', '0', '1', '0', '0', '\n'}));
  auto r = resolve(root.string(), "", false);
  ASSERT_TRUE(r.ok() && r->has_value()) << r.status().to_string();
  const Manifest& m = (*r)->manifest;
  EXPECT_EQ(m.step, 100);
  EXPECT_EQ(m.tokens_seen, 100 * 2048);
  EXPECT_EQ(m.optimizer_step, 99);
  EXPECT_EQ(m.skipped_steps, 1);
  EXPECT_EQ(m.config, "train {\n  steps: 12\n}\n");
  ASSERT_EQ(m.ranks.size(), 1u);
  EXPECT_EQ(m.ranks[0].data_step, 100);
  EXPECT_EQ(m.ranks[0].rng_seed, 1234u);
  EXPECT_EQ(m.tensors.size(), s.slices.size());
  EXPECT_EQ(m.find("embed.weight.exp_avg")->kind, Kind::kExpAvg);
  expect_same((*r)->step_dir, s);
  // Named resume: by number, by dir name, by path.
  for (const std::string& which :
       std::vector<std::string>{"100", "step_00000100", (root / "step_00000100").string()}) {
    auto n = resolve(root.string(), which, false);
    ASSERT_TRUE(n.ok() && n->has_value()) << which << ": " << n.status().to_string();
  }
}

TEST(CheckpointTest, ShardFilesAreSelfDescribingSafetensors) {
  const fs::path root = temp_dir();
  const FakeState s = fake_state(1);
  save_two_ranks(root, 4, s);
  auto r = safetensors::Reader::open((root / "step_00000004" / "rank_00001.safetensors").string());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const auto* t = r->find("embed.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{128 - 58}));  // a partial slice is stored 1-D
  auto meta = json::parse(r->metadata().at("slice:embed.weight"));
  ASSERT_TRUE(meta.ok()) << meta.status().to_string();
  EXPECT_EQ(json::write(*meta),
            R"({"shape":[16,8],"begin":58,"end":128,"kind":"param","replica":0})");
}

TEST(CheckpointTest, ManifestCrcMatchesZlibCrcOfTheFile) {
  const fs::path root = temp_dir();
  ASSERT_TRUE(save(options(root), request(3, fake_state(3))).ok());
  const fs::path dir = root / "step_00000003";
  const std::vector<uint8_t> bytes = read_file(dir / "rank_00000.safetensors");
  const uLong crc = ::crc32(::crc32(0L, Z_NULL, 0), bytes.data(), uInt(bytes.size()));
  const std::vector<uint8_t> text = read_file(dir / "manifest.json");
  auto m = Manifest::from_json(std::string(text.begin(), text.end()), "manifest.json");
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  ASSERT_EQ(m->files.size(), 1u);
  EXPECT_EQ(m->files[0].file, "rank_00000.safetensors");
  EXPECT_EQ(m->files[0].crc32, uint32_t(crc));
  EXPECT_EQ(m->files[0].bytes, bytes.size());
}

TEST(CheckpointTest, RetentionRules) {
  using V = std::vector<int64_t>;
  auto c = [](int64_t s) { return StepDir{s, true}; };
  auto u = [](int64_t s) { return StepDir{s, false}; };
  // keep_last 2 plus multiples of 4.
  EXPECT_EQ(retention_deletions({c(2), c(4), c(6), c(8), c(10), c(12)}, 2, 4),
            (V{2, 6}));  // 10 is within keep_last, 4 and 8 are multiples
  // 0 = keep all; uncommitted older than the newest committed go, newer ones (in flight) stay.
  EXPECT_EQ(retention_deletions({c(2), u(3), c(4), u(5)}, 0, 0), (V{3}));
  // The newest committed step is never deleted, whatever the settings.
  EXPECT_EQ(retention_deletions({c(3), u(9)}, 1, 5), V{});
  EXPECT_EQ(retention_deletions({c(1), c(2), c(3)}, 1, 0), (V{1, 2}));
  // Nothing committed: nothing is deleted (the uncommitted may be all there is).
  EXPECT_EQ(retention_deletions({u(1), u(2)}, 1, 0), V{});

  // On disk, applied after every commit.
  const fs::path root = temp_dir();
  const FakeState s = fake_state(2);
  fs::create_directories(root / "step_00000001");  // a crashed save, older than what follows
  for (int64_t step = 2; step <= 10; ++step)
    ASSERT_TRUE(save(options(root, 2, 4), request(step, s)).ok());
  std::vector<int64_t> left;
  for (const StepDir& d : list_step_dirs(root.string())) left.push_back(d.step);
  EXPECT_EQ(left, (V{4, 8, 9, 10}));
}

TEST(CheckpointTest, MissingCommittedMarkerIsIgnored) {
  const fs::path root = temp_dir();
  const FakeState s4 = fake_state(4), s8 = fake_state(8);
  ASSERT_TRUE(save(options(root), request(4, s4)).ok());
  ASSERT_TRUE(save(options(root), request(8, s8)).ok());
  fs::remove(root / "step_00000008" / "COMMITTED");
  EXPECT_EQ(resolved_step(root), 4);  // no --fallback needed: step 8 never committed
  expect_same((root / "step_00000004").string(), s4);
  // Asked for by name, an uncommitted checkpoint is an error, not a silent substitute.
  auto named = resolve(root.string(), "8", false);
  ASSERT_FALSE(named.ok());
  EXPECT_NE(named.status().message().find("not committed"), std::string::npos);
  // Nothing committed at all: a fresh start (nullopt), not an error.
  const fs::path empty = temp_dir() / "none";
  auto none = resolve(empty.string(), "", false);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST(CheckpointTest, CorruptionIsReportedByFileName) {
  const fs::path root = temp_dir();
  const FakeState s4 = fake_state(4), s8 = fake_state(8);
  save_two_ranks(root, 4, s4);
  const fs::path shard = root / "step_00000008" / "rank_00001.safetensors";
  struct Case {
    const char* what;
    std::function<void()> damage;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"flipped byte",
       [&] {
         auto b = read_file(shard);
         b[b.size() / 2] ^= 0x10;
         write_bytes(shard, b);
       },
       {"rank_00001.safetensors", "crc32", "manifest says", "corrupted"}},
      {"truncated",
       [&] {
         auto b = read_file(shard);
         b.resize(b.size() - 3);
         write_bytes(shard, b);
       },
       {"rank_00001.safetensors", "size", "truncated"}},
      {"missing", [&] { fs::remove(shard); }, {"rank_00001.safetensors", "missing"}},
      {"edited manifest",
       [&] {
         const fs::path mf = shard.parent_path() / "manifest.json";
         auto b = read_file(mf);
         b[b.size() / 2] = b[b.size() / 2] == ' ' ? '\t' : ' ';
         write_bytes(mf, b);
       },
       {"manifest.json", "COMMITTED says crc32"}},
  };
  for (const Case& c : cases) {
    save_two_ranks(root, 8, s8);
    expect_same((root / "step_00000008").string(), s8);
    c.damage();
    const std::string msg = resolve_error(root);
    ASSERT_FALSE(msg.empty()) << c.what;
    for (const std::string& n : c.needles)
      EXPECT_NE(msg.find(n), std::string::npos) << c.what << ": '" << n << "' not in: " << msg;
    EXPECT_EQ(msg.find("rank_00000"), std::string::npos) << c.what << ": " << msg;
    auto hinted = resolve(root.string(), "", false);
    EXPECT_NE(hinted.status().hint().find("--fallback"), std::string::npos);
    EXPECT_EQ(resolved_step(root, /*fallback=*/true), 4) << c.what;
    fs::remove_all(root / "step_00000008");
  }
}

TEST(CheckpointTest, ReslicesByGlobalNameAcrossShards) {
  const fs::path root = temp_dir();
  const FakeState s = fake_state(11);
  save_two_ranks(root, 6, s);
  auto m = verify((root / "step_00000006").string());
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->topology, (Topology{1, 2, 1, 2}));
  EXPECT_EQ(m->find("embed.weight")->shards.size(), 2u);
  auto l = Loaded::open((root / "step_00000006").string(), std::move(*m));
  ASSERT_TRUE(l.ok()) << l.status().to_string();
  // Whole tensors, and pieces straddling the rank boundary (58 for 128 elements, 29 for 64).
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 128},  {50, 70},   {58, 59}, {0, 58},
                                                           {57, 128}, {127, 128}, {10, 10}};
  for (const auto& [b, e] : ranges) {
    for (const char* name : {"embed.weight", "embed.weight.exp_avg_sq"}) {
      const Slice& sl = *std::find_if(s.slices.begin(), s.slices.end(),
                                      [&](const Slice& x) { return x.name == name; });
      const size_t es = safetensors::dtype_size(sl.dtype);
      std::vector<uint8_t> got(size_t(e - b) * es);
      ASSERT_TRUE(l->read(name, sl.dtype, b, e, got.data()).ok()) << name;
      EXPECT_EQ(0, std::memcmp(got.data(), s.bufs.at(name).data() + b * es, got.size()))
          << name << " [" << b << ", " << e << ")";
    }
  }
  std::vector<uint8_t> buf(1024);
  EXPECT_FALSE(l->read("embed.weight", "BF16", 0, 4, buf.data()).ok());   // wrong dtype
  EXPECT_FALSE(l->read("embed.weight", "F32", 0, 129, buf.data()).ok());  // out of range
  EXPECT_EQ(l->read("nope", "F32", 0, 1, buf.data()).code(), Code::kNotFound);
}

TEST(CheckpointTest, CommitRefusesIncompleteCoverage) {
  const fs::path root = temp_dir();
  FakeState s = fake_state(5);
  SaveRequest req = request(2, s);
  req.slices.resize(1);
  req.slices[0].end = 100;  // embed.weight has 128 elements
  req.slices[0].bytes = req.slices[0].bytes.first(400);
  fs::create_directories(root / "step_00000002");
  auto rf = write_rank_file((root / "step_00000002").string(), req);
  ASSERT_TRUE(rf.ok()) << rf.status().to_string();
  Status st = commit(root.string(), req, {*rf});
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("tensor 'embed.weight' replica 0: shards cover [0, 100) of 128"),
            std::string::npos)
      << st.message();
  EXPECT_FALSE(fs::exists(root / "step_00000002" / "COMMITTED"));
}

TEST(CheckpointTest, ManifestJsonRoundTripAndStrictness) {
  Manifest m;
  m.step = 5;
  m.config = "a: \"b\"\n\t\x01";
  m.topology = {2, 4, 8, 8};
  m.ranks.push_back({3, 1, 1, 5, 18446744073709551615ull, 5, 0});
  m.files.push_back({"rank_00003.safetensors", 3, 1ull << 40, 0xffffffffu});
  m.tensors.push_back(
      {"w", Kind::kRouterBias, "F32", {4}, {{"rank_00003.safetensors", 3, 0, 4, 1}}});
  const std::string text = m.to_json();
  auto back = Manifest::from_json(text, "m.json");
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(back->to_json(), text);
  EXPECT_EQ(back->ranks[0].rng_seed, 18446744073709551615ull);
  EXPECT_EQ(back->files[0].bytes, 1ull << 40);
  std::string extra = text;
  extra.insert(1, "\"surprise\": 1,");
  auto bad = Manifest::from_json(extra, "m.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'surprise': unknown key"), std::string::npos);
}

TEST(CheckpointTest, AsyncSaveCopiesAndSurfacesErrorsLater) {
  const fs::path root = temp_dir();
  FakeState s = fake_state(9);
  const FakeState original = s;
  Checkpointer cp({root.string(), 0, 0, true});
  ASSERT_TRUE(cp.save(request(1, s)).ok());
  for (auto& [name, b] : s.bufs) std::fill(b.begin(), b.end(), 0xAB);  // training goes on
  ASSERT_TRUE(cp.finish().ok());
  expect_same((root / "step_00000001").string(), original);

  // A write that fails on the background thread is reported by the next save / finish.
  const fs::path file_root = root / "not_a_dir";
  write_bytes(file_root, {1});
  Checkpointer bad({file_root.string(), 0, 0, true});
  EXPECT_TRUE(bad.save(request(1, s)).ok());
  Status st = bad.finish();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("not_a_dir"), std::string::npos) << st.message();
  EXPECT_TRUE(bad.finish().ok());  // reported once
}

TEST(CheckpointDeathTest, CrashInSaveLeavesPreviousCheckpointInUse) {
  const fs::path root = temp_dir();
  const FakeState s4 = fake_state(4), s8 = fake_state(8);
  ASSERT_TRUE(save(options(root), request(4, s4)).ok());
  EXPECT_EXIT(
      {
        ::setenv("FP8PIPE_TEST_CRASH_IN_SAVE", "1", 1);
        (void)save(options(root), request(8, s8));
      },
      ::testing::ExitedWithCode(1), "");
  EXPECT_TRUE(fs::exists(root / "step_00000008" / "rank_00000.safetensors"));
  EXPECT_FALSE(fs::exists(root / "step_00000008" / "COMMITTED"));
  EXPECT_EQ(resolved_step(root), 4);
  expect_same((root / "step_00000004").string(), s4);
  // The next save at step 8 replaces the debris; the one after removes nothing it should keep.
  ASSERT_TRUE(save(options(root, 1), request(8, s8)).ok());
  expect_same((root / "step_00000008").string(), s8);
  EXPECT_FALSE(fs::exists(root / "step_00000004"));
}

TEST(JsonTest, ExactIntegersEscapesAndRoundTrip) {
  auto v = json::parse(R"({"a":9223372036854775807,"b":-9223372036854775808,)"
                       R"("c":18446744073709551615,"d":1.5e3,"e":"\u00e9\n","f":[true,null]})",
                       "t");
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->find("a")->as_int(), INT64_MAX);
  EXPECT_EQ(v->find("b")->as_int(), INT64_MIN);
  uint64_t u = 0;
  EXPECT_FALSE(v->find("c")->is_int());
  EXPECT_TRUE(v->find("c")->get_u64(&u));
  EXPECT_EQ(u, UINT64_MAX);
  EXPECT_EQ(v->find("d")->as_double(), 1500.0);
  EXPECT_EQ(v->find("e")->as_string(), "\u00e9\n");
  EXPECT_EQ(json::write(*v), R"({"a":9223372036854775807,"b":-9223372036854775808,)"
                             R"("c":18446744073709551615,"d":1.5e3,"e":"é\n","f":[true,null]})");
  EXPECT_EQ(json::write(json::Value(0.1)), "0.1");
  EXPECT_EQ(json::write(json::Value(2.0)), "2.0");
  EXPECT_EQ(json::quote("q\"\\\x1f"), R"("q\"\\\u001f")");
  auto bad = json::parse("[1,]", "x.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("invalid JSON at x.json byte 3"), std::string::npos)
      << bad.status().message();
}

}  // namespace
}  // namespace fp8pipe::ckpt
