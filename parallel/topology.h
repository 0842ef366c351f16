// Topology: the rank layout as a pure function of (pp, dp, ep, ranks_per_node, world rank) to this
// rank's coordinates and every group it belongs to (DESIGN.md §5, STYLE.md 3). No MPI: the CLI's
// --dry-run, the simulator and the tests compute any rank's layout without starting processes.
//
// Rank order: dp is innermost, then the pipeline stage, so  rank = stage · dp + dp_index.
//   - Expert-parallel all-to-all is the heaviest traffic, so an ep group is a contiguous block of
//     `ep` ranks inside one stage's dp group (ep divides dp): ep_group = dp_index / ep,
//     ep_index = dp_index % ep. Contiguous ranks share a node, so the all-to-all stays on NVLink
//     whenever ep <= ranks_per_node.
//   - The expert-dp group holds the replicas of one expert shard: the ranks of a stage with the
//     same ep_index (one per ep group); expert gradients are reduced over it.
//   - The pipeline (pp) group is one dp replica's stages: ranks {s · dp + dp_index}, its comm
//     rank equals the stage. Pipeline sends are point-to-point and light, so they may cross nodes.
//   - Nodes are blocks of `ranks_per_node` consecutive ranks (mpirun's default by-slot mapping).
//     An ep group must lie inside one node or cover whole nodes (ranks_per_node % ep == 0 or
//     ep % ranks_per_node == 0), so "the same local index on another node" — the two-level
//     dispatch's cross-node hop — is well defined and node-limited routing sees whole nodes.
// Within every group, ranks are listed ascending and a rank's comm rank is its position there.
//
// Worked example: pp=2, dp=4, ep=2, ranks_per_node=4 (world 8, two nodes, one stage per node):
//   rank stage dp ep_group ep_index node | pp     dp         ep     expert_dp  node
//   0    0     0  0        0        0    | {0,4}  {0,1,2,3}  {0,1}  {0,2}      {0,1,2,3}
//   1    0     1  0        1        0    | {1,5}  {0,1,2,3}  {0,1}  {1,3}      {0,1,2,3}
//   2    0     2  1        0        0    | {2,6}  {0,1,2,3}  {2,3}  {0,2}      {0,1,2,3}
//   3    0     3  1        1        0    | {3,7}  {0,1,2,3}  {2,3}  {1,3}      {0,1,2,3}
//   4    1     0  0        0        1    | {0,4}  {4,5,6,7}  {4,5}  {4,6}      {4,5,6,7}
//   5    1     1  0        1        1    | {1,5}  {4,5,6,7}  {4,5}  {5,7}      {4,5,6,7}
//   6    1     2  1        0        1    | {2,6}  {4,5,6,7}  {6,7}  {4,6}      {4,5,6,7}
//   7    1     3  1        1        1    | {3,7}  {4,5,6,7}  {6,7}  {5,7}      {4,5,6,7}
// (Topology::table() prints this for any layout; tests/parallel/topology_test.cc checks it.)
#pragma once

#include <array>
#include <string>
#include <vector>

#include "core/status.h"

namespace fp8pipe::parallel {

// The groups of a layout, in the fixed order in which communicators are created on every rank.
enum class GroupKind { kWorld, kPipeline, kData, kExpert, kExpertData, kNode };
inline constexpr std::array<GroupKind, 6> kGroupKinds = {
    GroupKind::kWorld,  GroupKind::kPipeline,   GroupKind::kData,
    GroupKind::kExpert, GroupKind::kExpertData, GroupKind::kNode};
const char* group_kind_name(GroupKind k);  // "world", "pp", "dp", "ep", "expert_dp", "node"

struct Group {
  GroupKind kind = GroupKind::kWorld;
  int id = 0;              // which group of this kind, 0-based (the MPI_Comm_split colour)
  std::vector<int> ranks;  // world ranks, ascending; a member's comm rank is its position here
  int index = 0;           // the position of the rank this Group was computed for
  std::string name;        // "ep[stage=0,group=1]": used in logs and error messages
  int size() const { return static_cast<int>(ranks.size()); }
};

struct Coords {
  int stage = 0;       // pipeline stage (the rank's position in its pp group)
  int dp_index = 0;    // data-parallel replica (position in its dp group)
  int ep_group = 0;    // which ep group of the stage (position in its expert_dp group)
  int ep_index = 0;    // expert shard (position in its ep group)
  int node = 0;        // node id
  int local_rank = 0;  // position in its node
};

class Topology {
 public:
  // Fails, before any work, on an invalid layout with the rule, the values and the valid choices.
  // ranks_per_node must be resolved (>= 1); config's 0 ("the ranks sharing a host") is resolved
  // by the caller (parallel/comm.h: MpiWorld::ranks_per_host).
  static Result<Topology> create(int pp, int dp, int ep, int ranks_per_node, int world_rank);

  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int ep() const { return ep_; }
  int ranks_per_node() const { return rpn_; }
  int world_size() const { return pp_ * dp_; }
  int rank() const { return rank_; }
  int nodes() const { return world_size() / rpn_; }
  int ep_nodes() const { return ep_ > rpn_ ? ep_ / rpn_ : 1; }  // nodes one ep group spans
  const Coords& coords() const { return coords_; }
  const Group& group(GroupKind k) const { return groups_[static_cast<int>(k)]; }

  // The same answers for any rank of the layout (pure; rank must be in [0, world_size)).
  int rank_of(int stage, int dp_index) const { return stage * dp_ + dp_index; }
  Coords coords_of(int rank) const;
  Group group_of(GroupKind k, int rank) const;
  std::vector<Group> all_groups(GroupKind k) const;  // every group of a kind, by id: a partition

  // One line per rank: coordinates and every group, as in the worked example above.
  std::string table() const;
  // The layout must cover exactly the ranks that were started; lists the valid (pp, dp) pairs.
  Status check_world_size(int started_ranks) const;

 private:
  Topology() = default;
  int pp_ = 1, dp_ = 1, ep_ = 1, rpn_ = 1, rank_ = 0;
  Coords coords_;
  std::array<Group, kGroupKinds.size()> groups_;
};

}  // namespace fp8pipe::parallel
