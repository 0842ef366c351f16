// Summing the copies of every parameter by global name: a parameter lives on the dp replicas of
// each pipeline rank whose chunks hold it (DualPipe keeps every stage on two ranks; the embedding
// sits in the first stage and, for MTP, in the last). Every copy ends with the sum over all of
// them, so replicas stay identical after identical optimizer steps. Also used for the MoE expert
// loads behind the router-bias update. Pure layout logic (holders_of) plus point-to-point
// exchanges on the world communicator, summing in rank order (deterministic): the all-reduce
// through the set's lowest rank, the reduce-scatter directly between the members.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/model/transformer.h"
#include "parallel/comm.h"
#include "parallel/p2p_plan.h"
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
// The global stages (model parts) holding parameter `name`, ascending.
std::vector<int> stages_holding(const std::string& name,
                                const std::vector<model::ModelPart>& stages);
// A finer cut of the sets of holders: names of one holder list go in one set only if their keys
// are equal too (the trainer keys by stages_holding, so that under DualPipe, where stage s and
// stage pp-1-s have the same holders, each stage's names form a set that can start when that
// stage is final). Empty: by holders alone. Every member must key alike.
using SetKey = std::function<std::vector<int>(const std::string& name)>;
// The local chunks (dirs) of pipeline rank `pp_rank` that hold parameter `name`.
std::vector<int> dirs_holding(const std::string& name, const Schedule& s,
                              const std::vector<model::ModelPart>& stages, int pp_rank);

// ZeRO-1's exchanges (NameSync, ShardGather, DeviceNameSync on device buffers) send a member's
// shard of a name of at least this many elements as its own message, straight from the tensor
// (the all-gather also receives it straight into the weights), and the smaller shards of a set
// packed into one message per peer: no copy of the large ones, whose buffers the overlaps would
// otherwise hold for every set in flight at once.
constexpr int64_t kShardAlone = 4096;

// A reduce-scatter whose sets of holders can start one at a time (NameSync, DeviceNameSync):
// GradOverlap starts them while the pipeline runs, reduce_scatter_sum() starts the rest and ends
// them all.
class SetExchange {
 public:
  virtual ~SetExchange() = default;
  virtual size_t sets() const = 0;
  virtual const std::vector<int>& set_ranks(size_t k) const = 0;  // ascending world ranks
  virtual std::vector<std::string> set_names(size_t k) const = 0;
  virtual bool started(size_t k) const = 0;
  // Sums this rank's local copies of set k's names and posts its messages.
  virtual Status start(size_t k) = 0;
  // The most bytes of message buffers held at once since the last call (started sets hold
  // theirs until reduce_scatter_sum ends them); resets the count.
  virtual int64_t take_peak_buffer_bytes() = 0;
};

