#include "parallel/grad_sync.h"

#include <algorithm>
#include <cstdlib>

#include "optim/adamw.h"
#include "parallel/executor.h"

namespace fp8pipe::parallel {
std::vector<int> stages_holding(const std::string& name,
                                const std::vector<model::ModelPart>& stages) {
  std::vector<int> out;
  const int S = static_cast<int>(stages.size());
  if (name.rfind("layers.", 0) == 0) {
    const int block = std::stoi(name.substr(7));
    for (int s = 0; s < S; ++s)
      if (block >= stages[s].block_begin && block < stages[s].block_end) out.push_back(s);
  } else if (name.rfind("embed.", 0) == 0) {
    for (int s = 0; s < S; ++s)
      if (stages[s].embed || stages[s].head) out.push_back(s);
  } else {
    out.push_back(S - 1);  // final norm, head, MTP modules
  }
  return out;
}

namespace {

// Where a name goes: its holders and its key (SetKey).
using SetIndex = std::map<std::pair<std::vector<int>, std::vector<int>>, size_t>;
std::pair<std::vector<int>, std::vector<int>> set_key(const std::vector<int>& ranks,
                                                      const SetKey& key, const std::string& name) {
  return {ranks, key ? key(name) : std::vector<int>{}};
}

}  // namespace

int expert_of(const std::string& name) {
  static const std::string kKey = ".experts.";
  const size_t at = name.find(kKey);
  if (at == std::string::npos) return -1;
  size_t end = at + kKey.size();
  int e = 0;
  bool digits = false;
  for (; end < name.size() && name[end] >= '0' && name[end] <= '9'; ++end, digits = true)
    e = e * 10 + (name[end] - '0');
  return digits ? e : -1;
}

std::vector<int> holders_of(const std::string& name, const Schedule& s,
                            const std::vector<model::ModelPart>& stages, const Topology& topo,
                            int64_t routed_experts) {
  const int e = expert_of(name);
  const int owner =
      e >= 0 && routed_experts > 0 && topo.ep() > 1 ? e / (routed_experts / topo.ep()) : -1;
  std::vector<int> ranks;
  for (int st : stages_holding(name, stages)) {
    for (int dir = 0; dir < chunks_per_rank(s); ++dir) {
      for (int r = 0; r < s.ranks; ++r) {
        if (stage_of(s, r, dir) != st) continue;
        for (int d = 0; d < topo.dp(); ++d) {
          const int rank = topo.rank_of(r, d);
          if (owner < 0 || topo.coords_of(rank).ep_index == owner) ranks.push_back(rank);
        }
      }
    }
  }
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  return ranks;
}

std::vector<int> dirs_holding(const std::string& name, const Schedule& s,
                              const std::vector<model::ModelPart>& stages, int pp_rank) {
  std::vector<int> dirs;
  for (int st : stages_holding(name, stages))
    for (int dir = 0; dir < chunks_per_rank(s); ++dir)
      if (stage_of(s, pp_rank, dir) == st) dirs.push_back(dir);
  std::sort(dirs.begin(), dirs.end());
  dirs.erase(std::unique(dirs.begin(), dirs.end()), dirs.end());
  return dirs;
}

GradOverlap::GradOverlap(SetExchange& ex, int world_rank, DirsOf dirs_of,
                         std::function<int(int)> pp_of)
    : ex_(ex), rank_(world_rank), dirs_of_(std::move(dirs_of)), pp_of_(std::move(pp_of)) {
  local_dirs_.resize(ex_.sets());
  for (size_t k = 0; k < ex_.sets(); ++k) {
    auto& d = local_dirs_[k];
    for (const std::string& name : ex_.set_names(k))
      for (int dir : dirs_of_(rank_, name)) d.push_back(dir);
    std::sort(d.begin(), d.end());
    d.erase(std::unique(d.begin(), d.end()), d.end());
  }
}

void GradOverlap::begin(const Schedule& s, const P2pPlan* plan) {
  matched_ = plan != nullptr;
  next_ = 0;
  started_ = hidden_ = 0;
  final_.assign(chunks_per_rank(s), false);
  for (size_t d = 0; d < final_.size(); ++d)  // a chunk without backward work is final already
    final_[d] = PipelineExecutor::last_grad_instr(s, pp_of_(rank_), static_cast<int>(d)) < 0;
  order_.resize(ex_.sets());
  for (size_t k = 0; k < order_.size(); ++k) order_[k] = k;
  if (!matched_) return;
  if (rounds_for_ != &s) {
    round_.assign(ex_.sets(), 0);
    for (size_t k = 0; k < ex_.sets(); ++k) {
      const auto names = ex_.set_names(k);
      for (int m : ex_.set_ranks(k)) {
        const int p = pp_of_(m);
        std::vector<int> dirs;
        for (const std::string& name : names)
          for (int dir : dirs_of_(m, name)) dirs.push_back(dir);
        for (int dir : dirs)
          round_[k] = std::max(round_[k],
                               round_after(*plan, p, PipelineExecutor::last_grad_instr(s, p, dir)));
      }
    }
    rounds_for_ = &s;
  }
  std::stable_sort(order_.begin(), order_.end(),
                   [&](size_t a, size_t b) { return round_[a] < round_[b]; });
}

int GradOverlap::round_after(const P2pPlan& plan, int p, int i) {
  int last = -1;  // rounds never go back along a rank's points
  for (const P2pPoint& pt : plan.ranks[p])
    if (pt.at <= i && !pt.groups.empty()) last = pt.groups.back().round;
  return last + 1;
}

Status GradOverlap::start(size_t k, bool more_compute) {
  FP8_RETURN_IF_ERROR(ex_.start(k));
  if (ex_.set_ranks(k).size() >= 2 && !ending_) {
    ++started_;
    if (more_compute) ++hidden_;
  }
  return Status::Ok();
}

Status GradOverlap::end() {
  ending_ = true;
  Status s = before_round(kEnd, false);
  ending_ = false;
  return s;
}

Status GradOverlap::chunk_final(int dir, bool more_compute) {
  if (dir < 0 || dir >= static_cast<int>(final_.size()))
    return FP8_ERROR(Code::kInternal, "gradient overlap: chunk {} of {}", dir, final_.size());
  final_[dir] = true;
  if (matched_) return Status::Ok();  // posted at rounds (before_round)
  for (size_t k = 0; k < ex_.sets(); ++k) {
    if (ex_.started(k)) continue;
    bool ready = true;
    for (int d : local_dirs_[k]) ready = ready && final_[d];
    if (!ready) continue;
    FP8_RETURN_IF_ERROR(start(k, more_compute));
  }
  return Status::Ok();
}

int GradOverlap::local_sets() const {
  int n = 0;
  for (size_t k = 0; k < ex_.sets(); ++k) n += ex_.set_ranks(k).size() >= 2 ? 1 : 0;
  return n;
}

Status GradOverlap::before_round(int round, bool more_compute) {
  for (; next_ < order_.size() && (!matched_ || round_[order_[next_]] <= round); ++next_) {
    const size_t k = order_[next_];
    if (ex_.started(k)) continue;
    for (int d : local_dirs_[k]) {
      if (round < kEnd && !final_[d]) {  // the rounds promise the chunks are done
        return FP8_ERROR(Code::kInternal,
                         "gradient overlap: set {} planned at round {} before chunk {} of rank {} "
                         "is final",
                         k, round_[k], d, rank_);
      }
    }
    FP8_RETURN_IF_ERROR(start(k, more_compute));
  }
  return Status::Ok();
}

NameSync::NameSync(std::vector<SyncEntry> entries, std::map<std::string, std::vector<int>> holders,
                   int world_rank, Comm* world, const SetKey& key)
    : entries_(std::move(entries)), holders_(std::move(holders)), rank_(world_rank), world_(world) {
  std::sort(entries_.begin(), entries_.end(),
            [](const SyncEntry& a, const SyncEntry& b) { return a.name < b.name; });
  SetIndex index;
  for (const SyncEntry& e : entries_) {
    const auto& ranks = holders_[e.name];
    auto [it, fresh] = index.try_emplace(set_key(ranks, key, e.name), sets_.size());
    if (fresh) {
      const int me = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank_) - ranks.begin());
      sets_.push_back({ranks, {}, 0, me});
    }
    sets_[it->second].entries.push_back(&e);
    sets_[it->second].numel += e.numel;
  }
  flights_.resize(sets_.size());
}

