// CPU implementation of the compressed KV cache (kv_cache.hpp, docs/kv_cache.md).
#include "rotorquant/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "rotorquant/error.hpp"
#include "rotorquant/detail/kv_statistics.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/parallel.hpp"

namespace rotorquant {
namespace {

constexpr std::int64_t kTokenTile = 32;  // tokens whose centroid vectors are unpacked together in attend
constexpr double kSqrtHalfPi = 1.2533141373155002512078826424055;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

float dot(const float* a, const float* b, std::int64_t len) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[j + k] * b[j + k];
  }
  float tail = 0.0f;
  for (; j < len; ++j) tail += a[j] * b[j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

void axpy(float a, const float* x, float* y, std::int64_t len) {
  for (std::int64_t j = 0; j < len; ++j) y[j] += a * x[j];
}

float load_norm(NormDtype dtype, const std::uint8_t* src) {
  if (dtype == NormDtype::kFloat16) {
    return half_to_float(static_cast<std::uint16_t>(src[0] | (static_cast<std::uint16_t>(src[1]) << 8)));
  }
  float value;
  std::memcpy(&value, src, sizeof value);  // little-endian hosts only (as the rest of the core)
  return value;
}

void check_finite(const float* data, std::int64_t count, const char* what, const char* name) {
  const std::int64_t chunk = 4096;
  const std::int64_t chunks = (count + chunk - 1) / chunk;
  parallel_for(chunks, chunk, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t c = begin; c < end; ++c) {
      const std::int64_t last = std::min(count, (c + 1) * chunk);
      for (std::int64_t i = c * chunk; i < last; ++i) {
        if (!std::isfinite(data[i])) {
          throw ValueError(std::string(what) + ": " + name +
                           " contains non-finite values (NaN or Inf): expected finite values");
        }
      }
    }
  });
}

// The growing code arrays of one quantizer.
struct CodeStore {
  std::vector<std::uint8_t> indices, norms, signs, residual_norms;

  void append(const CodeSizes& sizes, const std::uint8_t* idx, const std::uint8_t* nrm, const std::uint8_t* sgn,
              const std::uint8_t* res, std::int64_t n) {
    indices.insert(indices.end(), idx, idx + n * sizes.index_bytes);
    norms.insert(norms.end(), nrm, nrm + n * sizes.norm_bytes);
    if (sizes.sign_bytes > 0) signs.insert(signs.end(), sgn, sgn + n * sizes.sign_bytes);
    if (sizes.residual_norm_bytes > 0) residual_norms.insert(residual_norms.end(), res, res + n * sizes.residual_norm_bytes);
  }
  void truncate(const CodeSizes& sizes, std::int64_t n) {
    indices.resize(static_cast<std::size_t>(n * sizes.index_bytes));
    norms.resize(static_cast<std::size_t>(n * sizes.norm_bytes));
    signs.resize(static_cast<std::size_t>(n * sizes.sign_bytes));
    residual_norms.resize(static_cast<std::size_t>(n * sizes.residual_norm_bytes));
  }
  ConstCodesView view() const { return {indices.data(), norms.data(), signs.data(), residual_norms.data()}; }
};

// Temporary codes of a batch of n vectors.
struct CodeBuffer {
  std::vector<std::uint8_t> indices, norms, signs, residual_norms;
  CodeBuffer(const CodeSizes& sizes, std::int64_t n)
      : indices(static_cast<std::size_t>(n * sizes.index_bytes)),
        norms(static_cast<std::size_t>(n * sizes.norm_bytes)),
        signs(static_cast<std::size_t>(n * sizes.sign_bytes)),
        residual_norms(static_cast<std::size_t>(n * sizes.residual_norm_bytes)) {}
  CodesView view() { return {indices.data(), norms.data(), signs.data(), residual_norms.data()}; }
};

}  // namespace

struct KVCache::Stream {
  CodeStore keys, values;
  std::int64_t count = 0;        // tokens held as codes
  std::vector<float> window_keys, window_values;  // ring of residual_window tokens (centered)
  std::int64_t window_start = 0, window_count = 0;
  std::vector<float> sink_keys, sink_values;  // the first sink_tokens tokens (centered)
  std::int64_t sink_count = 0;
};

struct KVCache::Layer {
  bool has_statistics = false;
  std::vector<float> key_mean, value_mean, key_scale;  // num_kv_heads * head_dim each (when enabled)
  std::vector<Stream> streams;                         // batch * num_kv_heads
};

