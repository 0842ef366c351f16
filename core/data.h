// Token data: sources (a synthetic Markov chain with a known loss floor, flat token files,
// Megatron-LM indexed datasets), their writers, and the Batcher whose global order is a pure
// function of (seed, step), so every dp/pp layout, resume and re-shard sees the same tokens
// (DESIGN.md §2).
#pragma once

#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace fp8pipe::data {

// ---------------------------------------------------------------------------------------------
// Element types of token files. Megatron's .idx stores a numeric code (megatron_code); uint32 has
// none there (Megatron uses int32 for vocabularies >= 65500).
enum class TokenDType { kUInt8, kInt8, kInt16, kUInt16, kInt32, kUInt32, kInt64 };

const char* dtype_name(TokenDType t);  // "uint16"
int dtype_size(TokenDType t);          // bytes per token
// Megatron-LM's codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
// 8 uint16. 0 for uint32 (not representable).
int megatron_code(TokenDType t);
// Code → type; errors name the code, and the float codes (6, 7) are refused (not token ids).
Result<TokenDType> from_megatron_code(int code);
// "uint8|int8|int16|uint16|int32|uint32|int64" (any case) → type; errors list the choices.
Result<TokenDType> parse_token_dtype(std::string_view name);

// ---------------------------------------------------------------------------------------------
// Counter-based randomness: pure functions of their inputs, so any sample is reproducible alone.
uint64_t splitmix64(uint64_t x);            // the splitmix64 output mix of x + golden
uint64_t mix_keys(uint64_t a, uint64_t b);  // order-dependent hash of two keys
double uniform01(uint64_t bits);            // [0, 1) from the top 53 bits
// A pseudo-random permutation of [0, n) (Feistel network + cycle walking): O(1) memory per index.
int64_t permute_index(int64_t i, int64_t n, uint64_t key);

// ---------------------------------------------------------------------------------------------
// A read-only, random-access stream of token ids in [0, vocab_size()). Thread-safe for reads.
class TokenSource {
 public:
  static constexpr int64_t kInfinite = std::numeric_limits<int64_t>::max();
  virtual ~TokenSource() = default;

  virtual int64_t size() const = 0;  // tokens; kInfinite for generative sources
  virtual int64_t vocab_size() const = 0;
  // Tokens [offset, offset + n) into out[0..n); deterministic. Out-of-range ids are errors.
  virtual Status read(int64_t offset, int64_t n, int32_t* out) const = 0;
  virtual std::string describe() const = 0;
  // Generative sources only: the first n tokens of independent sequence `index` of random stream
  // `stream`. Finite sources return kUnimplemented.
  virtual Status sequence(uint64_t stream, uint64_t index, int64_t n, int32_t* out) const;
};

// ---------------------------------------------------------------------------------------------
// A seeded random order-1 Markov chain over the vocabulary with a known entropy rate.
//
// Chain: state s has `branching` successors: σ(s), where σ is one random cycle through all states
// (so the chain is irreducible), plus branching-1 other distinct random states, with probabilities
// ∝ Exp(1) draws (Dirichlet(1,..,1)). π is computed by power iteration (double) on the lazy chain
// (P + I)/2, which has the same fixed point and is aperiodic. Entropy rate, in nats:
//   H = Σ_s π(s) · H(P(·|s)),  H(P(·|s)) = -Σ_t P(t|s) log P(t|s).
//
// Sequences: sequence `index` of `stream` starts from a state drawn from π and walks the chain; its
// t-th draw uses splitmix64 of (seed, stream, index, t), so any sequence is produced alone.
//
// Loss floor: a sequence starts in π, so every position's marginal is π and, by the Markov
// property, the best prediction of x[t+1] from x[0..t] is P(·|x[t]), whose expected loss is H. The
// Batcher's rows are seq_len + 1 tokens (inputs x[0..T), targets x[1..T]), so every target has its
// predecessor and the floor is exactly H for any seq_len. Had the first token itself been a
// target (predicted from nothing / a BOS), that position costs H(π) >= H and the floor would be
// ((T-1)·H + H(π)) / T. loss_floor() gives both.
class SyntheticMarkov final : public TokenSource {
 public:
  // vocab_size >= 2, 1 <= branching <= vocab_size, vocab_size * branching <= 2^27.
  static Result<std::shared_ptr<SyntheticMarkov>> create(int64_t vocab_size, int branching,
                                                         uint64_t seed);

