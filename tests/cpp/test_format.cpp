// Tests of the packed code format (docs/format.md): plane layouts, index and sign packing,
// float16 conversion, CRC-32 and the serialized quantizer / codes blobs, including every
// corruption and truncation of a small blob.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rotorquant/error.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/quantizer.hpp"
#include "rotorquant/random.hpp"
#include "test_harness.hpp"

using namespace rotorquant;

namespace {

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

float bits_to_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
std::uint32_t float_to_bits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

bool throws_value_error_containing(const std::function<void()>& body, const std::string& needle) {
  try {
    body();
  } catch (const ValueError& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

// Little-endian field access in a blob, for building and patching headers by hand.
void put_le(std::vector<std::uint8_t>& blob, std::size_t offset, std::uint64_t value, int count) {
  for (int i = 0; i < count; ++i) blob[offset + i] = static_cast<std::uint8_t>(value >> (8 * i));
}
std::uint64_t get_le(const std::vector<std::uint8_t>& blob, std::size_t offset, int count) {
  std::uint64_t v = 0;
  for (int i = 0; i < count; ++i) v |= static_cast<std::uint64_t>(blob[offset + i]) << (8 * i);
  return v;
}
// Rewrites the trailing CRC so that a deliberately inconsistent header reaches the semantic checks.
void refresh_crc(std::vector<std::uint8_t>& blob) {
  put_le(blob, blob.size() - 4, crc32(blob.data(), blob.size() - 4), 4);
}

// Offsets of the header fields (docs/format.md section 6).
constexpr std::size_t kOffVersion = 8, kOffDim = 12, kOffBits = 20, kOffRotation = 21, kOffMode = 22,
                      kOffCodebook = 23, kOffNormDtype = 24, kOffNormCorrection = 25, kOffReserved = 26,
                      kOffSeed = 28, kOffQjlDim = 36, kOffN = 44, kOffSections = 52, kCodesHeader = 84,
                      kQuantizerBlob = 48;

QuantizerParams mse_params() {
  QuantizerParams p;
  p.dim = 10;
  p.bits = 3;
  p.rotation = RotationKind::kHadamard;  // padded_dim 16
  p.mode = QuantizerMode::kMSE;
  p.seed = 42;
  p.codebook = CodebookDensity::kSphere;
  p.norm_dtype = NormDtype::kFloat16;
  p.norm_correction = true;
  p.qjl_dim = 0;
  return p;
}

QuantizerParams prod_params() {
  QuantizerParams p;
  p.dim = 7;
  p.bits = 3;
  p.rotation = RotationKind::kRotor3;  // padded_dim 9
  p.mode = QuantizerMode::kProd;
  p.seed = 0x0123456789ABCDEFull;
  p.codebook = CodebookDensity::kGaussian;
  p.norm_dtype = NormDtype::kFloat32;
  p.norm_correction = false;
  p.qjl_dim = 13;
  return p;
}

struct HandCodes {
  std::vector<std::uint8_t> indices, norms, signs, residual_norms;
  ConstCodesView view() const {
    ConstCodesView v;
    v.indices = indices.empty() ? nullptr : indices.data();
    v.norms = norms.empty() ? nullptr : norms.data();
    v.qjl_signs = signs.empty() ? nullptr : signs.data();
    v.residual_norms = residual_norms.empty() ? nullptr : residual_norms.data();
    return v;
  }
};

HandCodes make_codes(std::int64_t n, std::int64_t index_bytes, std::int64_t norm_bytes, std::int64_t sign_bytes_per,
                     std::int64_t residual_bytes, int salt) {
  HandCodes c;
  auto fill = [&](std::vector<std::uint8_t>& v, std::int64_t count, int tag) {
    v.resize(static_cast<std::size_t>(count));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint8_t>(i * 37 + tag * 11 + salt);
  };
  fill(c.indices, n * index_bytes, 1);
  fill(c.norms, n * norm_bytes, 2);
  fill(c.signs, n * sign_bytes_per, 3);
  fill(c.residual_norms, n * residual_bytes, 4);
  return c;
}

// A quantizer blob written by hand from the spec (not by the library), to check the reader against it.
std::vector<std::uint8_t> hand_quantizer_blob(const QuantizerParams& p) {
  std::vector<std::uint8_t> blob(kQuantizerBlob, 0);
  std::memcpy(blob.data(), "RQQUANT1", 8);
  put_le(blob, kOffVersion, 1, 4);
  put_le(blob, kOffDim, static_cast<std::uint64_t>(p.dim), 8);
  blob[kOffBits] = static_cast<std::uint8_t>(p.bits);
  blob[kOffRotation] = static_cast<std::uint8_t>(p.rotation);
  blob[kOffMode] = static_cast<std::uint8_t>(p.mode);
  blob[kOffCodebook] = p.codebook == CodebookDensity::kGaussian ? 1 : 0;
  blob[kOffNormDtype] = static_cast<std::uint8_t>(p.norm_dtype);
  blob[kOffNormCorrection] = p.norm_correction ? 1 : 0;
  put_le(blob, kOffSeed, p.seed, 8);
  put_le(blob, kOffQjlDim, static_cast<std::uint64_t>(p.qjl_dim), 8);
  refresh_crc(blob);
  return blob;
}

}  // namespace

// ---- plane layout --------------------------------------------------------------------

TEST(plane_layout_widths_shifts_and_offsets_for_every_bit_count) {
  const int expected_widths[9][4] = {{0}, {1}, {2}, {2, 1}, {4}, {4, 1}, {4, 2}, {4, 2, 1}, {8}};
  const int expected_planes[9] = {0, 1, 1, 2, 1, 2, 2, 3, 1};
  for (std::int64_t padded_dim : {std::int64_t{128}, std::int64_t{129}, std::int64_t{1}, std::int64_t{7}}) {
    for (int bits = 0; bits <= 8; ++bits) {
      const PlaneLayout layout = plane_layout(padded_dim, bits);
      CHECK(layout.bits == bits);
      CHECK(layout.num_planes == expected_planes[bits]);
      int width_sum = 0;
      std::int64_t offset = 0;
      for (int p = 0; p < layout.num_planes; ++p) {
        CHECK(layout.width[p] == expected_widths[bits][p]);
        width_sum += layout.width[p];
        CHECK(layout.shift[p] == bits - width_sum);  // highest bits first
        CHECK(layout.plane_bytes[p] == ceil_div(padded_dim * layout.width[p], 8));
        CHECK(layout.plane_offset[p] == offset);
        offset += layout.plane_bytes[p];
      }
      CHECK(width_sum == bits);
      CHECK(layout.bytes_per_vector == offset);
    }
  }
}

TEST(plane_layout_golden_sizes) {
  // padded_dim 128: exactly bits * 16 bytes; 3 bits = a 32-byte 2-bit plane then a 16-byte 1-bit plane.
  for (int bits = 0; bits <= 8; ++bits) CHECK(plane_layout(128, bits).bytes_per_vector == 16 * bits);
  const PlaneLayout three = plane_layout(128, 3);
  CHECK(three.bytes_per_vector == 48);
  CHECK(three.plane_bytes[0] == 32 && three.plane_bytes[1] == 16);
  CHECK(three.plane_offset[0] == 0 && three.plane_offset[1] == 32);
  CHECK(three.shift[0] == 1 && three.shift[1] == 0);
  // padded_dim 129: each plane rounds up on its own (1-bit 17, 2-bit 33, 4-bit 65, 8-bit 129).
  const std::int64_t golden_129[9] = {0, 17, 33, 50, 65, 82, 98, 115, 129};
  for (int bits = 0; bits <= 8; ++bits) CHECK(plane_layout(129, bits).bytes_per_vector == golden_129[bits]);
  // padded_dim 1: one byte per plane.
  const std::int64_t golden_1[9] = {0, 1, 1, 2, 1, 2, 2, 3, 1};
  for (int bits = 0; bits <= 8; ++bits) CHECK(plane_layout(1, bits).bytes_per_vector == golden_1[bits]);
  // padded_dim 7: 1-bit 1, 2-bit 2, 4-bit 4, 8-bit 7.
  const std::int64_t golden_7[9] = {0, 1, 2, 3, 4, 5, 6, 7, 7};
  for (int bits = 0; bits <= 8; ++bits) CHECK(plane_layout(7, bits).bytes_per_vector == golden_7[bits]);
}

TEST(plane_layout_rejects_bad_arguments) {
  CHECK_THROWS(plane_layout(128, -1), ValueError);
  CHECK_THROWS(plane_layout(128, 9), ValueError);
  CHECK_THROWS(plane_layout(0, 3), ValueError);
  CHECK_THROWS(plane_layout(-5, 3), ValueError);
  // No overflow for huge dimensions: sizes are computed without padded_dim * width.
  const std::int64_t huge = std::numeric_limits<std::int64_t>::max() / 2;
  CHECK(plane_layout(huge, 8).bytes_per_vector == huge);
}

// ---- index packing -------------------------------------------------------------------

TEST(pack_indices_hand_computed_example) {
  // padded_dim 4, 3 bits, idx {5, 2, 7, 0} = {101b, 010b, 111b, 000b}.
  // Plane 0 (width 2, shift 1) holds idx >> 1 = {2, 1, 3, 0}; coordinate j sits at bits 2j..2j+1 of byte 0:
  //   2 | 1 << 2 | 3 << 4 | 0 << 6 = 0b00'11'01'10 = 0x36.
  // Plane 1 (width 1, shift 0) holds idx & 1 = {1, 0, 1, 0}; coordinate j sits at bit j of byte 0:
  //   1 | 0 << 1 | 1 << 2 | 0 << 3 = 0b0000'0101 = 0x05 (bits 4..7 unused, zero).
  const PlaneLayout layout = plane_layout(4, 3);
  CHECK(layout.bytes_per_vector == 2);
  const std::uint8_t idx[4] = {5, 2, 7, 0};
  std::uint8_t out[2] = {0xAA, 0xAA};  // garbage: pack must overwrite every byte
  pack_indices(layout, 4, idx, out);
  CHECK(out[0] == 0x36);
  CHECK(out[1] == 0x05);
  std::uint8_t back[4] = {9, 9, 9, 9};
  unpack_indices(layout, 4, out, back);
  for (int j = 0; j < 4; ++j) CHECK(back[j] == idx[j]);

  // 7 bits, padded_dim 2, idx {0x5A, 0x7F}: planes [4, 2, 1] with shifts 3, 1, 0.
  //   plane 0: idx >> 3 = {0xB, 0xF}         -> byte 0xB | 0xF << 4 = 0xFB
  //   plane 1: (idx >> 1) & 3 = {1, 3}      -> byte 1 | 3 << 2 = 0x0D
  //   plane 2: idx & 1 = {0, 1}             -> byte 0 | 1 << 1 = 0x02
  const PlaneLayout seven = plane_layout(2, 7);
  const std::uint8_t idx7[2] = {0x5A, 0x7F};
  std::uint8_t out7[3] = {0, 0, 0};
  pack_indices(seven, 2, idx7, out7);
  CHECK(out7[0] == 0xFB);
  CHECK(out7[1] == 0x0D);
  CHECK(out7[2] == 0x02);
}

TEST(pack_unpack_round_trip_every_bit_count) {
  const RandomStream stream = make_stream(7, RandomPurpose::kTest, 100);
  std::uint64_t counter = 0;
  for (std::int64_t padded_dim : {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 96, 127, 128, 129, 256, 1000}) {
    for (int bits = 0; bits <= 8; ++bits) {
      const PlaneLayout layout = plane_layout(padded_dim, bits);
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(padded_dim));
      for (auto& v : idx) v = bits == 0 ? 0 : static_cast<std::uint8_t>(stream.bits_at(counter++) & ((1u << bits) - 1u));
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(layout.bytes_per_vector) + 1, 0xCD);
      pack_indices(layout, padded_dim, idx.data(), packed.data());
      CHECK(packed.back() == 0xCD);  // nothing written past bytes_per_vector
      std::vector<std::uint8_t> back(static_cast<std::size_t>(padded_dim), 0xEE);
      unpack_indices(layout, padded_dim, packed.data(), back.data());
      CHECK(back == idx);
      // Trailing bits of every plane are zero.
      for (int p = 0; p < layout.num_planes; ++p) {
        const std::int64_t used_bits = padded_dim * layout.width[p];
        const std::int64_t last = layout.plane_offset[p] + layout.plane_bytes[p] - 1;
        const int used_in_last = static_cast<int>(used_bits - (layout.plane_bytes[p] - 1) * 8);
        if (used_in_last < 8) CHECK((packed[static_cast<std::size_t>(last)] >> used_in_last) == 0);
      }
      // Direct check of the bit placement rule for one coordinate in each plane.
      for (int p = 0; p < layout.num_planes; ++p) {
        const std::int64_t j = padded_dim - 1;
        const int w = layout.width[p];
        const unsigned byte = packed[static_cast<std::size_t>(layout.plane_offset[p] + (j * w) / 8)];
        const unsigned field = (byte >> ((j * w) % 8)) & ((1u << w) - 1u);
        CHECK(field == ((static_cast<unsigned>(idx[static_cast<std::size_t>(j)]) >> layout.shift[p]) & ((1u << w) - 1u)));
      }
    }
  }
}