namespace detail {

KVChunkStatistics kv_chunk_statistics(const float* keys, const float* values, std::int64_t batch, std::int64_t heads,
                                      std::int64_t tokens, std::int64_t head_dim, bool center_keys, bool center_values,
                                      float key_channel_scaling, const char* what) {
  auto fail = [&](const std::string& name, const std::string& expected, const std::string& got) {
    throw ValueError(expected_got(std::string(what) + ": " + name, expected, got));
  };
  if (batch < 1) fail("batch", ">= 1", std::to_string(batch));
  if (heads < 1) fail("heads", ">= 1", std::to_string(heads));
  if (tokens < 1) fail("tokens", ">= 1", std::to_string(tokens));
  if (head_dim < 1) fail("head_dim", ">= 1", std::to_string(head_dim));
  if (!(key_channel_scaling >= 0.0f && key_channel_scaling <= 1.0f)) {
    fail("key_channel_scaling", "an exponent in [0, 1] (0 = off)", std::to_string(key_channel_scaling));
  }
  if (keys == nullptr || values == nullptr) throw ValueError(std::string(what) + ": expected non-null keys and values");
  const std::int64_t d = head_dim;
  check_finite(keys, batch * heads * tokens * d, what, "keys");
  check_finite(values, batch * heads * tokens * d, what, "values");
  auto token_row = [&](const float* base, std::int64_t b, std::int64_t h, std::int64_t t) {
    return base + ((b * heads + h) * tokens + t) * d;
  };
  KVChunkStatistics out;
  std::vector<float>& key_mean_local = out.key_mean;
  std::vector<float>& value_mean_local = out.value_mean;
  std::vector<float>& key_scale_local = out.key_scale;
  const double count = static_cast<double>(batch * tokens);
  const bool scaling = key_channel_scaling > 0.0f;
  if (center_keys) key_mean_local.assign(static_cast<std::size_t>(heads * d), 0.0f);
  if (center_values) value_mean_local.assign(static_cast<std::size_t>(heads * d), 0.0f);
  if (scaling) key_scale_local.assign(static_cast<std::size_t>(heads * d), 1.0f);
  for (std::int64_t h = 0; h < heads; ++h) {
    std::vector<double> kmean(static_cast<std::size_t>(d), 0.0), vmean(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t b = 0; b < batch; ++b) {
      for (std::int64_t t = 0; t < tokens; ++t) {
        const float* k = token_row(keys, b, h, t);
        const float* v = token_row(values, b, h, t);
        for (std::int64_t j = 0; j < d; ++j) {
          kmean[static_cast<std::size_t>(j)] += k[j];
          vmean[static_cast<std::size_t>(j)] += v[j];
        }
      }
    }
    for (std::int64_t j = 0; j < d; ++j) {
      if (center_keys) key_mean_local[static_cast<std::size_t>(h * d + j)] = static_cast<float>(kmean[static_cast<std::size_t>(j)] / count);
      if (center_values) value_mean_local[static_cast<std::size_t>(h * d + j)] = static_cast<float>(vmean[static_cast<std::size_t>(j)] / count);
    }
    if (scaling) {
      std::vector<double> sq(static_cast<std::size_t>(d), 0.0);
      for (std::int64_t b = 0; b < batch; ++b) {
        for (std::int64_t t = 0; t < tokens; ++t) {
          const float* k = token_row(keys, b, h, t);
          for (std::int64_t j = 0; j < d; ++j) {
            const double c = static_cast<double>(k[j]) -
                             (center_keys ? key_mean_local[static_cast<std::size_t>(h * d + j)] : 0.0f);
            sq[static_cast<std::size_t>(j)] += c * c;
          }
        }
      }
      double max_rms = 0.0, sum_rms = 0.0;
      std::vector<double> rms(static_cast<std::size_t>(d));
      for (std::int64_t j = 0; j < d; ++j) {
        rms[static_cast<std::size_t>(j)] = std::sqrt(sq[static_cast<std::size_t>(j)] / count);
        max_rms = std::max(max_rms, rms[static_cast<std::size_t>(j)]);
      }
      if (max_rms > 0.0) {
        for (std::int64_t j = 0; j < d; ++j) {
          rms[static_cast<std::size_t>(j)] = std::max(rms[static_cast<std::size_t>(j)], 1e-3 * max_rms);
          sum_rms += rms[static_cast<std::size_t>(j)];
        }
        const double mean_rms = sum_rms / static_cast<double>(d);
        for (std::int64_t j = 0; j < d; ++j) {
          key_scale_local[static_cast<std::size_t>(h * d + j)] = static_cast<float>(
              std::pow(rms[static_cast<std::size_t>(j)] / mean_rms, static_cast<double>(key_channel_scaling)));
        }
      }
    }
  }
  return out;
}

}  // namespace detail

std::uint64_t kv_quantizer_seed(std::uint64_t seed, std::int64_t layer, std::int64_t kv_head,
                                std::int64_t num_kv_heads, int kind) {
  const std::uint64_t slot = 1 + 2 * static_cast<std::uint64_t>(layer * num_kv_heads + kv_head) +
                             static_cast<std::uint64_t>(kind);
  return splitmix64(seed + 0x9E3779B97F4A7C15ull * slot);
}

KVCache::KVCache(const KVCacheParams& params) : params_(params) {
  const char* what = "KVCache";
  auto fail = [&](const std::string& name, const std::string& expected, const std::string& got) {
    throw ValueError(detail::expected_got(std::string(what) + ": " + name, expected, got));
  };
  if (params.num_layers < 1) fail("num_layers", ">= 1", std::to_string(params.num_layers));
  if (params.num_kv_heads < 1) fail("num_kv_heads", ">= 1", std::to_string(params.num_kv_heads));
  if (params.head_dim < 2 || params.head_dim > 4096) fail("head_dim", "2..4096", std::to_string(params.head_dim));
  if (params.key_bits < 1 || params.key_bits > 8) fail("key_bits", "1..8", std::to_string(params.key_bits));
  if (params.value_bits < 1 || params.value_bits > 8) fail("value_bits", "1..8", std::to_string(params.value_bits));
  if (params.protected_bits < 1 || params.protected_bits > 8) {
    fail("protected_bits", "1..8", std::to_string(params.protected_bits));
  }
  if (params.residual_window < 0) fail("residual_window", ">= 0", std::to_string(params.residual_window));
  if (params.sink_tokens < 0) fail("sink_tokens", ">= 0", std::to_string(params.sink_tokens));
  if (!(params.key_channel_scaling >= 0.0f && params.key_channel_scaling <= 1.0f)) {
    fail("key_channel_scaling", "an exponent in [0, 1] (0 = off)", std::to_string(params.key_channel_scaling));
  }
  for (std::int64_t layer : params.protected_layers) {
    if (layer < 0 || layer >= params.num_layers) {
      fail("protected_layers entry", "a layer in [0, " + std::to_string(params.num_layers) + ")", std::to_string(layer));
    }
  }
  const std::int64_t heads = params.num_kv_heads;
  quantizers_.reserve(static_cast<std::size_t>(params.num_layers * heads * 2));
  for (std::int64_t layer = 0; layer < params.num_layers; ++layer) {
    const bool is_protected_layer = is_protected(layer);
    for (std::int64_t head = 0; head < heads; ++head) {
      for (int kind = 0; kind < 2; ++kind) {
        QuantizerParams q;
        q.dim = params.head_dim;
        q.bits = is_protected_layer ? params.protected_bits : (kind == 0 ? params.key_bits : params.value_bits);
        q.rotation = params.rotation;
        q.mode = params.mode;
        q.seed = kv_quantizer_seed(params.seed, layer, head, heads, kind);
        q.norm_dtype = params.norm_dtype;
        q.norm_correction = params.norm_correction;
        quantizers_.push_back(std::make_unique<Quantizer>(q));
      }
    }
  }
  layers_.resize(static_cast<std::size_t>(params.num_layers));
  for (auto& layer : layers_) layer = std::make_unique<Layer>();
}

