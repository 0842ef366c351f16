// The discrete-event step simulator (parallel/sim/): with costs given directly it reproduces
// DeepSeek-V3 Table 2 (bubbles, activations in flight, parameters per rank), agrees with the
// drawing timer, conserves work and bytes, and runs the full dsv3-671b-2048 config quickly.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/config.h"
#include "parallel/schedule_format.h"
#include "parallel/sim/measured.h"
#include "parallel/sim/simulator.h"
#include "parallel/trace.h"
#include "tests/test_files.h"

namespace fp8pipe::parallel::sim {
namespace {

Schedule make(ScheduleKind kind, int ranks, int mbs) {
  auto s = make_schedule(kind, ranks, mbs);
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  return *s;
}

// F, B (full), W, F&B as in TR Table 2; OpCosts wants the input-gradient part of B.
OpCosts costs(double f, double b, double w, double fb) {
  OpCosts c;
  c.f = f, c.b_input = b - w, c.w = w, c.fb = fb;
  return c;
}

PipelineResult run(ScheduleKind kind, int ranks, int mbs, const OpCosts& c) {
  auto r = simulate_pipeline(make(kind, ranks, mbs), c);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return *r;
}

double table2(ScheduleKind kind, int ranks, double f, double b, double w, double fb) {
  const Schedule s = make(kind, ranks, kind == ScheduleKind::kDualPipeV ? 2 * ranks : 2 * ranks);
  return table2_bubble(s, Costs{f, b, w, fb});
}

// Every rank's bubble at DeepSeek's figure ratios (F=1, B=2, W=1, F&B=F+B=3): 1F1B (PP-1)(F+B),
// ZB1P (PP-1)(F+B-2W), DualPipe (PP/2-1)(F&B+B-3W); DualPipeV the same with PP = 2 x ranks.
TEST(SimTable2, BubblesAtFigureRatios) {
  const OpCosts c = costs(1, 2, 1, 3);
  const struct {
    ScheduleKind kind;
    int ranks, mbs;
    double bubble;
  } cases[] = {{ScheduleKind::k1F1B, 8, 24, 7 * 3},      {ScheduleKind::kZB1P, 8, 24, 7 * 1},
               {ScheduleKind::k1F1B, 16, 48, 15 * 3},    {ScheduleKind::kZB1P, 16, 48, 15 * 1},
               {ScheduleKind::kDualPipe, 8, 20, 3 * 2},  {ScheduleKind::kDualPipe, 16, 64, 7 * 2},
               {ScheduleKind::kDualPipeV, 4, 10, 3 * 2}, {ScheduleKind::kDualPipeV, 8, 32, 7 * 2}};
  for (const auto& k : cases) {
    const PipelineResult r = run(k.kind, k.ranks, k.mbs, c);
    for (int rank = 0; rank < k.ranks; ++rank) {
      EXPECT_DOUBLE_EQ(r.bubble(rank), k.bubble)
          << schedule_kind_name(k.kind) << " " << k.ranks << "x" << k.mbs << " rank " << rank;
    }
    EXPECT_DOUBLE_EQ(k.bubble, table2(k.kind, k.ranks, 1, 2, 1, 3));
  }
}

// With zero-cost messages the simulator is the drawing timer (schedule_format.h) exactly, at any
// ratio; 1F1B and ZB1P then match Table 2 for any costs.
TEST(SimTable2, MatchesDrawingTimerAtOtherRatios) {
  for (const Costs& c : {Costs{1, 2, 0.5, 3}, Costs{2, 3, 1, 4}, Costs{1, 2, 1, 2.5}}) {
    for (auto kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                      ScheduleKind::kDualPipeV}) {
      const Schedule s = make(kind, 8, 32);
      auto t = simulate_timeline(s, c);
      ASSERT_TRUE(t.ok());
      const PipelineResult r = run(kind, 8, 32, costs(c.f, c.b, c.w, c.fb));
      for (int k = 0; k < 8; ++k) EXPECT_DOUBLE_EQ(r.bubble(k), t->bubble(k));
      if (kind == ScheduleKind::k1F1B || kind == ScheduleKind::kZB1P) {
        for (int k = 0; k < 8; ++k) EXPECT_DOUBLE_EQ(r.bubble(k), table2_bubble(s, c));
      }
    }
  }
}

// DualPipe away from the figure's ratios: Table 2's formula is an idealisation. Documented
// deviations (PP = 8, 20 micro-batches, worst rank; Table 2 in parentheses):
//   W=0.5 (F=1 B=2 F&B=3): 9.5 (10.5) - smaller W leaves less to fill, but the formula's -3W
//     overcounts what the warm-up W's can hide;
//   F&B=2.5 (real overlap, F=1 B=2 W=1): 4.5 (4.5) - the formula holds when only F&B changes.
TEST(SimTable2, DualPipeDeviationAtOtherRatios) {
  const PipelineResult a = run(ScheduleKind::kDualPipe, 8, 20, costs(1, 2, 0.5, 3));
  const PipelineResult b = run(ScheduleKind::kDualPipe, 8, 20, costs(1, 2, 1, 2.5));
  double wa = 0, wb = 0;
  for (int k = 0; k < 8; ++k) wa = std::max(wa, a.bubble(k)), wb = std::max(wb, b.bubble(k));
  EXPECT_DOUBLE_EQ(table2(ScheduleKind::kDualPipe, 8, 1, 2, 0.5, 3), 10.5);
  EXPECT_DOUBLE_EQ(wa, 9.5);
  EXPECT_DOUBLE_EQ(table2(ScheduleKind::kDualPipe, 8, 1, 2, 1, 2.5), 4.5);
  EXPECT_DOUBLE_EQ(wb, 4.5);
}

// Activations in flight (Table 2: PP, PP, PP+1; DualPipeV PP+1 with PP = 2 x ranks stages).
TEST(SimTable2, ActivationsInFlight) {
  const struct {
    ScheduleKind kind;
    int ranks, mbs, peak;
  } cases[] = {{ScheduleKind::k1F1B, 8, 24, 8},
               {ScheduleKind::kZB1P, 8, 24, 8},
               {ScheduleKind::kDualPipe, 8, 20, 9},
               {ScheduleKind::kDualPipe, 16, 120, 17},
               {ScheduleKind::kDualPipeV, 4, 10, 9}};
  for (const auto& k : cases) {
    const PipelineResult r = run(k.kind, k.ranks, k.mbs, costs(1, 2, 1, 3));
    double peak = 0;
    for (double p : r.peak_act_units) peak = std::max(peak, p);
    EXPECT_EQ(peak, k.peak) << schedule_kind_name(k.kind) << " " << k.ranks << "x" << k.mbs;
  }
}

config::Config dsv3(const std::string& schedule) {
  auto c = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/dsv3-671b-2048.textproto",
                       std::vector<std::string>{"--parallel.schedule=" + schedule});
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return *c;
}

