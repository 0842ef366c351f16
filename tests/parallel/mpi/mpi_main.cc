// main() of parallel_mpi_tests, one process per rank under mpirun: MPI start-up through
// parallel::mpi_init, one CommSet for a layout that fits the started ranks, GoogleTest, then
// MPI_Finalize. Ranks other than 0 print only their failures, prefixed with the rank.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "tests/parallel/mpi/mpi_env.h"
#ifdef FP8PIPE_HAVE_NCCL
#include <cuda_runtime_api.h>

#include "parallel/nccl_comm.h"
#endif

namespace fp8pipe::parallel::mpitest {
namespace {

MpiWorld g_world;
std::optional<Topology> g_topo;
std::optional<CommSet> g_comms;
std::optional<CommSet> g_nccl;  // FP8PIPE_TEST_COMM=nccl: the tests run on NCCL mirrors

// Non-zero ranks: failures only, so 4 ranks do not print 4 copies of every passing test.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& t) override {
    if (t.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, t.test_suite_name(), t.name());
    }
  }

 private:
  int rank_;
};

// pp=2 when 4 | ranks, dp the rest, ep=2 when dp is even, one stage per emulated node:
// 4 ranks -> pp2 dp2 ep2 rpn2; 8 ranks -> the worked example of topology.h; 2 -> pp1 dp2 ep2.
Status setup() {
  const int n = g_world.size;
  const int pp = n % 4 == 0 ? 2 : 1, dp = n / pp, ep = dp % 2 == 0 ? 2 : 1;
  FP8_ASSIGN_OR_RETURN(Topology t, Topology::create(pp, dp, ep, dp, g_world.rank));
  g_topo = std::move(t);
  FP8_ASSIGN_OR_RETURN(CommSet c, create_comms(*g_topo, CommOptions{kTimeoutS}));
  g_comms = std::move(c);
  const char* which = std::getenv("FP8PIPE_TEST_COMM");
  if (which && std::string(which) == "nccl") {
#ifdef FP8PIPE_HAVE_NCCL
    // One GPU per rank (one host): host buffers are staged through device memory.
    int gpus = 0;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 1) {
      return Status(Code::kInvalidArgument, "FP8PIPE_TEST_COMM=nccl: no CUDA device");
    }
    parallel::NcclOptions o;
    o.timeout_s = kTimeoutS;
    o.device = g_world.rank % gpus;
    FP8_ASSIGN_OR_RETURN(CommSet nc, create_nccl_comms(*g_comms, o));
    g_nccl = std::move(nc);
#else
    return Status(Code::kInvalidArgument, "FP8PIPE_TEST_COMM=nccl: built without NCCL");
#endif
  }
  return Status::Ok();
}

}  // namespace

const MpiWorld& world() { return g_world; }
const Topology& topo() { return *g_topo; }
CommSet& comms() { return g_nccl ? *g_nccl : *g_comms; }

}  // namespace fp8pipe::parallel::mpitest

int main(int argc, char** argv) {
  namespace mt = fp8pipe::parallel::mpitest;
  auto w = fp8pipe::parallel::mpi_init(&argc, &argv);
  if (!w.ok()) {
    std::fprintf(stderr, "%s\n", w.status().to_string().c_str());
    return 2;
  }
  mt::g_world = *w;
  ::testing::InitGoogleTest(&argc, argv);
  if (auto s = mt::setup(); !s.ok()) fp8pipe::parallel::abort_all(s);
  if (mt::g_world.rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new mt::FailurePrinter(mt::g_world.rank));
  }
  const int rc = RUN_ALL_TESTS();
  mt::g_nccl.reset();
  mt::g_comms.reset();
  if (auto s = fp8pipe::parallel::mpi_finalize(); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.to_string().c_str());
    return 2;
  }
  return rc;
}