KVCache::~KVCache() = default;

bool KVCache::is_protected(std::int64_t layer) const {
  return std::find(params_.protected_layers.begin(), params_.protected_layers.end(), layer) !=
         params_.protected_layers.end();
}

void KVCache::check_layer(std::int64_t layer, const char* what) const {
  if (layer < 0 || layer >= params_.num_layers) {
    throw ValueError(detail::expected_got(std::string(what) + ": layer",
                                          "in [0, " + std::to_string(params_.num_layers) + ")", std::to_string(layer)));
  }
}

const Quantizer& KVCache::key_quantizer(std::int64_t layer, std::int64_t kv_head) const {
  check_layer(layer, "KVCache.key_quantizer");
  if (kv_head < 0 || kv_head >= params_.num_kv_heads) {
    throw ValueError(detail::expected_got("KVCache.key_quantizer: kv_head",
                                          "in [0, " + std::to_string(params_.num_kv_heads) + ")", std::to_string(kv_head)));
  }
  return *quantizers_[static_cast<std::size_t>((layer * params_.num_kv_heads + kv_head) * 2)];
}

const Quantizer& KVCache::value_quantizer(std::int64_t layer, std::int64_t kv_head) const {
  check_layer(layer, "KVCache.value_quantizer");
  if (kv_head < 0 || kv_head >= params_.num_kv_heads) {
    throw ValueError(detail::expected_got("KVCache.value_quantizer: kv_head",
                                          "in [0, " + std::to_string(params_.num_kv_heads) + ")", std::to_string(kv_head)));
  }
  return *quantizers_[static_cast<std::size_t>((layer * params_.num_kv_heads + kv_head) * 2 + 1)];
}