Result<StepResult> step(const config::Config& cfg, const Calibration& cal = {}) {
  FP8_ASSIGN_OR_RETURN(auto kind, parse_schedule_kind(cfg.parallel().schedule()));
  FP8_ASSIGN_OR_RETURN(auto s,
                       make_schedule(kind, cfg.parallel().pp(), cfg.parallel().microbatches()));
  FP8_ASSIGN_OR_RETURN(auto cm, build_cost_model(cfg, s, cal));
  return simulate_step(cfg, s, cm);
}

// Parameters per rank (Table 2: 1x, 1x, 2x): a middle rank of dsv3 (4 MoE blocks per stage).
TEST(SimTable2, ParametersPerRank) {
  auto one = step(dsv3("1f1b")), zb = step(dsv3("zb1p")), two = step(dsv3("dualpipe"));
  ASSERT_TRUE(one.ok() && zb.ok() && two.ok()) << one.status().to_string();
  EXPECT_DOUBLE_EQ(zb->params_by_rank[5], one->params_by_rank[5]);
  EXPECT_DOUBLE_EQ(two->params_by_rank[5], 2 * one->params_by_rank[5]);
}

// expected_units_hit against brute force: every choice of max_nodes groups (equally likely), then
// every set of k distinct experts among theirs (equally likely), counting the distinct units
// (equal contiguous expert shares) reached. Units inside groups, spanning groups, and routing
// without the node limit.
TEST(SimEpWire, ExpectedUnitsHitIsTheEnumeratedMean) {
  auto brute = [](int E, int k, int G, int M, int units) {
    std::vector<int> groups, experts;
    double sum = 0, count = 0;
    // all subsets of size r of [0, n), in lexicographic order
    auto subsets = [](int n, int r, auto&& visit) {
      std::vector<int> c(r);
      for (int i = 0; i < r; ++i) c[i] = i;
      while (true) {
        visit(c);
        int i = r - 1;
        while (i >= 0 && c[i] == n - r + i) --i;
        if (i < 0) return;
        ++c[i];
        for (int j = i + 1; j < r; ++j) c[j] = c[j - 1] + 1;
      }
    };
    subsets(G, M, [&](const std::vector<int>& gs) {
      std::vector<int> pool;
      for (int g : gs)
        for (int e = g * E / G; e < (g + 1) * E / G; ++e) pool.push_back(e);
      double s = 0, n = 0;
      subsets(static_cast<int>(pool.size()), k, [&](const std::vector<int>& pick) {
        std::vector<bool> hit(units, false);
        for (int i : pick) hit[pool[i] / (E / units)] = true;
        s += std::count(hit.begin(), hit.end(), true), n += 1;
      });
      sum += s / n, count += 1;
    });
    return sum / count;
  };
  struct Case {
    int E, k, G, M, units;
  };
  const Case cases[] = {{8, 2, 4, 2, 2},  {8, 2, 4, 2, 4},   {8, 2, 4, 2, 8},  {8, 2, 4, 2, 1},
                        {16, 3, 1, 1, 4}, {32, 4, 8, 4, 16}, {32, 4, 8, 4, 8}, {32, 4, 8, 4, 2},
                        {24, 3, 6, 2, 3}, {24, 5, 6, 3, 12}, {16, 4, 4, 4, 8}};
  for (const Case& c : cases) {
    config::Moe moe;
    moe.set_routed_experts(c.E);
    moe.set_topk(c.k);
    moe.set_n_groups(c.G);
    moe.set_max_nodes(c.M);
    EXPECT_NEAR(expected_units_hit(moe, c.units), brute(c.E, c.k, c.G, c.M, c.units), 1e-12)
        << "E=" << c.E << " k=" << c.k << " G=" << c.G << " M=" << c.M << " units=" << c.units;
  }
}

// The dsv3 config with `flags` and the cost model of its DualPipe schedule.
std::pair<config::Config, CostModel> dsv3_cost_model(const std::vector<std::string>& flags) {
  std::vector<std::string> f = {"--parallel.schedule=dualpipe"};
  f.insert(f.end(), flags.begin(), flags.end());
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/dsv3-671b-2048.textproto", f);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  if (!cfg.ok()) return {};
  auto s =
      make_schedule(ScheduleKind::kDualPipe, cfg->parallel().pp(), cfg->parallel().microbatches());
  auto cm = build_cost_model(*cfg, *s, {});
  EXPECT_TRUE(cm.ok()) << cm.status().to_string();
  return {*cfg, cm.ok() ? *cm : CostModel{}};
}

// EP traffic per pass in the wire formats of core/model/moe.cc (ARCHITECTURE.md's table): the
// bytes of a chunk's forward and backward all-to-alls are proportional to (toward + back) bytes
// an element, which for dsv3's defaults (FP8 dispatch 1 + 4/128, bf16 combine 2) is the TR's
// 1 B + 2 B. Ratios to FP32 (4 + 4), per pass and precision setting.
TEST(SimEpWire, BytesFollowTheWireFormats) {
  auto bytes = [](const std::vector<std::string>& flags, bool backward) {
    const CostModel cm = dsv3_cost_model(flags).second;
    if (cm.chunks.size() < 4) return 0.0;
    const PassCost& p = backward ? cm.chunks[3].b : cm.chunks[3].f;
    return p.ib_bytes + p.nvlink_bytes;
  };
  const double fp8 = 1 + 4.0 / 128;
  struct Case {
    std::vector<std::string> flags;
    double fwd, bwd;  // bytes an element toward + back
  };
  const Case cases[] = {
      {{}, fp8 + 2, fp8 + 2},
      {{"--precision.bf16_combine=false"}, fp8 + 4, fp8 + 4},
      {{"--precision.fp8_dispatch=false"}, 4 + 2, 2 + 2},
      {{"--precision.mode=BF16"}, 2 + 2, 2 + 2},
      {{"--precision.mode=BF16", "--precision.fp8_dispatch=false"}, 4 + 2, 2 + 2},
  };
  for (bool backward : {false, true}) {
    const double fp32 = bytes({"--precision.mode=FP32"}, backward);
    ASSERT_GT(fp32, 0);
    for (const Case& k : cases) {
      std::string what = backward ? "backward" : "forward";
      for (const auto& f : k.flags) what += " " + f;
      EXPECT_NEAR(bytes(k.flags, backward) / fp32, (backward ? k.bwd : k.fwd) / 8, 1e-12) << what;
    }
  }
}

