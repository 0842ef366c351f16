#include "optim/device_adamw.h"

#include <algorithm>
#include <cstring>

namespace fp8pipe::optim {

Result<DeviceAdamW> DeviceAdamW::create(Backend& be, const AdamW& host,
                                        std::vector<TensorGroup> groups, const FlatLayout& flat) {
  const auto& hg = host.groups();
  if (groups.size() != hg.size()) {
    return FP8_INVALID("device adamw: {} groups, the host optimizer has {}", groups.size(),
                       hg.size());
  }
  DeviceAdamW d;
  d.be_ = &be;
  d.cfg_ = host.config();
  const int64_t total = flat.value.numel();
  if (flat.offset.size() != groups.size() || flat.grad.numel() != total) {
    return FP8_INVALID("device adamw: a flat layout of {} offsets for {} groups",
                       flat.offset.size(), groups.size());
  }
  d.value_ = flat.value;
  d.grad_ = flat.grad;
  // Where each group's moments start in the flat moments (laid out below).
  std::vector<int64_t> moment(groups.size());
  int64_t moments = 0;
  bool last_whole = false;
  for (size_t i = 0; i < groups.size(); ++i) {
    TensorGroup& g = groups[i];
    if (!g.param || !g.grad || g.name != hg[i].name) {
      return FP8_INVALID("device adamw: group {} is '{}', the host optimizer's is '{}'", i, g.name,
                         hg[i].name);
    }
    const int64_t n = g.param->numel();
    if (g.end < 0) g.end = n;
    if (hg[i].begin != g.begin || hg[i].end != g.end || g.begin < 0 || g.begin >= g.end ||
        g.end > n || g.grad->numel() != n || g.weight_decay != hg[i].weight_decay) {
      return FP8_INVALID(
          "device adamw: group '{}' steps [{}, {}) of {} elements with decay {}; the host "
          "optimizer's steps [{}, {}) with decay {}",
          g.name, g.begin, g.end, n, g.weight_decay, hg[i].begin, hg[i].end, hg[i].weight_decay);
    }
    const int64_t at = flat.offset[i];
    if (at < 0 || at + n > total || (i > 0 && at < flat.offset[i - 1])) {
      return FP8_INVALID("device adamw: group '{}' at offset {} does not fit the flat layout",
                         g.name, at);
    }
    const bool whole = g.begin == 0 && g.end == n;
    // A whole tensor after a whole tensor with the same decay flag joins its run, gap included.
    if (whole && last_whole && d.runs_.back().weight_decay == g.weight_decay) {
      Run& r = d.runs_.back();
      moment[i] = r.moment + (at - r.begin);
      r.end = at + n;
      moments = r.moment + (r.end - r.begin);
    } else {
      moment[i] = moments;
      d.runs_.push_back({at + g.begin, at + g.end, moments, g.weight_decay});
      moments += g.end - g.begin;
    }
    last_whole = whole;
  }
  FP8_ASSIGN_OR_RETURN(d.m_flat_, be.zeros({std::max<int64_t>(moments, 1)}, DType::kBF16));
  FP8_ASSIGN_OR_RETURN(d.v_flat_, be.zeros({std::max<int64_t>(moments, 1)}, DType::kBF16));
  for (size_t i = 0; i < groups.size(); ++i) {
    const int64_t len = groups[i].end - groups[i].begin;
    d.m_.push_back(d.m_flat_.slice_rows(moment[i], moment[i] + len));
    d.v_.push_back(d.v_flat_.slice_rows(moment[i], moment[i] + len));
  }
  d.groups_ = std::move(groups);
  FP8_RETURN_IF_ERROR(d.load_from(host));
  return d;
}

Status DeviceAdamW::step(float lr, float grad_scale) {
  FP8_RETURN_IF_ERROR(check_step_args(lr, grad_scale));
  ++step_;
  const kernels::AdamWScalars sc[2] = {step_scalars(cfg_, false, lr, step_, grad_scale),
                                       step_scalars(cfg_, true, lr, step_, grad_scale)};
  return be_->adamw_runs(value_, grad_, m_flat_, v_flat_, runs_, sc);  // one launch on a device
}

// The state travels as AdamWState (bf16 bytes, little-endian as the host stores them).
Status DeviceAdamW::store_to(AdamW& host) const {
  AdamWState st;
  st.step = step_;
  for (size_t i = 0; i < groups_.size(); ++i) {
    for (const Tensor* t : {&m_[i], &v_[i]}) {
      FP8_ASSIGN_OR_RETURN(Tensor h, be_->to_host(*t));
      const auto* b = static_cast<const uint8_t*>(h.data());
      st.arrays.push_back(StateArray{groups_[i].name + (t == &m_[i] ? ".exp_avg" : ".exp_avg_sq"),
                                     groups_[i].begin, groups_[i].end,
                                     std::vector<uint8_t>(b, b + h.nbytes())});
    }
  }
  return host.import_state(st);
}

Status DeviceAdamW::load_from(const AdamW& host) {
  AdamWState st = host.export_state();
  if (st.arrays.size() != 2 * groups_.size()) {
    return FP8_INVALID("device adamw: the host state has {} arrays, expected {}", st.arrays.size(),
                       2 * groups_.size());
  }
  auto cpu = make_cpu_backend();
  for (size_t i = 0; i < groups_.size(); ++i) {
    for (int k = 0; k < 2; ++k) {  // export order: exp_avg, exp_avg_sq per group
      const StateArray& a = st.arrays[2 * i + k];
      Tensor& dst = k == 0 ? m_[i] : v_[i];
      if (a.bytes.size() != dst.nbytes()) {
        return FP8_INVALID("device adamw: '{}' has {} bytes, expected {}", a.name, a.bytes.size(),
                           dst.nbytes());
      }
      FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty(dst.shape(), DType::kBF16));
      std::memcpy(h.data(), a.bytes.data(), a.bytes.size());
      FP8_RETURN_IF_ERROR(be_->copy(h, dst));
    }
  }
  step_ = st.step;
  return Status::Ok();
}

}  // namespace fp8pipe::optim
