// The NCCL Comm on one rank (all one GPU machine allows: NCCL refuses two ranks on one GPU;
// several ranks run the MPI comm's tests on NCCL under the CUDA emulation, CTest mpi.comm_nccl).
// The unique id travels over a one-rank stand-in for the MPI comm. Checks every collective on
// device buffers and on host buffers (staged), all_to_all_v with the self block, the counted
// variant, agree() and argument checks; and point-to-point with self, which only completes when the
// deferred batch issues the send and its receive in one NCCL group (nccl_comm.h). Outputs are
// cleared before each op, so an op that moved nothing fails the test.
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

// A one-rank NCCL comm over SoloComm, ordered after GPU 0's compute stream (30 s timeouts).
struct SoloNccl {
  SoloComm mpi;
  std::unique_ptr<Backend> be;
  std::unique_ptr<Comm> comm;
  std::string error;
  SoloNccl() {
    auto b = make_cuda_backend(0);
    if (!b.ok()) {
      error = b.status().to_string();
      return;
    }
    be = std::move(*b);
    NcclOptions opts;
    opts.timeout_s = 30;
    opts.order_after = &be->compute();
    auto c = create_nccl_comm(mpi, opts);
    if (!c.ok()) {
      error = c.status().to_string();
      return;
    }
    comm = std::move(*c);
  }
  bool made() const { return comm != nullptr; }
};