// train.recompute=mla_up_proj (set in the dsv3 config, as the TR's §3.2.3) against none, per
// chunk of 4 blocks: the backward re-runs the two up-projection GEMMs (their forward FLOPs again,
// FP8; model FLOPs unchanged), and the forward no longer holds q, k and v in BF16 per token
// (2 bytes x (2 H (nope + rope) + H v)).
TEST(SimRecompute, UpProjectionsTradeBackwardFlopsForHeldBytes) {
  const auto [cfg, re] = dsv3_cost_model({"--train.recompute=mla_up_proj"});
  const auto keep = dsv3_cost_model({"--train.recompute="}).second;
  ASSERT_EQ(re.chunks.size(), keep.chunks.size());
  ASSERT_GT(re.chunks.size(), 3u);
  const auto& m = cfg.model();
  const auto& a = m.mla();
  const double H = m.heads(), dqk = a.qk_nope_head_dim() + a.qk_rope_head_dim();
  const double t = double(re.tokens_per_mb);
  const ChunkCost &cr = re.chunks[3], &ck = keep.chunks[3];
  ASSERT_EQ(cr.blocks, 4);
  const double up_flops =
      2 * t *
      (a.q_lora_rank() * H * dqk + a.kv_lora_rank() * H * (a.qk_nope_head_dim() + a.v_head_dim()));
  EXPECT_NEAR(cr.b.work.fp8 - ck.b.work.fp8, cr.blocks * up_flops, 1e-9 * up_flops);
  EXPECT_EQ(cr.b.work.model, ck.b.work.model);
  EXPECT_EQ(cr.f.work.fp8, ck.f.work.fp8);
  EXPECT_GT(cr.b.compute_s, ck.b.compute_s);
  const double qkv_bytes = 2 * (2 * H * dqk + H * a.v_head_dim());
  EXPECT_NEAR(ck.act_bytes - cr.act_bytes, cr.blocks * t * qkv_bytes, 1e-9 * ck.act_bytes);
}

// train.recompute=rmsnorm (with mla_up_proj, as the dsv3 config) against mla_up_proj alone, per
// chunk of 4 blocks: the two normed inputs' FP8 copies (hidden bytes each per token) and MLA's
// two normed latents' are not held, and the backward re-quantizes them (read BF16, write FP8: 3
// bytes an element); FLOPs unchanged.
TEST(SimRecompute, NormsTradeBackwardBytesForHeldBytes) {
  const auto [cfg, re] = dsv3_cost_model({"--train.recompute=mla_up_proj,rmsnorm"});
  const auto keep = dsv3_cost_model({"--train.recompute=mla_up_proj"}).second;
  ASSERT_EQ(re.chunks.size(), keep.chunks.size());
  const double t = double(re.tokens_per_mb);
  // per token and block: the two normed inputs (hidden wide) and MLA's normed latents
  // (q_lora + kv_lora wide), one FP8 byte each
  const double w = 2.0 * cfg.model().hidden() + cfg.model().mla().q_lora_rank() +
                   cfg.model().mla().kv_lora_rank();
  const ChunkCost &cr = re.chunks[3], &ck = keep.chunks[3];
  ASSERT_EQ(cr.blocks, 4);
  EXPECT_NEAR(ck.act_bytes - cr.act_bytes, cr.blocks * t * w, 1e-9 * ck.act_bytes);
  EXPECT_NEAR(cr.b.work.hbm - ck.b.work.hbm, cr.blocks * t * 3 * w, 1e-9 * ck.b.work.hbm);
  EXPECT_EQ(cr.b.work.fp8, ck.b.work.fp8);
  EXPECT_EQ(cr.f.work.hbm, ck.f.work.hbm);
  EXPECT_GT(cr.b.compute_s, ck.b.compute_s);
}

// precision.bf16_norm_inputs: each block's two norm inputs are held as bf16, 2 x 2 bytes a hidden
// element per token instead of 2 x 4; the costs do not change.
TEST(SimBf16NormInputs, HoldFourBytesLessPerHiddenElement) {
  const auto [cfg, on] = dsv3_cost_model({"--precision.bf16_norm_inputs=true"});
  const auto off = dsv3_cost_model({"--precision.bf16_norm_inputs=false"}).second;
  const double d = cfg.model().hidden(), t = double(on.tokens_per_mb);
  const ChunkCost &c_on = on.chunks[3], &c_off = off.chunks[3];
  ASSERT_EQ(c_on.blocks, 4);
  EXPECT_NEAR(c_off.act_bytes - c_on.act_bytes, c_on.blocks * t * 4 * d, 1e-9 * c_off.act_bytes);
  EXPECT_EQ(c_on.b.work.hbm, c_off.b.work.hbm);
  EXPECT_EQ(c_on.f.compute_s, c_off.f.compute_s);
}

// The head chunk holds, per output head (main + MTP) and token, its bf16 input and its logits as
// bf16 (2 bytes x vocab): a larger vocabulary adds exactly 2 x heads x tokens bytes a word to the
// head chunk's held bytes and nothing to the others'.
TEST(SimHead, HoldsTheLogitsAsBf16) {
  // (and, vocabulary aside, the norms' fp32 inputs: checked by SimHead.HoldsTheNormInputs)
  const auto [cfg, a] = dsv3_cost_model({"--model.vocab_size=129280"});
  const auto b = dsv3_cost_model({"--model.vocab_size=131328"}).second;
  ASSERT_EQ(a.chunks.size(), b.chunks.size());
  const double heads = 1 + cfg.model().mtp_depth(), t = double(a.tokens_per_mb);
  for (size_t i = 0; i < a.chunks.size(); ++i) {
    SCOPED_TRACE(i);
    const double want = a.chunks[i].head ? 2 * heads * t * (131328 - 129280) : 0.0;
    EXPECT_NEAR(b.chunks[i].act_bytes - a.chunks[i].act_bytes, want, 1e-9 * a.chunks[i].act_bytes);
  }
  EXPECT_TRUE(a.chunks.back().head);
}

// The head chunk also holds its norms' fp32 inputs, 4 bytes x hidden a token each: the final
// norm's and, per MTP module, enorm's, hnorm's and its norm's. A deeper MTP (2 modules) adds one
// module's block, eh_proj input, head (input, logits) and 3 norm inputs; with the block's own
// holds taken from a middle chunk of the same blocks, the rest must be exactly those bytes.
TEST(SimHead, HoldsTheNormInputs) {
  const auto [cfg, one] = dsv3_cost_model({"--train.recompute=mla_up_proj"});
  const auto two = dsv3_cost_model({"--train.recompute=mla_up_proj", "--model.mtp_depth=2"}).second;
  const ChunkCost &h1 = one.chunks.back(), &h2 = two.chunks.back(), &mid = one.chunks[3];
  ASSERT_TRUE(h1.head && h2.head);
  ASSERT_EQ(h2.mtp, 2);
  ASSERT_EQ(mid.moe_blocks, mid.blocks);
  const double d = cfg.model().hidden(), V = cfg.model().vocab_size(),
               t = double(one.tokens_per_mb);
  const double block = mid.act_bytes / mid.blocks;  // one MoE block's holds
  const double want = block + t * (2 * d /*eh_proj FP8*/ + 2 * (d + V) /*head*/ + 3 * 4 * d);
  EXPECT_NEAR(h2.act_bytes - h1.act_bytes, want, 1e-9 * h2.act_bytes);
}

