// `fp8pipe train CONFIG [--a.b=v ...] [--fallback] [--reshard] [--dry-run [--world-size N]]` and
// `fp8pipe eval CONFIG --checkpoint PATH`: load and validate the config on every rank before any
// work, resume (checkpoint.resume), run the trainer. Under mpirun each process is one rank of the
// pp x dp layout. --dry-run prints every rank's layout and the validated schedule from one
// process, without MPI or devices (launch/dry_run.h).
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/hf_import.h"
#include "core/log.h"
#include "core/model/decode.h"
#include "launch/commands.h"
#include "launch/dry_run.h"
#include "launch/trainer.h"
#include "parallel/comm.h"

namespace fp8pipe::cli {
namespace {

// MPI for the process (one rank per process under mpirun), then the layout and communicators
// once the config is known. A fatal error on one rank of a multi-rank job aborts them all.
struct MpiSession {
  int rank = 0, world = 1, ranks_per_host = 0;
  std::optional<Runtime> rt;
  std::optional<parallel::CommSet> comms;
  MpiSession() {
    auto w = parallel::mpi_init(nullptr, nullptr);
    if (!w.ok()) {
      log::error("{}", w.status().to_string());
      std::exit(2);
    }
    rank = w->rank;
    world = w->size;
    ranks_per_host = w->ranks_per_host;
    set_process_rank(rank);
  }
  ~MpiSession() {
    comms.reset();
    (void)parallel::mpi_finalize();
  }
  Result<const Runtime*> runtime(const config::Config& cfg) {
    const auto& p = cfg.parallel();
    int rpn = p.ranks_per_node() > 0 ? p.ranks_per_node() : ranks_per_host;
    if (rpn <= 0 || world % rpn != 0) rpn = world;
    FP8_ASSIGN_OR_RETURN(auto topo, parallel::Topology::create(p.pp(), p.dp(), p.ep(), rpn, rank));
    FP8_ASSIGN_OR_RETURN(auto cs, parallel::create_comms(topo, {cfg.fault().timeout_s()}));
    comms.emplace(std::move(cs));
    rt.emplace(Runtime{std::move(topo), &*comms});
    return &*rt;
  }
};

// Splits argv into the config path, "--flag VALUE" (or "--flag=VALUE") options named in `own`,
// and overrides.
Status parse_args(int argc, char** argv, const std::vector<std::string>& own, std::string* path,
                  std::vector<std::pair<std::string, std::string>>* opts,
                  std::vector<std::string>* overrides) {
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    bool matched = false;
    for (const auto& o : own) {
      if (a == o && i + 1 < argc) {
        opts->push_back({o, argv[++i]});
        matched = true;
      } else if (a.size() > o.size() && a.compare(0, o.size(), o) == 0 && a[o.size()] == '=') {
        opts->push_back({o, a.substr(o.size() + 1)});  // "--flag=VALUE"
        matched = true;
      }
    }
    if (matched) continue;
    if (a.rfind("--", 0) == 0) {
      overrides->push_back(a);
    } else if (path->empty()) {
      *path = a;
    } else if (!overrides->empty() && overrides->back().find('=') == std::string::npos) {
      overrides->push_back(a);  // "--a.b VALUE"
    } else {
      return FP8_INVALID("unexpected argument '{}' (one CONFIG path, then --a.b=v overrides)", a);
    }
  }
  if (path->empty()) return FP8_INVALID("missing CONFIG path (e.g. configs/tiny.textproto)");
  return Status::Ok();
}

// Removes the value-less flags --fallback and --reshard from argv (checkpoint resume choices).
ResumeOptions take_resume_flags(int& argc, char** argv) {
  ResumeOptions r;
  int out = 0;
  for (int i = 0; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--fallback") {
      r.fallback = true;
    } else if (a == "--reshard") {
      r.reshard = true;
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  return r;
}

// A failure after the communicators exist: on a multi-rank job end every rank, never hang them.
int fail_all(const MpiSession& mpi, const Status& s);

int fail(const Status& s) {
  log::error("{}", s.to_string());
  return 2;
}

Status make_parent_dir(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec)
    return FP8_ERROR(Code::kIo, "cannot create directory '{}': {}", parent.string(), ec.message());
  return Status::Ok();
}

Result<config::Config> load_for_world(const std::string& path, const std::vector<std::string>& ov,
                                      int world) {
  FP8_ASSIGN_OR_RETURN(auto cfg, load_config(path, ov));
  FP8_RETURN_IF_ERROR(validate(cfg, world));
  return cfg;
}

int fail_all(const MpiSession& mpi, const Status& s) {
  if (mpi.world > 1) parallel::abort_all(s);
  return fail(s);
}

}  // namespace

std::atomic<bool> g_sigterm{false};  // set by the signal handler only
extern "C" void on_sigterm(int) { g_sigterm.store(true); }

