// Data layer (core/data.h): the synthetic chain's entropy rate against sampled paths, determinism
// and rank slicing of batches, flat and Megatron file round trips, Megatron header validation, a
// Megatron pair from an independent Python writer (tests/scripts/megatron_py.py), byte
// tokenization.
#include "core/data.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <set>
#include <string>
#include <vector>

namespace fp8pipe::data {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path p = fs::path(::testing::TempDir()) / ("fp8pipe_data_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size());
}

std::string run_capture(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    *rc = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  *rc = pclose(p);
  return out;
}

bool have_python() { return std::system("python3 -c 'import struct, json' >/dev/null 2>&1") == 0; }

const std::string kPy = std::string(FP8PIPE_SOURCE_DIR) + "/tests/scripts/megatron_py.py";

// ---------------------------------------------------------------------------------------------
// Synthetic Markov chain

TEST(MarkovChain, TablesAndStationaryFixedPoint) {
  for (auto [V, k] :
       std::vector<std::pair<int, int>>{{64, 4}, {257, 16}, {10, 10}, {50, 1}, {1000, 2}}) {
    auto m = SyntheticMarkov::create(V, k, 7).value();
    double total = 0;
    for (int32_t s = 0; s < V; ++s) {
      const auto succ = m->successors(s);
      EXPECT_EQ(std::set<int32_t>(succ.begin(), succ.end()).size(), static_cast<size_t>(k));
      double ps = 0;
      for (double p : m->probs(s)) {
        EXPECT_GT(p, 0.0);
        ps += p;
      }
      EXPECT_NEAR(ps, 1.0, 1e-12);
      EXPECT_GT(m->stationary()[s], 0.0);
      total += m->stationary()[s];
    }
    EXPECT_NEAR(total, 1.0, 1e-12);
    EXPECT_LT(m->stationary_residual(), 1e-12) << V << "x" << k;
    EXPECT_GE(m->entropy_rate(), 0.0);
    EXPECT_LE(m->entropy_rate(), std::log(static_cast<double>(k)) + 1e-12);
    EXPECT_GE(m->stationary_entropy(), m->entropy_rate());
  }
  auto cycle = SyntheticMarkov::create(50, 1, 3).value();  // a deterministic cycle
  EXPECT_EQ(cycle->entropy_rate(), 0.0);
  EXPECT_NEAR(cycle->stationary_entropy(), std::log(50.0), 1e-12);
}

// The mean of -log P(x[t+1] | x[t]) over a sequence started in π has expectation exactly H
// (stationarity). Independent sequences give iid per-sequence means, so the CLT gives the
// standard error sd/sqrt(N) without assumptions about mixing; we allow 5 standard errors.
TEST(MarkovChain, EmpiricalEntropyMatchesEntropyRate) {
  auto m = SyntheticMarkov::create(64, 4, 11).value();
  const int N = 4000, L = 128;
  std::vector<int32_t> seq(L);
  std::vector<double> means(N);
  std::vector<int64_t> counts(64 * 64, 0);
  for (int i = 0; i < N; ++i) {
    ASSERT_TRUE(m->sequence(5, i, L, seq.data()).ok());
    double nll = 0;
    for (int t = 0; t + 1 < L; ++t) {
      const double p = m->prob(seq[t], seq[t + 1]);
      ASSERT_GT(p, 0.0) << "sampled a transition outside the chain";
      nll -= std::log(p);
      ++counts[seq[t] * 64 + seq[t + 1]];
    }
    means[i] = nll / (L - 1);
  }
  const double mean = std::accumulate(means.begin(), means.end(), 0.0) / N;
  double var = 0;
  for (double x : means) var += (x - mean) * (x - mean);
  const double se = std::sqrt(var / (N - 1) / N);
  EXPECT_LT(se, 0.01 * m->entropy_rate());  // the test has power
  EXPECT_NEAR(mean, m->entropy_rate(), 5 * se) << "se " << se;

  // Plug-in estimator of H(X[t+1] | X[t]) from the transition counts: biased low by about
  // (k - 1)·V / (2·transitions) (Miller-Madow); allow that plus 5 standard errors.
  const double n_tr = static_cast<double>(N) * (L - 1);
  double plug = 0;
  for (int s = 0; s < 64; ++s) {
    double ns = 0;
    for (int t = 0; t < 64; ++t) ns += counts[s * 64 + t];
    for (int t = 0; t < 64; ++t) {
      const double c = counts[s * 64 + t];
      if (c > 0) plug -= c / n_tr * std::log(c / ns);
    }
  }
  EXPECT_NEAR(plug, m->entropy_rate(), 5 * se + 3.0 * 64 / (2 * n_tr));
}

// Every position of a sequence is distributed as π: check position 0 and 64 over iid sequences,
// each state's frequency within 5 binomial standard deviations.
TEST(MarkovChain, PositionMarginalsAreStationary) {
  auto m = SyntheticMarkov::create(32, 3, 2).value();
  const int N = 20000, L = 65;
  std::vector<int64_t> c0(32, 0), c64(32, 0);
  std::vector<int32_t> seq(L);
  for (int i = 0; i < N; ++i) {
    ASSERT_TRUE(m->sequence(9, i, L, seq.data()).ok());
    ++c0[seq[0]];
    ++c64[seq[64]];
  }
  for (int s = 0; s < 32; ++s) {
    const double pi = m->stationary()[s], sd = std::sqrt(pi * (1 - pi) / N);
    EXPECT_NEAR(static_cast<double>(c0[s]) / N, pi, 5 * sd) << "state " << s;
    EXPECT_NEAR(static_cast<double>(c64[s]) / N, pi, 5 * sd) << "state " << s;
  }
}

TEST(MarkovChain, LossFloor) {
  auto m = SyntheticMarkov::create(128, 4, 1).value();
  const double H = m->entropy_rate(), Hpi = m->stationary_entropy();
  EXPECT_GT(Hpi, H);
  EXPECT_DOUBLE_EQ(m->loss_floor(256), H);
  EXPECT_DOUBLE_EQ(m->loss_floor(256, true), (255 * H + Hpi) / 256);
  EXPECT_DOUBLE_EQ(m->loss_floor(1, true), Hpi);
}

TEST(MarkovChain, DeterministicRandomAccess) {
  auto a = SyntheticMarkov::create(100, 4, 42).value();
  auto b = SyntheticMarkov::create(100, 4, 42).value();
  auto c = SyntheticMarkov::create(100, 4, 43).value();
  EXPECT_EQ(a->entropy_rate(), b->entropy_rate());
  EXPECT_NE(a->entropy_rate(), c->entropy_rate());
  std::vector<int32_t> x(300), y(300), z(300);
  ASSERT_TRUE(a->sequence(1, 77, 300, x.data()).ok());
  ASSERT_TRUE(b->sequence(1, 77, 300, y.data()).ok());
  ASSERT_TRUE(c->sequence(1, 77, 300, z.data()).ok());
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
  // A prefix is the shorter sequence; read() crosses a block boundary consistently.
  ASSERT_TRUE(a->sequence(1, 77, 10, y.data()).ok());
  EXPECT_TRUE(std::equal(y.begin(), y.begin() + 10, x.begin()));
  const int64_t blk = SyntheticMarkov::kReadBlock;
  std::vector<int32_t> r(20), s0(blk), s1(10);
  ASSERT_TRUE(a->read(blk - 10, 20, r.data()).ok());
  ASSERT_TRUE(a->sequence(SyntheticMarkov::kReadStream, 0, blk, s0.data()).ok());
  ASSERT_TRUE(a->sequence(SyntheticMarkov::kReadStream, 1, 10, s1.data()).ok());
  EXPECT_TRUE(std::equal(r.begin(), r.begin() + 10, s0.end() - 10));
  EXPECT_TRUE(std::equal(r.begin() + 10, r.end(), s1.begin()));
}

TEST(MarkovChain, CreateErrors) {
  EXPECT_FALSE(SyntheticMarkov::create(1, 1, 0).ok());
  EXPECT_FALSE(SyntheticMarkov::create(10, 0, 0).ok());
  auto r = SyntheticMarkov::create(10, 11, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("branching 11"), std::string::npos);
  SourceSpec spec;
  spec.vocab_size = 16;
  spec.order = 2;
  EXPECT_EQ(open_source(spec).status().code(), Code::kUnimplemented);
  spec.source = "parquet";
  EXPECT_NE(open_source(spec).status().message().find("synthetic, tokens, megatron"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Batcher

TEST(Batcher, PermuteIndexIsAPermutation) {
  for (int64_t n : {1, 2, 3, 5, 17, 64, 100, 1000}) {
    std::vector<int> seen(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = permute_index(i, n, 12345 + n);
      ASSERT_GE(p, 0);
      ASSERT_LT(p, n);
      ++seen[p];
    }
    for (int x : seen) EXPECT_EQ(x, 1) << "n " << n;
  }
  int moved = 0;  // and it actually shuffles
  for (int64_t i = 0; i < 1000; ++i) moved += permute_index(i, 1000, 1) != i;
  EXPECT_GT(moved, 900);
}

TEST(Batcher, SyntheticDeterministicAndRankSlices) {
  auto m = SyntheticMarkov::create(64, 4, 3).value();
  const BatchSpec spec{8, 16, 99, 0.01, nullptr};
  auto b1 = Batcher::create(m, spec).value();
  auto b2 = Batcher::create(SyntheticMarkov::create(64, 4, 3).value(), spec).value();
  const auto full = b1.global_batch(Split::kTrain, 5).value();
  ASSERT_EQ(full.size(), 8u * 17);
  EXPECT_EQ(full, b2.global_batch(Split::kTrain, 5).value());
  // Ranks slice rows without producing the others; slices equal the rows of the full batch.
  for (auto [lo, hi] : std::vector<std::pair<int, int>>{{0, 2}, {2, 5}, {5, 8}, {7, 8}}) {
    const auto part = b2.rows(Split::kTrain, 5, lo, hi).value();
    EXPECT_TRUE(std::equal(part.begin(), part.end(), full.begin() + lo * 17)) << lo;
  }
  EXPECT_NE(full, b1.global_batch(Split::kTrain, 6).value());
  EXPECT_NE(full, b1.global_batch(Split::kHeldout, 5).value());
  auto other_seed = Batcher::create(m, {8, 16, 100, 0.01, nullptr}).value();
  EXPECT_NE(full, other_seed.global_batch(Split::kTrain, 5).value());
  // Row r of step s is sequence s * global_batch + r, whatever rank asks for it.
  EXPECT_EQ(b1.sample_of(Split::kTrain, 5, 3), 5 * 8 + 3);
}

// Tokens 0..N-1 make every window's content reveal its position.
std::shared_ptr<TokenFile> counting_file(const std::string& dir, int n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), 0);
  const std::string path = dir + "/count.bin";
  EXPECT_TRUE(write_token_file(path, t, TokenDType::kUInt32).ok());
  return TokenFile::open(path, TokenDType::kUInt32).value();
}

TEST(Batcher, FileWindowsEpochsAndHeldout) {
  auto f = counting_file(temp_dir("epochs"), 8 * 100 + 1);  // 100 windows of 8 targets
  auto b = Batcher::create(f, {9, 8, 5, 0.1, nullptr}).value();
  EXPECT_EQ(b.windows(Split::kTrain), 90);
  EXPECT_EQ(b.windows(Split::kHeldout), 10);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<int32_t> starts;
    for (int step = epoch * 10; step < epoch * 10 + 10; ++step) {
      const auto rows = b.global_batch(Split::kTrain, step).value();
      for (int r = 0; r < 9; ++r) {
        const int32_t* row = rows.data() + r * 9;
        for (int j = 0; j < 9; ++j) ASSERT_EQ(row[j], row[0] + j);
        EXPECT_EQ(row[0] % 8, 0);
        EXPECT_EQ(row[0] / 8, b.sample_of(Split::kTrain, step, r));
        starts.insert(row[0]);
      }
    }
    EXPECT_EQ(starts.size(), 90u) << "each train window once per epoch";
    EXPECT_EQ(*starts.rbegin(), 89 * 8);
  }
  EXPECT_NE(b.global_batch(Split::kTrain, 0).value(), b.global_batch(Split::kTrain, 10).value());
  std::set<int32_t> held;
  for (int step = 0; step < 10; ++step) {
    const auto rows = b.global_batch(Split::kHeldout, step).value();
    for (int r = 0; r < 9; ++r) held.insert(rows[r * 9]);
  }
  EXPECT_EQ(held.size(), 10u);
  EXPECT_EQ(*held.begin(), 90 * 8);  // held-out targets start after the last train target
}

TEST(Batcher, FileRankSlicesAndErrors) {
  const std::string dir = temp_dir("slices");
  auto f = counting_file(dir, 1000);
  auto b = Batcher::create(f, {6, 10, 1, 0.0, nullptr}).value();
  const auto full = b.global_batch(Split::kTrain, 123).value();
  std::vector<int32_t> joined;
  for (auto [lo, hi] : std::vector<std::pair<int, int>>{{0, 1}, {1, 4}, {4, 6}}) {
    const auto p = b.rows(Split::kTrain, 123, lo, hi).value();
    joined.insert(joined.end(), p.begin(), p.end());
  }
  EXPECT_EQ(joined, full);
  EXPECT_FALSE(b.global_batch(Split::kHeldout, 0).ok());  // heldout_fraction 0
  EXPECT_FALSE(b.rows(Split::kTrain, 0, 4, 7).ok());
  EXPECT_FALSE(
      Batcher::create(f, {6, 999, 1, 0.5, nullptr}).ok());  // one window, none left to train
  EXPECT_FALSE(Batcher::create(f, {6, 10, 1, 1.0, nullptr}).ok());
}

// ---------------------------------------------------------------------------------------------
// Flat token files

TEST(TokenFile, RoundTripsAndErrors) {
  const std::string dir = temp_dir("flat");
  const std::vector<int32_t> t = {0, 1, 65535, 7, 300, 2};
  for (TokenDType dt : {TokenDType::kUInt16, TokenDType::kUInt32}) {
    const std::string path = dir + "/t_" + dtype_name(dt) + ".bin";
    ASSERT_TRUE(write_token_file(path, t, dt).ok());
    EXPECT_EQ(fs::file_size(path), t.size() * dtype_size(dt));
    auto f = TokenFile::open(path, dt).value();
    EXPECT_EQ(f->size(), 6);
    EXPECT_EQ(f->vocab_size(), 65536);  // inferred
    std::vector<int32_t> out(4);
    ASSERT_TRUE(f->read(2, 4, out.data()).ok());
    EXPECT_EQ(out, std::vector<int32_t>(t.begin() + 2, t.end()));
    EXPECT_FALSE(f->read(3, 4, out.data()).ok());
  }
  auto small = TokenFile::open(dir + "/t_uint16.bin", TokenDType::kUInt16, 1000).value();
  std::vector<int32_t> out(6);
  auto st = small->read(0, 6, out.data());
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("token 2 is 65535"), std::string::npos) << st.message();
  EXPECT_FALSE(
      write_token_file(dir + "/x.bin", std::vector<int32_t>{70000}, TokenDType::kUInt16).ok());
  write_bytes(dir + "/odd.bin", {1, 2, 3});
  EXPECT_NE(TokenFile::open(dir + "/odd.bin", TokenDType::kUInt16)
                .status()
                .message()
                .find("not a multiple"),
            std::string::npos);
  EXPECT_EQ(TokenFile::open(dir + "/none.bin", TokenDType::kUInt16).status().code(),
            Code::kNotFound);
}

