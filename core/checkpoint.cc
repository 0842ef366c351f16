// Checkpoint writing, committing, retention, verification and re-slicing (see checkpoint.h).
// Durability: every file goes through tmp + fsync + rename + directory fsync; the COMMITTED marker
// and then `latest` are written only once everything they vouch for is durable.
#include "core/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/json.h"
#include "core/log.h"

namespace fp8pipe::ckpt {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Names and small types

std::string step_dir_name(int64_t step) { return fmt::format("step_{:08d}", step); }
std::string rank_file_name(int rank) { return fmt::format("rank_{:05d}.safetensors", rank); }

std::optional<int64_t> parse_step_dir_name(std::string_view name) {
  if (!name.starts_with("step_") || name.size() == 5) return std::nullopt;
  int64_t step = 0;
  const char* b = name.data() + 5;
  const char* e = name.data() + name.size();
  auto [p, ec] = std::from_chars(b, e, step);
  if (ec != std::errc() || p != e || *b == '-' || *b == '+') return std::nullopt;
  return step;
}

std::string Topology::to_string() const {
  return fmt::format("pp={} dp={} ep={} world={}", pp, dp, ep, world);
}

namespace {
constexpr std::pair<Kind, std::string_view> kKinds[] = {{Kind::kParam, "param"},
                                                        {Kind::kExpAvg, "exp_avg"},
                                                        {Kind::kExpAvgSq, "exp_avg_sq"},
                                                        {Kind::kRouterBias, "router_bias"},
                                                        {Kind::kEma, "ema"}};
}  // namespace

const char* kind_name(Kind k) {
  for (const auto& [kind, name] : kKinds) {
    if (kind == k) return name.data();
  }
  return "?";
}

std::optional<Kind> parse_kind(std::string_view s) {
  for (const auto& [kind, name] : kKinds) {
    if (name == s) return kind;
  }
  return std::nullopt;
}

void Slice::own() {
  if (owned) return;
  owned = std::make_shared<const std::vector<uint8_t>>(bytes.begin(), bytes.end());
  bytes = std::span<const uint8_t>(*owned);
}

int64_t TensorRecord::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorRecord* Manifest::find(std::string_view name) const {
  for (const TensorRecord& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Manifest JSON

namespace {

json::Value shape_json(const std::vector<int64_t>& shape) {
  json::Value a = json::Value::array();
  for (int64_t d : shape) a.push_back(d);
  return a;
}

json::Value rank_json(const RankState& r) {
  json::Value o = json::Value::object(), rng = json::Value::object();
  rng.set("seed", r.rng_seed);
  rng.set("counter", r.rng_counter);
  o.set("rank", r.rank);
  o.set("pp_rank", r.pp_rank);
  o.set("dp_rank", r.dp_rank);
  o.set("data_step", r.data_step);
  o.set("rng", std::move(rng));
  o.set("skipped_steps", r.skipped_steps);
  return o;
}

json::Value tensor_json(const TensorRecord& t) {
  json::Value o = json::Value::object(), shards = json::Value::array();
  for (const ShardRecord& s : t.shards) {
    json::Value j = json::Value::object();
    j.set("file", s.file);
    j.set("rank", s.rank);
    j.set("begin", s.begin);
    j.set("end", s.end);
    j.set("replica", s.replica);
    shards.push_back(std::move(j));
  }
  o.set("name", t.name);
  o.set("kind", kind_name(t.kind));
  o.set("dtype", t.dtype);
  o.set("shape", shape_json(t.shape));
  o.set("shards", std::move(shards));
  return o;
}

}  // namespace

std::string Manifest::to_json() const {
  json::Value o = json::Value::object(), topo = json::Value::object();
  json::Value rs = json::Value::array(), fs_ = json::Value::array(), ts = json::Value::array();
  topo.set("pp", topology.pp);
  topo.set("dp", topology.dp);
  topo.set("ep", topology.ep);
  topo.set("world", topology.world);
  for (const RankState& r : ranks) rs.push_back(rank_json(r));
  for (const FileRecord& f : files) {
    json::Value j = json::Value::object();
    j.set("file", f.file);
    j.set("rank", f.rank);
    j.set("bytes", f.bytes);
    j.set("crc32", f.crc32);
    fs_.push_back(std::move(j));
  }
  for (const TensorRecord& t : tensors) ts.push_back(tensor_json(t));
  o.set("format", kFormatName);
  o.set("version", version);
  o.set("step", step);
  o.set("tokens_seen", tokens_seen);
  o.set("optimizer_step", optimizer_step);
  o.set("skipped_steps", skipped_steps);
  o.set("config", config);
  o.set("topology", std::move(topo));
  o.set("ranks", std::move(rs));
  o.set("files", std::move(fs_));
  o.set("tensors", std::move(ts));
  return json::write(o, 1) + "\n";
}

namespace {

// Strict access to one manifest object: exactly the listed keys, typed getters whose errors name
// the key path ("tensors[3].shards[0].end").
class Fields {
 public:
  Fields(const json::Value& v, std::string where) : v_(v), where_(std::move(where)) {}

  Status expect(std::initializer_list<std::string_view> keys) const {
    if (!v_.is_object()) return bad("", "expected a JSON object");
    std::set<std::string_view> seen;
    for (const auto& [k, _] : v_.members()) {
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) return bad(k, "unknown key");
      if (!seen.insert(k).second) return bad(k, "duplicate key");
    }
    for (std::string_view k : keys) {
      if (!seen.count(k)) return bad(k, "missing");
    }
    return Status::Ok();
  }
  Result<int64_t> i64(std::string_view k, int64_t min = 0) const {
    const json::Value* v = v_.find(k);
    if (!v->is_int() || v->as_int() < min)
      return bad(k, fmt::format("expected an integer >= {}", min));
    return v->as_int();
  }
  // An int field (version, topology, ranks, replica): also <= INT32_MAX, so a large value is
  // refused rather than truncated (version 4294967297 must not read as version 1).
  Result<int> i32(std::string_view k, int min = 0) const {
    FP8_ASSIGN_OR_RETURN(int64_t v, i64(k, min));
    if (v > INT32_MAX)
      return bad(k, fmt::format("expected an integer in [{}, {}]", min, INT32_MAX));
    return static_cast<int>(v);
  }
  Result<uint64_t> u64(std::string_view k) const {
    uint64_t out;
    if (!v_.find(k)->get_u64(&out)) return bad(k, "expected an unsigned 64-bit integer");
    return out;
  }
  Result<std::string> str(std::string_view k) const {
    const json::Value* v = v_.find(k);
    if (!v->is_string()) return bad(k, "expected a string");
    return v->as_string();
  }
  Result<const json::Value*> arr(std::string_view k) const {
    const json::Value* v = v_.find(k);
    if (!v->is_array()) return bad(k, "expected an array");
    return v;
  }
  Fields sub(std::string_view k) const { return Fields(*v_.find(k), path(k)); }
  Fields item(std::string_view k, size_t i) const {
    return Fields(v_.find(k)->items()[i], fmt::format("{}[{}]", path(k), i));
  }

 private:
  std::string path(std::string_view k) const {
    return where_.empty() ? std::string(k) : fmt::format("{}.{}", where_, k);
  }
  Status bad(std::string_view k, std::string_view what) const {
    return FP8_INVALID("manifest key '{}': {}", k.empty() ? where_ : path(k), what);
  }
  const json::Value& v_;
  std::string where_;
};

Result<RankState> parse_rank(const Fields& f) {
  FP8_RETURN_IF_ERROR(
      f.expect({"rank", "pp_rank", "dp_rank", "data_step", "rng", "skipped_steps"}));
  RankState r;
  FP8_ASSIGN_OR_RETURN(r.rank, f.i32("rank"));
  FP8_ASSIGN_OR_RETURN(r.pp_rank, f.i32("pp_rank"));
  FP8_ASSIGN_OR_RETURN(r.dp_rank, f.i32("dp_rank"));
  FP8_ASSIGN_OR_RETURN(r.data_step, f.i64("data_step"));
  FP8_ASSIGN_OR_RETURN(r.skipped_steps, f.i64("skipped_steps"));
  const Fields rng = f.sub("rng");
  FP8_RETURN_IF_ERROR(rng.expect({"seed", "counter"}));
  FP8_ASSIGN_OR_RETURN(r.rng_seed, rng.u64("seed"));
  FP8_ASSIGN_OR_RETURN(r.rng_counter, rng.i64("counter"));
  return r;
}

Result<FileRecord> parse_file(const Fields& f) {
  FP8_RETURN_IF_ERROR(f.expect({"file", "rank", "bytes", "crc32"}));
  FileRecord r;
  FP8_ASSIGN_OR_RETURN(r.file, f.str("file"));
  FP8_ASSIGN_OR_RETURN(r.rank, f.i32("rank"));
  FP8_ASSIGN_OR_RETURN(r.bytes, f.u64("bytes"));
  FP8_ASSIGN_OR_RETURN(uint64_t crc, f.u64("crc32"));
  if (crc > UINT32_MAX) return FP8_INVALID("manifest: crc32 {} of {} exceeds 32 bits", crc, r.file);
  r.crc32 = static_cast<uint32_t>(crc);
  return r;
}

Result<ShardRecord> parse_shard(const Fields& f) {
  FP8_RETURN_IF_ERROR(f.expect({"file", "rank", "begin", "end", "replica"}));
  ShardRecord s;
  FP8_ASSIGN_OR_RETURN(s.file, f.str("file"));
  FP8_ASSIGN_OR_RETURN(s.rank, f.i32("rank"));
  FP8_ASSIGN_OR_RETURN(s.begin, f.i64("begin"));
  FP8_ASSIGN_OR_RETURN(s.end, f.i64("end", s.begin));
  FP8_ASSIGN_OR_RETURN(s.replica, f.i32("replica"));
  return s;
}

Result<TensorRecord> parse_tensor(const Fields& f) {
  FP8_RETURN_IF_ERROR(f.expect({"name", "kind", "dtype", "shape", "shards"}));
  TensorRecord t;
  FP8_ASSIGN_OR_RETURN(t.name, f.str("name"));
  FP8_ASSIGN_OR_RETURN(std::string kind, f.str("kind"));
  const auto k = parse_kind(kind);
  if (!k) return FP8_INVALID("manifest: tensor '{}': unknown kind '{}'", t.name, kind);
  t.kind = *k;
  FP8_ASSIGN_OR_RETURN(t.dtype, f.str("dtype"));
  FP8_ASSIGN_OR_RETURN(const json::Value* shape, f.arr("shape"));
  for (const json::Value& d : shape->items()) {
    if (!d.is_int() || d.as_int() < 0)
      return FP8_INVALID("manifest: tensor '{}': bad shape entry {}", t.name, json::write(d));
    t.shape.push_back(d.as_int());
  }
  FP8_ASSIGN_OR_RETURN(const json::Value* shards, f.arr("shards"));
  for (size_t i = 0; i < shards->items().size(); ++i) {
    FP8_ASSIGN_OR_RETURN(ShardRecord s, parse_shard(f.item("shards", i)));
    t.shards.push_back(std::move(s));
  }
  return t;
}

// Parses each element of array `key` with `fn` into `out`.
template <typename T, typename Fn>
Status parse_list(const Fields& f, std::string_view key, Fn fn, std::vector<T>& out) {
  FP8_ASSIGN_OR_RETURN(const json::Value* a, f.arr(key));
  for (size_t i = 0; i < a->items().size(); ++i) {
    FP8_ASSIGN_OR_RETURN(T v, fn(f.item(key, i)));
    out.push_back(std::move(v));
  }
  return Status::Ok();
}

Status parse_manifest(const json::Value& doc, Manifest& m) {
  const Fields f(doc, "");
  FP8_RETURN_IF_ERROR(
      f.expect({"format", "version", "step", "tokens_seen", "optimizer_step", "skipped_steps",
                "config", "topology", "ranks", "files", "tensors"}));
  FP8_ASSIGN_OR_RETURN(std::string format, f.str("format"));
  FP8_ASSIGN_OR_RETURN(m.version, f.i32("version"));
  if (format != kFormatName || m.version != kFormatVersion) {
    return FP8_INVALID("manifest format '{}' version {}: this build reads '{}' version {}", format,
                       m.version, kFormatName, kFormatVersion);
  }
  FP8_ASSIGN_OR_RETURN(m.step, f.i64("step"));
  FP8_ASSIGN_OR_RETURN(m.tokens_seen, f.i64("tokens_seen"));
  FP8_ASSIGN_OR_RETURN(m.optimizer_step, f.i64("optimizer_step"));
  FP8_ASSIGN_OR_RETURN(m.skipped_steps, f.i64("skipped_steps"));
  FP8_ASSIGN_OR_RETURN(m.config, f.str("config"));
  const Fields topo = f.sub("topology");
  FP8_RETURN_IF_ERROR(topo.expect({"pp", "dp", "ep", "world"}));
  FP8_ASSIGN_OR_RETURN(m.topology.pp, topo.i32("pp", 1));
  FP8_ASSIGN_OR_RETURN(m.topology.dp, topo.i32("dp", 1));
  FP8_ASSIGN_OR_RETURN(m.topology.ep, topo.i32("ep", 1));
  FP8_ASSIGN_OR_RETURN(m.topology.world, topo.i32("world", 1));
  FP8_RETURN_IF_ERROR(parse_list(f, "ranks", parse_rank, m.ranks));
  FP8_RETURN_IF_ERROR(parse_list(f, "files", parse_file, m.files));
  return parse_list(f, "tensors", parse_tensor, m.tensors);
}

}  // namespace

Result<Manifest> Manifest::from_json(std::string_view text, const std::string& label) {
  auto doc = json::parse(text, label);
  if (!doc.ok()) return doc.status();
  Manifest m;
  if (Status st = parse_manifest(*doc, m); !st.ok()) return st.with_context(label);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Consistency: files named by shards exist, dtypes are known, coverage is exact per replica.

namespace {

// Every replica present covers [0, numel) exactly once; replica 0 must be present.
void check_tensor_coverage(const TensorRecord& t, std::vector<std::string>& errors) {
  std::map<int, std::vector<const ShardRecord*>> by_replica;
  for (const ShardRecord& s : t.shards) by_replica[s.replica].push_back(&s);
  if (!by_replica.count(0)) {
    errors.push_back(fmt::format("tensor '{}': no shard of replica 0", t.name));
  }
  const int64_t n = t.numel();
  for (auto& [replica, shards] : by_replica) {
    std::sort(shards.begin(), shards.end(),
              [](const ShardRecord* a, const ShardRecord* b) { return a->begin < b->begin; });
    int64_t cursor = 0;
    std::string prev = "the start";
    for (const ShardRecord* s : shards) {
      if (s->begin > cursor) {
        errors.push_back(fmt::format("tensor '{}' replica {}: elements [{}, {}) are in no shard",
                                     t.name, replica, cursor, s->begin));
      } else if (s->begin < cursor) {
        errors.push_back(
            fmt::format("tensor '{}' replica {}: elements [{}, {}) of {} are also in {}", t.name,
                        replica, s->begin, std::min(cursor, s->end), s->file, prev));
      }
      cursor = std::max(cursor, s->end);
      prev = s->file;
    }
    if (cursor != n) {
      errors.push_back(fmt::format("tensor '{}' replica {}: shards cover [0, {}) of {} elements",
                                   t.name, replica, cursor, n));
    }
  }
}

std::vector<std::string> check_manifest(const Manifest& m) {
  std::vector<std::string> errors;
  std::set<std::string> files, names;
  for (const FileRecord& f : m.files) {
    if (!files.insert(f.file).second) errors.push_back(fmt::format("file {} listed twice", f.file));
  }
  for (const TensorRecord& t : m.tensors) {
    if (!names.insert(t.name).second)
      errors.push_back(fmt::format("tensor '{}' listed twice", t.name));
    if (safetensors::dtype_size(t.dtype) == 0)
      errors.push_back(fmt::format("tensor '{}': unknown dtype '{}'", t.name, t.dtype));
    for (const ShardRecord& s : t.shards) {
      if (!files.count(s.file))
        errors.push_back(fmt::format("tensor '{}': shard file {} is not in the manifest's files",
                                     t.name, s.file));
    }
    check_tensor_coverage(t, errors);
  }
  return errors;
}

Status errors_status(Code code, const std::string& what, const std::vector<std::string>& errors) {
  std::string msg = what;
  for (const std::string& e : errors) msg += "\n  - " + e;
  return FP8_ERROR(code, "{}", msg);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Durable small files

namespace {

Status fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return FP8_ERROR(Code::kIo, "{}: cannot open directory: {}", dir, std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return FP8_ERROR(Code::kIo, "{}: fsync of directory: {}", dir, std::strerror(errno));
  return Status::Ok();
}

// `path`.tmp, write, fsync, rename, fsync of the directory.
Status write_file_durable(const std::string& path, std::string_view text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return FP8_ERROR(Code::kIo, "{}: cannot create: {}", tmp, std::strerror(errno));
  size_t done = 0;
  Status st;
  while (st.ok() && done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) st = FP8_ERROR(Code::kIo, "{}: write: {}", tmp, std::strerror(errno));
    if (w > 0) done += size_t(w);
  }
  if (st.ok() && ::fsync(fd) != 0)
    st = FP8_ERROR(Code::kIo, "{}: fsync: {}", tmp, std::strerror(errno));
  if (::close(fd) != 0 && st.ok())
    st = FP8_ERROR(Code::kIo, "{}: close: {}", tmp, std::strerror(errno));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0)
    st = FP8_ERROR(Code::kIo, "{}: rename to {}: {}", tmp, path, std::strerror(errno));
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  return fsync_dir(fs::path(path).parent_path().string());
}

Result<std::string> read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return FP8_ERROR(Code::kNotFound, "{}: cannot open: {}", path, std::strerror(errno));
  std::string s((std::istreambuf_iterator<char>(f)), {});
  if (f.bad()) return FP8_ERROR(Code::kIo, "{}: read failed", path);
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

std::string slice_metadata(const Slice& s) {
  json::Value o = json::Value::object();
  o.set("shape", shape_json(s.shape));
  o.set("begin", s.begin);
  o.set("end", s.end);
  o.set("kind", kind_name(s.kind));
  o.set("replica", s.replica);
  return json::write(o);
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Status check_slice(const Slice& s) {
  const int64_t n = numel_of(s.shape);
  const size_t esize = safetensors::dtype_size(s.dtype);
  if (esize == 0 || s.begin < 0 || s.end < s.begin || s.end > n ||
      s.bytes.size() != size_t(s.end - s.begin) * esize) {
    return FP8_INVALID(
        "checkpoint slice '{}': {} [{}, {}) of a {}-element tensor with {} bytes is inconsistent",
        s.name, s.dtype, s.begin, s.end, n, s.bytes.size());
  }
  return Status::Ok();
}

}  // namespace

Result<RankFile> write_rank_file(const std::string& step_dir, const SaveRequest& req) {
  RankFile rf;
  rf.state = req.rank;
  rf.file.file = rank_file_name(req.rank.rank);
  rf.file.rank = req.rank.rank;
  safetensors::Writer w;
  w.set_metadata("format", "fp8pipe-checkpoint-shard");
  w.set_metadata("version", std::to_string(kFormatVersion));
  w.set_metadata("step", std::to_string(req.step));
  w.set_metadata("rank", std::to_string(req.rank.rank));
  for (const Slice& s : req.slices) {
    FP8_RETURN_IF_ERROR(check_slice(s));
    const bool whole = s.begin == 0 && s.end == numel_of(s.shape);
    const std::vector<int64_t> stored = whole ? s.shape : std::vector<int64_t>{s.end - s.begin};
    FP8_RETURN_IF_ERROR(w.add(s.name, s.dtype, stored, s.bytes));
    w.set_metadata("slice:" + s.name, slice_metadata(s));
    rf.tensors.push_back({s.name,
                          s.kind,
                          s.dtype,
                          s.shape,
                          {{rf.file.file, req.rank.rank, s.begin, s.end, s.replica}}});
  }
  const std::string path = (fs::path(step_dir) / rf.file.file).string();
  FP8_RETURN_IF_ERROR(w.write(path));
  // The checksum of exactly the bytes written: u64le header length, header, data in order.
  const std::string h = w.header();
  uint8_t len[8];
  for (int k = 0; k < 8; ++k) len[k] = static_cast<uint8_t>(uint64_t(h.size()) >> (8 * k));
  uLong crc = ::crc32_z(0L, len, 8);
  crc = ::crc32_z(crc, reinterpret_cast<const Bytef*>(h.data()), h.size());
  rf.file.bytes = 8 + h.size();
  for (const Slice& s : req.slices) {
    crc = ::crc32_z(crc, s.bytes.data(), s.bytes.size());
    rf.file.bytes += s.bytes.size();
  }
  rf.file.crc32 = static_cast<uint32_t>(crc);
  return rf;
}

namespace {

Result<Manifest> build_manifest(const SaveRequest& req, std::vector<RankFile> files) {
  Manifest m;
  m.step = req.step;
  m.tokens_seen = req.tokens_seen;
  m.optimizer_step = req.optimizer_step;
  m.skipped_steps = req.skipped_steps;
  m.config = req.config;
  m.topology = req.topology;
  std::sort(files.begin(), files.end(),
            [](const RankFile& a, const RankFile& b) { return a.file.rank < b.file.rank; });
  std::map<std::string, size_t> index;
  for (RankFile& rf : files) {
    m.ranks.push_back(rf.state);
    m.files.push_back(rf.file);
    for (TensorRecord& t : rf.tensors) {
      auto [it, fresh] = index.emplace(t.name, m.tensors.size());
      if (fresh) {
        m.tensors.push_back(std::move(t));
        continue;
      }
      TensorRecord& have = m.tensors[it->second];
      if (have.kind != t.kind || have.dtype != t.dtype || have.shape != t.shape) {
        return FP8_INVALID("checkpoint: tensor '{}' is {} {} on one rank and {} {} on rank {}",
                           t.name, have.dtype, fmt::join(have.shape, "x"), t.dtype,
                           fmt::join(t.shape, "x"), rf.file.rank);
      }
      have.shards.insert(have.shards.end(), t.shards.begin(), t.shards.end());
    }
  }
  return m;
}

}  // namespace

namespace {

// COMMITTED: {"step", "manifest_bytes", "manifest_crc32"}, so the manifest is checksummed too.
std::string committed_json(int64_t step, std::string_view manifest) {
  json::Value o = json::Value::object();
  o.set("step", step);
  o.set("manifest_bytes", manifest.size());
  o.set("manifest_crc32",
        ::crc32_z(0L, reinterpret_cast<const Bytef*>(manifest.data()), manifest.size()));
  return json::write(o) + "\n";
}

}  // namespace

Status commit(const std::string& root, const SaveRequest& req, std::vector<RankFile> files) {
  FP8_ASSIGN_OR_RETURN(Manifest m, build_manifest(req, std::move(files)));
  if (auto errors = check_manifest(m); !errors.empty()) {
    return errors_status(Code::kInternal,
                         fmt::format("checkpoint step {}: refusing to commit", req.step), errors);
  }
  const std::string name = step_dir_name(req.step);
  const fs::path dir = fs::path(root) / name;
  const std::string text = m.to_json();
  FP8_RETURN_IF_ERROR(write_file_durable((dir / kManifestFile).string(), text));
  FP8_RETURN_IF_ERROR(
      write_file_durable((dir / kCommittedFile).string(), committed_json(req.step, text)));
  return write_file_durable((fs::path(root) / kLatestFile).string(), name + "\n");
}

namespace {

// Removes a step directory: COMMITTED first, so a half-removed directory reads as uncommitted.
Status remove_step_dir(const fs::path& dir) {
  std::error_code ec;
  fs::remove(dir / kCommittedFile, ec);
  if (!ec) fs::remove_all(dir, ec);
  if (ec)
    return FP8_ERROR(Code::kIo, "cannot remove checkpoint {}: {}", dir.string(), ec.message());
  return Status::Ok();
}

// Test hook (documented in checkpoint.h): simulate a crash in the middle of a save.
void maybe_crash_for_test() {
  const char* v = std::getenv("FP8PIPE_TEST_CRASH_IN_SAVE");
  if (v && std::string_view(v) == "1") {
    log::warn("FP8PIPE_TEST_CRASH_IN_SAVE=1: exiting in the middle of a checkpoint save");
    ::_exit(1);
  }
}

}  // namespace

namespace {

// A rank's record as text for the gather: a partial manifest holding just its file, state and
// tensors (the manifest's JSON reader checks it on rank 0).
std::string rank_file_json(const RankFile& rf) {
  Manifest m;
  m.ranks = {rf.state};
  m.files = {rf.file};
  m.tensors = rf.tensors;
  return m.to_json();
}

Result<RankFile> parse_rank_file(const std::string& text, int rank) {
  FP8_ASSIGN_OR_RETURN(Manifest m, Manifest::from_json(text, fmt::format("rank {} record", rank)));
  if (m.ranks.size() != 1 || m.files.size() != 1 || m.files[0].rank != rank) {
    return FP8_ERROR(Code::kInternal, "checkpoint: rank {} sent a malformed record", rank);
  }
  return RankFile{m.files[0], m.ranks[0], std::move(m.tensors)};
}

Status prepare_step_dir(const Options& opt, int64_t step);

}  // namespace

namespace {

// The first half of an N-rank save: rank 0 (re)creates the step directory; all agree.
Status begin_distributed(const Options& opt, int64_t step, const Collective& col) {
  Status st = col.rank == 0 ? prepare_step_dir(opt, step) : Status::Ok();
  FP8_ASSIGN_OR_RETURN(bool ready, col.agree(st.ok()));
  FP8_RETURN_IF_ERROR(st);
  if (!ready) {
    return FP8_ERROR(Code::kIo, "checkpoint step {}: rank 0 could not create {}", step,
                     (fs::path(opt.root) / step_dir_name(step)).string());
  }
  return Status::Ok();
}

// The second half, given this rank's written file: all agree it is written; the records are
// gathered; rank 0 commits and applies retention; all agree on the outcome. `req`'s slices are
// not used.
Status complete_distributed(const Options& opt, const SaveRequest& req, Result<RankFile> rf,
                            const Collective& col) {
  FP8_ASSIGN_OR_RETURN(bool written, col.agree(rf.ok()));
  FP8_RETURN_IF_ERROR(rf.status());
  if (!written) {
    return FP8_ERROR(Code::kIo, "checkpoint step {}: another rank failed to write its shard",
                     req.step);
  }
  maybe_crash_for_test();
  FP8_ASSIGN_OR_RETURN(auto texts, col.gather(rank_file_json(*rf)));
  Status st = Status::Ok();
  if (col.rank == 0) {
    st = [&]() -> Status {
      std::vector<RankFile> files;
      for (int r = 0; r < static_cast<int>(texts.size()); ++r) {
        FP8_ASSIGN_OR_RETURN(RankFile f, parse_rank_file(texts[r], r));
        files.push_back(std::move(f));
      }
      FP8_RETURN_IF_ERROR(commit(opt.root, req, std::move(files)));
      return apply_retention(opt.root, opt.keep_last, opt.keep_every);
    }();
  }
  FP8_ASSIGN_OR_RETURN(bool committed, col.agree(st.ok()));
  FP8_RETURN_IF_ERROR(st);
  if (!committed)
    return FP8_ERROR(Code::kIo, "checkpoint step {}: rank 0 failed to commit", req.step);
  return Status::Ok();
}

}  // namespace

Status save_distributed(const Options& opt, const SaveRequest& req, const Collective& col) {
  FP8_RETURN_IF_ERROR(begin_distributed(opt, req.step, col));
  const fs::path dir = fs::path(opt.root) / step_dir_name(req.step);
  return complete_distributed(opt, req, write_rank_file(dir.string(), req), col);
}

namespace {

Status prepare_step_dir(const Options& opt, int64_t step) {
  const fs::path dir = fs::path(opt.root) / step_dir_name(step);
  std::error_code ec;
  fs::create_directories(opt.root, ec);
  if (ec)
    return FP8_ERROR(Code::kIo, "cannot create checkpoint root {}: {}", opt.root, ec.message());
  if (fs::exists(dir)) FP8_RETURN_IF_ERROR(remove_step_dir(dir));  // a stale attempt at this step
  fs::create_directory(dir, ec);
  if (ec) return FP8_ERROR(Code::kIo, "cannot create {}: {}", dir.string(), ec.message());
  return fsync_dir(opt.root);
}

}  // namespace

Status save(const Options& opt, const SaveRequest& req) {
  const fs::path dir = fs::path(opt.root) / step_dir_name(req.step);
  FP8_RETURN_IF_ERROR(prepare_step_dir(opt, req.step));
  FP8_ASSIGN_OR_RETURN(RankFile rf, write_rank_file(dir.string(), req));
  maybe_crash_for_test();
  std::vector<RankFile> files;
  files.push_back(std::move(rf));
  FP8_RETURN_IF_ERROR(commit(opt.root, req, std::move(files)));
  return apply_retention(opt.root, opt.keep_last, opt.keep_every);
}

Checkpointer::~Checkpointer() {
  if (dist_meta_) {  // no collective left to commit it with: the directory stays uncommitted
    if (worker_.joinable()) worker_.join();
    log::warn("checkpoint step {}: written but not committed (stopped before the commit)",
              dist_meta_->step);
    return;
  }
  if (Status st = finish(); !st.ok()) log::error("checkpoint write failed: {}", st.to_string());
}

Status Checkpointer::save(SaveRequest req, const Collective* col) {
  FP8_RETURN_IF_ERROR(finish(col));
  const bool distributed = col != nullptr && col->size > 1;
  if (!opt_.async) return distributed ? save_distributed(opt_, req, *col) : ckpt::save(opt_, req);
  if (distributed) FP8_RETURN_IF_ERROR(begin_distributed(opt_, req.step, *col));
  for (Slice& s : req.slices) s.own();  // host copies: training may go on
  if (!distributed) {
    worker_ = std::thread([this, r = std::move(req)] { pending_ = ckpt::save(opt_, r); });
    return Status::Ok();
  }
  dist_meta_ = req;
  dist_meta_->slices.clear();
  worker_ = std::thread([this, r = std::move(req)] {
    dist_file_ = write_rank_file((fs::path(opt_.root) / step_dir_name(r.step)).string(), r);
  });
  return Status::Ok();
}

Status Checkpointer::finish(const Collective* col) {
  if (worker_.joinable()) worker_.join();
  if (!dist_meta_) return std::exchange(pending_, Status::Ok());
  if (col == nullptr) {
    return FP8_ERROR(Code::kInternal,
                     "checkpoint step {}: an N-rank save can only be finished collectively",
                     dist_meta_->step);
  }
  const SaveRequest meta = std::move(*dist_meta_);
  dist_meta_.reset();
  return complete_distributed(
      opt_, meta, std::exchange(dist_file_, Status(Code::kInternal, "no rank file written")), *col);
}

std::optional<int64_t> Checkpointer::uncommitted_step() const {
  return dist_meta_ ? std::optional<int64_t>(dist_meta_->step) : std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Retention

std::vector<StepDir> list_step_dirs(const std::string& root) {
  std::vector<StepDir> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const auto step = parse_step_dir_name(e.path().filename().string());
    if (!step || !e.is_directory(ec)) continue;
    out.push_back({*step, fs::exists(e.path() / kCommittedFile, ec)});
  }
  std::sort(out.begin(), out.end(),
            [](const StepDir& a, const StepDir& b) { return a.step < b.step; });
  return out;
}

std::vector<int64_t> retention_deletions(const std::vector<StepDir>& dirs, int keep_last,
                                         int64_t keep_every) {
  std::vector<int64_t> committed;
  for (const StepDir& d : dirs) {
    if (d.committed) committed.push_back(d.step);
  }
  std::sort(committed.begin(), committed.end());
  if (committed.empty()) return {};
  const int64_t newest = committed.back();
  const size_t n = committed.size();
  std::vector<int64_t> out;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = committed[i];
    const bool recent = keep_last <= 0 || i + size_t(keep_last) >= n;
    const bool milestone = keep_every > 0 && s % keep_every == 0;
    if (s != newest && !recent && !milestone) out.push_back(s);
  }
  for (const StepDir& d : dirs) {
    if (!d.committed && d.step < newest) out.push_back(d.step);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status apply_retention(const std::string& root, int keep_last, int64_t keep_every) {
  for (int64_t step : retention_deletions(list_step_dirs(root), keep_last, keep_every)) {
    log::debug("checkpoint retention: removing {}", step_dir_name(step));
    FP8_RETURN_IF_ERROR(remove_step_dir(fs::path(root) / step_dir_name(step)));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Verification

Result<std::pair<uint32_t, uint64_t>> file_crc32(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return FP8_ERROR(Code::kNotFound, "{}: cannot open: {}", path, std::strerror(errno));
  std::vector<uint8_t> buf(size_t{4} << 20);
  uLong crc = ::crc32_z(0L, nullptr, 0);
  uint64_t total = 0;
  while (true) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      return FP8_ERROR(Code::kIo, "{}: read: {}", path, std::strerror(err));
    }
    if (r == 0) break;
    crc = ::crc32_z(crc, buf.data(), size_t(r));
    total += uint64_t(r);
  }
  ::close(fd);
  return std::pair<uint32_t, uint64_t>{static_cast<uint32_t>(crc), total};
}

namespace {

// The tensors the manifest places in `f` are in the file with the recorded dtype and size.
void check_file_contents(const std::string& path, const FileRecord& f, const Manifest& m,
                         std::vector<std::string>& errors) {
  auto r = safetensors::Reader::open(path);
  if (!r.ok()) {
    errors.push_back(fmt::format("{}: {}", f.file, r.status().message()));
    return;
  }
  for (const TensorRecord& t : m.tensors) {
    for (const ShardRecord& s : t.shards) {
      if (s.file != f.file) continue;
      const safetensors::TensorView* v = r->find(t.name);
      const uint64_t want = uint64_t(s.end - s.begin) * safetensors::dtype_size(t.dtype);
      if (!v) {
        errors.push_back(fmt::format("{}: tensor '{}' is missing", f.file, t.name));
      } else if (v->dtype != t.dtype || v->nbytes != want) {
        errors.push_back(
            fmt::format("{}: tensor '{}' is {} with {} bytes, manifest says {} [{}, {}) "
                        "({} bytes)",
                        f.file, t.name, v->dtype, v->nbytes, t.dtype, s.begin, s.end, want));
      }
    }
  }
}

// Size and crc32 of each file against the manifest, then (when they match) its contents.
void check_files(const fs::path& dir, const Manifest& m, std::vector<std::string>& errors) {
  for (const FileRecord& f : m.files) {
    const std::string path = (dir / f.file).string();
    std::error_code ec;
    if (!fs::exists(path, ec)) {
      errors.push_back(
          fmt::format("{}: missing (manifest: {} bytes, crc32 {:08x})", f.file, f.bytes, f.crc32));
      continue;
    }
    auto crc = file_crc32(path);
    if (!crc.ok()) {
      errors.push_back(fmt::format("{}: {}", f.file, crc.status().message()));
    } else if (crc->second != f.bytes) {
      errors.push_back(
          fmt::format("{}: size {} bytes, manifest says {} (truncated or extended); "
                      "crc32 {:08x}, manifest says {:08x}",
                      f.file, crc->second, f.bytes, crc->first, f.crc32));
    } else if (crc->first != f.crc32) {
      errors.push_back(fmt::format("{}: crc32 {:08x}, manifest says {:08x} ({} bytes; corrupted)",
                                   f.file, crc->first, f.crc32, f.bytes));
    } else {
      check_file_contents(path, f, m, errors);
    }
  }
}

// manifest.json against the size and crc32 recorded in COMMITTED.
Status check_manifest_checksum(const std::string& step_dir) {
  const fs::path dir(step_dir);
  FP8_ASSIGN_OR_RETURN(std::string marker, read_text((dir / kCommittedFile).string()));
  auto j = json::parse(marker, (dir / kCommittedFile).string());
  if (!j.ok()) return j.status();
  const Fields f(*j, std::string(kCommittedFile));
  FP8_RETURN_IF_ERROR(f.expect({"step", "manifest_bytes", "manifest_crc32"}));
  FP8_ASSIGN_OR_RETURN(uint64_t bytes, f.u64("manifest_bytes"));
  FP8_ASSIGN_OR_RETURN(uint64_t crc, f.u64("manifest_crc32"));
  auto actual = file_crc32((dir / kManifestFile).string());
  if (!actual.ok()) return actual.status().with_context(fmt::format("checkpoint {}", step_dir));
  if (actual->first != crc || actual->second != bytes) {
    return FP8_ERROR(Code::kIo,
                     "checkpoint {} is corrupt: {}: crc32 {:08x} and {} bytes, {} says crc32 "
                     "{:08x} and {} bytes",
                     step_dir, kManifestFile, actual->first, actual->second, kCommittedFile, crc,
                     bytes);
  }
  return Status::Ok();
}

}  // namespace

Result<Manifest> read_manifest(const std::string& step_dir) {
  const std::string path = (fs::path(step_dir) / kManifestFile).string();
  FP8_ASSIGN_OR_RETURN(std::string text, read_text(path));
  return Manifest::from_json(text, path);
}

Result<Manifest> verify(const std::string& step_dir) {
  const fs::path dir(step_dir);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return FP8_ERROR(Code::kNotFound, "checkpoint {}: no such directory", step_dir);
  }
  if (!fs::exists(dir / kCommittedFile, ec)) {
    return FP8_ERROR(Code::kNotFound,
                     "checkpoint {}: not committed (no {} marker: the save did not finish)",
                     step_dir, kCommittedFile);
  }
  FP8_RETURN_IF_ERROR(check_manifest_checksum(step_dir));
  FP8_ASSIGN_OR_RETURN(Manifest m, read_manifest(step_dir));
  std::vector<std::string> errors = check_manifest(m);
  check_files(dir, m, errors);
  if (!errors.empty()) {
    return errors_status(Code::kIo, fmt::format("checkpoint {} is corrupt:", step_dir), errors);
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Choosing the checkpoint to resume from

namespace {

// `which` as a step directory: an existing path, else a step dir name or number under root.
std::string step_path(const std::string& root, const std::string& which) {
  std::error_code ec;
  if (fs::is_directory(which, ec)) return which;
  if (parse_step_dir_name(which)) return (fs::path(root) / which).string();
  int64_t step = 0;
  auto [p, e] = std::from_chars(which.data(), which.data() + which.size(), step);
  if (e == std::errc() && p == which.data() + which.size())
    return (fs::path(root) / step_dir_name(step)).string();
  return which;
}

// Warns when `latest` does not name the newest committed step (a crash between COMMITTED and
// moving `latest`, or a hand edit): the COMMITTED markers are authoritative.
void check_latest(const std::string& root, int64_t newest) {
  auto text = read_text((fs::path(root) / kLatestFile).string());
  std::string name = text.ok() ? *text : "";
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  if (name != step_dir_name(newest)) {
    log::warn("checkpoint: {}/latest is '{}' but the newest committed checkpoint is {}; using it",
              root, name, step_dir_name(newest));
  }
}

}  // namespace

Result<std::optional<Resolved>> resolve(const std::string& root, const std::string& which,
                                        bool fallback) {
  if (!which.empty()) {
    const std::string dir = step_path(root, which);
    FP8_ASSIGN_OR_RETURN(Manifest m, verify(dir));
    return std::optional<Resolved>(Resolved{dir, std::move(m)});
  }
  std::vector<StepDir> dirs = list_step_dirs(root);
  std::vector<int64_t> committed;
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    if (it->committed) committed.push_back(it->step);
    if (!it->committed && committed.empty())
      log::warn("checkpoint: ignoring {}/{}: not committed", root, step_dir_name(it->step));
  }
  if (committed.empty()) return std::optional<Resolved>();
  check_latest(root, committed.front());
  for (size_t i = 0; i < committed.size(); ++i) {
    const std::string dir = (fs::path(root) / step_dir_name(committed[i])).string();
    auto m = verify(dir);
    if (m.ok()) return std::optional<Resolved>(Resolved{dir, std::move(*m)});
    if (!fallback) {
      std::string hint = i + 1 < committed.size()
                             ? fmt::format(
                                   "pass --fallback to resume from {}, the previous "
                                   "committed checkpoint",
                                   step_dir_name(committed[i + 1]))
                             : "no older committed checkpoint exists";
      return Status(m.status().code(), m.status().message(), hint);
    }
    log::warn("checkpoint --fallback: skipping {}: {}", dir, m.status().message());
  }
  return FP8_ERROR(Code::kIo, "checkpoint: no committed checkpoint under {} verifies", root);
}

// ---------------------------------------------------------------------------------------------
// Reading with re-slicing

Result<Loaded> Loaded::open(const std::string& step_dir, Manifest m) {
  Loaded l;
  l.dir_ = step_dir;
  for (const FileRecord& f : m.files) {
    FP8_ASSIGN_OR_RETURN(auto r, safetensors::Reader::open((fs::path(step_dir) / f.file).string()));
    l.readers_.emplace(f.file, std::move(r));
  }
  l.m_ = std::move(m);
  return l;
}

Status Loaded::read(std::string_view name, std::string_view dtype, int64_t begin, int64_t end,
                    void* out) const {
  const TensorRecord* t = m_.find(name);
  if (!t) return FP8_ERROR(Code::kNotFound, "checkpoint {}: no tensor '{}'", dir_, name);
  if (t->dtype != dtype || begin < 0 || end < begin || end > t->numel()) {
    return FP8_INVALID("checkpoint {}: tensor '{}' is {} with {} elements; asked for {} [{}, {})",
                       dir_, name, t->dtype, t->numel(), dtype, begin, end);
  }
  const size_t esize = safetensors::dtype_size(dtype);
  auto* dst = static_cast<uint8_t*>(out);
  int64_t cursor = begin;
  while (cursor < end) {
    const ShardRecord* s = nullptr;
    for (const ShardRecord& c : t->shards) {
      if (c.begin <= cursor && cursor < c.end) s = &c;
    }
    if (!s)
      return FP8_INVALID("checkpoint {}: tensor '{}': element {} is in no shard", dir_, name,
                         cursor);
    const auto it = readers_.find(s->file);
    const safetensors::TensorView* v = it == readers_.end() ? nullptr : it->second.find(name);
    if (!v || v->nbytes != size_t(s->end - s->begin) * esize)
      return FP8_INVALID("checkpoint {}: tensor '{}' in {} does not match the manifest", dir_, name,
                         s->file);
    const int64_t stop = std::min(end, s->end);
    std::memcpy(dst + size_t(cursor - begin) * esize, v->data + size_t(cursor - s->begin) * esize,
                size_t(stop - cursor) * esize);
    cursor = stop;
  }
  return Status::Ok();
}

}  // namespace fp8pipe::ckpt
