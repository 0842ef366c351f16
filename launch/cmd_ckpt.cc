// `fp8pipe ckpt inspect|verify|export`: look into training checkpoints (core/checkpoint.h)
// without a config or a model: list steps and shards, check checksums and coverage before a
// resume or a copy, and consolidate the fp32 weights into one safetensors file or an HF folder.
#include <algorithm>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/hf_export.h"
#include "core/safetensors.h"
#include "launch/commands.h"

namespace fp8pipe::cli {
namespace {

namespace fs = std::filesystem;

constexpr const char* kUsage =
    "usage: fp8pipe ckpt inspect DIR [--step N]\n"
    "       fp8pipe ckpt verify DIR [--step N]\n"
    "       fp8pipe ckpt export DIR OUT.safetensors [--step N] [--ema]\n"
    "       fp8pipe ckpt export DIR OUTDIR --format hf [--step N] [--dtype bf16|fp32|fp8]\n"
    "                           [--max-shard-mb N] [--ema]\n"
    "DIR is a checkpoint root (checkpoint.dir) or one step_NNNNNNNN directory. --format hf\n"
    "writes a Hugging Face DeepseekV3 folder (config.json + safetensors; docs/HF_EXPORT.md).\n"
    "--ema exports the weights' moving average (trained with optim.ema_decay > 0).\n";

struct Args {
  std::vector<std::string> positional;
  std::string step;  // "" = every step (inspect/verify) or the newest committed (export)
  std::string format = "fp8pipe";  // export: fp8pipe (one file) | hf (a DeepseekV3 folder)
  std::string dtype = "bf16";      // --format hf tensor dtype
  std::string shard_mb = "5120";   // --format hf shard size limit in MiB
  bool ema = false;                // export: the moving average instead of the weights
};

// "--name V" or "--name=V" at argv[i]: stores V and advances i; false if argv[i] is not --name.
bool take(int argc, char** argv, int& i, std::string_view name, std::string& out) {
  const std::string_view s = argv[i];
  if (s == name && i + 1 < argc) {
    out = argv[++i];
    return true;
  }
  if (s.starts_with(name) && s.size() > name.size() && s[name.size()] == '=') {
    out = s.substr(name.size() + 1);
    return true;
  }
  return false;
}

bool is_count(const std::string& s, int64_t* n) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *n);
  return ec == std::errc() && p == s.data() + s.size() && *n >= 0;
}

Result<Args> parse(int argc, char** argv) {
  Args a;
  for (int i = 0; i < argc; ++i) {
    const std::string s = argv[i];
    if (take(argc, argv, i, "--step", a.step) || take(argc, argv, i, "--format", a.format) ||
        take(argc, argv, i, "--dtype", a.dtype) ||
        take(argc, argv, i, "--max-shard-mb", a.shard_mb)) {
      continue;
    } else if (s == "--ema") {
      a.ema = true;
    } else if (s.starts_with("-")) {
      return FP8_INVALID("unknown option '{}'", s);
    } else {
      a.positional.push_back(s);
    }
  }
  int64_t n = 0;
  if (!a.step.empty() && !is_count(a.step, &n))
    return FP8_INVALID("--step={}: expected a step number", a.step);
  if (!is_count(a.shard_mb, &n) || n == 0)
    return FP8_INVALID("--max-shard-mb={}: expected a positive number", a.shard_mb);
  if (a.format != "fp8pipe" && a.format != "hf")
    return FP8_INVALID("--format={}: expected fp8pipe or hf", a.format);
  if (a.dtype != "bf16" && a.dtype != "fp32" && a.dtype != "fp8")
    return FP8_INVALID("--dtype={}: expected bf16, fp32 or fp8", a.dtype);
  return a;
}

// A root and the step directories to look at: DIR itself when it is a step directory.
struct Target {
  std::string root;
  std::vector<ckpt::StepDir> steps;
};

