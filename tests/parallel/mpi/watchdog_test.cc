// Fault basics in real processes: a receive nobody sends fails within the timeout, naming the op,
// the peer and group and listing recent ops, and MPI stays usable (the late send then completes
// it); the comm's default timeout comes from CommOptions (fault.timeout_s). abort_all() runs in
// its own mpirun (CTest mpi.abort_all), since it ends every rank.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tests/parallel/mpi/mpi_env.h"

namespace fp8pipe::parallel::mpitest {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Posts a receive from the previous rank that is not sent yet, checks the timeout error, then
// has every rank send the matching message and checks that the same op completes.
void timeout_then_recover(Comm& c, double timeout_s, bool explicit_timeout) {
  const int n = c.size(), r = c.rank(), prev = (r + n - 1) % n, next = (r + 1) % n;
  int64_t got = -1;
  Work w = c.recv(&got, 1, DataType::kInt64, prev, 777);
  const auto t0 = std::chrono::steady_clock::now();
  Status s = explicit_timeout ? w.wait_for(timeout_s) : w.wait();
  const double dt = seconds_since(t0);
  ASSERT_EQ(s.code(), Code::kAborted) << s.to_string();
  EXPECT_GE(dt, timeout_s * 0.9);
  EXPECT_LT(dt, timeout_s + 2.0);
  const std::string& m = s.message();
  EXPECT_NE(m.find(fmt::format("comm timeout: recv(from {} [world {}], tag 777", prev,
                               c.group().ranks[prev])),
            std::string::npos)
      << m;
  EXPECT_NE(m.find(fmt::format("on {} (op #", c.name())), std::string::npos) << m;
  EXPECT_NE(m.find("last comm ops of this rank"), std::string::npos) << m;
  EXPECT_NE(m.find("tag 777, 1 x int64): started"), std::string::npos) << m;
  EXPECT_FALSE(s.hint().empty());
  if (explicit_timeout && world().rank == 0)
    std::printf("[ watchdog ] %s\n", s.to_string().c_str());
  // Recover: everyone has timed out once the barrier completes; then the late send matches.
  ASSERT_TRUE(c.barrier().wait().ok());
  const int64_t mine = r * 11;
  Work snd = c.send(&mine, 1, DataType::kInt64, next, 777);
  Status again = w.wait();
  ASSERT_TRUE(again.ok()) << again.to_string();
  ASSERT_TRUE(snd.wait().ok());
  EXPECT_EQ(got, prev * 11);
}

TEST(MpiWatchdog, RecvWithoutSendTimesOutNamingOpThenRecovers) {
  timeout_then_recover(*comms().world, 0.5, /*explicit_timeout=*/true);
  // The comms are still healthy.
  auto ok = agree(*comms().world, true);
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(*ok);
}

TEST(MpiWatchdog, DefaultTimeoutComesFromCommOptions) {
  // A second CommSet over the same layout shares the process's comm thread.
  auto set = create_comms(topo(), CommOptions{0.3});
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(set->ep->timeout_s(), 0.3);
  timeout_then_recover(*set->ep, 0.3, /*explicit_timeout=*/false);
  timeout_then_recover(*set->dp, 0.3, /*explicit_timeout=*/false);
}

// A collective that one rank has not joined yet: the others' timeout names it (the census asks
// every member; the late rank's comm thread answers while its compute thread is busy), and
// reports the others as having the collective in flight. Then the late rank joins and the same
// all-reduce completes with the right sum.
TEST(MpiWatchdog, CollectiveTimeoutNamesTheRankThatHasNotJoined) {
  Comm& c = *comms().world;
  const int n = c.size(), last = n - 1, me = c.rank();
  int64_t mine = me + 1, sum = 0;
  if (me == last) std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // "computing"
  Work w = c.all_reduce(&mine, &sum, 1, DataType::kInt64, ReduceOp::kSum);
  if (me != last) {
    Status s = w.wait_for(0.4);
    ASSERT_EQ(s.code(), Code::kAborted) << s.to_string();
    const std::string& m = s.message();
    const std::string first = m.substr(0, m.find('\n'));
    EXPECT_NE(first.find(
                  fmt::format("not yet issued by rank {} [world {}]", last, c.group().ranks[last])),
              std::string::npos)
        << m;
    EXPECT_EQ(first.find("no answer"), std::string::npos) << m;
    EXPECT_NE(m.find(fmt::format("rank {} [world {}]: has not issued collective #", last,
                                 c.group().ranks[last])),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("no comm op in flight"), std::string::npos) << m;
    for (int o = 0; o < n; ++o) {
      if (o == me || o == last) continue;
      EXPECT_NE(m.find(fmt::format("rank {} [world {}]: has collective #", o, c.group().ranks[o])),
                std::string::npos)
          << m;
    }
    if (me == 0) std::printf("[ census ] %s\n", s.to_string().c_str());
  }
  Status done = w.wait();
  ASSERT_TRUE(done.ok()) << done.to_string();
  EXPECT_EQ(sum, int64_t{n} * (n + 1) / 2);
}

TEST(MpiWatchdog, InvalidTimeoutIsRejected) {
  auto set = create_comms(topo(), CommOptions{0});
  ASSERT_FALSE(set.ok());
  EXPECT_NE(set.status().message().find("fault.timeout_s must be > 0"), std::string::npos);
}

// Run alone by CTest mpi.abort_all (disabled here): the last rank fails and calls abort_all();
// the others wait on a receive that never comes and must be ended by MPI_Abort long before the
// wait's own 60 s timeout.
TEST(MpiAbort, DISABLED_AbortAllEndsEveryRank) {
  Comm& c = *comms().world;
  const int last = c.size() - 1;
  if (c.rank() == last) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    abort_all(FP8_ERROR(Code::kInternal, "injected fault on rank {}", last));
  }
  int64_t never = 0;
  Status s = c.recv(&never, 1, DataType::kInt64, last, 1).wait_for(60);
  ADD_FAILURE() << "still running after abort_all: " << s.to_string();
}

}  // namespace
}  // namespace fp8pipe::parallel::mpitest
