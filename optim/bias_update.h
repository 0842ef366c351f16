// DeepSeek-V3's auxiliary-loss-free load balancing (TR §2.1.2): after each step every routed
// expert's bias moves by the speed gamma against its load, b_i -= gamma * sign(load_i - mean load).
// The bias only steers top-k selection; it is not an Adam parameter and gets no gradient.
#pragma once

#include <cstdint>

#include "core/status.h"

namespace fp8pipe::optim {

// counts[i]: tokens routed to expert i of one MoE layer over the whole global batch (summed over
// micro-batches and all-reduced over dp first, so every rank applies the same update). For each
// expert, in fp32: overloaded (count > mean) b_i -= gamma, underloaded b_i += gamma, equal to the
// mean: unchanged. The comparison is exact, in integers: n * count_i versus the total.
// Fails, changing nothing, on n_experts < 1, a negative count, or gamma not finite or < 0.
Status update_router_bias(float* bias, const int64_t* counts, int64_t n_experts, float gamma);

}  // namespace fp8pipe::optim
