// Config loading (text format with file:line:col errors), `--a.b=v` overrides by reflection,
// defaults written in one place, and validation: one function per section plus cross-section
// rules, each message naming the field path, the value, the rule and the valid choices.
#include "core/config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <numbers>
#include <numeric>
#include <regex>
#include <sstream>

namespace fp8pipe {
namespace {

namespace pb = google::protobuf;
using config::Config;

// ---------------------------------------------------------------------------------------------
// Choice strings (see the conventions at the top of fp8pipe.proto).

constexpr std::string_view kSchedules[] = {"1f1b", "zb1p", "dualpipe", "dualpipev"};
constexpr std::string_view kDispatch[] = {"flat", "two_level"};
constexpr std::string_view kCommBackends[] = {"mpi", "nccl"};
constexpr std::string_view kGemm[] = {"fast", "exact"};
constexpr std::string_view kActGran[] = {"1x128", "tensor"};
constexpr std::string_view kWeightGran[] = {"128x128", "1x128", "tensor"};
constexpr std::string_view kLrSchedules[] = {"cosine", "step", "constant", "phases"};
constexpr std::string_view kLrShapes[] = {"constant", "linear", "cosine"};
constexpr std::string_view kSources[] = {"synthetic", "tokens", "megatron"};
constexpr std::string_view kTokenDtypes[] = {"uint16", "uint32"};
constexpr std::string_view kOnNonfinite[] = {"halt", "skip"};
constexpr std::string_view kDevices[] = {"cpu", "cuda"};
constexpr std::string_view kPlacements[] = {"auto", "host", "device"};
constexpr std::string_view kAttention[] = {"auto", "fused", "gemm", "gemm_bf16"};
constexpr std::string_view kAttnOutCache[] = {"auto", "bf16", "e5m6", "e4m3"};

struct ChoiceField {
  std::string_view path;
  std::span<const std::string_view> values;
};
constexpr ChoiceField kChoiceFields[] = {
    {"parallel.schedule", kSchedules},
    {"parallel.ep_dispatch", kDispatch},
    {"parallel.comm_backend", kCommBackends},
    {"precision.gemm", kGemm},
    {"precision.act_granularity", kActGran},
    {"precision.weight_granularity", kWeightGran},
    {"optim.schedule", kLrSchedules},
    {"data.source", kSources},
    {"data.token_dtype", kTokenDtypes},
    {"fault.on_nonfinite", kOnNonfinite},
    {"train.device", kDevices},
    {"optim.placement", kPlacements},
    {"precision.attention", kAttention},
    {"precision.attn_out_cache", kAttnOutCache},
};

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool is_choice(std::span<const std::string_view> values, std::string_view v) {
  return std::find(values.begin(), values.end(), v) != values.end();
}

// "a, b, c" of the field names of a message type.
std::string field_names(const pb::Descriptor* d) {
  std::string out;
  for (int i = 0; i < d->field_count(); ++i) out += (i ? ", " : "") + d->field(i)->name();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Text-format parsing.

// Collects parser errors as "name:line:col: message" (1-based), adding the valid field names
// when the parser reports an unknown field.
class Collector : public pb::io::ErrorCollector {
 public:
  explicit Collector(std::string_view name) : name_(name) {}
  void AddError(int line, pb::io::ColumnNumber col, const std::string& msg) override {
    errors_.push_back(fmt::format("{}:{}:{}: {}{}", name_, line + 1, col + 1, msg, hint(msg)));
  }
  void AddWarning(int line, pb::io::ColumnNumber col, const std::string& msg) override {
    AddError(line, col, msg);  // warnings (e.g. deprecated syntax) are errors too
  }
  std::string text() const { return fmt::format("{}", fmt::join(errors_, "\n")); }

 private:
  static std::string hint(const std::string& msg) {
    static const std::regex re(R"re(Message type "([\w.]+)" has no field named)re");
    std::smatch m;
    if (!std::regex_search(msg, m, re)) return {};
    const pb::Descriptor* d = pb::DescriptorPool::generated_pool()->FindMessageTypeByName(m[1]);
    return d ? fmt::format(" (valid fields: {})", field_names(d)) : std::string();
  }
  std::string name_;
  std::vector<std::string> errors_;
};

// ---------------------------------------------------------------------------------------------
// Overrides by reflection.

template <typename T>
std::optional<T> parse_int(std::string_view s) {
  T v{};
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

std::optional<double> parse_double(std::string_view s) {
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<bool> parse_bool(std::string_view s) {
  const std::string l = lower(s);
  if (l == "true" || l == "1") return true;
  if (l == "false" || l == "0") return false;
  return std::nullopt;
}

// Sets one integer field, checking the type's range.
Status set_int(pb::Message* m, const pb::FieldDescriptor* fd, std::string_view path,
               std::string_view value) {
  const pb::Reflection* r = m->GetReflection();
  const char* type = fd->cpp_type_name();
  auto bad = [&] {
    return FP8_INVALID("--{}={}: '{}' is not a valid {} (an integer in its range)", path, value,
                       value, type);
  };
  switch (fd->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: {
      auto v = parse_int<int32_t>(value);
      if (!v) return bad();
      r->SetInt32(m, fd, *v);
      return Status::Ok();
    }
    case pb::FieldDescriptor::CPPTYPE_INT64: {
      auto v = parse_int<int64_t>(value);
      if (!v) return bad();
      r->SetInt64(m, fd, *v);
      return Status::Ok();
    }
    case pb::FieldDescriptor::CPPTYPE_UINT32: {
      auto v = parse_int<uint32_t>(value);
      if (!v) return bad();
      r->SetUInt32(m, fd, *v);
      return Status::Ok();
    }
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      auto v = parse_int<uint64_t>(value);
      if (!v) return bad();
      r->SetUInt64(m, fd, *v);
      return Status::Ok();
    }
    default:
      return bad();
  }
}

Status set_enum(pb::Message* m, const pb::FieldDescriptor* fd, std::string_view path,
                std::string_view value) {
  const pb::EnumDescriptor* e = fd->enum_type();
  std::vector<std::string> names;
  for (int i = 0; i < e->value_count(); ++i) {
    if (lower(e->value(i)->name()) == lower(value)) {
      m->GetReflection()->SetEnum(m, fd, e->value(i));
      return Status::Ok();
    }
    names.push_back(e->value(i)->name());
  }
  return FP8_INVALID("--{}={}: '{}' is not a valid {} (valid: {})", path, value, value, e->name(),
                     fmt::join(names, ", "));
}

Status set_string(pb::Message* m, const pb::FieldDescriptor* fd, std::string_view path,
                  std::string_view value) {
  auto choices = config_choices(path);
  if (choices.empty()) {
    m->GetReflection()->SetString(m, fd, std::string(value));
    return Status::Ok();
  }
  const std::string v = lower(value);
  if (!is_choice(choices, v)) {
    return FP8_INVALID("--{}={}: '{}' is not a valid choice (valid: {})", path, value, value,
                       fmt::join(choices, ", "));
  }
  m->GetReflection()->SetString(m, fd, v);
  return Status::Ok();
}

Status set_scalar(pb::Message* m, const pb::FieldDescriptor* fd, std::string_view path,
                  std::string_view value) {
  const pb::Reflection* r = m->GetReflection();
  switch (fd->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      auto v = parse_double(value);
      if (!v) return FP8_INVALID("--{}={}: '{}' is not a finite number", path, value, value);
      if (fd->cpp_type() == pb::FieldDescriptor::CPPTYPE_DOUBLE) {
        r->SetDouble(m, fd, *v);
      } else {
        r->SetFloat(m, fd, static_cast<float>(*v));
      }
      return Status::Ok();
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL: {
      auto v = parse_bool(value);
      if (!v) {
        return FP8_INVALID("--{}={}: '{}' is not a bool (true|false|1|0)", path, value, value);
      }
      r->SetBool(m, fd, *v);
      return Status::Ok();
    }
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      return set_enum(m, fd, path, value);
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return set_string(m, fd, path, value);
    default:
      return set_int(m, fd, path, value);
  }
}

// ---------------------------------------------------------------------------------------------
// Defaults.

// Writes the schema default of every unset singular field, recursively.
void fill_schema_defaults(pb::Message* m) {
  const pb::Descriptor* d = m->GetDescriptor();
  const pb::Reflection* r = m->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* fd = d->field(i);
    if (fd->is_repeated()) continue;
    if (fd->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      fill_schema_defaults(r->MutableMessage(m, fd));
      continue;
    }
    if (r->HasField(*m, fd)) continue;
    switch (fd->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32:
        r->SetInt32(m, fd, fd->default_value_int32());
        break;
      case pb::FieldDescriptor::CPPTYPE_INT64:
        r->SetInt64(m, fd, fd->default_value_int64());
        break;
      case pb::FieldDescriptor::CPPTYPE_UINT32:
        r->SetUInt32(m, fd, fd->default_value_uint32());
        break;
      case pb::FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(m, fd, fd->default_value_uint64());
        break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT:
        r->SetFloat(m, fd, fd->default_value_float());
        break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE:
        r->SetDouble(m, fd, fd->default_value_double());
        break;
      case pb::FieldDescriptor::CPPTYPE_BOOL:
        r->SetBool(m, fd, fd->default_value_bool());
        break;
      case pb::FieldDescriptor::CPPTYPE_ENUM:
        r->SetEnum(m, fd, fd->default_value_enum());
        break;
      case pb::FieldDescriptor::CPPTYPE_STRING:
        r->SetString(m, fd, fd->default_value_string());
        break;
      default:
        break;
    }
  }
}

// Resolves "--a.b.c" to the message holding c and c's descriptor (nullptr message on error).
Status resolve_path(pb::Message* root, std::string_view path, pb::Message** msg,
                    const pb::FieldDescriptor** field) {
  pb::Message* m = root;
  std::string_view rest = path;
  std::string prefix;
  while (true) {
    const size_t dot = rest.find('.');
    const std::string name(rest.substr(0, dot));
    const pb::Descriptor* d = m->GetDescriptor();
    const pb::FieldDescriptor* fd = d->FindFieldByName(name);
    if (!fd) {
      return FP8_INVALID("unknown config field '{}': {} has no field '{}' (valid: {})", path,
                         prefix.empty() ? "the top level" : prefix, name, field_names(d));
    }
    prefix += (prefix.empty() ? "" : ".") + name;
    if (dot == std::string_view::npos) {
      if (fd->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
        return FP8_INVALID("config field '{}' is a section; set one of its fields: {}", path,
                           field_names(fd->message_type()));
      }
      if (fd->is_repeated()) return FP8_INVALID("config field '{}' is repeated", path);
      *msg = m;
      *field = fd;
      return Status::Ok();
    }
    if (fd->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE || fd->is_repeated()) {
      return FP8_INVALID("unknown config field '{}': '{}' is a value, not a section", path, prefix);
    }
    m = m->GetReflection()->MutableMessage(m, fd);
    rest = rest.substr(dot + 1);
  }
}

// Lower-cases the choice string at `path` (all choice paths name a string field).
void lower_choice(Config& cfg, std::string_view path) {
  pb::Message* m = nullptr;
  const pb::FieldDescriptor* fd = nullptr;
  if (!resolve_path(&cfg, path, &m, &fd).ok()) return;
  const pb::Reflection* r = m->GetReflection();
  r->SetString(m, fd, lower(r->GetString(*m, fd)));
}

// ---------------------------------------------------------------------------------------------
// Validation: one function per section, then the cross-section rules.

// Collects one message per broken rule, so a config shows all its problems at once.
class Checker {
 public:
  template <typename... A>
  void expect(bool ok, fmt::format_string<A...> f, A&&... a) {
    if (!ok) errors_.push_back(fmt::format(f, std::forward<A>(a)...));
  }
  bool ok() const { return errors_.empty(); }
  Status status(std::source_location loc = std::source_location::current()) const {
    if (errors_.empty()) return Status::Ok();
    std::string msg = errors_.size() == 1 ? errors_[0]
                                          : fmt::format("{} config errors:\n  {}", errors_.size(),
                                                        fmt::join(errors_, "\n  "));
    return Status(Code::kInvalidArgument, std::move(msg), {}, loc);
  }

 private:
  std::vector<std::string> errors_;
};

template <typename T>
void gt0(Checker& c, std::string_view path, T v) {
  c.expect(v > 0, "{}={} must be > 0", path, v);
}
template <typename T>
void ge0(Checker& c, std::string_view path, T v) {
  c.expect(v >= 0, "{}={} must be >= 0", path, v);
}
// v in [0, 1)
template <typename T>
void unit(Checker& c, std::string_view path, T v) {
  c.expect(v >= 0 && v < 1, "{}={} must be in [0, 1)", path, v);
}
void choice(Checker& c, std::string_view path, const std::string& v) {
  c.expect(is_choice(config_choices(path), v), "{}=\"{}\" is not a valid choice (valid: {})", path,
           v, fmt::join(config_choices(path), ", "));
}

// "1, 2, 4, 8": the divisors of n, at most 24 of them.
std::string divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n && d.size() < 24; ++i) {
    if (n % i == 0) d.push_back(i);
  }
  return fmt::format("{}", fmt::join(d, ", "));
}

// YaRN (kernels/cpu/rope.h): checked when it is on (factor > 1).
void ValidateRopeScaling(const config::RopeScaling& y, Checker& c) {
  c.expect(y.factor() >= 1.0f && std::isfinite(y.factor()),
           "model.rope_scaling.factor={} must be >= 1 (1 = plain RoPE; > 1 = YaRN)", y.factor());
  if (!(y.factor() > 1.0f)) return;
  c.expect(y.original_max_position() > 0,
           "model.rope_scaling.original_max_position={} must be > 0 with factor {} (the "
           "pretraining context YaRN extends; DeepSeek-V3: 4096)",
           y.original_max_position(), y.factor());
  c.expect(y.beta_slow() > 0 && y.beta_fast() > y.beta_slow(),
           "model.rope_scaling.beta_fast={} and beta_slow={} must satisfy beta_fast > beta_slow > "
           "0 (turns over the pretraining context; DeepSeek-V3: 32 and 1)",
           y.beta_fast(), y.beta_slow());
  // Below this even pair 0 turns fewer than beta_slow times over L: the ramp's end falls before
  // pair 0 and DeepSeek's (and transformers') rule would interpolate no pair at all.
  c.expect(y.original_max_position() <= 0 || !(y.beta_slow() > 0) ||
               y.original_max_position() > 2 * std::numbers::pi * y.beta_slow(),
           "model.rope_scaling.original_max_position={} must exceed 2π·beta_slow = {:.4g} (the "
           "highest RoPE frequency must turn beta_slow times over the original context)",
           y.original_max_position(), 2 * std::numbers::pi * y.beta_slow());
  ge0(c, "model.rope_scaling.mscale", y.mscale());
  ge0(c, "model.rope_scaling.mscale_all_dim", y.mscale_all_dim());
}

void ValidateMla(const config::Mla& m, Checker& c) {
  ge0(c, "model.mla.q_lora_rank", m.q_lora_rank());
  gt0(c, "model.mla.kv_lora_rank", m.kv_lora_rank());
  gt0(c, "model.mla.qk_nope_head_dim", m.qk_nope_head_dim());
  gt0(c, "model.mla.v_head_dim", m.v_head_dim());
  c.expect(m.qk_rope_head_dim() > 0 && m.qk_rope_head_dim() % 2 == 0,
           "model.mla.qk_rope_head_dim={} must be even and > 0 (RoPE rotates pairs)",
           m.qk_rope_head_dim());
}

// Node-limited routing: groups ranked by their top topk/max_nodes affinities (DESIGN.md §4).
void ValidateRouting(const config::Moe& m, Checker& c) {
  const int n = m.routed_experts(), g = m.n_groups(), limit = m.max_nodes(), k = m.topk();
  c.expect(g >= 1 && n % g == 0,
           "model.moe.n_groups={} must divide model.moe.routed_experts={} (valid: {})", g, n,
           divisors(n));
  if (g < 1 || n % g != 0) return;
  c.expect(limit >= 1 && limit <= g,
           "model.moe.max_nodes={} must be in [1, model.moe.n_groups={}] (0 = n_groups: no limit)",
           limit, g);
  if (limit < 1 || limit >= g || k < 1) return;
  std::vector<int> valid;
  for (int d = 1; d <= std::min(k, g); ++d) {
    if (k % d == 0) valid.push_back(d);
  }
  c.expect(k % limit == 0,
           "model.moe.topk={} must be divisible by model.moe.max_nodes={} under node-limited "
           "routing (groups are ranked by their top topk/max_nodes affinities; valid max_nodes: "
           "{}, or {} for no limit)",
           k, limit, fmt::join(valid, ", "), g);
  c.expect(k <= limit * (n / g),
           "model.moe.topk={} exceeds the {} experts in model.moe.max_nodes={} groups of "
           "routed_experts/n_groups={} experts",
           k, limit * (n / g), limit, n / g);
}

void ValidateMoe(const config::Moe& m, Checker& c) {
  ge0(c, "model.moe.routed_experts", m.routed_experts());
  if (m.routed_experts() <= 0) return;
  c.expect(m.topk() >= 1 && m.topk() <= m.routed_experts(),
           "model.moe.topk={} must be in [1, model.moe.routed_experts={}]", m.topk(),
           m.routed_experts());
  ge0(c, "model.moe.shared_experts", m.shared_experts());
  gt0(c, "model.moe.expert_hidden", m.expert_hidden());
  ValidateRouting(m, c);
  gt0(c, "model.moe.route_scale", m.route_scale());
  ge0(c, "model.moe.bias_update_rate", m.bias_update_rate());
  ge0(c, "model.moe.seq_aux_alpha", m.seq_aux_alpha());
  c.expect(m.capacity_factor() == 0 || m.capacity_factor() >= 1,
           "model.moe.capacity_factor={} must be 0 (no token dropping) or >= 1",
           m.capacity_factor());
}

void ValidateModel(const config::Model& m, Checker& c) {
  gt0(c, "model.vocab_size", m.vocab_size());
  gt0(c, "model.hidden", m.hidden());
  gt0(c, "model.layers", m.layers());
  gt0(c, "model.heads", m.heads());
  c.expect(m.dense_layers() >= 0 && m.dense_layers() <= m.layers(),
           "model.dense_layers={} must be in [0, model.layers={}]", m.dense_layers(), m.layers());
  c.expect(m.dense_layers() <= 0 || m.ffn_hidden() > 0,
           "model.ffn_hidden={} must be > 0 when model.dense_layers={} > 0 (dense SwiGLU width)",
           m.ffn_hidden(), m.dense_layers());
  if (m.attention() == config::Model::MHA) {
    c.expect(m.head_dim() > 0,
             "model.head_dim={} must be > 0 for attention MHA (0 derives hidden/heads, which needs "
             "model.hidden={} divisible by model.heads={})",
             m.head_dim(), m.hidden(), m.heads());
    c.expect(m.head_dim() <= 0 || m.head_dim() % 2 == 0,
             "model.head_dim={} must be even (RoPE rotates pairs)", m.head_dim());
  } else {
    ValidateMla(m.mla(), c);
  }
  c.expect(m.dense_layers() >= m.layers() || m.moe().routed_experts() > 0,
           "model.moe.routed_experts={} must be > 0: blocks {}..{} are MoE (model.dense_layers={} "
           "< model.layers={}; set dense_layers = layers for a dense model)",
           m.moe().routed_experts(), m.dense_layers(), m.layers() - 1, m.dense_layers(),
           m.layers());
  ValidateMoe(m.moe(), c);
  ge0(c, "model.mtp_depth", m.mtp_depth());
  ge0(c, "model.mtp_lambda", m.mtp_lambda());
  ge0(c, "model.mtp_lambda_after.tokens", m.mtp_lambda_after().tokens());
  ge0(c, "model.mtp_lambda_after.value", m.mtp_lambda_after().value());
  ge0(c, "model.moe.bias_update_rate_after.tokens", m.moe().bias_update_rate_after().tokens());
  ge0(c, "model.moe.bias_update_rate_after.value", m.moe().bias_update_rate_after().value());
  gt0(c, "model.rope_theta", m.rope_theta());
  ValidateRopeScaling(m.rope_scaling(), c);
  gt0(c, "model.norm_eps", m.norm_eps());
  gt0(c, "model.init_std", m.init_std());
}

// DeepSeek's DualPipe asserts pp even, microbatches even and >= 2·pp; DualPipeV only
// microbatches >= 2·ranks (dualpipe.py / dualpipev.py step()).
void ValidateSchedule(const config::Parallel& p, Checker& c) {
  const std::string& s = p.schedule();
  const int pp = p.pp(), mb = p.microbatches();
  if (s == "dualpipe") {
    c.expect(pp % 2 == 0,
             "parallel.pp={} must be even for schedule dualpipe (rank r pairs with pp-1-r; use "
             "dualpipev or 1f1b for odd pp)",
             pp);
    c.expect(mb % 2 == 0,
             "parallel.microbatches={} must be even for schedule dualpipe (half enter at each end)",
             mb);
  }
  if (s == "dualpipe" || s == "dualpipev") {
    c.expect(mb >= 2 * pp, "parallel.microbatches={} must be >= 2·parallel.pp = {} for schedule {}",
             mb, 2 * pp, s);
  } else {
    c.expect(mb >= pp, "parallel.microbatches={} must be >= parallel.pp={} for schedule {}", mb, pp,
             s);
  }
}

void ValidateParallel(const config::Parallel& p, Checker& c) {
  c.expect(p.pp() >= 1, "parallel.pp={} must be >= 1", p.pp());
  c.expect(p.dp() >= 1, "parallel.dp={} must be >= 1", p.dp());
  c.expect(p.ep() >= 1, "parallel.ep={} must be >= 1", p.ep());
  ge0(c, "parallel.ranks_per_node", p.ranks_per_node());
  choice(c, "parallel.schedule", p.schedule());
  choice(c, "parallel.ep_dispatch", p.ep_dispatch());
  choice(c, "parallel.comm_backend", p.comm_backend());
  c.expect(p.microbatches() >= 1,
           "parallel.microbatches={} must be >= 1 (0 = the fewest the schedule allows)",
           p.microbatches());
  if (p.dp() < 1 || p.ep() < 1 || p.pp() < 1 || p.microbatches() < 1) return;
  c.expect(p.dp() % p.ep() == 0,
           "parallel.dp={} must be divisible by parallel.ep={} (valid ep for dp={}: {})", p.dp(),
           p.ep(), p.dp(), divisors(p.dp()));
  ValidateSchedule(p, c);
}

void ValidatePrecision(const config::Precision& p, Checker& c) {
  choice(c, "precision.gemm", p.gemm());
  choice(c, "precision.act_granularity", p.act_granularity());
  choice(c, "precision.weight_granularity", p.weight_granularity());
  choice(c, "precision.attention", p.attention());
  choice(c, "precision.attn_out_cache", p.attn_out_cache());
  c.expect(p.attn_out_cache() != "e4m3" || p.mode() == config::Precision::FP8,
           "precision.attn_out_cache=\"e4m3\" holds W_o's FP8 input, so it needs "
           "precision.mode=FP8 (got {}; valid for BF16: auto, bf16, e5m6)",
           config::Precision::Mode_Name(p.mode()));
}

void ValidateTrain(const config::Train& t, Checker& c) {
  c.expect(t.steps() > 0, "train.steps={} must be > 0 (or set train.tokens and leave it out)",
           t.steps());
  ge0(c, "train.tokens", t.tokens());
  gt0(c, "train.seq_len", t.seq_len());
  gt0(c, "train.global_batch", t.global_batch());
  ge0(c, "train.grad_clip", t.grad_clip());
  ge0(c, "train.eval_every", t.eval_every());
  gt0(c, "train.eval_batches", t.eval_batches());
  choice(c, "train.device", t.device());
  for (const std::string& m : recompute_modules(t)) {
    c.expect(is_choice(kRecomputeModules, m),
             "train.recompute=\"{}\": '{}' is not a module that can be recomputed (valid: a "
             "comma-separated list of {}; empty = none)",
             t.recompute(), m, fmt::join(kRecomputeModules, ", "));
  }
}

void ValidateOptim(const config::Optim& o, Checker& c) {
  gt0(c, "optim.lr", o.lr());
  c.expect(o.min_lr() >= 0 && o.min_lr() <= o.lr(), "optim.min_lr={} must be in [0, optim.lr={}]",
           o.min_lr(), o.lr());
  ge0(c, "optim.warmup_steps", o.warmup_steps());
  choice(c, "optim.schedule", o.schedule());
  ge0(c, "optim.decay_steps", o.decay_steps());
  unit(c, "optim.ema_decay", o.ema_decay());
  c.expect(o.schedule() != "step" || o.step_every() > 0,
           "optim.step_every={} must be > 0 for optim.schedule=step", o.step_every());
  c.expect(o.step_gamma() > 0 && o.step_gamma() <= 1, "optim.step_gamma={} must be in (0, 1]",
           o.step_gamma());
  unit(c, "optim.beta1", o.beta1());
  unit(c, "optim.beta2", o.beta2());
  gt0(c, "optim.eps", o.eps());
  ge0(c, "optim.weight_decay", o.weight_decay());
  choice(c, "optim.placement", o.placement());
  c.expect(o.schedule() == "phases" || o.phase_size() == 0,
           "optim.phase has {} phases but optim.schedule={} (phases are read with "
           "optim.schedule=phases)",
           o.phase_size(), o.schedule());
  c.expect(o.schedule() != "phases" || o.phase_size() > 0,
           "optim.schedule=phases needs at least one optim.phase {{until_tokens: ...}}");
  int64_t prev = 0;
  for (int i = 0; i < o.phase_size(); ++i) {
    const auto& ph = o.phase(i);
    c.expect(ph.until_tokens() > prev,
             "optim.phase[{}].until_tokens={} must be > {} (the previous phase's end; phases are "
             "in order)",
             i, ph.until_tokens(), prev);
    prev = std::max(prev, ph.until_tokens());
    c.expect(is_choice(kLrShapes, ph.shape()), "optim.phase[{}].shape=\"{}\" (valid: {})", i,
             ph.shape(), fmt::join(kLrShapes, ", "));
    c.expect(!ph.has_lr() || (std::isfinite(ph.lr()) && ph.lr() >= 0),
             "optim.phase[{}].lr={} must be finite and >= 0", i, ph.lr());
    c.expect(ph.shape() == "constant" || ph.has_lr(),
             "optim.phase[{}] (shape {}) needs lr, the rate it ends at", i, ph.shape());
  }
}

void ValidateData(const config::Data& d, Checker& c) {
  choice(c, "data.source", d.source());
  c.expect(d.source() == "synthetic" || !d.path().empty(),
           "data.path is empty but data.source={} reads files (set data.path)", d.source());
  choice(c, "data.token_dtype", d.token_dtype());
  c.expect(d.synthetic().order() >= 1, "data.synthetic.order={} must be >= 1",
           d.synthetic().order());
  c.expect(d.synthetic().branching() >= 1, "data.synthetic.branching={} must be >= 1",
           d.synthetic().branching());
  unit(c, "data.heldout_fraction", d.heldout_fraction());
}

void ValidateCheckpoint(const config::Checkpoint& k, Checker& c) {
  ge0(c, "checkpoint.every", k.every());
  ge0(c, "checkpoint.keep_last", k.keep_last());
  ge0(c, "checkpoint.keep_every", k.keep_every());
  c.expect(k.every() <= 0 || !k.dir().empty(),
           "checkpoint.every={} needs checkpoint.dir (empty = no checkpoints)", k.every());
  c.expect(k.every() <= 0 || k.keep_every() <= 0 || k.keep_every() % k.every() == 0,
           "checkpoint.keep_every={} must be a multiple of checkpoint.every={} (else no kept step "
           "is ever written)",
           k.keep_every(), k.every());
  c.expect(!k.resume().empty(),
           "checkpoint.resume is empty (valid: auto, none, or a step directory)");
}

void ValidateLog(const config::Log& l, Checker& c) {
  c.expect(l.every() >= 1, "log.every={} must be >= 1", l.every());
  ge0(c, "log.trace_start", l.trace_start());
  c.expect(l.trace_steps() >= 1, "log.trace_steps={} must be >= 1", l.trace_steps());
}

void ValidateCluster(const config::Cluster& k, Checker& c) {
  ge0(c, "cluster.gpus", k.gpus());
  if (k.gpus() <= 0) return;  // no cluster described
  c.expect(k.gpus_per_node() >= 1 && k.gpus() % k.gpus_per_node() == 0,
           "cluster.gpus={} must be a multiple of cluster.gpus_per_node={}", k.gpus(),
           k.gpus_per_node());
  gt0(c, "cluster.peak_fp8_tflops", k.peak_fp8_tflops());
  gt0(c, "cluster.peak_bf16_tflops", k.peak_bf16_tflops());
  gt0(c, "cluster.hbm_gbps", k.hbm_gbps());
  gt0(c, "cluster.hbm_gib", k.hbm_gib());
  gt0(c, "cluster.nvlink_gbps", k.nvlink_gbps());
  gt0(c, "cluster.net_gbps_per_gpu", k.net_gbps_per_gpu());
  ge0(c, "cluster.net_latency_us", k.net_latency_us());
  ge0(c, "cluster.nvlink_latency_us", k.nvlink_latency_us());
  gt0(c, "cluster.total_sms", k.total_sms());
  c.expect(k.comm_sms() >= 0 && k.comm_sms() < k.total_sms(),
           "cluster.comm_sms={} must be in [0, cluster.total_sms={})", k.comm_sms(), k.total_sms());
}

void ValidateFault(const config::Fault& f, Checker& c) {
  gt0(c, "fault.timeout_s", f.timeout_s());
  choice(c, "fault.on_nonfinite", f.on_nonfinite());
  ge0(c, "fault.max_skips", f.max_skips());
  ge0(c, "fault.walltime_s", f.walltime_s());
}

// Layout rules between model, parallel, cluster and the world size.
void ValidateLayout(const Config& cfg, int world, Checker& c) {
  const auto& p = cfg.parallel();
  const int experts = cfg.model().moe().routed_experts();
  c.expect(experts <= 0 || experts % p.ep() == 0,
           "model.moe.routed_experts={} must be divisible by parallel.ep={} (valid ep: {})",
           experts, p.ep(), divisors(std::gcd(experts, p.dp())));
  // An ep group spanning nodes: node-limited routing must see whole nodes, so every routing
  // group's experts sit on one node (n_groups a multiple of the nodes the group spans).
  const int rpn = p.ranks_per_node(), groups = cfg.model().moe().n_groups();
  if (rpn > 0 && p.ep() > rpn && p.ep() % rpn == 0 && groups > 0) {
    c.expect(groups % (p.ep() / rpn) == 0,
             "model.moe.n_groups={} must be a multiple of the {} nodes one ep group spans "
             "(parallel.ep={} / parallel.ranks_per_node={}) so each group's experts share a node",
             groups, p.ep() / rpn, p.ep(), rpn);
  }
  const int stages = p.schedule() == "dualpipev" ? 2 * p.pp() : p.pp();
  c.expect(cfg.model().layers() >= stages,
           "model.layers={} must be >= the {} pipeline stages of schedule {} with parallel.pp={} "
           "(each stage holds at least one block)",
           cfg.model().layers(), stages, p.schedule(), p.pp());
  const int64_t ranks = int64_t{p.pp()} * p.dp();
  std::vector<std::string> layouts;
  for (int pp = 1; world > 0 && pp <= world && layouts.size() < 16; ++pp) {
    if (world % pp == 0) layouts.push_back(fmt::format("pp={} dp={}", pp, world / pp));
  }
#ifndef FP8PIPE_HAVE_CUDA
  c.expect(cfg.train().device() != "cuda",
           "train.device=\"cuda\" needs a build with CUDA; this fp8pipe was built without it "
           "(rebuild with -DFP8PIPE_CUDA=ON, or use train.device=\"cpu\")");
#endif
  c.expect(p.comm_backend() != "nccl" || cfg.train().device() == "cuda",
           "parallel.comm_backend=\"nccl\" needs train.device=\"cuda\" (got \"{}\"); use "
           "parallel.comm_backend=\"mpi\" on the CPU",
           cfg.train().device());
  {  // checked here, before any model is built, rather than when the optimizer is made
    const auto& o = cfg.optim();
    const int64_t total =
        o.decay_steps() > 0 ? o.warmup_steps() + o.decay_steps() : cfg.train().steps();
    c.expect(o.schedule() != "cosine" || o.warmup_steps() <= total,
             "optim.warmup_steps={} exceeds the cosine schedule's length {} (train.steps, or "
             "warmup_steps + optim.decay_steps when decay_steps > 0)",
             o.warmup_steps(), total);
  }
  c.expect(world <= 0 || ranks == world,
           "parallel.pp·parallel.dp = {}·{} = {} must equal the world size {} (valid: {})", p.pp(),
           p.dp(), ranks, world, fmt::join(layouts, "; "));
  const auto& k = cfg.cluster();
  c.expect(k.gpus() <= 0 || ranks == k.gpus(),
           "cluster.gpus={} must equal parallel.pp·parallel.dp = {}·{} = {}", k.gpus(), p.pp(),
           p.dp(), ranks);
  c.expect(k.gpus() <= 0 || p.ranks_per_node() <= 0 || p.ranks_per_node() == k.gpus_per_node(),
           "parallel.ranks_per_node={} must equal cluster.gpus_per_node={}", p.ranks_per_node(),
           k.gpus_per_node());
}

// train.batch_ramp against the layout: every step's micro-batch count must suit the schedule.
void ValidateBatchRamp(const Config& cfg, Checker& c) {
  const auto& t = cfg.train();
  const auto& r = t.batch_ramp();
  const auto& p = cfg.parallel();
  if (r.start() == 0 && r.increment() == 0 && r.tokens() == 0) return;
  const int64_t G = t.global_batch();
  const int64_t unit = G / p.microbatches();  // dp · micro-batch size: one micro-batch per replica
  const std::string where = fmt::format("train.batch_ramp {{start: {} increment: {} tokens: {}}}",
                                        r.start(), r.increment(), r.tokens());
  c.expect(r.start() > 0 && r.start() < G, "{}: start must be in [1, train.global_batch={})", where,
           G);
  c.expect(r.increment() > 0 && (G - r.start()) % r.increment() == 0,
           "{}: increment must be > 0 and divide train.global_batch - start = {}", where,
           G - r.start());
  c.expect(r.tokens() >= t.seq_len(), "{}: tokens must be >= train.seq_len={}", where, t.seq_len());
  c.expect(r.start() % unit == 0 && r.increment() % unit == 0,
           "{}: start and increment must be multiples of parallel.dp · micro-batch size = {} "
           "(micro-batch size = train.global_batch / (dp · microbatches) = {} / ({} · {}))",
           where, unit, G, p.dp(), p.microbatches());
  if (!c.ok()) return;
  // The counts rise from start / unit by increment / unit: the first too small or odd one is the
  // start's or, for dualpipe with an odd rise, the next.
  const std::string& s = p.schedule();
  const bool dual = s == "dualpipe" || s == "dualpipev";
  const int64_t least = dual ? 2 * p.pp() : p.pp();
  const int64_t m0 = r.start() / unit, rise = r.increment() / unit;
  int64_t bad = -1;
  if (m0 < least || (s == "dualpipe" && m0 % 2 != 0)) {
    bad = r.start();
  } else if (s == "dualpipe" && rise % 2 != 0) {
    bad = r.start() + r.increment();
  }
  c.expect(bad < 0,
           "{}: a step of {} sequences runs {} micro-batches per pipeline, which schedule {} with "
           "parallel.pp={} cannot run (it needs >= {}{})",
           where, bad, bad / unit, s, p.pp(), least, s == "dualpipe" ? ", even" : "");
  if (!c.ok()) return;
  const auto plan = batch_plan(cfg);  // what is left: the size of the plan's table
  c.expect(plan.ok(), "{}: {}", where, plan.ok() ? "" : plan.status().message());
}

// Rules between train, data, model and parallel.
void ValidateCross(const Config& cfg, int world, Checker& c) {
  ValidateLayout(cfg, world, c);
  c.expect(!recomputes(cfg.train(), "mla_up_proj") || cfg.model().attention() == config::Model::MLA,
           "train.recompute=\"{}\": mla_up_proj needs model.attention=MLA (got {})",
           cfg.train().recompute(), config::Model::Attention_Name(cfg.model().attention()));
  const auto& p = cfg.parallel();
  const auto& t = cfg.train();
  const int64_t unit_batch = int64_t{p.dp()} * p.microbatches();
  const int64_t lo = t.global_batch() / unit_batch * unit_batch;
  c.expect(t.global_batch() % unit_batch == 0,
           "train.global_batch={} must be divisible by parallel.dp·parallel.microbatches = {}·{} = "
           "{} (nearest valid: {})",
           t.global_batch(), p.dp(), p.microbatches(), unit_batch,
           lo > 0 ? fmt::format("{}, {}", lo, lo + unit_batch) : fmt::format("{}", unit_batch));
  if (c.ok()) ValidateBatchRamp(cfg, c);
  const int mtp = cfg.model().mtp_depth();
  c.expect(t.seq_len() > mtp + 1,
           "train.seq_len={} must be > model.mtp_depth+1 = {} (MTP depth k predicts token i+k+1)",
           t.seq_len(), mtp + 1);
  const auto& d = cfg.data();
  const int vocab = cfg.model().vocab_size();
  c.expect(d.source() != "tokens" || d.token_dtype() != "uint16" || vocab <= 65536,
           "data.token_dtype=uint16 cannot hold model.vocab_size={} token ids (max 65536; use "
           "uint32)",
           vocab);
  c.expect(d.source() != "synthetic" || d.synthetic().branching() <= vocab,
           "data.synthetic.branching={} must be <= model.vocab_size={}", d.synthetic().branching(),
           vocab);
  c.expect(t.eval_every() <= 0 || d.source() == "synthetic" || d.heldout_fraction() > 0,
           "train.eval_every={} needs held-out data but data.heldout_fraction=0 for "
           "data.source={}",
           t.eval_every(), d.source());
}

}  // namespace

