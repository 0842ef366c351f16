// Topology: rank order dp-innermost (rank = stage · dp + dp_index), ep groups as contiguous blocks
// inside a stage's dp group, nodes as blocks of consecutive ranks. Pure arithmetic; the layout
// rules and the worked example are in topology.h.
#include "parallel/topology.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace fp8pipe::parallel {
namespace {

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i) {
    if (n % i == 0) d.push_back(i);
  }
  return d;
}

bool ep_fits_nodes(int ep, int rpn) { return rpn % ep == 0 || ep % rpn == 0; }

Status check_sizes(int pp, int dp, int ep, int rpn) {
  if (pp < 1 || dp < 1 || ep < 1) {
    return FP8_INVALID("parallel layout: pp, dp and ep must be >= 1; got pp={}, dp={}, ep={}", pp,
                       dp, ep);
  }
  if (dp % ep != 0) {
    return FP8_INVALID(
        "parallel layout: ep must divide dp (experts are sharded over ep ranks inside each dp "
        "group); got ep={}, dp={}; valid ep for dp={}: {}",
        ep, dp, dp, fmt::join(divisors(dp), ", "));
  }
  const int world = pp * dp;
  if (rpn < 1 || world % rpn != 0) {
    return FP8_INVALID(
        "parallel layout: ranks_per_node must divide the world size pp·dp = {}·{} = {} (0, the "
        "ranks sharing a host, must be resolved before Topology::create); got ranks_per_node={}; "
        "valid: {}",
        pp, dp, world, rpn, fmt::join(divisors(world), ", "));
  }
  if (!ep_fits_nodes(ep, rpn)) {
    std::vector<int> ok;
    for (int e : divisors(dp)) {
      if (ep_fits_nodes(e, rpn)) ok.push_back(e);
    }
    return FP8_INVALID(
        "parallel layout: an ep group must lie inside one node or cover whole nodes "
        "(ranks_per_node % ep == 0 or ep % ranks_per_node == 0); got ep={}, ranks_per_node={}; "
        "valid ep for dp={}: {}",
        ep, rpn, dp, fmt::join(ok, ", "));
  }
  return Status::Ok();
}

}  // namespace

const char* group_kind_name(GroupKind k) {
  switch (k) {
    case GroupKind::kWorld:
      return "world";
    case GroupKind::kPipeline:
      return "pp";
    case GroupKind::kData:
      return "dp";
    case GroupKind::kExpert:
      return "ep";
    case GroupKind::kExpertData:
      return "expert_dp";
    case GroupKind::kNode:
      return "node";
  }
  return "?";
}

Result<Topology> Topology::create(int pp, int dp, int ep, int ranks_per_node, int world_rank) {
  FP8_RETURN_IF_ERROR(check_sizes(pp, dp, ep, ranks_per_node));
  if (world_rank < 0 || world_rank >= pp * dp) {
    return FP8_INVALID("parallel layout: world rank {} outside [0, pp·dp = {})", world_rank,
                       pp * dp);
  }
  Topology t;
  t.pp_ = pp;
  t.dp_ = dp;
  t.ep_ = ep;
  t.rpn_ = ranks_per_node;
  t.rank_ = world_rank;
  t.coords_ = t.coords_of(world_rank);
  for (GroupKind k : kGroupKinds) t.groups_[static_cast<int>(k)] = t.group_of(k, world_rank);
  return t;
}

Coords Topology::coords_of(int rank) const {
  Coords c;
  c.stage = rank / dp_;
  c.dp_index = rank % dp_;
  c.ep_group = c.dp_index / ep_;
  c.ep_index = c.dp_index % ep_;
  c.node = rank / rpn_;
  c.local_rank = rank % rpn_;
  return c;
}

