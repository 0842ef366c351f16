// Every Comm operation of the MPI backend in real processes: each rank checks the result against
// values it computes itself in closed form (no rank trusts another's arithmetic). Runs under
// `mpirun -np 4` (CTest mpi.comm); every group kind of the layout is exercised.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "tests/parallel/mpi/mpi_env.h"

namespace fp8pipe::parallel::mpitest {
namespace {

#define WAIT_OK(work)                       \
  do {                                      \
    Status _s = (work).wait();              \
    ASSERT_TRUE(_s.ok()) << _s.to_string(); \
  } while (0)

std::vector<GroupKind> kinds() { return {kGroupKinds.begin(), kGroupKinds.end()}; }

TEST(MpiComm, CommsMatchTopology) {
  for (GroupKind k : kinds()) {
    Comm& c = comms().get(k);
    const Group& g = topo().group(k);
    EXPECT_EQ(c.size(), g.size()) << g.name;
    EXPECT_EQ(c.rank(), g.index) << g.name;
    EXPECT_EQ(c.name(), g.name);
    // The world ranks MPI put in this communicator, in comm-rank order, are the topology's.
    std::vector<int32_t> got(c.size(), -1);
    const int32_t me = world().rank;
    WAIT_OK(c.all_gather(&me, got.data(), 1, DataType::kInt32));
    EXPECT_EQ(std::vector<int>(got.begin(), got.end()), g.ranks) << g.name;
  }
}

template <typename T>
void check_all_reduce(Comm& c, DataType t) {
  const int n = c.size(), r = c.rank(), len = 1000;
  std::vector<T> x(len), sum(len), mx(len), mn(len);
  for (int i = 0; i < len; ++i) x[i] = static_cast<T>(r * 1000 + i) + T(r % 2) / T(2);
  WAIT_OK(c.all_reduce(x.data(), sum.data(), len, t, ReduceOp::kSum));
  WAIT_OK(c.all_reduce(x.data(), mx.data(), len, t, ReduceOp::kMax));
  std::vector<T> inplace = x;
  WAIT_OK(c.all_reduce(inplace.data(), inplace.data(), len, t, ReduceOp::kMin));
  mn = inplace;
  // Closed forms over comm ranks q = 0..n-1 of q·1000 + i + (q odd ? 1/2 : 0).
  const T halves = static_cast<T>(n / 2) * (T(1) / T(2));  // 0 for integers
  for (int i = 0; i < len; ++i) {
    const T want_sum = static_cast<T>(1000LL * n * (n - 1) / 2 + int64_t(n) * i) + halves;
    const T want_max = static_cast<T>((n - 1) * 1000 + i) + T((n - 1) % 2) / T(2);
    ASSERT_EQ(sum[i], want_sum) << c.name() << " i=" << i;
    ASSERT_EQ(mx[i], want_max) << c.name() << " i=" << i;
    ASSERT_EQ(mn[i], static_cast<T>(i)) << c.name() << " i=" << i;
  }
}

TEST(MpiComm, AllReduceSumMaxMinEveryTypeEveryGroup) {
  for (GroupKind k : kinds()) {
    Comm& c = comms().get(k);
    check_all_reduce<float>(c, DataType::kFloat32);
    check_all_reduce<double>(c, DataType::kFloat64);
    check_all_reduce<int64_t>(c, DataType::kInt64);
  }
}

TEST(MpiComm, ReduceScatterSumEqualBlocks) {
  for (GroupKind k : kinds()) {
    Comm& c = comms().get(k);
    const int n = c.size(), r = c.rank(), block = 37;
    std::vector<double> send(n * block), recv(block, -1);
    for (int i = 0; i < n * block; ++i) send[i] = (r + 1) * double(i);
    WAIT_OK(c.reduce_scatter(send.data(), recv.data(), block, DataType::kFloat64));
    for (int j = 0; j < block; ++j) {
      ASSERT_EQ(recv[j], n * (n + 1) / 2 * double(r * block + j)) << c.name() << " j=" << j;
    }
  }
}

TEST(MpiComm, AllGatherAndInPlace) {
  for (GroupKind k : kinds()) {
    Comm& c = comms().get(k);
    const int n = c.size(), r = c.rank(), block = 5;
    std::vector<int64_t> mine(block), out(n * block, -1);
    for (int j = 0; j < block; ++j) mine[j] = r * 100 + j;
    WAIT_OK(c.all_gather(mine.data(), out.data(), block, DataType::kInt64));
    std::vector<int64_t> inplace(n * block, -1);
    std::copy(mine.begin(), mine.end(), inplace.begin() + r * block);
    WAIT_OK(c.all_gather(inplace.data() + r * block, inplace.data(), block, DataType::kInt64));
    for (int q = 0; q < n; ++q) {
      for (int j = 0; j < block; ++j) {
        ASSERT_EQ(out[q * block + j], q * 100 + j) << c.name();
        ASSERT_EQ(inplace[q * block + j], q * 100 + j) << c.name();
      }
    }
  }
}

TEST(MpiComm, BroadcastFromEveryRoot) {
  Comm& c = *comms().world;
  for (int root = 0; root < c.size(); ++root) {
    std::vector<float> buf(300, -1.0f);
    if (c.rank() == root) {
      for (int i = 0; i < 300; ++i) buf[i] = root * 1000.0f + i;
    }
    WAIT_OK(c.broadcast(buf.data(), 300, DataType::kFloat32, root));
    for (int i = 0; i < 300; ++i) ASSERT_EQ(buf[i], root * 1000.0f + i);
  }
}

TEST(MpiComm, BarrierWaitsForTheLastRank) {
  Comm& c = *comms().world;
  const auto t0 = std::chrono::steady_clock::now();
  if (c.rank() == c.size() - 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  WAIT_OK(c.barrier());
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(dt, 0.15);
}

// Rows from rank `from` to rank `to`: uneven, with zeros (every rank sends nothing to someone,
// and the last rank sends nothing at all).
int64_t rows(int from, int to, int n) { return from == n - 1 ? 0 : (from + 2 * to) % 3; }
float cell(int from, int to, int64_t row, int e) {
  return from * 10000.0f + to * 100 + row * 10 + e;
}

TEST(MpiComm, AllToAllVUnevenCountsWithZeros) {
  constexpr int kRow = 3;
  for (GroupKind k : kinds()) {
    Comm& c = comms().get(k);
    const int n = c.size(), r = c.rank();
    std::vector<int64_t> sc(n), rc(n), got_rc(n, -1);
    std::vector<float> send;
    for (int q = 0; q < n; ++q) {
      sc[q] = rows(r, q, n);
      rc[q] = rows(q, r, n);
      for (int64_t i = 0; i < sc[q]; ++i) {
        for (int e = 0; e < kRow; ++e) send.push_back(cell(r, q, i, e));
      }
    }
    int64_t total = 0;
    for (int64_t v : rc) total += v;
    std::vector<float> recv(total * kRow + 1, -1.0f);
    WAIT_OK(c.exchange_counts(sc, got_rc));
    EXPECT_EQ(got_rc, rc) << c.name();
    WAIT_OK(c.all_to_all_v(send.data(), sc, recv.data(), rc, DataType::kFloat32, kRow));
    // Counts first, then data, in one op; the buffer comes from the allocator.
    std::vector<float> recv2;
    std::vector<int64_t> rc2;
    auto alloc = [&](int64_t total_rows) {
      recv2.assign(total_rows * kRow, -1.0f);
      return static_cast<void*>(recv2.data());
    };
    WAIT_OK(c.all_to_all_v_counted(send.data(), sc, DataType::kFloat32, kRow, alloc, &rc2));
    EXPECT_EQ(rc2, rc);
    ASSERT_EQ(static_cast<int64_t>(recv2.size()), total * kRow);
    size_t at = 0;
    for (int q = 0; q < n; ++q) {
      for (int64_t i = 0; i < rc[q]; ++i) {
        for (int e = 0; e < kRow; ++e, ++at) {
          ASSERT_EQ(recv[at], cell(q, r, i, e)) << c.name() << " from " << q;
          ASSERT_EQ(recv2[at], cell(q, r, i, e)) << c.name() << " from " << q;
        }
      }
    }
    EXPECT_EQ(recv[at], -1.0f) << "wrote past the received rows";
  }
}

// A two-phase op, then more collectives on the same comm without waiting: every rank must start
// them in the same order even though the counts phase completes at different times.
TEST(MpiComm, ManyOpsInFlightKeepCollectiveOrder) {
  Comm& c = *comms().world;
  const int n = c.size(), r = c.rank();
  std::vector<int64_t> sc(n, r + 1);
  std::vector<int32_t> send(n * (r + 1), r);
  std::vector<int32_t> recv;
  std::vector<int64_t> rc;
  std::vector<double> a(64, r), b(64, 1.0);
  std::vector<Work> ws;
  ws.push_back(c.all_to_all_v_counted(
      send.data(), sc, DataType::kInt32, 1,
      [&](int64_t t) {
        recv.resize(t);
        return static_cast<void*>(recv.data());
      },
      &rc));
  ws.push_back(c.all_reduce(a.data(), a.data(), 64, DataType::kFloat64, ReduceOp::kSum));
  ws.push_back(comms().dp->all_reduce(b.data(), b.data(), 64, DataType::kFloat64, ReduceOp::kSum));
  ws.push_back(c.barrier());
  for (int i = static_cast<int>(ws.size()) - 1; i >= 0; --i) WAIT_OK(ws[i]);  // reverse order
  EXPECT_EQ(a[0], n * (n - 1) / 2.0);
  EXPECT_EQ(b[0], comms().dp->size());
  size_t at = 0;
  for (int q = 0; q < n; ++q) {
    ASSERT_EQ(rc[q], q + 1);
    for (int i = 0; i <= q; ++i) ASSERT_EQ(recv[at++], q);
  }
}

// Two comms, one posting order on every rank (a two-phase op on world, then an all-reduce on
// dp), but with rank-dependent timing: half of each dp group posts the all-reduce at once (its
// comm thread could issue it before world's data phase), the other half 300 ms later (after it).
// On NCCL, where a GPU may run one NCCL kernel at a time, issuing in those two orders deadlocks;
// the NCCL comm issues in posting order across comms (nccl_comm.h "Issue order"), so it passes
// under the emulation's serial NCCL, and fails there with FP8PIPE_NCCL_ISSUE_ORDER=per_comm
// (CTest mpi.comm_nccl_per_comm_order). The MPI comm has no such constraint.
TEST(MpiComm, TwoCommsKeepPostingOrderWhateverTheTiming) {
  Comm& a = *comms().world;
  Comm& b = *comms().dp;
  if (b.size() < 2) GTEST_SKIP() << "dp=1";
  const int n = a.size(), r = a.rank();
  std::vector<int64_t> sc(n, 2);
  std::vector<int32_t> send(2 * n, r), recv;
  std::vector<int64_t> rc;
  Work wa = a.all_to_all_v_counted(
      send.data(), sc, DataType::kInt32, 1,
      [&](int64_t t) {
        recv.resize(t);
        return static_cast<void*>(recv.data());
      },
      &rc);
  if (b.rank() % 2 == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  double x = b.rank() + 1;
  Work wb = b.all_reduce(&x, &x, 1, DataType::kFloat64, ReduceOp::kSum);
  WAIT_OK(wb);
  WAIT_OK(wa);
  EXPECT_EQ(x, b.size() * (b.size() + 1) / 2.0);
  ASSERT_EQ(recv.size(), static_cast<size_t>(2 * n));
  for (int q = 0; q < n; ++q) {
    ASSERT_EQ(recv[2 * q], q);
    ASSERT_EQ(recv[2 * q + 1], q);
  }
}

// A two-phase op that fails in its data phase (on every rank alike) releases the collectives
// queued behind it, and reports the failure naming the op.
TEST(MpiComm, FailedTwoPhaseOpReleasesQueuedCollectives) {
  Comm& c = *comms().ep;
  const int n = c.size();
  std::vector<int64_t> sc(n, 1), rc;
  std::vector<int32_t> send(n, 7);
  Work a = c.all_to_all_v_counted(
      send.data(), sc, DataType::kInt32, 1, [](int64_t) -> void* { return nullptr; }, &rc);
  int64_t x = 1;
  Work b = c.all_reduce(&x, &x, 1, DataType::kInt64, ReduceOp::kSum);  // held behind a
  Status s = a.wait();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find(fmt::format("alloc({}) returned null", n)), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("all_to_all_v_counted("), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(c.name()), std::string::npos) << s.message();
  WAIT_OK(b);
  EXPECT_EQ(x, n);
}

TEST(MpiComm, SendRecvRingLargeBothWaysAndTags) {
  Comm& c = *comms().world;
  const int n = c.size(), r = c.rank(), next = (r + 1) % n, prev = (r + n - 1) % n;
  // 4 MiB each way at once: rendezvous-sized, so a blocking implementation would deadlock.
  const int64_t len = 1 << 20;
  std::vector<float> out(len), in(len, -1.0f);
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(r * 7 + i % 1000);
  Work s = c.send(out.data(), len, DataType::kFloat32, next, 5);
  Work v = c.recv(in.data(), len, DataType::kFloat32, prev, 5);
  WAIT_OK(v);
  WAIT_OK(s);
  for (int64_t i = 0; i < len; i += 997) ASSERT_EQ(in[i], static_cast<float>(prev * 7 + i % 1000));
  // Tags are matched independently; one tag between a pair keeps its order.
  int64_t a1 = r * 10 + 1, a2 = r * 10 + 2, b1 = r * 10 + 3, g1 = -1, g2 = -1, h1 = -1;
  std::vector<Work> ws = {c.send(&a1, 1, DataType::kInt64, next, 1),
                          c.send(&a2, 1, DataType::kInt64, next, 1),
                          c.send(&b1, 1, DataType::kInt64, next, 2)};
  Work wb = c.recv(&h1, 1, DataType::kInt64, prev, 2);
  Work w1 = c.recv(&g1, 1, DataType::kInt64, prev, 1);
  Work w2 = c.recv(&g2, 1, DataType::kInt64, prev, 1);
  WAIT_OK(wb);
  WAIT_OK(w1);
  WAIT_OK(w2);
  ASSERT_TRUE(wait_all(ws).ok());
  EXPECT_EQ(h1, prev * 10 + 3);
  EXPECT_EQ(g1, prev * 10 + 1);
  EXPECT_EQ(g2, prev * 10 + 2);
}

TEST(MpiComm, PipelineSendAlongPpGroup) {
  Comm& pp = *comms().pp;
  if (pp.size() < 2) GTEST_SKIP() << "pp=1";
  const int s = pp.rank(), last = pp.size() - 1;
  double act = -1;
  if (s == 0) act = 1.0;
  if (s > 0) WAIT_OK(pp.recv(&act, 1, DataType::kFloat64, s - 1, 0));
  act *= 2;
  if (s < last) WAIT_OK(pp.send(&act, 1, DataType::kFloat64, s + 1, 0));
  EXPECT_EQ(act, std::pow(2.0, s + 1));
}

// The compute thread never calls into MPI: it spins on Work::test() (an atomic load) while it
// computes, and the op still completes, driven by the comm thread alone.
TEST(MpiComm, OverlapOpCompletesWhileMainThreadComputes) {
  Comm& c = *comms().world;
  const int n = c.size(), r = c.rank();
  const int64_t len = 4 << 20;  // 16 MiB of fp32
  std::vector<float> x(len, static_cast<float>(r + 1));
  Work w = c.all_reduce(x.data(), x.data(), len, DataType::kFloat32, ReduceOp::kSum);
  std::vector<double> y(1 << 14, 1.0);
  double acc = 0;
  int64_t chunks = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (!w.test()) {
    for (double& v : y) acc += v * 1.0000001, v = acc * 1e-9;  // compute, no MPI
    ++chunks;
    ASSERT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30)) << "op never done";
  }
  WAIT_OK(w);  // already done: returns at once
  EXPECT_TRUE(std::isfinite(acc));
  const float want = n * (n + 1) / 2.0f;
  for (int64_t i = 0; i < len; i += 4099) ASSERT_EQ(x[i], want);
  RecordProperty("compute_chunks_during_op", std::to_string(chunks));
  if (r == 0)
    std::printf("[ overlap ] %lld compute chunks ran while the all-reduce was in flight\n",
                static_cast<long long>(chunks));
}

TEST(MpiComm, AgreeIsMinOverRanks) {
  Comm& c = *comms().world;
  auto all = agree(c, true);
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(*all);
  auto one_bad = agree(c, c.rank() != c.size() - 1);
  ASSERT_TRUE(one_bad.ok());
  EXPECT_FALSE(*one_bad);  // every rank reaches the same decision
  auto ep = agree(*comms().ep, comms().ep->rank() == 0 || topo().coords().stage == 0);
  ASSERT_TRUE(ep.ok());
  EXPECT_EQ(*ep, topo().coords().stage == 0 || comms().ep->size() == 1);
}

TEST(MpiComm, InvalidArgumentsFailAtOnceNamingOpAndGroup) {
  Comm& c = *comms().world;
  float f = 0;
  Status s = c.send(&f, 1, DataType::kFloat32, c.size(), 0).wait();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find(fmt::format("send(to {} [not in world]", c.size())), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("on world"), std::string::npos) << s.message();
  uint16_t h = 0;
  s = c.all_reduce(&h, &h, 1, DataType::kBFloat16, ReduceOp::kSum).wait();
  EXPECT_NE(s.message().find("bf16 does not reduce"), std::string::npos) << s.message();
  std::vector<int64_t> three(c.size() + 1, 0);
  s = c.all_to_all_v(&f, three, &f, three, DataType::kFloat32).wait();
  EXPECT_NE(s.message().find("counts for a comm of"), std::string::npos) << s.message();
  s = c.recv(&f, -1, DataType::kFloat32, 0, 0).wait();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  // The comms still work afterwards (nothing was sent).
  ASSERT_TRUE(c.barrier().wait().ok());
}

TEST(MpiComm, CreateCommsRejectsMismatchedLayouts) {
  const int n = world().size, r = world().rank;
  // Wrong size: every rank fails locally, before any collective.
  auto bad = Topology::create(1, n + 1, 1, 1, 0);
  ASSERT_TRUE(bad.ok());
  auto set = create_comms(*bad, CommOptions{kTimeoutS});
  ASSERT_FALSE(set.ok());
  EXPECT_NE(set.status().message().find("ranks were started"), std::string::npos);
  // Ranks that disagree: detected by the timed layout check, the same error on every rank.
  if (n < 2) GTEST_SKIP() << "one rank cannot disagree with itself";
  auto t = Topology::create(1, n, 1, r == 0 ? n : 1, r);
  ASSERT_TRUE(t.ok());
  set = create_comms(*t, CommOptions{kTimeoutS});
  ASSERT_FALSE(set.ok());
  EXPECT_NE(set.status().message().find(fmt::format("ranks_per_node ranges over [1, {}]", n)),
            std::string::npos)
      << set.status().to_string();
}

}  // namespace
}  // namespace fp8pipe::parallel::mpitest