std::vector<std::string> NameSync::set_names(size_t k) const {
  std::vector<std::string> out;
  for (const SyncEntry* e : sets_[k].entries) out.push_back(e->name);
  return out;
}

bool NameSync::is_leader(const std::string& name) const {
  auto it = holders_.find(name);
  return it == holders_.end() || it->second.empty() || it->second.front() == rank_;
}

// The local copies' sum into the first copy.
void NameSync::sum_local() {
  for (const Set& set : sets_) sum_local(set);
}

void NameSync::sum_local(const Set& set) {
  for (const SyncEntry* e : set.entries)
    for (size_t c = 1; c < e->copies.size(); ++c)
      for (int64_t i = 0; i < e->numel; ++i) e->copies[0][i] += e->copies[c][i];
}

// Every copy := the sum, through the lowest holder: members send their sums to it, it adds them
// in rank order and sends every member the total.
Status NameSync::all_reduce_sum() {
  sum_local();
  std::vector<std::vector<double>> mine(sets_.size());
  std::vector<std::vector<std::vector<double>>> theirs(sets_.size());
  std::vector<Work> phase1, phase2;
  for (size_t k = 0; k < sets_.size(); ++k) {  // phase 1: members -> leader
    const Set& set = sets_[k];
    if (set.ranks.size() < 2) continue;
    auto& buf = mine[k];
    for (const SyncEntry* e : set.entries)
      buf.insert(buf.end(), e->copies[0], e->copies[0] + e->numel);
    if (!world_) return FP8_ERROR(Code::kInternal, "parameter sync needs a world communicator");
    const int tag = static_cast<int>(k % 32768);
    if (set.ranks.front() == rank_) {
      theirs[k].resize(set.ranks.size());
      for (size_t m = 1; m < set.ranks.size(); ++m) {
        theirs[k][m].resize(buf.size());
        phase1.push_back(
            world_->recv(theirs[k][m].data(), buf.size(), DataType::kFloat64, set.ranks[m], tag));
      }
    } else {
      phase1.push_back(
          world_->send(buf.data(), buf.size(), DataType::kFloat64, set.ranks.front(), tag));
    }
  }
  FP8_RETURN_IF_ERROR(wait_all(phase1));
  for (size_t k = 0; k < sets_.size(); ++k) {  // phase 2: leader sums in rank order, sends back
    const Set& set = sets_[k];
    if (set.ranks.size() < 2) continue;
    auto& buf = mine[k];
    const int tag = static_cast<int>(k % 32768);
    if (set.ranks.front() == rank_) {
      for (size_t m = 1; m < set.ranks.size(); ++m)
        for (size_t i = 0; i < buf.size(); ++i) buf[i] += theirs[k][m][i];
      for (size_t m = 1; m < set.ranks.size(); ++m)
        phase2.push_back(
            world_->send(buf.data(), buf.size(), DataType::kFloat64, set.ranks[m], tag));
    } else {
      phase2.push_back(
          world_->recv(buf.data(), buf.size(), DataType::kFloat64, set.ranks.front(), tag));
    }
  }
  FP8_RETURN_IF_ERROR(wait_all(phase2));
  for (size_t k = 0; k < sets_.size(); ++k) {  // unpack into every local copy
    const Set& set = sets_[k];
    if (set.ranks.size() < 2) continue;
    int64_t off = 0;
    for (const SyncEntry* e : set.entries) {
      for (double* c : e->copies)
        std::copy(mine[k].begin() + off, mine[k].begin() + off + e->numel, c);
      off += e->numel;
    }
  }
  for (const SyncEntry& e : entries_)  // sets of one rank: spread the local sum to all copies
    for (size_t c = 1; c < e.copies.size(); ++c)
      std::copy(e.copies[0], e.copies[0] + e.numel, e.copies[c]);
  return Status::Ok();
}

