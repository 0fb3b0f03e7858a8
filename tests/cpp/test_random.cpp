// Tests of the project's counter-based generator (cpp/include/rotorquant/random.hpp,
// specified in docs/random.md): Random123 known-answer vectors for Philox4x32-10,
// the uniform / Gaussian / sign derivations, stream separation, and golden values
// that pin the format.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <set>

#include "rotorquant/random.hpp"
#include "test_harness.hpp"

using rotorquant::make_stream;
using rotorquant::RandomPurpose;
using rotorquant::RandomStream;

namespace {

bool block_equals(const std::uint32_t counter[4], const std::uint32_t key[2],
                  const std::uint32_t expected[4]) {
  std::uint32_t out[4];
  rotorquant::philox::block(counter, key, out);
  bool same = true;
  for (int i = 0; i < 4; ++i) same = same && out[i] == expected[i];
  if (!same) {
    std::fprintf(stderr, "philox4x32_10 got %08x %08x %08x %08x, expected %08x %08x %08x %08x\n", out[0],
                 out[1], out[2], out[3], expected[0], expected[1], expected[2], expected[3]);
  }
  return same;
}

}  // namespace

// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
TEST(philox_known_answer_zero) {
  const std::uint32_t counter[4] = {0, 0, 0, 0};
  const std::uint32_t key[2] = {0, 0};
  const std::uint32_t expected[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  CHECK(block_equals(counter, key, expected));
}

TEST(philox_known_answer_all_ones) {
  const std::uint32_t counter[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
  const std::uint32_t key[2] = {0xffffffffu, 0xffffffffu};
  const std::uint32_t expected[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
  CHECK(block_equals(counter, key, expected));
}

TEST(philox_known_answer_pi_digits) {
  const std::uint32_t counter[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u};
  const std::uint32_t key[2] = {0xa4093822u, 0x299f31d0u};
  const std::uint32_t expected[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
  CHECK(block_equals(counter, key, expected));
}

// The stream maps (seed, stream, index) onto the Philox counter and key as documented:
// counter = (index lo, index hi, stream lo, stream hi), key = (seed lo, seed hi).
TEST(stream_counter_and_key_layout) {
  const std::uint64_t seed = 0x299f31d0a4093822ull;
  const std::uint64_t stream = 0x0370734413198a2eull;
  const std::uint64_t index = 0x85a308d3243f6a88ull;
  const RandomStream s{seed, stream};
  std::uint32_t out[4];
  s.block_at(index, out);
  CHECK(out[0] == 0xd16cfe09u);
  CHECK(out[1] == 0x94fdccebu);
  CHECK(out[2] == 0x5001e420u);
  CHECK(out[3] == 0x24126ea1u);
  CHECK(s.bits_at(index) == 0xd16cfe09u);
}

TEST(stream_id_is_purpose_high_sub_id_low) {
  CHECK(rotorquant::stream_id(RandomPurpose::kRotor3, 7) == ((3ull << 32) | 7ull));
  CHECK(rotorquant::stream_id(RandomPurpose::kQJL, 0xffffffffu) == ((6ull << 32) | 0xffffffffull));
  const RandomStream s = make_stream(42, RandomPurpose::kHadamardSigns, 5);
  CHECK(s.seed == 42);
  CHECK(s.stream == ((2ull << 32) | 5ull));
}

// Frozen purpose values (they are part of every stream id).
TEST(purpose_values_are_frozen) {
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kDenseRotation) == 1);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kHadamardSigns) == 2);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kRotor3) == 3);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kPlanar) == 4);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kQuaternion) == 5);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kQJL) == 6);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kRotorNetworkSigns) == 7);
  CHECK(static_cast<std::uint32_t>(RandomPurpose::kTest) == 0xFFFF);
}

TEST(to_unit_is_strictly_inside_open_interval) {
  const double smallest = RandomStream::to_unit(0u, 0u);
  const double largest = RandomStream::to_unit(0xffffffffu, 0xffffffffu);
  CHECK(smallest > 0.0);
  CHECK(smallest == std::ldexp(1.0, -54));
  CHECK(largest < 1.0);
  CHECK(largest == 1.0 - std::ldexp(1.0, -53));
  // Low 11 bits of the 64 are dropped: k = bits >> 11.
  CHECK(RandomStream::to_unit(0x7ffu, 0u) == smallest);
  CHECK(RandomStream::to_unit(0x800u, 0u) == 1.5 * std::ldexp(1.0, -53));
  // Exactly 1/2 + 2^-54 for k = 2^52 (hi = 0x80000000, lo = 0).
  CHECK(RandomStream::to_unit(0u, 0x80000000u) == 0.5);  // 2^52 + 0.5 ties to even 2^52
  CHECK(RandomStream::to_unit(0u, 0x40000000u) == 0.25 + std::ldexp(1.0, -54));
}