Result<data::BatchPlan> batch_plan(const config::Config& cfg) {
  const auto& t = cfg.train();
  const auto& r = t.batch_ramp();
  if (r.start() == 0) return data::BatchPlan::constant(t.global_batch());
  return data::BatchPlan::ramp(r.start(), r.increment(), r.tokens() / t.seq_len(),
                               t.global_batch());
}

int microbatches_for(const config::Config& cfg, int64_t batch) {
  const int64_t unit = cfg.train().global_batch() / cfg.parallel().microbatches();  // dp · B
  return static_cast<int>(batch / unit);
}

std::vector<std::string> recompute_modules(const config::Train& t) {
  std::vector<std::string> out;
  const std::string& s = t.recompute();
  if (s.empty()) return out;
  size_t begin = 0;
  while (true) {
    const size_t end = s.find(',', begin);
    std::string item = s.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    out.push_back(std::move(item));
    if (end == std::string::npos) return out;
    begin = end + 1;
  }
}

bool recomputes(const config::Train& t, std::string_view module) {
  const auto ms = recompute_modules(t);
  return std::find(ms.begin(), ms.end(), module) != ms.end();
}

std::string_view attn_out_cache(const config::Precision& p) {
  if (p.mode() == config::Precision::FP32) return "bf16";
  if (p.attn_out_cache() == "auto") return p.mode() == config::Precision::FP8 ? "e5m6" : "bf16";
  return p.attn_out_cache();
}