namespace {

// Member j's shard of every name of a set in the order its messages carry them: first the names
// whose shard j has at least kShardAlone elements (each its own message, sent straight from
// the sums), then the others (packed into one), each group in name order. fn(entry, range,
// alone).
template <class Set, class Fn>
void each_shard(const Set& set, int j, Fn&& fn) {
  const int n = static_cast<int>(set.ranks.size());
  for (bool alone : {true, false}) {
    for (const SyncEntry* e : set.entries) {
      const optim::Range r = optim::shard_range(e->numel, j, n);
      if ((r.end - r.begin >= kShardAlone) == alone) fn(e, r, alone);
    }
  }
}

}  // namespace

// Direct: member j receives shard j of every other member's sum (posted here) and adds the n
// parts in rank order (reduce_scatter_sum), the additions a leader would make.
Status NameSync::start(size_t k) {
  Flight& f = flights_[k];
  if (f.started) return Status::Ok();
  f.started = true;
  const Set& set = sets_[k];
  sum_local(set);
  const int n = static_cast<int>(set.ranks.size());
  if (n < 2) return Status::Ok();
  if (!world_) return FP8_ERROR(Code::kInternal, "parameter sync needs a world communicator");
  const int tag = static_cast<int>(k % 32768);
  f.parts.resize(n);
  f.sent.resize(n);
  size_t size = 0;
  each_shard(set, set.me, [&](const SyncEntry*, optim::Range r, bool) { size += r.end - r.begin; });
  for (int j = 0; j < n; ++j) {
    if (j == set.me) continue;
    const int peer = set.ranks[j];
    // Member j's part of this rank's shard: a message per large name, then the packed rest.
    f.parts[j].resize(size);
    size_t at = 0, packed_at = size;
    each_shard(set, set.me, [&](const SyncEntry*, optim::Range r, bool alone) {
      const size_t len = r.end - r.begin;
      if (alone) {
        f.works.push_back(world_->recv(f.parts[j].data() + at, len, DataType::kFloat64, peer, tag));
      } else if (packed_at == size) {
        packed_at = at;
      }
      at += len;
    });
    if (packed_at < size) {
      f.works.push_back(world_->recv(f.parts[j].data() + packed_at, size - packed_at,
                                     DataType::kFloat64, peer, tag));
    }
    // This rank's part of member j's shard, alike: large names straight from the first copies.
    each_shard(set, j, [&](const SyncEntry* e, optim::Range r, bool alone) {
      if (alone) {
        f.works.push_back(
            world_->send(e->copies[0] + r.begin, r.end - r.begin, DataType::kFloat64, peer, tag));
      } else {
        f.sent[j].insert(f.sent[j].end(), e->copies[0] + r.begin, e->copies[0] + r.end);
      }
    });
    if (!f.sent[j].empty()) {
      f.works.push_back(
          world_->send(f.sent[j].data(), f.sent[j].size(), DataType::kFloat64, peer, tag));
    }
    f.bytes += static_cast<int64_t>((size + f.sent[j].size()) * sizeof(double));
  }
  buffer_bytes_ += f.bytes;
  peak_buffer_bytes_ = std::max(peak_buffer_bytes_, buffer_bytes_);
  return Status::Ok();
}