TEST(uniform_strictly_inside_and_mean_variance) {
  const RandomStream s = make_stream(1, RandomPurpose::kTest, 1);
  const int n = 1000000;
  double sum = 0.0, sum_sq = 0.0, lo = 1.0, hi = 0.0;
  for (int i = 0; i < n; ++i) {
    const double u = s.uniform_at(static_cast<std::uint64_t>(i));
    CHECK(u > 0.0 && u < 1.0);
    sum += u;
    sum_sq += u * u;
    lo = std::fmin(lo, u);
    hi = std::fmax(hi, u);
  }
  const double mean = sum / n;
  const double var = sum_sq / n - mean * mean;
  // mean: sd 1/sqrt(12 n); variance of u^2-based estimate: sd sqrt(1/180/n).
  CHECK_NEAR(mean, 0.5, 5.0 * std::sqrt(1.0 / 12.0 / n));
  CHECK_NEAR(var, 1.0 / 12.0, 5.0 * std::sqrt(1.0 / 180.0 / n));
  CHECK(lo < 1e-5);
  CHECK(hi > 1.0 - 1e-5);
}

TEST(gaussian_mean_variance_and_kurtosis) {
  const RandomStream s = make_stream(0, RandomPurpose::kTest, 2);
  const int n = 1000000;
  double sum = 0.0, sum_sq = 0.0, sum_4 = 0.0;
  int beyond_two_sigma = 0;
  for (int i = 0; i < n; ++i) {
    const double z = s.gaussian_at(static_cast<std::uint64_t>(i));
    CHECK(std::isfinite(z));
    sum += z;
    sum_sq += z * z;
    sum_4 += z * z * z * z;
    if (std::fabs(z) > 2.0) ++beyond_two_sigma;
  }
  const double mean = sum / n;
  const double second = sum_sq / n;
  const double fourth = sum_4 / n;
  // Standard errors: mean 1/sqrt(n); E z^2: sqrt(2/n); E z^4: sqrt((105 - 9)/n).
  CHECK_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  CHECK_NEAR(second - mean * mean, 1.0, 5.0 * std::sqrt(2.0 / n));
  CHECK_NEAR(fourth, 3.0, 5.0 * std::sqrt(96.0 / n));
  // P(|z| > 2) = 0.0455003; binomial sd.
  const double p = 0.04550026389635842;
  CHECK_NEAR(static_cast<double>(beyond_two_sigma) / n, p, 5.0 * std::sqrt(p * (1 - p) / n));
}

TEST(sign_balance) {
  const RandomStream s = make_stream(3, RandomPurpose::kHadamardSigns, 0);
  const int n = 1000000;
  long long sum = 0;
  int runs_equal = 0;
  float previous = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float v = s.sign_at(static_cast<std::uint64_t>(i));
    CHECK(v == 1.0f || v == -1.0f);
    sum += static_cast<long long>(v);
    if (i > 0 && v == previous) ++runs_equal;
    previous = v;
  }
  CHECK(std::fabs(static_cast<double>(sum)) < 5.0 * std::sqrt(static_cast<double>(n)));
  // Consecutive signs are independent: P(equal) = 1/2.
  CHECK_NEAR(static_cast<double>(runs_equal) / (n - 1), 0.5, 5.0 * 0.5 / std::sqrt(n - 1.0));
  // sign_at is bit 0 of word 0.
  for (std::uint64_t i = 0; i < 64; ++i) CHECK(s.sign_at(i) == ((s.bits_at(i) & 1u) ? -1.0f : 1.0f));
}

