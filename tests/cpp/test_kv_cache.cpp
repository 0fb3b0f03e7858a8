// Tests of the compressed KV cache (kv_cache.hpp): attend on the codes against a float64 attention over the
// cache's own decoded K/V (GQA, causal chunks, window, sink, centering, scaling, prod mode), thread-count
// independence, window/sink exactness, reorder / crop / reset, nbytes, and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "rotorquant/error.hpp"
#include "rotorquant/kv_cache.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/random.hpp"
#include "test_harness.hpp"

using rotorquant::KVCache;
using rotorquant::KVCacheParams;
using rotorquant::QuantizerMode;
using rotorquant::RandomPurpose;

namespace {

std::vector<float> gaussian(std::size_t n, std::uint32_t sub, float shift = 0.0f) {
  const auto stream = rotorquant::make_stream(42, RandomPurpose::kTest, sub);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(stream.gaussian_at(i)) + shift;
  return out;
}

// Float64 softmax attention; q (B, Hq, L, d), k/v (B, H, T, d); query i at position T - L + i.
std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                              std::int64_t batch, std::int64_t q_heads, std::int64_t heads, std::int64_t q_len,
                              std::int64_t seq, std::int64_t d, bool causal) {
  std::vector<double> out(q.size(), 0.0);
  const std::int64_t group = q_heads / heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t hq = 0; hq < q_heads; ++hq) {
      const std::int64_t h = hq / group;
      for (std::int64_t i = 0; i < q_len; ++i) {
        const float* qi = q.data() + ((b * q_heads + hq) * q_len + i) * d;
        const std::int64_t last = causal ? seq - q_len + i : seq - 1;
        std::vector<double> s(static_cast<std::size_t>(seq), -std::numeric_limits<double>::infinity());
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t t = 0; t <= last; ++t) {
          const float* kt = k.data() + ((b * heads + h) * seq + t) * d;
          double dotp = 0.0;
          for (std::int64_t j = 0; j < d; ++j) dotp += static_cast<double>(qi[j]) * kt[j];
          s[static_cast<std::size_t>(t)] = dotp * scale;
          m = std::max(m, s[static_cast<std::size_t>(t)]);
        }
        double total = 0.0;
        double* o = out.data() + ((b * q_heads + hq) * q_len + i) * d;
        for (std::int64_t t = 0; t <= last; ++t) {
          const double w = std::exp(s[static_cast<std::size_t>(t)] - m);
          total += w;
          const float* vt = v.data() + ((b * heads + h) * seq + t) * d;
          for (std::int64_t j = 0; j < d; ++j) o[j] += w * vt[j];
        }
        for (std::int64_t j = 0; j < d; ++j) o[j] /= total;
      }
    }
  }
  return out;
}

double max_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

KVCacheParams params(std::int64_t heads, int kbits, int vbits) {
  KVCacheParams p;
  p.num_layers = 2;
  p.num_kv_heads = heads;
  p.head_dim = 32;
  p.key_bits = kbits;
  p.value_bits = vbits;
  p.residual_window = 5;
  p.sink_tokens = 2;
  return p;
}

// Appends chunks to layer 1, then checks attend against the oracle over dequantize() for q_len 1 and 4.
void check_against_oracle(const KVCacheParams& p, std::int64_t q_heads) {
  KVCache cache(p);
  const std::int64_t batch = 2, heads = p.num_kv_heads, d = p.head_dim;
  std::uint32_t sub = 1;
  for (std::int64_t chunk : {9, 1, 6}) {
    const auto k = gaussian(static_cast<std::size_t>(batch * heads * chunk * d), sub++, 0.7f);
    const auto v = gaussian(static_cast<std::size_t>(batch * heads * chunk * d), sub++, -0.3f);
    cache.append(1, k.data(), v.data(), batch, chunk);
  }
  const std::int64_t seq = cache.seq_length(1);
  CHECK(seq == 16);
  std::vector<float> keys(static_cast<std::size_t>(batch * heads * seq * d)), values(keys.size());
  cache.dequantize(1, keys.data(), values.data());
  for (std::int64_t q_len : {1, 4}) {
    const auto q = gaussian(static_cast<std::size_t>(batch * q_heads * q_len * d), sub++);
    std::vector<float> out(q.size());
    for (bool causal : {true, false}) {
      cache.attend(1, q.data(), batch, q_heads, q_len, 0.0f, causal, nullptr, out.data());
      CHECK(max_diff(out, reference(q, keys, values, batch, q_heads, heads, q_len, seq, d, causal)) < 1e-5);
    }
  }
}

}  // namespace

TEST(attend_matches_float64_oracle_on_decoded_kv) {
  check_against_oracle(params(2, 4, 3), 6);
  check_against_oracle(params(1, 3, 2), 4);  // MQA
  KVCacheParams p = params(3, 2, 4);
  p.center_values = true;
  p.key_channel_scaling = 1.0f;
  check_against_oracle(p, 3);
  p = params(2, 3, 3);
  p.mode = QuantizerMode::kProd;
  check_against_oracle(p, 4);
  p = params(2, 4, 4);
  p.residual_window = 0;
  p.sink_tokens = 0;
  p.rotation = rotorquant::RotationKind::kRotor3;
  check_against_oracle(p, 2);
}