void KVCache::append(std::int64_t layer_index, const float* keys, const float* values, std::int64_t batch,
                     std::int64_t tokens) {
  const char* what = "KVCache.append";
  check_layer(layer_index, what);
  if (batch < 1) throw ValueError(detail::expected_got(std::string(what) + ": batch", ">= 1", std::to_string(batch)));
  if (tokens < 0) throw ValueError(detail::expected_got(std::string(what) + ": tokens", ">= 0", std::to_string(tokens)));
  if (batch_ != 0 && batch != batch_) {
    throw ValueError(detail::expected_got(std::string(what) + ": batch size",
                                          std::to_string(batch_) + " (fixed by the first append; reset() or reorder() to change it)",
                                          std::to_string(batch)));
  }
  if (tokens == 0) return;
  if (keys == nullptr || values == nullptr) throw ValueError(std::string(what) + ": expected non-null keys and values");
  const std::int64_t heads = params_.num_kv_heads, d = params_.head_dim, window = params_.residual_window;
  check_finite(keys, batch * heads * tokens * d, what, "keys");
  check_finite(values, batch * heads * tokens * d, what, "values");
  const bool first_append = batch_ == 0;
  if (first_append) {
    for (auto& l : layers_) l->streams.assign(static_cast<std::size_t>(batch * heads), Stream());
  }
  Layer& layer = *layers_[static_cast<std::size_t>(layer_index)];
  auto token_row = [&](const float* base, std::int64_t b, std::int64_t h, std::int64_t t) {
    return base + ((b * heads + h) * tokens + t) * d;
  };

  // Everything that can throw (encode: e.g. a norm beyond float16) runs before any state changes, so a failed
  // append leaves the cache as it was. Statistics are computed into locals and committed at the end.
  std::vector<float> key_mean_local = layer.key_mean, value_mean_local = layer.value_mean,
                     key_scale_local = layer.key_scale;
  // Statistics fixed from the first chunk: means over (batch, tokens), channel RMS of the centered keys.
  if (!layer.has_statistics) {
    detail::KVChunkStatistics stats =
        detail::kv_chunk_statistics(keys, values, batch, heads, tokens, d, params_.center_keys, params_.center_values,
                                    params_.key_channel_scaling, what);
    key_mean_local = std::move(stats.key_mean);
    value_mean_local = std::move(stats.value_mean);
    key_scale_local = std::move(stats.key_scale);
  }

  // The first tokens of the sequence go to the sink (before anything else is stored), the rest through the
  // window; the tokens that leave the window (oldest first: old window, then new tokens) are encoded per head
  // for every batch row in one batched call.
  const std::int64_t sink_capacity = params_.sink_tokens;
  const std::int64_t to_sink = std::min(tokens, sink_capacity - layer.streams[0].sink_count);
  const std::int64_t offset = std::max<std::int64_t>(to_sink, 0);  // new tokens that go to the sink
  const std::int64_t rest = tokens - offset;
  const std::int64_t old_window = layer.streams[0].window_count;  // identical in every stream of the layer
  const std::int64_t evict = std::max<std::int64_t>(0, old_window + rest - window);
  const std::int64_t evict_window = std::min(evict, old_window);  // from the old window
  const std::int64_t evict_new = evict - evict_window;            // from the new tokens
  auto centered = [&](const float* x, const std::vector<float>& mean, std::int64_t h, float* out) {
    const float* mu = mean.empty() ? nullptr : mean.data() + h * d;
    for (std::int64_t j = 0; j < d; ++j) out[j] = mu ? x[j] - mu[j] : x[j];
  };

  // Phase 1 (may throw, changes nothing): encode the evicted tokens of every head.
  std::vector<CodeBuffer> key_codes, value_codes;
  try {
    for (std::int64_t h = 0; h < heads && evict > 0; ++h) {
      const float* kscale = key_scale_local.empty() ? nullptr : key_scale_local.data() + h * d;
      std::vector<float> kbuf(static_cast<std::size_t>(batch * evict * d)), vbuf(kbuf.size());
      for (std::int64_t b = 0; b < batch; ++b) {
        const Stream& s = layer.streams[static_cast<std::size_t>(b * heads + h)];
        for (std::int64_t e = 0; e < evict; ++e) {
          float* kd = kbuf.data() + (b * evict + e) * d;
          float* vd = vbuf.data() + (b * evict + e) * d;
          if (e < evict_window) {  // window tokens are stored centered already
            const std::int64_t slot = (s.window_start + e) % window;
            std::memcpy(kd, s.window_keys.data() + slot * d, static_cast<std::size_t>(d) * sizeof(float));
            std::memcpy(vd, s.window_values.data() + slot * d, static_cast<std::size_t>(d) * sizeof(float));
          } else {
            centered(token_row(keys, b, h, offset + e - evict_window), key_mean_local, h, kd);
            centered(token_row(values, b, h, offset + e - evict_window), value_mean_local, h, vd);
          }
          if (kscale) {
            for (std::int64_t j = 0; j < d; ++j) kd[j] /= kscale[j];
          }
        }
      }
      const Quantizer& kq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2)];
      const Quantizer& vq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2 + 1)];
      key_codes.emplace_back(kq.code_sizes(), batch * evict);
      value_codes.emplace_back(vq.code_sizes(), batch * evict);
      kq.encode(kbuf.data(), batch * evict, key_codes.back().view());
      vq.encode(vbuf.data(), batch * evict, value_codes.back().view());
    }
  } catch (...) {
    if (first_append) {
      for (auto& l : layers_) l->streams.clear();
    }
    throw;
  }

  // Phase 2 (no throw but allocation): commit.
  if (first_append) batch_ = batch;
  if (!layer.has_statistics) {
    layer.key_mean = std::move(key_mean_local);
    layer.value_mean = std::move(value_mean_local);
    layer.key_scale = std::move(key_scale_local);
    layer.has_statistics = true;
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      Stream& s = layer.streams[static_cast<std::size_t>(b * heads + h)];
      if (to_sink > 0) {
        if (s.sink_keys.empty()) {
          s.sink_keys.assign(static_cast<std::size_t>(sink_capacity * d), 0.0f);
          s.sink_values.assign(static_cast<std::size_t>(sink_capacity * d), 0.0f);
        }
        for (std::int64_t t = 0; t < to_sink; ++t) {
          centered(token_row(keys, b, h, t), layer.key_mean, h, s.sink_keys.data() + (s.sink_count + t) * d);
          centered(token_row(values, b, h, t), layer.value_mean, h, s.sink_values.data() + (s.sink_count + t) * d);
        }
        s.sink_count += to_sink;
      }
      if (evict > 0) {
        const CodeBuffer& kc = key_codes[static_cast<std::size_t>(h)];
        const CodeBuffer& vc = value_codes[static_cast<std::size_t>(h)];
        const CodeSizes ks = quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2)]->code_sizes();
        const CodeSizes vs = quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2 + 1)]->code_sizes();
        const std::int64_t r = b * evict;
        s.keys.append(ks, kc.indices.data() + r * ks.index_bytes, kc.norms.data() + r * ks.norm_bytes,
                      kc.signs.data() + r * ks.sign_bytes, kc.residual_norms.data() + r * ks.residual_norm_bytes, evict);
        s.values.append(vs, vc.indices.data() + r * vs.index_bytes, vc.norms.data() + r * vs.norm_bytes,
                        vc.signs.data() + r * vs.sign_bytes, vc.residual_norms.data() + r * vs.residual_norm_bytes,
                        evict);
        s.count += evict;
      }
      if (window > 0 && rest > 0) {  // drop the evicted old tokens, push the new tokens that stay
        if (s.window_keys.empty()) {
          s.window_keys.assign(static_cast<std::size_t>(window * d), 0.0f);
          s.window_values.assign(static_cast<std::size_t>(window * d), 0.0f);
        }
        s.window_start = (s.window_start + evict_window) % window;
        s.window_count -= evict_window;
        for (std::int64_t t = evict_new; t < rest; ++t) {
          const std::int64_t slot = (s.window_start + s.window_count) % window;
          centered(token_row(keys, b, h, offset + t), layer.key_mean, h, s.window_keys.data() + slot * d);
          centered(token_row(values, b, h, offset + t), layer.value_mean, h, s.window_values.data() + slot * d);
          ++s.window_count;
        }
      }
    }
  }
}