std::vector<double> NameSync::pack(const Set& set, int j) const {
  std::vector<double> out;
  each_shard(set, j, [&](const SyncEntry* e, optim::Range r, bool) {
    out.insert(out.end(), e->copies[0] + r.begin, e->copies[0] + r.end);
  });
  return out;
}

int64_t NameSync::take_peak_buffer_bytes() {
  const int64_t p = peak_buffer_bytes_;
  peak_buffer_bytes_ = buffer_bytes_;
  return p;
}

Status NameSync::reduce_scatter_sum() {
  for (size_t k = 0; k < sets_.size(); ++k) FP8_RETURN_IF_ERROR(start(k));
  Status waited;
  for (Flight& f : flights_) {
    Status s = wait_all(f.works);
    if (waited.ok()) waited = s;
  }
  for (size_t k = 0; k < sets_.size(); ++k) {
    Flight f = std::move(flights_[k]);
    flights_[k] = Flight{};
    buffer_bytes_ -= f.bytes;
    const Set& set = sets_[k];
    if (!waited.ok() || set.ranks.size() < 2) continue;
    f.parts[set.me] = pack(set, set.me);  // the first copies' shard, final since start()
    std::vector<double>& acc = f.parts[0];
    for (size_t j = 1; j < f.parts.size(); ++j)
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += f.parts[j][i];
    int64_t at = 0;
    each_shard(set, set.me, [&](const SyncEntry* e, optim::Range r, bool) {
      for (double* c : e->copies)
        std::copy(acc.begin() + at, acc.begin() + at + (r.end - r.begin), c + r.begin);
      at += r.end - r.begin;
    });
  }
  FP8_RETURN_IF_ERROR(waited);
  for (const SyncEntry& e : entries_)  // sets of one rank: spread the local sum to all copies
    for (size_t c = 1; c < e.copies.size(); ++c)
      std::copy(e.copies[0], e.copies[0] + e.numel, e.copies[c]);
  return Status::Ok();
}

GatherOverlap::GatherOverlap(GatherExchange& ex, std::vector<std::vector<int>> local_dirs,
                             std::vector<size_t> order, std::function<Status(size_t k)> ready)
    : ex_(ex),
      local_dirs_(std::move(local_dirs)),
      order_(std::move(order)),
      ready_(std::move(ready)) {}

std::vector<size_t> GatherOverlap::global_order(const GatherExchange& ex,
                                                const std::vector<model::ModelPart>& stages) {
  std::vector<std::pair<std::pair<int, std::string>, size_t>> keyed;
  for (size_t k = 0; k < ex.sets(); ++k) {
    const std::string first = ex.set_names(k).front();
    const std::vector<int> st = stages_holding(first, stages);
    keyed.push_back({{st.empty() ? 0 : st.front(), first}, k});
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<size_t> order;
  for (const auto& [key, k] : keyed) order.push_back(k);
  return order;
}

Status GatherOverlap::start() {
  if (pending_ > 0) return FP8_ERROR(Code::kInternal, "weight all-gather started twice");
  at_first_use_ = after_compute_ = by_finish_ = 0;
  for (size_t k : order_) {
    FP8_RETURN_IF_ERROR(ex_.start_gather(k));
    ++pending_;
  }
  return Status::Ok();
}

Status GatherOverlap::end(size_t k) {
  FP8_RETURN_IF_ERROR(ex_.finish_gather(k));
  --pending_;
  return ready_ ? ready_(k) : Status::Ok();
}

Status GatherOverlap::chunk_first(int dir, bool computed) {
  for (size_t k : order_) {
    if (!ex_.gathering(k)) continue;
    const auto& dirs = local_dirs_[k];
    if (std::find(dirs.begin(), dirs.end(), dir) == dirs.end()) continue;
    FP8_RETURN_IF_ERROR(end(k));
    ++at_first_use_;
    after_compute_ += computed ? 1 : 0;
  }
  return Status::Ok();
}

Status GatherOverlap::finish() {
  for (size_t k : order_) {
    if (!ex_.gathering(k)) continue;
    FP8_RETURN_IF_ERROR(end(k));
    ++by_finish_;
  }
  return Status::Ok();
}

ShardGather::ShardGather(std::vector<GatherEntry> entries,
                         std::map<std::string, std::vector<int>> holders, int world_rank,
                         Comm* world, const SetKey& key)
    : entries_(std::move(entries)), rank_(world_rank), world_(world) {
  std::sort(entries_.begin(), entries_.end(),
            [](const GatherEntry& a, const GatherEntry& b) { return a.name < b.name; });
  SetIndex index;
  for (const GatherEntry& e : entries_) {
    const auto& ranks = holders[e.name];
    if (ranks.size() < 2) continue;
    auto [it, fresh] = index.try_emplace(set_key(ranks, key, e.name), sets_.size());
    if (fresh) {
      const int me = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank_) - ranks.begin());
      sets_.push_back({ranks, {}, me});
    }
    sets_[it->second].entries.push_back(&e);
  }
  flights_.resize(sets_.size());
}

