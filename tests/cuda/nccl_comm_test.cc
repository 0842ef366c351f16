// The NCCL Comm on one rank (all one GPU machine allows: NCCL refuses two ranks on one GPU, so
// multi-rank correctness is covered by the MPI tests on CPUs). The unique id travels over a
// one-rank stand-in for the MPI comm. Checks every collective on device buffers and on host
// buffers (staged), all_to_all_v with the self block, the counted variant and agree().
#include "parallel/nccl_comm.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace fp8pipe::parallel {
namespace {

using kernels::gpu::testing::DevBuf;

// A world of one for the id broadcast: broadcast is a no-op, everything else is refused.
class SoloComm final : public Comm {
 public:
  SoloComm() {
    group_.ranks = {0};
    group_.name = "solo";
  }
  const Group& group() const override { return group_; }
  double timeout_s() const override { return 30; }
  Work send(const void*, int64_t, DataType, int, int) override { return no(); }
  Work recv(void*, int64_t, DataType, int, int) override { return no(); }
  Work all_to_all_v(const void*, std::span<const int64_t>, void*, std::span<const int64_t>,
                    DataType, int64_t) override {
    return no();
  }
  Work exchange_counts(std::span<const int64_t>, std::span<int64_t>) override { return no(); }
  Work all_to_all_v_counted(const void*, std::span<const int64_t>, DataType, int64_t, RecvAlloc,
                            std::vector<int64_t>*) override {
    return no();
  }
  Work all_reduce(const void*, void*, int64_t, DataType, ReduceOp) override { return no(); }
  Work reduce_scatter(const void*, void*, int64_t, DataType, ReduceOp) override { return no(); }
  Work all_gather(const void*, void*, int64_t, DataType) override { return no(); }
  Work broadcast(void*, int64_t, DataType, int) override { return Work(); }
  Work barrier() override { return Work(); }

 private:
  static Work no() { return Work::failed(Status(Code::kUnimplemented, "solo comm")); }
  Group group_;
};

TEST(NcclComm, OneRankCollectives) {
  SoloComm solo;
  auto be = make_cuda_backend(0);
  ASSERT_TRUE(be.ok()) << be.status().to_string();
  NcclOptions opts;
  opts.timeout_s = 30;
  opts.order_after = &be.value()->compute();
  auto made = create_nccl_comm(solo, opts);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  Comm& c = *made.value();
  EXPECT_EQ(c.size(), 1);

  // device buffers
  const int64_t n = 1000;
  std::vector<float> h(n);
  std::iota(h.begin(), h.end(), 1.0f);
  DevBuf<float> a(n), b(n);
  ASSERT_CUDA_OK(a.upload(h));
  ASSERT_TRUE(c.all_reduce(a.get(), b.get(), n, DataType::kFloat32, ReduceOp::kSum).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_TRUE(c.all_gather(a.get(), b.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_TRUE(c.reduce_scatter(a.get(), b.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_TRUE(c.broadcast(a.get(), n, DataType::kFloat32, 0).wait().ok());
  EXPECT_EQ(a.to_host(), h);
  ASSERT_TRUE(c.barrier().wait().ok());

  // host buffers (staged), in place, and agree()
  std::vector<double> hd = {1.5, -2.0, 3.25};
  ASSERT_TRUE(
      c.all_reduce(hd.data(), hd.data(), 3, DataType::kFloat64, ReduceOp::kMax).wait().ok());
  EXPECT_EQ(hd, (std::vector<double>{1.5, -2.0, 3.25}));
  auto ok = agree(c, true);
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(ok.value());
  EXPECT_FALSE(
      c.all_reduce(hd.data(), hd.data(), 3, DataType::kBFloat16, ReduceOp::kSum).wait().ok());

  // counts and all-to-all with the self block
  std::vector<int64_t> sc = {7}, rc = {0};
  ASSERT_TRUE(c.exchange_counts(sc, rc).wait().ok());
  EXPECT_EQ(rc[0], 7);
  DevBuf<float> r(n);
  const std::vector<int64_t> rows = {n / 4};
  ASSERT_TRUE(c.all_to_all_v(a.get(), rows, r.get(), rows, DataType::kFloat32, 4).wait().ok());
  EXPECT_EQ(r.to_host(), h);
  std::vector<int64_t> got;
  int64_t asked = -1;
  const Status s = c.all_to_all_v_counted(
                        a.get(), rows, DataType::kFloat32, 4,
                        [&](int64_t total) -> void* {
                          asked = total;
                          return b.get();
                        },
                        &got)
                       .wait();
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(asked, n / 4);
  EXPECT_EQ(got, rows);
  EXPECT_EQ(b.to_host(), h);
}

}  // namespace
}  // namespace fp8pipe::parallel
