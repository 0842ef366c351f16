// optim.ema_decay in training (launch/trainer.cc): the moving average leaves training unchanged,
// follows the weights of every step (fp64 reference over the weights a run without it produces),
// travels in checkpoints and resumes exactly, under the host and the device optimizer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "launch/trainer.h"
#include "tests/launch/short_run.h"

namespace fp8pipe {
namespace {

constexpr double kDecay = 0.75;  // strong, so 4 steps move the average well away from its start

using testutil::make_trainer;
using testutil::tiny_short;

using Weights = std::map<std::string, std::vector<float>>;
Weights weights(Trainer& t) {
  Weights w;
  for (auto* p : t.model().params()) {
    const float* v = p->value.data_as<float>();
    w[p->name].assign(v, v + p->value.numel());
  }
  return w;
}

// Every "<name>.ema" of the newest checkpoint under dir, whole.
Weights averages(const std::string& dir) {
  Weights out;
  auto found = ckpt::resolve(dir, "", false);
  EXPECT_TRUE(found.ok() && *found);
  if (!found.ok() || !*found) return out;
  auto l = ckpt::Loaded::open((*found)->step_dir, std::move((*found)->manifest));
  EXPECT_TRUE(l.ok());
  for (const ckpt::TensorRecord& t : l->manifest().tensors) {
    if (t.kind != ckpt::Kind::kEma) continue;
    std::vector<float>& v = out[t.name.substr(0, t.name.size() - 4)];
    v.resize(size_t(t.numel()));
    EXPECT_TRUE(l->read(t.name, "F32", 0, t.numel(), v.data()).ok());
  }
  return out;
}

std::string fresh_dir(const std::string& name) {
  const std::string d = ::testing::TempDir() + name;
  std::filesystem::remove_all(d);
  return d;
}

TEST(TrainEma, FollowsEveryStepsWeightsAndResumesExactly) {
  for (const char* placement : {"host", "device"}) {
    SCOPED_TRACE(placement);
    const std::string where = std::string("--optim.placement=") + placement;
    const std::string ema = "--optim.ema_decay=" + std::to_string(kDecay);
    // The reference: a run without an average, its weights after each step, averaged in fp64.
    auto plain = make_trainer(tiny_short({where}));
    ASSERT_TRUE(plain);
    Weights w = weights(*plain);
    std::map<std::string, std::vector<double>> ref;
    for (const auto& [name, v] : w) ref[name].assign(v.begin(), v.end());
    std::vector<double> losses;
    for (int s = 0; s < 4; ++s) {
      auto r = plain->train_step();
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      losses.push_back(r->loss.total);
      w = weights(*plain);
      for (auto& [name, e] : ref) {
        for (size_t i = 0; i < e.size(); ++i) e[i] = kDecay * e[i] + (1 - kDecay) * w[name][i];
      }
    }
    // With the average: the same losses and weights to the bit.
    const std::string whole_dir = fresh_dir(std::string("ema_whole_") + placement);
    auto t = make_trainer(tiny_short({where, ema, "--checkpoint.dir=" + whole_dir}));
    ASSERT_TRUE(t);
    for (int s = 0; s < 4; ++s) {
      auto r = t->train_step();
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      EXPECT_EQ(r->loss.total, losses[s]) << "step " << s + 1;
    }
    EXPECT_EQ(weights(*t), w);
    ASSERT_TRUE(t->save_checkpoint().ok());
    ASSERT_TRUE(t->finish_checkpoints().ok());
    const Weights got = averages(whole_dir);
    ASSERT_EQ(got.size(), ref.size());
    double lag = 0;
    for (const auto& [name, e] : ref) {
      const std::vector<float>& g = got.at(name);
      ASSERT_EQ(g.size(), e.size()) << name;
      double scale = 0;
      for (double x : e) scale = std::max(scale, std::abs(x));
      for (size_t i = 0; i < e.size(); ++i) {
        // fp32 rounding: a few ulps of the tensor's scale a step (measured ~1e-7 relative)
        ASSERT_NEAR(g[i], e[i], 4e-6 * scale) << name << "[" << i << "]";
        lag = std::max(lag, std::abs(g[i] - static_cast<double>(w.at(name)[i])));
      }
    }
    EXPECT_GT(lag, 1e-4) << "the average must differ from the weights";

    // 2 steps, a checkpoint, a new process's 2 more steps: the same average to the bit.
    const std::string dir = fresh_dir(std::string("ema_resume_") + placement);
    auto a = make_trainer(tiny_short({where, ema, "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(a);
    for (int s = 0; s < 2; ++s) ASSERT_TRUE(a->train_step().ok());
    ASSERT_TRUE(a->save_checkpoint().ok());
    ASSERT_TRUE(a->finish_checkpoints().ok());
    auto b = make_trainer(tiny_short({where, ema, "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(b);
    ASSERT_TRUE(b->resume(ResumeOptions{}).ok());
    ASSERT_EQ(b->step(), 2);
    for (int s = 0; s < 2; ++s) ASSERT_TRUE(b->train_step().ok());
    ASSERT_TRUE(b->save_checkpoint().ok());
    ASSERT_TRUE(b->finish_checkpoints().ok());
    EXPECT_EQ(averages(dir), got);
    std::filesystem::remove_all(dir);
    std::filesystem::remove_all(whole_dir);
  }
}

// evaluate_ema (what run() logs as eval_ema_loss at each eval) gives bitwise the held-out loss of
// a fresh model loaded with the average (its checkpoint arrays in a model file with the router
// biases), and leaves training as it was: the next step's loss is the plain run's.
TEST(TrainEma, EvaluatesTheAverageLikeAModelLoadedWithIt) {
  for (const char* placement : {"host", "device"}) {
    SCOPED_TRACE(placement);
    const std::string where = std::string("--optim.placement=") + placement;
    auto plain = make_trainer(tiny_short({where}));
    const std::string dir = fresh_dir(std::string("ema_eval_") + placement);
    auto t = make_trainer(tiny_short({where, "--optim.ema_decay=0.5", "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(plain && t);
    for (int s = 0; s < 3; ++s) {
      ASSERT_TRUE(plain->train_step().ok());
      ASSERT_TRUE(t->train_step().ok());
    }
    auto ema_loss = t->evaluate_ema(2);
    ASSERT_TRUE(ema_loss.ok()) << ema_loss.status().to_string();
    auto weights_loss = t->evaluate(2);
    ASSERT_TRUE(weights_loss.ok());
    EXPECT_NE(*ema_loss, *weights_loss);
    auto a = plain->train_step(), b = t->train_step();
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(b->loss.total, a->loss.total) << "the evaluation left the weights as they were";
    EXPECT_EQ(b->grad_norm, a->grad_norm);

    // The step-3 average from a checkpoint of a third run, into a model file.
    auto c = make_trainer(tiny_short({where, "--optim.ema_decay=0.5", "--checkpoint.dir=" + dir}));
    ASSERT_TRUE(c);
    for (int s = 0; s < 3; ++s) ASSERT_TRUE(c->train_step().ok());
    ASSERT_TRUE(c->save_checkpoint().ok());
    ASSERT_TRUE(c->finish_checkpoints().ok());
    safetensors::Writer w;
    const Weights avg = averages(dir);
    for (const auto& [name, v] : avg) {
      std::vector<uint8_t> bytes(v.size() * 4);
      std::memcpy(bytes.data(), v.data(), bytes.size());
      Shape shape;
      for (auto* p : c->model().params())
        if (p->name == name) shape = p->value.shape();
      ASSERT_TRUE(w.add(name, "F32", shape, std::move(bytes)).ok());
    }
    for (auto* moe : c->model().moes()) {
      const Tensor& bias = moe->bias().value;
      std::vector<uint8_t> bytes(bias.nbytes());
      std::memcpy(bytes.data(), bias.data(), bytes.size());
      ASSERT_TRUE(w.add(moe->bias().name, "F32", bias.shape(), std::move(bytes)).ok());
    }
    const std::string path = dir + "/ema_model.safetensors";
    ASSERT_TRUE(w.write(path).ok());
    auto fresh = make_trainer(tiny_short({where}));
    ASSERT_TRUE(fresh);
    ASSERT_TRUE(fresh->load_model(path).ok());
    auto loaded_loss = fresh->evaluate(2);
    ASSERT_TRUE(loaded_loss.ok());
    EXPECT_EQ(*loaded_loss, *ema_loss);
    EXPECT_FALSE(plain->evaluate_ema(2).ok()) << "no average to evaluate";
    std::filesystem::remove_all(dir);
  }
}

// A checkpoint without an average (optim.ema_decay was 0) resumes with it on: the average
// restarts at the restored weights; and one with an average resumes with it off.
TEST(TrainEma, ResumesAcrossTurningItOnOrOff) {
  const std::string dir = fresh_dir("ema_toggle");
  auto a = make_trainer(tiny_short({"--checkpoint.dir=" + dir}));
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->train_step().ok());
  ASSERT_TRUE(a->save_checkpoint().ok());
  ASSERT_TRUE(a->finish_checkpoints().ok());
  auto b = make_trainer(tiny_short({"--optim.ema_decay=0.5", "--checkpoint.dir=" + dir}));
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->resume(ResumeOptions{}).ok());
  ASSERT_TRUE(b->save_checkpoint().ok());  // step 1 again: the average is the weights
  ASSERT_TRUE(b->finish_checkpoints().ok());
  EXPECT_EQ(averages(dir), weights(*b));
  auto c = make_trainer(tiny_short({"--checkpoint.dir=" + dir}));
  ASSERT_TRUE(c);
  const Status st = c->resume(ResumeOptions{});
  EXPECT_TRUE(st.ok()) << st.to_string();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fp8pipe
