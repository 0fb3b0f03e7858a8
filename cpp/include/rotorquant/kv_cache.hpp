// A compressed key/value cache for transformer attention (docs/kv_cache.md).
//
// Layout: per layer, per (batch row, KV head) the first sink_tokens tokens in full precision, then a
// growing structure-of-arrays of packed codes (keys and values, each with its own Quantizer), then a full-precision window of the newest tokens
// (a ring of at most residual_window tokens). Tokens leave the window in order and are quantized then.
//
// Exact re-parameterizations applied before quantizing (all fixed from the first chunk appended to a layer):
//   key centering    k' = k - mu_k (per layer and KV head). Softmax is shift-invariant per query, so the
//                    scores need no correction.
//   value centering  v' = v - mu_v; the output gets mu_v added once (the weights sum to one).
//   channel scaling  keys are divided by s (per layer, KV head and channel) before rotation and queries
//                    multiplied by s: q.k' = (q*s).(k'/s).
// attend() computes attention on the codes: queries are rotated once, scores come from centroid lookups
// times the norms (plus the QJL term in prod mode), an online softmax runs over tiles of codes and the
// window, values are accumulated in the value rotation's domain and rotated back once per query row.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "rotorquant/quantizer.hpp"
#include "rotorquant/rotation.hpp"

namespace rotorquant {

struct KVCacheParams {
  std::int64_t num_layers = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  int key_bits = 4;    // 1..8
  int value_bits = 3;  // 1..8
  RotationKind rotation = RotationKind::kHadamard;
  QuantizerMode mode = QuantizerMode::kMSE;  // for keys and values
  std::int64_t residual_window = 128;        // >= 0 tokens kept in full precision
  // >= 0 first tokens of the sequence kept in full precision (attention sinks: the first token often takes
  // most of the attention weight and lies far from the key mean, so its quantization error dominates).
  std::int64_t sink_tokens = 4;
  std::vector<std::int64_t> protected_layers;  // layers quantized at protected_bits (keys and values)
  int protected_bits = 8;                    // 1..8
  std::uint64_t seed = 0;
  bool center_keys = true;
  bool center_values = false;
  // Exponent a of the per-channel key scaling s_j = (rms_j / mean_i rms_i)^a (rms of the centered keys of
  // the first chunk); 0 disables it. 0 <= a <= 1.
  float key_channel_scaling = 0.0f;
  NormDtype norm_dtype = NormDtype::kFloat16;
  bool norm_correction = false;  // mse mode only
};

// The seed of the quantizer of (layer, kv_head, kind) with kind 0 = keys, 1 = values:
// splitmix64(seed + 0x9E3779B97F4A7C15 * (1 + 2 * (layer * num_kv_heads + kv_head) + kind)).
std::uint64_t kv_quantizer_seed(std::uint64_t seed, std::int64_t layer, std::int64_t kv_head,
                                std::int64_t num_kv_heads, int kind);

class KVCache {
 public:
  explicit KVCache(const KVCacheParams& params);  // ValueError / TypeError on bad parameters
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVCacheParams& params() const { return params_; }
  std::int64_t num_layers() const { return params_.num_layers; }
  std::int64_t num_kv_heads() const { return params_.num_kv_heads; }
  std::int64_t head_dim() const { return params_.head_dim; }
  // Batch size fixed by the first append after construction / reset (0 before).
  std::int64_t batch_size() const { return batch_; }
  bool is_protected(std::int64_t layer) const;
  const Quantizer& key_quantizer(std::int64_t layer, std::int64_t kv_head) const;
  const Quantizer& value_quantizer(std::int64_t layer, std::int64_t kv_head) const;

  // keys, values: (batch, num_kv_heads, tokens, head_dim) float32 row-major, finite.
  void append(std::int64_t layer, const float* keys, const float* values, std::int64_t batch, std::int64_t tokens);

  // queries: (batch, q_heads, q_len, head_dim) float32; q_heads a multiple of num_kv_heads (query head i
  // uses KV head i / (q_heads / num_kv_heads)). out: same shape. scale <= 0 -> 1/sqrt(head_dim).
  // Causal: query i sits at position seq_length - q_len + i and sees positions <= its own.
  // mask (optional, nullptr = none): (batch, q_len, seq_length) bytes, non-zero = may attend; combined with
  // the causal rule when causal is true. A query row that sees no token gets a zero output.
  void attend(std::int64_t layer, const float* queries, std::int64_t batch, std::int64_t q_heads, std::int64_t q_len,
              float scale, bool causal, const std::uint8_t* mask, float* out) const;

  // Keys and values as the cache represents them (decoded codes, rescaled, mean added back; window
  // tokens exact): out (batch, num_kv_heads, seq_length, head_dim) each. The slow path and the test oracle.
  void dequantize(std::int64_t layer, float* keys_out, float* values_out) const;

  // The packed codes of (layer, batch row, KV head): keys (values = false) or values, quantized_length(layer)
  // tokens in the SoA layout of docs/format.md, oldest first. Valid until the next non-const call.
  ConstCodesView codes(std::int64_t layer, std::int64_t batch_row, std::int64_t kv_head, bool values) const;

  std::int64_t seq_length(std::int64_t layer) const;
  std::int64_t quantized_length(std::int64_t layer) const;  // tokens held as codes (outside the window)
  std::int64_t window_length(std::int64_t layer) const;     // newest tokens held in full precision
  std::int64_t sink_length(std::int64_t layer) const;       // first tokens held in full precision

  // Bytes held: codes (per token: key and value code sizes), sink and window tokens (2 * head_dim float32 each),
  // and the per-(layer, head) statistics in use (means, scales: head_dim float32 each).
  std::int64_t nbytes() const;
  // Bytes per token of one (layer, batch row, KV head) outside the window.
  std::int64_t code_bytes_per_token(std::int64_t layer) const;

  // New batch row i = old row indices[i] (beam search); indices in [0, batch), any count >= 1.
  void reorder(const std::int64_t* indices, std::int64_t count);
  // Keeps the first `length` tokens of every layer (no-op for layers that hold fewer). Tokens already
  // quantized stay quantized; the window keeps the tokens that were in it.
  void crop(std::int64_t length);
  // Drops everything, including the statistics fixed from the first chunk and the batch size.
  void reset();

  // Per-(layer, head) statistics (head_dim floats; empty before the layer's first append or when disabled).
  std::vector<float> key_mean(std::int64_t layer, std::int64_t kv_head) const;
  std::vector<float> value_mean(std::int64_t layer, std::int64_t kv_head) const;
  std::vector<float> key_scale(std::int64_t layer, std::int64_t kv_head) const;

  struct Stream;  // codes + window of one (layer, batch row, KV head)
  struct Layer;

 private:
  void check_layer(std::int64_t layer, const char* what) const;

  KVCacheParams params_;
  std::int64_t batch_ = 0;
  std::vector<std::unique_ptr<Quantizer>> quantizers_;  // (layer, head, kind)
  std::vector<std::unique_ptr<Layer>> layers_;
};

}  // namespace rotorquant