// ZeRO-1's gradient reduce-scatter overlapped with the pipeline (optim.overlap_grad_reduce, as
// Megatron's overlap-grad-reduce): a set of holders starts its exchange on this rank once the
// chunks holding its names have run their last backward work of the step (the pipeline's
// cool-down then hides it), instead of after the last instruction. The values are unchanged:
// the same messages are added in the same order, only sent earlier.
// - Over MPI (nonblocking, matched by tag) a set starts as soon as its local chunks are final.
// - Over matched groups (NCCL: a rank's operations of all communicators run in the order it posts
//   them, and a GPU may run one NCCL kernel at a time) every member must post the set at the same
//   place of one global order. Set k gets a round R_k: the latest, over its members and the
//   chunks holding its names there, of round_after(that chunk's last backward instruction).
//   Every member posts it right before its first group of round >= R_k (the end of its list if
//   none), which is after its own chunks are final, the sets of one round in set order. Each rank's
//   posts then follow one global order (round, then set), every group and set being posted by all
//   of its ranks at the same place of that order; the expert all-to-alls run among dp replicas,
//   which have the same rounds and post alike. By induction over that order no operation waits on
//   one that its peer posts later: no deadlock.
class GradOverlap {
 public:
  // dirs_of(world rank, name): the chunks of that rank holding name; pp_of(world rank): its
  // pipeline rank.
  using DirsOf = std::function<std::vector<int>(int rank, const std::string& name)>;
  GradOverlap(SetExchange& ex, int world_rank, DirsOf dirs_of, std::function<int(int)> pp_of);
  // Before a run of schedule s (plan: its matched groups, or null for MPI).
  void begin(const Schedule& s, const P2pPlan* plan);
  // PipelineExecutor::GradHooks. more_compute: this rank computes after it (counted by hidden()).
  Status chunk_final(int dir, bool more_compute);
  Status before_round(int round, bool more_compute);
  // Starts the sets not started yet (the end of the pipeline), in the order of before_round.
  Status end();
  // Sets of two or more ranks started since begin(), before end(); of those, the ones started
  // with compute still to run on this rank.
  int started() const { return started_; }
  int hidden() const { return hidden_; }
  int local_sets() const;  // sets of two or more ranks, this rank a member
  bool matched() const { return matched_; }
  SetExchange& exchange() { return ex_; }
  static constexpr int kEnd = 1 << 30;  // a round after every group: the end of the list
  // The first round whose groups pipeline rank p posts only after its instruction i: one past
  // the last round it posts at or before i (0 if none). Posting a set right before p's first
  // group of round >= that is after instruction i.
  static int round_after(const P2pPlan& plan, int p, int i);

 private:
  SetExchange& ex_;
  int rank_;
  DirsOf dirs_of_;
  std::function<int(int)> pp_of_;
  std::vector<std::vector<int>> local_dirs_;  // per set: this rank's chunks holding its names
  std::vector<int> round_;                    // per set (matched groups)
  std::vector<size_t> order_;                 // sets by (round, index)
  size_t next_ = 0;
  bool matched_ = false;
  std::vector<bool> final_;  // per chunk, this run
  int started_ = 0, hidden_ = 0;
  bool ending_ = false;  // in end()
  Status start(size_t k, bool more_compute);
  const Schedule* rounds_for_ = nullptr;  // the schedule round_ was computed for
};

// ZeRO-1's weight all-gather in sets that start together and end one at a time (ShardGather,
// DeviceNameSync): GatherOverlap posts them after the optimizer step and ends each right before
// the next step's first use of the chunks holding its names.
class GatherExchange {
 public:
  virtual ~GatherExchange() = default;
  virtual size_t sets() const = 0;  // sets of two or more holders (a device's buckets)
  virtual std::vector<std::string> set_names(size_t k) const = 0;
  // Posts set k: this rank's shard (just updated) to every other member, theirs into buffers.
  virtual Status start_gather(size_t k) = 0;
  // Waits for set k's shards and writes them into the first copies (no-op unless started).
  virtual Status finish_gather(size_t k) = 0;
  virtual bool gathering(size_t k) const = 0;  // started, not finished
  // As SetExchange's: the most bytes of message buffers held at once since the last call.
  virtual int64_t take_peak_buffer_bytes() = 0;
};

