// The pipeline executor against a single-process reference, under mpirun: every rank also builds
// the whole model and runs every micro-batch of the global batch itself (the reference), then the
// schedule runs on this rank's chunks, copies are summed by global name (NameSync), and each local
// parameter's gradient and the global loss must match the reference (fp32: relative 1e-5).
// Layouts come from the world size: -np 2 -> pp 2; -np 4 -> pp 4 and pp 2 x dp 2.
#include <gtest/gtest.h>
#include <mpi.h>

#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "core/config.h"
#include "parallel/executor.h"
#include "parallel/expert_comm.h"
#include "parallel/grad_sync.h"
#include "parallel/sim/measured.h"
#ifdef FP8PIPE_HAVE_NCCL
#include <cuda_runtime_api.h>

#include "parallel/nccl_comm.h"
#endif
#include "tests/test_files.h"

namespace fp8pipe::parallel {
namespace {

int g_rank = 0, g_world = 1;
bool g_matched = false;  // run_layout: the executor's matched point-to-point groups

// The layout's communicators: MPI, or (FP8PIPE_TEST_COMM=nccl, a build with NCCL) their NCCL
// mirrors, one (emulated) GPU per rank, host buffers staged through device memory.
struct TestComms {
  std::optional<CommSet> mpi, nccl;
  Comm& get(GroupKind k) { return nccl ? nccl->get(k) : mpi->get(k); }
};

Status make_comms(const Topology& topo, TestComms* out) {
  FP8_ASSIGN_OR_RETURN(CommSet c, create_comms(topo, CommOptions{60}));
  out->mpi = std::move(c);
  const char* which = std::getenv("FP8PIPE_TEST_COMM");
  if (!which || std::string(which) != "nccl") return Status::Ok();
#ifdef FP8PIPE_HAVE_NCCL
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 1)
    return FP8_INVALID("FP8PIPE_TEST_COMM=nccl: no CUDA device");
  NcclOptions o;
  o.timeout_s = 60;
  o.device = g_rank % gpus;
  FP8_ASSIGN_OR_RETURN(CommSet n, create_nccl_comms(*out->mpi, o));
  out->nccl = std::move(n);
  return Status::Ok();
#else
  return FP8_INVALID("FP8PIPE_TEST_COMM=nccl: built without NCCL");
#endif
}

config::Config tiny(int layers) {
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto",
                         std::vector<std::string>{"--precision.mode=FP32", "--train.seq_len=8",
                                                  "--model.layers=" + std::to_string(layers)});
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return *cfg;
}

model::MicroBatch micro_batch(int index, int B, int T, int vocab) {
  model::MicroBatch mb;
  mb.B = B;
  mb.T = T;
  for (int i = 0; i < B * (T + 1); ++i)
    mb.tokens.push_back(static_cast<int32_t>((i * 37 + index * 101 + 11) % vocab));
  return mb;
}

struct Reference {
  double loss = 0;
  std::map<std::string, std::vector<float>> grads;
};

// The whole model over `n` micro-batches, each scaled 1/n: what one process would do.
Reference reference(const config::Config& cfg, int n, int B, int T) {
  auto be = make_cpu_backend();
  model::ModelCtx c;
  c.be = be.get();
  model::Model m;
  EXPECT_TRUE(m.init(c, cfg.model(), 7).ok());
  Reference r;
  for (int g = 0; g < n; ++g) {
    auto lp = m.forward(c, g, micro_batch(g, B, T, cfg.model().vocab_size()));
    EXPECT_TRUE(lp.ok()) << lp.status().to_string();
    r.loss += lp->total / n;
    EXPECT_TRUE(m.backward(c, g, 1.0f / n).ok());
  }
  for (model::Param* p : m.params()) {  // the two embedding copies are summed by name
    const float* d = p->grad.data_as<float>();
    auto& g = r.grads[p->name];
    if (g.empty()) g.assign(p->grad.numel(), 0.0f);
    for (int64_t i = 0; i < p->grad.numel(); ++i) g[i] += d[i];
  }
  return r;
}

struct EpLayout {
  int ep = 1;
  int ranks_per_node = 0;  // 0: the whole world on one node
  bool two_level = false;
};

