// Token data (core/data.h): token sources, their writers and the deterministic Batcher. Everything
// random here is counter-based (splitmix64 of keys and indices), so every sample can be produced on
// its own: no hidden generator state to checkpoint, and any rank can compute any row.
#include "core/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/log.h"

namespace fp8pipe::data {

static_assert(std::endian::native == std::endian::little, "token files are little-endian");

// ---------------------------------------------------------------------------------------------
// Element types

namespace {
struct DTypeInfo {
  TokenDType type;
  const char* name;
  int size;
  int code;  // Megatron-LM code, 0 = none
  int64_t min, max;
};
constexpr DTypeInfo kDTypes[] = {
    {TokenDType::kUInt8, "uint8", 1, 1, 0, 255},
    {TokenDType::kInt8, "int8", 1, 2, -128, 127},
    {TokenDType::kInt16, "int16", 2, 3, -32768, 32767},
    {TokenDType::kUInt16, "uint16", 2, 8, 0, 65535},
    {TokenDType::kInt32, "int32", 4, 4, INT32_MIN, INT32_MAX},
    {TokenDType::kUInt32, "uint32", 4, 0, 0, UINT32_MAX},
    {TokenDType::kInt64, "int64", 8, 5, INT64_MIN, INT64_MAX},
};
const DTypeInfo& info(TokenDType t) {
  for (const auto& d : kDTypes) {
    if (d.type == t) return d;
  }
  return kDTypes[0];
}
constexpr const char* kValidCodes = "1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16";
}  // namespace

const char* dtype_name(TokenDType t) { return info(t).name; }
int dtype_size(TokenDType t) { return info(t).size; }
int megatron_code(TokenDType t) { return info(t).code; }

Result<TokenDType> from_megatron_code(int code) {
  for (const auto& d : kDTypes) {
    if (d.code != 0 && d.code == code) return d.type;
  }
  if (code == 6 || code == 7) {
    return FP8_INVALID("dtype code {} ({}) is a float type, not token ids; valid codes: {}", code,
                       code == 6 ? "float64" : "float32", kValidCodes);
  }
  return FP8_INVALID("unknown dtype code {}; valid codes: {}", code, kValidCodes);
}

Result<TokenDType> parse_token_dtype(std::string_view name) {
  std::string lower(name);
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& d : kDTypes) {
    if (lower == d.name) return d.type;
  }
  return FP8_INVALID(
      "token dtype '{}' is not one of uint8, int8, int16, uint16, int32, uint32, "
      "int64",
      name);
}

// ---------------------------------------------------------------------------------------------
// Counter-based randomness

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t mix_keys(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) + b); }

double uniform01(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

namespace {
// The t-th output of the splitmix64 generator seeded with `key`.
uint64_t draw(uint64_t key, uint64_t t) { return splitmix64(key + t * kGolden); }
// Uniform integer in [0, n) (multiply-shift; bias < n / 2^64).
uint64_t below(uint64_t bits, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * n) >> 64);
}
}  // namespace

int64_t permute_index(int64_t i, int64_t n, uint64_t key) {
  if (n <= 1) return 0;
  const int bits = 64 - std::countl_zero(static_cast<uint64_t>(n - 1));
  const int half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t x = static_cast<uint64_t>(i);
  do {  // cycle walking: the Feistel network permutes [0, 4^half) ⊇ [0, n)
    uint64_t l = x >> half, r = x & mask;
    for (uint64_t round = 0; round < 6; ++round) {
      const uint64_t f = splitmix64(mix_keys(key, round) ^ r) & mask;
      const uint64_t nl = r;
      r = l ^ f;
      l = nl;
    }
    x = (l << half) | r;
  } while (x >= static_cast<uint64_t>(n));
  return static_cast<int64_t>(x);
}

// ---------------------------------------------------------------------------------------------
// Memory-mapped files and decoding

class MappedFile {
 public:
  static Result<std::shared_ptr<const MappedFile>> open(const std::string& path);
  ~MappedFile() {
    if (base_) ::munmap(base_, size_);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(base_); }
  uint64_t size() const { return size_; }

 private:
  void* base_ = nullptr;
  uint64_t size_ = 0;
};

Result<std::shared_ptr<const MappedFile>> MappedFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const Code code = errno == ENOENT ? Code::kNotFound : Code::kIo;
    return FP8_ERROR(code, "{}: cannot open: {}", path, std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return FP8_ERROR(Code::kIo, "{}: not a regular file", path);
  }
  auto m = std::make_shared<MappedFile>();
  m->size_ = static_cast<uint64_t>(st.st_size);
  if (m->size_ > 0) {
    void* p = ::mmap(nullptr, m->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return FP8_ERROR(Code::kIo, "{}: mmap of {} bytes failed: {}", path, m->size_,
                       std::strerror(err));
    }
    m->base_ = p;
  }
  ::close(fd);
  return std::shared_ptr<const MappedFile>(std::move(m));
}

namespace {

// The largest vocabulary ids can address as int32; used while inferring a file's vocabulary.
constexpr int64_t kMaxVocab = int64_t{1} << 31;

// Decodes n ids of type T; returns the index of the first id outside [0, vocab) (its value in
// *bad), or -1.
template <typename T>
int64_t decode_as(const uint8_t* src, int64_t n, int64_t vocab, int32_t* out, int64_t* bad) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, src + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
    const auto x = static_cast<int64_t>(v);
    if (x < 0 || x >= vocab) {
      *bad = x;
      return i;
    }
    out[i] = static_cast<int32_t>(x);
  }
  return -1;
}

int64_t decode(TokenDType t, const uint8_t* src, int64_t n, int64_t vocab, int32_t* out,
               int64_t* bad) {
  switch (t) {
    case TokenDType::kUInt8:
      return decode_as<uint8_t>(src, n, vocab, out, bad);
    case TokenDType::kInt8:
      return decode_as<int8_t>(src, n, vocab, out, bad);
    case TokenDType::kInt16:
      return decode_as<int16_t>(src, n, vocab, out, bad);
    case TokenDType::kUInt16:
      return decode_as<uint16_t>(src, n, vocab, out, bad);
    case TokenDType::kInt32:
      return decode_as<int32_t>(src, n, vocab, out, bad);
    case TokenDType::kUInt32:
      return decode_as<uint32_t>(src, n, vocab, out, bad);
    case TokenDType::kInt64:
      return decode_as<int64_t>(src, n, vocab, out, bad);
  }
  return -1;
}