// --dry-run: the layout, partition and schedule of every rank, from one process without MPI or
// devices (launch/dry_run.h). World size: --world-size N, else parallel.pp · parallel.dp.
static int dry_run(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string_view(argv[i]) != "--dry-run") args.emplace_back(argv[i]);
  }
  auto world = take_world_size(args);
  if (!world.ok()) return fail(world.status());
  std::vector<char*> av;
  for (auto& a : args) av.push_back(a.data());
  std::string path;
  std::vector<std::pair<std::string, std::string>> opts;
  std::vector<std::string> ov;
  if (Status s = parse_args(static_cast<int>(av.size()), av.data(), {"--save"}, &path, &opts, &ov);
      !s.ok())
    return fail(s);
  auto cfg = load_config(path, ov);
  if (!cfg.ok()) return fail(cfg.status());
  const int n = *world > 0 ? *world : cfg->parallel().pp() * cfg->parallel().dp();
  if (Status s = validate(*cfg, n); !s.ok()) return fail(s);
  auto report = dry_run_report(*cfg, n);
  if (!report.ok()) return fail(report.status());
  fmt::print("{}", *report);
  return 0;
}

int cmd_train(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--dry-run") return dry_run(argc, argv);
  }
  MpiSession mpi;
  std::signal(SIGTERM, on_sigterm);
  std::string path;
  std::vector<std::pair<std::string, std::string>> opts;
  std::vector<std::string> ov;
  const ResumeOptions resume = take_resume_flags(argc, argv);
  if (Status s = parse_args(argc, argv, {"--save"}, &path, &opts, &ov); !s.ok()) return fail(s);
  auto cfg = load_for_world(path, ov, mpi.world);
  if (!cfg.ok()) return fail(cfg.status());
  if (Status s = make_parent_dir(cfg->log().jsonl()); !s.ok()) return fail(s);
  auto sink = MetricsSink::open(cfg->log().jsonl(), mpi.rank, cfg->log().every(), mpi.rank == 0);
  if (!sink.ok()) return fail(sink.status());
  auto rt = mpi.runtime(*cfg);
  if (!rt.ok()) return fail(rt.status());
  auto trainer = Trainer::create(*cfg, *rt);
  if (!trainer.ok()) return fail_all(mpi, trainer.status());
  (*trainer)->set_stop_flag(&g_sigterm);
  if (Status s = (*trainer)->resume(resume); !s.ok()) return fail_all(mpi, s);
  if (Status s = (*trainer)->run(*sink); !s.ok()) return fail_all(mpi, s);
  if (mpi.world > 1) return 0;  // model-only export of a multi-rank run: `fp8pipe ckpt export`
  std::string save =
      cfg->checkpoint().dir().empty() ? "" : cfg->checkpoint().dir() + "/model.safetensors";
  for (auto& [k, v] : opts)
    if (k == "--save") save = v;
  if (!save.empty()) {
    if (Status s = make_parent_dir(save); !s.ok()) return fail(s);
    if (Status s = (*trainer)->save_model(save); !s.ok()) return fail(s);
    log::info("saved model to {}", save);
  }
  return 0;
}

// A saved model for `command` (eval, generate) on one process: the config of `path` with the
// overrides, then the weights of `ckpt`: a model.safetensors written by train, its directory, or a
// Hugging Face DeepseekV3 folder (read by name, core/hf_import.h).
Result<std::unique_ptr<Trainer>> load_saved_model(const MpiSession& mpi, const char* command,
                                                  const std::string& path,
                                                  const std::vector<std::string>& ov,
                                                  std::string ckpt) {
  if (ckpt.empty()) {
    return FP8_INVALID(
        "{} needs --checkpoint PATH (a model.safetensors written by train, its directory, or a "
        "Hugging Face DeepseekV3 folder)",
        command);
  }
  const bool hf_folder = hf::is_hf_folder(ckpt);
  if (!hf_folder && std::filesystem::is_directory(ckpt)) ckpt += "/model.safetensors";
  if (mpi.world > 1) return FP8_INVALID("{} runs on one process (mpirun -np 1)", command);
  FP8_ASSIGN_OR_RETURN(auto cfg, load_config(path, ov));
  // The whole model runs in this one process, whatever layout the config trained with.
  config::Parallel& par = *cfg.mutable_parallel();
  if (par.pp() != 1 || par.dp() != 1 || par.ep() != 1) {
    log::info("{}: one process, so the layout pp={} dp={} ep={} ({}) becomes pp=1 dp=1 ep=1 (1f1b)",
              command, par.pp(), par.dp(), par.ep(), par.schedule());
    par.set_pp(1);
    par.set_dp(1);
    par.set_ep(1);
    par.set_schedule("1f1b");
    par.set_comm_backend("mpi");
  }
  FP8_RETURN_IF_ERROR(validate(cfg, mpi.world));
  FP8_ASSIGN_OR_RETURN(auto trainer, Trainer::create(cfg));
  FP8_RETURN_IF_ERROR(hf_folder ? trainer->init_from(ckpt) : trainer->load_model(ckpt));
  return trainer;
}

