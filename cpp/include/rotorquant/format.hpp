// The packed code format (specified in docs/format.md, version 1).
//
// A batch of n codes is four arrays (structure of arrays, so GPU kernels read each
// plane coalesced and a KV cache can keep norms apart):
//   indices         n * layout.bytes_per_vector bytes: the Lloyd-Max index of every padded coordinate,
//                   split into byte-aligned bit planes (see PlaneLayout)
//   norms           n values, float16 or float32 (little-endian IEEE): ||x|| (or ||x|| / ||c[idx]||
//                   with norm correction)
//   qjl_signs       n * ceil(m / 8) bytes (prod mode only): bit j of vector i is 1 when (S r_i)_j >= 0
//                   (byte j / 8, bit j % 8, least significant first)
//   residual_norms  n values in the norm dtype (prod mode only): ||r_i|| of the unit-vector residual
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rotorquant {

// Bits of an index are split into planes of width 4, 2 or 1 (8 bits: one plane of 8), highest bits first:
//   1:[1] 2:[2] 3:[2,1] 4:[4] 5:[4,1] 6:[4,2] 7:[4,2,1] 8:[8]
// Plane p holds (idx >> shift[p]) & ((1 << width[p]) - 1) for every coordinate; coordinate j of a plane of
// width w sits in byte (j * w) / 8 at bit offset (j * w) % 8 (least significant bits first). A plane takes
// ceil(padded_dim * w / 8) bytes; the planes of one vector are contiguous, in order.
// bits = 0 (prod mode at 1 bit: no MSE stage) has no planes.
struct PlaneLayout {
  int bits = 0;
  int num_planes = 0;
  int width[4] = {0, 0, 0, 0};
  int shift[4] = {0, 0, 0, 0};
  std::int64_t plane_bytes[4] = {0, 0, 0, 0};
  std::int64_t plane_offset[4] = {0, 0, 0, 0};
  std::int64_t bytes_per_vector = 0;
};

// Throws ValueError for bits outside 0..8 or padded_dim < 1.
PlaneLayout plane_layout(std::int64_t padded_dim, int bits);

// One vector: idx has padded_dim entries < 2^bits; out has layout.bytes_per_vector bytes (fully written,
// unused trailing bits are zero).
void pack_indices(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* idx, std::uint8_t* out);
void unpack_indices(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* in, std::uint8_t* idx);

// Sign bits: values[j] >= 0 -> bit 1 (a NaN never reaches here: encode rejects non-finite input).
std::int64_t sign_bytes(std::int64_t m);
void pack_signs(const float* values, std::int64_t m, std::uint8_t* out);
// +1.0f for a set bit, -1.0f otherwise.
void unpack_signs(const std::uint8_t* in, std::int64_t m, float* out);

// IEEE binary16 conversion, round to nearest even; values beyond the fp16 range become +-inf.
std::uint16_t float_to_half(float value);
float half_to_float(std::uint16_t bits);

// CRC-32 (IEEE 802.3 polynomial 0xEDB88320, reflected, init and final xor 0xFFFFFFFF): "123456789" -> 0xCBF43926.
std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace rotorquant
