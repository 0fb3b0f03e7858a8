// TurboQuant / RotorQuant quantizers over one engine (rotation + Lloyd-Max codebook,
// optionally + a 1-bit QJL sketch of the residual), the Codes container and its
// serialization. docs/format.md specifies the bytes.
//
// mse mode  (b bits):  u = x / ||x||, y = Pi u (padded_dim coords), idx_j = Q_b(y_j); store idx, n = ||x||.
//                      decode x^ = n * Pi^T c[idx].
//                      norm_correction: store n / ||c[idx]|| instead, so ||x^|| = ||x|| exactly.
// prod mode (b bits):  (b-1)-bit mse stage (none when b = 1), r = y - c[idx] in the rotated unit space,
//                      QJL: S (m x padded_dim, i.i.d. N(0,1), make_stream(seed, kQJL).gaussian_at(i*padded_dim + j)),
//                      store sign(S r) (m bits) and ||r||.
//                      <q, x> ~= n * ( <Pi q, c[idx]> + ||r|| * sqrt(pi/2) / m * <S Pi q, sign(S r)> )  (unbiased)
//                      decode x~ = n * Pi^T ( c[idx] + ||r|| * sqrt(pi/2) / m * S^T sign(S r) ).
// Rotation seed = seed; QJL matrix seed = seed (different stream purpose).
// Special inputs: a zero vector encodes to norm 0 (indices of 0.0, signs of +, residual norm 0) and decodes to 0;
// NaN/Inf anywhere in x -> ValueError naming the row; a norm that overflows the norm dtype -> ValueError.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rotorquant/codebook.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/rotation.hpp"

namespace rotorquant {

enum class QuantizerMode : int { kMSE = 0, kProd = 1 };
enum class NormDtype : int { kFloat16 = 0, kFloat32 = 1 };

std::string quantizer_mode_name(QuantizerMode mode);   // "mse" | "prod"
QuantizerMode parse_quantizer_mode(const std::string& name);  // TypeError on unknown
std::string norm_dtype_name(NormDtype dtype);          // "float16" | "float32"
NormDtype parse_norm_dtype(const std::string& name);   // TypeError on unknown
int norm_dtype_size(NormDtype dtype);                  // 2 | 4

struct QuantizerParams {
  std::int64_t dim = 0;
  int bits = 0;  // total bits per coordinate: mse 1..8; prod 1..8 (mse stage bits - 1)
  RotationKind rotation = RotationKind::kDense;
  QuantizerMode mode = QuantizerMode::kMSE;
  std::uint64_t seed = 0;
  CodebookDensity codebook = CodebookDensity::kSphere;
  NormDtype norm_dtype = NormDtype::kFloat16;
  bool norm_correction = false;  // mse mode only (ValueError in prod mode: it would bias the estimator)
  std::int64_t qjl_dim = 0;      // prod mode: m rows of S; 0 -> padded_dim. mse mode: must be 0.

  bool operator==(const QuantizerParams& other) const;
  bool operator!=(const QuantizerParams& other) const { return !(*this == other); }
};

// Raw views of one batch of codes (structure of arrays; see format.hpp). Sizes follow Quantizer::layout().
struct CodesView {
  std::uint8_t* indices = nullptr;         // n * index_bytes_per_vector
  std::uint8_t* norms = nullptr;           // n * norm size
  std::uint8_t* qjl_signs = nullptr;       // n * sign_bytes(m)           (prod)
  std::uint8_t* residual_norms = nullptr;  // n * norm size               (prod)
};
struct ConstCodesView {
  const std::uint8_t* indices = nullptr;
  const std::uint8_t* norms = nullptr;
  const std::uint8_t* qjl_signs = nullptr;
  const std::uint8_t* residual_norms = nullptr;
};

struct CodeSizes {
  std::int64_t index_bytes = 0;          // per vector
  std::int64_t norm_bytes = 0;           // per vector
  std::int64_t sign_bytes = 0;           // per vector (0 in mse mode)
  std::int64_t residual_norm_bytes = 0;  // per vector (0 in mse mode)
  std::int64_t total() const { return index_bytes + norm_bytes + sign_bytes + residual_norm_bytes; }
};

class Quantizer {
 public:
  // Validates every parameter (ValueError / TypeError with expected vs got).
  explicit Quantizer(const QuantizerParams& params);

  const QuantizerParams& params() const { return params_; }
  std::int64_t dim() const { return params_.dim; }
  std::int64_t padded_dim() const { return rotation_.padded_dim(); }
  int mse_bits() const;             // bits (mse) or bits - 1 (prod)
  std::int64_t qjl_dim() const;     // m (prod), 0 (mse)
  const Rotation& rotation() const { return rotation_; }
  // The codebook of the mse stage (nullptr when mse_bits() == 0).
  const LloydMaxCodebook* codebook() const { return codebook_.get(); }
  const PlaneLayout& layout() const { return layout_; }
  CodeSizes code_sizes() const;
  // The QJL matrix S (qjl_dim() x padded_dim() row-major float32; empty in mse mode).
  const std::vector<float>& qjl_matrix() const { return qjl_matrix_; }
  // Parameters held: rotation parameters + QJL matrix entries (m * padded_dim) + codebook centroids.
  std::int64_t num_parameters() const;

  // x: (n, dim) float32 row-major -> codes. Threads over rows; no per-row heap allocation.
  void encode(const float* x, std::int64_t n, const CodesView& out) const;
  // codes -> (n, dim) float32.
  void decode(const ConstCodesView& codes, std::int64_t n, float* out) const;
  // queries y: (m, dim) float32 -> out (m, n): estimates of <y_i, x_j>, computed on the codes
  // (queries rotated once; centroid lookups; the QJL term in prod mode). Never decodes the set.
  void inner_product(const ConstCodesView& codes, std::int64_t n, const float* y, std::int64_t m, float* out) const;

  // Serialization of the quantizer (parameters only: everything else is derived from them).
  std::vector<std::uint8_t> to_bytes() const;
  static QuantizerParams params_from_bytes(const std::uint8_t* data, std::size_t size);  // ValueError on bad input

 private:
  QuantizerParams params_;
  Rotation rotation_;
  std::shared_ptr<const LloydMaxCodebook> codebook_;
  PlaneLayout layout_;
  std::vector<float> qjl_matrix_;  // m x padded_dim row-major (prod)
};

// Serialized codes: header (magic "RQCODES1", format version, parameters, n, section sizes), the four
// arrays, and a CRC-32 of everything before it. Truncated, corrupted or inconsistent input -> ValueError.
std::vector<std::uint8_t> codes_to_bytes(const QuantizerParams& params, std::int64_t n, const ConstCodesView& codes);

struct DecodedCodes {
  QuantizerParams params;
  std::int64_t n = 0;
  std::vector<std::uint8_t> indices, norms, qjl_signs, residual_norms;
};
DecodedCodes codes_from_bytes(const std::uint8_t* data, std::size_t size);

constexpr std::uint32_t kFormatVersion = 1;

}  // namespace rotorquant
