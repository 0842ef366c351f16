// The backend-independent half of Comm, without MPI: Work completion across threads, the timeout
// error (op, group, recent ops, hint), wait_all, and the wire types. Real multi-process tests of
// the MPI backend are in tests/parallel/mpi/ (CTest mpi.*, run under mpirun).
#include "parallel/comm.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

namespace fp8pipe::parallel {
namespace {

TEST(Work, DefaultIsDoneAndFailedCarriesStatus) {
  Work w;
  EXPECT_TRUE(w.test());
  EXPECT_TRUE(w.wait().ok());
  Work f = Work::failed(FP8_INVALID("bad peer {}", 9));
  EXPECT_TRUE(f.test());
  EXPECT_EQ(f.wait().code(), Code::kInvalidArgument);
  EXPECT_EQ(f.wait().message(), "bad peer 9");
}

TEST(Work, CompletesFromAnotherThread) {
  auto st = std::make_shared<WorkState>("recv(from 1, tag 0, 4 x fp32) on world (op #1)", 10.0);
  Work w(st);
  EXPECT_FALSE(w.test());
  std::thread t([st] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    st->complete(Status::Ok());
    st->complete(FP8_INVALID("ignored: completes once"));
  });
  EXPECT_TRUE(w.wait().ok());
  EXPECT_TRUE(w.test());
  t.join();
  EXPECT_TRUE(w.wait().ok());
}

TEST(Work, TimeoutNamesOpGroupHistoryAndHint) {
  auto st = std::make_shared<WorkState>(
      "recv(from 1 [world 3], tag 7, 4 x fp32) on ep[stage=0,group=1] (op #12)", 0.05,
      [] { return std::string("    #11 world barrier(): done\n"); });
  Work w(st);
  const auto t0 = std::chrono::steady_clock::now();
  Status s = w.wait();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(dt, 0.05);
  EXPECT_LT(dt, 2.0);
  ASSERT_EQ(s.code(), Code::kAborted);
  EXPECT_NE(s.message().find("comm timeout: recv(from 1 [world 3], tag 7"), std::string::npos);
  EXPECT_NE(s.message().find("on ep[stage=0,group=1] (op #12) not done after 0.05 s"),
            std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("#11 world barrier(): done"), std::string::npos);
  EXPECT_NE(s.hint().find("fault.timeout_s"), std::string::npos);
  // The op is still in flight after a timeout: it may complete and a later wait succeeds.
  st->complete(Status::Ok());
  EXPECT_TRUE(w.wait_for(0.0).ok());
}

TEST(Work, WaitAllStopsAtFirstError) {
  std::vector<Work> ws = {Work(), Work::failed(FP8_INVALID("first")),
                          Work::failed(FP8_INVALID("second"))};
  Status s = wait_all(ws);
  EXPECT_EQ(s.message(), "first");
  EXPECT_TRUE(wait_all(std::vector<Work>{Work(), Work()}).ok());
}

TEST(DataType, SizesAndReducibility) {
  EXPECT_EQ(data_type_size(DataType::kFloat32), 4);
  EXPECT_EQ(data_type_size(DataType::kFloat64), 8);
  EXPECT_EQ(data_type_size(DataType::kInt64), 8);
  EXPECT_EQ(data_type_size(DataType::kBFloat16), 2);
  EXPECT_EQ(data_type_size(DataType::kByte), 1);
  EXPECT_TRUE(data_type_reducible(DataType::kInt64));
  EXPECT_FALSE(data_type_reducible(DataType::kBFloat16));
  EXPECT_FALSE(data_type_reducible(DataType::kByte));
  EXPECT_STREQ(reduce_op_name(ReduceOp::kMin), "min");
}

}  // namespace
}  // namespace fp8pipe::parallel
