// Topology is a pure function of sizes and world rank: the worked example of topology.h, every
// group kind partitions the world with consistent coordinates, and invalid layouts fail with the
// rule, the values and the valid choices.
#include "parallel/topology.h"

#include <gtest/gtest.h>

#include <map>
#include <set>

namespace fp8pipe::parallel {
namespace {

Topology make(int pp, int dp, int ep, int rpn, int rank) {
  auto t = Topology::create(pp, dp, ep, rpn, rank);
  EXPECT_TRUE(t.ok()) << t.status().to_string();
  return std::move(t).value();
}

std::string error_of(int pp, int dp, int ep, int rpn, int rank = 0) {
  auto t = Topology::create(pp, dp, ep, rpn, rank);
  EXPECT_FALSE(t.ok());
  return t.ok() ? std::string() : t.status().message();
}

using V = std::vector<int>;

TEST(Topology, WorkedExampleFromHeader) {
  // pp=2, dp=4, ep=2, ranks_per_node=4: the table in parallel/topology.h.
  const V stage = {0, 0, 0, 0, 1, 1, 1, 1}, dpi = {0, 1, 2, 3, 0, 1, 2, 3};
  const V ep_group = {0, 0, 1, 1, 0, 0, 1, 1}, ep_index = {0, 1, 0, 1, 0, 1, 0, 1};
  const std::vector<V> pp = {{0, 4}, {1, 5}, {2, 6}, {3, 7}, {0, 4}, {1, 5}, {2, 6}, {3, 7}};
  const std::vector<V> ep = {{0, 1}, {0, 1}, {2, 3}, {2, 3}, {4, 5}, {4, 5}, {6, 7}, {6, 7}};
  const std::vector<V> edp = {{0, 2}, {1, 3}, {0, 2}, {1, 3}, {4, 6}, {5, 7}, {4, 6}, {5, 7}};
  for (int r = 0; r < 8; ++r) {
    Topology t = make(2, 4, 2, 4, r);
    const Coords& c = t.coords();
    EXPECT_EQ(c.stage, stage[r]);
    EXPECT_EQ(c.dp_index, dpi[r]);
    EXPECT_EQ(c.ep_group, ep_group[r]);
    EXPECT_EQ(c.ep_index, ep_index[r]);
    EXPECT_EQ(c.node, r / 4);
    EXPECT_EQ(c.local_rank, r % 4);
    EXPECT_EQ(t.group(GroupKind::kPipeline).ranks, pp[r]) << r;
    EXPECT_EQ(t.group(GroupKind::kData).ranks, (r < 4 ? V{0, 1, 2, 3} : V{4, 5, 6, 7})) << r;
    EXPECT_EQ(t.group(GroupKind::kExpert).ranks, ep[r]) << r;
    EXPECT_EQ(t.group(GroupKind::kExpertData).ranks, edp[r]) << r;
    EXPECT_EQ(t.group(GroupKind::kNode).ranks, (r < 4 ? V{0, 1, 2, 3} : V{4, 5, 6, 7})) << r;
    EXPECT_EQ(t.group(GroupKind::kWorld).size(), 8);
    // A rank's position in each group is its coordinate along that axis.
    EXPECT_EQ(t.group(GroupKind::kPipeline).index, c.stage);
    EXPECT_EQ(t.group(GroupKind::kData).index, c.dp_index);
    EXPECT_EQ(t.group(GroupKind::kExpert).index, c.ep_index);
    EXPECT_EQ(t.group(GroupKind::kExpertData).index, c.ep_group);
    EXPECT_EQ(t.group(GroupKind::kNode).index, c.local_rank);
    EXPECT_EQ(t.group(GroupKind::kWorld).index, r);
  }
  Topology t = make(2, 4, 2, 4, 5);
  EXPECT_EQ(t.group(GroupKind::kExpert).name, "ep[stage=1,group=0]");
  EXPECT_EQ(t.group(GroupKind::kExpertData).name, "expert_dp[stage=1,ep_index=1]");
  EXPECT_EQ(t.nodes(), 2);
  EXPECT_EQ(t.ep_nodes(), 1);
  EXPECT_NE(t.table().find("5 1 1 0 1 1 | {1,5} | {4,5,6,7} | {4,5} | {5,7} | {4,5,6,7}"),
            std::string::npos)
      << t.table();
}

// Every kind's groups are disjoint, cover the world, agree with group_of() for each member and
// have the expected count and size.
void check_partitions(int pp, int dp, int ep, int rpn) {
  SCOPED_TRACE(testing::Message() << "pp=" << pp << " dp=" << dp << " ep=" << ep << " rpn=" << rpn);
  const Topology t = make(pp, dp, ep, rpn, 0);
  const int world = pp * dp;
  const std::map<GroupKind, std::pair<int, int>> shape = {
      {GroupKind::kWorld, {1, world}},
      {GroupKind::kPipeline, {dp, pp}},
      {GroupKind::kData, {pp, dp}},
      {GroupKind::kExpert, {world / ep, ep}},
      {GroupKind::kExpertData, {pp * ep, dp / ep}},
      {GroupKind::kNode, {world / rpn, rpn}}};
  for (GroupKind k : kGroupKinds) {
    const auto groups = t.all_groups(k);
    ASSERT_EQ(static_cast<int>(groups.size()), shape.at(k).first) << group_kind_name(k);
    std::set<int> seen;
    for (const Group& g : groups) {
      ASSERT_EQ(g.size(), shape.at(k).second) << g.name;
      for (int i = 0; i < g.size(); ++i) {
        const int r = g.ranks[i];
        EXPECT_TRUE(seen.insert(r).second) << "rank " << r << " twice in " << group_kind_name(k);
        const Group mine = t.group_of(k, r);
        EXPECT_EQ(mine.id, g.id);
        EXPECT_EQ(mine.ranks, g.ranks);
        EXPECT_EQ(mine.index, i);
      }
    }
    EXPECT_EQ(static_cast<int>(seen.size()), world) << group_kind_name(k);
  }
  // Coordinates round-trip and ep groups never straddle a node boundary partially.
  for (int r = 0; r < world; ++r) {
    const Coords c = t.coords_of(r);
    EXPECT_EQ(t.rank_of(c.stage, c.dp_index), r);
    EXPECT_EQ(c.dp_index, c.ep_group * ep + c.ep_index);
    std::set<int> nodes;
    for (int m : t.group_of(GroupKind::kExpert, r).ranks) nodes.insert(m / rpn);
    EXPECT_EQ(static_cast<int>(nodes.size()), t.ep_nodes());
  }
}

TEST(Topology, EveryGroupPartitionsTheWorld) {
  check_partitions(1, 1, 1, 1);
  check_partitions(2, 4, 2, 4);
  check_partitions(4, 8, 4, 8);
  check_partitions(3, 4, 4, 2);   // ep spans 2 nodes (two-level dispatch)
  check_partitions(2, 16, 8, 8);  // DSV3-like slice
  check_partitions(16, 8, 8, 8);
  check_partitions(2, 6, 3, 3);
  check_partitions(5, 1, 1, 5);  // pp group spans a whole node
}

TEST(Topology, LargeLayoutIsCheap) {
  // DSV3: 2048 GPUs as pp=16, dp=128, ep=64, 8 per node.
  Topology t = make(16, 128, 64, 8, 2047);
  EXPECT_EQ(t.coords().stage, 15);
  EXPECT_EQ(t.coords().ep_index, 63);
  EXPECT_EQ(t.ep_nodes(), 8);
  EXPECT_EQ(t.group(GroupKind::kExpertData).size(), 2);
  EXPECT_EQ(t.all_groups(GroupKind::kExpert).size(), 32u);
}

TEST(Topology, InvalidLayoutsNameRuleValuesAndChoices) {
  std::string m = error_of(2, 4, 3, 4);
  EXPECT_NE(m.find("ep must divide dp"), std::string::npos) << m;
  EXPECT_NE(m.find("ep=3, dp=4"), std::string::npos) << m;
  EXPECT_NE(m.find("valid ep for dp=4: 1, 2, 4"), std::string::npos) << m;

  m = error_of(2, 4, 2, 3);
  EXPECT_NE(m.find("ranks_per_node must divide the world size pp·dp = 2·4 = 8"), std::string::npos)
      << m;
  EXPECT_NE(m.find("valid: 1, 2, 4, 8"), std::string::npos) << m;

  m = error_of(1, 12, 4, 6);  // ep=4 straddles 6-rank nodes
  EXPECT_NE(m.find("inside one node or cover whole nodes"), std::string::npos) << m;
  EXPECT_NE(m.find("got ep=4, ranks_per_node=6"), std::string::npos) << m;
  EXPECT_NE(m.find("valid ep for dp=12: 1, 2, 3, 6, 12"), std::string::npos) << m;

  m = error_of(0, 4, 1, 4);
  EXPECT_NE(m.find("must be >= 1; got pp=0"), std::string::npos) << m;
  m = error_of(2, 4, 2, 0);
  EXPECT_NE(m.find("must be resolved"), std::string::npos) << m;
  m = error_of(2, 4, 2, 4, 8);
  EXPECT_NE(m.find("world rank 8 outside [0, pp·dp = 8)"), std::string::npos) << m;
  EXPECT_EQ(Topology::create(2, 4, 2, 4, 0).status().code(), Code::kOk);
  EXPECT_EQ(Topology::create(2, 4, 3, 4, 0).status().code(), Code::kInvalidArgument);
}

TEST(Topology, WorldSizeMismatchListsValidPairs) {
  const Topology t = make(2, 4, 2, 4, 0);
  EXPECT_TRUE(t.check_world_size(8).ok());
  const Status s = t.check_world_size(12);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("pp·dp = 2·4 = 8 but 12 ranks were started"), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("pp=1 dp=12; pp=2 dp=6; pp=3 dp=4; pp=6 dp=2"), std::string::npos)
      << s.message();
  EXPECT_NE(s.hint().find("mpirun -np 8"), std::string::npos);
}

}  // namespace
}  // namespace fp8pipe::parallel
