// Enum names, parameter equality and the serialized forms of a quantizer and of a batch of codes
// (docs/format.md, version 1). Every integer is written byte by byte, little-endian, so the bytes
// do not depend on the host's endianness or struct layout.
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rotorquant/error.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/quantizer.hpp"
#include "rotorquant/rotation.hpp"

namespace rotorquant {
namespace {

constexpr char kQuantizerMagic[8] = {'R', 'Q', 'Q', 'U', 'A', 'N', 'T', '1'};
constexpr char kCodesMagic[8] = {'R', 'Q', 'C', 'O', 'D', 'E', 'S', '1'};

// magic 8 + version 4
constexpr std::size_t kPreambleBytes = 12;
// dim 8, bits 1, rotation 1, mode 1, codebook 1, norm dtype 1, norm_correction 1, reserved 2, seed 8, qjl_dim 8
constexpr std::size_t kParamsBytes = 32;
constexpr std::size_t kChecksumBytes = 4;
constexpr std::size_t kQuantizerBlobBytes = kPreambleBytes + kParamsBytes + kChecksumBytes;  // 48
// preamble, params, n 8, four section sizes 4 * 8
constexpr std::size_t kCodesHeaderBytes = kPreambleBytes + kParamsBytes + 8 + 4 * 8;  // 84

// Largest qjl_dim accepted (keeps every size product far from overflow; far above any real use).
constexpr std::int64_t kMaxQjlDim = std::int64_t{1} << 40;

// ---- little-endian writer / bounds-checked reader --------------------------------

class ByteWriter {
 public:
  explicit ByteWriter(std::size_t reserve) { bytes_.reserve(reserve); }
  void put_bytes(const void* data, std::size_t size) {
    const auto* p = static_cast<const std::uint8_t*>(data);
    bytes_.insert(bytes_.end(), p, p + size);
  }
  void put_u8(std::uint8_t v) { bytes_.push_back(v); }
  void put_u16(std::uint16_t v) { put_le(v, 2); }
  void put_u32(std::uint32_t v) { put_le(v, 4); }
  void put_u64(std::uint64_t v) { put_le(v, 8); }
  std::vector<std::uint8_t>& bytes() { return bytes_; }