TEST(attend_is_independent_of_thread_count) {
  KVCacheParams p = params(2, 4, 3);
  KVCache cache(p);
  const auto k = gaussian(2 * 2 * 40 * 32, 90), v = gaussian(2 * 2 * 40 * 32, 91), q = gaussian(2 * 4 * 40 * 32, 92);
  cache.append(0, k.data(), v.data(), 2, 40);
  std::vector<float> one(q.size()), many(q.size());
  rotorquant::set_num_threads(1);
  cache.attend(0, q.data(), 2, 4, 40, 0.0f, true, nullptr, one.data());
  rotorquant::set_num_threads(4);
  cache.attend(0, q.data(), 2, 4, 40, 0.0f, true, nullptr, many.data());
  rotorquant::set_num_threads(0);
  CHECK(one == many);
}

TEST(window_and_sink_hold_exact_tokens) {
  KVCacheParams p = params(1, 2, 2);
  p.center_keys = false;
  KVCache cache(p);
  const auto k = gaussian(12 * 32, 5), v = gaussian(12 * 32, 6);
  cache.append(0, k.data(), v.data(), 1, 12);
  CHECK(cache.sink_length(0) == 2 && cache.quantized_length(0) == 5 && cache.window_length(0) == 5);
  std::vector<float> keys(12 * 32), values(12 * 32);
  cache.dequantize(0, keys.data(), values.data());
  for (std::int64_t t : {0, 1, 7, 11}) {
    for (std::int64_t j = 0; j < 32; ++j) CHECK(keys[t * 32 + j] == k[t * 32 + j] && values[t * 32 + j] == v[t * 32 + j]);
  }
  CHECK(std::abs(keys[3 * 32] - k[3 * 32]) > 0.0f);  // a quantized token
}

TEST(reorder_crop_reset_and_nbytes) {
  KVCacheParams p = params(2, 4, 3);
  KVCache cache(p);
  const auto k = gaussian(3 * 2 * 10 * 32, 7), v = gaussian(3 * 2 * 10 * 32, 8);
  cache.append(0, k.data(), v.data(), 3, 10);
  // per token and head outside the window: 4-bit keys 16 B + 2, 3-bit values 12 B + 2
  CHECK(cache.code_bytes_per_token(0) == 32);
  const std::int64_t expected = 3 * 2 * (3 * 32 + 7 * 2 * 32 * 4) + 2 * 32 * 4;  // codes, sink+window, key mean
  CHECK(cache.nbytes() == expected);
  std::vector<float> before(3 * 2 * 10 * 32), before_v(before.size());
  cache.dequantize(0, before.data(), before_v.data());
  const std::int64_t order[4] = {2, 2, 0, 1};
  cache.reorder(order, 4);
  CHECK(cache.batch_size() == 4);
  std::vector<float> after(4 * 2 * 10 * 32), after_v(after.size());
  cache.dequantize(0, after.data(), after_v.data());
  CHECK(std::equal(after.begin(), after.begin() + 640, before.begin() + 2 * 640));
  CHECK(std::equal(after.begin() + 3 * 640, after.end(), before.begin() + 640));
  cache.crop(4);
  CHECK(cache.seq_length(0) == 4 && cache.quantized_length(0) == 2 && cache.window_length(0) == 0);
  cache.reset();
  CHECK(cache.nbytes() == 0 && cache.batch_size() == 0 && cache.seq_length(0) == 0);
}

TEST(bad_input_throws) {
  KVCacheParams p = params(2, 4, 3);
  CHECK_THROWS([&] { KVCacheParams bad = p; bad.key_bits = 0; KVCache c(bad); }(), rotorquant::ValueError);
  CHECK_THROWS([&] { KVCacheParams bad = p; bad.protected_layers = {2}; KVCache c(bad); }(), rotorquant::ValueError);
  CHECK_THROWS([&] { KVCacheParams bad = p; bad.residual_window = -1; KVCache c(bad); }(), rotorquant::ValueError);
  KVCache cache(p);
  const auto k = gaussian(2 * 4 * 32, 9);
  CHECK_THROWS(cache.append(2, k.data(), k.data(), 1, 4), rotorquant::ValueError);
  cache.append(0, k.data(), k.data(), 1, 4);
  CHECK_THROWS(cache.append(0, k.data(), k.data(), 2, 2), rotorquant::ValueError);  // batch changed
  std::vector<float> out(3 * 32);
  CHECK_THROWS(cache.attend(0, k.data(), 1, 3, 1, 0.0f, true, nullptr, out.data()), rotorquant::ValueError);
  auto bad = k;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS(cache.append(0, bad.data(), k.data(), 1, 4), rotorquant::ValueError);
  CHECK(cache.seq_length(0) == 4);
  // A norm beyond float16 makes encode throw: the append is refused as a whole, nothing changes.
  KVCacheParams strict = p;
  strict.residual_window = 0;
  strict.sink_tokens = 0;
  strict.center_keys = false;
  KVCache fresh(strict);
  auto huge = k;
  for (std::int64_t j = 0; j < 32; ++j) huge[32 + j] = 1e5f;  // token 1 of head 0
  CHECK_THROWS(fresh.append(0, huge.data(), k.data(), 1, 4), rotorquant::ValueError);
  CHECK(fresh.batch_size() == 0 && fresh.seq_length(0) == 0 && fresh.nbytes() == 0);
  fresh.append(0, k.data(), k.data(), 1, 4);
  const std::int64_t bytes = fresh.nbytes();
  CHECK_THROWS(fresh.append(0, huge.data(), k.data(), 1, 4), rotorquant::ValueError);
  CHECK(fresh.seq_length(0) == 4 && fresh.nbytes() == bytes);
  const std::int64_t order[1] = {3};
  CHECK_THROWS(cache.reorder(order, 1), rotorquant::ValueError);
  CHECK_THROWS(cache.crop(-1), rotorquant::ValueError);
}