// What an id outside the vocabulary is likely to be, and the setting that admits it.
std::string vocab_hint(int64_t bad) {
  if (bad == kEndOfDocument) {
    return fmt::format(" (prepare-data's end-of-document id: model.vocab_size >= {})", kByteVocab);
  }
  if (bad > kEndOfDocument && bad < kByteFimVocab) {
    return fmt::format(
        " (a fill-in-the-middle sentinel of prepare-data --fim-rate: model.vocab_size >= {})",
        kByteFimVocab);
  }
  return " (model.vocab_size; 0 infers it from the data)";
}

Status check_read(const std::string& what, int64_t offset, int64_t n, int64_t size) {
  if (offset < 0 || n < 0 || offset > size || n > size - offset) {
    return FP8_INVALID("{}: read of tokens [{}, {}) is outside [0, {})", what, offset, offset + n,
                       size);
  }
  return Status::Ok();
}

// Max id + 1 over the whole source (whose vocab must be kMaxVocab during the scan).
Result<int64_t> infer_vocab(const TokenSource& src) {
  std::vector<int32_t> buf(1 << 16);
  int64_t max_id = -1;
  for (int64_t off = 0; off < src.size(); off += static_cast<int64_t>(buf.size())) {
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(buf.size()), src.size() - off);
    FP8_RETURN_IF_ERROR(src.read(off, n, buf.data()));
    for (int64_t i = 0; i < n; ++i) max_id = std::max<int64_t>(max_id, buf[i]);
  }
  return max_id + 1;
}

Status check_vocab_arg(const std::string& what, int64_t vocab) {
  if (vocab < 0 || vocab > kMaxVocab) {
    return FP8_INVALID("{}: vocab_size {} is outside [0, 2^31] (0 = infer from the data)", what,
                       vocab);
  }
  return Status::Ok();
}

}  // namespace

Status TokenSource::sequence(uint64_t, uint64_t, int64_t, int32_t*) const {
  return FP8_ERROR(Code::kUnimplemented, "{}: not a generative source (no sequence())", describe());
}

// ---------------------------------------------------------------------------------------------
// SyntheticMarkov

Result<std::shared_ptr<SyntheticMarkov>> SyntheticMarkov::create(int64_t vocab_size, int branching,
                                                                 uint64_t seed) {
  if (vocab_size < 2 || vocab_size > INT32_MAX) {
    return FP8_INVALID("synthetic data: vocab_size {} is outside [2, 2^31)", vocab_size);
  }
  if (branching < 1 || branching > vocab_size) {
    return FP8_INVALID("synthetic data: branching {} is outside [1, vocab_size = {}]", branching,
                       vocab_size);
  }
  if (vocab_size * branching > (int64_t{1} << 27)) {
    return FP8_INVALID("synthetic data: vocab_size {} x branching {} exceeds 2^27 transitions",
                       vocab_size, branching);
  }
  std::shared_ptr<SyntheticMarkov> m(new SyntheticMarkov());
  m->vocab_ = vocab_size;
  m->branching_ = branching;
  m->seed_ = seed;
  m->build_transitions();
  m->compute_stationary();
  return m;
}