void KVCache::attend(std::int64_t layer_index, const float* queries, std::int64_t batch, std::int64_t q_heads,
                     std::int64_t q_len, float scale, bool causal, const std::uint8_t* mask, float* out) const {
  const char* what = "KVCache.attend";
  check_layer(layer_index, what);
  const std::int64_t heads = params_.num_kv_heads, d = params_.head_dim;
  if (batch < 1) throw ValueError(detail::expected_got(std::string(what) + ": batch", ">= 1", std::to_string(batch)));
  if (batch_ != 0 && batch != batch_) {
    throw ValueError(detail::expected_got(std::string(what) + ": batch size", std::to_string(batch_) + " (the cache's)",
                                          std::to_string(batch)));
  }
  if (q_heads < 1 || q_heads % heads != 0) {
    throw ValueError(detail::expected_got(std::string(what) + ": q_heads",
                                          "a positive multiple of num_kv_heads = " + std::to_string(heads),
                                          std::to_string(q_heads)));
  }
  if (q_len < 0) throw ValueError(detail::expected_got(std::string(what) + ": q_len", ">= 0", std::to_string(q_len)));
  if (!(std::isfinite(scale))) throw ValueError(std::string(what) + ": expected a finite scale");
  if (q_len == 0) return;
  if (queries == nullptr || out == nullptr) throw ValueError(std::string(what) + ": expected non-null queries and out");
  check_finite(queries, batch * q_heads * q_len * d, what, "queries");
  const float softmax_scale = scale > 0.0f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const std::int64_t group = q_heads / heads;
  const std::int64_t rows = group * q_len;  // query rows per (batch row, KV head)
  const std::int64_t seq = seq_length(layer_index);
  if (seq == 0 || batch_ == 0) {
    std::fill(out, out + batch * q_heads * q_len * d, 0.0f);
    return;
  }
  const Layer& layer = *layers_[static_cast<std::size_t>(layer_index)];
  const std::int64_t window = params_.residual_window;
  const bool prod = params_.mode == QuantizerMode::kProd;

  for (std::int64_t h = 0; h < heads; ++h) {
    const Quantizer& kq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2)];
    const Quantizer& vq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2 + 1)];
    const std::int64_t pk = kq.padded_dim(), pv = vq.padded_dim();
    const std::int64_t mk = kq.qjl_dim(), mv = vq.qjl_dim();
    const float* kscale = layer.key_scale.empty() ? nullptr : layer.key_scale.data() + h * d;
    const float* vmean = params_.center_values ? layer.value_mean.data() + h * d : nullptr;
    const std::int64_t n_rows = batch * rows;
    auto query_row = [&](std::int64_t b, std::int64_t r) {  // r = g * q_len + i
      return queries + ((b * q_heads + h * group) * q_len + r) * d;
    };

    // 1. Queries of this KV head for every batch row: scaled, rotated once, projected by S (prod).
    std::vector<float> scaled(static_cast<std::size_t>(n_rows * d));
    for (std::int64_t b = 0; b < batch; ++b) {
      std::memcpy(scaled.data() + b * rows * d, query_row(b, 0), static_cast<std::size_t>(rows * d) * sizeof(float));
    }
    if (kscale) {
      for (std::int64_t r = 0; r < n_rows; ++r) {
        for (std::int64_t j = 0; j < d; ++j) scaled[static_cast<std::size_t>(r * d + j)] *= kscale[j];
      }
    }
    std::vector<float> rotated(static_cast<std::size_t>(n_rows * pk));
    kq.rotation().apply(scaled.data(), rotated.data(), n_rows);
    std::vector<float> projected(prod ? static_cast<std::size_t>(n_rows * mk) : 0);
    if (prod) {
      const float* s_matrix = kq.qjl_matrix().data();
      for (std::int64_t r = 0; r < n_rows; ++r) {
        for (std::int64_t i = 0; i < mk; ++i) {
          projected[static_cast<std::size_t>(r * mk + i)] = dot(s_matrix + i * pk, rotated.data() + r * pk, pk);
        }
      }
    }

    // 2. Online softmax per batch row over the codes, then the window. Accumulators per query row:
    //    acc (pv, value rotation domain), acc_window (d, original domain), running max and sum.
    std::vector<float> acc(static_cast<std::size_t>(n_rows * pv), 0.0f);
    std::vector<float> acc_window(static_cast<std::size_t>(n_rows * d), 0.0f);
    std::vector<float> row_sum(static_cast<std::size_t>(n_rows), 0.0f);
    const CodeSizes ks = kq.code_sizes(), vs = vq.code_sizes();
    const float* kcent = kq.codebook() ? kq.codebook()->centroids_f32().data() : nullptr;
    const float* vcent = vq.codebook() ? vq.codebook()->centroids_f32().data() : nullptr;
    const NormDtype ndt = params_.norm_dtype;
    const double kqjl = prod ? kSqrtHalfPi / static_cast<double>(mk) : 0.0;
    const double vqjl = prod ? kSqrtHalfPi / static_cast<double>(mv) : 0.0;

    // Tasks: (batch row, chunk of query rows); a chunk unpacks each tile of codes once for all its rows.
    const std::int64_t chunk_rows = std::max<std::int64_t>(group, 16);
    const std::int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    parallel_for(batch * chunks, std::max<std::int64_t>(1, seq * chunk_rows * (pk + pv)), [&](std::int64_t task_begin, std::int64_t task_end) {
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(std::max(pk, pv)));
      std::vector<float> tk(static_cast<std::size_t>(kTokenTile * pk)), tv(static_cast<std::size_t>(kTokenTile * pv));
      std::vector<float> tks(prod ? static_cast<std::size_t>(kTokenTile * mk) : 0);
      std::vector<float> tvs(prod ? static_cast<std::size_t>(kTokenTile * mv) : 0);
      float knorm[kTokenTile], vnorm[kTokenTile], kcoef[kTokenTile], vcoef[kTokenTile], score[kTokenTile];
      std::vector<float> row_max(static_cast<std::size_t>(rows));
      std::vector<float> acc_qjl(prod ? static_cast<std::size_t>(rows * mv) : 0);
      for (std::int64_t task = task_begin; task < task_end; ++task) {
        const std::int64_t b = task / chunks;
        const std::int64_t r0 = (task % chunks) * chunk_rows, r1 = std::min(rows, r0 + chunk_rows);
        const Stream& s = layer.streams[static_cast<std::size_t>(b * heads + h)];
        const std::int64_t nq = s.count, ns = s.sink_count;
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
        std::fill(acc_qjl.begin(), acc_qjl.end(), 0.0f);
        float* acc_b = acc.data() + b * rows * pv;
        float* accw_b = acc_window.data() + b * rows * d;
        float* sum_b = row_sum.data() + b * rows;
        // Visibility of token t for query row r.
        auto visible = [&](std::int64_t r, std::int64_t t) {
          const std::int64_t i = r % q_len;
          if (causal && t > seq - q_len + i) return false;
          if (mask && mask[(b * q_len + i) * seq + t] == 0) return false;
          return true;
        };
        // Online-softmax step over `count` tokens starting at position `first`, with scores filled by
        // score_fn(r, c) and value accumulation by add_fn(r, c, weight).
        auto step = [&](std::int64_t first, std::int64_t count, auto&& score_fn, auto&& add_fn) {
          for (std::int64_t r = r0; r < r1; ++r) {
            float tile_max = -std::numeric_limits<float>::infinity();
            for (std::int64_t c = 0; c < count; ++c) {
              if (visible(r, first + c)) {
                score[c] = score_fn(r, c);
                tile_max = std::max(tile_max, score[c]);
              } else {
                score[c] = -std::numeric_limits<float>::infinity();
              }
            }
            if (tile_max == -std::numeric_limits<float>::infinity()) continue;
            float& m = row_max[static_cast<std::size_t>(r)];
            if (tile_max > m) {
              if (m != -std::numeric_limits<float>::infinity()) {
                const float correction = std::exp(m - tile_max);
                sum_b[r] *= correction;
                for (std::int64_t j = 0; j < pv; ++j) acc_b[r * pv + j] *= correction;
                for (std::int64_t j = 0; j < d; ++j) accw_b[r * d + j] *= correction;
                if (prod) {
                  for (std::int64_t j = 0; j < mv; ++j) acc_qjl[static_cast<std::size_t>(r * mv + j)] *= correction;
                }
              }
              m = tile_max;
            }
            for (std::int64_t c = 0; c < count; ++c) {
              if (score[c] == -std::numeric_limits<float>::infinity()) continue;
              const float w = std::exp(score[c] - m);
              sum_b[r] += w;
              add_fn(r, c, w);
            }
          }
        };
        // The sink (exact, centered keys and values), in tiles of positions.
        for (std::int64_t first = 0; first < ns; first += kTokenTile) {
          const std::int64_t count = std::min(kTokenTile, ns - first);
          step(
              first, count,
              [&](std::int64_t r, std::int64_t c) {
                return softmax_scale * dot(query_row(b, r), s.sink_keys.data() + (first + c) * d, d);
              },
              [&](std::int64_t r, std::int64_t c, float w) {
                axpy(w, s.sink_values.data() + (first + c) * d, accw_b + r * d, d);
              });
        }
        // Codes, in tiles.
        for (std::int64_t first = 0; first < nq; first += kTokenTile) {
          const std::int64_t count = std::min(kTokenTile, nq - first);
          for (std::int64_t c = 0; c < count; ++c) {
            const std::int64_t t = first + c;
            knorm[c] = load_norm(ndt, s.keys.norms.data() + t * ks.norm_bytes);
            vnorm[c] = load_norm(ndt, s.values.norms.data() + t * vs.norm_bytes);
            if (kcent) {
              unpack_indices(kq.layout(), pk, s.keys.indices.data() + t * ks.index_bytes, idx.data());
              for (std::int64_t j = 0; j < pk; ++j) tk[static_cast<std::size_t>(c * pk + j)] = kcent[idx[static_cast<std::size_t>(j)]];
            }
            if (vcent) {
              unpack_indices(vq.layout(), pv, s.values.indices.data() + t * vs.index_bytes, idx.data());
              for (std::int64_t j = 0; j < pv; ++j) tv[static_cast<std::size_t>(c * pv + j)] = vcent[idx[static_cast<std::size_t>(j)]];
            }
            if (prod) {
              kcoef[c] = static_cast<float>(load_norm(ndt, s.keys.residual_norms.data() + t * ks.residual_norm_bytes) * kqjl);
              vcoef[c] = static_cast<float>(load_norm(ndt, s.values.residual_norms.data() + t * vs.residual_norm_bytes) * vqjl);
              unpack_signs(s.keys.signs.data() + t * ks.sign_bytes, mk, tks.data() + c * mk);
              unpack_signs(s.values.signs.data() + t * vs.sign_bytes, mv, tvs.data() + c * mv);
            }
          }
          step(
              ns + first, count,
              [&](std::int64_t r, std::int64_t c) {
                float sc = kcent ? dot(rotated.data() + (b * rows + r) * pk, tk.data() + c * pk, pk) : 0.0f;
                if (prod) sc += kcoef[c] * dot(projected.data() + (b * rows + r) * mk, tks.data() + c * mk, mk);
                return softmax_scale * knorm[c] * sc;
              },
              [&](std::int64_t r, std::int64_t c, float w) {
                const float coef = w * vnorm[c];
                if (vcent) axpy(coef, tv.data() + c * pv, acc_b + r * pv, pv);
                if (prod) axpy(coef * vcoef[c], tvs.data() + c * mv, acc_qjl.data() + r * mv, mv);
              });
        }
        // The window (exact, centered keys and values), in tiles of positions.
        for (std::int64_t first = 0; first < s.window_count; first += kTokenTile) {
          const std::int64_t count = std::min(kTokenTile, s.window_count - first);
          auto slot = [&](std::int64_t c) { return (s.window_start + first + c) % window; };
          step(
              ns + nq + first, count,
              [&](std::int64_t r, std::int64_t c) {
                return softmax_scale * dot(query_row(b, r), s.window_keys.data() + slot(c) * d, d);
              },
              [&](std::int64_t r, std::int64_t c, float w) {
                axpy(w, s.window_values.data() + slot(c) * d, accw_b + r * d, d);
              });
        }
        // prod: the QJL part of the values, S^T acc_qjl, into the rotated accumulator.
        if (prod) {
          const float* s_matrix = vq.qjl_matrix().data();
          for (std::int64_t r = r0; r < r1; ++r) {
            for (std::int64_t i = 0; i < mv; ++i) {
              const float a = acc_qjl[static_cast<std::size_t>(r * mv + i)];
              if (a != 0.0f) axpy(a, s_matrix + i * pv, acc_b + r * pv, pv);
            }
          }
        }
      }
    });

    // 3. One inverse rotation per query row, normalize, add the window part and the value mean.
    std::vector<float> unrotated(static_cast<std::size_t>(n_rows * d));
    vq.rotation().inverse(acc.data(), unrotated.data(), n_rows);
    for (std::int64_t b = 0; b < batch; ++b) {
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t row = b * rows + r;
        float* o = out + ((b * q_heads + h * group) * q_len + r) * d;
        const float l = row_sum[static_cast<std::size_t>(row)];
        if (l == 0.0f) {
          std::fill(o, o + d, 0.0f);
          continue;
        }
        const float inv = 1.0f / l;
        for (std::int64_t j = 0; j < d; ++j) {
          o[j] = (unrotated[static_cast<std::size_t>(row * d + j)] + acc_window[static_cast<std::size_t>(row * d + j)]) * inv +
                 (vmean ? vmean[j] : 0.0f);
        }
      }
    }
  }
}