TEST(pack_indices_all_ones_fill_only_used_bits) {
  // idx all 2^bits - 1 with padded_dim 5: every used bit 1, every unused bit 0.
  for (int bits = 1; bits <= 8; ++bits) {
    const PlaneLayout layout = plane_layout(5, bits);
    std::vector<std::uint8_t> idx(5, static_cast<std::uint8_t>((1u << bits) - 1u));
    std::vector<std::uint8_t> packed(static_cast<std::size_t>(layout.bytes_per_vector));
    pack_indices(layout, 5, idx.data(), packed.data());
    std::int64_t ones = 0;
    for (auto b : packed) {
      for (int k = 0; k < 8; ++k) ones += (b >> k) & 1;
    }
    CHECK(ones == 5 * bits);
  }
}

// ---- sign bits ---------------------------------------------------------------------------

TEST(sign_pack_unpack) {
  CHECK(sign_bytes(0) == 0);
  CHECK(sign_bytes(1) == 1);
  CHECK(sign_bytes(8) == 1);
  CHECK(sign_bytes(9) == 2);
  CHECK(sign_bytes(128) == 16);
  CHECK_THROWS(sign_bytes(-1), ValueError);
  CHECK(sign_bytes(std::numeric_limits<std::int64_t>::max()) == std::numeric_limits<std::int64_t>::max() / 8 + 1);

  // m = 11: values >= 0 (including 0 and -0) -> bit 1.
  const float values[11] = {1.0f, -1.0f, 0.0f, -0.5f, 2.0f, -3.0f, -0.0f, 1e-30f, -1e-30f, 5.0f, 0.0f};
  // bits (j = 0..10): 1 0 1 0 1 0 1 1 0 1 1 -> byte 0 = 0b11010101 = 0xD5, byte 1 = 0b00000110 = 0x06
  std::uint8_t packed[3] = {0xFF, 0xFF, 0x77};
  pack_signs(values, 11, packed);
  CHECK(packed[0] == 0xD5);
  CHECK(packed[1] == 0x06);
  CHECK(packed[2] == 0x77);  // untouched
  float back[11];
  unpack_signs(packed, 11, back);
  for (int j = 0; j < 11; ++j) CHECK(back[j] == (values[j] >= 0.0f ? 1.0f : -1.0f));

  // Random round trip for lengths around byte boundaries.
  const RandomStream stream = make_stream(3, RandomPurpose::kTest, 200);
  for (std::int64_t m : {1, 7, 8, 9, 15, 16, 17, 64, 100, 129}) {
    std::vector<float> v(static_cast<std::size_t>(m));
    for (std::int64_t j = 0; j < m; ++j) v[static_cast<std::size_t>(j)] = static_cast<float>(stream.gaussian_at(static_cast<std::uint64_t>(m * 1000 + j)));
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(sign_bytes(m)));
    pack_signs(v.data(), m, bytes.data());
    if (m % 8 != 0) CHECK((bytes.back() >> (m % 8)) == 0);
    std::vector<float> s(static_cast<std::size_t>(m));
    unpack_signs(bytes.data(), m, s.data());
    for (std::int64_t j = 0; j < m; ++j) {
      CHECK(s[static_cast<std::size_t>(j)] == (v[static_cast<std::size_t>(j)] >= 0.0f ? 1.0f : -1.0f));
    }
  }
}