void SyntheticMarkov::build_transitions() {
  const int64_t V = vocab_, k = branching_;
  const uint64_t key = mix_keys(seed_, 0x636861696e);  // "chain"
  // σ: one cycle through a random ordering of all states (makes the chain irreducible).
  std::vector<int32_t> order(V);
  for (int64_t i = 0; i < V; ++i) order[i] = static_cast<int32_t>(i);
  for (int64_t i = V - 1; i > 0; --i) std::swap(order[i], order[below(draw(key, i), i + 1)]);
  std::vector<int32_t> sigma(V);
  for (int64_t i = 0; i < V; ++i) sigma[order[i]] = order[(i + 1) % V];

  next_.assign(V * k, 0);
  prob_.assign(V * k, 0.0);
  cdf_.assign(V * k, 0.0);
  std::vector<uint8_t> taken(V, 0);
  for (int64_t s = 0; s < V; ++s) {
    const uint64_t ks = mix_keys(key, static_cast<uint64_t>(s) + 1);
    int32_t* succ = &next_[s * k];
    succ[0] = sigma[s];
    // Floyd's sampling of k-1 distinct states out of the V-1 others (index j skips σ(s)).
    const auto pick = [&](int64_t j) { return static_cast<int32_t>(j < sigma[s] ? j : j + 1); };
    int64_t filled = 1;
    for (int64_t j = (V - 1) - (k - 1); j < V - 1; ++j) {
      const int64_t t = static_cast<int64_t>(below(draw(ks, j), j + 1));
      const int32_t c = taken[pick(t)] ? pick(j) : pick(t);
      taken[c] = 1;
      succ[filled++] = c;
    }
    for (int64_t j = 1; j < k; ++j) taken[succ[j]] = 0;
    // Probabilities ∝ Exp(1) draws, floored so that every edge (σ's included) stays positive.
    double total = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double u = (static_cast<double>(draw(ks, V + j) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
      prob_[s * k + j] = std::max(-std::log(u), 1e-6);
      total += prob_[s * k + j];
    }
    double c = 0;
    for (int64_t j = 0; j < k; ++j) {
      prob_[s * k + j] /= total;
      c += prob_[s * k + j];
      cdf_[s * k + j] = c;
    }
    cdf_[s * k + k - 1] = 1.0;
  }
}

void SyntheticMarkov::compute_stationary() {
  const int64_t V = vocab_, k = branching_;
  pi_.assign(V, 1.0 / static_cast<double>(V));
  std::vector<double> nxt(V);
  constexpr int kMaxIters = 200000;
  int it = 0;
  double prev = 2.0;
  for (; it < kMaxIters; ++it) {  // lazy chain (P + I)/2: same fixed point, aperiodic
    for (int64_t s = 0; s < V; ++s) nxt[s] = 0.5 * pi_[s];
    for (int64_t s = 0; s < V; ++s) {
      for (int64_t j = 0; j < k; ++j) nxt[next_[s * k + j]] += 0.5 * pi_[s] * prob_[s * k + j];
    }
    double total = 0, diff = 0;
    for (double x : nxt) total += x;
    for (int64_t s = 0; s < V; ++s) {
      nxt[s] /= total;
      diff += std::abs(nxt[s] - pi_[s]);
    }
    pi_.swap(nxt);
    // The L1 step shrinks monotonically (a Markov operator contracts); once it stops shrinking
    // near zero it is rounding noise.
    if (diff < 1e-15 || (diff < 1e-11 && diff >= prev)) break;
    prev = diff;
  }
  if (it == kMaxIters) {
    log::warn("synthetic data: power iteration stopped after {} iterations (residual {:.3g})",
              kMaxIters, stationary_residual());
  }
  entropy_rate_ = pi_entropy_ = 0;
  pi_cdf_.assign(V, 0.0);
  double c = 0;
  for (int64_t s = 0; s < V; ++s) {
    double h = 0;
    for (int64_t j = 0; j < k; ++j) h -= prob_[s * k + j] * std::log(prob_[s * k + j]);
    entropy_rate_ += pi_[s] * h;
    pi_entropy_ -= pi_[s] * std::log(pi_[s]);
    c += pi_[s];
    pi_cdf_[s] = c;
  }
  pi_cdf_[V - 1] = 1.0;
}

double SyntheticMarkov::stationary_residual() const {
  const int64_t V = vocab_, k = branching_;
  std::vector<double> p(V, 0.0);
  for (int64_t s = 0; s < V; ++s) {
    for (int64_t j = 0; j < k; ++j) p[next_[s * k + j]] += pi_[s] * prob_[s * k + j];
  }
  double worst = 0;
  for (int64_t s = 0; s < V; ++s) worst = std::max(worst, std::abs(p[s] - pi_[s]));
  return worst;
}

std::span<const int32_t> SyntheticMarkov::successors(int32_t s) const {
  return {next_.data() + static_cast<int64_t>(s) * branching_, static_cast<size_t>(branching_)};
}

std::span<const double> SyntheticMarkov::probs(int32_t s) const {
  return {prob_.data() + static_cast<int64_t>(s) * branching_, static_cast<size_t>(branching_)};
}

double SyntheticMarkov::prob(int32_t from, int32_t to) const {
  const auto succ = successors(from);
  for (size_t j = 0; j < succ.size(); ++j) {
    if (succ[j] == to) return probs(from)[j];
  }
  return 0.0;
}

double SyntheticMarkov::loss_floor(int64_t seq_len, bool first_token_is_target) const {
  if (!first_token_is_target || seq_len <= 0) return entropy_rate_;
  const auto T = static_cast<double>(seq_len);
  return ((T - 1) * entropy_rate_ + pi_entropy_) / T;
}

int32_t SyntheticMarkov::sample_next(int32_t s, double u) const {
  const double* c = cdf_.data() + static_cast<int64_t>(s) * branching_;
  const int64_t j = std::upper_bound(c, c + branching_, u) - c;
  return next_[static_cast<int64_t>(s) * branching_ + std::min<int64_t>(j, branching_ - 1)];
}

Status SyntheticMarkov::sequence(uint64_t stream, uint64_t index, int64_t n, int32_t* out) const {
  if (n < 0) return FP8_INVALID("synthetic data: negative sequence length {}", n);
  if (n == 0) return Status::Ok();
  const uint64_t key = mix_keys(mix_keys(seed_, stream), index);
  const double u0 = uniform01(draw(key, 0));
  const int64_t s0 = std::upper_bound(pi_cdf_.begin(), pi_cdf_.end(), u0) - pi_cdf_.begin();
  out[0] = static_cast<int32_t>(std::min<int64_t>(s0, vocab_ - 1));
  for (int64_t t = 1; t < n; ++t) out[t] = sample_next(out[t - 1], uniform01(draw(key, t)));
  return Status::Ok();
}

Status SyntheticMarkov::read(int64_t offset, int64_t n, int32_t* out) const {
  if (offset < 0 || n < 0 || n > kInfinite - offset) {
    return FP8_INVALID("{}: read of {} tokens at offset {} is out of range", describe(), n, offset);
  }
  std::vector<int32_t> block;
  while (n > 0) {
    const int64_t b = offset / kReadBlock, within = offset % kReadBlock;
    const int64_t take = std::min(n, kReadBlock - within);
    block.resize(within + take);
    FP8_RETURN_IF_ERROR(
        sequence(kReadStream, static_cast<uint64_t>(b), within + take, block.data()));
    std::copy(block.begin() + within, block.end(), out);
    out += take;
    offset += take;
    n -= take;
  }
  return Status::Ok();
}

std::string SyntheticMarkov::describe() const {
  return fmt::format(
      "synthetic Markov chain (vocab {}, branching {}, seed {}, entropy rate {:.6f} "
      "nats/token)",
      vocab_, branching_, seed_, entropy_rate_);
}

// ---------------------------------------------------------------------------------------------
// TokenFile

Result<std::shared_ptr<TokenFile>> TokenFile::open(const std::string& path, TokenDType dtype,
                                                   int64_t vocab_size) {
  FP8_RETURN_IF_ERROR(check_vocab_arg(path, vocab_size));
  std::shared_ptr<TokenFile> f(new TokenFile());
  f->path_ = path;
  f->dtype_ = dtype;
  FP8_ASSIGN_OR_RETURN(f->map_, MappedFile::open(path));
  const uint64_t item = static_cast<uint64_t>(dtype_size(dtype));
  if (f->map_->size() % item != 0) {
    return FP8_INVALID("{}: size {} bytes is not a multiple of {} bytes per {} token", path,
                       f->map_->size(), item, dtype_name(dtype));
  }
  f->tokens_ = static_cast<int64_t>(f->map_->size() / item);
  f->vocab_ = vocab_size > 0 ? vocab_size : kMaxVocab;
  if (vocab_size == 0) {
    FP8_ASSIGN_OR_RETURN(f->vocab_, infer_vocab(*f));
  }
  return f;
}

Status TokenFile::read(int64_t offset, int64_t n, int32_t* out) const {
  FP8_RETURN_IF_ERROR(check_read(path_, offset, n, tokens_));
  int64_t bad = 0;
  const int64_t i =
      decode(dtype_, map_->data() + offset * dtype_size(dtype_), n, vocab_, out, &bad);
  if (i >= 0) {
    return FP8_INVALID("{}: token {} is {}, outside the vocabulary [0, {}){}", path_, offset + i,
                       bad, vocab_, vocab_hint(bad));
  }
  return Status::Ok();
}

std::string TokenFile::describe() const {
  return fmt::format("token file {} ({} {} tokens, vocab {})", path_, tokens_, dtype_name(dtype_),
                     vocab_);
}

// ---------------------------------------------------------------------------------------------
// MegatronIndexed

namespace {
constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string escape_bytes(const uint8_t* p, size_t n) {
  std::string s = "\"";
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"' && p[i] != '\\') {
      s += static_cast<char>(p[i]);
    } else {
      s += fmt::format("\\x{:02x}", p[i]);
    }
  }
  return s + "\"";
}
}  // namespace