// train.recompute=rmsnorm on the head chunk: the final and MTP norms re-run in B, so the heads'
// bf16 inputs (2 x hidden a token per head) and eh_proj's FP8 input (2 x hidden per MTP module)
// are not held, and B re-prepares them (read 2 bytes an element, write 1 for FP8, 2 for bf16).
TEST(SimHead, RecomputedNormsDropTheHeadInputs) {
  const auto [cfg, re] = dsv3_cost_model({"--train.recompute=mla_up_proj,rmsnorm"});
  const auto keep = dsv3_cost_model({"--train.recompute=mla_up_proj"}).second;
  const ChunkCost &cr = re.chunks.back(), &ck = keep.chunks.back();
  ASSERT_TRUE(cr.head);
  ASSERT_EQ(cr.mtp, 1);
  const double d = cfg.model().hidden(), t = double(re.tokens_per_mb);
  const double w = 2.0 * d + cfg.model().mla().q_lora_rank() + cfg.model().mla().kv_lora_rank();
  const double blocks = cr.blocks + cr.mtp;  // the MTP module's block drops its norms' copies too
  const double want = blocks * t * w + t * (2 * 2 * d + 2 * d);
  EXPECT_NEAR(ck.act_bytes - cr.act_bytes, want, 1e-9 * ck.act_bytes);
  EXPECT_NEAR(cr.b.work.hbm - ck.b.work.hbm, blocks * t * 3 * w + t * (3 * 2 * d + 4 * 2 * d),
              1e-9 * ck.b.work.hbm);
}

// precision.attn_out_cache: the attention output (H x v_head_dim a token) held as bf16 (2 bytes),
// E5M6 (1.5) or W_o's FP8 input (1; scales are not counted, as for every FP8 hold); the costs do
// not change.
TEST(SimAttnOutCache, HoldsTheCachesBytesPerOutputElement) {
  const auto [cfg, e5] = dsv3_cost_model({"--precision.attn_out_cache=e5m6"});
  const auto bf = dsv3_cost_model({"--precision.attn_out_cache=bf16"}).second;
  const auto e4 = dsv3_cost_model({"--precision.attn_out_cache=e4m3"}).second;
  const double hv = double(cfg.model().heads()) * cfg.model().mla().v_head_dim();
  const double t = double(e5.tokens_per_mb);
  const ChunkCost &c5 = e5.chunks[3], &cb = bf.chunks[3], &c4 = e4.chunks[3];
  ASSERT_EQ(c5.blocks, 4);
  EXPECT_NEAR(cb.act_bytes - c5.act_bytes, c5.blocks * t * 0.5 * hv, 1e-9 * cb.act_bytes);
  EXPECT_NEAR(cb.act_bytes - c4.act_bytes, c5.blocks * t * 1.0 * hv, 1e-9 * cb.act_bytes);
  EXPECT_EQ(c5.b.work.hbm, cb.b.work.hbm);
  EXPECT_EQ(c5.f.compute_s, cb.f.compute_s);
}

// precision.fp8_swiglu_cache (set in the dsv3 config) against off: a MoE block holds the experts'
// g and u in FP8 (2 bytes a hidden element of each of its k x imbalance + shared rows) instead of
// bf16 g, u and the FP8 output (5): 3 bytes less per element; the costs do not change.
TEST(SimSwigluCache, HoldsThreeBytesLessPerExpertElement) {
  const auto [cfg, on] = dsv3_cost_model({"--precision.fp8_swiglu_cache=true"});
  const auto off = dsv3_cost_model({"--precision.fp8_swiglu_cache=false"}).second;
  ASSERT_EQ(on.chunks.size(), off.chunks.size());
  ASSERT_GT(on.chunks.size(), 3u);
  const auto& e = cfg.model().moe();
  const ChunkCost &c1 = on.chunks[3], &c0 = off.chunks[3];
  ASSERT_EQ(c1.moe_blocks, 4);
  const double rows = e.topk() * on.cal.imbalance + e.shared_experts();
  const double want = c1.moe_blocks * double(on.tokens_per_mb) * 3 * e.expert_hidden() * rows;
  EXPECT_NEAR(c0.act_bytes - c1.act_bytes, want, 1e-9 * want);
  EXPECT_EQ(c0.b.compute_s, c1.b.compute_s);
  EXPECT_EQ(c0.f.compute_s, c1.f.compute_s);
}

// Held bytes: a chunk's act_bytes are held from its F to its full B or its W, except act_b_bytes
// (the logits), which a B that defers its W already frees. Walking each rank's instruction list
// with that rule gives the peak the simulator reports, on ZB1P (deferred W) and 1F1B, and the
// logits part then adds less than it would if it were held to W.
TEST(SimMemory, DeferredWFreesTheLogitsAtB) {
  for (auto kind : {ScheduleKind::kZB1P, ScheduleKind::k1F1B}) {
    SCOPED_TRACE(schedule_kind_name(kind));
    const Schedule s = make(kind, 4, 12);
    CostModel cm;
    cm.chunks.resize(s.stages());
    for (int st = 0; st < s.stages(); ++st) {
      cm.chunks[st].stage = st;
      cm.chunks[st].act_bytes = 100 + st;
      cm.chunks[st].act_b_bytes = st == s.stages() - 1 ? 60 : 0;  // the head's logits
    }
    OpCosts c;
    c.model = &cm;
    auto r = simulate_pipeline(s, c);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    bool deferred = false;
    for (size_t rank = 0; rank < s.rank_instrs.size(); ++rank) {
      double held = 0, peak = 0, peak_to_w = 0, held_to_w = 0;
      for (const Instr& in : s.rank_instrs[rank]) {
        const ChunkCost& k = cm.chunks[in.stage];
        if (in.op == Op::kF) held += k.act_bytes, held_to_w += k.act_bytes;
        if (in.op == Op::kB && in.defer_w) held -= k.act_b_bytes, deferred = true;
        if (in.op == Op::kB && !in.defer_w) held -= k.act_bytes, held_to_w -= k.act_bytes;
        if (in.op == Op::kW) held -= k.act_bytes - k.act_b_bytes, held_to_w -= k.act_bytes;
        peak = std::max(peak, held), peak_to_w = std::max(peak_to_w, held_to_w);
      }
      EXPECT_DOUBLE_EQ(r->peak_act_bytes[rank], peak) << "rank " << rank;
      if (kind == ScheduleKind::kZB1P && rank == s.rank_instrs.size() - 1) {
        EXPECT_LT(peak, peak_to_w) << "the last stage's logits go at B";
      }
    }
    EXPECT_EQ(deferred, kind == ScheduleKind::kZB1P);
  }
}

