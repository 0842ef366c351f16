// model::ExpertComm (core/model/expert_comm.h) over a parallel::Comm: the MoE layer's all-to-alls
// run on the ep communicator's comm thread, so they are in flight while the compute thread works.
#pragma once

#include "core/model/expert_comm.h"
#include "parallel/comm.h"

namespace fp8pipe::parallel {

class CommExpertComm final : public model::ExpertComm {
 public:
  // ep: the expert-parallel communicator; ranks_per_node: ep ranks per node (Topology).
  CommExpertComm(Comm* ep, int ranks_per_node) : ep_(ep), per_node_(ranks_per_node) {}
  int size() const override { return ep_->size(); }
  int rank() const override { return ep_->rank(); }
  int ranks_per_node() const override { return per_node_; }
  Done all_to_all(const void* send, std::span<const int64_t> send_counts, void* recv,
                  std::span<const int64_t> recv_counts, int64_t row_bytes) override {
    Work w = ep_->all_to_all_v(send, send_counts, recv, recv_counts, DataType::kByte, row_bytes);
    return [w] { return w.wait(); };
  }

 private:
  Comm* ep_;
  int per_node_;
};

// ep ranks per node for a layout: the whole group when it fits in a node, else the node size.
inline int ep_ranks_per_node(const Topology& t) {
  return t.ep() <= t.ranks_per_node() ? t.ep() : t.ranks_per_node();
}

}  // namespace fp8pipe::parallel
