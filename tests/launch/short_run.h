// Shared by the trainer tests of short tiny runs (placement_test, ema_test): the tiny config with
// 8 sequences a step in 2 micro-batches, one warm-up step, no evaluations and no periodic
// checkpoints, plus the test's overrides; and a trainer made from it (a failure is reported).
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "launch/trainer.h"

namespace fp8pipe::testutil {

inline config::Config tiny_short(std::vector<std::string> overrides) {
  overrides.insert(overrides.end(),
                   {"--train.global_batch=8", "--parallel.microbatches=2", "--optim.warmup_steps=1",
                    "--train.eval_every=0", "--checkpoint.every=0"});
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto", overrides);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return cfg.ok() ? *cfg : config::Config();
}

inline std::unique_ptr<Trainer> make_trainer(const config::Config& cfg) {
  auto t = Trainer::create(cfg);
  EXPECT_TRUE(t.ok()) << t.status().to_string();
  return t.ok() ? std::move(*t) : nullptr;
}

}  // namespace fp8pipe::testutil