  int64_t size() const override { return kInfinite; }
  int64_t vocab_size() const override { return vocab_; }
  // The infinite stream is blocks of kReadBlock tokens, block b = sequence(kReadStream, b); the
  // first token of each block is a fresh draw from π (not conditioned on the previous block).
  Status read(int64_t offset, int64_t n, int32_t* out) const override;
  std::string describe() const override;
  Status sequence(uint64_t stream, uint64_t index, int64_t n, int32_t* out) const override;

  static constexpr int64_t kReadBlock = 1 << 16;
  static constexpr uint64_t kReadStream = 0x7265616400000000ull;  // "read"

  int branching() const { return branching_; }
  uint64_t seed() const { return seed_; }
  std::span<const int32_t> successors(int32_t s) const;  // `branching` distinct states
  std::span<const double> probs(int32_t s) const;        // P(successors[j] | s)
  double prob(int32_t from, int32_t to) const;           // 0 when `to` is not a successor
  const std::vector<double>& stationary() const { return pi_; }
  double entropy_rate() const { return entropy_rate_; }      // H, nats per token
  double stationary_entropy() const { return pi_entropy_; }  // H(π), nats
  // Expected cross-entropy of the optimal predictor per target (see the class comment).
  double loss_floor(int64_t seq_len, bool first_token_is_target = false) const;
  // max_s |(πP)(s) - π(s)| of the computed π (a fixed-point check).
  double stationary_residual() const;

 private:
  SyntheticMarkov() = default;
  void build_transitions();
  void compute_stationary();
  int32_t sample_next(int32_t s, double u) const;

  int64_t vocab_ = 0;
  int branching_ = 0;
  uint64_t seed_ = 0;
  std::vector<int32_t> next_;  // [vocab][branching]
  std::vector<double> prob_;   // [vocab][branching]
  std::vector<double> cdf_;    // [vocab][branching], last entry of each row exactly 1
  std::vector<double> pi_, pi_cdf_;
  double entropy_rate_ = 0, pi_entropy_ = 0;
};

class MappedFile;  // a read-only mmap of a whole file (data.cc)

// ---------------------------------------------------------------------------------------------
// A flat file of little-endian token ids of one integer type (no header), memory-mapped.
class TokenFile final : public TokenSource {
 public:
  // vocab_size 0: inferred as (max id + 1) by one pass over the file.
  static Result<std::shared_ptr<TokenFile>> open(const std::string& path, TokenDType dtype,
                                                 int64_t vocab_size = 0);
  int64_t size() const override { return tokens_; }
  int64_t vocab_size() const override { return vocab_; }
  Status read(int64_t offset, int64_t n, int32_t* out) const override;
  std::string describe() const override;
  TokenDType dtype() const { return dtype_; }

 private:
  TokenFile() = default;
  std::string path_;
  std::shared_ptr<const MappedFile> map_;
  TokenDType dtype_ = TokenDType::kUInt16;
  int64_t tokens_ = 0, vocab_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Megatron-LM's indexed dataset: PREFIX.bin (token ids) + PREFIX.idx, all little-endian:
//   char[9] magic "MMIDIDX\0\0" | u64 version = 1 | u8 dtype code (megatron_code)
//   | u64 sequence_count N | u64 document_count D
//   | i32 sequence_lengths[N] (tokens) | i64 sequence_pointers[N] (byte offsets into .bin)
//   | i64 document_indices[D]   (D = documents + 1: 0, then the sequence index ending each
//                                document; document d is sequences [di[d], di[d+1]))
// An optional trailing i8 mode per sequence (multimodal) is ignored. As a TokenSource it is the
// concatenation of all sequences in order, documents packed without masking (as DeepSeek-V3
// trains); spans give per-sequence and per-document access. Every header field is validated on
// open; errors name the file, the field and its value.
class MegatronIndexed final : public TokenSource {
 public:
  // vocab_size 0: inferred as (max id + 1) by one pass over the data.
  static Result<std::shared_ptr<MegatronIndexed>> open(const std::string& prefix,
                                                       int64_t vocab_size = 0);
  int64_t size() const override { return seq_begin_.back(); }
  int64_t vocab_size() const override { return vocab_; }
  Status read(int64_t offset, int64_t n, int32_t* out) const override;
  std::string describe() const override;

  TokenDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seq_begin_.size()) - 1; }
  int64_t num_documents() const { return static_cast<int64_t>(doc_seq_.size()) - 1; }
  // Token range [begin, end) in the concatenated stream.
  std::pair<int64_t, int64_t> sequence_span(int64_t i) const;
  std::pair<int64_t, int64_t> document_span(int64_t d) const;
  Result<std::vector<int32_t>> document(int64_t d) const;

 private:
  MegatronIndexed() = default;
  Status load_index(const uint8_t* p, uint64_t size, uint64_t bin_size);
  Status load_arrays(const uint8_t* lens, uint64_t n, uint64_t d, uint64_t bin_size);
  Status read_sequence_part(int64_t seq, int64_t skip, int64_t n, int32_t* out) const;

  std::string prefix_;
  std::shared_ptr<const MappedFile> bin_;
  TokenDType dtype_ = TokenDType::kUInt16;
  int64_t vocab_ = 0;
  std::vector<int64_t> seq_begin_{0};  // token offset of each sequence, plus the total
  std::vector<int64_t> seq_ptr_;       // byte offset of each sequence in .bin
  std::vector<int64_t> doc_seq_;       // document_indices
};

// ---------------------------------------------------------------------------------------------
// Writes PREFIX.bin (flat or Megatron) and, for Megatron, PREFIX.idx. Files appear atomically on
// finish() (written as .tmp, then renamed); an unfinished writer removes its temporaries.
enum class FileFormat { kFlat, kMegatron };

class TokenWriter {
 public:
  // Megatron needs a type with a code (not uint32).
  static Result<std::unique_ptr<TokenWriter>> create(const std::string& prefix, FileFormat format,
                                                     TokenDType dtype);
  ~TokenWriter();
  TokenWriter(const TokenWriter&) = delete;
  TokenWriter& operator=(const TokenWriter&) = delete;

  Status add_sequence(std::span<const int32_t> tokens);  // ids must fit the dtype
  Status end_document();  // Megatron: closes a document (flat files record no boundaries)
  Status add_document(std::span<const int32_t> tokens);  // add_sequence + end_document
  Status finish();

  int64_t tokens() const { return tokens_; }
  int64_t sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t documents() const { return static_cast<int64_t>(doc_idx_.size()) - 1; }
  std::string bin_path() const { return prefix_ + ".bin"; }
  std::string idx_path() const { return prefix_ + ".idx"; }

 private:
  TokenWriter() = default;
  Status write_index();

  std::string prefix_;
  FileFormat format_ = FileFormat::kFlat;
  TokenDType dtype_ = TokenDType::kUInt16;
  std::FILE* bin_ = nullptr;
  bool finished_ = false;
  int64_t tokens_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_idx_{0};
  std::vector<uint8_t> buf_;
};

// A flat token file at `path` in one call.
Status write_token_file(const std::string& path, std::span<const int32_t> tokens, TokenDType dtype);

// ---------------------------------------------------------------------------------------------
// Opening a source from the config's data section (configs/fp8pipe.proto `Data`).
struct SourceSpec {
  std::string source = "synthetic";  // synthetic | tokens | megatron
  std::string path;                  // tokens: the file; megatron: the .bin/.idx prefix
  std::string token_dtype = "uint16";
  int64_t vocab_size = 0;  // model.vocab_size; files: 0 infers it, else ids must be below it
  int order = 1;           // synthetic: only order 1 is implemented
  int branching = 4;
  uint64_t seed = 0;
};
Result<std::shared_ptr<TokenSource>> open_source(const SourceSpec& spec);

