// Tests of core/config: the presets load and validate, overrides reach every field type, parse
// errors carry file:line:col, and every validation rule fires with a message that names the field,
// the value and the rule (one table row, hence one test, per rule).
#include "core/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace fp8pipe {
namespace {

using config::Config;

std::string preset(const std::string& name) {
  return std::string(FP8PIPE_SOURCE_DIR) + "/configs/" + name + ".textproto";
}

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

Config tiny(std::vector<std::string> overrides = {}) {
  auto cfg = parse_config(preset("tiny"), overrides);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return cfg.ok() ? *cfg : Config();
}

// The message of a failed Status, or "" when it is ok.
std::string error_of(const Status& st) { return st.ok() ? std::string() : st.message(); }

TEST(ConfigPresets, EachPresetLoadsAndValidates) {
  for (const char* name : {"tiny", "small", "dsv3-671b-2048"}) {
    auto cfg = load_config(preset(name));
    ASSERT_TRUE(cfg.ok()) << name << ": " << cfg.status().to_string();
    const int world = cfg->parallel().pp() * cfg->parallel().dp();
    EXPECT_TRUE(validate(*cfg, world).ok()) << name << ": " << validate(*cfg, world).to_string();
  }
}

TEST(ConfigPresets, Dsv3MatchesTheTechnicalReport) {
  auto cfg = load_config(preset("dsv3-671b-2048"));
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  EXPECT_EQ(cfg->model().layers(), 61);
  EXPECT_EQ(cfg->model().moe().routed_experts(), 256);
  EXPECT_EQ(cfg->parallel().pp() * cfg->parallel().dp(), 2048);
  EXPECT_EQ(cfg->parallel().schedule(), "dualpipe");
  EXPECT_EQ(cfg->cluster().gpus(), 2048);
}

// The preset states DeepSeek-V3's 14.8T tokens; its steps are the fewest that reach them through
// the batch ramp.
TEST(ConfigPresets, Dsv3StepsReachItsTokens) {
  auto cfg = load_config(preset("dsv3-671b-2048"));
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  const int64_t T = cfg->train().seq_len(), steps = cfg->train().steps();
  EXPECT_EQ(cfg->train().tokens(), 14'800'000'000'000);
  auto plan = batch_plan(*cfg);
  ASSERT_TRUE(plan.ok());
  EXPECT_GE(plan->first_sample(steps) * T, 14'800'000'000'000);
  EXPECT_LT(plan->first_sample(steps - 1) * T, 14'800'000'000'000);
}

// train.tokens without train.steps (tiny with its steps line removed): 64-token sequences in
// batches of 32, and with a ramp 8 -> 32 by 8 over 4096 tokens, whose steps train 512, 512, 512,
// 1024, 1024, 1536, then 2048 tokens (5120 after six steps).
TEST(ConfigDefaults, TokensGiveTheStepsThroughTheBatchPlan) {
  std::ifstream in(preset("tiny"));
  std::string text, line;
  while (std::getline(in, line)) {
    if (line.find("steps: 300") == std::string::npos) text += line + "\n";
  }
  const std::string path = write_temp("tiny_no_steps.textproto", text);
  auto steps_for = [&](std::vector<std::string> o) {
    o.push_back("--optim.warmup_steps=1");
    auto cfg = load_config(path, o);
    EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
    return cfg.ok() ? cfg->train().steps() : -1;
  };
  EXPECT_EQ(steps_for({"--train.tokens=20480"}), 10);
  EXPECT_EQ(steps_for({"--train.tokens=20481"}), 11);
  const std::vector<std::string> ramp = {"--train.batch_ramp.start=8",
                                         "--train.batch_ramp.increment=8",
                                         "--train.batch_ramp.tokens=4096"};
  auto with = [&](std::string tokens) {
    auto o = ramp;
    o.push_back("--train.tokens=" + tokens);
    return steps_for(o);
  };
  EXPECT_EQ(with("5000"), 6);
  EXPECT_EQ(with("5120"), 6);
  EXPECT_EQ(with("5121"), 7);
  EXPECT_EQ(with("1"), 1);
  EXPECT_EQ(steps_for({"--train.tokens=20481", "--train.steps=3"}), 3) << "given steps win";
  auto none = load_config(path);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("or set train.tokens"), std::string::npos);
}

TEST(ConfigPresets, TinyRunsTheDesignDualPipeExample) {
  // DESIGN.md §7: mpirun -np 4 fp8pipe train configs/tiny.textproto --parallel.pp=4
  // --parallel.schedule=dualpipe --train.steps=20
  Config cfg = tiny({"--parallel.pp=4", "--parallel.schedule=dualpipe", "--train.steps=20"});
  EXPECT_TRUE(validate(cfg, 4).ok()) << validate(cfg, 4).to_string();
}