void KVCache::dequantize(std::int64_t layer_index, float* keys_out, float* values_out) const {
  const char* what = "KVCache.dequantize";
  check_layer(layer_index, what);
  const std::int64_t seq = seq_length(layer_index);
  if (seq == 0) return;
  if (keys_out == nullptr || values_out == nullptr) throw ValueError(std::string(what) + ": expected non-null outputs");
  const Layer& layer = *layers_[static_cast<std::size_t>(layer_index)];
  const std::int64_t heads = params_.num_kv_heads, d = params_.head_dim, window = params_.residual_window;
  for (std::int64_t b = 0; b < batch_; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const Stream& s = layer.streams[static_cast<std::size_t>(b * heads + h)];
      float* ko = keys_out + (b * heads + h) * seq * d;
      float* vo = values_out + (b * heads + h) * seq * d;
      if (s.sink_count > 0) {
        std::memcpy(ko, s.sink_keys.data(), static_cast<std::size_t>(s.sink_count * d) * sizeof(float));
        std::memcpy(vo, s.sink_values.data(), static_cast<std::size_t>(s.sink_count * d) * sizeof(float));
        ko += s.sink_count * d;
        vo += s.sink_count * d;
      }
      const Quantizer& kq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2)];
      const Quantizer& vq = *quantizers_[static_cast<std::size_t>((layer_index * heads + h) * 2 + 1)];
      kq.decode(s.keys.view(), s.count, ko);
      vq.decode(s.values.view(), s.count, vo);
      const float* kscale = layer.key_scale.empty() ? nullptr : layer.key_scale.data() + h * d;
      for (std::int64_t t = 0; t < s.count && kscale; ++t) {
        for (std::int64_t j = 0; j < d; ++j) ko[t * d + j] *= kscale[j];
      }
      for (std::int64_t c = 0; c < s.window_count; ++c) {
        const std::int64_t slot = (s.window_start + c) % window;
        std::memcpy(ko + (s.count + c) * d, s.window_keys.data() + slot * d, static_cast<std::size_t>(d) * sizeof(float));
        std::memcpy(vo + (s.count + c) * d, s.window_values.data() + slot * d, static_cast<std::size_t>(d) * sizeof(float));
      }
      const float* kmean = params_.center_keys ? layer.key_mean.data() + h * d : nullptr;
      const float* vmean = params_.center_values ? layer.value_mean.data() + h * d : nullptr;
      ko = keys_out + (b * heads + h) * seq * d;
      vo = values_out + (b * heads + h) * seq * d;
      for (std::int64_t t = 0; t < seq; ++t) {
        for (std::int64_t j = 0; j < d; ++j) {
          if (kmean) ko[t * d + j] += kmean[j];
          if (vmean) vo[t * d + j] += vmean[j];
        }
      }
    }
  }
}