// ---------------------------------------------------------------------------------------------
// Global batches. Row r of step s is seq_len + 1 tokens: inputs = row[0..seq_len), targets =
// row[1..seq_len]. Its content is a pure function of (source, seed, split, s, r): the same
// (seed, step) gives the same batch whatever the dp/pp layout, so resumed or re-sharded runs see
// the same data, and the loader's whole state is the step number. A rank fills its rows
// [begin, end) without producing the others.
//
// Finite sources: window w = tokens [w·seq_len, w·seq_len + seq_len + 1) (neighbours share one
// token, so every token is a target once per epoch); W = (size - 1) / seq_len windows. The last
// max(1, round(heldout_fraction · W)) windows are held out (none when the fraction is 0), so train
// and held-out targets are disjoint. Global sample g = step · global_batch + row (with a batch
// plan: the samples of the earlier steps + row, so a ramp reads the same stream) is window
// perm_e(g mod W_split) of epoch e = g / W_split, perm_e a seeded Feistel permutation per epoch:
// each epoch visits every window of the split exactly once, in a fresh order.
// Generative sources: row reads sequence g of a stream keyed by (seed, split); train and held-out
// streams differ.
enum class Split { kTrain, kHeldout };
const char* split_name(Split s);

// Rows per training step: constant (train.global_batch), or rising in a batch-size ramp
// (train.batch_ramp; Megatron's --rampup-batch-size; DeepSeek-V3 §4.2 rises from 3072 to 15360
// sequences over its first 469B tokens). With c the samples trained before a step, n = (full -
// start) / increment rises spread over R ramp samples, the step trains
//   min(full, start + increment · floor(c · n / R))
// rows. That is a function of the step alone (c is the sum of the earlier steps' batches), so a
// resumed run recomputes its data position from the step number.
class BatchPlan {
 public:
  static Result<BatchPlan> constant(int64_t global_batch);
  static Result<BatchPlan> ramp(int64_t start, int64_t increment, int64_t ramp_samples,
                                int64_t full);

  int64_t full() const { return full_; }
  bool ramped() const { return ramp_steps() > 0; }
  // Steps before the first full batch (0 without a ramp).
  int64_t ramp_steps() const { return static_cast<int64_t>(first_.size()) - 1; }
  int64_t batch(int64_t step) const;         // rows of the 0-based step
  int64_t first_sample(int64_t step) const;  // samples trained before it
  int64_t steps_to(int64_t samples) const;   // the fewest steps that train >= samples
  // The distinct batches of the plan, ascending (the last is full()).
  std::vector<int64_t> sizes() const;

 private:
  int64_t full_ = 0;
  std::vector<int64_t> first_ = {0};  // first_sample of steps 0..ramp_steps()
};

struct BatchSpec {
  int64_t global_batch = 0;  // rows per step (held-out batches; training too without a plan)
  int64_t seq_len = 0;       // targets per row
  uint64_t seed = 0;
  double heldout_fraction = 0.01;  // [0, 1); finite sources only
  // Training rows per step when they vary (a batch ramp); null = global_batch every step. Its
  // full() must equal global_batch.
  std::shared_ptr<const BatchPlan> plan;
};

class Batcher {
 public:
  static Result<Batcher> create(std::shared_ptr<const TokenSource> source, const BatchSpec& spec);