// ---------------------------------------------------------------------------------------------
// Megatron indexed datasets

using Docs = std::vector<std::vector<std::vector<int32_t>>>;  // documents of sequences

void expect_docs(const MegatronIndexed& m, const Docs& docs) {
  ASSERT_EQ(m.num_documents(), static_cast<int64_t>(docs.size()));
  std::vector<int32_t> all;
  for (size_t d = 0; d < docs.size(); ++d) {
    std::vector<int32_t> flat;
    for (const auto& s : docs[d]) flat.insert(flat.end(), s.begin(), s.end());
    EXPECT_EQ(m.document(d).value(), flat) << "document " << d;
    all.insert(all.end(), flat.begin(), flat.end());
  }
  ASSERT_EQ(m.size(), static_cast<int64_t>(all.size()));
  std::vector<int32_t> got(all.size());
  ASSERT_TRUE(m.read(0, m.size(), got.data()).ok());
  EXPECT_EQ(got, all);
  for (int64_t off = 0; off + 3 <= m.size(); ++off) {  // reads across sequence boundaries
    std::vector<int32_t> w(3);
    ASSERT_TRUE(m.read(off, 3, w.data()).ok());
    EXPECT_TRUE(std::equal(w.begin(), w.end(), all.begin() + off)) << off;
  }
}