 private:
  void put_le(std::uint64_t v, int count) {
    for (int i = 0; i < count; ++i) bytes_.push_back(static_cast<std::uint8_t>((v >> (8 * i)) & 0xFFu));
  }
  std::vector<std::uint8_t> bytes_;
};

// Reads fixed-width little-endian fields; the callers check the total size first, and every
// read is checked again so that nothing is ever read past `size`.
class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size, const char* what) : data_(data), size_(size), what_(what) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(le(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(le(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(le(4)); }
  std::uint64_t u64() { return le(8); }
  std::size_t position() const { return position_; }

 private:
  std::uint64_t le(std::size_t count) {
    if (count > size_ - position_) {
      throw ValueError(detail::expected_got(std::string(what_) + ": truncated header",
                                            "at least " + std::to_string(position_ + count) + " bytes",
                                            std::to_string(size_) + " bytes"));
    }
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < count; ++i) v |= static_cast<std::uint64_t>(data_[position_ + i]) << (8 * i);
    position_ += count;
    return v;
  }
  const std::uint8_t* data_;
  std::size_t size_;
  const char* what_;
  std::size_t position_ = 0;
};

// ---- checked arithmetic ------------------------------------------------------------

std::int64_t checked_mul(std::int64_t a, std::int64_t b, const std::string& what) {
  // a, b >= 0 here
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a) {
    throw ValueError(detail::expected_got(what, "a size below 2^63 bytes",
                                          std::to_string(a) + " * " + std::to_string(b) + " (overflow)"));
  }
  return a * b;
}

std::uint64_t checked_add_u64(std::uint64_t a, std::uint64_t b, const std::string& what) {
  if (b > std::numeric_limits<std::uint64_t>::max() - a) {
    throw ValueError(detail::expected_got(what, "a size below 2^64 bytes",
                                          std::to_string(a) + " + " + std::to_string(b) + " (overflow)"));
  }
  return a + b;
}

// ---- parameters ----------------------------------------------------------------------

std::string byte_string(const std::uint8_t* data, std::size_t size) {
  std::string out = "\"";
  static const char* hex = "0123456789abcdef";
  for (std::size_t i = 0; i < size; ++i) {
    const std::uint8_t c = data[i];
    if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out + "\"";
}

// Validates what the format itself needs (ranges, consistency of mode-specific fields);
// the Quantizer constructor checks the rest (codebook dimension limits...).
void validate_params(const QuantizerParams& p, const std::string& what) {
  const int rotation = static_cast<int>(p.rotation);
  if (rotation < 0 || rotation > 6) {
    throw ValueError(detail::expected_got(what + ": rotation kind", "0..6", std::to_string(rotation)));
  }
  const int mode = static_cast<int>(p.mode);
  if (mode < 0 || mode > 1) {
    throw ValueError(detail::expected_got(what + ": mode", "0 (mse) or 1 (prod)", std::to_string(mode)));
  }
  const int codebook = static_cast<int>(p.codebook);
  if (codebook < 0 || codebook > 1) {
    throw ValueError(
        detail::expected_got(what + ": codebook density", "0 (sphere) or 1 (gaussian)", std::to_string(codebook)));
  }
  const int norm_dtype = static_cast<int>(p.norm_dtype);
  if (norm_dtype < 0 || norm_dtype > 1) {
    throw ValueError(
        detail::expected_got(what + ": norm dtype", "0 (float16) or 1 (float32)", std::to_string(norm_dtype)));
  }
  if (p.bits < 1 || p.bits > 8) {
    throw ValueError(detail::expected_got(what + ": bits", "1..8 for " + quantizer_mode_name(p.mode) + " mode",
                                          std::to_string(p.bits)));
  }
  if (p.dim < 1) throw ValueError(detail::expected_got(what + ": dim", ">= 1", std::to_string(p.dim)));
  // Rotation-specific dimension limits (ValueError).
  (void)rotation_padded_dim(p.rotation, p.dim);
  if (p.mode == QuantizerMode::kMSE) {
    if (p.qjl_dim != 0) {
      throw ValueError(detail::expected_got(what + ": qjl_dim", "0 in mse mode", std::to_string(p.qjl_dim)));
    }
  } else {
    if (p.norm_correction) {
      throw ValueError(detail::expected_got(what + ": norm_correction", "false in prod mode", "true"));
    }
    if (p.qjl_dim < 0 || p.qjl_dim > kMaxQjlDim) {
      throw ValueError(detail::expected_got(what + ": qjl_dim", "0..2^40 (0: padded_dim)", std::to_string(p.qjl_dim)));
    }
  }
}

void write_params(ByteWriter& w, const QuantizerParams& p) {
  w.put_u64(static_cast<std::uint64_t>(p.dim));
  w.put_u8(static_cast<std::uint8_t>(p.bits));
  w.put_u8(static_cast<std::uint8_t>(static_cast<int>(p.rotation)));
  w.put_u8(static_cast<std::uint8_t>(static_cast<int>(p.mode)));
  w.put_u8(static_cast<std::uint8_t>(p.codebook == CodebookDensity::kGaussian ? 1 : 0));
  w.put_u8(static_cast<std::uint8_t>(static_cast<int>(p.norm_dtype)));
  w.put_u8(static_cast<std::uint8_t>(p.norm_correction ? 1 : 0));
  w.put_u16(0);  // reserved
  w.put_u64(p.seed);
  w.put_u64(static_cast<std::uint64_t>(p.qjl_dim));
}

// Reads and validates the parameter block.
QuantizerParams read_params(ByteReader& r, const std::string& what) {
  QuantizerParams p;
  const std::uint64_t dim = r.u64();
  const int bits = r.u8();
  const int rotation = r.u8();
  const int mode = r.u8();
  const int codebook = r.u8();
  const int norm_dtype = r.u8();
  const int norm_correction = r.u8();
  const int reserved = r.u16();
  const std::uint64_t seed = r.u64();
  const std::uint64_t qjl_dim = r.u64();

  if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw ValueError(detail::expected_got(what + ": dim", "< 2^63", std::to_string(dim)));
  }
  if (rotation > 6) throw ValueError(detail::expected_got(what + ": rotation kind", "0..6", std::to_string(rotation)));
  if (mode > 1) throw ValueError(detail::expected_got(what + ": mode", "0 (mse) or 1 (prod)", std::to_string(mode)));
  if (codebook > 1) {
    throw ValueError(
        detail::expected_got(what + ": codebook density", "0 (sphere) or 1 (gaussian)", std::to_string(codebook)));
  }
  if (norm_dtype > 1) {
    throw ValueError(
        detail::expected_got(what + ": norm dtype", "0 (float16) or 1 (float32)", std::to_string(norm_dtype)));
  }
  if (norm_correction > 1) {
    throw ValueError(detail::expected_got(what + ": norm_correction", "0 or 1", std::to_string(norm_correction)));
  }
  if (reserved != 0) throw ValueError(detail::expected_got(what + ": reserved field", "0", std::to_string(reserved)));
  if (qjl_dim > static_cast<std::uint64_t>(kMaxQjlDim)) {
    throw ValueError(detail::expected_got(what + ": qjl_dim", "0..2^40", std::to_string(qjl_dim)));
  }
  p.dim = static_cast<std::int64_t>(dim);
  p.bits = bits;
  p.rotation = static_cast<RotationKind>(rotation);
  p.mode = static_cast<QuantizerMode>(mode);
  p.codebook = codebook == 1 ? CodebookDensity::kGaussian : CodebookDensity::kSphere;
  p.norm_dtype = static_cast<NormDtype>(norm_dtype);
  p.norm_correction = norm_correction == 1;
  p.seed = seed;
  p.qjl_dim = static_cast<std::int64_t>(qjl_dim);
  validate_params(p, what);
  return p;
}

// Checks the magic and the version; `other_magic` names the other kind of blob for a helpful message.
void check_preamble(const std::uint8_t* data, std::size_t size, const char (&magic)[8], const char (&other_magic)[8],
                    const std::string& what, const std::string& not_this, const std::string& is_other,
                    std::size_t minimum_size) {
  if (size > 0 && data == nullptr) {
    throw ValueError(detail::expected_got(what + ": data", "a non-null pointer", "null with size " + std::to_string(size)));
  }
  if (size < sizeof magic) {
    throw ValueError(detail::expected_got(what + ": too short", "at least " + std::to_string(minimum_size) + " bytes",
                                          std::to_string(size) + " bytes"));
  }
  if (std::memcmp(data, magic, sizeof magic) != 0) {
    const std::string expected = byte_string(reinterpret_cast<const std::uint8_t*>(magic), sizeof magic);
    const std::string got = byte_string(data, sizeof magic);
    if (std::memcmp(data, other_magic, sizeof other_magic) == 0) {
      throw ValueError(detail::expected_got(is_other + ": magic", expected, got));
    }
    throw ValueError(detail::expected_got(not_this + ": magic", expected, got));
  }
  if (size < kPreambleBytes) {
    throw ValueError(detail::expected_got(what + ": too short", "at least " + std::to_string(minimum_size) + " bytes",
                                          std::to_string(size) + " bytes"));
  }
  std::uint32_t version = 0;
  for (int i = 0; i < 4; ++i) version |= static_cast<std::uint32_t>(data[8 + i]) << (8 * i);
  if (version != kFormatVersion) {
    throw ValueError(detail::expected_got(what + ": unsupported format version", std::to_string(kFormatVersion),
                                          std::to_string(version)));
  }
  if (size < minimum_size) {
    throw ValueError(detail::expected_got(what + ": too short (truncated header)",
                                          "at least " + std::to_string(minimum_size) + " bytes",
                                          std::to_string(size) + " bytes"));
  }
}

void check_checksum(const std::uint8_t* data, std::size_t size, const std::string& what) {
  const std::size_t body = size - kChecksumBytes;
  std::uint32_t stored = 0;
  for (int i = 0; i < 4; ++i) stored |= static_cast<std::uint32_t>(data[body + i]) << (8 * i);
  const std::uint32_t computed = crc32(data, body);
  if (stored != computed) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "CRC-32 0x%08x, stored 0x%08x", computed, stored);
    throw ValueError(what + ": checksum mismatch: data corrupted (computed " + buf + ")");
  }
}