std::span<const std::string_view> config_choices(std::string_view path) {
  for (const auto& c : kChoiceFields) {
    if (c.path == path) return c.values;
  }
  return {};
}

Result<config::Config> parse_config_text(std::string_view text, std::string_view name) {
  Config cfg;
  Collector errors(name);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  parser.AllowUnknownField(false);
  if (!parser.ParseFromString(std::string(text), &cfg)) {
    return Status(Code::kInvalidArgument, errors.text(),
                  "fields and choices are documented in configs/fp8pipe.proto");
  }
  return cfg;
}

Status set_field(config::Config& cfg, std::string_view path, std::string_view value) {
  pb::Message* m = nullptr;
  const pb::FieldDescriptor* fd = nullptr;
  FP8_RETURN_IF_ERROR(resolve_path(&cfg, path, &m, &fd));
  return set_scalar(m, fd, path, value);
}

Status apply_overrides(config::Config& cfg, std::span<const std::string> args) {
  for (size_t i = 0; i < args.size(); ++i) {
    std::string_view a = args[i];
    if (!a.starts_with("--") || a.size() == 2) {
      return FP8_INVALID("unexpected argument '{}': overrides look like --path.to.field=value", a);
    }
    a.remove_prefix(2);
    const size_t eq = a.find('=');
    if (eq != std::string_view::npos) {
      FP8_RETURN_IF_ERROR(set_field(cfg, a.substr(0, eq), a.substr(eq + 1)));
      continue;
    }
    if (i + 1 >= args.size()) return FP8_INVALID("override --{} needs a value", a);
    FP8_RETURN_IF_ERROR(set_field(cfg, a, args[++i]));
  }
  return Status::Ok();
}