// ---- float16 -------------------------------------------------------------------------------

TEST(half_exact_values) {
  struct Pair {
    float value;
    std::uint16_t bits;
  };
  const Pair pairs[] = {
      {0.0f, 0x0000},          {1.0f, 0x3C00},         {-2.0f, 0xC000},           {0.5f, 0x3800},
      {65504.0f, 0x7BFF},      {-65504.0f, 0xFBFF},    {0.099975586f, 0x2E66},    {0.333251953125f, 0x3555},
      {std::ldexp(1.0f, -14), 0x0400},                 {std::ldexp(1.0f, -24), 0x0001},
      {std::ldexp(1023.0f, -24), 0x03FF},              {1.0009765625f, 0x3C01},   {1024.0f, 0x6400},
  };
  for (const Pair& p : pairs) {
    CHECK(float_to_half(p.value) == p.bits);
    CHECK(half_to_float(p.bits) == p.value);
  }
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(std::signbit(half_to_float(0x8000)) && half_to_float(0x8000) == 0.0f);
}

TEST(half_round_trip_every_finite_half) {
  int checked = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const std::uint16_t bits = static_cast<std::uint16_t>(h);
    const float f = half_to_float(bits);
    if ((bits & 0x7C00u) == 0x7C00u && (bits & 0x3FFu) != 0) {
      CHECK(std::isnan(f));
      CHECK((float_to_half(f) & 0x7C00u) == 0x7C00u && (float_to_half(f) & 0x3FFu) != 0);
      continue;
    }
    if (float_to_half(f) != bits) rq_test::fail(__FILE__, __LINE__, "half round trip failed for " + std::to_string(h));
    ++checked;
  }
  CHECK(checked == 65536 - 2 * 1023);
  CHECK(std::isinf(half_to_float(0x7C00)) && half_to_float(0x7C00) > 0);
  CHECK(std::isinf(half_to_float(0xFC00)) && half_to_float(0xFC00) < 0);
}