// Bytes per vector of each section.
CodeSizes section_sizes(const QuantizerParams& p) {
  const std::int64_t padded_dim = rotation_padded_dim(p.rotation, p.dim);
  const int mse_bits = p.mode == QuantizerMode::kMSE ? p.bits : p.bits - 1;
  CodeSizes sizes;
  sizes.index_bytes = plane_layout(padded_dim, mse_bits).bytes_per_vector;
  sizes.norm_bytes = norm_dtype_size(p.norm_dtype);
  if (p.mode == QuantizerMode::kProd) {
    const std::int64_t m = p.qjl_dim != 0 ? p.qjl_dim : padded_dim;
    sizes.sign_bytes = sign_bytes(m);
    sizes.residual_norm_bytes = sizes.norm_bytes;
  }
  return sizes;
}

const char* const kSectionNames[4] = {"indices", "norms", "qjl_signs", "residual_norms"};

}  // namespace

// ---- enum names ----------------------------------------------------------------------

std::string quantizer_mode_name(QuantizerMode mode) {
  switch (mode) {
    case QuantizerMode::kMSE: return "mse";
    case QuantizerMode::kProd: return "prod";
  }
  throw TypeError(detail::expected_got("quantizer mode", "a QuantizerMode (0 mse, 1 prod)",
                                       std::to_string(static_cast<int>(mode))));
}

