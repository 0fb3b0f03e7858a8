// Packed code format primitives: bit-plane layout, index and sign packing, IEEE binary16
// conversion and CRC-32. docs/format.md specifies every byte.
#include "rotorquant/format.hpp"

#include <array>
#include <cmath>
#include <cstring>
#include <string>

#include "rotorquant/error.hpp"

namespace rotorquant {
namespace {

// Bytes taken by count fields of `width` bits (width divides 8), without forming count * width.
std::int64_t packed_bytes(std::int64_t count, int width) {
  const std::int64_t per_byte = 8 / width;
  return count / per_byte + (count % per_byte != 0 ? 1 : 0);
}

// Plane widths of each bit count, highest bits first.
struct PlaneSplit {
  int num_planes;
  int width[4];
};
constexpr PlaneSplit kPlaneSplits[9] = {
    {0, {0, 0, 0, 0}},  // 0
    {1, {1, 0, 0, 0}},  // 1
    {1, {2, 0, 0, 0}},  // 2
    {2, {2, 1, 0, 0}},  // 3
    {1, {4, 0, 0, 0}},  // 4
    {2, {4, 1, 0, 0}},  // 5
    {2, {4, 2, 0, 0}},  // 6
    {3, {4, 2, 1, 0}},  // 7
    {1, {8, 0, 0, 0}},  // 8
};

template <int Width>
void pack_plane(const std::uint8_t* idx, std::int64_t count, int shift, std::uint8_t* out) {
  constexpr int kPerByte = 8 / Width;
  constexpr unsigned kMask = (1u << Width) - 1u;
  const std::int64_t full_bytes = count / kPerByte;
  for (std::int64_t b = 0; b < full_bytes; ++b) {
    const std::uint8_t* group = idx + b * kPerByte;
    unsigned byte = 0;
    for (int t = 0; t < kPerByte; ++t) byte |= ((static_cast<unsigned>(group[t]) >> shift) & kMask) << (t * Width);
    out[b] = static_cast<std::uint8_t>(byte);
  }
  const std::int64_t rest = count - full_bytes * kPerByte;
  if (rest > 0) {
    const std::uint8_t* group = idx + full_bytes * kPerByte;
    unsigned byte = 0;
    for (std::int64_t t = 0; t < rest; ++t) {
      byte |= ((static_cast<unsigned>(group[t]) >> shift) & kMask) << (t * Width);
    }
    out[full_bytes] = static_cast<std::uint8_t>(byte);  // unused high bits stay zero
  }
}

// ORs plane bits into idx (which the caller zeroed).
template <int Width>
void unpack_plane(const std::uint8_t* in, std::int64_t count, int shift, std::uint8_t* idx) {
  constexpr int kPerByte = 8 / Width;
  constexpr unsigned kMask = (1u << Width) - 1u;
  for (std::int64_t j = 0; j < count; ++j) {
    const unsigned byte = in[j / kPerByte];
    const unsigned value = (byte >> ((j % kPerByte) * Width)) & kMask;
    idx[j] = static_cast<std::uint8_t>(idx[j] | (value << shift));
  }
}

void check_layout_arguments(const PlaneLayout& layout, std::int64_t padded_dim, const char* what) {
  if (padded_dim < 1) {
    throw ValueError(detail::expected_got(std::string(what) + ": padded_dim", ">= 1", std::to_string(padded_dim)));
  }
  if (layout.num_planes < 0 || layout.num_planes > 4) {
    throw ValueError(detail::expected_got(std::string(what) + ": layout.num_planes", "0..4",
                                          std::to_string(layout.num_planes)));
  }
}

std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

std::array<std::uint32_t, 256> make_crc_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
    table[i] = c;
  }
  return table;
}

}  // namespace

PlaneLayout plane_layout(std::int64_t padded_dim, int bits) {
  if (bits < 0 || bits > 8) throw ValueError(detail::expected_got("plane_layout: bits", "0..8", std::to_string(bits)));
  if (padded_dim < 1) {
    throw ValueError(detail::expected_got("plane_layout: padded_dim", ">= 1", std::to_string(padded_dim)));
  }
  PlaneLayout layout;
  layout.bits = bits;
  const PlaneSplit& split = kPlaneSplits[bits];
  layout.num_planes = split.num_planes;
  int remaining = bits;
  std::int64_t offset = 0;
  for (int p = 0; p < split.num_planes; ++p) {
    remaining -= split.width[p];
    layout.width[p] = split.width[p];
    layout.shift[p] = remaining;
    layout.plane_bytes[p] = packed_bytes(padded_dim, split.width[p]);
    layout.plane_offset[p] = offset;
    offset += layout.plane_bytes[p];
  }
  layout.bytes_per_vector = offset;
  return layout;
}