struct LayoutResult {
  int64_t tokens = 0, cross_node_rows = 0;  // summed over ranks and MoE layers
};

// traffic (optional) gets the MoE dispatch traffic, for the two-level checks.
void run_layout(ScheduleKind kind, int pp, int dp, int layers, int M, EpLayout ep = {},
                LayoutResult* traffic = nullptr) {
  const auto cfg = tiny(layers);
  const int B = 2, T = 8;
  const Reference ref = reference(cfg, dp * M, B, T);
  auto topo =
      Topology::create(pp, dp, ep.ep, ep.ranks_per_node ? ep.ranks_per_node : pp * dp, g_rank);
  ASSERT_TRUE(topo.ok()) << topo.status().to_string();
  TestComms tc;
  auto* comms = &tc;
  const Status cs = make_comms(*topo, comms);
  ASSERT_TRUE(cs.ok()) << cs.to_string();
  auto sched = make_schedule(kind, pp, M);
  ASSERT_TRUE(sched.ok()) << sched.status().to_string();
  auto parts = partition_stages(cfg.model(), sched->stages());
  ASSERT_TRUE(parts.ok()) << parts.status().to_string();

  auto be = make_cpu_backend();
  model::ModelCtx c;
  c.be = be.get();
  std::unique_ptr<CommExpertComm> ep_comm;
  if (ep.ep > 1) {
    ep_comm =
        std::make_unique<CommExpertComm>(&comms->get(GroupKind::kExpert), ep_ranks_per_node(*topo));
    c.ep = ep_comm.get();
    c.ep_two_level = ep.two_level;
  }
  const int prank = topo->coords().stage, dpi = topo->coords().dp_index;
  std::vector<std::unique_ptr<model::Model>> chunks;
  std::vector<model::Model*> ptrs;
  for (int dir = 0; dir < chunks_per_rank(*sched); ++dir) {
    chunks.push_back(std::make_unique<model::Model>());
    ASSERT_TRUE(
        chunks.back()->init(c, cfg.model(), 7, (*parts)[stage_of(*sched, prank, dir)]).ok());
    ptrs.push_back(chunks.back().get());
  }
  std::map<std::pair<int, int>, model::MicroBatch> batches;
  auto batch = [&](int stream, int mb) -> const model::MicroBatch& {
    const int g = dpi * M + stream * sched->mb_per_stream() + mb;
    auto it = batches.try_emplace({stream, mb}, micro_batch(g, B, T, cfg.model().vocab_size()));
    return it.first->second;
  };
  PipelineExecutor ex(*sched, prank, &comms->get(GroupKind::kPipeline), ptrs, &c,
                      cfg.model().hidden());
  if (g_matched) ex.set_matched_groups(true);
  auto st = ex.run(batch, 1.0f / (dp * M));
  ASSERT_TRUE(st.ok()) << st.status().to_string();

  std::map<std::string, SyncEntry> entries;
  std::map<std::string, std::vector<int>> holders;
  for (auto& ch : chunks) {
    for (model::Param* p : ch->params()) {
      auto& e = entries[p->name];
      e.name = p->name;
      e.numel = p->grad.numel();
      ASSERT_EQ(static_cast<int64_t>(p->grad_acc.size()), p->grad.numel()) << p->name;
      e.copies.push_back(p->grad_acc.data());
      holders[p->name] =
          holders_of(p->name, *sched, *parts, *topo, cfg.model().moe().routed_experts());
    }
  }
  std::vector<SyncEntry> list;
  for (auto& [n, e] : entries) list.push_back(e);
  NameSync sync(list, holders, g_rank, &comms->get(GroupKind::kWorld));
  ASSERT_TRUE(sync.all_reduce_sum().ok());

  for (auto& [name, e] : entries) {
    ASSERT_TRUE(ref.grads.count(name)) << name;
    const auto& want = ref.grads.at(name);
    double num = 0, den = 0;
    for (double* copy : e.copies) {
      for (int64_t i = 0; i < e.numel; ++i) {
        num += std::pow(double(copy[i]) - want[i], 2);
        den += std::pow(double(want[i]), 2);
      }
    }
    EXPECT_LE(std::sqrt(num), 1e-5 * std::sqrt(den) + 1e-12)
        << "rank " << g_rank << " " << name << " (" << schedule_kind_name(kind) << ")";
  }
  double loss[2] = {st->loss.total, static_cast<double>(st->loss_microbatches)};
  MPI_Allreduce(MPI_IN_PLACE, loss, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(loss[1], dp * M);
  EXPECT_NEAR(loss[0] / loss[1], ref.loss, 1e-5 * std::fabs(ref.loss));
  // Every reference parameter is held somewhere (experts only on their owners).
  int64_t mine = static_cast<int64_t>(entries.size()), all = 0;
  std::map<std::string, int> is_leader;
  int64_t led = 0;
  for (auto& [name, e] : entries)
    led += holders_of(name, *sched, *parts, *topo, cfg.model().moe().routed_experts()).front() ==
           g_rank;
  MPI_Allreduce(&led, &all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(all, static_cast<int64_t>(ref.grads.size())) << "rank " << g_rank << " holds " << mine;
  if (traffic) {
    int64_t t[2] = {0, 0};
    for (auto& ch : chunks) {
      for (model::MoE* m : ch->moes()) {
        t[0] += m->stats().tokens;
        t[1] += m->stats().cross_node_rows;
      }
    }
    MPI_Allreduce(MPI_IN_PLACE, t, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    traffic->tokens = t[0];
    traffic->cross_node_rows = t[1];
  }
}

TEST(Pipeline, OneF1B) {
  if (g_world == 2) run_layout(ScheduleKind::k1F1B, 2, 1, 4, 4);
  if (g_world == 4) run_layout(ScheduleKind::k1F1B, 4, 1, 4, 4);
  if (g_world == 4) run_layout(ScheduleKind::k1F1B, 2, 2, 4, 2);
}

TEST(Pipeline, ZB1P) {
  if (g_world == 2) run_layout(ScheduleKind::kZB1P, 2, 1, 4, 4);
  if (g_world == 4) run_layout(ScheduleKind::kZB1P, 4, 1, 4, 5);
}

TEST(Pipeline, DualPipe) {
  if (g_world == 2) run_layout(ScheduleKind::kDualPipe, 2, 1, 4, 6);
  if (g_world == 4) run_layout(ScheduleKind::kDualPipe, 4, 1, 4, 8);
  if (g_world == 4) run_layout(ScheduleKind::kDualPipe, 2, 2, 4, 4);
}

TEST(Pipeline, DualPipeV) {
  if (g_world == 2) run_layout(ScheduleKind::kDualPipeV, 2, 1, 4, 4);
  if (g_world == 4) run_layout(ScheduleKind::kDualPipeV, 4, 1, 8, 8);
}

// Matched point-to-point groups (parallel/p2p_plan.h, what the NCCL comm gets): every kind against
// the reference again, without and with expert parallelism (-np 8: mpi.pipeline_nccl_np8).
TEST(Pipeline, MatchedGroups) {
  g_matched = true;
  if (g_world == 2) {
    run_layout(ScheduleKind::k1F1B, 2, 1, 4, 4);
    run_layout(ScheduleKind::kZB1P, 2, 1, 4, 5);
    run_layout(ScheduleKind::kDualPipe, 2, 1, 4, 6);
    run_layout(ScheduleKind::kDualPipeV, 2, 1, 4, 4);
  }
  if (g_world == 4) {
    run_layout(ScheduleKind::kZB1P, 4, 1, 4, 9);
    run_layout(ScheduleKind::kDualPipeV, 4, 1, 8, 8);
    run_layout(ScheduleKind::kDualPipe, 2, 2, 4, 4, {2});
    run_layout(ScheduleKind::kZB1P, 2, 2, 4, 5, {2});
  }
  if (g_world == 8) {  // pp=4 x dp=2 x ep=2: early sends next to expert all-to-alls
    run_layout(ScheduleKind::kZB1P, 4, 2, 4, 9, {2});
    run_layout(ScheduleKind::kDualPipeV, 4, 2, 8, 8, {2});
    run_layout(ScheduleKind::kDualPipe, 4, 2, 4, 8, {2});
  }
  g_matched = false;
}

// A bad FP8PIPE_P2P_GROUPS is an error naming the variable, its value and the valid ones, not a
// silent default (a single-rank pipeline: the executor reports it from run()).
TEST(Pipeline, BadP2pGroupsSettingIsAnError) {
  const auto cfg = tiny(4);
  auto sched = make_schedule(ScheduleKind::k1F1B, 1, 2);
  ASSERT_TRUE(sched.ok());
  auto be = make_cpu_backend();
  model::ModelCtx c;
  c.be = be.get();
  model::Model m;
  ASSERT_TRUE(m.init(c, cfg.model(), 7).ok());
  std::map<int, model::MicroBatch> batches;
  auto batch = [&](int, int mb) -> const model::MicroBatch& {
    return batches.try_emplace(mb, micro_batch(mb, 2, 8, cfg.model().vocab_size())).first->second;
  };
  setenv("FP8PIPE_P2P_GROUPS", "eagr", 1);
  PipelineExecutor bad(*sched, 0, nullptr, {&m}, &c, cfg.model().hidden());
  unsetenv("FP8PIPE_P2P_GROUPS");
  auto st = bad.run(batch, 0.5f);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().to_string().find("FP8PIPE_P2P_GROUPS='eagr' (valid: matched, eager)"),
            std::string::npos)
      << st.status().to_string();
  PipelineExecutor good(*sched, 0, nullptr, {&m}, &c, cfg.model().hidden());
  EXPECT_TRUE(good.run(batch, 0.5f).ok());
}

// Routed experts sharded over ep ranks, tokens moved by all-to-all: the same gradients and loss.
// Two-level dispatch (ep spanning two emulated nodes of two ranks) sends a token at most once to
// each other node, never more than flat dispatch does; with node-limited routing (max_nodes 2 of
// 4 groups) and two nodes, at most once in total.
TEST(ExpertParallel, FlatAndTwoLevelMatchTheReference) {
  if (g_world == 2) run_layout(ScheduleKind::k1F1B, 1, 2, 4, 2, {2});
  if (g_world != 4) return;
  run_layout(ScheduleKind::kDualPipe, 2, 2, 4, 4, {2});
  run_layout(ScheduleKind::k1F1B, 2, 2, 4, 2, {2, 1, true});  // ep over two 1-rank nodes
  LayoutResult flat, two;
  run_layout(ScheduleKind::k1F1B, 1, 4, 4, 2, {4, 2, false}, &flat);
  run_layout(ScheduleKind::k1F1B, 1, 4, 4, 2, {4, 2, true}, &two);
  EXPECT_EQ(flat.tokens, two.tokens);
  EXPECT_GT(two.tokens, 0);
  EXPECT_LE(two.cross_node_rows, two.tokens);  // 2 nodes: one other node at most per token
  EXPECT_LT(two.cross_node_rows, flat.cross_node_rows);
}

// ---- FB overlap
// ----------------------------------------------------------------------------------

struct ExecOut {
  std::map<std::string, std::vector<double>> grads;  // this rank's fp64 accumulators by name
  double loss = 0;
  int64_t microbatches = 0, nonfinite = 0;
  std::string trace;  // the written trace, when traced
  // MoeStepStats::a2a_rows / a2a_bytes by leg, summed over this rank's MoE layers
  std::array<int64_t, model::MoeStepStats::kLegs> a2a_rows{}, a2a_bytes{};
};

struct ExecOpts {
  bool overlap = false, trace = false;
  bool fp8_dispatch = false, bf16_combine = false;  // ModelCtx's wire formats
  bool two_level = false;                           // two-level dispatch over 1-rank nodes
  bool matched = false;                             // matched point-to-point groups
};

// One step of this rank's instruction list, FB halves overlapped or not; optionally traced.
ExecOut run_exec(ScheduleKind kind, int pp, int dp, int M, int ep, const std::string& mode,
                 const ExecOpts& o) {
  const bool overlap = o.overlap, trace = o.trace, two_level = o.two_level;
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto",
                         std::vector<std::string>{"--precision.mode=" + mode, "--train.seq_len=8"});
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  const int B = 2, T = 8;
  ExecOut out;
  auto topo = Topology::create(pp, dp, ep, pp * dp, g_rank);
  EXPECT_TRUE(topo.ok()) << topo.status().to_string();
  TestComms tc;
  auto* comms = &tc;
  const Status cs = topo.ok() ? make_comms(*topo, comms) : topo.status();
  EXPECT_TRUE(cs.ok()) << cs.to_string();
  auto sched = make_schedule(kind, pp, M);
  EXPECT_TRUE(sched.ok()) << sched.status().to_string();
  auto parts = partition_stages(cfg->model(), sched->stages());
  EXPECT_TRUE(parts.ok()) << parts.status().to_string();
  if (!topo.ok() || !cs.ok() || !sched.ok() || !parts.ok()) return out;

  auto be = make_cpu_backend();
  model::ModelCtx c;
  c.be = be.get();
  c.precision = mode == "FP8"    ? model::Precision::kFP8
                : mode == "BF16" ? model::Precision::kBF16
                                 : model::Precision::kFP32;
  c.fp8_dispatch = o.fp8_dispatch;
  c.bf16_combine = o.bf16_combine;
  c.ep_two_level = two_level;
  std::unique_ptr<CommExpertComm> ep_comm;
  if (ep > 1) {
    ep_comm = std::make_unique<CommExpertComm>(&comms->get(GroupKind::kExpert),
                                               two_level ? 1 : ep_ranks_per_node(*topo));
    c.ep = ep_comm.get();
  }
  const int prank = topo->coords().stage, dpi = topo->coords().dp_index;
  std::vector<std::unique_ptr<model::Model>> chunks;
  std::vector<model::Model*> ptrs;
  for (int dir = 0; dir < chunks_per_rank(*sched); ++dir) {
    chunks.push_back(std::make_unique<model::Model>());
    EXPECT_TRUE(
        chunks.back()->init(c, cfg->model(), 7, (*parts)[stage_of(*sched, prank, dir)]).ok());
    ptrs.push_back(chunks.back().get());
  }
  std::map<std::pair<int, int>, model::MicroBatch> batches;
  auto batch = [&](int stream, int mb) -> const model::MicroBatch& {
    const int g = dpi * M + stream * sched->mb_per_stream() + mb;
    auto it = batches.try_emplace({stream, mb}, micro_batch(g, B, T, cfg->model().vocab_size()));
    return it.first->second;
  };
  PipelineExecutor ex(*sched, prank, &comms->get(GroupKind::kPipeline), ptrs, &c,
                      cfg->model().hidden(), overlap);
  EXPECT_EQ(ex.fb_overlap(), overlap);
  if (o.matched) ex.set_matched_groups(true);
  Tracer tracer(g_rank);
  if (trace) ex.set_tracer(&tracer, 1);
  auto st = ex.run(batch, 1.0f / (dp * M));
  ex.set_tracer(nullptr, 0);
  EXPECT_TRUE(st.ok()) << st.status().to_string();
  if (!st.ok()) return out;
  out.loss = st->loss.total;
  out.microbatches = st->loss_microbatches;
  out.nonfinite = c.nonfinite_groups;
  for (auto& ch : chunks) {
    for (model::Param* p : ch->params()) {
      std::string name = p->name;
      while (out.grads.count(name)) name += "@";  // DualPipe's second local embedding copy
      out.grads[name] = p->grad_acc;
    }
    for (model::MoE* m : ch->moes()) {
      for (int l = 0; l < model::MoeStepStats::kLegs; ++l) {
        out.a2a_rows[l] += m->stats().a2a_rows[l];
        out.a2a_bytes[l] += m->stats().a2a_bytes[l];
      }
    }
  }
  if (trace) {
    const auto path = ::testing::TempDir() + fmt::format("fp8pipe_fb_trace_r{}.json", g_rank);
    EXPECT_TRUE(tracer.write(path).ok());
    const auto bytes = fp8pipe::testing::read_file(path);
    out.trace.assign(bytes.begin(), bytes.end());
    std::filesystem::remove(path);
  }
  return out;
}

// The FB overlap runs the two halves of an FB instruction as fibers that take turns at the MoE
// all-to-all waits: the same losses and gradients, bit for bit, as the forward-then-backward FB,
// with ep = 2 (exchanges of both halves in flight on one communicator) in FP32 and FP8, tracing
// on or off (the traced run records the compute slices of both halves and every all-to-all).
void expect_same(const ExecOut& a, const ExecOut& b, const std::string& what) {
  EXPECT_EQ(a.loss, b.loss) << what;
  EXPECT_EQ(a.microbatches, b.microbatches) << what;
  EXPECT_EQ(a.nonfinite, b.nonfinite) << what;
  ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
  for (const auto& [name, g] : a.grads) {
    ASSERT_TRUE(b.grads.count(name)) << what << " " << name;
    const auto& h = b.grads.at(name);
    ASSERT_EQ(g.size(), h.size()) << what << " " << name;
    EXPECT_TRUE(g.empty() || std::memcmp(g.data(), h.data(), g.size() * sizeof(double)) == 0)
        << "rank " << g_rank << " " << what << ": gradient of " << name << " differs";
  }
}

// A trace lists this rank's instructions in order, whenever its sends and receives moved: what
// the simulator's calibration (sim/measured.h) reads.
void expect_instruction_order(const ExecOut& out, ScheduleKind kind, int pp, int dp, int M,
                              const std::string& what) {
  auto sched = make_schedule(kind, pp, M);
  ASSERT_TRUE(sched.ok());
  std::vector<std::string> want;
  for (const Instr& in : sched->rank_instrs[g_rank / dp]) want.push_back(instr_label(in));
  auto ev = sim::parse_trace(out.trace, "trace");
  ASSERT_TRUE(ev.ok()) << ev.status().to_string();
  std::vector<std::string> got;
  for (const auto& e : *ev) got.push_back(e.name);
  EXPECT_EQ(got, want) << what << " rank " << g_rank;
}

// Matched groups post ZB1P's early sends, and receives before sends in a run, at plan points; the
// trace still records every instruction in order (sends when produced).
TEST(Pipeline, MatchedGroupsTraceInInstructionOrder) {
  if (g_world != 4) GTEST_SKIP() << "needs 4 ranks; mpi.pipeline_np4 runs it";
  const struct {
    ScheduleKind kind;
    int pp, dp, M, ep;
  } cases[] = {{ScheduleKind::kZB1P, 2, 2, 5, 2},
               {ScheduleKind::kZB1P, 4, 1, 9, 1},
               {ScheduleKind::kDualPipe, 4, 1, 8, 1},
               {ScheduleKind::kDualPipeV, 2, 2, 4, 2}};
  for (const auto& k : cases) {
    const std::string what = fmt::format("{} pp={}", schedule_kind_name(k.kind), k.pp);
    const ExecOut eager = run_exec(k.kind, k.pp, k.dp, k.M, k.ep, "FP32", {.trace = true});
    const ExecOut matched =
        run_exec(k.kind, k.pp, k.dp, k.M, k.ep, "FP32", {.trace = true, .matched = true});
    expect_same(eager, matched, what);
    expect_instruction_order(eager, k.kind, k.pp, k.dp, k.M, what);
    expect_instruction_order(matched, k.kind, k.pp, k.dp, k.M, what + " matched");
  }
}

TEST(FbOverlap, BitwiseEqualToSequentialFB) {
  struct Case {
    ScheduleKind kind;
    int pp, dp, M, ep;
    const char* mode;
  };
  // pp=2 x dp=2 x ep=2 (without ep an FB has nothing to overlap)
  if (g_world != 4) GTEST_SKIP() << "needs 4 ranks; mpi.pipeline_np4 runs it";
  const Case cases[] = {{ScheduleKind::kDualPipe, 2, 2, 4, 2, "FP32"},
                        {ScheduleKind::kDualPipe, 2, 2, 4, 2, "FP8"},
                        {ScheduleKind::kDualPipeV, 2, 2, 4, 2, "FP8"}};
  for (const Case& k : cases) {
    const std::string what = fmt::format("{} pp={} dp={} ep={} {}", schedule_kind_name(k.kind),
                                         k.pp, k.dp, k.ep, k.mode);
    const ExecOut off = run_exec(k.kind, k.pp, k.dp, k.M, k.ep, k.mode, {});
    const ExecOut on = run_exec(k.kind, k.pp, k.dp, k.M, k.ep, k.mode, {.overlap = true});
    const ExecOut traced =
        run_exec(k.kind, k.pp, k.dp, k.M, k.ep, k.mode, {.overlap = true, .trace = true});
    EXPECT_FALSE(off.grads.empty()) << what;
    expect_same(off, on, what + " overlap");
    expect_same(off, traced, what + " overlap traced");
    // Matched point-to-point groups (parallel/p2p_plan.h) move the same messages at other times.
    const ExecOut matched = run_exec(k.kind, k.pp, k.dp, k.M, k.ep, k.mode,
                                     {.overlap = true, .trace = true, .matched = true});
    expect_same(off, matched, what + " overlap traced, matched groups");
    expect_instruction_order(traced, k.kind, k.pp, k.dp, k.M, what);
    expect_instruction_order(matched, k.kind, k.pp, k.dp, k.M, what + " matched");
    // Compute slices of both FB halves, and (ep > 1) all-to-alls on one row per chunk.
    EXPECT_NE(traced.trace.find("\"cat\":\"compute\""), std::string::npos) << what;
    EXPECT_NE(traced.trace.find("\"cat\":\"a2a\""), std::string::npos) << what;
    EXPECT_NE(traced.trace.find("\"name\":\"a2a d1\""), std::string::npos) << what;
  }
}

}  // namespace
// FP8 dispatch: in FP8 the tokens, and in the backward their output gradients, cross the
// all-to-all as FP8 codes and 1x128 scales, quantized at their source, instead of fp32 rows
// quantized by the experts' owner. Per-row scaling makes that the same bits. In BF16 the tokens
// cross as bf16 rows, which is what the experts read. Loss and every gradient, flat and
// two-level, FB halves overlapped (both halves' exchanges in flight) or not.
TEST(Fp8Dispatch, BitwiseEqualToFp32Rows) {
  if (g_world != 4) GTEST_SKIP() << "needs 4 ranks (pp=2 x dp=2 x ep=2); mpi.pipeline_np4 runs it";
  for (const std::string mode : {"FP8", "BF16"}) {
    for (bool two_level : {false, true}) {
      for (bool overlap : {false, true}) {
        const std::string what =
            fmt::format("{} two_level={} overlap={}", mode, two_level, overlap);
        const ExecOpts o{.overlap = overlap, .two_level = two_level};
        ExecOpts o8 = o;
        o8.fp8_dispatch = true;
        const ExecOut rows = run_exec(ScheduleKind::kDualPipe, 2, 2, 4, 2, mode, o);
        const ExecOut narrow = run_exec(ScheduleKind::kDualPipe, 2, 2, 4, 2, mode, o8);
        EXPECT_FALSE(rows.grads.empty()) << what;
        expect_same(rows, narrow, what);
        int64_t b[2] = {rows.a2a_bytes[model::MoeStepStats::kDispatch],
                        narrow.a2a_bytes[model::MoeStepStats::kDispatch]};
        MPI_Allreduce(MPI_IN_PLACE, b, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
        EXPECT_LT(b[1], b[0]) << what;
      }
    }
  }
}

// Relative L2 distance of two runs' gradients over every rank.
static double grad_distance(const ExecOut& a, const ExecOut& b) {
  double nd[2] = {0, 0};
  for (const auto& [name, g] : a.grads) {
    const auto& h = b.grads.at(name);
    for (size_t i = 0; i < g.size(); ++i) nd[0] += std::pow(h[i] - g[i], 2), nd[1] += g[i] * g[i];
  }
  MPI_Allreduce(MPI_IN_PLACE, nd, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return std::sqrt(nd[0] / nd[1]);
}

static double world_loss(const ExecOut& a) {
  double l = a.loss;
  MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return l;
}

// The ep all-to-all's wire formats, per leg (MoeStepStats), with FP8 dispatch: each leg's bytes
// are its rows times the format's row size (FP8 toward the experts in both passes: hidden codes
// + one fp32 scale per 128; BF16's forward dispatch bf16; the rest bf16 with bf16_combine, else
// fp32), and every row dispatched comes back once in each pass. bf16 combine rows change the
// sums (not bit for bit the fp32 rows' result), by less than the mode itself departs from FP32.
TEST(EpWire, EachLegCarriesItsFormat) {
  if (g_world != 4) GTEST_SKIP() << "needs 4 ranks (pp=2 x dp=2 x ep=2); mpi.pipeline_np4 runs it";
  const int64_t hidden = tiny(4).model().hidden(), row_fp8 = hidden + 4 * ((hidden + 127) / 128);
  using S = model::MoeStepStats;
  for (bool two_level : {false, true}) {
    const ExecOut fp32 =
        run_exec(ScheduleKind::kDualPipe, 2, 2, 4, 2, "FP32", {.two_level = two_level});
    for (const std::string mode : {"FP8", "BF16"}) {
      const std::string what = fmt::format("{} two_level={}", mode, two_level);
      ExecOpts o{.fp8_dispatch = true, .two_level = two_level};
      const ExecOut wide = run_exec(ScheduleKind::kDualPipe, 2, 2, 4, 2, mode, o);
      o.bf16_combine = true;
      const ExecOut narrow = run_exec(ScheduleKind::kDualPipe, 2, 2, 4, 2, mode, o);
      for (const ExecOut* r : {&wide, &narrow}) {
        std::array<int64_t, 2 * S::kLegs> t{};
        for (int l = 0; l < S::kLegs; ++l) t[l] = r->a2a_rows[l], t[S::kLegs + l] = r->a2a_bytes[l];
        MPI_Allreduce(MPI_IN_PLACE, t.data(), 2 * S::kLegs, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
        const int64_t rows = t[S::kDispatch];
        const int64_t back = r == &narrow ? 2 * hidden : 4 * hidden;  // combine-side row bytes
        EXPECT_GT(rows, 0) << what;
        for (int l = 0; l < S::kLegs; ++l) EXPECT_EQ(t[l], rows) << what << " leg " << l;
        EXPECT_EQ(t[S::kLegs + S::kDispatch], rows * (mode == "FP8" ? row_fp8 : 2 * hidden))
            << what;
        EXPECT_EQ(t[S::kLegs + S::kGradDispatch], rows * (mode == "FP8" ? row_fp8 : back)) << what;
        for (int l : {S::kCombine, S::kGradCombine})
          EXPECT_EQ(t[S::kLegs + l], rows * back) << what << " leg " << l;
      }
      const double l32 = world_loss(fp32), lw = world_loss(wide), ln = world_loss(narrow);
      const double wire = grad_distance(wide, narrow), mode_cost = grad_distance(fp32, wide);
      if (g_rank == 0) {
        std::printf("%s: bf16 wire: loss %.2e, gradients %.2e; %s vs FP32: %.2e, %.2e\n",
                    what.c_str(), std::fabs(ln - lw) / lw, wire, mode.c_str(),
                    std::fabs(lw - l32) / l32, mode_cost);
      }
      EXPECT_NE(lw, ln) << what << ": bf16 rows changed no sum";
      EXPECT_LT(std::fabs(ln - lw), std::fabs(lw - l32)) << what;
      EXPECT_GT(wire, 0) << what;
      EXPECT_LT(wire, mode_cost) << what;
    }
  }
}

}  // namespace fp8pipe::parallel

int main(int argc, char** argv) {
  auto w = fp8pipe::parallel::mpi_init(&argc, &argv);
  if (!w.ok()) {
    std::fprintf(stderr, "%s\n", w.status().to_string().c_str());
    return 1;
  }
  fp8pipe::parallel::g_rank = w->rank;
  fp8pipe::parallel::g_world = w->size;
  ::testing::InitGoogleTest(&argc, argv);
  if (w->rank != 0) {
    auto& l = ::testing::UnitTest::GetInstance()->listeners();
    delete l.Release(l.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  (void)fp8pipe::parallel::mpi_finalize();
  return worst;
}