ConstCodesView KVCache::codes(std::int64_t layer, std::int64_t batch_row, std::int64_t kv_head, bool values) const {
  const char* what = "KVCache.codes";
  check_layer(layer, what);
  if (kv_head < 0 || kv_head >= params_.num_kv_heads) {
    throw ValueError(detail::expected_got(std::string(what) + ": kv_head",
                                          "in [0, " + std::to_string(params_.num_kv_heads) + ")", std::to_string(kv_head)));
  }
  const Layer& l = *layers_[static_cast<std::size_t>(layer)];
  if (batch_row < 0 || batch_row >= batch_) {
    throw ValueError(detail::expected_got(std::string(what) + ": batch row", "in [0, " + std::to_string(batch_) + ")",
                                          std::to_string(batch_row)));
  }
  const Stream& s = l.streams[static_cast<std::size_t>(batch_row * params_.num_kv_heads + kv_head)];
  return values ? s.values.view() : s.keys.view();
}

std::int64_t KVCache::seq_length(std::int64_t layer) const {
  check_layer(layer, "KVCache.seq_length");
  const Layer& l = *layers_[static_cast<std::size_t>(layer)];
  if (l.streams.empty()) return 0;
  return l.streams[0].sink_count + l.streams[0].count + l.streams[0].window_count;
}

