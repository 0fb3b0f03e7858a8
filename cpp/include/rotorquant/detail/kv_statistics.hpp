// The per-(layer, KV head) statistics a KV cache fixes from the first chunk appended to a layer
// (docs/kv_cache.md "Exact re-parameterizations"): key mean, value mean, per-channel key scale.
//
// One function, used by the CPU cache (KVCache::append) and, through the binding
// `_core.kv_chunk_statistics`, by the device-resident mode of rotorquant.KVCache, so that both hold the
// same floats bit for bit (the device mode copies the first chunk to the host once per layer).
#pragma once

#include <cstdint>
#include <vector>

namespace rotorquant {
namespace detail {

struct KVChunkStatistics {
  std::vector<float> key_mean;    // heads * head_dim, empty unless center_keys
  std::vector<float> value_mean;  // heads * head_dim, empty unless center_values
  std::vector<float> key_scale;   // heads * head_dim, empty unless key_channel_scaling > 0
};

// keys, values: (batch, heads, tokens, head_dim) float32 row-major, finite (checked: ValueError naming `what`).
// Means are over (batch, tokens) in double, rounded to float once. The key scale of channel j is
// s_j = (rms_j / mean_i rms_i)^a with rms of the centered keys (double; rms floored at 1e-3 of the largest;
// all ones when every rms is 0), a = key_channel_scaling in [0, 1]. ValueError for batch, tokens, heads or
// head_dim < 1 or a out of range.
KVChunkStatistics kv_chunk_statistics(const float* keys, const float* values, std::int64_t batch, std::int64_t heads,
                                      std::int64_t tokens, std::int64_t head_dim, bool center_keys, bool center_values,
                                      float key_channel_scaling, const char* what);

}  // namespace detail
}  // namespace rotorquant
