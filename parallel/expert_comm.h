// model::ExpertComm (core/model/expert_comm.h) over a parallel::Comm: the MoE layer's all-to-alls
// run on the ep communicator's comm thread, so they are in flight while the compute thread works.
#pragma once

#include <fmt/format.h>

#include <memory>
#include <numeric>
#include <string>

#include "core/model/expert_comm.h"
#include "parallel/comm.h"
#include "parallel/trace.h"

namespace fp8pipe::parallel {

class CommExpertComm final : public model::ExpertComm {
 public:
  // ep: the expert-parallel communicator; ranks_per_node: ep ranks per node (Topology).
  CommExpertComm(Comm* ep, int ranks_per_node) : ep_(ep), per_node_(ranks_per_node) {}
  int size() const override { return ep_->size(); }
  int rank() const override { return ep_->rank(); }
  int ranks_per_node() const override { return per_node_; }
  bool device_buffers() const override { return ep_->device_buffers(); }

  // A copy that records every all-to-all as an "a2a" phase on row `row` of `tracer`, from its
  // post to its completion (as stamped by `clock`, or by the wait if that saw it first), with
  // the step. The executor gives each model chunk its own copy (its own row) while it traces.
  CommExpertComm traced(Tracer* tracer, CompletionClock* clock, std::string row,
                        int64_t step) const {
    CommExpertComm c = *this;
    c.tracer_ = tracer;
    c.clock_ = clock;
    c.row_ = std::move(row);
    c.step_ = step;
    return c;
  }

  // Traced copies: when the last all-to-all was posted (the end of the compute slice before it).
  double last_post_us() const { return last_post_us_; }

  Done all_to_all(const void* send, std::span<const int64_t> send_counts, void* recv,
                  std::span<const int64_t> recv_counts, int64_t row_bytes) override {
    if (!tracer_ || !clock_) {
      Work w = ep_->all_to_all_v(send, send_counts, recv, recv_counts, DataType::kByte, row_bytes);
      return [w] { return w.wait(); };
    }
    const double post = tracer_->now_us();
    last_post_us_ = post;
    Work w = ep_->all_to_all_v(send, send_counts, recv, recv_counts, DataType::kByte, row_bytes);
    std::shared_ptr<CompletionClock::Stamp> stamp = clock_->watch(w);
    const int64_t bytes =
        std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0}) * row_bytes;
    return [w, stamp, post, bytes, t = tracer_, row = row_, step = step_] {
      Status s = w.wait();
      stamp->observe(t->now_us());
      t->phase(fmt::format("a2a {} B", bytes), row, "a2a", post, stamp->at.load(), step);
      return s;
    };
  }

 private:
  Comm* ep_;
  int per_node_;
  Tracer* tracer_ = nullptr;  // traced copies only
  CompletionClock* clock_ = nullptr;
  std::string row_;
  int64_t step_ = 0;
  double last_post_us_ = -1;
};

// ep ranks per node for a layout: the whole group when it fits in a node, else the node size.
inline int ep_ranks_per_node(const Topology& t) {
  return t.ep() <= t.ranks_per_node() ? t.ep() : t.ranks_per_node();
}

}  // namespace fp8pipe::parallel