  const BatchSpec& spec() const { return spec_; }
  int64_t row_len() const { return spec_.seq_len + 1; }
  // Finite sources: windows in the split; generative: TokenSource::kInfinite.
  int64_t windows(Split split) const;
  // Rows of step `step` of the split (the plan's batch for training, else global_batch).
  int64_t rows_in(Split split, int64_t step) const;
  // Window (finite) or sequence index (generative) read by row `row` of step `step`.
  int64_t sample_of(Split split, int64_t step, int64_t row) const;
  // Rows [row_begin, row_end) of step `step`, row-major into out[(row_end - row_begin) * row_len].
  Status fill(Split split, int64_t step, int64_t row_begin, int64_t row_end, int32_t* out) const;
  Result<std::vector<int32_t>> rows(Split split, int64_t step, int64_t row_begin,
                                    int64_t row_end) const;
  Result<std::vector<int32_t>> global_batch(Split split, int64_t step) const {
    return rows(split, step, 0, spec_.global_batch);
  }

 private:
  std::shared_ptr<const TokenSource> src_;
  BatchSpec spec_;
  bool generative_ = false;
  int64_t train_windows_ = 0, heldout_windows_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Byte-level tokenization (`fp8pipe prepare-data`): byte b → id b (0..255), and every document
// ends with kEndOfDocument = 256, so the vocabulary is kByteVocab = 257 ids.
inline constexpr int32_t kEndOfDocument = 256;
inline constexpr int64_t kByteVocab = 257;

// Documents of `text`: the whole text, or with split_docs each maximal run of non-blank lines
// (their newlines kept; blank = empty or only spaces/tabs/CR; blank lines are dropped). Each
// document's bytes then kEndOfDocument. Empty documents are skipped.
std::vector<std::vector<int32_t>> byte_documents(std::string_view text, bool split_docs);

// Fill-in-the-middle (DeepSeek-V3 §4.1: the Prefix-Suffix-Middle framework at a rate of 0.1,
// as DeepSeek-Coder): a document's bytes d (its end-of-document id set aside) are cut at two
// points i <= j into prefix d[0,i), middle d[i,j) and suffix d[j,n) and written
//   kFimBegin prefix kFimHole suffix kFimEnd middle kEndOfDocument,
// so the model learns to produce a middle from the text around it while the plain next-token
// objective stays unchanged. The sentinels take the ids after the bytes: FIM data needs
// model.vocab_size >= kByteFimVocab = 260.
inline constexpr int32_t kFimBegin = 257, kFimHole = 258, kFimEnd = 259;
inline constexpr int64_t kByteFimVocab = 260;

struct FimOptions {
  double rate = 0;    // share of documents rewritten, [0, 1]; 0 = off
  uint64_t seed = 0;  // document d is rewritten iff uniform01(mix_keys(seed, d)) < rate
};
// Document `index` of a run (counted from 0 over all input files), ending in kEndOfDocument, as
// PSM when `fim` picks it, else unchanged. The cut points are uniform over the positions that
// start a UTF-8 character (not 10xxxxxx continuation bytes) and both ends, drawn from
// mix_keys(seed, index), so the same (seed, index) always gives the same bytes.
std::vector<int32_t> fim_document(std::span<const int32_t> doc, int64_t index,
                                  const FimOptions& fim);
// The inverse: prefix + middle + suffix + kEndOfDocument of a PSM document, a plain document
// unchanged; errors name what is malformed (the sentinels missing, repeated or out of order).
Result<std::vector<int32_t>> unfim_document(std::span<const int32_t> doc);

struct PrepareOptions {
  FileFormat format = FileFormat::kFlat;
  TokenDType dtype = TokenDType::kUInt16;  // Megatron + uint32 is written as int32 (code 4)
  bool split_docs = false;
  FimOptions fim;
};
struct PrepareStats {
  int64_t files = 0, documents = 0, tokens = 0, bytes_in = 0;
  int64_t fim_documents = 0;               // documents written as PSM
  TokenDType dtype = TokenDType::kUInt16;  // as written
};
// Tokenizes `files` in order into OUT_PREFIX.bin (+ .idx for Megatron: one sequence per document).
Result<PrepareStats> prepare_byte_data(const std::string& out_prefix,
                                       std::span<const std::string> files,
                                       const PrepareOptions& opt);

}  // namespace fp8pipe::data