Result<std::shared_ptr<MegatronIndexed>> MegatronIndexed::open(const std::string& prefix,
                                                               int64_t vocab_size) {
  FP8_RETURN_IF_ERROR(check_vocab_arg(prefix, vocab_size));
  std::shared_ptr<MegatronIndexed> m(new MegatronIndexed());
  m->prefix_ = prefix;
  FP8_ASSIGN_OR_RETURN(auto idx, MappedFile::open(prefix + ".idx"));
  FP8_ASSIGN_OR_RETURN(m->bin_, MappedFile::open(prefix + ".bin"));
  FP8_RETURN_IF_ERROR(m->load_index(idx->data(), idx->size(), m->bin_->size()));
  m->vocab_ = vocab_size > 0 ? vocab_size : kMaxVocab;
  if (vocab_size == 0) {
    FP8_ASSIGN_OR_RETURN(m->vocab_, infer_vocab(*m));
  }
  return m;
}

Status MegatronIndexed::load_index(const uint8_t* p, uint64_t size, uint64_t bin_size) {
  const std::string f = prefix_ + ".idx";
  if (size < kHeaderBytes) {
    return FP8_INVALID("{}: {} bytes, shorter than the {}-byte header", f, size, kHeaderBytes);
  }
  if (std::memcmp(p, kMagic, 9) != 0) {
    return FP8_INVALID(
        "{}: field 'magic' is {}, expected \"MMIDIDX\\x00\\x00\" (not a Megatron "
        "indexed dataset)",
        f, escape_bytes(p, 9));
  }
  if (const auto version = load<uint64_t>(p + 9); version != 1) {
    return FP8_INVALID("{}: field 'version' is {}, expected 1", f, version);
  }
  auto dt = from_megatron_code(p[17]);
  if (!dt.ok()) return dt.status().with_context(f + ": field 'dtype'");
  dtype_ = dt.value();
  const auto n = load<uint64_t>(p + 18), d = load<uint64_t>(p + 26);
  const auto need = static_cast<unsigned __int128>(kHeaderBytes) +
                    static_cast<unsigned __int128>(n) * 12 + static_cast<unsigned __int128>(d) * 8;
  if (need != size && need + n != size) {  // + n: optional int8 mode per sequence
    return FP8_INVALID(
        "{}: fields 'sequence_count' = {} and 'document_count' = {} imply {} bytes "
        "of index, but the file has {} (truncated or corrupt)",
        f, n, d, static_cast<uint64_t>(std::min<unsigned __int128>(need, ~0ull)), size);
  }
  if (d < 1) {
    return FP8_INVALID(
        "{}: field 'document_count' is 0, expected >= 1 (document_indices "
        "starts with 0)",
        f);
  }
  return load_arrays(p + kHeaderBytes, n, d, bin_size);
}

// The three arrays after the header (sizes already checked against the file).
Status MegatronIndexed::load_arrays(const uint8_t* lens, uint64_t n, uint64_t d,
                                    uint64_t bin_size) {
  const std::string f = prefix_ + ".idx";
  const uint8_t* ptrs = lens + 4 * n;
  const uint8_t* docs = ptrs + 8 * n;
  const int64_t item = dtype_size(dtype_);
  seq_begin_.assign(1, 0);
  seq_ptr_.resize(n);
  for (uint64_t i = 0; i < n; ++i) {
    const auto len = load<int32_t>(lens + 4 * i);
    const auto ptr = load<int64_t>(ptrs + 8 * i);
    if (len < 0) return FP8_INVALID("{}: field 'sequence_lengths[{}]' is {} (< 0)", f, i, len);
    if (ptr < 0 || static_cast<uint64_t>(ptr) > bin_size ||
        static_cast<uint64_t>(len * item) > bin_size - static_cast<uint64_t>(ptr)) {
      return FP8_INVALID(
          "{}: field 'sequence_pointers[{}]' is {} with length {} ({}), past the "
          "end of {}.bin ({} bytes)",
          f, i, ptr, len, dtype_name(dtype_), prefix_, bin_size);
    }
    seq_ptr_[i] = ptr;
    seq_begin_.push_back(seq_begin_.back() + len);
  }
  doc_seq_.resize(d);
  for (uint64_t i = 0; i < d; ++i) {
    const auto v = load<int64_t>(docs + 8 * i);
    const int64_t lo = i == 0 ? 0 : doc_seq_[i - 1];
    if (v < lo || (i == 0 && v != 0) || v > static_cast<int64_t>(n)) {
      return FP8_INVALID(
          "{}: field 'document_indices[{}]' is {}, expected {} (non-decreasing "
          "sequence indices from 0 to sequence_count = {})",
          f, i, v, i == 0 ? "0" : fmt::format("in [{}, {}]", lo, n), n);
    }
    doc_seq_[i] = v;
  }
  if (doc_seq_.back() != static_cast<int64_t>(n)) {
    return FP8_INVALID(
        "{}: field 'document_indices[{}]' (the last) is {}, expected "
        "sequence_count = {}",
        f, d - 1, doc_seq_.back(), n);
  }
  return Status::Ok();
}