// Conservation: compute busy = sum of op costs; bytes sent = bytes received (with latency and a
// finite link, so messages take time).
TEST(SimConservation, WorkAndBytes) {
  for (auto kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                    ScheduleKind::kDualPipeV}) {
    const Schedule s = make(kind, 4, 12);
    OpCosts c = costs(1, 2, 0.7, 2.6);
    c.p2p_bytes = 1e6, c.p2p_latency = 0.05, c.p2p_bytes_per_s = 5e6;
    auto r = simulate_pipeline(s, c);
    ASSERT_TRUE(r.ok());
    double busy = 0, expect = 0;
    for (double b : r->busy) busy += b;
    for (const auto& list : s.rank_instrs) {
      for (const Instr& in : list) expect += c.op(in);
    }
    EXPECT_NEAR(busy, expect, 1e-9);
    EXPECT_NEAR(r->op_cost_sum, expect, 1e-9);
    EXPECT_GT(r->bytes_sent, 0);
    EXPECT_DOUBLE_EQ(r->bytes_sent, r->bytes_received);
    double wait = 0;
    for (double w : r->recv_wait) wait += w;
    EXPECT_GT(wait, 0) << schedule_kind_name(kind);  // messages now cost time
  }
}

// Matched point-to-point groups (the executor over NCCL, p2p_plan.h): with free messages a
// rendezvous can only delay a receive (it completes once the send is posted AND its group has
// started), so no makespan drops below the eager one. With early sends (what the executor plans)
// every kind keeps it at Table 2's figure ratios; so do 1F1B and DualPipe without them (no late
// sends), the others not (printed). Work and bytes are conserved; with messages that cost time
// every pipeline waits somewhere.
TEST(SimMatched, RendezvousCostsOnlyWhereSendsGoLate) {
  const OpCosts c = costs(1, 2, 1, 3);
  for (auto kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                    ScheduleKind::kDualPipeV}) {
    for (int ranks : {2, 4, 8}) {
      const int mbs =
          kind == ScheduleKind::kZB1P || kind == ScheduleKind::k1F1B ? 3 * ranks + 1 : 4 * ranks;
      const Schedule s = make(kind, ranks, mbs);
      const std::string what = std::string(schedule_kind_name(kind)) + " " + std::to_string(ranks) +
                               "x" + std::to_string(mbs);
      const PipelineResult eager = run(kind, ranks, mbs, c);
      auto late = plan_p2p_groups(s, false), early = plan_p2p_groups(s, true);
      ASSERT_TRUE(late.ok() && early.ok()) << what;
      if (kind == ScheduleKind::k1F1B || kind == ScheduleKind::kDualPipe) {
        EXPECT_EQ(late->late_sends, 0) << what;
      }
      double span[2] = {0, 0};  // late sends, early sends
      for (int mode = 0; mode < 2; ++mode) {
        auto r = simulate_pipeline(s, c, false, mode == 0 ? &*late : &*early);
        ASSERT_TRUE(r.ok()) << what << ": " << r.status().to_string();
        EXPECT_GE(r->makespan, eager.makespan - 1e-9) << what << " mode " << mode;
        EXPECT_NEAR(r->op_cost_sum, eager.op_cost_sum, 1e-9) << what;
        span[mode] = r->makespan;
      }
      EXPECT_DOUBLE_EQ(span[1], eager.makespan) << what;
      if (late->late_sends == 0) {
        EXPECT_DOUBLE_EQ(span[0], eager.makespan) << what;
      }
      if (ranks == 8) {
        std::printf("%s: makespan %.0f eager and with early sends; %.0f with %d late sends\n",
                    what.c_str(), eager.makespan, span[0], late->late_sends);
      }
    }
  }
  for (auto kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                    ScheduleKind::kDualPipeV}) {
    const Schedule s = make(kind, 4, 12);
    OpCosts cc = costs(1, 2, 0.7, 2.6);
    cc.p2p_bytes = 1e6, cc.p2p_latency = 0.05, cc.p2p_bytes_per_s = 5e6;
    auto plan = plan_p2p_groups(s, false);
    ASSERT_TRUE(plan.ok());
    auto eager = simulate_pipeline(s, cc);
    auto r = simulate_pipeline(s, cc, true, &*plan);
    ASSERT_TRUE(r.ok() && eager.ok());
    EXPECT_DOUBLE_EQ(r->bytes_sent, eager->bytes_sent) << schedule_kind_name(kind);
    EXPECT_DOUBLE_EQ(r->bytes_received, eager->bytes_received) << schedule_kind_name(kind);
    double wait = 0;
    for (double w : r->recv_wait) wait += w;
    EXPECT_GT(wait, 0) << schedule_kind_name(kind);
    const auto group = std::find_if(r->events.begin(), r->events.end(),
                                    [](const TraceEvent& e) { return e.comm && e.name[0] == 'G'; });
    EXPECT_NE(group, r->events.end()) << schedule_kind_name(kind);  // group events on comm rows
  }
}

// The full DeepSeek-V3 config on 2048 GPUs: every kind simulates; timing printed, not asserted.
TEST(SimDsv3, Simulates) {
  for (const char* kind : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = step(dsv3(kind));
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    std::printf(
        "dsv3 %-9s step %.2f s, bubble %.1f%%, %.0f tok/s/GPU, %.0fK GPU-h/T, %.1f GiB "
        "(simulated in %.3f s)\n",
        kind, r->step_s, 100 * r->bubble_frac, r->tokens_per_s_per_gpu,
        r->gpu_hours_per_trillion / 1e3, r->mem.total() / double(1ull << 30), secs);
    EXPECT_GT(r->step_s, 0);
    EXPECT_GT(r->mfu_bf16, 0.05);
    EXPECT_LT(r->mfu_bf16, 1.0);
    EXPECT_DOUBLE_EQ(r->pipe.bytes_sent, r->pipe.bytes_received);
  }
}

// The dsv3 preset under schedule `kind` with `flags`, over `comm`: set after loading, since a build
// without CUDA refuses nccl's train.device=cuda, and the simulator reads only the field.
config::Config dsv3_over(const std::string& kind, const std::string& comm,
                         const std::vector<std::string>& flags) {
  std::vector<std::string> f = {"--parallel.schedule=" + kind};
  f.insert(f.end(), flags.begin(), flags.end());
  auto c = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/dsv3-671b-2048.textproto", f);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  config::Config cfg = c.ok() ? *c : config::Config();
  cfg.mutable_parallel()->set_comm_backend(comm);
  return cfg;
}

