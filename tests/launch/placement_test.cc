// optim.placement=device against the host optimizer, on the CPU backend (the code path a GPU
// takes: fp64 gradient sums in Param::grad_acc_dev, the norm from Backend::sum_squares, AdamW from
// Backend::adamw). On the CPU both placements must give the same bits: losses, gradient norms and
// final weights, and checkpoints written by one must resume in the other exactly.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "core/config.h"
#include "launch/trainer.h"
#include "tests/launch/short_run.h"

namespace fp8pipe {
namespace {

using testutil::make_trainer;
using testutil::tiny_short;

struct Trace {
  std::vector<double> loss, norm;
  std::map<std::string, std::vector<float>> params;  // final weights and router biases
};

Trace finish(Trainer& t, int steps, Trace r = {}) {
  for (int s = 0; s < steps; ++s) {
    auto st = t.train_step();
    EXPECT_TRUE(st.ok()) << st.status().to_string();
    if (!st.ok()) return r;
    r.loss.push_back(st->loss.total);
    r.norm.push_back(st->grad_norm);
  }
  auto grab = [&](const model::Param& p) {
    const float* v = p.value.data_as<float>();
    r.params[p.name].assign(v, v + p.value.numel());
  };
  std::map<std::string, int> seen;  // a second local copy is "name#1"
  for (auto* p : t.params()) {
    const int k = seen[p->name]++;
    const float* v = p->value.data_as<float>();
    r.params[k ? p->name + "#" + std::to_string(k) : p->name].assign(v, v + p->value.numel());
  }
  for (auto* moe : t.model().moes()) grab(moe->bias());
  return r;
}

bool on_device(Trainer& t) {  // the device path really ran: the fp64 sums live in tensors
  for (auto* p : t.params())
    if (!p->grad_acc_dev.defined()) return false;
  return true;
}

void expect_same(const Trace& a, const Trace& b) {
  ASSERT_EQ(a.loss.size(), b.loss.size());
  for (size_t i = 0; i < a.loss.size(); ++i) {
    EXPECT_EQ(a.loss[i], b.loss[i]) << "step " << i + 1;
    EXPECT_EQ(a.norm[i], b.norm[i]) << "step " << i + 1;
  }
  ASSERT_EQ(a.params.size(), b.params.size());
  for (const auto& [name, v] : a.params) {
    const auto& w = b.params.at(name);
    ASSERT_EQ(v.size(), w.size()) << name;
    EXPECT_EQ(std::memcmp(v.data(), w.data(), v.size() * sizeof(float)), 0) << name;
  }
}

TEST(Placement, DeviceGivesTheHostBits) {
  for (const char* precision : {"FP32", "FP8"}) {
    SCOPED_TRACE(precision);
    const std::string prec = std::string("--precision.mode=") + precision;
    auto host = make_trainer(tiny_short({prec, "--optim.placement=host"}));
    auto dev = make_trainer(tiny_short({prec, "--optim.placement=device"}));
    ASSERT_TRUE(host && dev);
    EXPECT_FALSE(on_device(*host));
    EXPECT_TRUE(on_device(*dev));
    const Trace a = finish(*host, 4), b = finish(*dev, 4);
    EXPECT_GT(a.loss.front() - a.loss.back(), 0.0);  // it trains: the comparison is not idle
    expect_same(a, b);
  }
}

// A checkpoint after 2 steps under one placement, resumed for 2 more under the other, ends with
// the bits of 4 uninterrupted host steps.
TEST(Placement, CheckpointsResumeAcrossPlacements) {
  const Trace whole = finish(*make_trainer(tiny_short({"--optim.placement=host"})), 4);
  for (auto [first, second] : {std::pair{"device", "host"}, std::pair{"host", "device"}}) {
    SCOPED_TRACE(std::string(first) + " -> " + second);
    const std::string dir = ::testing::TempDir() + "placement_ckpt_" + first;
    std::filesystem::remove_all(dir);
    auto a = make_trainer(
        tiny_short({std::string("--optim.placement=") + first, "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(a);
    Trace r = finish(*a, 2);
    ASSERT_TRUE(a->save_checkpoint().ok());
    ASSERT_TRUE(a->finish_checkpoints().ok());
    auto b = make_trainer(
        tiny_short({std::string("--optim.placement=") + second, "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(b);
    const Status resumed = b->resume(ResumeOptions{});
    ASSERT_TRUE(resumed.ok()) << resumed.to_string();
    ASSERT_EQ(b->step(), 2);
    r.params.clear();
    expect_same(whole, finish(*b, 2, r));
    std::filesystem::remove_all(dir);
  }
}

// dualpipev on one rank holds "embed.weight" in both chunks: the device path sums the two copies
// on the backend (parallel::DeviceNameSync) and keeps them equal, with the host path's bits.
TEST(Placement, TwoCopiesOfAParameterOnTheDevice) {
  auto host = make_trainer(tiny_short({"--optim.placement=host", "--parallel.schedule=dualpipev"}));
  auto dev =
      make_trainer(tiny_short({"--optim.placement=device", "--parallel.schedule=dualpipev"}));
  ASSERT_TRUE(host && dev);
  EXPECT_TRUE(on_device(*dev));
  const Trace a = finish(*host, 3), b = finish(*dev, 3);
  EXPECT_GT(a.loss.front() - a.loss.back(), 0.0);
  expect_same(a, b);
  // both copies of the embedding were stepped, and are alike
  ASSERT_TRUE(b.params.count("embed.weight#1"));
  EXPECT_EQ(b.params.at("embed.weight"), b.params.at("embed.weight#1"));
  EXPECT_NE(b.params.at("embed.weight"),
            finish(*make_trainer(tiny_short({"--parallel.schedule=dualpipev"})), 0)
                .params.at("embed.weight"));
}

TEST(Placement, UnknownPlacementIsAnError) {
  const std::string path = std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto";
  const std::vector<std::string> gpu = {"--optim.placement=gpu"};
  auto unknown = load_config(path, gpu);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().to_string().find("optim.placement"), std::string::npos);
}

}  // namespace
}  // namespace fp8pipe