TEST(half_round_to_nearest_even) {
  // Normal range: the spacing above 1 is 2^-10.
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);       // tie, 0x3C00 is even
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);   // tie between 0x3C01 and 0x3C02 -> even
  CHECK(float_to_half(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3C01);  // just above the tie
  CHECK(float_to_half(std::nextafter(1.0f + 3 * std::ldexp(1.0f, -11), 0.0f)) == 0x3C01);  // just below
  CHECK(float_to_half(2047.0f / 1024.0f + std::ldexp(1.0f, -11)) == 0x4000);  // 0x3FFF tie carries into the exponent
  CHECK(float_to_half(-(1.0f + 3 * std::ldexp(1.0f, -11))) == 0xBC02);
  // Subnormal range: the spacing is 2^-24.
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);                     // tie between 0 and 1 -> 0
  CHECK(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_half(std::ldexp(3.0f, -25)) == 0x0002);                     // 1.5 ulp: tie between 1 and 2 -> 2
  CHECK(float_to_half(std::ldexp(5.0f, -25)) == 0x0002);                     // 2.5 ulp: tie between 2 and 3 -> 2
  CHECK(float_to_half(std::ldexp(2047.0f, -25)) == 0x0400);                  // 1023.5 ulp -> 1024 = smallest normal
  CHECK(float_to_half(std::ldexp(1.0f, -30)) == 0x0000);
  CHECK(float_to_half(-std::ldexp(1.0f, -30)) == 0x8000);
  CHECK(float_to_half(1e-40f) == 0x0000);  // a float subnormal
  CHECK(float_to_half(-std::ldexp(3.0f, -25)) == 0x8002);
}

TEST(half_nearest_for_random_floats) {
  // For random finite floats in the half range, the result is the nearest half, ties to even.
  const RandomStream stream = make_stream(5, RandomPurpose::kTest, 300);
  int tested = 0;
  for (std::uint64_t i = 0; i < 200000; ++i) {
    const std::uint32_t bits = stream.bits_at(i);
    const float v = bits_to_float(bits);
    if (!std::isfinite(v) || std::fabs(v) >= 65520.0f) continue;
    ++tested;
    const std::uint16_t h = float_to_half(v);
    const double error = std::fabs(static_cast<double>(half_to_float(h)) - v);
    const std::uint16_t magnitude = h & 0x7FFFu;
    bool ok = true;
    for (int step : {-1, 1}) {
      const int neighbour = magnitude + step;
      if (neighbour < 0 || neighbour > 0x7BFF) continue;
      const std::uint16_t nb = static_cast<std::uint16_t>((h & 0x8000u) | static_cast<unsigned>(neighbour));
      const double other = std::fabs(static_cast<double>(half_to_float(nb)) - v);
      if (other < error) ok = false;
      if (other == error && (magnitude & 1u)) ok = false;  // a tie must pick the even one
    }
    if (!ok) rq_test::fail(__FILE__, __LINE__, "not nearest-even for float bits " + std::to_string(bits));
  }
  CHECK(tested > 1000);
  // And fine sweeps straddling each binade boundary from 2^-26 to 2^16.
  for (int e = -26; e <= 15; ++e) {
    const float base = std::ldexp(1.0f, e);
    float v = base;
    for (int k = 0; k < 64; ++k) v = std::nextafter(v, 0.0f);
    for (int k = 0; k < 128; ++k, v = std::nextafter(v, 1e9f)) {
      const float r = half_to_float(float_to_half(v));
      // Relative error at most half a half-ulp (2^-11) for normals, absolute 2^-25 for subnormals.
      CHECK(std::fabs(r - v) <= std::max(std::fabs(v) * std::ldexp(1.0f, -11), std::ldexp(1.0f, -25)));
    }
  }
}

