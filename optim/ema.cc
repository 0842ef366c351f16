// ParamEma (ema.h): the average, its asynchronous update and its checkpoint arrays.
#include "optim/ema.h"

#include <cstring>

namespace fp8pipe::optim {

ParamEma::ParamEma(float decay, std::vector<ParamGroup> groups)
    : decay_(decay), groups_(std::move(groups)) {
  reset();
}

void ParamEma::reset() {
  wait();
  ema_.clear();
  for (const ParamGroup& g : groups_) ema_.emplace_back(g.param, g.param + g.numel());
}

void ParamEma::copy_to_params() {
  wait();
  for (size_t i = 0; i < groups_.size(); ++i) {
    std::memcpy(groups_[i].param, ema_[i].data(), ema_[i].size() * sizeof(float));
  }
}

void ParamEma::update() {
  const float a = 1.0f - decay_;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const float* w = groups_[i].param;
    float* e = ema_[i].data();
    const int64_t n = groups_[i].numel();
    for (int64_t j = 0; j < n; ++j) e[j] += a * (w[j] - e[j]);
  }
}

void ParamEma::update_async() {
  wait();
  running_ = std::async(std::launch::async, [this] { update(); });
}

void ParamEma::wait() {
  if (running_.valid()) running_.get();
}

std::vector<StateArray> ParamEma::export_state() {
  wait();
  std::vector<StateArray> out;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    StateArray a{g.name + ".ema", g.begin, g.end, std::vector<uint8_t>(size_t(g.numel()) * 4)};
    std::memcpy(a.bytes.data(), ema_[i].data(), a.bytes.size());
    out.push_back(std::move(a));
  }
  return out;
}

Status ParamEma::import_state(const std::vector<StateArray>& arrays) {
  wait();
  if (arrays.size() != groups_.size()) {
    return FP8_INVALID("ema: {} arrays for {} parameter groups", arrays.size(), groups_.size());
  }
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    const StateArray& a = arrays[i];
    if (a.name != g.name + ".ema" || a.begin != g.begin || a.end != g.end ||
        a.bytes.size() != size_t(g.numel()) * 4) {
      return FP8_INVALID("ema: array '{}' [{}, {}) of {} bytes does not fit group '{}' [{}, {})",
                         a.name, a.begin, a.end, a.bytes.size(), g.name, g.begin, g.end);
    }
  }
  for (size_t i = 0; i < groups_.size(); ++i) {
    std::memcpy(ema_[i].data(), arrays[i].bytes.data(), arrays[i].bytes.size());
  }
  return Status::Ok();
}

}  // namespace fp8pipe::optim
