// Training checkpoints (DESIGN.md §6, STYLE.md 9): self-describing per-rank safetensors shards, a
// manifest with checksums, and a COMMITTED marker written last, so a crash at any point leaves the
// previous checkpoint usable and a corrupt one is reported by file name, never silently loaded.
//
// On disk, under the checkpoint root:
//   latest                         text: the newest committed step dir name (moved after commit)
//   step_00000100/
//     rank_00000.safetensors       this rank's slices, one tensor per global name (see Slice)
//     rank_00001.safetensors ...
//     manifest.json                Manifest::to_json (format version, state, topology, checksums)
//     COMMITTED                    written last: the directory is complete and durable; JSON
//                                  {"step", "manifest_bytes", "manifest_crc32"}
// Every file is written as NAME.tmp, fsynced, renamed, and the directory fsynced.
//
// A shard file's tensor is named by its global name ("layers.3.attn.wq_a.weight", with
// ".exp_avg" / ".exp_avg_sq" for the bf16 Adam moments). It holds elements [begin, end) of the
// row-major flattened global tensor: stored with the global shape when it is the whole tensor, as
// 1-D [end - begin] otherwise. The file's __metadata__ has "slice:<name>" = {"shape": global
// shape, "begin", "end", "kind", "replica"} so a shard describes itself without the manifest.
//
// N ranks (save_distributed): rank 0 prepares the step directory, every rank calls
// write_rank_file() for its own slices, the RankFile records (small) are gathered to rank 0, and
// rank 0 alone calls commit(); every rank then learns the outcome together. The step to save at
// is a function of the step number, so all ranks agree (STYLE.md 8). One process uses
// Checkpointer (sync or async), which does all of it locally.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "core/safetensors.h"
#include "core/status.h"

namespace fp8pipe::ckpt {

inline constexpr int kFormatVersion = 1;
inline constexpr std::string_view kFormatName = "fp8pipe-checkpoint";
inline constexpr std::string_view kManifestFile = "manifest.json";
inline constexpr std::string_view kCommittedFile = "COMMITTED";
inline constexpr std::string_view kLatestFile = "latest";

std::string step_dir_name(int64_t step);  // "step_00000100"
std::string rank_file_name(int rank);     // "rank_00000.safetensors"
// The step of "step_00000100" (exactly "step_" + digits), or nullopt.
std::optional<int64_t> parse_step_dir_name(std::string_view name);

// The rank layout a checkpoint was written with. A different layout needs resharding.
struct Topology {
  int pp = 1, dp = 1, ep = 1, world = 1;
  bool operator==(const Topology&) const = default;
  std::string to_string() const;  // "pp=1 dp=1 ep=1 world=1"
};

// What a tensor holds. Model weights (what `fp8pipe ckpt export` writes) are kParam and
// kRouterBias; the moments are the optimizer's; kEma the weights' moving average
// (optim.ema_decay, named "<param>.ema", fp32), which `ckpt export --ema` writes instead.
enum class Kind { kParam, kExpAvg, kExpAvgSq, kRouterBias, kEma };
const char* kind_name(Kind k);  // "param", "exp_avg", "exp_avg_sq", "router_bias", "ema"
std::optional<Kind> parse_kind(std::string_view s);

// One rank's piece of a global tensor: elements [begin, end) of its row-major flattening.
// `replica` numbers copies of state that several ranks hold (0 for state held once); readers take
// any complete replica.
struct Slice {
  std::string name;  // global name
  Kind kind = Kind::kParam;
  std::string dtype;           // safetensors dtype of the stored values: "F32" or "BF16"
  std::vector<int64_t> shape;  // global shape
  int64_t begin = 0, end = 0;
  int replica = 0;
  std::span<const uint8_t> bytes;  // (end - begin) * dtype size; borrowed unless `owned`
  std::shared_ptr<const std::vector<uint8_t>> owned;