std::vector<std::string> ShardGather::set_names(size_t k) const {
  std::vector<std::string> out;
  for (const GatherEntry* e : sets_[k].entries) out.push_back(e->name);
  return out;
}

int64_t ShardGather::take_peak_buffer_bytes() {
  const int64_t p = peak_buffer_bytes_;
  peak_buffer_bytes_ = buffer_bytes_;
  return p;
}

Status ShardGather::all_gather() {
  for (size_t k = 0; k < sets_.size(); ++k) FP8_RETURN_IF_ERROR(start_gather(k));
  for (size_t k = 0; k < sets_.size(); ++k) FP8_RETURN_IF_ERROR(finish_gather(k));
  return Status::Ok();
}

// Member j's message: its shard of each name of at least kShardAlone elements on its own,
// straight from and into the weights, in name order, then the smaller shards packed into one.
Status ShardGather::start_gather(size_t k) {
  Flight& f = flights_[k];
  if (f.started) return Status::Ok();
  if (!world_) return FP8_ERROR(Code::kInternal, "parameter all-gather needs a world communicator");
  f.started = true;
  const Set& set = sets_[k];
  const int n = static_cast<int>(set.ranks.size());
  for (const GatherEntry* e : set.entries) {
    const optim::Range r = optim::shard_range(e->numel, set.me, n);
    if (r.end - r.begin < kShardAlone)
      f.mine.insert(f.mine.end(), e->data + r.begin, e->data + r.end);
  }
  f.theirs.resize(n);
  const int tag = static_cast<int>(k % 32768);
  for (int j = 0; j < n; ++j) {
    if (j == set.me) continue;
    const int peer = set.ranks[j];
    int64_t small = 0;
    for (const GatherEntry* e : set.entries) {
      const optim::Range r = optim::shard_range(e->numel, j, n);
      if (r.end - r.begin >= kShardAlone) {
        f.works.push_back(
            world_->recv(e->data + r.begin, r.end - r.begin, DataType::kFloat32, peer, tag));
      } else {
        small += r.end - r.begin;
      }
      const optim::Range m = optim::shard_range(e->numel, set.me, n);
      if (m.end - m.begin >= kShardAlone) {
        f.works.push_back(
            world_->send(e->data + m.begin, m.end - m.begin, DataType::kFloat32, peer, tag));
      }
    }
    if (small > 0) {
      f.theirs[j].resize(small);
      f.works.push_back(world_->recv(f.theirs[j].data(), small, DataType::kFloat32, peer, tag));
    }
    if (!f.mine.empty()) {
      f.works.push_back(world_->send(f.mine.data(), f.mine.size(), DataType::kFloat32, peer, tag));
    }
    f.bytes += static_cast<int64_t>(small * sizeof(float));
  }
  f.bytes += static_cast<int64_t>(f.mine.size() * sizeof(float));  // one buffer for every peer
  buffer_bytes_ += f.bytes;
  peak_buffer_bytes_ = std::max(peak_buffer_bytes_, buffer_bytes_);
  return Status::Ok();
}

Status ShardGather::finish_gather(size_t k) {
  if (!flights_[k].started) return Status::Ok();
  Flight f = std::move(flights_[k]);
  flights_[k] = Flight{};
  buffer_bytes_ -= f.bytes;
  FP8_RETURN_IF_ERROR(wait_all(f.works));
  const Set& set = sets_[k];
  const int n = static_cast<int>(set.ranks.size());
  for (int j = 0; j < n; ++j) {  // the packed small shards (the large ones landed in place)
    if (j == set.me) continue;
    int64_t off = 0;
    for (const GatherEntry* e : set.entries) {
      const optim::Range r = optim::shard_range(e->numel, j, n);
      if (r.end - r.begin >= kShardAlone) continue;
      std::copy(f.theirs[j].begin() + off, f.theirs[j].begin() + off + (r.end - r.begin),
                e->data + r.begin);
      off += r.end - r.begin;
    }
  }
  return Status::Ok();
}

namespace {

DataType wire_type(DType d) { return d == DType::kF64 ? DataType::kFloat64 : DataType::kFloat32; }

}  // namespace

Result<int64_t> DeviceNameSync::bucket_bytes() {
  const char* env = std::getenv("FP8PIPE_ZERO1_BUCKET_MB");
  if (!env) return static_cast<int64_t>(kDefaultBucketMB * 1024 * 1024);
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(mb > 0) || mb > 1e9) {
    return FP8_INVALID(
        "FP8PIPE_ZERO1_BUCKET_MB='{}': expected a positive number of MB (default {})", env,
        kDefaultBucketMB);
  }
  return std::max<int64_t>(1, static_cast<int64_t>(mb * 1024 * 1024));
}