std::pair<int64_t, int64_t> MegatronIndexed::sequence_span(int64_t i) const {
  return {seq_begin_[i], seq_begin_[i + 1]};
}

std::pair<int64_t, int64_t> MegatronIndexed::document_span(int64_t d) const {
  return {seq_begin_[doc_seq_[d]], seq_begin_[doc_seq_[d + 1]]};
}

Result<std::vector<int32_t>> MegatronIndexed::document(int64_t d) const {
  if (d < 0 || d >= num_documents()) {
    return FP8_INVALID("{}: document {} is outside [0, {})", prefix_, d, num_documents());
  }
  const auto [b, e] = document_span(d);
  std::vector<int32_t> out(e - b);
  FP8_RETURN_IF_ERROR(read(b, e - b, out.data()));
  return out;
}

Status MegatronIndexed::read_sequence_part(int64_t seq, int64_t skip, int64_t n,
                                           int32_t* out) const {
  const int64_t item = dtype_size(dtype_);
  int64_t bad = 0;
  const int64_t i =
      decode(dtype_, bin_->data() + seq_ptr_[seq] + skip * item, n, vocab_, out, &bad);
  if (i >= 0) {
    return FP8_INVALID("{}.bin: token {} (sequence {}) is {}, outside the vocabulary [0, {}){}",
                       prefix_, seq_begin_[seq] + skip + i, seq, bad, vocab_, vocab_hint(bad));
  }
  return Status::Ok();
}

Status MegatronIndexed::read(int64_t offset, int64_t n, int32_t* out) const {
  FP8_RETURN_IF_ERROR(check_read(prefix_, offset, n, size()));
  int64_t seq =
      std::upper_bound(seq_begin_.begin(), seq_begin_.end(), offset) - seq_begin_.begin() - 1;
  int64_t skip = offset - seq_begin_[std::max<int64_t>(seq, 0)];
  while (n > 0) {
    const int64_t take = std::min(n, seq_begin_[seq + 1] - seq_begin_[seq] - skip);
    FP8_RETURN_IF_ERROR(read_sequence_part(seq, skip, take, out));
    out += take;
    n -= take;
    ++seq;
    skip = 0;
  }
  return Status::Ok();
}

std::string MegatronIndexed::describe() const {
  return fmt::format("Megatron dataset {} ({} documents, {} sequences, {} {} tokens, vocab {})",
                     prefix_, num_documents(), num_sequences(), size(), dtype_name(dtype_), vocab_);
}

// ---------------------------------------------------------------------------------------------
// TokenWriter

namespace {
template <typename T>
void put(std::vector<uint8_t>& b, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof(T));
}

template <typename T>
void encode_as(std::span<const int32_t> tokens, std::vector<uint8_t>& b) {
  for (int32_t t : tokens) put<T>(b, static_cast<T>(t));
}

void encode(TokenDType t, std::span<const int32_t> tokens, std::vector<uint8_t>& b) {
  switch (t) {
    case TokenDType::kUInt8:
      return encode_as<uint8_t>(tokens, b);
    case TokenDType::kInt8:
      return encode_as<int8_t>(tokens, b);
    case TokenDType::kInt16:
      return encode_as<int16_t>(tokens, b);
    case TokenDType::kUInt16:
      return encode_as<uint16_t>(tokens, b);
    case TokenDType::kInt32:
      return encode_as<int32_t>(tokens, b);
    case TokenDType::kUInt32:
      return encode_as<uint32_t>(tokens, b);
    case TokenDType::kInt64:
      return encode_as<int64_t>(tokens, b);
  }
}

Status write_all(const std::string& path, std::span<const uint8_t> bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return FP8_ERROR(Code::kIo, "{}: cannot create: {}", path, std::strerror(errno));
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  if (std::fclose(f) != 0 || !ok) {
    return FP8_ERROR(Code::kIo, "{}: write failed: {}", path, std::strerror(errno));
  }
  return Status::Ok();
}
}  // namespace

Result<std::unique_ptr<TokenWriter>> TokenWriter::create(const std::string& prefix,
                                                         FileFormat format, TokenDType dtype) {
  if (format == FileFormat::kMegatron && megatron_code(dtype) == 0) {
    return FP8_INVALID("{}: Megatron indexed datasets have no code for {}; use int32 (code 4)",
                       prefix, dtype_name(dtype));
  }
  std::unique_ptr<TokenWriter> w(new TokenWriter());
  w->prefix_ = prefix;
  w->format_ = format;
  w->dtype_ = dtype;
  const std::string tmp = w->bin_path() + ".tmp";
  w->bin_ = std::fopen(tmp.c_str(), "wb");
  if (!w->bin_) return FP8_ERROR(Code::kIo, "{}: cannot create: {}", tmp, std::strerror(errno));
  return w;
}

TokenWriter::~TokenWriter() {
  if (bin_) std::fclose(bin_);
  if (!finished_) {
    std::remove((bin_path() + ".tmp").c_str());
    std::remove((idx_path() + ".tmp").c_str());
  }
}