  // Copies borrowed bytes into `owned` (async saves: the caller may change its tensors after).
  void own();
};

// One rank's resumable state besides tensors. Data batches and the trainer's randomness are
// counter-based (pure functions of (seed, step)), so the step is the data position and the RNG
// state is (seed, counter).
struct RankState {
  int rank = 0, pp_rank = 0, dp_rank = 0;
  int64_t data_step = 0;
  uint64_t rng_seed = 0;
  int64_t rng_counter = 0;
  int64_t skipped_steps = 0;
};

struct FileRecord {
  std::string file;  // name within the step directory
  int rank = 0;
  uint64_t bytes = 0;
  uint32_t crc32 = 0;  // zlib crc32 of the whole file
};

struct ShardRecord {
  std::string file;
  int rank = 0;
  int64_t begin = 0, end = 0;
  int replica = 0;
};

struct TensorRecord {
  std::string name;
  Kind kind = Kind::kParam;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<ShardRecord> shards;
  int64_t numel() const;
};

// manifest.json. Fields (JSON keys): format ("fp8pipe-checkpoint"), version, step, tokens_seen,
// optimizer_step, skipped_steps, config (resolved text format), topology {pp, dp, ep, world},
// ranks [{rank, pp_rank, dp_rank, data_step, rng: {seed, counter}, skipped_steps}],
// files [{file, rank, bytes, crc32}], tensors [{name, kind, dtype, shape, shards: [{file, rank,
// begin, end, replica}]}]. Unknown keys are rejected (a newer writer must bump the version).
struct Manifest {
  int version = kFormatVersion;
  int64_t step = 0, tokens_seen = 0, optimizer_step = 0, skipped_steps = 0;
  std::string config;
  Topology topology;
  std::vector<RankState> ranks;
  std::vector<FileRecord> files;
  std::vector<TensorRecord> tensors;

  std::string to_json() const;
  static Result<Manifest> from_json(std::string_view text, const std::string& label);
  const TensorRecord* find(std::string_view name) const;
};

// Everything one rank contributes to a checkpoint at one step.
struct SaveRequest {
  int64_t step = 0, tokens_seen = 0, optimizer_step = 0, skipped_steps = 0;
  std::string config;
  Topology topology;
  RankState rank;
  std::vector<Slice> slices;
};

// ---------------------------------------------------------------------------------------------
// Writing

// What a rank reports to rank 0 after writing its shard file.
struct RankFile {
  FileRecord file;
  RankState state;
  std::vector<TensorRecord> tensors;  // one shard each
};

// Writes <step_dir>/rank_NNNNN.safetensors atomically (tmp, fsync, rename, directory fsync);
// the checksum is computed from the bytes written.
Result<RankFile> write_rank_file(const std::string& step_dir, const SaveRequest& req);

// Rank 0, after every rank's file is durable: builds and checks the manifest (every tensor
// covered exactly once per replica), writes manifest.json then COMMITTED, then moves `latest`.
Status commit(const std::string& root, const SaveRequest& req, std::vector<RankFile> files);

struct Options {
  std::string root;
  int keep_last = 2;       // newest N committed kept; 0 = all
  int64_t keep_every = 0;  // also keep steps that are multiples; 0 = none
  bool async = false;
};

// The whole single-process save: (re)creates the step dir, write_rank_file, commit, retention.
// Test hook: with FP8PIPE_TEST_CRASH_IN_SAVE=1 in the environment the process _exit(1)s after
// the rank files are written, before manifest.json and COMMITTED (a crash mid-save).
Status save(const Options& opt, const SaveRequest& req);

// The collectives an N-rank save needs, supplied by the caller (the trainer, over MPI), so this
// library does not depend on the communication layer.
struct Collective {
  int rank = 0, size = 1;
  // MIN over ranks of `ok`: true only if every rank passed true. Also the barrier.
  std::function<Result<bool>(bool ok)> agree;
  // Rank 0 gets every rank's string, by rank; other ranks get an empty vector.
  std::function<Result<std::vector<std::string>>(const std::string& mine)> gather;
};

// The N-rank save (synchronous): rank 0 (re)creates the step dir; all write their rank file;
// the records are gathered; rank 0 commits and applies retention; the outcome is agreed, so every
// rank fails if any did. FP8PIPE_TEST_CRASH_IN_SAVE=1 exits after the rank files, as in save().
Status save_distributed(const Options& opt, const SaveRequest& req, const Collective& col);

// Saves with save(), synchronously or on a background thread. Async: save() first finishes the
// previous save and returns its error if it failed (then this request is not started); otherwise
// it copies the slices into host buffers, starts the write and returns. An error of the last write
// is returned by finish(). The destructor waits for a pending write and logs its error.
//
// N ranks (`col` given, size > 1): every rank calls save() and finish() at the same points.
// Sync: save() is save_distributed(). Async: save() runs the first agreement (rank 0 has created
// the step directory) on the calling thread and writes this rank's file on a background thread;
// finish(col), the second half, waits for it, then gathers the records, rank 0 commits, and every
// rank learns the outcome (as save_distributed). The checkpoint is committed only then: callers
// finish at a fixed point (the trainer: after the next step), so the write overlaps that step.
class Checkpointer {
 public:
  explicit Checkpointer(Options opt) : opt_(std::move(opt)) {}
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  Status save(SaveRequest req, const Collective* col = nullptr);
  // Waits for a pending async write and (N ranks) commits it; its status. An N-rank save pending
  // needs the same `col` (collective: every rank calls it).
  Status finish(const Collective* col = nullptr);
  // The step of an N-rank async save written or being written but not committed yet.
  std::optional<int64_t> uncommitted_step() const;
  const Options& options() const { return opt_; }