TEST(ConfigDefaults, ResolvedConfigShowsDefaultsAndDerivedFields) {
  Config cfg = tiny({"--parallel.microbatches=0", "--parallel.pp=2", "--parallel.schedule=zb1p"});
  EXPECT_EQ(cfg.parallel().microbatches(), 2);      // derived: pp for zb1p
  EXPECT_EQ(cfg.model().moe().max_nodes(), 2);      // set in the preset
  EXPECT_EQ(cfg.data().synthetic().seed(), 1234u);  // derived from train.seed
  const std::string text = to_text(cfg);
  EXPECT_NE(text.find("beta2: 0.95"), std::string::npos) << text;  // schema default, printed
  EXPECT_NE(text.find("on_nonfinite: \"halt\""), std::string::npos) << text;
  Config none;
  apply_defaults(none);
  EXPECT_EQ(none.model().moe().max_nodes(), 1);  // 0 -> n_groups (default 1)
  EXPECT_EQ(none.parallel().microbatches(), 1);
}

TEST(ConfigDefaults, ToTextRoundTrips) {
  Config cfg = tiny();
  auto again = parse_config_text(to_text(cfg), "roundtrip");
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(to_text(*again), to_text(cfg));
}

TEST(ConfigOverride, NestedIntFloatBoolEnumString) {
  Config cfg = tiny({"--model.moe.topk=1", "--optim.lr=3e-4", "--precision.pow2_scales=false",
                     "--precision.mode=bf16", "--parallel.schedule=DualPipe", "--train.steps", "20",
                     "--train.seed=18446744073709551615", "--checkpoint.dir=/tmp/x"});
  EXPECT_EQ(cfg.model().moe().topk(), 1);
  EXPECT_FLOAT_EQ(cfg.optim().lr(), 3e-4f);
  EXPECT_FALSE(cfg.precision().pow2_scales());
  EXPECT_EQ(cfg.precision().mode(), config::Precision::BF16);
  EXPECT_EQ(cfg.parallel().schedule(), "dualpipe");
  EXPECT_EQ(cfg.train().steps(), 20);
  EXPECT_EQ(cfg.train().seed(), 18446744073709551615ull);
  EXPECT_EQ(cfg.checkpoint().dir(), "/tmp/x");
}

TEST(ConfigOverride, ExactGemmAndFp8Mode) {
  Config cfg = tiny({"--precision.gemm=exact", "--precision.mode=FP8", "--model.attention=mha"});
  EXPECT_EQ(cfg.precision().gemm(), "exact");
  EXPECT_EQ(cfg.precision().mode(), config::Precision::FP8);
  EXPECT_EQ(cfg.model().attention(), config::Model::MHA);
  EXPECT_EQ(cfg.model().head_dim(), 16);  // derived hidden / heads
  EXPECT_TRUE(validate(cfg).ok()) << validate(cfg).to_string();
}

struct BadOverride {
  std::vector<std::string> args;
  std::vector<std::string> expect;  // substrings of the error
};

TEST(ConfigOverride, BadPathsAndValuesNameTheFieldAndChoices) {
  const std::vector<BadOverride> cases = {
      {{"--model.hiden=64"},
       {"unknown config field 'model.hiden'", "model has no field 'hiden'", "hidden, layers"}},
      {{"--modl.hidden=64"}, {"the top level has no field 'modl'", "model, parallel"}},
      {{"--model.moe=3"}, {"'model.moe' is a section", "routed_experts"}},
      {{"--model.hidden.x=3"}, {"'model.hidden' is a value"}},
      {{"--model.hidden=abc"}, {"--model.hidden=abc", "not a valid int32"}},
      {{"--model.hidden=99999999999"}, {"not a valid int32"}},
      {{"--train.steps=1.5"}, {"not a valid int64"}},
      {{"--optim.lr=fast"}, {"--optim.lr=fast", "not a finite number"}},
      {{"--optim.lr=nan"}, {"not a finite number"}},
      {{"--precision.pow2_scales=maybe"}, {"not a bool", "true|false"}},
      {{"--precision.mode=FP16"}, {"'FP16' is not a valid Mode", "FP8, BF16, FP32"}},
      {{"--parallel.schedule=gpipe"}, {"'gpipe'", "1f1b, zb1p, dualpipe, dualpipev"}},
      {{"--precision.gemm=slow"}, {"--precision.gemm=slow", "fast, exact"}},
      {{"--precision.attn_out_cache=fp16"}, {"'fp16' is not a valid choice", "bf16, e5m6, e4m3"}},
      {{"parallel.pp=2"}, {"unexpected argument 'parallel.pp=2'"}},
      {{"--train.steps"}, {"--train.steps needs a value"}},
  };
  for (const auto& c : cases) {
    Config cfg;
    const std::string err = error_of(apply_overrides(cfg, c.args));
    ASSERT_FALSE(err.empty()) << c.args[0];
    for (const auto& s : c.expect) EXPECT_NE(err.find(s), std::string::npos) << err;
  }
}