Status TokenWriter::add_sequence(std::span<const int32_t> tokens) {
  if (finished_) return FP8_INVALID("{}: add_sequence after finish()", prefix_);
  if (tokens.size() > static_cast<size_t>(INT32_MAX)) {
    return FP8_INVALID("{}: sequence of {} tokens exceeds the int32 length field", prefix_,
                       tokens.size());
  }
  const DTypeInfo& di = info(dtype_);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < di.min || tokens[i] > di.max) {
      return FP8_INVALID("{}: token {} of sequence {} is {}, which does not fit {}", prefix_, i,
                         sequences(), tokens[i], di.name);
    }
  }
  buf_.clear();
  encode(dtype_, tokens, buf_);
  if (std::fwrite(buf_.data(), 1, buf_.size(), bin_) != buf_.size()) {
    return FP8_ERROR(Code::kIo, "{}.tmp: write failed: {}", bin_path(), std::strerror(errno));
  }
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
  tokens_ += static_cast<int64_t>(tokens.size());
  return Status::Ok();
}

Status TokenWriter::end_document() {
  doc_idx_.push_back(sequences());
  return Status::Ok();
}

Status TokenWriter::add_document(std::span<const int32_t> tokens) {
  FP8_RETURN_IF_ERROR(add_sequence(tokens));
  return end_document();
}

Status TokenWriter::write_index() {
  std::vector<uint8_t> b(kMagic, kMagic + 9);
  put<uint64_t>(b, 1);
  put<uint8_t>(b, static_cast<uint8_t>(megatron_code(dtype_)));
  put<uint64_t>(b, lengths_.size());
  put<uint64_t>(b, doc_idx_.size());
  for (int32_t len : lengths_) put<int32_t>(b, len);
  int64_t ptr = 0;
  for (int32_t len : lengths_) {
    put<int64_t>(b, ptr);
    ptr += static_cast<int64_t>(len) * dtype_size(dtype_);
  }
  for (int64_t di : doc_idx_) put<int64_t>(b, di);
  return write_all(idx_path() + ".tmp", b);
}

// Megatron: sequences after the last end_document() form a final document.
Status TokenWriter::finish() {
  if (finished_) return FP8_INVALID("{}: finish() called twice", prefix_);
  if (doc_idx_.back() != sequences()) FP8_RETURN_IF_ERROR(end_document());
  const int rc = std::fclose(bin_);
  bin_ = nullptr;
  if (rc != 0)
    return FP8_ERROR(Code::kIo, "{}.tmp: close failed: {}", bin_path(), std::strerror(errno));
  if (format_ == FileFormat::kMegatron) {
    FP8_RETURN_IF_ERROR(write_index());
    if (std::rename((idx_path() + ".tmp").c_str(), idx_path().c_str()) != 0) {
      return FP8_ERROR(Code::kIo, "{}: rename failed: {}", idx_path(), std::strerror(errno));
    }
  }
  if (std::rename((bin_path() + ".tmp").c_str(), bin_path().c_str()) != 0) {
    return FP8_ERROR(Code::kIo, "{}: rename failed: {}", bin_path(), std::strerror(errno));
  }
  finished_ = true;
  return Status::Ok();
}

Status write_token_file(const std::string& path, std::span<const int32_t> tokens,
                        TokenDType dtype) {
  const DTypeInfo& di = info(dtype);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < di.min || tokens[i] > di.max) {
      return FP8_INVALID("{}: token {} is {}, which does not fit {}", path, i, tokens[i], di.name);
    }
  }
  std::vector<uint8_t> b;
  encode(dtype, tokens, b);
  return write_all(path, b);
}

// ---------------------------------------------------------------------------------------------
// open_source

Result<std::shared_ptr<TokenSource>> open_source(const SourceSpec& spec) {
  std::string src = spec.source;
  for (auto& c : src) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (src == "synthetic") {
    if (spec.order != 1) {
      return FP8_ERROR(Code::kUnimplemented,
                       "data.synthetic.order is {}: only order 1 is implemented", spec.order);
    }
    FP8_ASSIGN_OR_RETURN(auto m,
                         SyntheticMarkov::create(spec.vocab_size, spec.branching, spec.seed));
    return std::shared_ptr<TokenSource>(std::move(m));
  }
  if (src != "tokens" && src != "megatron") {
    return FP8_INVALID("data.source is '{}'; valid choices: synthetic, tokens, megatron",
                       spec.source);
  }
  if (spec.path.empty()) {
    return FP8_INVALID("data.path is empty: data.source '{}' needs {}", src,
                       src == "tokens" ? "a flat token file" : "a .bin/.idx prefix");
  }
  if (src == "megatron") {
    FP8_ASSIGN_OR_RETURN(auto m, MegatronIndexed::open(spec.path, spec.vocab_size));
    return std::shared_ptr<TokenSource>(std::move(m));
  }
  auto dt = parse_token_dtype(spec.token_dtype);
  if (!dt.ok()) return dt.status().with_context("data.token_dtype");
  FP8_ASSIGN_OR_RETURN(auto f, TokenFile::open(spec.path, dt.value(), spec.vocab_size));
  return std::shared_ptr<TokenSource>(std::move(f));
}

// ---------------------------------------------------------------------------------------------
// Batcher

const char* split_name(Split s) { return s == Split::kTrain ? "train" : "heldout"; }

namespace {
uint64_t split_key(uint64_t seed, Split s) {
  return mix_keys(seed, s == Split::kTrain ? 0x747261696eull : 0x68656c646f7574ull);
}
}  // namespace

Result<Batcher> Batcher::create(std::shared_ptr<const TokenSource> source, const BatchSpec& spec) {
  if (!source) return FP8_INVALID("Batcher: no token source");
  if (spec.global_batch < 1 || spec.seq_len < 1) {
    return FP8_INVALID("Batcher: global_batch {} and seq_len {} must both be >= 1",
                       spec.global_batch, spec.seq_len);
  }
  if (!(spec.heldout_fraction >= 0 && spec.heldout_fraction < 1)) {
    return FP8_INVALID("data.heldout_fraction is {}, expected [0, 1)", spec.heldout_fraction);
  }
  if (spec.plan && spec.plan->full() != spec.global_batch) {
    return FP8_INVALID("Batcher: the batch plan's full batch {} is not global_batch {}",
                       spec.plan->full(), spec.global_batch);
  }
  Batcher b;
  b.src_ = std::move(source);
  b.spec_ = spec;
  b.generative_ = b.src_->size() == TokenSource::kInfinite;
  if (b.generative_) return b;
  const int64_t w = b.src_->size() >= 1 ? (b.src_->size() - 1) / spec.seq_len : 0;
  const auto held = static_cast<int64_t>(std::llround(spec.heldout_fraction * w));
  b.heldout_windows_ = spec.heldout_fraction > 0 ? std::max<int64_t>(1, held) : 0;
  b.train_windows_ = w - b.heldout_windows_;
  if (b.train_windows_ < 1) {
    return FP8_INVALID(
        "{}: {} tokens make {} windows of seq_len + 1 = {} tokens; need at least "
        "{} (heldout_fraction {})",
        b.src_->describe(), b.src_->size(), w, spec.seq_len + 1, b.heldout_windows_ + 1,
        spec.heldout_fraction);
  }
  return b;
}