TEST(half_overflow_and_specials) {
  CHECK(float_to_half(65519.0f) == 0x7BFF);
  CHECK(float_to_half(std::nextafter(65520.0f, 0.0f)) == 0x7BFF);
  CHECK(float_to_half(65520.0f) == 0x7C00);  // the tie above 65504 rounds to even: infinity
  CHECK(float_to_half(1e6f) == 0x7C00);
  CHECK(float_to_half(-1e6f) == 0xFC00);
  CHECK(float_to_half(std::numeric_limits<float>::max()) == 0x7C00);
  CHECK(float_to_half(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(float_to_half(-std::numeric_limits<float>::infinity()) == 0xFC00);
  const std::uint16_t nan = float_to_half(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7C00u) == 0x7C00u && (nan & 0x3FFu) != 0);
  // A NaN whose payload sits only in the low float bits must not become infinity.
  const std::uint16_t low_payload = float_to_half(bits_to_float(0x7F800001u));
  CHECK((low_payload & 0x7C00u) == 0x7C00u && (low_payload & 0x3FFu) != 0);
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0x7C01)));
  CHECK(float_to_bits(half_to_float(0xFE00)) >> 31 == 1u);  // sign of a NaN kept
}

// ---- CRC-32 -------------------------------------------------------------------------------

TEST(crc32_known_values) {
  const char* check = "123456789";
  CHECK(crc32(reinterpret_cast<const std::uint8_t*>(check), 9) == 0xCBF43926u);
  CHECK(crc32(nullptr, 0) == 0u);
  const char* fox = "The quick brown fox jumps over the lazy dog";
  CHECK(crc32(reinterpret_cast<const std::uint8_t*>(fox), std::strlen(fox)) == 0x414FA339u);
  // Incremental use equals one pass.
  const auto* data = reinterpret_cast<const std::uint8_t*>(fox);
  const std::uint32_t first = crc32(data, 10);
  CHECK(crc32(data + 10, std::strlen(fox) - 10, first) == 0x414FA339u);
}

// ---- names and parameters -------------------------------------------------------------------

TEST(enum_names_round_trip) {
  CHECK(quantizer_mode_name(QuantizerMode::kMSE) == "mse");
  CHECK(quantizer_mode_name(QuantizerMode::kProd) == "prod");
  CHECK(parse_quantizer_mode("mse") == QuantizerMode::kMSE);
  CHECK(parse_quantizer_mode("prod") == QuantizerMode::kProd);
  CHECK_THROWS(parse_quantizer_mode("MSE"), TypeError);
  CHECK_THROWS(parse_quantizer_mode(""), TypeError);
  CHECK(norm_dtype_name(NormDtype::kFloat16) == "float16");
  CHECK(norm_dtype_name(NormDtype::kFloat32) == "float32");
  CHECK(parse_norm_dtype("float16") == NormDtype::kFloat16);
  CHECK(parse_norm_dtype("float32") == NormDtype::kFloat32);
  CHECK_THROWS(parse_norm_dtype("bfloat16"), TypeError);
  CHECK(norm_dtype_size(NormDtype::kFloat16) == 2);
  CHECK(norm_dtype_size(NormDtype::kFloat32) == 4);
  CHECK_THROWS(norm_dtype_size(static_cast<NormDtype>(7)), TypeError);
  CHECK_THROWS(quantizer_mode_name(static_cast<QuantizerMode>(2)), TypeError);
}

TEST(params_equality_looks_at_every_field) {
  const QuantizerParams base = prod_params();
  CHECK(base == prod_params());
  CHECK(!(base != prod_params()));
  std::vector<QuantizerParams> variants(9, base);
  variants[0].dim += 1;
  variants[1].bits += 1;
  variants[2].rotation = RotationKind::kDense;
  variants[3].mode = QuantizerMode::kMSE;
  variants[4].seed += 1;
  variants[5].codebook = CodebookDensity::kSphere;
  variants[6].norm_dtype = NormDtype::kFloat16;
  variants[7].norm_correction = true;
  variants[8].qjl_dim += 1;
  for (const auto& v : variants) {
    CHECK(v != base);
    CHECK(!(v == base));
  }
}

// ---- codes blob ---------------------------------------------------------------------------------