int cmd_eval(int argc, char** argv) {
  MpiSession mpi;
  std::string path;
  std::vector<std::pair<std::string, std::string>> opts;
  std::vector<std::string> ov;
  if (Status s = parse_args(argc, argv, {"--checkpoint", "--batches"}, &path, &opts, &ov); !s.ok())
    return fail(s);
  std::string ckpt;
  int64_t batches = 0;
  for (auto& [k, v] : opts) {
    if (k == "--checkpoint") ckpt = v;
    if (k == "--batches") batches = std::stoll(v);
  }
  auto trainer = load_saved_model(mpi, "eval", path, ov, ckpt);
  if (!trainer.ok()) return fail(trainer.status());
  if (batches <= 0) batches = (*trainer)->config().train().eval_batches();
  auto loss = (*trainer)->evaluate(batches);
  if (!loss.ok()) return fail(loss.status());
  fmt::print("eval loss {:.6f} nats/token ({} held-out batches, step {})\n", *loss, batches,
             (*trainer)->step());
  if (const auto* syn = (*trainer)->synthetic()) {
    fmt::print("entropy rate of the synthetic source {:.6f} (gap {:.4f})\n", syn->entropy_rate(),
               *loss - syn->entropy_rate());
  }
  return 0;
}

// Text of byte-level tokens (core/data.h): ids < 256 are bytes, others print as <id>.
std::string token_text(const std::vector<int32_t>& t) {
  std::string s;
  for (int32_t id : t) {
    if (id >= 0 && id < 256) {
      s.push_back(static_cast<char>(id));
    } else {
      s += fmt::format("<{}>", id);
    }
  }
  return s;
}

constexpr const char* kGenerateUsage =
    "usage: fp8pipe generate CONFIG --checkpoint PATH [options] [--a.b=v ...]\n"
    "  Byte-level text from a saved model (train's model.safetensors, its run directory, or a\n"
    "  Hugging Face DeepseekV3 folder) under the config it trained with, on one process.\n"
    "  --prompt TEXT          a prompt (repeat for a batch; default a newline)\n"
    "  --prompt-file F        the file's bytes as a prompt\n"
    "  --max-new-tokens N     tokens to generate per prompt (default 64; stops at "
    "end-of-document)\n"
    "  --temperature T        0: greedy (default); else sampling at T\n"
    "  --top-k K, --top-p P   sample from the K most likely / the fewest reaching mass P\n"
    "  --seed S               the sampler's stream (prompt i uses S + i)\n"
    "  --speculative mtp      MTP depth 1 drafts each next-but-one token, the main model verifies\n"
    "  --kv-cache latent|heads       MLA's latent cache (default) or per-head keys and values\n"
    "  --kv-cache-dtype auto|fp32|bf16  auto: bf16 outside FP32 precision\n";