TEST(ConfigParse, SyntaxErrorGivesFileLineColumn) {
  const std::string path = write_temp("syntax.textproto", "model {\n  hidden: 64\n  layers 4\n}\n");
  auto cfg = parse_config(path);
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find(path + ":3:"), std::string::npos)
      << cfg.status().to_string();
}

TEST(ConfigParse, UnknownFieldIsAnErrorWithFileLineAndValidFields) {
  const std::string path =
      write_temp("unknown.textproto", "model {\n  hidden: 64\n  hiddn: 4\n}\n");
  auto cfg = parse_config(path);
  ASSERT_FALSE(cfg.ok());
  const std::string& msg = cfg.status().message();
  EXPECT_NE(msg.find(path + ":3:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("hiddn"), std::string::npos) << msg;
  EXPECT_NE(msg.find("valid fields: vocab_size, hidden"), std::string::npos) << msg;
}

TEST(ConfigParse, BadEnumAndMissingFile) {
  auto bad = parse_config_text("precision { mode: FP16 }", "x.textproto");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("x.textproto:1:"), std::string::npos);
  auto missing = parse_config("/nonexistent/cfg.textproto");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
}

TEST(ConfigValidate, ReportsEveryBrokenRuleAtOnce) {
  Config cfg = tiny({"--model.hidden=0", "--train.steps=0"});
  const std::string err = error_of(validate(cfg));
  EXPECT_NE(err.find("2 config errors"), std::string::npos) << err;
  EXPECT_NE(err.find("model.hidden=0 must be > 0"), std::string::npos) << err;
  EXPECT_NE(err.find("train.steps=0 must be > 0"), std::string::npos) << err;
}

// One row per validation rule: start from a valid preset, break one rule, check the message.
struct Rule {
  std::string name;
  std::vector<std::string> overrides;
  std::vector<std::string> expect;
  std::string base = "tiny";
  int world = 0;
  std::function<void(Config&)> mutate = nullptr;  // for values the override parser refuses
};

std::vector<Rule> rules() {
  auto set = [](auto fn) { return std::function<void(Config&)>(fn); };
  return {
      // model
      {"VocabPositive", {"--model.vocab_size=0"}, {"model.vocab_size=0 must be > 0"}},
      {"HiddenPositive", {"--model.hidden=0"}, {"model.hidden=0 must be > 0"}},
      {"LayersPositive", {"--model.layers=0", "--model.dense_layers=0"}, {"model.layers=0"}},
      {"HeadsPositive", {"--model.heads=0"}, {"model.heads=0 must be > 0"}},
      {"DenseLayersRange", {"--model.dense_layers=5"}, {"model.dense_layers=5", "model.layers=4"}},
      {"FfnHiddenForDense", {"--model.ffn_hidden=0"}, {"model.ffn_hidden=0", "dense_layers=1"}},
      {"MhaHeadDim",
       {"--model.attention=MHA", "--model.heads=3"},
       {"model.head_dim=0 must be > 0 for attention MHA", "model.hidden=64", "model.heads=3"}},
      {"MhaHeadDimEven", {"--model.attention=MHA", "--model.head_dim=15"}, {"head_dim=15", "even"}},
      {"MlaQLoraRank", {"--model.mla.q_lora_rank=-1"}, {"model.mla.q_lora_rank=-1 must be >= 0"}},
      {"MlaKvLoraRank", {"--model.mla.kv_lora_rank=0"}, {"model.mla.kv_lora_rank=0 must be > 0"}},
      {"MlaQkNope", {"--model.mla.qk_nope_head_dim=0"}, {"model.mla.qk_nope_head_dim=0"}},
      {"MlaVHeadDim", {"--model.mla.v_head_dim=0"}, {"model.mla.v_head_dim=0 must be > 0"}},
      {"MlaRopeEven", {"--model.mla.qk_rope_head_dim=7"}, {"qk_rope_head_dim=7", "even"}},
      {"MoeNeededForMoeBlocks",
       {"--model.moe.routed_experts=0"},
       {"model.moe.routed_experts=0 must be > 0", "blocks 1..3 are MoE"}},
      {"MtpDepth", {"--model.mtp_depth=-1"}, {"model.mtp_depth=-1 must be >= 0"}},
      {"MtpLambda", {"--model.mtp_lambda=-0.5"}, {"model.mtp_lambda=-0.5 must be >= 0"}},
      {"RopeTheta", {"--model.rope_theta=0"}, {"model.rope_theta=0 must be > 0"}},
      {"YarnFactor",
       {"--model.rope_scaling.factor=0.5"},
       {"model.rope_scaling.factor=0.5 must be >= 1"}},
      {"YarnNeedsOriginalContext",
       {"--model.rope_scaling.factor=4"},
       {"model.rope_scaling.original_max_position=0 must be > 0 with factor 4"}},
      {"YarnBetas",
       {"--model.rope_scaling.factor=4", "--model.rope_scaling.original_max_position=64",
        "--model.rope_scaling.beta_fast=0.5"},
       {"model.rope_scaling.beta_fast=0.5 and beta_slow=1", "beta_fast > beta_slow > 0"}},
      {"YarnContextTurnsBetaSlow",
       {"--model.rope_scaling.factor=4", "--model.rope_scaling.original_max_position=6"},
       {"model.rope_scaling.original_max_position=6 must exceed 2π·beta_slow = 6.283"}},
      {"YarnMscale",
       {"--model.rope_scaling.factor=4", "--model.rope_scaling.original_max_position=64",
        "--model.rope_scaling.mscale_all_dim=-1"},
       {"model.rope_scaling.mscale_all_dim=-1 must be >= 0"}},
      {"NormEps", {"--model.norm_eps=0"}, {"model.norm_eps=0 must be > 0"}},
      {"InitStd", {"--model.init_std=0"}, {"model.init_std=0 must be > 0"}},
      // model.moe
      {"RoutedExpertsNonNegative", {"--model.moe.routed_experts=-8"}, {"routed_experts=-8"}},
      {"TopkRange", {"--model.moe.topk=9"}, {"model.moe.topk=9 must be in [1, model.moe.routed"}},
      {"SharedExperts", {"--model.moe.shared_experts=-1"}, {"model.moe.shared_experts=-1"}},
      {"ExpertHidden", {"--model.moe.expert_hidden=0"}, {"model.moe.expert_hidden=0 must be > 0"}},
      {"GroupsDivideExperts",
       {"--model.moe.n_groups=3"},
       {"model.moe.n_groups=3 must divide model.moe.routed_experts=8 (valid: 1, 2, 4, 8)"}},
      {"MaxNodesRange", {"--model.moe.max_nodes=5"}, {"max_nodes=5 must be in [1, model.moe.n_"}},
      {"TopkDivisibleByMaxNodes",
       {"--model.moe.topk=3"},
       {"model.moe.topk=3 must be divisible by model.moe.max_nodes=2", "valid max_nodes: 1, 3"}},
      {"TopkReachable",
       {"--model.moe.n_groups=8", "--model.moe.max_nodes=1"},
       {"model.moe.topk=2 exceeds the 1 experts in model.moe.max_nodes=1 groups"}},
      {"RouteScale", {"--model.moe.route_scale=0"}, {"model.moe.route_scale=0 must be > 0"}},
      {"BiasUpdateRate", {"--model.moe.bias_update_rate=-1"}, {"bias_update_rate=-1 must be >="}},
      {"SeqAuxAlpha", {"--model.moe.seq_aux_alpha=-1"}, {"seq_aux_alpha=-1 must be >= 0"}},
      {"CapacityFactor", {"--model.moe.capacity_factor=0.5"}, {"capacity_factor=0.5", "or >= 1"}},
      // parallel
      {"PpPositive", {"--parallel.pp=0"}, {"parallel.pp=0 must be >= 1"}},
      {"DpPositive", {"--parallel.dp=0"}, {"parallel.dp=0 must be >= 1"}},
      {"EpPositive", {"--parallel.ep=0"}, {"parallel.ep=0 must be >= 1"}},
      {"RanksPerNode", {"--parallel.ranks_per_node=-1"}, {"parallel.ranks_per_node=-1"}},
      {"ScheduleChoice",
       {},
       {"parallel.schedule=\"gpipe\" is not a valid choice", "1f1b, zb1p, dualpipe, dualpipev"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_parallel()->set_schedule("gpipe"); })},
      {"EpDispatchChoice",
       {},
       {"parallel.ep_dispatch=\"tree\"", "flat, two_level"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_parallel()->set_ep_dispatch("tree"); })},
      {"MicrobatchesPositive", {"--parallel.microbatches=-1"}, {"microbatches=-1 must be >= 1"}},
      {"DpDivisibleByEp",
       {"--parallel.dp=3", "--parallel.ep=2"},
       {"parallel.dp=3 must be divisible by parallel.ep=2 (valid ep for dp=3: 1, 3)"}},
      {"DualPipeEvenPp",
       {"--parallel.pp=3", "--parallel.schedule=dualpipe"},
       {"parallel.pp=3 must be even for schedule dualpipe"}},
      {"DualPipeEvenMicrobatches",
       {"--parallel.pp=2", "--parallel.schedule=dualpipe", "--parallel.microbatches=5"},
       {"parallel.microbatches=5 must be even for schedule dualpipe"}},
      {"DualPipeMicrobatches",
       {"--parallel.pp=4", "--parallel.schedule=dualpipe", "--parallel.microbatches=6"},
       {"parallel.microbatches=6 must be >= 2·parallel.pp = 8 for schedule dualpipe"}},
      {"DualPipeVMicrobatches",
       {"--parallel.pp=2", "--parallel.schedule=dualpipev", "--parallel.microbatches=3"},
       {"parallel.microbatches=3 must be >= 2·parallel.pp = 4 for schedule dualpipev"}},
      {"OneFOneBMicrobatches",
       {"--parallel.pp=4", "--parallel.microbatches=2"},
       {"parallel.microbatches=2 must be >= parallel.pp=4 for schedule 1f1b"}},
      // precision
      {"GemmChoice", {}, {"precision.gemm=\"slow\"", "fast, exact"}, "tiny", 0, set([](Config& c) {
         c.mutable_precision()->set_gemm("slow");
       })},
      {"ActGranularityChoice",
       {},
       {"precision.act_granularity=\"128x128\"", "1x128, tensor"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_precision()->set_act_granularity("128x128"); })},
      {"WeightGranularityChoice",
       {},
       {"precision.weight_granularity=\"1x32\"", "128x128, 1x128"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_precision()->set_weight_granularity("1x32"); })},
      {"AttnOutCacheChoice",
       {},
       {"precision.attn_out_cache=\"fp16\"", "bf16, e5m6, e4m3"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_precision()->set_attn_out_cache("fp16"); })},
      {"AttnOutCacheE4m3NeedsFp8",
       {"--precision.mode=BF16", "--precision.attn_out_cache=e4m3"},
       {"precision.attn_out_cache=\"e4m3\"", "precision.mode=FP8", "got BF16", "bf16, e5m6"}},
      // train
      {"StepsPositive", {"--train.steps=0"}, {"train.steps=0 must be > 0"}},
      {"SeqLenPositive", {"--train.seq_len=0"}, {"train.seq_len=0 must be > 0"}},
      {"GlobalBatchPositive", {"--train.global_batch=0"}, {"train.global_batch=0 must be > 0"}},
      {"GradClip", {"--train.grad_clip=-1"}, {"train.grad_clip=-1 must be >= 0"}},
      {"EvalEvery", {"--train.eval_every=-1"}, {"train.eval_every=-1 must be >= 0"}},
      {"EvalBatches", {"--train.eval_batches=0"}, {"train.eval_batches=0 must be > 0"}},
      // optim
      {"LrPositive", {"--optim.lr=0"}, {"optim.lr=0 must be > 0"}},
      {"MinLrRange", {"--optim.min_lr=0.01"}, {"optim.min_lr=0.01 must be in [0, optim.lr=0.002]"}},
      {"WarmupSteps", {"--optim.warmup_steps=-1"}, {"optim.warmup_steps=-1 must be >= 0"}},
      {"WarmupLongerThanCosine",
       {"--train.steps=4"},
       {"optim.warmup_steps=20 exceeds the cosine schedule's length 4"}},
      {"LrScheduleChoice",
       {},
       {"optim.schedule=\"linear\"", "cosine, step, constant"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_optim()->set_schedule("linear"); })},
      {"DecaySteps", {"--optim.decay_steps=-1"}, {"optim.decay_steps=-1 must be >= 0"}},
      {"StepEvery", {"--optim.schedule=step"}, {"optim.step_every=0 must be > 0", "=step"}},
      {"StepGamma", {"--optim.step_gamma=0"}, {"optim.step_gamma=0 must be in (0, 1]"}},
      {"Beta1", {"--optim.beta1=1"}, {"optim.beta1=1 must be in [0, 1)"}},
      {"Beta2", {"--optim.beta2=-0.1"}, {"optim.beta2=-0.1 must be in [0, 1)"}},
      {"Eps", {"--optim.eps=0"}, {"optim.eps=0 must be > 0"}},
      {"WeightDecay", {"--optim.weight_decay=-1"}, {"optim.weight_decay=-1 must be >= 0"}},
      // data
      {"SourceChoice",
       {},
       {"data.source=\"web\"", "synthetic, tokens, megatron"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_data()->set_source("web"); })},
      {"PathForFileSources", {"--data.source=megatron"}, {"data.path is empty", "megatron"}},
      {"TokenDtypeChoice",
       {},
       {"data.token_dtype=\"int8\"", "uint16, uint32"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_data()->set_token_dtype("int8"); })},
      {"SyntheticOrder", {"--data.synthetic.order=0"}, {"data.synthetic.order=0 must be >= 1"}},
      {"SyntheticBranching", {"--data.synthetic.branching=0"}, {"branching=0 must be >= 1"}},
      {"HeldoutFraction", {"--data.heldout_fraction=1"}, {"data.heldout_fraction=1 must be in"}},
      // checkpoint
      {"CheckpointEvery", {"--checkpoint.every=-1"}, {"checkpoint.every=-1 must be >= 0"}},
      {"KeepLast", {"--checkpoint.keep_last=-1"}, {"checkpoint.keep_last=-1 must be >= 0"}},
      {"KeepEveryNonNegative", {"--checkpoint.keep_every=-1"}, {"keep_every=-1 must be >= 0"}},
      {"EveryNeedsDir", {"--checkpoint.dir="}, {"checkpoint.every=100 needs checkpoint.dir"}},
      {"KeepEveryMultiple",
       {"--checkpoint.keep_every=150"},
       {"checkpoint.keep_every=150 must be a multiple of checkpoint.every=100"}},
      {"Resume", {"--checkpoint.resume="}, {"checkpoint.resume is empty", "auto, none"}},
      // log
      {"LogEvery", {"--log.every=0"}, {"log.every=0 must be >= 1"}},
      {"TraceStart", {"--log.trace_start=-1"}, {"log.trace_start=-1 must be >= 0"}},
      {"TraceSteps", {"--log.trace_steps=0"}, {"log.trace_steps=0 must be >= 1"}},
      // cluster (from the DeepSeek-V3 preset, which describes one)
      {"ClusterGpus", {"--cluster.gpus=-1"}, {"cluster.gpus=-1 must be >= 0"}},
      {"GpusPerNode",
       {"--cluster.gpus_per_node=3"},
       {"cluster.gpus=2048 must be a multiple of cluster.gpus_per_node=3"},
       "dsv3-671b-2048"},
      {"PeakFp8",
       {"--cluster.peak_fp8_tflops=0"},
       {"peak_fp8_tflops=0 must be > 0"},
       "dsv3-671b-2048"},
      {"PeakBf16",
       {"--cluster.peak_bf16_tflops=0"},
       {"peak_bf16_tflops=0 must be > 0"},
       "dsv3-671b-2048"},
      {"HbmGbps", {"--cluster.hbm_gbps=0"}, {"cluster.hbm_gbps=0 must be > 0"}, "dsv3-671b-2048"},
      {"HbmGib", {"--cluster.hbm_gib=0"}, {"cluster.hbm_gib=0 must be > 0"}, "dsv3-671b-2048"},
      {"NvlinkGbps", {"--cluster.nvlink_gbps=0"}, {"nvlink_gbps=0 must be > 0"}, "dsv3-671b-2048"},
      {"NetGbps",
       {"--cluster.net_gbps_per_gpu=0"},
       {"net_gbps_per_gpu=0 must be > 0"},
       "dsv3-671b-2048"},
      {"NetLatency",
       {"--cluster.net_latency_us=-1"},
       {"net_latency_us=-1 must be >= 0"},
       "dsv3-671b-2048"},
      {"NvlinkLatency",
       {"--cluster.nvlink_latency_us=-1"},
       {"nvlink_latency_us=-1 must be >="},
       "dsv3-671b-2048"},
      {"TotalSms",
       {"--cluster.total_sms=0"},
       {"cluster.total_sms=0 must be > 0"},
       "dsv3-671b-2048"},
      {"CommSms",
       {"--cluster.comm_sms=132"},
       {"cluster.comm_sms=132 must be in [0, cluster.to"},
       "dsv3-671b-2048"},
      // fault
      {"Timeout", {"--fault.timeout_s=0"}, {"fault.timeout_s=0 must be > 0"}},
      {"OnNonfiniteChoice",
       {},
       {"fault.on_nonfinite=\"retry\"", "halt, skip"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_fault()->set_on_nonfinite("retry"); })},
      {"MaxSkips", {"--fault.max_skips=-1"}, {"fault.max_skips=-1 must be >= 0"}},
      {"Walltime", {"--fault.walltime_s=-1"}, {"fault.walltime_s=-1 must be >= 0"}},
      // train.device
      {"DeviceChoice",
       {},
       {"train.device=\"tpu\" is not a valid choice", "cpu, cuda"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_train()->set_device("tpu"); })},