TEST(codes_round_trip_mse) {
  const QuantizerParams p = mse_params();
  // padded_dim 16, 3 bits: planes 4 + 2 = 6 bytes; fp16 norm 2 bytes.
  const std::int64_t n = 3;
  const HandCodes codes = make_codes(n, 6, 2, 0, 0, 1);
  const std::vector<std::uint8_t> blob = codes_to_bytes(p, n, codes.view());
  CHECK(blob.size() == kCodesHeader + 3 * (6 + 2) + 4);
  CHECK(std::memcmp(blob.data(), "RQCODES1", 8) == 0);
  CHECK(get_le(blob, kOffVersion, 4) == 1);
  CHECK(get_le(blob, kOffDim, 8) == 10);
  CHECK(blob[kOffBits] == 3);
  CHECK(blob[kOffRotation] == 2);
  CHECK(blob[kOffMode] == 0);
  CHECK(blob[kOffCodebook] == 0);
  CHECK(blob[kOffNormDtype] == 0);
  CHECK(blob[kOffNormCorrection] == 1);
  CHECK(get_le(blob, kOffReserved, 2) == 0);
  CHECK(get_le(blob, kOffSeed, 8) == 42);
  CHECK(get_le(blob, kOffQjlDim, 8) == 0);
  CHECK(get_le(blob, kOffN, 8) == 3);
  CHECK(get_le(blob, kOffSections, 8) == 18);
  CHECK(get_le(blob, kOffSections + 8, 8) == 6);
  CHECK(get_le(blob, kOffSections + 16, 8) == 0);
  CHECK(get_le(blob, kOffSections + 24, 8) == 0);
  CHECK(std::memcmp(blob.data() + kCodesHeader, codes.indices.data(), 18) == 0);
  CHECK(std::memcmp(blob.data() + kCodesHeader + 18, codes.norms.data(), 6) == 0);
  CHECK(get_le(blob, blob.size() - 4, 4) == crc32(blob.data(), blob.size() - 4));

  const DecodedCodes decoded = codes_from_bytes(blob.data(), blob.size());
  CHECK(decoded.params == p);
  CHECK(decoded.n == n);
  CHECK(decoded.indices == codes.indices);
  CHECK(decoded.norms == codes.norms);
  CHECK(decoded.qjl_signs.empty());
  CHECK(decoded.residual_norms.empty());
}

TEST(codes_round_trip_prod) {
  const QuantizerParams p = prod_params();
  // rotor3 dim 7 -> padded 9; mse stage 2 bits: ceil(18/8) = 3 bytes; fp32 norms; m = 13 -> 2 sign bytes.
  const std::int64_t n = 4;
  const HandCodes codes = make_codes(n, 3, 4, 2, 4, 2);
  const std::vector<std::uint8_t> blob = codes_to_bytes(p, n, codes.view());
  CHECK(blob.size() == kCodesHeader + 4 * (3 + 4 + 2 + 4) + 4);
  CHECK(get_le(blob, kOffSeed, 8) == 0x0123456789ABCDEFull);
  CHECK(blob[kOffSeed] == 0xEF);  // little-endian
  CHECK(blob[kOffCodebook] == 1);
  CHECK(blob[kOffNormDtype] == 1);
  CHECK(get_le(blob, kOffQjlDim, 8) == 13);
  const DecodedCodes decoded = codes_from_bytes(blob.data(), blob.size());
  CHECK(decoded.params == p);
  CHECK(decoded.n == n);
  CHECK(decoded.indices == codes.indices);
  CHECK(decoded.norms == codes.norms);
  CHECK(decoded.qjl_signs == codes.signs);
  CHECK(decoded.residual_norms == codes.residual_norms);

  // qjl_dim 0 -> m = padded_dim (9 -> 2 sign bytes); prod at 1 bit has no index bytes at all.
  QuantizerParams one_bit = p;
  one_bit.bits = 1;
  one_bit.qjl_dim = 0;
  one_bit.norm_dtype = NormDtype::kFloat16;
  const HandCodes c1 = make_codes(2, 0, 2, 2, 2, 3);
  const std::vector<std::uint8_t> b1 = codes_to_bytes(one_bit, 2, c1.view());
  CHECK(b1.size() == kCodesHeader + 2 * (0 + 2 + 2 + 2) + 4);
  const DecodedCodes d1 = codes_from_bytes(b1.data(), b1.size());
  CHECK(d1.params == one_bit);
  CHECK(d1.indices.empty());
  CHECK(d1.qjl_signs == c1.signs);
}

TEST(codes_round_trip_empty_batch) {
  for (const QuantizerParams& p : {mse_params(), prod_params()}) {
    const std::vector<std::uint8_t> blob = codes_to_bytes(p, 0, ConstCodesView{});
    CHECK(blob.size() == kCodesHeader + 4);
    const DecodedCodes decoded = codes_from_bytes(blob.data(), blob.size());
    CHECK(decoded.params == p);
    CHECK(decoded.n == 0);
    CHECK(decoded.indices.empty() && decoded.norms.empty());
  }
}

