#include "launch/dry_run.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/config.h"
#include "core/data.h"
#include "core/model/attention.h"
#include "kernels/cpu/rope.h"
#include "launch/flops.h"
#include "parallel/executor.h"
#include "parallel/p2p_plan.h"
#include "parallel/schedule.h"
#include "parallel/topology.h"
#include "parallel/validate.h"

namespace fp8pipe {
namespace {

std::string part_text(const model::ModelPart& p, const config::Model& m) {
  std::vector<std::string> bits;
  if (p.embed) bits.push_back("embed");
  if (p.block_end > p.block_begin) {
    const bool moe = m.has_moe() && m.moe().routed_experts() > 0;
    const int dense =
        moe ? std::clamp(m.dense_layers() - p.block_begin, 0, p.block_end - p.block_begin)
            : p.block_end - p.block_begin;
    bits.push_back(fmt::format("blocks {}-{} ({} dense, {} MoE)", p.block_begin, p.block_end - 1,
                               dense, p.block_end - p.block_begin - dense));
  }
  if (p.head) {
    bits.push_back(m.mtp_depth() > 0 ? fmt::format("norm + head + {} MTP", m.mtp_depth())
                                     : "norm + head");
  }
  return fmt::format("{}", fmt::join(bits, " + "));
}

}  // namespace

Result<std::string> dry_run_report(const config::Config& cfg, int world) {
  const auto& p = cfg.parallel();
  const auto& m = cfg.model();
  const auto& t = cfg.train();
  if (world <= 0) world = p.pp() * p.dp();
  const int rpn = p.ranks_per_node() > 0 ? p.ranks_per_node() : p.pp() * p.dp();  // one host
  FP8_ASSIGN_OR_RETURN(auto topo, parallel::Topology::create(p.pp(), p.dp(), p.ep(), rpn, 0));
  FP8_RETURN_IF_ERROR(topo.check_world_size(world));
  FP8_ASSIGN_OR_RETURN(auto kind, parallel::parse_schedule_kind(p.schedule()));
  const int M = std::max(1, p.microbatches());
  FP8_ASSIGN_OR_RETURN(auto sched, parallel::make_schedule(kind, p.pp(), M));
  FP8_RETURN_IF_ERROR(parallel::validate_schedule(sched));
  FP8_ASSIGN_OR_RETURN(auto parts, parallel::partition_stages(m, sched.stages()));

  const int64_t B = t.global_batch() / (int64_t{p.dp()} * M);
  std::string out = fmt::format(
      "dry run: {} ranks = pp {} x dp {}, ep {}, {} rank(s) per node ({} node(s)); schedule {}, "
      "{} micro-batches of {} x {} tokens per replica (global batch {}), {} on train.device={}\n",
      world, p.pp(), p.dp(), p.ep(), rpn, topo.nodes(), p.schedule(), M, B, t.seq_len(),
      t.global_batch(), config::Precision::Mode_Name(cfg.precision().mode()), t.device());

  out += "\nlayout (parallel/topology.h):\n" + topo.table();

  out += fmt::format("\nstages ({} over {} pipeline rank(s)):\n", sched.stages(), p.pp());
  for (size_t s = 0; s < parts.size(); ++s) {
    out += fmt::format("  stage {}: {}\n", s, part_text(parts[s], m));
  }

  const bool moe = m.has_moe() && m.moe().routed_experts() > 0;
  const int64_t E = moe ? m.moe().routed_experts() : 0;
  out += "\nper rank (model chunks by local direction; routed experts held):\n";
  for (int r = 0; r < world; ++r) {
    const parallel::Coords c = topo.coords_of(r);
    std::vector<std::string> chunks;
    for (int dir = 0; dir < parallel::chunks_per_rank(sched); ++dir) {
      chunks.push_back(fmt::format("stage {}", parallel::stage_of(sched, c.stage, dir)));
    }
    std::string experts = "no MoE";
    if (moe) {
      const int64_t per = E / p.ep();
      experts = fmt::format("experts {}-{} of {}", c.ep_index * per, (c.ep_index + 1) * per - 1, E);
    }
    out += fmt::format("  rank {}: {}; {}\n", r, fmt::join(chunks, ", "), experts);
  }

  out += "\nschedule (parallel/validate.h: matched sends and receives, order, no deadlock): ok\n";
  for (int pr = 0; pr < p.pp(); ++pr) {
    std::map<std::string, int> n;
    for (const parallel::Instr& in : sched.rank_instrs[pr]) {
      switch (in.op) {
        case parallel::Op::kF:
          ++n["F"];
          break;
        case parallel::Op::kB:
          ++n[in.defer_w ? "B(input)" : "B"];
          break;
        case parallel::Op::kW:
          ++n["W"];
          break;
        case parallel::Op::kFB:
          ++n["FB"];
          break;
        default:
          ++n[in.op == parallel::Op::kSendAct || in.op == parallel::Op::kSendGrad ? "send"
                                                                                  : "recv"];
      }
    }
    std::vector<std::string> parts_n;
    for (const char* k : {"F", "B", "B(input)", "W", "FB", "send", "recv"}) {
      if (n.count(k)) parts_n.push_back(fmt::format("{} {}", n[k], k));
    }
    out += fmt::format("  pipeline rank {}: {} instructions: {}\n", pr,
                       sched.rank_instrs[pr].size(), fmt::join(parts_n, ", "));
  }

  if (p.comm_backend() == "nccl" && p.pp() > 1) {
    // What the executor will post over NCCL (blocking sends): its matched groups, planned here.
    FP8_ASSIGN_OR_RETURN(const parallel::P2pPlan groups,
                         parallel::plan_p2p_groups(sched, /*early_sends=*/true));
    out += fmt::format(
        "  pipeline messages over NCCL (parallel/p2p_plan.h): {} matched send/receive groups in "
        "{} rounds, {} of them early sends (fp8pipe schedule --groups lists them)\n",
        groups.groups, groups.rounds, groups.early_groups);
  }

  FP8_ASSIGN_OR_RETURN(const data::BatchPlan plan, batch_plan(cfg));
  if (plan.ramped()) {
    out += fmt::format(
        "\nbatch ramp (train.batch_ramp): {} steps below the global batch, {} tokens; each size's "
        "schedule validated:\n",
        plan.ramp_steps(), plan.first_sample(plan.ramp_steps()) * t.seq_len());
    int64_t step = 0;
    for (const int64_t b : plan.sizes()) {
      while (plan.batch(step) != b) ++step;
      const int mb = microbatches_for(cfg, b);
      FP8_ASSIGN_OR_RETURN(auto s, parallel::make_schedule(kind, p.pp(), mb));
      FP8_RETURN_IF_ERROR(parallel::validate_schedule(s));
      out += fmt::format("  from step {}: {} sequences, {} micro-batches per replica\n", step + 1,
                         b, mb);
    }
  }
  out += fmt::format("\nrun: train.steps={} train {} tokens\n", t.steps(),
                     plan.first_sample(t.steps()) * t.seq_len());
  const kernels::RopeSpec rope = model::rope_spec(m);
  if (rope.yarn()) {
    const int64_t d = m.attention() == config::Model::MLA ? m.mla().qk_rope_head_dim()
                      : m.head_dim() > 0                  ? m.head_dim()
                                                          : m.hidden() / m.heads();
    const std::vector<double> f = kernels::rope_frequencies(rope, d);
    int64_t kept = 0, divided = 0;
    for (size_t i = 0; i < f.size(); ++i) {
      const double base = std::pow(rope.theta, -2.0 * double(i) / double(d));
      kept += f[i] == base;
      divided += f[i] == base / rope.factor;
    }
    out += fmt::format(
        "rope: YaRN factor {} over {} positions (train.seq_len {}): of {} RoPE pairs {} keep "
        "their frequency, {} are divided by {}, {} blend; attention logits x {:.4f}\n",
        rope.factor, rope.original_max_position, t.seq_len(), f.size(), kept, divided, rope.factor,
        f.size() - kept - divided, kernels::rope_softmax_factor(rope));
  }
  if (!cfg.checkpoint().init_from().empty()) {
    out += fmt::format(
        "init: the weights of {} at step 0 with fresh optimizer state, unless checkpoint.dir "
        "holds a checkpoint of this run (checkpoint.init_from)\n",
        cfg.checkpoint().init_from());
  }

  const FlopBreakdown f = flops_per_token(m, t.seq_len());
  const double tokens = static_cast<double>(t.global_batch()) * t.seq_len();
  out += fmt::format(
      "\nwork: {:.4g} train FLOP/token x {:.4g} tokens/step = {:.4g} FLOP per step ({:.4g} per "
      "rank)\nno device was touched and nothing was trained.\n",
      f.train(), tokens, f.train() * tokens, f.train() * tokens / world);
  return out;
}

}  // namespace fp8pipe