#ifndef FP8PIPE_HAVE_CUDA
      {"DeviceCudaNeedsCudaBuild",
       {"--train.device=cuda"},
       {"train.device=\"cuda\" needs a build with CUDA", "-DFP8PIPE_CUDA=ON"}},
#endif
      {"CommBackendChoice",
       {},
       {"parallel.comm_backend=\"gloo\" is not a valid choice", "mpi, nccl"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_parallel()->set_comm_backend("gloo"); })},
      {"NcclNeedsCuda",
       {"--parallel.comm_backend=nccl"},
       {"parallel.comm_backend=\"nccl\" needs train.device=\"cuda\" (got \"cpu\")"}},
      // cross-section
      {"ExpertsDivisibleByEp",
       {"--parallel.dp=6", "--parallel.ep=3", "--train.global_batch=48"},
       {"model.moe.routed_experts=8 must be divisible by parallel.ep=3 (valid ep: 1, 2)"}},
      {"GroupsWithinNodes",
       {"--parallel.dp=8", "--parallel.ep=8", "--parallel.ranks_per_node=1",
        "--model.moe.n_groups=4", "--model.moe.max_nodes=2"},
       {"model.moe.n_groups=4 must be a multiple of the 8 nodes one ep group spans"},
       "tiny",
       8},
      {"LayersPerStage",
       {"--parallel.pp=2", "--parallel.schedule=dualpipev", "--model.layers=3"},
       {"model.layers=3 must be >= the 4 pipeline stages of schedule dualpipev"}},
      {"WorldSize",
       {"--parallel.dp=2"},
       {"parallel.pp·parallel.dp = 1·2 = 2 must equal the world size 8", "pp=2 dp=4"},
       "tiny",
       8},
      {"ClusterGpusMatchLayout",
       {"--parallel.dp=64"},
       {"cluster.gpus=2048 must equal parallel.pp·parallel.dp = 16·64 = 1024"},
       "dsv3-671b-2048"},
      {"RanksPerNodeMatchesCluster",
       {"--parallel.ranks_per_node=4"},
       {"parallel.ranks_per_node=4 must equal cluster.gpus_per_node=8"},
       "dsv3-671b-2048"},
      {"GlobalBatchDivisible",
       {"--train.global_batch=30"},
       {"train.global_batch=30 must be divisible by parallel.dp·parallel.microbatches = 1·8 = 8",
        "nearest valid: 24, 32"}},
      {"SeqLenCoversMtp",
       {"--train.seq_len=2"},
       {"train.seq_len=2 must be > model.mtp_depth+1 = 2"}},
      {"TokenDtypeHoldsVocab",
       {"--data.token_dtype=uint16"},
       {"data.token_dtype=uint16 cannot hold model.vocab_size=129280"},
       "dsv3-671b-2048"},
      {"BranchingWithinVocab",
       {"--data.synthetic.branching=300"},
       {"data.synthetic.branching=300 must be <= model.vocab_size=256"}},
      // train.batch_ramp (tiny: global_batch 32 in 8 micro-batches, so one micro-batch is 4)
      {"RampStartBelowBatch",
       {"--train.batch_ramp.start=32", "--train.batch_ramp.increment=4",
        "--train.batch_ramp.tokens=4096"},
       {"train.batch_ramp {start: 32 increment: 4 tokens: 4096}: start must be in [1, "
        "train.global_batch=32)"}},
      {"RampNeedsStart",
       {"--train.batch_ramp.increment=4", "--train.batch_ramp.tokens=4096"},
       {"train.batch_ramp {start: 0 increment: 4 tokens: 4096}: start must be in [1"}},
      {"RampIncrementDivides",
       {"--train.batch_ramp.start=8", "--train.batch_ramp.increment=5",
        "--train.batch_ramp.tokens=4096"},
       {"increment must be > 0 and divide train.global_batch - start = 24"}},
      {"RampTokensCoverASequence",
       {"--train.batch_ramp.start=8", "--train.batch_ramp.increment=8",
        "--train.batch_ramp.tokens=10"},
       {"tokens must be >= train.seq_len=64"}},
      {"RampInWholeMicroBatches",
       {"--train.batch_ramp.start=6", "--train.batch_ramp.increment=2",
        "--train.batch_ramp.tokens=4096"},
       {"start and increment must be multiples of parallel.dp · micro-batch size = 4",
        "32 / (1 · 8)"}},
      {"RampStepsSuitTheSchedule",
       {"--parallel.pp=2", "--parallel.schedule=dualpipe", "--train.batch_ramp.start=4",
        "--train.batch_ramp.increment=4", "--train.batch_ramp.tokens=4096"},
       {"a step of 4 sequences runs 1 micro-batches per pipeline, which schedule dualpipe with "
        "parallel.pp=2 cannot run (it needs >= 4, even)"}},
      {"RampRisesKeepDualPipeEven",
       {"--parallel.pp=2", "--parallel.schedule=dualpipe", "--train.batch_ramp.start=16",
        "--train.batch_ramp.increment=4", "--train.batch_ramp.tokens=4096"},
       {"a step of 20 sequences runs 5 micro-batches per pipeline", "(it needs >= 4, even)"}},
      {"RampTableBounded",
       {"--train.global_batch=8", "--parallel.microbatches=8", "--train.batch_ramp.start=1",
        "--train.batch_ramp.increment=7", "--train.batch_ramp.tokens=300000000000"},
       {"train.batch_ramp {start: 1 increment: 7 tokens: 300000000000}: batch ramp:",
        "steps (at most 4194304)"}},
      // optim.phase
      {"PhasesNeedTheirSchedule",
       {},
       {"optim.phase has 1 phases but optim.schedule=cosine"},
       "tiny",
       0,
       set([](Config& c) { c.mutable_optim()->add_phase()->set_until_tokens(100); })},
      {"PhasesNeedAPhase",
       {"--optim.schedule=phases"},
       {"optim.schedule=phases needs at least one optim.phase"}},
      {"PhasesInOrder",
       {"--optim.schedule=phases"},
       {"optim.phase[1].until_tokens=50 must be > 100"},
       "tiny",
       0,
       set([](Config& c) {
         c.mutable_optim()->add_phase()->set_until_tokens(100);
         c.mutable_optim()->add_phase()->set_until_tokens(50);
       })},
      {"PhaseShapeChoice",
       {"--optim.schedule=phases"},
       {"optim.phase[0].shape=\"step\" (valid: constant, linear, cosine)"},
       "tiny",
       0,
       set([](Config& c) {
         auto* p = c.mutable_optim()->add_phase();
         p->set_until_tokens(100);
         p->set_shape("step");
       })},
      {"CosinePhaseNeedsItsEnd",
       {"--optim.schedule=phases"},
       {"optim.phase[0] (shape cosine) needs lr, the rate it ends at"},
       "tiny",
       0,
       set([](Config& c) {
         auto* p = c.mutable_optim()->add_phase();
         p->set_until_tokens(100);
         p->set_shape("cosine");
       })},
      // switches
      {"LambdaSwitchTokens",
       {"--model.mtp_lambda_after.tokens=-1"},
       {"model.mtp_lambda_after.tokens=-1 must be >= 0"}},
      {"GammaSwitchValue",
       {"--model.moe.bias_update_rate_after.value=-0.5"},
       {"model.moe.bias_update_rate_after.value=-0.5 must be >= 0"}},
      {"EvalNeedsHeldout",
       {"--data.source=tokens", "--data.path=x.bin", "--data.heldout_fraction=0"},
       {"train.eval_every=100 needs held-out data but data.heldout_fraction=0"}},
  };
}

void PrintTo(const Rule& r, std::ostream* os) { *os << r.name; }

class ConfigRule : public ::testing::TestWithParam<Rule> {};

TEST_P(ConfigRule, BreakingItNamesFieldValueAndRule) {
  const Rule& r = GetParam();
  auto cfg = parse_config(preset(r.base), r.overrides);
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  if (r.mutate) r.mutate(*cfg);
  const std::string err = error_of(validate(*cfg, r.world));
  ASSERT_FALSE(err.empty()) << r.name << " did not fire";
  for (const auto& s : r.expect) EXPECT_NE(err.find(s), std::string::npos) << err;
}

INSTANTIATE_TEST_SUITE_P(All, ConfigRule, ::testing::ValuesIn(rules()),
                         [](const ::testing::TestParamInfo<Rule>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace fp8pipe