int cmd_generate(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--help" || std::string_view(argv[i]) == "-h") {
      std::fputs(kGenerateUsage, stdout);
      return 0;
    }
  }
  MpiSession mpi;
  const std::vector<std::string> own = {
      "--checkpoint", "--prompt", "--prompt-file", "--max-new-tokens", "--temperature",   "--top-k",
      "--top-p",      "--seed",   "--speculative", "--kv-cache",       "--kv-cache-dtype"};
  std::string path;
  std::vector<std::pair<std::string, std::string>> opts;
  std::vector<std::string> ov;
  if (Status s = parse_args(argc, argv, own, &path, &opts, &ov); !s.ok()) return fail(s);
  std::string ckpt, prompt_file, speculative = "none", kv = "latent", kv_dtype = "auto";
  std::vector<std::string> prompts;  // one sequence each (--prompt may repeat: a batch)
  model::GenerateOptions o;
  try {
    for (auto& [k, v] : opts) {
      if (k == "--checkpoint") ckpt = v;
      if (k == "--prompt") prompts.push_back(v);
      if (k == "--prompt-file") prompt_file = v;
      if (k == "--max-new-tokens") o.max_new_tokens = std::stoll(v);
      if (k == "--temperature") o.temperature = std::stof(v);
      if (k == "--top-k") o.top_k = std::stoll(v);
      if (k == "--top-p") o.top_p = std::stof(v);
      if (k == "--seed") o.seed = std::stoull(v);
      if (k == "--speculative") speculative = v;
      if (k == "--kv-cache") kv = v;
      if (k == "--kv-cache-dtype") kv_dtype = v;
    }
  } catch (const std::exception&) {
    return fail(FP8_INVALID("generate: a numeric option has a value that is not a number"));
  }
  if (speculative != "none" && speculative != "mtp") {
    return fail(FP8_INVALID("generate: --speculative '{}' is not one of: none, mtp", speculative));
  }
  if (kv != "latent" && kv != "heads") {
    return fail(FP8_INVALID("generate: --kv-cache '{}' is not one of: latent, heads", kv));
  }
  if (kv_dtype != "auto" && kv_dtype != "fp32" && kv_dtype != "bf16") {
    return fail(
        FP8_INVALID("generate: --kv-cache-dtype '{}' is not one of: auto, fp32, bf16", kv_dtype));
  }
  if (o.temperature < 0 || o.top_k < 0) {
    return fail(FP8_INVALID("generate: --temperature {} and --top-k {} must be >= 0", o.temperature,
                            o.top_k));
  }
  if (!(o.top_p > 0 && o.top_p <= 1)) {
    return fail(FP8_INVALID("generate: --top-p {} must be in (0, 1]", o.top_p));
  }
  if (!prompt_file.empty()) {  // the file's bytes, as prepare-data tokenizes them
    std::ifstream f(prompt_file, std::ios::binary);
    if (!f)
      return fail(FP8_ERROR(Code::kIo, "generate: cannot read --prompt-file '{}'", prompt_file));
    prompts.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    if (prompts.back().empty()) {
      return fail(FP8_INVALID("generate: --prompt-file '{}' is empty", prompt_file));
    }
  }
  if (prompts.empty()) prompts.push_back("\n");
  o.speculative = speculative == "mtp";
  o.latent_cache = kv == "latent";
  o.stop = {static_cast<int32_t>(data::kEndOfDocument)};
  auto trainer = load_saved_model(mpi, "generate", path, ov, ckpt);
  if (!trainer.ok()) return fail(trainer.status());
  // auto: bf16 where the model's activations are bf16 (FP8 and BF16 precision), else fp32
  const bool fp32_model = (*trainer)->ctx().precision == model::Precision::kFP32;
  o.cache_dtype =
      kv_dtype == "bf16" || (kv_dtype == "auto" && !fp32_model) ? DType::kBF16 : DType::kF32;
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  const int64_t positions = static_cast<int64_t>(longest) + o.max_new_tokens;
  if (const int64_t trained = (*trainer)->config().train().seq_len(); positions > trained) {
    log::warn(
        "generate: up to {} positions, past the {} the model trained on (train.seq_len): RoPE "
        "extrapolates there (model.rope_scaling extends a context by training)",
        positions, trained);
  }
  std::vector<std::vector<int32_t>> ids;
  for (const auto& p : prompts) ids.emplace_back(p.begin(), p.end());
  for (auto& v : ids)
    for (int32_t& t : v) t = static_cast<unsigned char>(t);
  const bool stream = prompts.size() == 1;
  if (stream) {  // one sequence streams out as it is decided (the prompt first)
    fmt::print("{}", prompts[0]);
    std::fflush(stdout);
    o.on_token = [](size_t, int32_t t) {
      fmt::print("{}", token_text({t}));
      std::fflush(stdout);
    };
  }
  auto r = model::generate_batch((*trainer)->ctx(), (*trainer)->model(), ids, o);
  if (stream) fmt::print("\n");
  if (!r.ok()) return fail(r.status());
  int64_t tokens = 0, steps = 0, accepted = 0, drafted = 0;
  for (size_t i = 0; i < r->size(); ++i) {
    const model::GenerateResult& g = (*r)[i];
    if (!stream) fmt::print("--- sequence {} ---\n{}{}\n", i, prompts[i], token_text(g.tokens));
    tokens += static_cast<int64_t>(g.tokens.size());
    steps = std::max(steps, g.main_steps);
    accepted += g.accepted;
    drafted += g.drafted;
  }
  const model::GenerateResult& g0 = r->front();
  // the first token of each sequence comes from the prefill
  const double decoded = static_cast<double>(tokens - static_cast<int64_t>(r->size()));
  log::info(
      "generated {} tokens in {} sequence(s): prefill {:.3f} s, decode {:.3f} s ({:.1f} tokens/s, "
      "{} main steps){}; cache {} B a position ({} cache, {})",
      tokens, r->size(), g0.prefill_s, g0.decode_s,
      g0.decode_s > 0 ? std::max(0.0, decoded) / g0.decode_s : 0.0, steps,
      o.speculative ? fmt::format(", MTP drafts accepted {} of {} ({:.1f}%)", accepted, drafted,
                                  drafted ? 100.0 * accepted / drafted : 0.0)
                    : std::string(),
      g0.cache_bytes_per_position, kv, dtype_name(o.cache_dtype));
  return 0;
}

}  // namespace fp8pipe::cli