Group Topology::group_of(GroupKind k, int rank) const {
  const Coords c = coords_of(rank);
  Group g;
  g.kind = k;
  switch (k) {
    case GroupKind::kWorld:
      for (int r = 0; r < world_size(); ++r) g.ranks.push_back(r);
      g.name = "world";
      break;
    case GroupKind::kPipeline:
      g.id = c.dp_index;
      for (int s = 0; s < pp_; ++s) g.ranks.push_back(rank_of(s, c.dp_index));
      g.name = fmt::format("pp[dp={}]", c.dp_index);
      break;
    case GroupKind::kData:
      g.id = c.stage;
      for (int d = 0; d < dp_; ++d) g.ranks.push_back(rank_of(c.stage, d));
      g.name = fmt::format("dp[stage={}]", c.stage);
      break;
    case GroupKind::kExpert:
      g.id = c.stage * (dp_ / ep_) + c.ep_group;
      for (int e = 0; e < ep_; ++e) g.ranks.push_back(rank_of(c.stage, c.ep_group * ep_ + e));
      g.name = fmt::format("ep[stage={},group={}]", c.stage, c.ep_group);
      break;
    case GroupKind::kExpertData:
      g.id = c.stage * ep_ + c.ep_index;
      for (int j = 0; j < dp_ / ep_; ++j) g.ranks.push_back(rank_of(c.stage, j * ep_ + c.ep_index));
      g.name = fmt::format("expert_dp[stage={},ep_index={}]", c.stage, c.ep_index);
      break;
    case GroupKind::kNode:
      g.id = c.node;
      for (int l = 0; l < rpn_; ++l) g.ranks.push_back(c.node * rpn_ + l);
      g.name = fmt::format("node[{}]", c.node);
      break;
  }
  for (int i = 0; i < g.size(); ++i) {
    if (g.ranks[i] == rank) g.index = i;
  }
  return g;
}

std::vector<Group> Topology::all_groups(GroupKind k) const {
  std::vector<Group> out;
  for (int r = 0; r < world_size(); ++r) {
    Group g = group_of(k, r);
    if (g.id >= static_cast<int>(out.size())) out.resize(g.id + 1);
    if (out[g.id].ranks.empty()) {
      g.index = 0;
      out[g.id] = std::move(g);
    }
  }
  return out;
}

std::string Topology::table() const {
  std::string s = fmt::format(
      "pp={} dp={} ep={} ranks_per_node={} (world {}, {} nodes)\n"
      "rank stage dp ep_group ep_index node | pp | dp | ep | expert_dp | node\n",
      pp_, dp_, ep_, rpn_, world_size(), nodes());
  for (int r = 0; r < world_size(); ++r) {
    const Coords c = coords_of(r);
    s += fmt::format("{} {} {} {} {} {}", r, c.stage, c.dp_index, c.ep_group, c.ep_index, c.node);
    for (GroupKind k : kGroupKinds) {
      if (k == GroupKind::kWorld) continue;
      s += fmt::format(" | {{{}}}", fmt::join(group_of(k, r).ranks, ","));
    }
    s += "\n";
  }
  return s;
}

Status Topology::check_world_size(int started_ranks) const {
  if (started_ranks == world_size()) return Status::Ok();
  std::vector<std::string> pairs;
  for (int p : divisors(started_ranks)) {
    const int d = started_ranks / p;
    if (d % ep_ == 0) pairs.push_back(fmt::format("pp={} dp={}", p, d));
  }
  return Status(Code::kInvalidArgument,
                fmt::format("parallel layout: pp·dp = {}·{} = {} but {} ranks were started; valid "
                            "(pp, dp) for {} ranks with ep={}: {}",
                            pp_, dp_, world_size(), started_ranks, started_ranks, ep_,
                            pairs.empty() ? "none" : fmt::format("{}", fmt::join(pairs, "; "))),
                fmt::format("start {} ranks (mpirun -np {}) or change parallel.pp / parallel.dp",
                            world_size(), world_size()));
}

}  // namespace fp8pipe::parallel