TEST(codes_writer_rejects_bad_input) {
  const HandCodes codes = make_codes(2, 6, 2, 0, 0, 0);
  CHECK_THROWS(codes_to_bytes(mse_params(), -1, codes.view()), ValueError);
  ConstCodesView missing = codes.view();
  missing.norms = nullptr;
  CHECK_THROWS(codes_to_bytes(mse_params(), 2, missing), ValueError);
  QuantizerParams p = mse_params();
  p.bits = 9;
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
  p = mse_params();
  p.bits = 0;
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
  p = mse_params();
  p.qjl_dim = 4;  // mse mode has no QJL stage
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
  p = prod_params();
  p.norm_correction = true;
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
  p = mse_params();
  p.dim = 0;
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
  p = mse_params();
  p.rotation = static_cast<RotationKind>(9);
  CHECK_THROWS(codes_to_bytes(p, 2, codes.view()), ValueError);
}

TEST(codes_reader_rejects_every_single_byte_corruption) {
  const QuantizerParams p = prod_params();
  const HandCodes codes = make_codes(2, 3, 4, 2, 4, 5);
  const std::vector<std::uint8_t> blob = codes_to_bytes(p, 2, codes.view());
  int rejected = 0, total = 0;
  for (std::size_t i = 0; i < blob.size(); ++i) {
    for (std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x80}, std::uint8_t{0xFF}}) {
      std::vector<std::uint8_t> bad = blob;
      bad[i] ^= mask;
      ++total;
      try {
        (void)codes_from_bytes(bad.data(), bad.size());
      } catch (const ValueError&) {
        ++rejected;
      } catch (...) {
      }
    }
  }
  CHECK(rejected == total);
  // A flip inside a section (the header is intact) is reported as a checksum mismatch.
  std::vector<std::uint8_t> bad = blob;
  bad[kCodesHeader + 1] ^= 0x10;
  CHECK(throws_value_error_containing([&] { (void)codes_from_bytes(bad.data(), bad.size()); },
                                      "checksum mismatch: data corrupted"));
}

TEST(codes_reader_rejects_truncation_and_trailing_bytes) {
  const HandCodes codes = make_codes(3, 6, 2, 0, 0, 9);
  const std::vector<std::uint8_t> blob = codes_to_bytes(mse_params(), 3, codes.view());
  for (std::size_t length = 0; length < blob.size(); ++length) {
    // Copy into an exact-size buffer so that a read past `length` would be caught by sanitizers.
    std::vector<std::uint8_t> cut(blob.begin(), blob.begin() + static_cast<std::ptrdiff_t>(length));
    CHECK_THROWS(codes_from_bytes(cut.empty() ? nullptr : cut.data(), cut.size()), ValueError);
  }
  std::vector<std::uint8_t> longer = blob;
  longer.push_back(0);
  CHECK(throws_value_error_containing([&] { (void)codes_from_bytes(longer.data(), longer.size()); }, "trailing"));
  std::vector<std::uint8_t> shorter(blob.begin(), blob.end() - 1);
  CHECK(throws_value_error_containing([&] { (void)codes_from_bytes(shorter.data(), shorter.size()); }, "truncated"));
  CHECK_THROWS(codes_from_bytes(nullptr, 100), ValueError);
}

TEST(codes_reader_rejects_wrong_magic_and_wrong_blob_kind) {
  const HandCodes codes = make_codes(1, 6, 2, 0, 0, 1);
  std::vector<std::uint8_t> blob = codes_to_bytes(mse_params(), 1, codes.view());
  std::vector<std::uint8_t> wrong = blob;
  std::memcpy(wrong.data(), "PK\x03\x04xxxx", 8);
  CHECK(throws_value_error_containing([&] { (void)codes_from_bytes(wrong.data(), wrong.size()); },
                                      "not rotorquant codes"));
  const std::vector<std::uint8_t> quantizer_blob = hand_quantizer_blob(mse_params());
  CHECK(throws_value_error_containing(
      [&] { (void)codes_from_bytes(quantizer_blob.data(), quantizer_blob.size()); }, "this is a quantizer, not codes"));
  CHECK(throws_value_error_containing([&] { (void)Quantizer::params_from_bytes(blob.data(), blob.size()); },
                                      "this is codes, not a quantizer"));
  CHECK(throws_value_error_containing([&] { (void)Quantizer::params_from_bytes(wrong.data(), wrong.size()); },
                                      "not a rotorquant quantizer"));
}