const Docs kDocs = {{{1, 2, 3}, {4, 5}}, {}, {{6}}, {{7, 8, 9, 10}, {}, {11}}};

TEST(Megatron, WriterRoundTrip) {
  const std::string prefix = temp_dir("mwrite") + "/ds";
  auto w = TokenWriter::create(prefix, FileFormat::kMegatron, TokenDType::kUInt16).value();
  for (const auto& doc : kDocs) {
    for (const auto& s : doc) ASSERT_TRUE(w->add_sequence(s).ok());
    ASSERT_TRUE(w->end_document().ok());
  }
  ASSERT_TRUE(w->finish().ok());
  EXPECT_EQ(w->sequences(), 6);
  EXPECT_EQ(w->documents(), 4);
  auto m = MegatronIndexed::open(prefix).value();
  EXPECT_EQ(m->dtype(), TokenDType::kUInt16);
  EXPECT_EQ(m->num_sequences(), 6);
  EXPECT_EQ(m->vocab_size(), 12);
  EXPECT_EQ(m->document_span(3), (std::pair<int64_t, int64_t>{6, 11}));
  EXPECT_EQ(m->sequence_span(1), (std::pair<int64_t, int64_t>{3, 5}));
  expect_docs(*m, kDocs);
  EXPECT_FALSE(TokenWriter::create(prefix, FileFormat::kMegatron, TokenDType::kUInt32).ok());
}