// ZeRO-1's parameter all-gather overlapped with the next step (optim.overlap_param_gather, as
// Megatron's overlap-param-gather): every set is posted right after the optimizer step and set k
// is waited for only before the first compute instruction of a local chunk holding its names
// (PipelineExecutor::GradHooks::chunk_first), so a stage's gather hides behind what runs before
// its first forward (the warm-up's receive wait, the other direction's chunk). The values are
// unchanged: the same shards land before anything reads them. Every rank posts its sets in one
// global order (`order`: by the lowest stage holding a set's names, then its first name), before
// any operation of the next step; matched-group comms (NCCL) therefore run them first on every
// member and no wait can block on an operation posted after it. Reads of the weights outside
// the pipeline (evaluation, checkpoints, the end of a run) call finish() first.
class GatherOverlap {
 public:
  // local_dirs[k]: this rank's chunks holding set k's names; order: every set once, the global
  // posting order; ready(k): after set k's shards have landed (local copies, uploads).
  GatherOverlap(GatherExchange& ex, std::vector<std::vector<int>> local_dirs,
                std::vector<size_t> order, std::function<Status(size_t k)> ready);
  Status start();  // after the optimizer step: every set posted, in order
  // PipelineExecutor::GradHooks::chunk_first: chunk dir's sets end. computed: this rank has run
  // compute of the step already (counted by after_compute()).
  Status chunk_first(int dir, bool computed);
  Status finish();  // every set still in flight ends, in order
  bool pending() const { return pending_ > 0; }
  // Of the sets started by the last start(): ended at a chunk's first use, and of those, after
  // compute had run on this rank; ended by finish() instead.
  int at_first_use() const { return at_first_use_; }
  int after_compute() const { return after_compute_; }
  int by_finish() const { return by_finish_; }
  GatherExchange& exchange() { return ex_; }
  // The global posting order of ex's sets: by the lowest stage holding a set's names, then its
  // first name (the same relative order on every member of any two sets).
  static std::vector<size_t> global_order(const GatherExchange& ex,
                                          const std::vector<model::ModelPart>& stages);

 private:
  Status end(size_t k);
  GatherExchange& ex_;
  std::vector<std::vector<int>> local_dirs_;
  std::vector<size_t> order_;
  std::function<Status(size_t)> ready_;
  int pending_ = 0, at_first_use_ = 0, after_compute_ = 0, by_finish_ = 0;
};

struct SyncEntry {
  std::string name;
  std::vector<double*> copies;  // this rank's local copies (one per chunk holding it)
  int64_t numel = 0;
};

class NameSync : public SetExchange {
 public:
  // entries: this rank's named buffers; holders[name] = the world ranks holding that name.
  NameSync(std::vector<SyncEntry> entries, std::map<std::string, std::vector<int>> holders,
           int world_rank, Comm* world, const SetKey& key = {});
  // Every copy := the sum over all copies on all holders, in fp64. Deterministic.
  Status all_reduce_sum();
  // ZeRO-1's reduce-scatter: the same sums, bit for bit, but each holder (position i of n in its
  // holders) gets only optim::shard_range(numel, i, n) of each name, the rest of its copies being
  // stale. Direct, as DeviceNameSync's: member i adds the n members' shard i in rank order; each
  // rank sends and receives (n - 1)/n of its sums.
  // Sets started by start() (GradOverlap) are ended here; the others start here.
  Status reduce_scatter_sum();
  // True when this rank is the lowest holder of `name` (to count a name once globally).
  bool is_leader(const std::string& name) const;

  size_t sets() const override { return sets_.size(); }
  const std::vector<int>& set_ranks(size_t k) const override { return sets_[k].ranks; }
  std::vector<std::string> set_names(size_t k) const override;
  bool started(size_t k) const override { return flights_[k].started; }
  Status start(size_t k) override;  // the reduce-scatter's set k
  int64_t take_peak_buffer_bytes() override;

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<const SyncEntry*> entries;  // in name order
    int64_t numel = 0;
    int me = 0;  // this rank's position in ranks
  };
  // Set k's reduce-scatter in flight: parts[j] is member j's part of this rank's shard (its own,
  // read from the first copies when the set ends), sent[j] what goes to member j.
  struct Flight {
    bool started = false;
    std::vector<std::vector<double>> parts, sent;
    std::vector<Work> works;
    int64_t bytes = 0;  // of parts and sent
  };
  void sum_local();
  void sum_local(const Set& set);
  std::vector<double> pack(const Set& set, int j) const;  // shard j of the names, as each_shard
  int64_t buffer_bytes_ = 0, peak_buffer_bytes_ = 0;
  std::vector<Flight> flights_;
  std::vector<SyncEntry> entries_;
  std::map<std::string, std::vector<int>> holders_;
  std::vector<Set> sets_;  // sorted by their first name: the same order on every rank
  int rank_;
  Comm* world_;
};