int64_t Batcher::windows(Split split) const {
  if (generative_) return TokenSource::kInfinite;
  return split == Split::kTrain ? train_windows_ : heldout_windows_;
}

Result<BatchPlan> BatchPlan::constant(int64_t global_batch) {
  if (global_batch < 1)
    return FP8_INVALID("batch plan: global batch {} must be >= 1", global_batch);
  BatchPlan p;
  p.full_ = global_batch;
  return p;
}

Result<BatchPlan> BatchPlan::ramp(int64_t start, int64_t increment, int64_t ramp_samples,
                                  int64_t full) {
  if (start < 1 || increment < 1 || ramp_samples < 1 || start >= full ||
      (full - start) % increment != 0) {
    return FP8_INVALID(
        "batch ramp: needs 1 <= start < full, increment >= 1 dividing full - start and ramp "
        "samples >= 1; got start {}, increment {}, full {}, ramp samples {}",
        start, increment, full, ramp_samples);
  }
  // At most ramp_samples / start + 1 ramp steps; refuse ramps whose table would be huge.
  constexpr int64_t kMaxRampSteps = int64_t{1} << 22;  // a 32 MiB table
  if (ramp_samples / start >= kMaxRampSteps) {
    return FP8_INVALID(
        "batch ramp: {} ramp samples from a batch of {} take up to {} steps (at most {})",
        ramp_samples, start, ramp_samples / start + 1, kMaxRampSteps);
  }
  BatchPlan p;
  p.full_ = full;
  const int64_t rises = (full - start) / increment;
  int64_t c = 0;
  while (true) {
    const auto done = static_cast<int64_t>(static_cast<__int128>(c) * rises / ramp_samples);
    const int64_t b = std::min(full, start + increment * done);
    if (b == full) break;
    c += b;
    p.first_.push_back(c);
  }
  return p;
}

int64_t BatchPlan::batch(int64_t step) const {
  const int64_t k = ramp_steps();
  return step < k ? first_[step + 1] - first_[step] : full_;
}

int64_t BatchPlan::first_sample(int64_t step) const {
  const int64_t k = ramp_steps();
  return step <= k ? first_[step] : first_[k] + (step - k) * full_;
}

int64_t BatchPlan::steps_to(int64_t samples) const {
  const int64_t k = ramp_steps();
  if (samples <= first_[k]) {
    return std::lower_bound(first_.begin(), first_.end(), samples) - first_.begin();
  }
  return k + (samples - first_[k] + full_ - 1) / full_;
}

std::vector<int64_t> BatchPlan::sizes() const {
  std::vector<int64_t> out;
  for (int64_t s = 0; s <= ramp_steps(); ++s) {
    if (out.empty() || out.back() != batch(s)) out.push_back(batch(s));
  }
  return out;
}

int64_t Batcher::rows_in(Split split, int64_t step) const {
  return split == Split::kTrain && spec_.plan ? spec_.plan->batch(step) : spec_.global_batch;
}

int64_t Batcher::sample_of(Split split, int64_t step, int64_t row) const {
  const int64_t g = (split == Split::kTrain && spec_.plan ? spec_.plan->first_sample(step)
                                                          : step * spec_.global_batch) +
                    row;
  if (generative_) return g;
  const int64_t n = windows(split);
  if (n == 0) return -1;
  const uint64_t key = mix_keys(split_key(spec_.seed, split), static_cast<uint64_t>(g / n));
  const int64_t w = permute_index(g % n, n, key);
  return split == Split::kTrain ? w : train_windows_ + w;
}

Status Batcher::fill(Split split, int64_t step, int64_t row_begin, int64_t row_end,
                     int32_t* out) const {
  const int64_t B = spec_.global_batch;
  if (step < 0 || step > (TokenSource::kInfinite - B) / B - 1) {
    return FP8_INVALID("Batcher: step {} is out of range", step);
  }
  const int64_t rows = rows_in(split, step);
  if (row_begin < 0 || row_begin > row_end || row_end > rows) {
    return FP8_INVALID("Batcher: rows [{}, {}) are outside step {}'s batch [0, {})", row_begin,
                       row_end, step, rows);
  }
  if (windows(split) == 0) {
    return FP8_INVALID("{}: no held-out windows (data.heldout_fraction is 0)", src_->describe());
  }
  const int64_t L = row_len();
  for (int64_t r = row_begin; r < row_end; ++r, out += L) {
    const int64_t s = sample_of(split, step, r);
    const Status st =
        generative_ ? src_->sequence(split_key(spec_.seed, split), static_cast<uint64_t>(s), L, out)
                    : src_->read(s * spec_.seq_len, L, out);
    if (!st.ok())
      return st.with_context(fmt::format("{} step {} row {}", split_name(split), step, r));
  }
  return Status::Ok();
}