std::string docs_json(const Docs& docs) {
  std::string s = "[";
  for (size_t d = 0; d < docs.size(); ++d) {
    s += d ? ",[" : "[";
    for (size_t i = 0; i < docs[d].size(); ++i) {
      s += i ? ",[" : "[";
      for (size_t j = 0; j < docs[d][i].size(); ++j) {
        s += (j ? "," : "") + std::to_string(docs[d][i][j]);
      }
      s += "]";
    }
    s += "]";
  }
  return s + "]";
}

TEST(Megatron, ReadsIndependentPythonWriter) {
  if (!have_python()) GTEST_SKIP() << "python3 not available";
  const std::string dir = temp_dir("mpy");
  for (int code : {1, 3, 4, 5, 8}) {
    const std::string prefix = dir + "/py" + std::to_string(code);
    int rc = 0;
    run_capture("python3 " + kPy + " write " + prefix + " " + std::to_string(code) + " '" +
                    docs_json(kDocs) + "'",
                &rc);
    ASSERT_EQ(rc, 0);
    auto m = MegatronIndexed::open(prefix);
    ASSERT_TRUE(m.ok()) << m.status().to_string();
    EXPECT_EQ(megatron_code(m.value()->dtype()), code);
    expect_docs(*m.value(), kDocs);
  }
}

TEST(Megatron, PythonReaderReadsOurWriter) {
  if (!have_python()) GTEST_SKIP() << "python3 not available";
  const std::string prefix = temp_dir("mpyread") + "/ds";
  auto w = TokenWriter::create(prefix, FileFormat::kMegatron, TokenDType::kInt32).value();
  for (const auto& doc : kDocs) {
    for (const auto& s : doc) ASSERT_TRUE(w->add_sequence(s).ok());
    ASSERT_TRUE(w->end_document().ok());
  }
  ASSERT_TRUE(w->finish().ok());
  int rc = 0;
  const std::string out = run_capture("python3 " + kPy + " read " + prefix, &rc);
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(out, "{\"dtype\":4,\"docs\":" + docs_json(kDocs) + "}\n");
}

// A valid .idx built by hand from the format (not by TokenWriter): two documents of uint16
// sequences {3 tokens}, {2 tokens} then {1 token}; the .bin holds 6 tokens.
struct IdxBytes {
  std::vector<uint8_t> b;
  template <typename T>
  void put(T v) {
    for (size_t i = 0; i < sizeof(T); ++i)
      b.push_back(static_cast<uint8_t>(uint64_t(v) >> (8 * i)));
  }
  template <typename T>
  void set(size_t at, T v) {
    for (size_t i = 0; i < sizeof(T); ++i) b[at + i] = static_cast<uint8_t>(uint64_t(v) >> (8 * i));
  }
};