// optim.overlap_grad_reduce: the reduce-scatter under the pipeline can only shorten the step, never
// below the pipeline plus the optimizer; without it the step is the pipeline plus the worst
// rank's sync and optimizer, as before. Over MPI and over NCCL's matched groups.
TEST(SimDsv3, OverlappedGradientExchange) {
  for (const char* kind : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    for (const char* comm : {"mpi", "nccl"}) {
      auto load = [&](bool overlap) {
        return dsv3_over(
            kind, comm,
            {std::string("--optim.overlap_grad_reduce=") + (overlap ? "true" : "false"),
             "--optim.overlap_param_gather=false"});
      };
      auto on = step(load(true)), off = step(load(false));
      const std::string what = std::string(kind) + " over " + comm;
      ASSERT_TRUE(on.ok() && off.ok()) << what;
      EXPECT_DOUBLE_EQ(on->pipe.makespan, off->pipe.makespan) << what;
      EXPECT_NEAR(off->step_s, off->pipe.makespan + off->dp_sync_s + off->optimizer_s, 1e-9)
          << what;
      EXPECT_DOUBLE_EQ(off->dp_sync_s, off->dp_sync_total_s) << what;
      EXPECT_LE(on->step_s, off->step_s + 1e-12) << what;
      EXPECT_GE(on->step_s, on->pipe.makespan + on->optimizer_s) << what;
      EXPECT_NEAR(on->step_s, on->pipe.makespan + on->dp_sync_s + on->optimizer_s, 1e-9) << what;
      EXPECT_DOUBLE_EQ(on->dp_sync_total_s, off->dp_sync_total_s) << what;
      std::printf(
          "%-9s %-4s step %.3f s overlapped vs %.3f s after (dp sync exposed %.3f of %.3f)\n", kind,
          comm, on->step_s, off->step_s, on->dp_sync_s, on->dp_sync_total_s);
      // Over MPI every kind hides part of it: some rank's chunks are final before the end.
      if (std::string(comm) == "mpi") {
        EXPECT_LT(on->step_s, off->step_s) << what;
      }
    }
  }
}

// optim.overlap_param_gather: each chunk's first instruction waits for its weights, posted after
// the optimizer (the step's start), so the pipeline can only lengthen, by at most the all-gather,
// and the step can only shorten: what the pipeline does not hide shows as weight waits. The
// exchange's total and the memory are unchanged (the shards move in place).
TEST(SimDsv3, OverlappedParameterGather) {
  for (const char* kind : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    for (const char* comm : {"mpi", "nccl"}) {
      auto load = [&](bool overlap) {
        return dsv3_over(
            kind, comm,
            {std::string("--optim.overlap_param_gather=") + (overlap ? "true" : "false")});
      };
      auto on = step(load(true)), off = step(load(false));
      const std::string what = std::string(kind) + " over " + comm;
      ASSERT_TRUE(on.ok() && off.ok()) << what;
      double wait = 0;
      for (double w : on->pipe.weight_wait) wait = std::max(wait, w);
      for (double w : off->pipe.weight_wait) EXPECT_EQ(w, 0) << what;
      EXPECT_GE(on->pipe.makespan, off->pipe.makespan) << what;
      EXPECT_GT(wait, 0) << what;  // the first stage's first forward waits for its weights
      EXPECT_LE(on->step_s, off->step_s + 1e-12) << what;
      EXPECT_NEAR(on->step_s, on->pipe.makespan + on->dp_sync_s + on->optimizer_s, 1e-9) << what;
      EXPECT_DOUBLE_EQ(on->dp_sync_total_s, off->dp_sync_total_s) << what;
      EXPECT_DOUBLE_EQ(on->mem.total(), off->mem.total()) << what;  // shards land in place
      std::printf(
          "%-9s %-4s step %.3f s all-gather under the next step vs %.3f s after (pipeline %.3f vs "
          "%.3f, weight waits at most %.3f s; dp sync %.3f in all)\n",
          kind, comm, on->step_s, off->step_s, on->pipe.makespan, off->pipe.makespan, wait,
          on->dp_sync_total_s);
      // DualPipe's second chunk and every later stage wait less than the whole all-gather.
      if (std::string(kind).rfind("dualpipe", 0) == 0) {
        EXPECT_LT(on->step_s, off->step_s) << what;
      }
    }
  }
}

// Under the pipeline the DP exchange gets the NIC share the EP all-to-all leaves: on the busiest
// rank 1 - (its IB bytes at the network rate) / the pipeline's span, from the step's reported
// bytes (ranks differ by at most a few per cent). Without the overlaps nothing of the exchange
// runs under the pipeline: share 1. And a slower network can only lengthen the step.
TEST(SimDsv3, DpExchangeSharesTheNicWithTheAllToAll) {
  auto [cfg, cm] = dsv3_cost_model({"--optim.overlap_param_gather=false"});
  auto s =
      make_schedule(ScheduleKind::kDualPipe, cfg.parallel().pp(), cfg.parallel().microbatches());
  ASSERT_TRUE(s.ok());
  auto r = simulate_step(cfg, *s, cm);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const double busy = r->ep_ib_bytes / (cm.net_bytes_per_s * cm.cal.net_eff);
  EXPECT_NEAR(r->dp_nic_share, 1 - busy / r->pipe.makespan, 0.02);
  EXPECT_GT(r->dp_nic_share, 0.3);
  EXPECT_LT(r->dp_nic_share, 0.9);
  std::printf(
      "DualPipe: the DP exchange gets %.1f%% of the NIC under the pipeline (EP IB %.3g B "
      "in %.3f s)\n",
      100 * r->dp_nic_share, r->ep_ib_bytes, r->pipe.makespan);
  config::Config after = cfg;
  after.mutable_optim()->set_overlap_grad_reduce(false);
  auto a = simulate_step(after, *s, cm);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->dp_nic_share, 1.0);
  Calibration slow = cm.cal;
  slow.net_eff *= 0.5;
  auto cm2 = build_cost_model(cfg, *s, slow);
  ASSERT_TRUE(cm2.ok());
  auto r2 = simulate_step(cfg, *s, *cm2);
  ASSERT_TRUE(r2.ok());
  EXPECT_GT(r2->step_s, r->step_s);
  EXPECT_LT(r2->dp_nic_share, r->dp_nic_share);
}

// ---- The simulator calibrated on measured traces (measured.h) ----

// Known per-stage costs, all different, with F&B pairs cheaper than F + B + W (as if overlapped).
MeasuredCosts truth_costs(const Schedule& s) {
  MeasuredCosts m;
  m.schedule = schedule_kind_name(s.kind);
  m.tokens_per_mb = 256;
  for (int st = 0; st < s.stages(); ++st) {
    StageTimes t;
    t.f = 1 + 0.3 * st, t.b = 1.5 + 0.1 * st, t.w = 0.7 + 0.05 * st, t.bw = t.b + t.w + 0.1;
    t.send = 0.05 + 0.01 * st, t.recv = 0.02;
    m.stages.push_back(t);
  }
  for (const auto& list : s.rank_instrs) {
    for (const Instr& in : list) {
      if (in.op == Op::kFB) m.fb[{in.stage, in.stage_b}] = m.stages[in.stage].f + 0.9;
    }
  }
  m.p2p_s = 0.3, m.tail_s = 2.0;
  return m;
}