 private:
  Options opt_;
  std::thread worker_;
  Status pending_;  // written by the worker, read after join (one process)
  // N ranks, async: the request without its slices (for the commit) and the worker's result.
  std::optional<SaveRequest> dist_meta_;
  Result<RankFile> dist_file_ = Status(Code::kInternal, "no rank file written");
};

// ---------------------------------------------------------------------------------------------
// Retention

struct StepDir {
  int64_t step = 0;
  bool committed = false;
};
// Step directories under `root`, ascending by step.
std::vector<StepDir> list_step_dirs(const std::string& root);
// Steps to delete (a pure function): committed steps outside the newest keep_last (0 = all) and
// not multiples of keep_every (> 0), and uncommitted steps older than the newest committed. The
// newest committed step is never deleted; newer uncommitted ones (a save in flight) are kept.
std::vector<int64_t> retention_deletions(const std::vector<StepDir>& dirs, int keep_last,
                                         int64_t keep_every);
// Applies retention_deletions: removes COMMITTED first, then the directory.
Status apply_retention(const std::string& root, int keep_last, int64_t keep_every);

// ---------------------------------------------------------------------------------------------
// Reading

// zlib crc32 of a whole file and its size (streamed).
Result<std::pair<uint32_t, uint64_t>> file_crc32(const std::string& path);

// Reads and parses <step_dir>/manifest.json without checking files (inspection).
Result<Manifest> read_manifest(const std::string& step_dir);

// Checks one step directory: COMMITTED present, manifest matches its checksum there and parses,
// every file present with its recorded size and crc32, every tensor covered exactly once per
// replica. All failures are listed in one error, each naming the file with the expected and actual
// size/crc.
Result<Manifest> verify(const std::string& step_dir);

struct Resolved {
  std::string step_dir;
  Manifest manifest;
};
// The checkpoint to resume from under `root`. `which`: "" for the newest committed (`latest`,
// or a newer committed one if the process died between COMMITTED and `latest`), else a step
// directory path, a step dir name or a step number. nullopt (not an error): no committed
// checkpoint. If the chosen checkpoint fails verify(): an error, or with `fallback` (and `which`
// empty) the next older committed checkpoint that verifies, with a warning per skipped one.
Result<std::optional<Resolved>> resolve(const std::string& root, const std::string& which,
                                        bool fallback);

// A verified checkpoint with its shard files mapped: reads any [begin, end) of a global tensor,
// assembled from whichever shards cover it (the re-slice used when the layout changed).
class Loaded {
 public:
  static Result<Loaded> open(const std::string& step_dir, Manifest m);
  const Manifest& manifest() const { return m_; }
  const std::string& step_dir() const { return dir_; }
  // Copies elements [begin, end) of tensor `name` into out ((end - begin) * dtype size bytes).
  // Fails naming the tensor if it is absent, is not `dtype`, or has a gap in [begin, end).
  Status read(std::string_view name, std::string_view dtype, int64_t begin, int64_t end,
              void* out) const;

 private:
  std::string dir_;
  Manifest m_;
  std::map<std::string, safetensors::Reader> readers_;  // by file name
};

}  // namespace fp8pipe::ckpt