IdxBytes valid_idx() {
  IdxBytes x;
  for (char c : std::string("MMIDIDX\0\0", 9)) x.put<uint8_t>(c);
  x.put<uint64_t>(1);
  x.put<uint8_t>(8);
  x.put<uint64_t>(3);                                  // sequences, at byte 18
  x.put<uint64_t>(3);                                  // document_indices entries, at byte 26
  for (int32_t len : {3, 2, 1}) x.put<int32_t>(len);   // at 34
  for (int64_t ptr : {0, 6, 10}) x.put<int64_t>(ptr);  // at 46
  for (int64_t di : {0, 2, 3}) x.put<int64_t>(di);     // at 70
  return x;
}

Status open_with(const std::string& dir, const IdxBytes& idx) {
  write_bytes(dir + "/h.bin", {1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0});
  write_bytes(dir + "/h.idx", idx.b);
  return MegatronIndexed::open(dir + "/h").status();
}

TEST(Megatron, HandBuiltIndexAndHeaderErrorsNameTheField) {
  const std::string dir = temp_dir("mhdr");
  ASSERT_TRUE(open_with(dir, valid_idx()).ok()) << open_with(dir, valid_idx()).to_string();
  expect_docs(*MegatronIndexed::open(dir + "/h").value(), {{{1, 2, 3}, {4, 5}}, {{6}}});
  struct Case {
    const char* name;
    std::function<void(IdxBytes&)> corrupt;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"magic", [](IdxBytes& x) { x.b[0] = 'X'; }, "field 'magic' is \"XMIDIDX"},
      {"version", [](IdxBytes& x) { x.set<uint64_t>(9, 2); }, "field 'version' is 2"},
      {"float", [](IdxBytes& x) { x.b[17] = 6; }, "field 'dtype': dtype code 6 (float64)"},
      {"code", [](IdxBytes& x) { x.b[17] = 9; }, "field 'dtype': unknown dtype code 9"},
      {"count", [](IdxBytes& x) { x.set<uint64_t>(18, 1000); }, "'sequence_count' = 1000"},
      {"docs", [](IdxBytes& x) { x.set<uint64_t>(26, 4); }, "'document_count' = 4"},
      {"short", [](IdxBytes& x) { x.b.resize(20); }, "shorter than the 34-byte header"},
      {"len", [](IdxBytes& x) { x.set<int32_t>(38, -2); }, "field 'sequence_lengths[1]' is -2"},
      {"ptr", [](IdxBytes& x) { x.set<int64_t>(62, 11); }, "field 'sequence_pointers[2]' is 11"},
      {"doc0", [](IdxBytes& x) { x.set<int64_t>(70, 1); }, "field 'document_indices[0]' is 1"},
      {"range", [](IdxBytes& x) { x.set<int64_t>(78, 4); }, "field 'document_indices[1]' is 4"},
      {"order", [](IdxBytes& x) { x.set<int64_t>(78, 3), x.set<int64_t>(86, 2); },
       "field 'document_indices[2]' is 2"},
      {"last", [](IdxBytes& x) { x.set<int64_t>(86, 2); }, "'document_indices[2]' (the last)"},
  };
  for (const auto& c : cases) {
    IdxBytes x = valid_idx();
    c.corrupt(x);
    const Status st = open_with(dir, x);
    ASSERT_FALSE(st.ok()) << c.name;
    EXPECT_NE(st.message().find(c.expect), std::string::npos) << c.name << ": " << st.message();
    EXPECT_NE(st.message().find("h.idx"), std::string::npos) << c.name << ": " << st.message();
  }
  fs::remove(dir + "/h.bin");
  EXPECT_EQ(MegatronIndexed::open(dir + "/h").status().code(), Code::kNotFound);
}

TEST(Megatron, VocabularyIsEnforcedOnRead) {
  const std::string prefix = temp_dir("mvocab") + "/ds";
  auto w = TokenWriter::create(prefix, FileFormat::kMegatron, TokenDType::kUInt16).value();
  ASSERT_TRUE(w->add_document(std::vector<int32_t>{1, 2, 500}).ok());
  ASSERT_TRUE(w->finish().ok());
  auto m = MegatronIndexed::open(prefix, 300).value();
  std::vector<int32_t> out(3);
  const Status st = m->read(0, 3, out.data());
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("token 2 (sequence 0) is 500"), std::string::npos) << st.message();
}

// ---------------------------------------------------------------------------------------------
// Byte-level prepare-data

TEST(PrepareData, ByteTokens) {
  const std::string text =
      "ab\n \n\n\xff"
      "c\r\n\ndone";
  const auto whole = byte_documents(text, false);
  ASSERT_EQ(whole.size(), 1u);
  ASSERT_EQ(whole[0].size(), text.size() + 1);
  EXPECT_EQ(whole[0][6], 255);
  EXPECT_EQ(whole[0].back(), kEndOfDocument);
  const auto docs = byte_documents(text, true);
  const std::vector<std::vector<int32_t>> want = {
      {'a', 'b', '\n', 256}, {255, 'c', '\r', '\n', 256}, {'d', 'o', 'n', 'e', 256}};
  EXPECT_EQ(docs, want);
  EXPECT_TRUE(byte_documents("", false).empty());
  EXPECT_TRUE(byte_documents("\n\n  \n", true).empty());
}

