// The project's counter-based random number generator (Philox4x32-10) and the
// addressing scheme that makes every random object of rotorquant reproducible:
// the same (seed, stream, index) gives the same bits on every platform, in every
// run, on the CPU and on the GPU. Specified in docs/random.md.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ROTORQUANT_HD __host__ __device__ __forceinline__
#else
#define ROTORQUANT_HD inline
#endif

namespace rotorquant {

// What a stream of random numbers is used for. The value is part of the stream
// id, so two objects built from one seed never share random numbers.
// Values are frozen: changing one changes every object built from it.
enum class RandomPurpose : std::uint32_t {
  kDenseRotation = 1,
  kHadamardSigns = 2,
  kRotor3 = 3,
  kPlanar = 4,
  kQuaternion = 5,
  kQJL = 6,
  kRotorNetworkSigns = 7,
  kTest = 0xFFFF,
};

namespace philox {

// One Philox4x32-10 block: 128 random bits from a 128-bit counter and 64-bit key.
ROTORQUANT_HD void block(const std::uint32_t counter[4], const std::uint32_t key[2],
                         std::uint32_t out[4]) {
  const std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  const std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  std::uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  std::uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * c0;
    const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * c2;
    const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

}  // namespace philox

// A stream id: the purpose in the high 32 bits, a sub-id (layer, head, ...) in the low 32.
ROTORQUANT_HD std::uint64_t stream_id(RandomPurpose purpose, std::uint32_t sub_id = 0) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(purpose)) << 32) | sub_id;
}

// Random-access view of one stream: element i is a pure function of (seed, stream, i).
struct RandomStream {
  std::uint64_t seed;
  std::uint64_t stream;

  ROTORQUANT_HD void block_at(std::uint64_t index, std::uint32_t out[4]) const {
    const std::uint32_t counter[4] = {static_cast<std::uint32_t>(index),
                                      static_cast<std::uint32_t>(index >> 32),
                                      static_cast<std::uint32_t>(stream),
                                      static_cast<std::uint32_t>(stream >> 32)};
    const std::uint32_t key[2] = {static_cast<std::uint32_t>(seed),
                                  static_cast<std::uint32_t>(seed >> 32)};
    philox::block(counter, key, out);
  }

  // 32 random bits: word 0 of block i.
  ROTORQUANT_HD std::uint32_t bits_at(std::uint64_t index) const {
    std::uint32_t w[4];
    block_at(index, w);
    return w[0];
  }

  // +1 or -1 with equal probability: bit 0 of word 0 of block i (1 -> -1).
  ROTORQUANT_HD float sign_at(std::uint64_t index) const {
    return (bits_at(index) & 1u) ? -1.0f : 1.0f;
  }

  // Uniform on the open interval (0, 1) with 53 random bits: words 0 and 1 of block i.
  ROTORQUANT_HD double uniform_at(std::uint64_t index) const {
    std::uint32_t w[4];
    block_at(index, w);
    return to_unit(w[0], w[1]);
  }

  // Standard normal by Box-Muller on the two 53-bit uniforms of block i:
  // z = sqrt(-2 ln u1) * cos(2 pi u2), u1 from words 0-1, u2 from words 2-3.
  ROTORQUANT_HD double gaussian_at(std::uint64_t index) const {
    std::uint32_t w[4];
    block_at(index, w);
    const double u1 = to_unit(w[0], w[1]);
    const double u2 = to_unit(w[2], w[3]);
    const double two_pi = 6.283185307179586476925286766559;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
  }

  // k = (lo | hi << 32) >> 11 gives 53 bits; u = (k + 0.5) * 2^-53 in IEEE double
  // (round to nearest even). For k >= 2^52 the sum k + 0.5 is a tie that rounds to
  // even, and k = 2^53 - 1 would give exactly 1.0: that single value is mapped to
  // the largest double below 1 (1 - 2^-53), so u lies strictly inside (0, 1).
  ROTORQUANT_HD static double to_unit(std::uint32_t lo, std::uint32_t hi) {
    const std::uint64_t bits = (static_cast<std::uint64_t>(hi) << 32) | lo;
    const double u = (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return u < 1.0 ? u : 0.99999999999999988898;  // 1 - 2^-53
  }
};

ROTORQUANT_HD RandomStream make_stream(std::uint64_t seed, RandomPurpose purpose,
                                       std::uint32_t sub_id = 0) {
  return RandomStream{seed, stream_id(purpose, sub_id)};
}

}  // namespace rotorquant