QuantizerMode parse_quantizer_mode(const std::string& name) {
  if (name == "mse") return QuantizerMode::kMSE;
  if (name == "prod") return QuantizerMode::kProd;
  throw TypeError(detail::expected_got("quantizer mode", "one of mse, prod", "'" + name + "'"));
}

std::string norm_dtype_name(NormDtype dtype) {
  switch (dtype) {
    case NormDtype::kFloat16: return "float16";
    case NormDtype::kFloat32: return "float32";
  }
  throw TypeError(detail::expected_got("norm dtype", "a NormDtype (0 float16, 1 float32)",
                                       std::to_string(static_cast<int>(dtype))));
}

NormDtype parse_norm_dtype(const std::string& name) {
  if (name == "float16") return NormDtype::kFloat16;
  if (name == "float32") return NormDtype::kFloat32;
  throw TypeError(detail::expected_got("norm dtype", "one of float16, float32", "'" + name + "'"));
}

int norm_dtype_size(NormDtype dtype) {
  switch (dtype) {
    case NormDtype::kFloat16: return 2;
    case NormDtype::kFloat32: return 4;
  }
  throw TypeError(detail::expected_got("norm dtype", "a NormDtype (0 float16, 1 float32)",
                                       std::to_string(static_cast<int>(dtype))));
}

bool QuantizerParams::operator==(const QuantizerParams& other) const {
  return dim == other.dim && bits == other.bits && rotation == other.rotation && mode == other.mode &&
         seed == other.seed && codebook == other.codebook && norm_dtype == other.norm_dtype &&
         norm_correction == other.norm_correction && qjl_dim == other.qjl_dim;
}

// ---- quantizer blob ------------------------------------------------------------------

std::vector<std::uint8_t> Quantizer::to_bytes() const {
  validate_params(params_, "Quantizer.to_bytes");
  ByteWriter w(kQuantizerBlobBytes);
  w.put_bytes(kQuantizerMagic, sizeof kQuantizerMagic);
  w.put_u32(kFormatVersion);
  write_params(w, params_);
  w.put_u32(crc32(w.bytes().data(), w.bytes().size()));
  return std::move(w.bytes());
}

QuantizerParams Quantizer::params_from_bytes(const std::uint8_t* data, std::size_t size) {
  const std::string what = "rotorquant quantizer";
  check_preamble(data, size, kQuantizerMagic, kCodesMagic, what, "not a rotorquant quantizer",
                 "this is codes, not a quantizer", kQuantizerBlobBytes);
  if (size != kQuantizerBlobBytes) {
    throw ValueError(detail::expected_got(what + ": size (trailing bytes)", std::to_string(kQuantizerBlobBytes) + " bytes",
                                          std::to_string(size) + " bytes"));
  }
  check_checksum(data, size, what);
  ByteReader r(data, size - kChecksumBytes, what.c_str());
  r.u64();  // magic
  r.u32();  // version
  return read_params(r, what);
}

// ---- codes blob -----------------------------------------------------------------------