// ZeRO-1's parameter all-gather by global name: holder i (of n, in holders_of order) of a name
// owns optim::shard_range(numel, i, n) of it and has just updated that shard; afterwards every
// holder has every shard (fp32, in place). Point-to-point on the world communicator: per set of
// holders and pair of members, one message per name whose shard has at least kShardAlone
// elements (straight from and into the weights) and one carrying the rest of the set's shards.
struct GatherEntry {
  std::string name;
  float* data = nullptr;  // this rank's full copy
  int64_t numel = 0;
};

class ShardGather : public GatherExchange {
 public:
  // key: as NameSync's (the trainer's per-stage sets, so that each chunk's weights can land on
  // their own). Sets of one rank have nothing to gather and are left out.
  ShardGather(std::vector<GatherEntry> entries, std::map<std::string, std::vector<int>> holders,
              int world_rank, Comm* world, const SetKey& key = {});
  Status all_gather();  // every set started and finished

  size_t sets() const override { return sets_.size(); }
  std::vector<std::string> set_names(size_t k) const override;
  Status start_gather(size_t k) override;
  Status finish_gather(size_t k) override;
  bool gathering(size_t k) const override { return flights_[k].started; }
  int64_t take_peak_buffer_bytes() override;

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<const GatherEntry*> entries;  // in name order
    int me = 0;                               // this rank's position in ranks
  };
  // Set k in flight: this rank's shards packed (mine) and every other member's (theirs[j]).
  struct Flight {
    bool started = false;
    std::vector<float> mine;
    std::vector<std::vector<float>> theirs;
    std::vector<Work> works;
    int64_t bytes = 0;
  };
  std::vector<GatherEntry> entries_;
  std::vector<Set> sets_;
  std::vector<Flight> flights_;
  int64_t buffer_bytes_ = 0, peak_buffer_bytes_ = 0;
  int rank_;
  Comm* world_;
};

// The same exchanges on Backend tensors (optim.placement=device on several ranks, or one rank
// holding two copies): ZeRO-1's gradient reduce-scatter of the fp64 sums and the weights'
// all-gather, with the shards of NameSync / ShardGather (optim::shard_range of each name over its
// holders_of) and the same bits. The reduce-scatter is direct, as NameSync's: member j of a set
// of holders receives shard j of every other member's sum and adds the n contributions in rank
// order (the additions a leader would make); each rank sends (n - 1)/n of a sum and receives as
// much. A comm with device buffers (NCCL) moves the tensors themselves; any other
// comm (MPI) gets host copies on a device backend. Per set and peer, a shard of at least
// kShardAlone elements travels on its own (sent from the tensor; the all-gather's received into
// the weights) unless staging through the host, and one message carries the other shards of the
// set's names, packed and unpacked by one Backend::copy_ranges each. Sets are
// cut into buckets of at most FP8PIPE_ZERO1_BUCKET_MB (default 256 MB of sums or weights; one
// name may exceed it) and exchanged one after another: a bucket's buffers (about its size: the
// receives, and the small shards packed to send) are the transient memory.
struct DeviceEntry {
  std::string name;
  std::vector<Tensor>
      copies;  // this rank's local copies (views of one dtype: f64 sums, f32 weights)
};

