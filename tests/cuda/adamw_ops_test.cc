// The CUDA fused AdamW (kernels/cuda/ops.cuh adamw_step) against kernels/cpu/adamw.h bit for bit:
// parameters and both bf16 moments, over several steps with weight decay and a clip factor, on
// values spanning many magnitudes (incl. zeros and tiny gradients).
#include <gtest/gtest.h>

#include <vector>

#include "kernels/cpu/adamw.h"
#include "kernels/cuda/ops.cuh"
#include "tests/cuda/cuda_test_util.h"

namespace fp8pipe::kernels::gpu {
namespace {

using testing::DevBuf;

TEST(CudaAdamW, BitIdenticalToCpu) {
  const int64_t n = (1 << 20) + 77;
  std::vector<float> p = testing::random_wide(n, 1, 10, 4);
  std::vector<uint16_t> m(n, 0), v(n, 0);
  DevBuf<float> dp(n), dg(n);
  DevBuf<uint16_t> dm(n), dv(n);
  ASSERT_CUDA_OK(dp.upload(p));
  ASSERT_CUDA_OK(dm.upload(m));
  ASSERT_CUDA_OK(dv.upload(v));
  for (int step = 1; step <= 5; ++step) {
    const std::vector<float> g = testing::random_wide(n, 100 + step, 20, 2);
    ASSERT_CUDA_OK(dg.upload(g));
    AdamWHyper h;
    h.lr = 3e-4f * step;
    h.weight_decay = 0.1f;
    h.step = step;
    h.grad_scale = step == 3 ? 0.37f : 1.0f;
    const AdamWScalars s = adamw_scalars(h);
    adamw_step(p.data(), g.data(), m.data(), v.data(), n, s);
    ASSERT_GPU_OK(gpu::adamw_step(dp.get(), dg.get(), dm.get(), dv.get(), n, s, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> gp = dp.to_host();
    const std::vector<uint16_t> gm = dm.to_host(), gv = dv.to_host();
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!testing::same_bits_nan_eq(p[i], gp[i]) || m[i] != gm[i] || v[i] != gv[i]) {
        if (bad++ < 5) {
          ADD_FAILURE() << "step " << step << " i " << i << ": p " << p[i] << " vs " << gp[i]
                        << ", m " << m[i] << " vs " << gm[i] << ", v " << v[i] << " vs " << gv[i];
        }
      }
    }
    ASSERT_EQ(bad, 0) << "step " << step;
  }
}

}  // namespace
}  // namespace fp8pipe::kernels::gpu