std::vector<std::uint8_t> codes_to_bytes(const QuantizerParams& params, std::int64_t n, const ConstCodesView& codes) {
  const std::string what = "codes_to_bytes";
  validate_params(params, what);
  if (n < 0) throw ValueError(detail::expected_got(what + ": n", ">= 0", std::to_string(n)));
  const CodeSizes per_vector = section_sizes(params);
  const std::int64_t per[4] = {per_vector.index_bytes, per_vector.norm_bytes, per_vector.sign_bytes,
                               per_vector.residual_norm_bytes};
  const std::uint8_t* sources[4] = {codes.indices, codes.norms, codes.qjl_signs, codes.residual_norms};
  std::int64_t section[4];
  std::uint64_t total = kCodesHeaderBytes + kChecksumBytes;
  for (int s = 0; s < 4; ++s) {
    section[s] = checked_mul(n, per[s], what + ": " + kSectionNames[s] + " bytes");
    if (section[s] > 0 && sources[s] == nullptr) {
      throw ValueError(detail::expected_got(what + ": " + kSectionNames[s], "a non-null pointer when n > 0", "null"));
    }
    total = checked_add_u64(total, static_cast<std::uint64_t>(section[s]), what + ": total bytes");
  }
  if (total > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
      total > std::numeric_limits<std::size_t>::max()) {
    throw ValueError(detail::expected_got(what + ": total bytes", "a size this machine can hold", std::to_string(total)));
  }
  ByteWriter w(static_cast<std::size_t>(total));
  w.put_bytes(kCodesMagic, sizeof kCodesMagic);
  w.put_u32(kFormatVersion);
  write_params(w, params);
  w.put_u64(static_cast<std::uint64_t>(n));
  for (int s = 0; s < 4; ++s) w.put_u64(static_cast<std::uint64_t>(section[s]));
  for (int s = 0; s < 4; ++s) {
    if (section[s] > 0) w.put_bytes(sources[s], static_cast<std::size_t>(section[s]));
  }
  w.put_u32(crc32(w.bytes().data(), w.bytes().size()));
  return std::move(w.bytes());
}

DecodedCodes codes_from_bytes(const std::uint8_t* data, std::size_t size) {
  const std::string what = "rotorquant codes";
  const std::size_t minimum = kCodesHeaderBytes + kChecksumBytes;
  check_preamble(data, size, kCodesMagic, kQuantizerMagic, what, "not rotorquant codes",
                 "this is a quantizer, not codes", minimum);

  // Header fields are read raw first: the size and the checksum are checked before their
  // meaning, so random corruption is reported as such.
  ByteReader header(data, kCodesHeaderBytes, what.c_str());
  header.u64();  // magic
  header.u32();  // version
  ByteReader params_reader = header;  // parsed below, after the checksum
  for (std::size_t i = 0; i < kParamsBytes; ++i) header.u8();
  const std::uint64_t n_raw = header.u64();
  std::uint64_t section_raw[4];
  std::uint64_t expected_total = kCodesHeaderBytes + kChecksumBytes;
  for (int s = 0; s < 4; ++s) {
    section_raw[s] = header.u64();
    expected_total = checked_add_u64(expected_total, section_raw[s], what + ": total size from the header");
  }
  if (expected_total != size) {
    throw ValueError(detail::expected_got(
        what + ": size (" + std::string(size < expected_total ? "truncated" : "trailing bytes") + ")",
        std::to_string(expected_total) + " bytes (header, sections and checksum)", std::to_string(size) + " bytes"));
  }
  check_checksum(data, size, what);

  DecodedCodes out;
  out.params = read_params(params_reader, what);
  if (n_raw > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw ValueError(detail::expected_got(what + ": n", "< 2^63", std::to_string(n_raw)));
  }
  out.n = static_cast<std::int64_t>(n_raw);
  const CodeSizes per_vector = section_sizes(out.params);
  const std::int64_t per[4] = {per_vector.index_bytes, per_vector.norm_bytes, per_vector.sign_bytes,
                               per_vector.residual_norm_bytes};
  for (int s = 0; s < 4; ++s) {
    const std::int64_t expected = checked_mul(out.n, per[s], what + ": " + kSectionNames[s] + " bytes");
    if (static_cast<std::uint64_t>(expected) != section_raw[s]) {
      throw ValueError(detail::expected_got(
          what + ": " + kSectionNames[s] + " section size",
          std::to_string(expected) + " bytes (n = " + std::to_string(out.n) + " x " + std::to_string(per[s]) + ")",
          std::to_string(section_raw[s]) + " bytes"));
    }
  }
  std::vector<std::uint8_t>* targets[4] = {&out.indices, &out.norms, &out.qjl_signs, &out.residual_norms};
  std::size_t offset = kCodesHeaderBytes;
  for (int s = 0; s < 4; ++s) {
    const std::size_t bytes = static_cast<std::size_t>(section_raw[s]);
    targets[s]->assign(data + offset, data + offset + bytes);
    offset += bytes;
  }
  return out;
}

}  // namespace rotorquant
