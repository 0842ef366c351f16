// DeviceAdamW with ZeRO-1 shards against the host AdamW on the CPU backend: the same groups
// (whole tensors, shards at odd offsets, an empty-decay group in between) give the same weights
// and moments bit for bit, the moments take only the shards' elements, and a group whose range
// differs from the host's is refused naming it.
#include "optim/device_adamw.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "tests/test_random.h"

namespace fp8pipe::optim {
namespace {

struct Layout {
  std::vector<int64_t> numel, begin, end, offset;
  std::vector<bool> decay;
};

TEST(DeviceAdamW, ShardsGiveTheHostBits) {
  auto be = make_cpu_backend();
  // Two whole tensors (one run), a shard, a whole tensor without decay, two shards.
  const Layout l{{300, 128, 1000, 64, 517, 90},
                 {0, 0, 250, 0, 0, 45},
                 {300, 128, 500, 64, 259, 90},
                 {0, 320, 448, 1472, 1536, 2112},
                 {true, true, true, false, true, true}};
  const int64_t total = 2240;
  Tensor value = be->zeros({total}, DType::kF32).value();
  Tensor grad = be->zeros({total}, DType::kF32).value();
  std::vector<Tensor> params, grads;
  for (size_t i = 0; i < l.numel.size(); ++i) {
    params.push_back(value.slice_rows(l.offset[i], l.offset[i] + l.numel[i]));
    grads.push_back(grad.slice_rows(l.offset[i], l.offset[i] + l.numel[i]));
    const std::vector<float> w = testutil::randn(l.numel[i], 10 + i, 0.05f);
    std::memcpy(params[i].data(), w.data(), w.size() * sizeof(float));
  }
  // The host twin on separate copies of the same weights and gradients.
  std::vector<std::vector<float>> hp(l.numel.size()), hg(l.numel.size());
  std::vector<ParamGroup> host_groups;
  std::vector<TensorGroup> dev_groups;
  for (size_t i = 0; i < l.numel.size(); ++i) {
    hp[i].assign(params[i].data_as<float>(), params[i].data_as<float>() + l.numel[i]);
    hg[i].assign(l.numel[i], 0.0f);
    host_groups.push_back({"p" + std::to_string(i), hp[i].data() + l.begin[i],
                           hg[i].data() + l.begin[i], l.begin[i], l.end[i], l.decay[i]});
    dev_groups.push_back(
        {"p" + std::to_string(i), &params[i], &grads[i], l.decay[i], l.begin[i], l.end[i]});
  }
  AdamWConfig cfg;
  cfg.weight_decay = 0.1f;
  auto host = AdamW::create(cfg, host_groups);
  ASSERT_TRUE(host.ok()) << host.status().to_string();
  auto dev = DeviceAdamW::create(*be, *host, dev_groups, FlatLayout{value, grad, l.offset});
  ASSERT_TRUE(dev.ok()) << dev.status().to_string();
  for (int step = 0; step < 3; ++step) {
    for (size_t i = 0; i < l.numel.size(); ++i) {
      const std::vector<float> g = testutil::randn(l.numel[i], 100 + 10 * step + i, 0.3f);
      std::memcpy(grads[i].data(), g.data(), g.size() * sizeof(float));
      hg[i] = g;
    }
    ASSERT_TRUE(host->step(1e-2f, 0.8f).ok());
    ASSERT_TRUE(dev->step(1e-2f, 0.8f).ok());
  }
  for (size_t i = 0; i < l.numel.size(); ++i) {
    const float* d = params[i].data_as<float>();
    for (int64_t k = l.begin[i]; k < l.end[i]; ++k)
      ASSERT_EQ(std::memcmp(&d[k], &hp[i][k], sizeof(float)), 0) << "p" << i << "[" << k << "]";
  }
  AdamW back = *host;  // moments through the checkpoint form: the device's equal the host's
  ASSERT_TRUE(dev->store_to(back).ok());
  const AdamWState a = host->export_state(), b = back.export_state();
  ASSERT_EQ(a.arrays.size(), b.arrays.size());
  for (size_t k = 0; k < a.arrays.size(); ++k) {
    EXPECT_EQ(a.arrays[k].name, b.arrays[k].name);
    EXPECT_EQ(a.arrays[k].begin, b.arrays[k].begin);
    EXPECT_EQ(a.arrays[k].bytes, b.arrays[k].bytes) << a.arrays[k].name;
  }
  EXPECT_EQ(b.step, 3);
  // The moments hold the shards' elements (and the gap between the first two whole tensors,
  // which share one call): bf16 m and v, 2 bytes each.
  int64_t shard_elems = 0;
  for (size_t i = 0; i < l.numel.size(); ++i) shard_elems += l.end[i] - l.begin[i];
  const int64_t gap = l.offset[1] - l.numel[0];
  EXPECT_EQ(be->memory().in_use, 2 * total * 4 + 2 * 2 * (shard_elems + gap));
  // A range other than the host's is refused, naming the group.
  dev_groups[2].begin = 0;
  auto bad = DeviceAdamW::create(*be, *host, dev_groups, FlatLayout{value, grad, l.offset});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().to_string().find("'p2'"), std::string::npos) << bad.status().to_string();
}

}  // namespace
}  // namespace fp8pipe::optim
