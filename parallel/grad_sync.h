// Summing the copies of every parameter by global name: a parameter lives on the dp replicas of
// each pipeline rank whose chunks hold it (DualPipe keeps every stage on two ranks; the embedding
// sits in the first stage and, for MTP, in the last). Every copy ends with the sum over all of
// them, so replicas stay identical after identical optimizer steps. Also used for the MoE expert
// loads behind the router-bias update. Pure layout logic (holders_of) plus a two-phase
// point-to-point exchange on the world communicator: members send to the set's lowest rank, which
// sums in rank order (deterministic) and sends the result back.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/model/transformer.h"
#include "parallel/comm.h"
#include "parallel/schedule.h"
#include "parallel/topology.h"

namespace fp8pipe::parallel {

// World ranks holding global parameter `name`, ascending. A routed expert's parameters
// ("...experts.<e>...") live only on the ranks whose ep_index owns expert e (routed_experts / ep
// experts each, in order); 0 routed_experts: no expert sharding.
std::vector<int> holders_of(const std::string& name, const Schedule& s,
                            const std::vector<model::ModelPart>& stages, const Topology& topo,
                            int64_t routed_experts = 0);
// The routed expert a parameter name belongs to ("layers.3.ffn.experts.5.w1.weight" -> 5), or -1.
int expert_of(const std::string& name);

struct SyncEntry {
  std::string name;
  std::vector<double*> copies;  // this rank's local copies (one per chunk holding it)
  int64_t numel = 0;
};

class NameSync {
 public:
  // entries: this rank's named buffers; holders[name] = the world ranks holding that name.
  NameSync(std::vector<SyncEntry> entries, std::map<std::string, std::vector<int>> holders,
           int world_rank, Comm* world);
  // Every copy := the sum over all copies on all holders, in fp64. Deterministic.
  Status all_reduce_sum() { return sum(false); }
  // ZeRO-1's reduce-scatter: the same sums, but each holder (position i of n in its holders)
  // receives only optim::shard_range(numel, i, n) of each name, the rest of its copies being
  // stale; the lowest holder (the leader) has the whole sum. Half the traffic of all_reduce_sum.
  Status reduce_scatter_sum() { return sum(true); }
  // True when this rank is the lowest holder of `name` (to count a name once globally).
  bool is_leader(const std::string& name) const;

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<const SyncEntry*> entries;  // in name order
    int64_t numel = 0;
  };
  Status sum(bool scatter);
  std::vector<SyncEntry> entries_;
  std::map<std::string, std::vector<int>> holders_;
  std::vector<Set> sets_;  // sorted by their first name: the same order on every rank
  int rank_;
  Comm* world_;
};

// ZeRO-1's parameter all-gather by global name: holder i (of n, in holders_of order) of a name
// owns optim::shard_range(numel, i, n) of it and has just updated that shard; afterwards every
// holder has every shard (fp32, in place). Point-to-point on the world communicator, one message
// per (set of holders, pair of members) carrying all that set's names.
struct GatherEntry {
  std::string name;
  float* data = nullptr;  // this rank's full copy
  int64_t numel = 0;
};

class ShardGather {
 public:
  ShardGather(std::vector<GatherEntry> entries, std::map<std::string, std::vector<int>> holders,
              int world_rank, Comm* world);
  Status all_gather();

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<const GatherEntry*> entries;  // in name order
  };
  std::vector<GatherEntry> entries_;
  std::vector<Set> sets_;
  int rank_;
  Comm* world_;
};

}  // namespace fp8pipe::parallel