std::int64_t KVCache::sink_length(std::int64_t layer) const {
  check_layer(layer, "KVCache.sink_length");
  const Layer& l = *layers_[static_cast<std::size_t>(layer)];
  return l.streams.empty() ? 0 : l.streams[0].sink_count;
}

std::int64_t KVCache::quantized_length(std::int64_t layer) const {
  check_layer(layer, "KVCache.quantized_length");
  const Layer& l = *layers_[static_cast<std::size_t>(layer)];
  return l.streams.empty() ? 0 : l.streams[0].count;
}

std::int64_t KVCache::window_length(std::int64_t layer) const {
  check_layer(layer, "KVCache.window_length");
  const Layer& l = *layers_[static_cast<std::size_t>(layer)];
  return l.streams.empty() ? 0 : l.streams[0].window_count;
}

std::int64_t KVCache::code_bytes_per_token(std::int64_t layer) const {
  check_layer(layer, "KVCache.code_bytes_per_token");
  std::int64_t total = 0;
  for (std::int64_t h = 0; h < params_.num_kv_heads; ++h) {
    total += quantizers_[static_cast<std::size_t>((layer * params_.num_kv_heads + h) * 2)]->code_sizes().total();
    total += quantizers_[static_cast<std::size_t>((layer * params_.num_kv_heads + h) * 2 + 1)]->code_sizes().total();
  }
  return total / params_.num_kv_heads;
}

std::int64_t KVCache::nbytes() const {
  const std::int64_t d = params_.head_dim, heads = params_.num_kv_heads;
  std::int64_t total = 0;
  for (std::int64_t li = 0; li < params_.num_layers; ++li) {
    const Layer& l = *layers_[static_cast<std::size_t>(li)];
    const std::int64_t per_token = code_bytes_per_token(li);
    for (const Stream& s : l.streams) total += s.count * per_token + (s.sink_count + s.window_count) * 2 * d * 4;
    total += static_cast<std::int64_t>(l.key_mean.size() + l.value_mean.size() + l.key_scale.size()) * 4;
  }
  (void)heads;
  return total;
}

void KVCache::reorder(const std::int64_t* indices, std::int64_t count) {
  const char* what = "KVCache.reorder";
  if (count < 1) throw ValueError(detail::expected_got(std::string(what) + ": number of indices", ">= 1", std::to_string(count)));
  if (indices == nullptr) throw ValueError(std::string(what) + ": expected non-null indices");
  if (batch_ == 0) return;  // nothing stored yet
  for (std::int64_t i = 0; i < count; ++i) {
    if (indices[i] < 0 || indices[i] >= batch_) {
      throw ValueError(detail::expected_got(std::string(what) + ": index " + std::to_string(i),
                                            "in [0, " + std::to_string(batch_) + ")", std::to_string(indices[i])));
    }
  }
  const std::int64_t heads = params_.num_kv_heads;
  for (auto& l : layers_) {
    std::vector<Stream> streams(static_cast<std::size_t>(count * heads));
    for (std::int64_t i = 0; i < count; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        streams[static_cast<std::size_t>(i * heads + h)] = l->streams[static_cast<std::size_t>(indices[i] * heads + h)];
      }
    }
    l->streams.swap(streams);
  }
  batch_ = count;
}

void KVCache::crop(std::int64_t length) {
  if (length < 0) throw ValueError(detail::expected_got("KVCache.crop: length", ">= 0", std::to_string(length)));
  const std::int64_t heads = params_.num_kv_heads;
  for (std::int64_t li = 0; li < params_.num_layers; ++li) {
    Layer& l = *layers_[static_cast<std::size_t>(li)];
    for (std::size_t i = 0; i < l.streams.size(); ++i) {
      Stream& s = l.streams[i];
      if (length >= s.sink_count + s.count + s.window_count) continue;
      const std::int64_t h = static_cast<std::int64_t>(i) % heads;
      const CodeSizes ks = quantizers_[static_cast<std::size_t>((li * heads + h) * 2)]->code_sizes();
      const CodeSizes vs = quantizers_[static_cast<std::size_t>((li * heads + h) * 2 + 1)]->code_sizes();
      const std::int64_t after_sink = length - std::min(length, s.sink_count);
      s.sink_count = std::min(length, s.sink_count);
      if (after_sink >= s.count) {
        s.window_count = after_sink - s.count;
      } else {
        s.keys.truncate(ks, after_sink);
        s.values.truncate(vs, after_sink);
        s.count = after_sink;
        s.window_count = 0;
      }
    }
  }
}

void KVCache::reset() {
  batch_ = 0;
  for (auto& l : layers_) l = std::make_unique<Layer>();
}

namespace {

// Head `kv_head`'s head_dim floats of a per-(layer, head) statistic (empty when the statistic is not in use).
std::vector<float> head_slice(const std::vector<float>& all, std::int64_t kv_head, std::int64_t head_dim) {
  if (all.empty()) return {};
  const auto first = all.begin() + kv_head * head_dim;
  return std::vector<float>(first, first + head_dim);
}

}  // namespace

std::vector<float> KVCache::key_mean(std::int64_t layer, std::int64_t kv_head) const {
  key_quantizer(layer, kv_head);  // validates
  return head_slice(layers_[static_cast<std::size_t>(layer)]->key_mean, kv_head, params_.head_dim);
}

std::vector<float> KVCache::value_mean(std::int64_t layer, std::int64_t kv_head) const {
  key_quantizer(layer, kv_head);
  return head_slice(layers_[static_cast<std::size_t>(layer)]->value_mean, kv_head, params_.head_dim);
}

std::vector<float> KVCache::key_scale(std::int64_t layer, std::int64_t kv_head) const {
  key_quantizer(layer, kv_head);
  return head_slice(layers_[static_cast<std::size_t>(layer)]->key_scale, kv_head, params_.head_dim);
}

}  // namespace rotorquant