TEST(codes_reader_rejects_inconsistent_headers_with_valid_checksum) {
  const QuantizerParams p = prod_params();
  const HandCodes codes = make_codes(2, 3, 4, 2, 4, 5);
  const std::vector<std::uint8_t> blob = codes_to_bytes(p, 2, codes.view());
  auto patched = [&](std::size_t offset, std::uint64_t value, int count) {
    std::vector<std::uint8_t> b = blob;
    put_le(b, offset, value, count);
    refresh_crc(b);
    return b;
  };
  auto rejects = [&](const std::vector<std::uint8_t>& b, const std::string& needle) {
    return throws_value_error_containing([&] { (void)codes_from_bytes(b.data(), b.size()); }, needle);
  };
  CHECK(rejects(patched(kOffVersion, 2, 4), "unsupported format version: expected 1, got 2"));
  CHECK(rejects(patched(kOffBits, 0, 1), "bits"));
  CHECK(rejects(patched(kOffBits, 9, 1), "bits"));
  CHECK(rejects(patched(kOffRotation, 7, 1), "rotation kind"));
  CHECK(rejects(patched(kOffMode, 2, 1), "mode"));
  CHECK(rejects(patched(kOffCodebook, 2, 1), "codebook"));
  CHECK(rejects(patched(kOffNormDtype, 2, 1), "norm dtype"));
  CHECK(rejects(patched(kOffNormCorrection, 2, 1), "norm_correction"));
  CHECK(rejects(patched(kOffNormCorrection, 1, 1), "norm_correction"));  // not allowed in prod mode
  CHECK(rejects(patched(kOffReserved, 1, 2), "reserved"));
  CHECK(rejects(patched(kOffDim, 0, 8), "dim"));
  CHECK(rejects(patched(kOffDim, std::uint64_t{1} << 63, 8), "dim"));
  CHECK(rejects(patched(kOffQjlDim, std::uint64_t{1} << 50, 8), "qjl_dim"));
  CHECK(rejects(patched(kOffQjlDim, 21, 8), "qjl_signs section size"));  // m 21 -> 3 sign bytes, not 2
  CHECK(rejects(patched(kOffN, 3, 8), "section size"));
  // Section sizes that add up to the real size but disagree with params and n.
  {
    std::vector<std::uint8_t> b = blob;
    put_le(b, kOffSections, 7, 8);       // indices 6 -> 7
    put_le(b, kOffSections + 8, 7, 8);   // norms 8 -> 7
    refresh_crc(b);
    CHECK(rejects(b, "indices section size"));
  }
  // n * per-vector size overflows int64: n = 2^62 with (wrong) empty sections.
  {
    std::vector<std::uint8_t> b(blob.begin(), blob.begin() + kCodesHeader);
    put_le(b, kOffN, std::uint64_t{1} << 62, 8);
    for (int s = 0; s < 4; ++s) put_le(b, kOffSections + 8 * s, 0, 8);
    b.resize(b.size() + 4);
    refresh_crc(b);
    CHECK(rejects(b, "overflow"));
  }
  // Section sizes whose sum overflows uint64.
  {
    std::vector<std::uint8_t> b = blob;
    put_le(b, kOffSections, ~std::uint64_t{0}, 8);
    put_le(b, kOffSections + 8, 16, 8);
    refresh_crc(b);
    CHECK(rejects(b, "overflow"));
  }
  // A huge declared section with a short buffer: rejected before anything is read from it.
  CHECK(rejects(patched(kOffSections, std::uint64_t{1} << 40, 8), "truncated"));
}

// ---- quantizer blob -----------------------------------------------------------------------------

TEST(quantizer_blob_read_from_hand_written_bytes) {
  for (const QuantizerParams& p : {mse_params(), prod_params()}) {
    const std::vector<std::uint8_t> blob = hand_quantizer_blob(p);
    CHECK(Quantizer::params_from_bytes(blob.data(), blob.size()) == p);
  }
}

TEST(quantizer_blob_rejects_corruption_truncation_and_inconsistency) {
  const std::vector<std::uint8_t> blob = hand_quantizer_blob(prod_params());
  int rejected = 0, total = 0;
  for (std::size_t i = 0; i < blob.size(); ++i) {
    for (std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x40}, std::uint8_t{0xFF}}) {
      std::vector<std::uint8_t> bad = blob;
      bad[i] ^= mask;
      ++total;
      try {
        (void)Quantizer::params_from_bytes(bad.data(), bad.size());
      } catch (const ValueError&) {
        ++rejected;
      } catch (...) {
      }
    }
  }
  CHECK(rejected == total);
  for (std::size_t length = 0; length < blob.size(); ++length) {
    std::vector<std::uint8_t> cut(blob.begin(), blob.begin() + static_cast<std::ptrdiff_t>(length));
    CHECK_THROWS(Quantizer::params_from_bytes(cut.empty() ? nullptr : cut.data(), cut.size()), ValueError);
  }
  std::vector<std::uint8_t> longer = blob;
  longer.push_back(0);
  CHECK_THROWS(Quantizer::params_from_bytes(longer.data(), longer.size()), ValueError);
  std::vector<std::uint8_t> bad = blob;
  bad[kOffSeed] ^= 1;
  CHECK(throws_value_error_containing([&] { (void)Quantizer::params_from_bytes(bad.data(), bad.size()); },
                                      "checksum mismatch: data corrupted"));
  std::vector<std::uint8_t> mode = blob;
  mode[kOffMode] = 0;  // mse mode with qjl_dim 13: inconsistent
  refresh_crc(mode);
  CHECK(throws_value_error_containing([&] { (void)Quantizer::params_from_bytes(mode.data(), mode.size()); },
                                      "qjl_dim"));
}

TEST(quantizer_to_bytes_matches_the_spec) {
  QuantizerParams p;
  p.dim = 64;
  p.bits = 3;
  p.rotation = RotationKind::kHadamard;
  p.mode = QuantizerMode::kProd;
  p.seed = 77;
  p.qjl_dim = 32;
  const Quantizer q(p);
  const std::vector<std::uint8_t> blob = q.to_bytes();
  CHECK(blob == hand_quantizer_blob(p));
  CHECK(Quantizer::params_from_bytes(blob.data(), blob.size()) == p);
  QuantizerParams m = p;
  m.mode = QuantizerMode::kMSE;
  m.qjl_dim = 0;
  m.norm_correction = true;
  m.norm_dtype = NormDtype::kFloat32;
  const std::vector<std::uint8_t> mblob = Quantizer(m).to_bytes();
  CHECK(mblob.size() == kQuantizerBlob);
  CHECK(Quantizer::params_from_bytes(mblob.data(), mblob.size()) == m);
}