DeviceNameSync::DeviceNameSync(Backend& be, std::vector<DeviceEntry> entries,
                               std::map<std::string, std::vector<int>> holders, int world_rank,
                               Comm* world, int64_t bucket, const SetKey& key)
    : be_(be), entries_(std::move(entries)), rank_(world_rank), world_(world) {
  std::sort(entries_.begin(), entries_.end(),
            [](const DeviceEntry& a, const DeviceEntry& b) { return a.name < b.name; });
  SetIndex index;
  for (const DeviceEntry& e : entries_) {
    const auto& ranks = holders[e.name];
    if (ranks.size() < 2) continue;
    auto [it, fresh] = index.try_emplace(set_key(ranks, key, e.name), sets_.size());
    if (fresh) {
      const int me = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank_) - ranks.begin());
      sets_.push_back({ranks, {}, me});
    }
    sets_[it->second].entries.push_back(&e);
  }
  // Buckets: a set larger than a bucket splits into runs of whole names (one name may exceed it).
  // A set's members hold the same names, so every member cuts it alike.
  auto bytes = [](const DeviceEntry* e) {
    const Tensor& t = e->copies.front();
    return t.numel() * static_cast<int64_t>(dtype_size(t.dtype()));
  };
  std::vector<Set> split;
  for (const Set& set : sets_) {
    split.push_back({set.ranks, {}, set.me});
    int64_t filled = 0;
    for (const DeviceEntry* e : set.entries) {
      if (!split.back().entries.empty() && filled + bytes(e) > bucket) {
        split.push_back({set.ranks, {}, set.me});
        filled = 0;
      }
      split.back().entries.push_back(e);
      filled += bytes(e);
    }
  }
  sets_ = std::move(split);
  flights_.resize(sets_.size());
  gathers_.resize(sets_.size());
  stage_ = be_.device() != Device::kCpu && !(world_ && world_->device_buffers());
  if (stage_) host_ = make_cpu_backend();
}

int64_t DeviceNameSync::take_peak_buffer_bytes() {
  const int64_t p = peak_buffer_bytes_;
  peak_buffer_bytes_ = buffer_bytes_;
  return p;
}

std::vector<std::string> DeviceNameSync::set_names(size_t k) const {
  std::vector<std::string> out;
  for (const DeviceEntry* e : sets_[k].entries) out.push_back(e->name);
  return out;
}

int64_t DeviceNameSync::pack_size(const Set& set, int j) const {
  const int n = static_cast<int>(set.ranks.size());
  int64_t total = 0;
  for (const DeviceEntry* e : set.entries) {
    const optim::Range r = optim::shard_range(e->copies.front().numel(), j, n);
    total += r.end - r.begin;
  }
  return total;
}

Result<Tensor> DeviceNameSync::pack(const Set& set, int j, bool packed_only) {
  const DType dt = set.entries.front()->copies.front().dtype();
  FP8_ASSIGN_OR_RETURN(Tensor buf,
                       be_.empty({packed_only ? packed_size(set, j) : pack_size(set, j)}, dt));
  FP8_RETURN_IF_ERROR(be_.copy_ranges(ranges(set, j, buf, /*to_buf=*/true, packed_only)));
  return buf;
}

int64_t DeviceNameSync::packed_size(const Set& set, int j) const {
  const int n = static_cast<int>(set.ranks.size());
  int64_t total = 0;
  for (const DeviceEntry* e : set.entries) {
    if (in_place(e, j, n)) continue;
    const optim::Range r = optim::shard_range(e->copies.front().numel(), j, n);
    total += r.end - r.begin;
  }
  return total;
}

Status DeviceNameSync::unpack(const Set& set, int j, const Tensor& buf) {
  return be_.copy_ranges(ranges(set, j, buf, /*to_buf=*/false));
}

std::vector<CopyRange> DeviceNameSync::ranges(const Set& set, int j, const Tensor& buf, bool to_buf,
                                              bool packed_only) const {
  const int n = static_cast<int>(set.ranks.size());
  std::vector<CopyRange> rs;
  int64_t at = 0;
  // The names whose shard j travels alone first (unless packed_only), then the packed ones: the
  // order of each member's messages.
  for (bool alone : {true, false}) {
    if (alone && packed_only) continue;
    for (const DeviceEntry* e : set.entries) {
      if (in_place(e, j, n) != alone) continue;
      const Tensor& t = e->copies.front();
      const optim::Range r = optim::shard_range(t.numel(), j, n);
      if (r.end == r.begin) continue;
      if (to_buf) {
        rs.push_back({t, r.begin, buf, at, r.end - r.begin});
      } else {
        rs.push_back({buf, at, t, r.begin, r.end - r.begin});
      }
      at += r.end - r.begin;
    }
  }
  return rs;
}

Work DeviceNameSync::send(const Tensor& t, int peer, int tag, std::vector<Tensor>& keep) {
  Tensor wire = t;
  if (stage_) {
    auto h = be_.to_host(t);
    if (!h.ok()) return Work::failed(h.status());
    wire = *h;
  }
  keep.push_back(wire);  // alive until the sends are done
  return world_->send(wire.data(), wire.numel(), wire_type(wire.dtype()), peer, tag);
}

