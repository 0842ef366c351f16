// `fp8pipe train --dry-run` (launch/dry_run.h): the report for every rank of a layout, checked
// against facts derived here by hand from the design (DualPipe's rank r holds stages r and
// pp-1-r; an even block split; ep shards of E/ep experts), and refusals of bad layouts.
#include "launch/dry_run.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <regex>
#include <string>
#include <vector>

namespace fp8pipe {
namespace {

config::Config tiny(std::vector<std::string> overrides) {
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto", overrides);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return cfg.ok() ? *cfg : config::Config();
}

bool has(const std::string& text, const std::string& line) {
  return text.find(line) != std::string::npos;
}

TEST(DryRun, DualPipeLayoutStagesExpertsAndSchedule) {
  // tiny: 4 layers (1 dense), 8 routed experts, MTP depth 1
  const config::Config cfg = tiny({"--parallel.pp=2", "--parallel.dp=2", "--parallel.ep=2",
                                   "--parallel.schedule=dualpipe", "--parallel.microbatches=8"});
  auto r = dry_run_report(cfg, 4);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const std::string& t = *r;
  EXPECT_TRUE(has(t, "4 ranks = pp 2 x dp 2, ep 2")) << t;
  EXPECT_TRUE(has(t, "stage 0: embed + blocks 0-1 (1 dense, 1 MoE)")) << t;
  EXPECT_TRUE(has(t, "stage 1: blocks 2-3 (0 dense, 2 MoE) + norm + head + 1 MTP")) << t;
  // rank = stage * dp + dp_index here (pp outermost); DualPipe: local chunk 0 runs the rank's
  // stage, chunk 1 the mirrored one; ep shard = dp_index % ep
  EXPECT_TRUE(has(t, "rank 0: stage 0, stage 1; experts 0-3 of 8")) << t;
  EXPECT_TRUE(has(t, "rank 1: stage 0, stage 1; experts 4-7 of 8")) << t;
  EXPECT_TRUE(has(t, "rank 2: stage 1, stage 0; experts 0-3 of 8")) << t;
  EXPECT_TRUE(has(t, "rank 3: stage 1, stage 0; experts 4-7 of 8")) << t;
  // every micro-batch of both directions passes each pipeline rank once forward and once
  // backward: F + FB = B + B(input) + FB = 8 per rank (4 per direction, 2 directions)
  const std::regex counts(R"(pipeline rank (\d): (\d+) instructions: (\d+) F, (\d+) B, (\d+) )"
                          R"(B\(input\), (\d+) W, (\d+) FB, (\d+) send, (\d+) recv)");
  int ranks = 0;
  for (std::sregex_iterator it(t.begin(), t.end(), counts), end; it != end; ++it, ++ranks) {
    const auto& m = *it;
    auto n = [&](int i) { return std::stoi(m[i].str()); };
    EXPECT_EQ(n(3) + n(7), 8) << m.str();
    EXPECT_EQ(n(4) + n(5) + n(7), 8) << m.str();
    EXPECT_EQ(n(5), n(6)) << "each deferred B has its W: " << m.str();
    EXPECT_EQ(n(2), n(3) + n(4) + n(5) + n(6) + n(7) + n(8) + n(9)) << m.str();
  }
  EXPECT_EQ(ranks, 2) << t;
  EXPECT_TRUE(has(t, "no device was touched")) << t;
}

TEST(DryRun, TwoNodesAndOneProcess) {
  auto two = dry_run_report(tiny({"--parallel.pp=2", "--parallel.dp=2",
                                  "--parallel.ranks_per_node=2", "--parallel.schedule=1f1b"}),
                            4);
  ASSERT_TRUE(two.ok()) << two.status().to_string();
  EXPECT_TRUE(has(*two, "2 rank(s) per node (2 node(s))")) << *two;
  EXPECT_TRUE(has(*two, "rank 3: stage 1; experts 0-7 of 8")) << *two;  // ep = 1: all experts
  auto one = dry_run_report(tiny({}), 0);
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_TRUE(has(*one, "stage 0: embed + blocks 0-3 (1 dense, 3 MoE) + norm + head + 1 MTP"))
      << *one;
}

// tiny's 32 sequences in micro-batches of 2 per replica (pp 2 x dp 2, 8 each) ramping from 16 by
// 8 over 768 tokens of 16: Megatron's rule gives steps of 16, 16, 24, then 32 sequences, that is
// 4, 4, 6 and 8 micro-batches per replica; 300 steps then train (16 + 16 + 24 + 297 x 32) x 16.
TEST(DryRun, BatchRampListsEachSizeAndTheRunsTokens) {
  auto r =
      dry_run_report(tiny({"--parallel.pp=2", "--parallel.dp=2", "--parallel.schedule=dualpipev",
                           "--train.seq_len=16", "--train.batch_ramp.start=16",
                           "--train.batch_ramp.increment=8", "--train.batch_ramp.tokens=768"}),
                     4);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_TRUE(has(*r, "3 steps below the global batch, 896 tokens")) << *r;
  EXPECT_TRUE(has(*r, "from step 1: 16 sequences, 4 micro-batches per replica")) << *r;
  EXPECT_TRUE(has(*r, "from step 3: 24 sequences, 6 micro-batches per replica")) << *r;
  EXPECT_TRUE(has(*r, "from step 4: 32 sequences, 8 micro-batches per replica")) << *r;
  EXPECT_TRUE(has(*r, fmt::format("train.steps=300 train {} tokens", (56 + 297 * 32) * 16))) << *r;
}

// DeepSeek-V3's YaRN on tiny's 8 RoPE dims would be one pair; with a 64-dim RoPE head (as
// DeepSeek-V3's) the pairs split 11 kept, 12 blended, 9 divided (Rope.YarnMatchesDeepSeekV3sRamp-
// ByHand counts them from the turn counts); the logits' factor is (0.1 ln 40 + 1)^2.
TEST(DryRun, YarnAndInitFromAreListed) {
  auto r =
      dry_run_report(tiny({"--model.mla.qk_rope_head_dim=64", "--model.rope_scaling.factor=40",
                           "--model.rope_scaling.original_max_position=4096", "--train.seq_len=128",
                           "--checkpoint.init_from=runs/pretrain/ckpt"}),
                     1);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_TRUE(has(*r,
                  "YaRN factor 40 over 4096 positions (train.seq_len 128): of 32 RoPE pairs "
                  "11 keep their frequency, 9 are divided by 40, 12 blend; attention logits "
                  "x 1.8739"))
      << *r;
  EXPECT_TRUE(has(*r, "init: the weights of runs/pretrain/ckpt at step 0")) << *r;
  auto plain = dry_run_report(tiny({}), 1);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(has(*plain, "YaRN")) << *plain;
  EXPECT_FALSE(has(*plain, "init:")) << *plain;
}

TEST(DryRun, RefusesAWorldThatDoesNotFitTheLayout) {
  auto r = dry_run_report(tiny({"--parallel.pp=2", "--parallel.dp=2"}), 6);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r.status().to_string(), "6 ranks were started")) << r.status().to_string();
}

}  // namespace
}  // namespace fp8pipe