void apply_defaults(config::Config& cfg) {
  // train.tokens without train.steps: the steps that reach it (a bad batch plan leaves steps
  // unset, and validation names both).
  if (!cfg.train().has_steps() && cfg.train().tokens() > 0 && cfg.train().seq_len() > 0) {
    auto plan = batch_plan(cfg);
    const int64_t T = cfg.train().seq_len();
    if (plan.ok())
      cfg.mutable_train()->set_steps(plan->steps_to((cfg.train().tokens() + T - 1) / T));
  }
  fill_schema_defaults(&cfg);
  for (const auto& c : kChoiceFields) lower_choice(cfg, c.path);
  auto& model = *cfg.mutable_model();
  if (model.attention() == config::Model::MHA && model.head_dim() == 0 && model.heads() > 0 &&
      model.hidden() % model.heads() == 0) {
    model.set_head_dim(model.hidden() / model.heads());
  }
  auto& moe = *model.mutable_moe();
  if (moe.max_nodes() == 0) moe.set_max_nodes(moe.n_groups());
  auto& par = *cfg.mutable_parallel();
  if (par.microbatches() == 0) {
    const bool dual = par.schedule() == "dualpipe" || par.schedule() == "dualpipev";
    par.set_microbatches(par.pp() <= 1 ? 1 : (dual ? 2 * par.pp() : par.pp()));
  }
  auto& syn = *cfg.mutable_data()->mutable_synthetic();
  if (syn.seed() == 0) syn.set_seed(cfg.train().seed());
}