Target locate(const std::string& dir, const std::string& step) {
  Target t;
  const fs::path p = fs::path(dir).lexically_normal();
  const auto own = ckpt::parse_step_dir_name(p.filename().string());
  if (own && fs::exists(p / ckpt::kManifestFile)) {
    t.root = p.parent_path().string();
    t.steps.push_back({*own, fs::exists(p / ckpt::kCommittedFile)});
    return t;
  }
  t.root = dir;
  for (const ckpt::StepDir& s : ckpt::list_step_dirs(dir)) {
    if (step.empty() || std::to_string(s.step) == step) t.steps.push_back(s);
  }
  return t;
}

std::string step_path(const Target& t, int64_t step) {
  return (fs::path(t.root) / ckpt::step_dir_name(step)).string();
}

std::string mib(uint64_t bytes) { return fmt::format("{:.1f} MiB", bytes / 1048576.0); }

void print_summary(const std::string& name, const ckpt::Manifest& m) {
  uint64_t bytes = 0;
  for (const auto& f : m.files) bytes += f.bytes;
  fmt::print(
      "  {}  committed    step {}, {} tokens, optimizer step {}, {} skipped, {}, {} file(s), {}\n",
      name, m.step, m.tokens_seen, m.optimizer_step, m.skipped_steps, m.topology.to_string(),
      m.files.size(), mib(bytes));
}

void print_details(const std::string& name, const ckpt::Manifest& m) {
  fmt::print("\n{}:\n  files:\n", name);
  for (const auto& f : m.files)
    fmt::print("    {}  rank {}  {} bytes  crc32 {:08x}\n", f.file, f.rank, f.bytes, f.crc32);
  fmt::print("  ranks:\n");
  for (const auto& r : m.ranks) {
    fmt::print("    rank {} (pp {}, dp {}): data step {}, rng seed {} counter {}, {} skipped\n",
               r.rank, r.pp_rank, r.dp_rank, r.data_step, r.rng_seed, r.rng_counter,
               r.skipped_steps);
  }
  fmt::print("  tensors ({}):\n", m.tensors.size());
  for (const auto& t : m.tensors) {
    std::string shards;
    for (const auto& s : t.shards)
      shards += fmt::format("  {} [{}, {}){}", s.file, s.begin, s.end,
                            s.replica ? fmt::format(" replica {}", s.replica) : "");
    fmt::print("    {}  {}  {} [{}]{}\n", t.name, ckpt::kind_name(t.kind), t.dtype,
               fmt::join(t.shape, ", "), shards);
  }
}

int inspect(const Args& a) {
  const Target t = locate(a.positional[0], a.step);
  auto latest = std::string();
  if (FILE* f = std::fopen((fs::path(t.root) / ckpt::kLatestFile).c_str(), "r")) {
    char buf[256] = {};
    if (std::fgets(buf, sizeof buf, f)) latest = buf;
    std::fclose(f);
    while (!latest.empty() && (latest.back() == '\n' || latest.back() == '\r')) latest.pop_back();
  }
  fmt::print("checkpoint root {} (latest: {})\n", t.root, latest.empty() ? "none" : latest);
  if (t.steps.empty()) fmt::print("  no step directories{}\n", a.step.empty() ? "" : " at --step");
  std::optional<std::pair<std::string, ckpt::Manifest>> detail;
  for (const ckpt::StepDir& s : t.steps) {
    const std::string name = ckpt::step_dir_name(s.step);
    if (!s.committed) {
      fmt::print("  {}  UNCOMMITTED  (a save that did not finish; ignored by resume)\n", name);
      continue;
    }
    auto m = ckpt::read_manifest(step_path(t, s.step));
    if (!m.ok()) {
      fmt::print("  {}  committed    unreadable manifest: {}\n", name, m.status().message());
      continue;
    }
    print_summary(name, *m);
    detail.emplace(name, std::move(*m));  // the newest (or the --step one) is detailed below
  }
  if (detail) print_details(detail->first, detail->second);
  return 0;
}

int verify(const Args& a) {
  const Target t = locate(a.positional[0], a.step);
  int failed = 0, checked = 0;
  for (const ckpt::StepDir& s : t.steps) {
    const std::string name = ckpt::step_dir_name(s.step);
    if (!s.committed && a.step.empty()) {
      fmt::print("SKIP {}: not committed (ignored by resume)\n", name);
      continue;
    }
    ++checked;
    auto m = ckpt::verify(step_path(t, s.step));
    if (m.ok()) {
      fmt::print("OK   {}: {} file(s) match their crc32 and size; {} tensors covered\n", name,
                 m->files.size(), m->tensors.size());
    } else {
      ++failed;
      fmt::print("FAIL {}: {}\n", name, m.status().message());
    }
  }
  if (checked == 0) {
    fmt::print(stderr, "no {}checkpoint to verify under {}\n",
               a.step.empty() ? "committed " : "such ", t.root);
    return 1;
  }
  return failed ? 1 : 0;
}