TEST(PrepareData, WritesFlatAndMegatron) {
  const std::string dir = temp_dir("prep");
  {
    std::ofstream(dir + "/a.txt") << "hi\n\nyo\n";
    std::ofstream(dir + "/b.txt") << "z";
  }
  const std::vector<std::string> files = {dir + "/a.txt", dir + "/b.txt"};
  auto st = prepare_byte_data(dir + "/flat", files, {}).value();
  EXPECT_EQ(st.documents, 2);
  EXPECT_EQ(st.tokens, 7 + 1 + 1 + 1);
  auto f = TokenFile::open(dir + "/flat.bin", TokenDType::kUInt16).value();
  std::vector<int32_t> got(f->size());
  ASSERT_TRUE(f->read(0, f->size(), got.data()).ok());
  EXPECT_EQ(got, (std::vector<int32_t>{'h', 'i', '\n', '\n', 'y', 'o', '\n', 256, 'z', 256}));

  PrepareOptions mopt{FileFormat::kMegatron, TokenDType::kUInt32, true};
  st = prepare_byte_data(dir + "/meg", files, mopt).value();
  EXPECT_EQ(st.dtype, TokenDType::kInt32);
  EXPECT_EQ(st.documents, 3);
  auto m = MegatronIndexed::open(dir + "/meg", kByteVocab).value();
  expect_docs(*m, {{{'h', 'i', '\n', 256}}, {{'y', 'o', '\n', 256}}, {{'z', 256}}});
  EXPECT_FALSE(prepare_byte_data(dir + "/u8", files, {FileFormat::kFlat, TokenDType::kUInt8}).ok());
  const std::vector<std::string> missing = {dir + "/none.txt"};
  EXPECT_EQ(prepare_byte_data(dir + "/x", missing, {}).status().code(), Code::kNotFound);
}

// ---------------------------------------------------------------------------------------------
// Fill-in-the-middle (DeepSeek-V3's PSM at a rate)

std::vector<int32_t> bytes_doc(std::string_view s) {
  std::vector<int32_t> d;
  for (char c : s) d.push_back(static_cast<unsigned char>(c));
  d.push_back(kEndOfDocument);
  return d;
}

// Rate 1 rewrites every document: <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eod>,
// with prefix, middle and suffix the three consecutive pieces of the original, and the inverse
// gives the original back.
TEST(Fim, PsmLayout) {
  const std::vector<int32_t> doc = bytes_doc("def add(a, b):\n    return a + b\n");
  const size_t n = doc.size() - 1;
  int split_somewhere = 0;
  for (int64_t index = 0; index < 200; ++index) {
    const std::vector<int32_t> out = fim_document(doc, index, {1.0, 7});
    ASSERT_EQ(out.size(), doc.size() + 3);
    ASSERT_EQ(out.front(), kFimBegin);
    ASSERT_EQ(out.back(), kEndOfDocument);
    const auto hole = std::find(out.begin(), out.end(), kFimHole) - out.begin();
    const auto end = std::find(out.begin(), out.end(), kFimEnd) - out.begin();
    ASSERT_LT(hole, end);
    const size_t i = hole - 1;             // prefix length
    const size_t suffix = end - hole - 1;  // suffix length
    const size_t j = n - suffix;           // middle is [i, j)
    ASSERT_LE(i, j);
    EXPECT_TRUE(std::equal(doc.begin(), doc.begin() + i, out.begin() + 1));
    EXPECT_TRUE(std::equal(doc.begin() + j, doc.begin() + n, out.begin() + hole + 1));
    EXPECT_TRUE(std::equal(doc.begin() + i, doc.begin() + j, out.begin() + end + 1));
    split_somewhere += (i > 0 && j < n && i < j) ? 1 : 0;
    auto back = unfim_document(out);
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    EXPECT_EQ(*back, doc);
    EXPECT_EQ(fim_document(doc, index, {1.0, 7}), out) << "a pure function of (seed, index)";
  }
  EXPECT_GT(split_somewhere, 100) << "three non-empty pieces most of the time";
  EXPECT_EQ(fim_document(doc, 3, {0.0, 7}), doc);
  EXPECT_EQ(*unfim_document(doc), doc) << "a plain document passes through";
}

// The share of rewritten documents is the rate (20000 documents: 4 binomial standard
// deviations); the two cuts, the smaller and larger of two uniform draws, average 1/3 and 2/3 of
// the length; another seed picks other documents.
TEST(Fim, RateAndCutDistribution) {
  const std::vector<int32_t> doc = bytes_doc(std::string(99, 'x'));  // 100 cut positions
  const int64_t N = 20000;
  const double rate = 0.1;
  int64_t hits = 0, same_in_other_seed = 0;
  double lo = 0, hi = 0;
  for (int64_t d = 0; d < N; ++d) {
    const std::vector<int32_t> out = fim_document(doc, d, {rate, 1});
    if (out.size() == doc.size()) continue;
    ++hits;
    const auto hole = std::find(out.begin(), out.end(), kFimHole) - out.begin();
    const auto end = std::find(out.begin(), out.end(), kFimEnd) - out.begin();
    lo += static_cast<double>(hole - 1) / 99;
    hi += static_cast<double>(99 - (end - hole - 1)) / 99;
    same_in_other_seed += fim_document(doc, d, {rate, 2}).size() != doc.size() ? 1 : 0;
  }
  const double sigma = std::sqrt(rate * (1 - rate) / N);
  EXPECT_NEAR(static_cast<double>(hits) / N, rate, 4 * sigma);
  // mean of min/max of two uniforms on 100 points: 1/3, 2/3 (sd of a mean ~0.24/sqrt(2000))
  EXPECT_NEAR(lo / hits, 1.0 / 3, 0.03);
  EXPECT_NEAR(hi / hits, 2.0 / 3, 0.03);
  EXPECT_LT(same_in_other_seed, hits / 4) << "seed 2 picks other documents (~10% overlap)";
}