void pack_indices(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* idx, std::uint8_t* out) {
  check_layout_arguments(layout, padded_dim, "pack_indices");
  for (int p = 0; p < layout.num_planes; ++p) {
    std::uint8_t* plane = out + layout.plane_offset[p];
    const int shift = layout.shift[p];
    switch (layout.width[p]) {
      case 1: pack_plane<1>(idx, padded_dim, shift, plane); break;
      case 2: pack_plane<2>(idx, padded_dim, shift, plane); break;
      case 4: pack_plane<4>(idx, padded_dim, shift, plane); break;
      case 8: pack_plane<8>(idx, padded_dim, shift, plane); break;
      default:
        throw ValueError(detail::expected_got("pack_indices: plane width", "1, 2, 4 or 8", std::to_string(layout.width[p])));
    }
  }
}

void unpack_indices(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* in, std::uint8_t* idx) {
  check_layout_arguments(layout, padded_dim, "unpack_indices");
  std::memset(idx, 0, static_cast<std::size_t>(padded_dim));
  for (int p = 0; p < layout.num_planes; ++p) {
    const std::uint8_t* plane = in + layout.plane_offset[p];
    const int shift = layout.shift[p];
    switch (layout.width[p]) {
      case 1: unpack_plane<1>(plane, padded_dim, shift, idx); break;
      case 2: unpack_plane<2>(plane, padded_dim, shift, idx); break;
      case 4: unpack_plane<4>(plane, padded_dim, shift, idx); break;
      case 8: unpack_plane<8>(plane, padded_dim, shift, idx); break;
      default:
        throw ValueError(
            detail::expected_got("unpack_indices: plane width", "1, 2, 4 or 8", std::to_string(layout.width[p])));
    }
  }
}

std::int64_t sign_bytes(std::int64_t m) {
  if (m < 0) throw ValueError(detail::expected_got("sign_bytes: m", ">= 0", std::to_string(m)));
  return packed_bytes(m, 1);
}

void pack_signs(const float* values, std::int64_t m, std::uint8_t* out) {
  const std::int64_t bytes = sign_bytes(m);
  for (std::int64_t b = 0; b < bytes; ++b) {
    const std::int64_t begin = b * 8;
    const std::int64_t end = begin + 8 < m ? begin + 8 : m;
    unsigned byte = 0;
    for (std::int64_t j = begin; j < end; ++j) {
      if (values[j] >= 0.0f) byte |= 1u << (j - begin);
    }
    out[b] = static_cast<std::uint8_t>(byte);
  }
}

void unpack_signs(const std::uint8_t* in, std::int64_t m, float* out) {
  if (m < 0) throw ValueError(detail::expected_got("unpack_signs: m", ">= 0", std::to_string(m)));
  for (std::int64_t j = 0; j < m; ++j) out[j] = ((in[j >> 3] >> (j & 7)) & 1u) ? 1.0f : -1.0f;
}

std::uint16_t float_to_half(float value) {
  const std::uint32_t f = float_bits(value);
  const std::uint32_t sign = (f >> 16) & 0x8000u;
  const std::uint32_t magnitude = f & 0x7FFFFFFFu;

  if (magnitude >= 0x7F800000u) {  // inf or NaN
    if (magnitude == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
    // NaN: keep the top payload bits and force the quiet bit so it stays a NaN.
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  // 65520 = 0x477FF000 is halfway between 65504 (largest half) and 65536; it and everything above
  // round (to even) to infinity.
  if (magnitude >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);

  if (magnitude < 0x38800000u) {  // below 2^-14: half subnormal or zero
    // Exactly 2^-25 is the tie between 0 and the smallest subnormal 2^-24: it rounds to even, i.e. 0.
    if (magnitude <= 0x33000000u) return static_cast<std::uint16_t>(sign);
    const std::uint32_t exponent = magnitude >> 23;  // 102..112
    const std::uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    // value / 2^-24 = mantissa * 2^(exponent - 126)
    const std::uint32_t shift = 126u - exponent;  // 14..24
    std::uint32_t q = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (q & 1u))) ++q;  // may carry into 0x400, the smallest normal
    return static_cast<std::uint16_t>(sign | q);
  }

  const std::uint32_t exponent = (magnitude >> 23) - 112u;  // 1..30
  const std::uint32_t mantissa = magnitude & 0x7FFFFFu;
  std::uint32_t h = (exponent << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent correctly
  return static_cast<std::uint16_t>(sign | h);
}

float half_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  const std::uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // exact
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
  static const std::array<std::uint32_t, 256> table = make_crc_table();
  std::uint32_t c = crc ^ 0xFFFFFFFFu;
  for (std::size_t i = 0; i < size; ++i) c = table[(c ^ data[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

}  // namespace rotorquant