Result<std::vector<int32_t>> Batcher::rows(Split split, int64_t step, int64_t row_begin,
                                           int64_t row_end) const {
  std::vector<int32_t> out(std::max<int64_t>(0, row_end - row_begin) * row_len());
  FP8_RETURN_IF_ERROR(fill(split, step, row_begin, row_end, out.data()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Byte-level tokenization

namespace {
void flush_document(std::vector<int32_t>& doc, std::vector<std::vector<int32_t>>& docs) {
  if (doc.empty()) return;
  doc.push_back(kEndOfDocument);
  docs.push_back(std::move(doc));
  doc.clear();
}

bool blank_line(std::string_view line) {
  return line.find_first_not_of(" \t\r\n") == std::string_view::npos;
}
}  // namespace

std::vector<std::vector<int32_t>> byte_documents(std::string_view text, bool split_docs) {
  std::vector<std::vector<int32_t>> docs;
  std::vector<int32_t> doc;
  const auto append = [&](std::string_view s) {
    for (char c : s) doc.push_back(static_cast<unsigned char>(c));
  };
  if (!split_docs) {
    append(text);
    flush_document(doc, docs);
    return docs;
  }
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const size_t end = nl == std::string_view::npos ? text.size() : nl + 1;
    const std::string_view line = text.substr(pos, end - pos);
    if (blank_line(line)) {
      flush_document(doc, docs);
    } else {
      append(line);
    }
    pos = end;
  }
  flush_document(doc, docs);
  return docs;
}

std::vector<int32_t> fim_document(std::span<const int32_t> doc, int64_t index,
                                  const FimOptions& fim) {
  const std::vector<int32_t> same(doc.begin(), doc.end());
  if (fim.rate <= 0 || doc.empty() || doc.back() != kEndOfDocument) return same;
  const uint64_t key = mix_keys(fim.seed, static_cast<uint64_t>(index));
  if (!(uniform01(splitmix64(key)) < fim.rate)) return same;
  const std::span<const int32_t> body = doc.first(doc.size() - 1);
  // Cut points: positions p in [0, n] where a character starts, and both ends.
  std::vector<int64_t> cuts;
  for (size_t p = 0; p <= body.size(); ++p) {
    if (p == 0 || p == body.size() || (body[p] & 0xC0) != 0x80) {
      cuts.push_back(static_cast<int64_t>(p));
    }
  }
  const auto pick = [&](uint64_t salt) {
    const auto k = static_cast<size_t>(uniform01(splitmix64(key + salt)) * cuts.size());
    return cuts[std::min(k, cuts.size() - 1)];
  };
  int64_t i = pick(1), j = pick(2);
  if (i > j) std::swap(i, j);
  std::vector<int32_t> out;
  out.reserve(doc.size() + 3);
  out.push_back(kFimBegin);
  out.insert(out.end(), body.begin(), body.begin() + i);
  out.push_back(kFimHole);
  out.insert(out.end(), body.begin() + j, body.end());
  out.push_back(kFimEnd);
  out.insert(out.end(), body.begin() + i, body.begin() + j);
  out.push_back(kEndOfDocument);
  return out;
}

Result<std::vector<int32_t>> unfim_document(std::span<const int32_t> doc) {
  if (doc.empty() || doc.front() != kFimBegin) return std::vector<int32_t>(doc.begin(), doc.end());
  const auto at = [&](int32_t id) {
    const auto it = std::find(doc.begin() + 1, doc.end(), id);
    return static_cast<size_t>(it - doc.begin());
  };
  const size_t hole = at(kFimHole), end = at(kFimEnd);
  if (hole == doc.size() || end == doc.size() || hole > end || doc.back() != kEndOfDocument) {
    return FP8_INVALID(
        "not a PSM document: needs <fim_begin> prefix <fim_hole> suffix <fim_end> middle "
        "<end-of-document> (ids {}, {}, {}, {}; got {} tokens, hole at {}, end at {})",
        kFimBegin, kFimHole, kFimEnd, kEndOfDocument, doc.size(), hole, end);
  }
  for (size_t p = 1; p + 1 < doc.size(); ++p) {
    if ((doc[p] == kFimBegin || doc[p] == kFimHole || doc[p] == kFimEnd) && p != hole && p != end) {
      return FP8_INVALID("not a PSM document: sentinel {} repeated at token {}", doc[p], p);
    }
  }
  std::vector<int32_t> out(doc.begin() + 1, doc.begin() + hole);     // prefix
  out.insert(out.end(), doc.begin() + end + 1, doc.end() - 1);       // middle
  out.insert(out.end(), doc.begin() + hole + 1, doc.begin() + end);  // suffix
  out.push_back(kEndOfDocument);
  return out;
}

Result<PrepareStats> prepare_byte_data(const std::string& out_prefix,
                                       std::span<const std::string> files,
                                       const PrepareOptions& opt) {
  if (files.empty()) return FP8_INVALID("prepare-data: no input files");
  PrepareStats st;
  st.dtype = opt.format == FileFormat::kMegatron && opt.dtype == TokenDType::kUInt32
                 ? TokenDType::kInt32
                 : opt.dtype;
  if (!(opt.fim.rate >= 0 && opt.fim.rate <= 1)) {
    return FP8_INVALID("prepare-data: --fim-rate {} must be in [0, 1] (DeepSeek-V3: 0.1)",
                       opt.fim.rate);
  }
  const int32_t top = opt.fim.rate > 0 ? kFimEnd : kEndOfDocument;
  if (info(st.dtype).max < top) {
    return FP8_INVALID("prepare-data: dtype {} cannot hold id {}", dtype_name(st.dtype), top);
  }
  FP8_ASSIGN_OR_RETURN(auto w, TokenWriter::create(out_prefix, opt.format, st.dtype));
  for (const std::string& path : files) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return FP8_ERROR(Code::kNotFound, "{}: cannot open: {}", path, std::strerror(errno));
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) return FP8_ERROR(Code::kIo, "{}: read failed", path);
    const std::string text = ss.str();
    st.bytes_in += static_cast<int64_t>(text.size());
    for (const auto& doc : byte_documents(text, opt.split_docs)) {
      const std::vector<int32_t> out = fim_document(doc, st.documents, opt.fim);
      st.fim_documents += out.size() != doc.size() ? 1 : 0;
      FP8_RETURN_IF_ERROR(w->add_document(out));
      ++st.documents;
    }
    ++st.files;
  }
  FP8_RETURN_IF_ERROR(w->finish());
  st.tokens = w->tokens();
  return st;
}

}  // namespace fp8pipe::data