// Cuts fall between characters: no piece starts with a UTF-8 continuation byte.
TEST(Fim, CutsAtCharacterBoundaries) {
  const std::vector<int32_t> doc =
      bytes_doc("h\xc3\xa9llo \xe6\xbc\xa2\xe5\xad\x97 \xf0\x9f\x99\x82!");
  for (int64_t index = 0; index < 300; ++index) {
    const std::vector<int32_t> out = fim_document(doc, index, {1.0, 3});
    const auto hole = std::find(out.begin(), out.end(), kFimHole) - out.begin();
    const auto end = std::find(out.begin(), out.end(), kFimEnd) - out.begin();
    for (auto at : {static_cast<decltype(hole)>(1), hole + 1, end + 1}) {
      const int32_t first = out[at];
      if (first == kFimHole || first == kFimEnd || first == kEndOfDocument) continue;  // empty
      EXPECT_NE(first & 0xC0, 0x80) << "piece starting at " << at << " of document " << index;
    }
  }
}

TEST(Fim, UnfimNamesWhatIsMalformed) {
  const std::vector<std::vector<int32_t>> bad = {
      {kFimBegin, 'a', kFimEnd, 'b', kEndOfDocument},                      // no hole
      {kFimBegin, 'a', kFimEnd, 'b', kFimHole, kEndOfDocument},            // out of order
      {kFimBegin, 'a', kFimHole, 'b', kFimEnd, kFimHole, kEndOfDocument},  // repeated
      {kFimBegin, 'a', kFimHole, 'b', kFimEnd, 'c'},                       // no end of document
  };
  for (const auto& d : bad) {
    auto r = unfim_document(d);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("not a PSM document"), std::string::npos);
  }
}