Result<Tensor> DeviceNameSync::recv(int64_t n, DType dt, int peer, int tag,
                                    std::vector<Work>& works) {
  Backend& on = stage_ ? *host_ : be_;
  FP8_ASSIGN_OR_RETURN(Tensor t, on.empty({n}, dt));
  works.push_back(world_->recv(t.data(), n, wire_type(dt), peer, tag));
  return t;
}

Status DeviceNameSync::reduce_scatter_sum() {
  std::vector<bool> in_set(entries_.size(), false);
  for (const Set& set : sets_)
    for (const DeviceEntry* e : set.entries) in_set[e - entries_.data()] = true;
  for (size_t i = 0; i < entries_.size(); ++i) {  // names no other rank holds: local copies only
    if (in_set[i]) continue;
    DeviceEntry& e = entries_[i];
    for (size_t c = 1; c < e.copies.size(); ++c)
      FP8_RETURN_IF_ERROR(be_.add(e.copies[0], e.copies[c], e.copies[0]));
  }
  if (sets_.empty()) return Status::Ok();
  if (!world_) return FP8_ERROR(Code::kInternal, "gradient sync needs a world communicator");
  for (size_t k = 0; k < sets_.size(); ++k) {
    FP8_RETURN_IF_ERROR(start(k));
    FP8_RETURN_IF_ERROR(finish_set(k));
  }
  return Status::Ok();
}

// Bucket k: local copies first (the first copy holds the rank's sum), then every message posted
// as one group. Buckets started here one at a time go one per round: members that hold other
// sets besides post different sets, and a round that mixed sets could wait in one NCCL group on
// a peer's next group. Sets go in one order on every rank (by first name), so the smallest set
// not yet done is every member's current round: no cycle. Started earlier (GradOverlap), they go
// in its global order.
Status DeviceNameSync::start(size_t k) {
  Flight& f = flights_[k];
  if (f.started) return Status::Ok();
  if (!world_) return FP8_ERROR(Code::kInternal, "gradient sync needs a world communicator");
  f.started = true;
  const Set& set = sets_[k];
  for (const DeviceEntry* e : set.entries) {
    for (size_t c = 1; c < e->copies.size(); ++c) {
      Tensor first = e->copies[0];
      FP8_RETURN_IF_ERROR(be_.add(first, e->copies[c], first));
    }
  }
  const int n = static_cast<int>(set.ranks.size());
  const int tag = static_cast<int>(k % 32768);
  const DType dt = set.entries.front()->copies.front().dtype();
  const int64_t mine = pack_size(set, set.me);
  f.parts.assign(n, Tensor());
  const int64_t elem = static_cast<int64_t>(dtype_size(dt));
  const DataType wire = wire_type(dt);
  auto at = [&](const Tensor& t, int64_t i) { return static_cast<char*>(t.data()) + i * elem; };
  const int64_t mine_packed = packed_size(set, set.me);
  for (int j = 0; j < n; ++j) {
    if (j == set.me) continue;  // packed when the bucket ends (finish_set)
    const int peer = set.ranks[j];
    if (mine > 0) {  // member j's part of this rank's shard, laid out as ranges() orders it
      Backend& on = stage_ ? *host_ : be_;
      FP8_ASSIGN_OR_RETURN(f.parts[j], on.empty({mine}, dt));
      int64_t off = 0;
      for (const DeviceEntry* e : set.entries) {  // the names that come alone, first
        if (!in_place(e, set.me, n)) continue;
        const optim::Range r = optim::shard_range(e->copies.front().numel(), set.me, n);
        f.works.push_back(world_->recv(at(f.parts[j], off), r.end - r.begin, wire, peer, tag));
        off += r.end - r.begin;
      }
      if (mine_packed > 0)
        f.works.push_back(world_->recv(at(f.parts[j], off), mine_packed, wire, peer, tag));
      f.bytes += mine * elem;
    }
    for (const DeviceEntry* e : set.entries) {  // this rank's part of member j's shard, alike
      if (!in_place(e, j, n)) continue;
      const Tensor& t = e->copies.front();
      const optim::Range r = optim::shard_range(t.numel(), j, n);
      f.works.push_back(world_->send(at(t, r.begin), r.end - r.begin, wire, peer, tag));
    }
    if (packed_size(set, j) > 0) {
      FP8_ASSIGN_OR_RETURN(Tensor out, pack(set, j, /*packed_only=*/true));
      f.works.push_back(send(out, peer, tag, f.keep));
      f.bytes += packed_size(set, j) * elem;
    }
  }
  buffer_bytes_ += f.bytes;
  peak_buffer_bytes_ = std::max(peak_buffer_bytes_, buffer_bytes_);
  // Issue them now as one group (a test triggers an NCCL comm's batch; a no-op for MPI): the
  // next bucket or pipeline group must not join it.
  if (!f.works.empty()) f.works.back().test();
  return Status::Ok();
}