class DeviceNameSync : public SetExchange, public GatherExchange {
 public:
  static constexpr double kDefaultBucketMB = 256;
  // The bucket in bytes from FP8PIPE_ZERO1_BUCKET_MB (default kDefaultBucketMB), or an error
  // naming a value that is not a positive number.
  static Result<int64_t> bucket_bytes();
  DeviceNameSync(Backend& be, std::vector<DeviceEntry> entries,
                 std::map<std::string, std::vector<int>> holders, int world_rank, Comm* world,
                 int64_t bucket, const SetKey& key = {});
  // fp64 sums: a rank's first copy of a name (position i of n in its holders) ends holding
  // shard_range(numel, i, n) of the sum over every copy on every holder; the rest of it, and its
  // other local copies, are stale.
  // Buckets started by start() (GradOverlap) are ended here, in order; the others start and end
  // here one at a time.
  Status reduce_scatter_sum();
  // Weights: the first copy's own shard (just updated) goes to every holder; afterwards every
  // copy on every holder has every shard.
  Status all_gather();
  // Messages to each peer, one set's bucket at a time (FP8PIPE_ZERO1_BUCKET_MB).
  size_t buckets() const { return sets_.size(); }

  size_t sets() const override { return sets_.size(); }
  const std::vector<int>& set_ranks(size_t k) const override { return sets_[k].ranks; }
  std::vector<std::string> set_names(size_t k) const override;
  bool started(size_t k) const override { return flights_[k].started; }
  // Bucket k of the reduce-scatter: its local copies summed, its messages posted as one group.
  Status start(size_t k) override;
  int64_t take_peak_buffer_bytes() override;
  // Bucket k of the all-gather (GatherOverlap; all_gather() runs them one at a time): its
  // messages posted as one group; finished, the shards are in the first copies (the second local
  // copies are the caller's, as all_gather's last loop).
  Status start_gather(size_t k) override;
  Status finish_gather(size_t k) override;
  bool gathering(size_t k) const override { return gathers_[k].started; }

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<const DeviceEntry*> entries;  // in name order
    int me = 0;                               // this rank's position in `ranks`
  };
  int64_t pack_size(const Set& set, int j) const;  // elements of shard j over the set's names
  // Shard j of every name of the set from its first copy, concatenated in name order (packed_only:
  // only the names whose shard j does not move in place, in_place).
  Result<Tensor> pack(const Set& set, int j, bool packed_only = false);
  bool in_place(const DeviceEntry* e, int j, int n) const;  // the all-gather's shard j of e
  int64_t packed_size(const Set& set, int j) const;         // pack_size of those not in place
  // The inverse of pack into the first copies (buf may be on the host).
  Status unpack(const Set& set, int j, const Tensor& buf);
  // Shard j of each name's first copy against consecutive runs of buf (Backend::copy_ranges).
  std::vector<CopyRange> ranges(const Set& set, int j, const Tensor& buf, bool to_buf,
                                bool packed_only = false) const;
  // Bucket k in flight: parts[j] is member j's part of this rank's shard (its own packed from
  // the first copies when the bucket ends, so a started bucket holds only its messages); keep
  // holds the send buffers.
  struct Flight {
    bool started = false;
    std::vector<Tensor> parts, keep;
    std::vector<Work> works;
    int64_t bytes = 0;  // of the received parts and the send buffers
  };
  int64_t buffer_bytes_ = 0, peak_buffer_bytes_ = 0;
  Status finish_set(size_t k);  // waits for bucket k's messages, then its sums
  // Posts the transfer of t (on the backend); a recv into a host tensor when staging.
  Work send(const Tensor& t, int peer, int tag, std::vector<Tensor>& keep);
  Result<Tensor> recv(int64_t n, DType dt, int peer, int tag, std::vector<Work>& works);

  Backend& be_;
  std::vector<DeviceEntry> entries_;
  // Sets of two or more ranks, by first name (the same order everywhere), a set larger than a
  // bucket cut into runs of whole names, exchanged one after another so that one set's packed
  // buffers bound the memory.
  std::vector<Set> sets_;
  std::vector<Flight> flights_;  // per bucket (the reduce-scatter)
  // Per bucket (the all-gather): parts[j] member j's shards, keep this rank's packed shard.
  std::vector<Flight> gathers_;
  int rank_;
  Comm* world_;
  bool stage_;  // host copies on the wire (a device backend and a host-memory comm)
  std::unique_ptr<Backend> host_;
};

}  // namespace fp8pipe::parallel