// The model weights (params and router biases, fp32) by global name, whole tensors, in the
// manifest's order: the same file `fp8pipe train --save` writes.
Status export_model(const Args& a) {
  const Target t = locate(a.positional[0], "");
  FP8_ASSIGN_OR_RETURN(auto found, ckpt::resolve(t.root, a.step, false));
  if (!found) return FP8_ERROR(Code::kNotFound, "no committed checkpoint under {}", t.root);
  const int64_t step = found->manifest.step;
  FP8_ASSIGN_OR_RETURN(auto l, ckpt::Loaded::open(found->step_dir, std::move(found->manifest)));
  if (a.ema) {
    const auto& ts = l.manifest().tensors;
    if (std::none_of(ts.begin(), ts.end(),
                     [](const ckpt::TensorRecord& t) { return t.kind == ckpt::Kind::kEma; })) {
      return FP8_INVALID(
          "--ema: checkpoint {} holds no moving average (train with "
          "optim.ema_decay > 0)",
          found->step_dir);
    }
  }
  const ckpt::Kind weights = a.ema ? ckpt::Kind::kEma : ckpt::Kind::kParam;
  if (a.format == "hf") {
    hf::Options o;
    o.ema = a.ema;
    o.dtype = a.dtype;
    o.max_shard_bytes = std::stoull(a.shard_mb) << 20;
    FP8_RETURN_IF_ERROR(hf::export_folder(l, a.positional[1], o));
    fmt::print("exported {} (step {}) as a Hugging Face DeepseekV3 folder ({}) to {}\n",
               found->step_dir, step, a.dtype, a.positional[1]);
    return Status::Ok();
  }
  safetensors::Writer w;
  int64_t n = 0;
  for (const ckpt::TensorRecord& tr : l.manifest().tensors) {
    if (tr.kind != weights && tr.kind != ckpt::Kind::kRouterBias) continue;
    if (tr.dtype != "F32") return FP8_INVALID("tensor '{}' is {}, expected F32", tr.name, tr.dtype);
    std::vector<uint8_t> bytes(size_t(tr.numel()) * 4);
    FP8_RETURN_IF_ERROR(l.read(tr.name, "F32", 0, tr.numel(), bytes.data()));
    // an average is written under its weight's name: the file loads as a model
    const std::string name =
        tr.kind == ckpt::Kind::kEma ? tr.name.substr(0, tr.name.size() - 4) : tr.name;
    FP8_RETURN_IF_ERROR(w.add(name, "F32", tr.shape, std::move(bytes)));
    ++n;
  }
  w.set_metadata("format", "fp8pipe-model");
  if (a.ema) w.set_metadata("weights", "ema");
  w.set_metadata("step", std::to_string(step));
  FP8_RETURN_IF_ERROR(w.write(a.positional[1]));
  fmt::print("exported {} tensors of {} to {}\n", n, found->step_dir, a.positional[1]);
  return Status::Ok();
}

}  // namespace

int cmd_ckpt(int argc, char** argv) {
  const std::string sub = argc > 0 ? argv[0] : "";
  auto a = parse(argc - 1, argv + 1);
  const size_t want = sub == "export" ? 2 : 1;
  if (!a.ok() || (sub != "inspect" && sub != "verify" && sub != "export") ||
      a->positional.size() != want) {
    if (!a.ok()) std::fprintf(stderr, "%s\n", a.status().to_string().c_str());
    std::fputs(kUsage, stderr);
    return 2;
  }
  if (sub == "inspect") return inspect(*a);
  if (sub == "verify") return verify(*a);
  if (Status st = export_model(*a); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.to_string().c_str());
    return 1;
  }
  return 0;
}

}  // namespace fp8pipe::cli
