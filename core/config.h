// Loading, overriding, defaulting and validating the one config schema (configs/fp8pipe.proto).
// Everything happens before any device or communicator work, and every error names the field path,
// the value, the rule and the valid choices (DESIGN.md §7, STYLE.md 10).
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "configs/fp8pipe.pb.h"
#include "core/data.h"
#include "core/status.h"

namespace fp8pipe {

// Text-format config file → overrides → defaults → validate(cfg, world_size = 0).
// `overrides` are command-line arguments: "--a.b=v" or "--a.b" "v".
Result<config::Config> load_config(const std::string& path,
                                   std::span<const std::string> overrides = {});

// The same without validation (tools that inspect invalid configs, tests).
Result<config::Config> parse_config(const std::string& path,
                                    std::span<const std::string> overrides = {});
// Parses text-format `text`; `name` labels errors ("name:line:col: message"). No defaults applied.
Result<config::Config> parse_config_text(std::string_view text, std::string_view name);

// Applies "--a.b=v" / "--a.b" "v" arguments in order; any other argument is an error.
Status apply_overrides(config::Config& cfg, std::span<const std::string> args);
// Sets the field at `path` ("parallel.schedule") from its text `value` by reflection: integers,
// floats, bools (true|false|1|0), enums (names, any case), strings (choice strings any case).
Status set_field(config::Config& cfg, std::string_view path, std::string_view value);

// Writes every schema default into unset fields (so the printed config is complete), resolves
// the derived fields (model.head_dim, model.moe.max_nodes, parallel.microbatches,
// data.synthetic.seed) and lower-cases choice strings. Idempotent.
void apply_defaults(config::Config& cfg);

// All rules (one Validate per section plus cross-section rules), on a defaulted config. With
// world_size > 0 also checks parallel.pp · parallel.dp == world_size.
Status validate(const config::Config& cfg, int world_size = 0);

// The config in text format (what `fp8pipe config` prints and checkpoints save).
std::string to_text(const config::Config& cfg);

// The modules of train.recompute (comma-separated; validated against kRecomputeModules).
constexpr std::string_view kRecomputeModules[] = {"mla_up_proj", "rmsnorm"};
std::vector<std::string> recompute_modules(const config::Train& t);
bool recomputes(const config::Train& t, std::string_view module);
// precision.attn_out_cache with auto resolved by the mode: "e5m6" under FP8, "bf16" otherwise;
// "bf16" under FP32 whatever is set (FP32 holds the fp32 output).
std::string_view attn_out_cache(const config::Precision& p);

// Rows per training step: train.batch_ramp's plan (ramp samples = tokens / seq_len), or
// train.global_batch every step without one.
Result<data::BatchPlan> batch_plan(const config::Config& cfg);

// Micro-batches per pipeline of a step of `batch` sequences: the micro-batch size is fixed at
// train.global_batch / (dp · parallel.microbatches), so a batch ramp's smaller steps run fewer.
int microbatches_for(const config::Config& cfg, int64_t batch);

// A Switch's effect on the setting it follows, for a step starting with `tokens` trained.
inline float switched(float value, const config::Switch& s, int64_t tokens) {
  return s.tokens() > 0 && tokens >= s.tokens() ? s.value() : value;
}

// Valid values of a choice-string field ("parallel.schedule" → 1f1b, zb1p, dualpipe,
// dualpipev); empty for any other path.
std::span<const std::string_view> config_choices(std::string_view path);

}  // namespace fp8pipe