TEST(NcclComm, OneRankCollectives) {
  SoloNccl solo;
  ASSERT_TRUE(solo.made()) << solo.error;
  Comm& c = *solo.comm;
  EXPECT_EQ(c.size(), 1);

  // device buffers (the output is cleared before every op, so a no-op cannot pass)
  const int64_t n = 1000;
  std::vector<float> h(n);
  std::iota(h.begin(), h.end(), 1.0f);
  const std::vector<float> zeros(n, 0.0f);
  DevBuf<float> a(n), b(n);
  ASSERT_CUDA_OK(a.upload(h));
  ASSERT_CUDA_OK(b.fill_bytes(0));
  ASSERT_TRUE(c.all_reduce(a.get(), b.get(), n, DataType::kFloat32, ReduceOp::kSum).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_CUDA_OK(b.fill_bytes(0));
  ASSERT_TRUE(c.all_gather(a.get(), b.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_CUDA_OK(b.fill_bytes(0));
  ASSERT_TRUE(c.reduce_scatter(a.get(), b.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  ASSERT_TRUE(c.broadcast(a.get(), n, DataType::kFloat32, 0).wait().ok());
  EXPECT_EQ(a.to_host(), h);
  ASSERT_TRUE(c.barrier().wait().ok());
  // zero elements: nothing moves, the op still completes
  ASSERT_TRUE(c.all_reduce(a.get(), b.get(), 0, DataType::kFloat32, ReduceOp::kSum).wait().ok());

  // host buffers (staged): in, out, both
  std::vector<float> hout(n, 0.0f);
  ASSERT_TRUE(
      c.all_reduce(h.data(), hout.data(), n, DataType::kFloat32, ReduceOp::kSum).wait().ok());
  EXPECT_EQ(hout, h);
  ASSERT_CUDA_OK(b.fill_bytes(0));
  ASSERT_TRUE(c.all_gather(h.data(), b.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(b.to_host(), h);
  hout = zeros;
  ASSERT_TRUE(c.all_gather(a.get(), hout.data(), n, DataType::kFloat32).wait().ok());
  EXPECT_EQ(hout, h);
  hout = h;
  ASSERT_TRUE(c.broadcast(hout.data(), n, DataType::kFloat32, 0).wait().ok());
  EXPECT_EQ(hout, h);

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
  // invalid arguments fail at once, as on the MPI comm
  EXPECT_FALSE(c.all_reduce(a.get(), b.get(), -1, DataType::kFloat32, ReduceOp::kSum).wait().ok());
  EXPECT_FALSE(c.reduce_scatter(a.get(), a.get(), n, DataType::kFloat32).wait().ok());
  EXPECT_FALSE(c.all_reduce(nullptr, b.get(), n, DataType::kFloat32, ReduceOp::kSum).wait().ok());
  EXPECT_FALSE(c.send(a.get(), 4, DataType::kFloat32, 1, 0).wait().ok());
  EXPECT_FALSE(c.recv(b.get(), 4, DataType::kFloat32, -1, 0).wait().ok());
  EXPECT_FALSE(c.send(a.get(), 4, DataType::kFloat32, 0, -1).wait().ok());
  EXPECT_FALSE(c.recv(nullptr, 4, DataType::kFloat32, 0, 0).wait().ok());
  EXPECT_FALSE(c.broadcast(a.get(), n, DataType::kFloat32, 1).wait().ok());

  // counts and all-to-all with the self block
  std::vector<int64_t> sc = {7}, rc = {0};
  Work ex = c.exchange_counts(sc, rc);
  sc[0] = -1;  // the send counts are copied at the call
  ASSERT_TRUE(ex.wait().ok());
  EXPECT_EQ(rc[0], 7);
  DevBuf<float> r(n);
  ASSERT_CUDA_OK(r.fill_bytes(0));
  const std::vector<int64_t> rows = {n / 4};
  ASSERT_TRUE(c.all_to_all_v(a.get(), rows, r.get(), rows, DataType::kFloat32, 4).wait().ok());
  EXPECT_EQ(r.to_host(), h);
  hout = zeros;
  ASSERT_TRUE(c.all_to_all_v(h.data(), rows, hout.data(), rows, DataType::kFloat32, 4).wait().ok());
  EXPECT_EQ(hout, h);
  const std::vector<int64_t> fewer = {n / 4 - 1};
  EXPECT_FALSE(c.all_to_all_v(a.get(), rows, r.get(), fewer, DataType::kFloat32, 4).wait().ok());
  EXPECT_FALSE(c.all_to_all_v(a.get(), rows, r.get(), rows, DataType::kFloat32, 0).wait().ok());
  ASSERT_CUDA_OK(b.fill_bytes(0));
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

// Send / recv with self: each pair completes only when both sides go to NCCL in one group, so
// every case here would hang (and time out) if a send were issued on its own.
TEST(NcclComm, OneRankSelfPointToPoint) {
  SoloNccl solo;
  ASSERT_TRUE(solo.made()) << solo.error;
  Comm& c = *solo.comm;

  const int64_t n = 1 << 20;  // 4 MB: above NCCL's eager buffering
  std::vector<float> h(n);
  std::iota(h.begin(), h.end(), 1.0f);
  const std::vector<float> zeros(n, 0.0f);
  DevBuf<float> a(n), b(n);
  ASSERT_CUDA_OK(a.upload(h));

  // send, then recv, then wait (the pipeline executor's order): device buffers; only trigger
  // (a), the wait, issues the pair (without it this hangs until the 30 s timeout)
  ASSERT_CUDA_OK(b.fill_bytes(0));
  Work s1 = c.send(a.get(), n, DataType::kFloat32, 0, 3);
  Work r1 = c.recv(b.get(), n, DataType::kFloat32, 0, 3);
  Status st = r1.wait();
  ASSERT_TRUE(st.ok()) << st.to_string();
  st = s1.wait();
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(b.to_host(), h);

  // recv first, then send (grad_sync's order), waited send first: host buffers (staged)
  std::vector<float> hout = zeros;
  Work r2 = c.recv(hout.data(), n, DataType::kFloat32, 0, 0);
  Work s2 = c.send(h.data(), n, DataType::kFloat32, 0, 0);
  st = s2.wait();
  ASSERT_TRUE(st.ok()) << st.to_string();
  st = r2.wait();
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(hout, h);

  // several messages in one batch match in issue order (NCCL has no tags); then a collective
  // posted behind the batch (trigger (b)) runs after it, and waiting on it alone suffices
  const int64_t m = n / 4;
  ASSERT_CUDA_OK(b.fill_bytes(0));
  std::vector<Work> works;
  for (int i = 0; i < 4; ++i) works.push_back(c.send(a.get() + i * m, m, DataType::kFloat32, 0, i));
  for (int i = 0; i < 4; ++i) works.push_back(c.recv(b.get() + i * m, m, DataType::kFloat32, 0, i));
  std::vector<float> sum(n, 0.0f);
  st = c.all_reduce(b.get(), sum.data(), n, DataType::kFloat32, ReduceOp::kSum).wait();
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(sum, h);  // the all-reduce read what the receives wrote
  st = wait_all(works);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(b.to_host(), h);

  // a batch nobody waits for is issued and drained when the comm is destroyed (trigger (c))
  ASSERT_CUDA_OK(b.fill_bytes(0));
  Work s3 = c.send(a.get(), n, DataType::kFloat32, 0, 0);
  Work r3 = c.recv(b.get(), n, DataType::kFloat32, 0, 0);
  solo.comm.reset();
  EXPECT_TRUE(s3.test());
  EXPECT_TRUE(r3.test());
  EXPECT_TRUE(s3.wait().ok());
  EXPECT_TRUE(r3.wait().ok());
  EXPECT_EQ(b.to_host(), h);
}

}  // namespace
}  // namespace fp8pipe::parallel