// What the trainer would trace for `steps` consecutive steps if every op took exactly the
// simulated time: the simulator's events (µs) on every rank of every dp replica, each world rank
// with its own clock offset, steps one simulated step apart.
std::vector<MeasuredEvent> synthetic_trace(const Schedule& s, const MeasuredCosts& m, int dp,
                                           int steps) {
  auto r = simulate_measured(s, m, true);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  std::vector<MeasuredEvent> out;
  for (int rank = 0; rank < s.ranks; ++rank) {
    for (int d = 0; d < dp; ++d) {
      const int world = rank * dp + d;
      const double clock = 1e6 * (0.37 * world + 5);  // unknown per-rank trace origin
      for (int k = 0; k < steps; ++k) {
        for (const TraceEvent& e : r->pipe.events) {
          if (e.rank != rank) continue;
          const bool send = e.comm && e.name.starts_with("S>");
          out.push_back({world, 2 + k, e.name, clock + 1e6 * (k * r->step_s + e.start),
                         send ? 0.0 : 1e6 * e.dur, send});
        }
      }
    }
  }
  return out;
}

void expect_same_costs(const MeasuredCosts& a, const MeasuredCosts& b, const std::string& what) {
  constexpr double eps = 1e-9;
  ASSERT_EQ(a.stages.size(), b.stages.size()) << what;
  for (size_t st = 0; st < a.stages.size(); ++st) {
    const StageTimes &x = a.stages[st], &y = b.stages[st];
    const std::pair<double, double> pairs[] = {{x.f, y.f},   {x.b, y.b},       {x.w, y.w},
                                               {x.bw, y.bw}, {x.send, y.send}, {x.recv, y.recv}};
    for (const auto& [u, v] : pairs) EXPECT_NEAR(u, v, eps) << what << " stage " << st;
  }
  EXPECT_EQ(a.fb.size(), b.fb.size()) << what;
  for (const auto& [k, v] : a.fb) {
    ASSERT_TRUE(b.fb.count(k)) << what;
    EXPECT_NEAR(v, b.fb.at(k), eps) << what;
  }
  EXPECT_NEAR(a.p2p_s, b.p2p_s, eps) << what;
  EXPECT_NEAR(a.tail_s, b.tail_s, eps) << what;
}

// Traces generated from known costs calibrate back to those costs (per stage, the message cost
// through unknown clock offsets, the time between steps), and re-simulate to the same step.
TEST(SimMeasured, CalibrationRecoversKnownCosts) {
  // slow_send: the last stage's send overhead, large enough that the rank finishing last ends
  // with a SEND (whose overhead must not be counted again in the time between steps).
  const struct {
    ScheduleKind kind;
    int ranks, mbs, dp;
    double slow_send;
  } cases[] = {{ScheduleKind::k1F1B, 2, 8, 1, 0},      {ScheduleKind::kZB1P, 2, 8, 1, 0},
               {ScheduleKind::kDualPipeV, 2, 8, 1, 0}, {ScheduleKind::kDualPipe, 2, 8, 1, 0},
               {ScheduleKind::k1F1B, 4, 8, 2, 0},      {ScheduleKind::kDualPipeV, 4, 10, 1, 0},
               {ScheduleKind::k1F1B, 2, 8, 1, 5}};
  for (const auto& c : cases) {
    const Schedule s = make(c.kind, c.ranks, c.mbs);
    const std::string what =
        fmt::format("{} x{} dp{} send {}", schedule_kind_name(c.kind), c.ranks, c.dp, c.slow_send);
    MeasuredCosts truth = truth_costs(s);
    if (c.slow_send > 0) truth.stages.back().send = c.slow_send;
    // Only what the schedule runs is measured (a rank's last instruction has no gap after it).
    MeasuredCosts expect = truth;
    std::vector<StageTimes> seen(s.stages());
    for (const auto& list : s.rank_instrs) {
      for (size_t i = 0; i < list.size(); ++i) {
        const Instr& in = list[i];
        StageTimes& t = seen[in.stage];
        const bool next = i + 1 < list.size();
        if (in.op == Op::kF) t.f = 1;
        if (in.op == Op::kB) (in.defer_w ? t.b : t.bw) = 1;
        if (in.op == Op::kW) t.w = 1;
        if ((in.op == Op::kSendAct || in.op == Op::kSendGrad) && next) t.send = 1;
        if ((in.op == Op::kRecvAct || in.op == Op::kRecvGrad) && next) t.recv = 1;
      }
    }
    for (int st = 0; st < s.stages(); ++st) {
      StageTimes &t = expect.stages[st], &u = seen[st];
      for (auto [x, y] : {std::pair{&t.f, u.f},
                          {&t.b, u.b},
                          {&t.w, u.w},
                          {&t.bw, u.bw},
                          {&t.send, u.send},
                          {&t.recv, u.recv}}) {
        if (y < 0) *x = -1;
      }
    }
    auto m = calibrate(s, c.dp, 256, synthetic_trace(s, truth, c.dp, 3));
    ASSERT_TRUE(m.ok()) << what << ": " << m.status().to_string();
    expect_same_costs(expect, *m, what);
    EXPECT_EQ(m->traced_steps, 3) << what;
    auto again = simulate_measured(s, *m);
    auto want = simulate_measured(s, truth);
    ASSERT_TRUE(again.ok() && want.ok()) << what;
    EXPECT_NEAR(again->step_s, want->step_s, 1e-9) << what;
    EXPECT_NEAR(m->trace_pipeline_s, want->pipe.makespan, 1e-9) << what;
    EXPECT_GT(want->bubble_s, 0) << what;
    EXPECT_GT(want->step_s, want->pipe.makespan) << what;
    // The calibration file keeps every cost (to 1 ns).
    auto back = parse_measured(to_json(*m), "json");
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    expect_same_costs(*m, *back, what + " (json)");
    EXPECT_EQ(back->schedule, m->schedule);
    EXPECT_EQ(back->tokens_per_mb, 256);
    EXPECT_NEAR(back->trace_pipeline_s, m->trace_pipeline_s, 1e-9);
  }
}

// Each measured cost moves the simulated step: the prediction is not insensitive to the data.
TEST(SimMeasured, StepFollowsTheCosts) {
  const Schedule s = make(ScheduleKind::k1F1B, 2, 8);
  const MeasuredCosts base = truth_costs(s);
  const double step = simulate_measured(s, base)->step_s;
  // 1F1B on 2 ranks, 8 micro-batches: the last stage runs F + B+W per micro-batch; stage 0 adds
  // its first F, its last B+W, and the messages between (closed form of the schedule).
  const StageTimes &s0 = base.stages[0], &s1 = base.stages[1];
  EXPECT_GT(step, 8 * (s1.f + s1.bw) + s0.f + s0.bw + base.tail_s);
  for (auto field : {&StageTimes::f, &StageTimes::bw}) {
    MeasuredCosts slower = base;
    slower.stages[1].*field *= 2;
    EXPECT_GT(simulate_measured(s, slower)->step_s, step + 8 * (base.stages[1].*field) * 0.99);
  }
  MeasuredCosts late = base;
  late.p2p_s *= 3, late.tail_s *= 2;
  EXPECT_GT(simulate_measured(s, late)->step_s, step + base.tail_s);
}