Result<config::Config> parse_config(const std::string& path,
                                    std::span<const std::string> overrides) {
  std::ifstream in(path);
  if (!in) {
    return Status(Code::kNotFound, fmt::format("cannot read config file '{}'", path),
                  "presets live in configs/*.textproto");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  FP8_ASSIGN_OR_RETURN(Config cfg, parse_config_text(ss.str(), path));
  FP8_RETURN_IF_ERROR(apply_overrides(cfg, overrides));
  apply_defaults(cfg);
  return cfg;
}

Result<config::Config> load_config(const std::string& path,
                                   std::span<const std::string> overrides) {
  FP8_ASSIGN_OR_RETURN(Config cfg, parse_config(path, overrides));
  Status st = validate(cfg);
  if (!st.ok()) return st.with_context(path);
  return cfg;
}

Status validate(const config::Config& cfg, int world_size) {
  Checker c;
  ValidateModel(cfg.model(), c);
  ValidateParallel(cfg.parallel(), c);
  ValidatePrecision(cfg.precision(), c);
  ValidateTrain(cfg.train(), c);
  ValidateOptim(cfg.optim(), c);
  ValidateData(cfg.data(), c);
  ValidateCheckpoint(cfg.checkpoint(), c);
  ValidateLog(cfg.log(), c);
  ValidateCluster(cfg.cluster(), c);
  ValidateFault(cfg.fault(), c);
  if (c.ok()) ValidateCross(cfg, world_size, c);  // cross rules assume sane sections
  return c.status();
}

std::string to_text(const config::Config& cfg) {
  std::string out;
  pb::TextFormat::Printer printer;
  printer.PrintToString(cfg, &out);
  return out;
}

}  // namespace fp8pipe