// Bucket k's messages waited on, then the n parts added in rank order, as NameSync's.
Status DeviceNameSync::finish_set(size_t k) {
  Flight f = std::move(flights_[k]);
  flights_[k] = Flight{};
  buffer_bytes_ -= f.bytes;
  const Set& set = sets_[k];
  FP8_RETURN_IF_ERROR(wait_all(f.works));
  if (pack_size(set, set.me) == 0) return Status::Ok();  // an empty shard
  // This rank's own part: its first copies' shard, final since start().
  FP8_ASSIGN_OR_RETURN(f.parts[set.me], pack(set, set.me));
  for (Tensor& t : f.parts) {
    if (stage_ && t.device() == Device::kCpu) {
      FP8_ASSIGN_OR_RETURN(Tensor d, be_.empty(t.shape(), t.dtype()));
      FP8_RETURN_IF_ERROR(be_.copy(t, d));
      t = d;
    }
  }
  Tensor& acc = f.parts[0];
  for (size_t j = 1; j < f.parts.size(); ++j) FP8_RETURN_IF_ERROR(be_.add(acc, f.parts[j], acc));
  return unpack(set, set.me, acc);
}

Status DeviceNameSync::all_gather() {
  if (!sets_.empty() && !world_) {
    return FP8_ERROR(Code::kInternal, "parameter all-gather needs a world communicator");
  }
  for (size_t k = 0; k < sets_.size(); ++k) {  // one bucket at a time: its buffers bound memory
    FP8_RETURN_IF_ERROR(start_gather(k));
    FP8_RETURN_IF_ERROR(finish_gather(k));
  }
  for (DeviceEntry& e : entries_) {  // a second local copy follows the first
    for (size_t c = 1; c < e.copies.size(); ++c)
      FP8_RETURN_IF_ERROR(be_.copy(e.copies[0], e.copies[c]));
  }
  return Status::Ok();
}

// As ShardGather's: shards of at least kShardAlone elements on their own, straight from and
// into the first copies (not when staging through the host), the rest packed into one message.
bool DeviceNameSync::in_place(const DeviceEntry* e, int j, int n) const {
  const optim::Range r = optim::shard_range(e->copies.front().numel(), j, n);
  return !stage_ && r.end - r.begin >= kShardAlone;
}

Status DeviceNameSync::start_gather(size_t k) {
  Flight& f = gathers_[k];
  if (f.started) return Status::Ok();
  if (!world_) return FP8_ERROR(Code::kInternal, "parameter all-gather needs a world communicator");
  f.started = true;
  const Set& set = sets_[k];
  const int n = static_cast<int>(set.ranks.size());
  const int tag = static_cast<int>(k % 32768);
  const DType dt = set.entries.front()->copies.front().dtype();
  const int64_t elem = static_cast<int64_t>(dtype_size(dt));
  const DataType wire = wire_type(dt);
  f.parts.assign(n, Tensor());
  Tensor mine;
  if (packed_size(set, set.me) > 0) {
    FP8_ASSIGN_OR_RETURN(mine, pack(set, set.me, /*packed_only=*/true));
  }
  auto at = [&](const Tensor& t, int64_t i) { return static_cast<char*>(t.data()) + i * elem; };
  for (int j = 0; j < n; ++j) {
    if (j == set.me) continue;
    const int peer = set.ranks[j];
    for (const DeviceEntry* e : set.entries) {
      const Tensor& t = e->copies.front();
      if (in_place(e, j, n)) {
        const optim::Range r = optim::shard_range(t.numel(), j, n);
        f.works.push_back(world_->recv(at(t, r.begin), r.end - r.begin, wire, peer, tag));
      }
      if (in_place(e, set.me, n)) {
        const optim::Range m = optim::shard_range(t.numel(), set.me, n);
        f.works.push_back(world_->send(at(t, m.begin), m.end - m.begin, wire, peer, tag));
      }
    }
    const int64_t size = packed_size(set, j);
    if (size > 0) {
      FP8_ASSIGN_OR_RETURN(f.parts[j], recv(size, dt, peer, tag, f.works));
      f.bytes += size * elem;
    }
    if (mine.defined()) f.works.push_back(send(mine, peer, tag, f.keep));
  }
  if (mine.defined()) f.bytes += mine.numel() * elem;
  buffer_bytes_ += f.bytes;
  peak_buffer_bytes_ = std::max(peak_buffer_bytes_, buffer_bytes_);
  if (!f.works.empty()) f.works.back().test();  // one NCCL group per bucket, issued now
  return Status::Ok();
}

Status DeviceNameSync::finish_gather(size_t k) {
  if (!gathers_[k].started) return Status::Ok();
  Flight f = std::move(gathers_[k]);
  gathers_[k] = Flight{};
  buffer_bytes_ -= f.bytes;
  FP8_RETURN_IF_ERROR(wait_all(f.works));
  for (size_t j = 0; j < f.parts.size(); ++j) {
    if (!f.parts[j].defined()) continue;
    FP8_RETURN_IF_ERROR(be_.copy_ranges(
        ranges(sets_[k], static_cast<int>(j), f.parts[j], /*to_buf=*/false, /*packed_only=*/true)));
  }
  return Status::Ok();
}

}  // namespace fp8pipe::parallel