// One F slowed by X (time lost to another process): the mean moves by X / samples, the median
// not at all; the statistic is kept in the calibration file.
TEST(SimMeasured, MeanOrMedian) {
  const Schedule s = make(ScheduleKind::k1F1B, 2, 8);
  const MeasuredCosts truth = truth_costs(s);
  auto events = synthetic_trace(s, truth, 1, 2);
  int fs = 0;
  for (auto& e : events) {
    if (e.rank == 1 && e.name.starts_with("F")) {
      if (fs++ == 0) e.dur_us += 1e6 * 1.6;  // overlaps the next event: no gap after it
    }
  }
  ASSERT_EQ(fs, 16);
  auto mean = calibrate(s, 1, 256, events, Statistic::kMean);
  auto median = calibrate(s, 1, 256, events, Statistic::kMedian);
  ASSERT_TRUE(mean.ok() && median.ok()) << mean.status().to_string();
  EXPECT_NEAR(mean->stages[1].f, truth.stages[1].f + 1.6 / 16, 1e-9);
  EXPECT_NEAR(median->stages[1].f, truth.stages[1].f, 1e-9);
  EXPECT_NEAR(mean->stages[0].f, truth.stages[0].f, 1e-9);
  auto back = parse_measured(to_json(*median), "json");
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(back->statistic, Statistic::kMedian);
}

TEST(SimMeasured, RefusesMismatchedTraces) {
  const Schedule one = make(ScheduleKind::k1F1B, 2, 8), zb = make(ScheduleKind::kZB1P, 2, 8);
  const auto zb_events = synthetic_trace(zb, truth_costs(zb), 1, 2);
  // Traces of another schedule.
  auto m = calibrate(one, 1, 256, zb_events);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("same parallel.* settings"), std::string::npos)
      << m.status().to_string();
  // A rank missing.
  std::vector<MeasuredEvent> rank0;
  for (const auto& e : zb_events)
    if (e.rank == 0) rank0.push_back(e);
  m = calibrate(zb, 1, 256, rank0);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("no events of rank 1"), std::string::npos);
  // One traced step: the time outside the pipeline cannot be measured.
  m = calibrate(zb, 1, 256, synthetic_trace(zb, truth_costs(zb), 1, 1));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("log.trace_steps >= 2"), std::string::npos);
  // Costs of 1F1B (full B only) cannot run ZB1P's deferred W; ZB1P's costs run 1F1B (B = b + w).
  auto full_only = calibrate(one, 1, 256, synthetic_trace(one, truth_costs(one), 1, 2));
  ASSERT_TRUE(full_only.ok()) << full_only.status().to_string();
  auto st = full_only->check_covers(zb, 256);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("zb1p"), std::string::npos) << st.to_string();
  auto split = calibrate(zb, 1, 256, zb_events);
  ASSERT_TRUE(split.ok()) << split.status().to_string();
  EXPECT_TRUE(split->check_covers(one, 256).ok());
  for (const Instr& in : one.rank_instrs[1]) {
    if (in.op == Op::kB) {
      EXPECT_DOUBLE_EQ(split->op(in), split->stages[1].b + split->stages[1].w);
    }
  }
  EXPECT_FALSE(split->check_covers(one, 512).ok());  // other micro-batch size
  EXPECT_FALSE(split->check_covers(make(ScheduleKind::k1F1B, 4, 8), 256).ok());
}

// The trainer's trace writer (parallel/trace.h) and the calibration's reader agree.
TEST(SimMeasured, ReadsTheTracerFormat) {
  const auto dir = testing::temp_dir("sim");
  Tracer t(3);
  t.interval("R<a0d0", "comm", 0, 12.5, 2);
  t.interval("F0d0", "compute", 12.5, 40.25, 2);
  t.instant("S>a0d0", "comm", 40.5, 2);
  ASSERT_TRUE(t.write((dir / "t.json").string()).ok());
  auto ev = read_trace((dir / "t.json").string());
  ASSERT_TRUE(ev.ok()) << ev.status().to_string();
  ASSERT_EQ(ev->size(), 3u);
  EXPECT_EQ((*ev)[0].rank, 3);
  EXPECT_EQ((*ev)[0].step, 2);
  EXPECT_EQ((*ev)[1].name, "F0d0");
  EXPECT_DOUBLE_EQ((*ev)[1].ts_us, 12.5);
  EXPECT_DOUBLE_EQ((*ev)[1].dur_us, 27.75);
  EXPECT_TRUE((*ev)[2].instant);
  // Other rows and names, and begin/end phases, are not instructions.
  auto other = parse_trace(
      "{\"traceEvents\":[{\"ph\":\"X\",\"name\":\"a2a d0\",\"pid\":0,\"tid\":2,\"ts\":1,"
      "\"dur\":2,\"args\":{\"step\":2}},{\"ph\":\"X\",\"name\":\"F0d0\",\"pid\":0,\"tid\":2,"
      "\"ts\":1,\"dur\":2,\"args\":{\"step\":2}},{\"ph\":\"X\",\"name\":\"Fwd\",\"pid\":0,"
      "\"tid\":0,\"ts\":1,\"dur\":2,\"args\":{\"step\":2}},{\"ph\":\"B\",\"name\":\"F0d0\","
      "\"pid\":0,\"tid\":0,\"ts\":1,\"args\":{\"step\":2}},{\"ph\":\"X\",\"name\":"
      "\"FB7d0,3d1\",\"pid\":0,\"tid\":0,\"ts\":1,\"dur\":2,\"args\":{\"step\":2}}]}",
      "other");
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  ASSERT_EQ(other->size(), 1u);
  EXPECT_EQ((*other)[0].name, "FB7d0,3d1");
  EXPECT_FALSE(read_trace((dir / "missing.json").string()).ok());
  EXPECT_FALSE(parse_trace("{\"traceEvents\":[{\"ph\":\"X\",\"name\":\"F0d0\"}]}", "x").ok());
  EXPECT_FALSE(parse_measured("{\"format\":\"other\"}", "x").ok());
  EXPECT_FALSE(parse_measured("{\"format\":\"fp8pipe-measured-costs\",\"schedule\":\"1f1b\","
                              "\"tokens_per_microbatch\":256,\"p2p_ms\":0,\"tail_ms\":-1,"
                              "\"stage_costs\":[{\"stage\":0,\"f_ms\":1}]}",
                              "x")
                   .ok());
}

}  // namespace
}  // namespace fp8pipe::parallel::sim
