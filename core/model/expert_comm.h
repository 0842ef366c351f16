// The expert-parallel group as the MoE layer sees it (DESIGN.md §5): its size, this rank's place,
// how its ranks sit on nodes, and a nonblocking all-to-all of fixed-size rows. The model library
// does not depend on MPI; parallel/expert_comm.cc implements this over a parallel::Comm.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "core/status.h"

namespace fp8pipe::model {

class ExpertComm {
 public:
  // Completes a posted exchange: its error, or Ok once the receive buffer is filled.
  using Done = std::function<Status()>;

  virtual ~ExpertComm() = default;
  virtual int size() const = 0;  // ranks in the ep group (parallel.ep)
  virtual int rank() const = 0;  // this rank's position (the expert shard it owns)
  // ep ranks per node: size() when the group sits in one node, else the ranks of the group on
  // each node (the group covers whole nodes, parallel/topology.h). Rank i is on node
  // i / ranks_per_node() at local index i % ranks_per_node().
  virtual int ranks_per_node() const = 0;
  // all_to_all accepts device memory (an NCCL communicator); else rows are staged via the host.
  virtual bool device_buffers() const { return false; }

  // Posts an all-to-all: send_counts[p] rows of `row_bytes` bytes go to rank p, recv_counts[p]
  // rows come from rank p; blocks are contiguous in rank order in both buffers. The buffers must
  // stay valid until Done runs. Every rank posts the same exchanges in the same order.
  virtual Done all_to_all(const void* send, std::span<const int64_t> send_counts, void* recv,
                          std::span<const int64_t> recv_counts, int64_t row_bytes) = 0;
};

}  // namespace fp8pipe::model
