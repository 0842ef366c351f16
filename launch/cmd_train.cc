// `fp8pipe train CONFIG [--a.b=v ...] [--fallback] [--reshard]` and `fp8pipe eval CONFIG
// --checkpoint PATH`: load and validate the config on every rank before any work, resume
// (checkpoint.resume), run the trainer. Under mpirun each process is one rank; this build trains on
// one rank (pp = dp = 1) until the distributed runtime lands, and refuses larger layouts with a
// clear message.
#include <mpi.h>

#include <filesystem>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "launch/commands.h"
#include "launch/trainer.h"

namespace fp8pipe::cli {
namespace {

struct MpiSession {
  int rank = 0, world = 1;
  MpiSession() {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) MPI_Init(nullptr, nullptr);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    set_process_rank(rank);
  }
  ~MpiSession() { MPI_Finalize(); }
};

// Splits argv into the config path, "--flag VALUE" options named in `own`, and overrides.
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
  if (cfg.parallel().pp() * cfg.parallel().dp() > 1) {
    return Status(Code::kUnimplemented,
                  fmt::format("parallel.pp={} parallel.dp={}: multi-rank training is not in this "
                              "build yet; only pp = dp = 1 runs",
                              cfg.parallel().pp(), cfg.parallel().dp()),
                  "run with mpirun -np 1 and --parallel.pp=1 --parallel.dp=1");
  }
  return cfg;
}

}  // namespace

int cmd_train(int argc, char** argv) {
  MpiSession mpi;
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
  auto trainer = Trainer::create(*cfg);
  if (!trainer.ok()) return fail(trainer.status());
  if (Status s = (*trainer)->resume(resume); !s.ok()) return fail(s);
  if (Status s = (*trainer)->run(*sink); !s.ok()) return fail(s);
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
  if (ckpt.empty())
    return fail(
        FP8_INVALID("eval needs --checkpoint PATH (a model.safetensors "
                    "written by train, or its directory)"));
  if (std::filesystem::is_directory(ckpt)) ckpt += "/model.safetensors";
  auto cfg = load_for_world(path, ov, mpi.world);
  if (!cfg.ok()) return fail(cfg.status());
  auto trainer = Trainer::create(*cfg);
  if (!trainer.ok()) return fail(trainer.status());
  if (Status s = (*trainer)->load_model(ckpt); !s.ok()) return fail(s);
  auto loss = (*trainer)->evaluate(batches > 0 ? batches : cfg->train().eval_batches());
  if (!loss.ok()) return fail(loss.status());
  fmt::print("eval loss {:.6f} nats/token ({} held-out batches, step {})\n", *loss,
             batches > 0 ? batches : cfg->train().eval_batches(), (*trainer)->step());
  if (const auto* syn = (*trainer)->synthetic()) {
    fmt::print("entropy rate of the synthetic source {:.6f} (gap {:.4f})\n", syn->entropy_rate(),
               *loss - syn->entropy_rate());
  }
  return 0;
}

}  // namespace fp8pipe::cli
