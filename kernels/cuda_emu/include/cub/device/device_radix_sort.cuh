// fp8pipe CUDA emulation: cub::DeviceRadixSort::SortPairs (stable LSD radix sort semantics:
// ascending by the key bits [begin_bit, end_bit), equal keys keep their input order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../../cuda_runtime_api.h"

namespace cub {
struct DeviceRadixSort {
  template <class K, class V, class N>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, N num_items, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t stream = nullptr) {
    const size_t n = static_cast<size_t>(num_items);
    if (temp == nullptr) {  // size query: something non-zero, as cub asks for
      temp_bytes = 256 + n * (sizeof(K) + sizeof(V));
      return cudaSuccess;
    }
    fp8pipe::cuda_emu::flush_stream(stream);  // runs at the call, after the stream's earlier work
    using fp8pipe::cuda_emu::is_device_range;
    if (!is_device_range(temp, temp_bytes) ||
        (n > 0 &&
         (!is_device_range(keys_in, n * sizeof(K)) || !is_device_range(keys_out, n * sizeof(K)) ||
          !is_device_range(values_in, n * sizeof(V)) ||
          !is_device_range(values_out, n * sizeof(V))))) {
      fp8pipe::cuda_emu::raise_fault(
          cudaErrorIllegalAddress,
          "cub::DeviceRadixSort::SortPairs: a buffer is not device memory");
      return cudaSuccess;
    }
    using U = std::make_unsigned_t<K>;
    const U lo_mask = begin_bit >= static_cast<int>(sizeof(K) * 8) ? U(0) : U(~U(0)) << begin_bit;
    const U hi_mask =
        end_bit >= static_cast<int>(sizeof(K) * 8) ? U(~U(0)) : U((U(1) << end_bit) - 1);
    const U mask = lo_mask & hi_mask;
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return (static_cast<U>(keys_in[a]) & mask) < (static_cast<U>(keys_in[b]) & mask);
    });
    std::vector<K> k(n);
    std::vector<V> v(n);
    for (size_t i = 0; i < n; ++i) {
      k[i] = keys_in[order[i]];
      v[i] = values_in[order[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};
}  // namespace cub