TEST(distinct_streams_seeds_and_indices_differ) {
  const std::uint64_t seed = 12345;
  std::set<std::uint32_t> first_words;
  const RandomPurpose purposes[] = {RandomPurpose::kDenseRotation, RandomPurpose::kHadamardSigns,
                                    RandomPurpose::kRotor3,        RandomPurpose::kPlanar,
                                    RandomPurpose::kQuaternion,    RandomPurpose::kQJL,
                                    RandomPurpose::kRotorNetworkSigns};
  int streams = 0;
  for (RandomPurpose purpose : purposes) {
    for (std::uint32_t sub = 0; sub < 4; ++sub) {
      first_words.insert(make_stream(seed, purpose, sub).bits_at(0));
      ++streams;
    }
  }
  CHECK(static_cast<int>(first_words.size()) == streams);
  // Same purpose, different seed / sub id / index: different numbers, and the
  // streams are not shifted copies of each other.
  const RandomStream a = make_stream(seed, RandomPurpose::kRotor3, 0);
  const RandomStream b = make_stream(seed, RandomPurpose::kRotor3, 1);
  const RandomStream c = make_stream(seed + 1, RandomPurpose::kRotor3, 0);
  int equal_ab = 0, equal_ac = 0, equal_shift = 0;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    equal_ab += a.bits_at(i) == b.bits_at(i);
    equal_ac += a.bits_at(i) == c.bits_at(i);
    equal_shift += a.bits_at(i + 1) == b.bits_at(i);
  }
  CHECK(equal_ab == 0);
  CHECK(equal_ac == 0);
  CHECK(equal_shift == 0);
  // Random access is a pure function: asking twice, in any order, gives the same value.
  CHECK(a.gaussian_at(999) == a.gaussian_at(999));
  const RandomStream a_again{seed, rotorquant::stream_id(RandomPurpose::kRotor3, 0)};
  CHECK(a.uniform_at(3) == a_again.uniform_at(3));
}

TEST(gaussian_is_box_muller_of_block_words) {
  const RandomStream s = make_stream(9, RandomPurpose::kQJL, 2);
  for (std::uint64_t i = 0; i < 16; ++i) {
    std::uint32_t w[4];
    s.block_at(i, w);
    const double u1 = RandomStream::to_unit(w[0], w[1]);
    const double u2 = RandomStream::to_unit(w[2], w[3]);
    const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925286766559 * u2);
    CHECK(s.gaussian_at(i) == z);
    CHECK(s.uniform_at(i) == u1);
  }
}

// Golden values for seed 0. These pin the format: CHANGING THEM BREAKS REPRODUCIBILITY of
// every rotation, sign vector, rotor and QJL matrix built from a seed (and every stored
// artefact that relies on it). Integer results are exact everywhere; Gaussian values go
// through libm log/cos/sqrt, hence the 1e-15 relative tolerance (about 4 ulp).
TEST(golden_values_seed_zero) {
  const RandomStream test0 = make_stream(0, RandomPurpose::kTest, 0);
  CHECK(test0.bits_at(0) == 0xe6abd8c7u);
  CHECK(test0.bits_at(1) == 0x2ca2e080u);
  CHECK(test0.bits_at(2) == 0x57bc7210u);
  CHECK(test0.bits_at(3) == 0x981bfbf3u);
  CHECK(test0.sign_at(0) == -1.0f);
  CHECK(test0.sign_at(1) == 1.0f);
  CHECK(test0.sign_at(2) == 1.0f);
  CHECK(test0.sign_at(3) == -1.0f);
  CHECK(test0.uniform_at(0) == 0.50505346243760085);
  CHECK(test0.uniform_at(3) == 0.65459085292978614);
  const double tol = 1e-15;
  CHECK_NEAR(test0.gaussian_at(0), 1.1050106709247813, tol);
  CHECK_NEAR(test0.gaussian_at(1), -0.64114024877259279, tol);
  CHECK_NEAR(test0.gaussian_at(2), 0.44171305821772539, tol);
  CHECK_NEAR(test0.gaussian_at(3), -0.027473196128520925, tol);

  const RandomStream dense0 = make_stream(0, RandomPurpose::kDenseRotation, 0);
  CHECK_NEAR(dense0.gaussian_at(0), -1.5051760519481707, 2 * tol);
  CHECK_NEAR(dense0.gaussian_at(1), -1.2095546212704253, 2 * tol);
  CHECK_NEAR(dense0.gaussian_at(2), -0.36841535455864383, tol);

  const RandomStream signs0 = make_stream(0, RandomPurpose::kHadamardSigns, 0);
  const float expected_signs[8] = {1, 1, -1, 1, 1, 1, 1, 1};
  for (int i = 0; i < 8; ++i) CHECK(signs0.sign_at(static_cast<std::uint64_t>(i)) == expected_signs[i]);

  const RandomStream planar = make_stream(0x0123456789abcdefull, RandomPurpose::kPlanar, 7);
  CHECK(planar.uniform_at(0) == 0.49700843750325002);
  CHECK(planar.uniform_at(1) == 0.80460997137750989);
  CHECK(planar.uniform_at(2) == 0.94944420809820174);
}