// prepare-data with --fim-rate: the count it reports is the documents written in PSM form, and
// undoing them gives the documents written without FIM; a rate outside [0, 1] is refused.
TEST(PrepareData, FimWritesPsmDocumentsThatUndoToThePlainOnes) {
  const std::string dir = temp_dir("prep_fim");
  {
    std::ofstream f(dir + "/docs.txt");
    for (int d = 0; d < 300; ++d)
      f << "doc " << d << " says " << std::string(d % 17, 'z') << "\n\n";
  }
  const std::vector<std::string> files = {dir + "/docs.txt"};
  PrepareOptions plain{FileFormat::kMegatron, TokenDType::kUInt16, true};
  PrepareOptions fim = plain;
  fim.fim = {0.3, 11};
  const auto sp = prepare_byte_data(dir + "/plain", files, plain).value();
  const auto sf = prepare_byte_data(dir + "/fim", files, fim).value();
  EXPECT_EQ(sp.fim_documents, 0);
  EXPECT_EQ(sf.documents, sp.documents);
  EXPECT_EQ(sf.tokens, sp.tokens + 3 * sf.fim_documents);
  EXPECT_GT(sf.fim_documents, 50);
  EXPECT_LT(sf.fim_documents, 130);
  auto mp = MegatronIndexed::open(dir + "/plain", kByteFimVocab).value();
  auto mf = MegatronIndexed::open(dir + "/fim", kByteFimVocab).value();
  ASSERT_EQ(mf->num_documents(), 300);
  int64_t psm = 0;
  for (int64_t d = 0; d < 300; ++d) {
    const std::vector<int32_t> f = mf->document(d).value();
    psm += f.front() == kFimBegin ? 1 : 0;
    EXPECT_EQ(unfim_document(f).value(), mp->document(d).value()) << d;
  }
  EXPECT_EQ(psm, sf.fim_documents);
  fim.fim.rate = 1.5;
  auto badr = prepare_byte_data(dir + "/bad", files, fim);
  ASSERT_FALSE(badr.ok());
  EXPECT_NE(badr.status().message().find("--fim-rate 1.5 must be in [0, 1]"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// BatchPlan: the batch ramp

// Megatron-LM's rule (microbatches.py, RampupBatchsizeNumMicroBatchesCalculator), written from
// its description: samples per rise = R / n as a float, rises done = int(consumed / that).
int64_t megatron_batch(int64_t start, int64_t inc, int64_t ramp, int64_t full, int64_t consumed) {
  const double per_rise = static_cast<double>(ramp) / static_cast<double>((full - start) / inc);
  const auto rises = static_cast<int64_t>(static_cast<double>(consumed) / per_rise);
  return std::min(full, start + rises * inc);
}

TEST(BatchPlan, RampFollowsMegatronsRuleStepByStep) {
  struct Case {
    int64_t start, inc, ramp, full;
  };
  // The last: DeepSeek-V3's 3072 -> 15360 over 469B tokens of 4096 (114,501,953 sequences), by
  // an assumed 1536 (the TR gives no shape).
  for (const Case& k : {Case{8, 4, 32, 16}, Case{2, 2, 100, 32}, Case{16, 16, 16, 64},
                        Case{3072, 1536, 469'000'000'000 / 4096, 15360}}) {
    SCOPED_TRACE(fmt::format("{} +{} over {} to {}", k.start, k.inc, k.ramp, k.full));
    auto plan = BatchPlan::ramp(k.start, k.inc, k.ramp, k.full);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    int64_t consumed = 0, step = 0;
    std::vector<int64_t> sizes;
    while (true) {
      const int64_t want = megatron_batch(k.start, k.inc, k.ramp, k.full, consumed);
      ASSERT_EQ(plan->first_sample(step), consumed) << "step " << step;
      ASSERT_EQ(plan->batch(step), want) << "step " << step;
      if (sizes.empty() || sizes.back() != want) sizes.push_back(want);
      if (want == k.full) break;
      consumed += want;
      ++step;
    }
    EXPECT_EQ(plan->ramp_steps(), step);
    EXPECT_EQ(plan->sizes(), sizes);
    EXPECT_GE(consumed, k.ramp) << "the ramp ends once R samples are trained";
    // After the ramp: full batches, samples counted on.
    EXPECT_EQ(plan->batch(step + 1000), k.full);
    EXPECT_EQ(plan->first_sample(step + 1000), consumed + 1000 * k.full);
  }
  auto flat = BatchPlan::constant(32);
  ASSERT_TRUE(flat.ok());
  EXPECT_FALSE(flat->ramped());
  EXPECT_EQ(flat->batch(7), 32);
  EXPECT_EQ(flat->first_sample(7), 7 * 32);
}

TEST(BatchPlan, RefusesRampsThatCannotReachTheBatch) {
  EXPECT_FALSE(BatchPlan::ramp(0, 4, 32, 16).ok());               // start 0
  EXPECT_FALSE(BatchPlan::ramp(16, 4, 32, 16).ok());              // start = full
  EXPECT_FALSE(BatchPlan::ramp(8, 3, 32, 16).ok());               // 3 does not divide 8
  EXPECT_FALSE(BatchPlan::ramp(8, 4, 0, 16).ok());                // no ramp samples
  EXPECT_FALSE(BatchPlan::ramp(1, 1, int64_t{1} << 40, 2).ok());  // 2^40 steps of table
  EXPECT_FALSE(BatchPlan::constant(0).ok());
}

// A ramp reads the stream a constant batch reads: the rows of its steps, laid end to end, are the
// constant run's rows laid end to end (finite source: the same permuted windows; generative: the
// same sequences).
TEST(BatchPlan, RampedBatcherReadsTheConstantBatchStream) {
  const std::string dir = temp_dir("ramp");
  std::vector<std::shared_ptr<const TokenSource>> sources = {
      counting_file(dir, 64 * 17 + 1), SyntheticMarkov::create(64, 4, 3).value()};
  for (const auto& src : sources) {
    SCOPED_TRACE(src->describe());
    const BatchSpec flat{16, 16, 7, 0.1, nullptr};
    BatchSpec ramped = flat;
    ramped.plan = std::make_shared<const BatchPlan>(BatchPlan::ramp(4, 4, 40, 16).value());
    auto a = Batcher::create(src, flat).value();
    auto b = Batcher::create(src, ramped).value();
    std::vector<int32_t> sa, sb;
    for (int64_t s = 0; sa.size() < 200 * 17; ++s) {
      auto r = a.global_batch(Split::kTrain, s).value();
      sa.insert(sa.end(), r.begin(), r.end());
    }
    int64_t steps = 0;
    for (int64_t s = 0; sb.size() < sa.size(); ++s, ++steps) {
      ASSERT_EQ(b.rows_in(Split::kTrain, s), ramped.plan->batch(s));
      auto r = b.rows(Split::kTrain, s, 0, b.rows_in(Split::kTrain, s)).value();
      sb.insert(sb.end(), r.begin(), r.end());
    }
    sb.resize(sa.size());
    EXPECT_EQ(sa, sb);
    EXPECT_GT(steps, 200 / 16 + 1) << "the ramp's smaller batches take more steps";
    EXPECT_EQ(b.rows_in(Split::kTrain, 0), 4);
    EXPECT_EQ(b.rows_in(Split::kHeldout, 0), 16) << "held-out batches stay whole";
    EXPECT_EQ(b.global_batch(Split::kHeldout, 3).value(),
              a.global_batch(Split::kHeldout, 3).value());
    EXPECT_FALSE(b.rows(Split::kTrain, 0, 0, 5).ok()) << "step 0 has 4 rows";
  }
  BatchSpec wrong{16, 16, 7, 0.1, nullptr};
  wrong.plan = std::make_shared<const BatchPlan>(BatchPlan::ramp(4, 4, 40, 32).value());
  EXPECT_FALSE(Batcher::create(sources[1], wrong).ok()) << "plan for another batch";
}

}  // namespace
}  // namespace fp8pipe::data
