// CPU implementation of the quantizer engine (quantizer.hpp): parameter validation,
// encode / decode and inner products computed on the codes. Serialization lives in
// serialization.cpp, the bit layout in format.cpp.
//
// Batched entry points work on blocks of rows: one parallel pass prepares the rows
// (finite check, norms, unit vectors or centroid vectors), Rotation::apply / inverse
// rotates the whole block (itself parallel), and a second parallel pass does the
// per-row work. Scratch buffers are allocated per block and per thread chunk, never
// per row. Every row's result depends only on that row, so the codes are identical
// for any thread count.
#include "rotorquant/quantizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/random.hpp"

namespace rotorquant {
namespace {

constexpr std::int64_t kMaxQjlDim = 65536;
// The QJL matrix holds m * padded_dim floats; beyond this (1 GiB) construction is refused.
constexpr std::int64_t kMaxQjlEntries = std::int64_t{1} << 28;
// Rows per block of the batched passes (bounds the scratch memory to a few block buffers).
constexpr std::int64_t kBlockRows = 2048;
// Codes per tile in inner_product: the tile's centroid vectors stay in cache while every query visits them.
constexpr std::int64_t kCodeTile = 16;
constexpr double kSqrtHalfPi = 1.2533141373155002512078826424055;  // sqrt(pi / 2)

// Validates what the Rotation and codebook constructors do not (or not with a quantizer message)
// and returns the parameters unchanged.
const QuantizerParams& validated(const QuantizerParams& params) {
  const char* what = "Quantizer";
  if (params.dim < 1) {
    throw ValueError(detail::expected_got(std::string(what) + ": dim", ">= 1", std::to_string(params.dim)));
  }
  const int mode = static_cast<int>(params.mode);
  if (params.mode != QuantizerMode::kMSE && params.mode != QuantizerMode::kProd) {
    throw TypeError(detail::expected_got(std::string(what) + ": mode", "mse (0) or prod (1)", std::to_string(mode)));
  }
  if (params.norm_dtype != NormDtype::kFloat16 && params.norm_dtype != NormDtype::kFloat32) {
    throw TypeError(detail::expected_got(std::string(what) + ": norm_dtype", "float16 (0) or float32 (1)",
                                         std::to_string(static_cast<int>(params.norm_dtype))));
  }
  if (params.codebook != CodebookDensity::kSphere && params.codebook != CodebookDensity::kGaussian) {
    throw TypeError(detail::expected_got(std::string(what) + ": codebook", "sphere or gaussian",
                                         std::to_string(static_cast<int>(params.codebook))));
  }
  const int bits = params.bits;
  if (bits < 1 || bits > 8) {
    throw ValueError(detail::expected_got(std::string(what) + ": bits", "1..8", std::to_string(bits)));
  }
  if (params.qjl_dim < 0) {
    throw ValueError(detail::expected_got(std::string(what) + ": qjl_dim", ">= 0 (0 = padded_dim)",
                                          std::to_string(params.qjl_dim)));
  }
  if (params.mode == QuantizerMode::kMSE) {
    if (params.qjl_dim != 0) {
      throw ValueError(detail::expected_got(std::string(what) + ": qjl_dim", "0 in mse mode (no QJL stage)",
                                            std::to_string(params.qjl_dim)));
    }
  } else {
    if (params.norm_correction) {
      throw ValueError(detail::expected_got(std::string(what) + ": norm_correction",
                                            "false in prod mode (it would bias the inner-product estimator)", "true"));
    }
    if (params.qjl_dim > kMaxQjlDim) {
      throw ValueError(detail::expected_got(std::string(what) + ": qjl_dim", "<= 65536",
                                            std::to_string(params.qjl_dim)));
    }
  }
  return params;
}

// The norm value as stored: float16 or float32, little-endian. Throws ValueError when it overflows.
void store_norm(NormDtype dtype, double value, std::uint8_t* dst, const char* what, const char* name,
                std::int64_t row) {
  const float as_float = static_cast<float>(value);
  if (dtype == NormDtype::kFloat16) {
    const std::uint16_t half = float_to_half(as_float);
    if (!std::isfinite(half_to_float(half))) {
      throw ValueError(std::string(what) + ": " + name + " of row " + std::to_string(row) + " is " +
                       std::to_string(value) +
                       ", which overflows float16: expected norms <= 65504, use norm_dtype=\"float32\"");
    }
    dst[0] = static_cast<std::uint8_t>(half & 0xFFu);
    dst[1] = static_cast<std::uint8_t>(half >> 8);
  } else {
    if (!std::isfinite(as_float)) {
      throw ValueError(std::string(what) + ": " + name + " of row " + std::to_string(row) + " is " +
                       std::to_string(value) + ", which overflows float32: expected norms <= 3.4e38");
    }
    std::uint32_t word;
    std::memcpy(&word, &as_float, sizeof word);
    for (int k = 0; k < 4; ++k) dst[k] = static_cast<std::uint8_t>(word >> (8 * k));
  }
}

float load_norm(NormDtype dtype, const std::uint8_t* src) {
  if (dtype == NormDtype::kFloat16) {
    return half_to_float(static_cast<std::uint16_t>(src[0] | (static_cast<std::uint16_t>(src[1]) << 8)));
  }
  std::uint32_t word = 0;
  for (int k = 0; k < 4; ++k) word |= static_cast<std::uint32_t>(src[k]) << (8 * k);
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// A stored norm as a float; NaN/Inf/negative (corrupted codes) -> ValueError.
float checked_norm(NormDtype dtype, const std::uint8_t* src, const char* what, const char* name, std::int64_t row) {
  const float value = load_norm(dtype, src);
  if (!(std::isfinite(value) && value >= 0.0f)) {
    throw ValueError(detail::expected_got(std::string(what) + ": " + name + " of row " + std::to_string(row),
                                          "a finite value >= 0", std::to_string(value)));
  }
  return value;
}

// Dot product in float with eight independent accumulators (vectorizable, fixed order).
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

bool row_is_finite(const float* row, std::int64_t len) {
  for (std::int64_t j = 0; j < len; ++j) {
    if (!std::isfinite(row[j])) return false;
  }
  return true;
}

// Every value of the (rows, cols) array finite, else ValueError naming the first bad row found.
void check_finite_rows(const float* data, std::int64_t rows, std::int64_t cols, const char* what,
                       const char* name) {
  parallel_for(rows, cols, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      if (!row_is_finite(data + r * cols, cols)) {
        throw ValueError(std::string(what) + ": " + name + " row " + std::to_string(r) +
                         " contains non-finite values (NaN or Inf): expected finite values");
      }
    }
  });
}

void check_count(std::int64_t n, const char* what, const char* name) {
  if (n < 0) throw ValueError(detail::expected_got(std::string(what) + ": " + name, ">= 0", std::to_string(n)));
}

void check_pointer(const void* ptr, const char* what, const char* name) {
  if (ptr == nullptr) {
    throw ValueError(detail::expected_got(std::string(what) + ": " + name, "a non-null pointer", "nullptr"));
  }
}

// The arrays a batch of codes needs: indices when there is an mse stage, norms always,
// sign bits and residual norms in prod mode (CodesView or ConstCodesView).
template <typename View>
void check_code_pointers(const View& codes, bool has_indices, bool prod, const char* what) {
  if (has_indices) check_pointer(codes.indices, what, "indices");
  check_pointer(codes.norms, what, "norms");
  if (prod) {
    check_pointer(codes.qjl_signs, what, "qjl_signs");
    check_pointer(codes.residual_norms, what, "residual_norms");
  }
}

}  // namespace

Quantizer::Quantizer(const QuantizerParams& params)
    : params_(validated(params)), rotation_(params.rotation, params.dim, params.seed) {
  const std::int64_t p = rotation_.padded_dim();
  const int stage_bits = mse_bits();
  if (stage_bits > 0) {
    if (p < LloydMaxCodebook::kMinDim) {
      throw ValueError(detail::expected_got(
          "Quantizer: padded_dim (" + rotation_.kind_name() + " rotation of dim " + std::to_string(params.dim) + ")",
          ">= 2 for a codebook (use dim >= 2, or a block rotation that pads)", std::to_string(p)));
    }
    codebook_ = lloyd_max_codebook(p, stage_bits, params_.codebook);
  }
  layout_ = plane_layout(p, stage_bits);
  if (params_.mode == QuantizerMode::kProd) {
    const std::int64_t m = qjl_dim();
    if (m > kMaxQjlDim) {
      throw ValueError(detail::expected_got("Quantizer: qjl_dim (0 means padded_dim = " + std::to_string(p) + ")",
                                            "<= 65536", std::to_string(m)));
    }
    if (m * p > kMaxQjlEntries) {
      throw ValueError(detail::expected_got("Quantizer: qjl_dim * padded_dim (QJL matrix entries)",
                                            "<= 2^28 (1 GiB of float32)", std::to_string(m * p)));
    }
    qjl_matrix_.resize(static_cast<std::size_t>(m * p));
    const RandomStream stream = make_stream(params_.seed, RandomPurpose::kQJL);
    float* matrix = qjl_matrix_.data();
    parallel_for(m, p * 40, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        for (std::int64_t j = 0; j < p; ++j) {
          matrix[i * p + j] = static_cast<float>(stream.gaussian_at(static_cast<std::uint64_t>(i * p + j)));
        }
      }
    });
  }
}

int Quantizer::mse_bits() const {
  return params_.mode == QuantizerMode::kProd ? params_.bits - 1 : params_.bits;
}

std::int64_t Quantizer::qjl_dim() const {
  if (params_.mode != QuantizerMode::kProd) return 0;
  return params_.qjl_dim == 0 ? rotation_.padded_dim() : params_.qjl_dim;
}

CodeSizes Quantizer::code_sizes() const {
  CodeSizes sizes;
  sizes.index_bytes = layout_.bytes_per_vector;
  sizes.norm_bytes = norm_dtype_size(params_.norm_dtype);
  if (params_.mode == QuantizerMode::kProd) {
    sizes.sign_bytes = sign_bytes(qjl_dim());
    sizes.residual_norm_bytes = sizes.norm_bytes;
  }
  return sizes;
}

std::int64_t Quantizer::num_parameters() const {
  std::int64_t count = rotation_.num_parameters();
  if (params_.mode == QuantizerMode::kProd) count += qjl_dim() * rotation_.padded_dim();
  if (codebook_) count += codebook_->levels();
  return count;
}

void Quantizer::encode(const float* x, std::int64_t n, const CodesView& out) const {
  const char* what = "Quantizer.encode";
  check_count(n, what, "n");
  if (n == 0) return;
  const bool prod = params_.mode == QuantizerMode::kProd;
  check_pointer(x, what, "x");
  check_code_pointers(out, codebook_ != nullptr, prod, what);
  const std::int64_t d = dim(), p = padded_dim(), m = qjl_dim();
  check_finite_rows(x, n, d, what, "x");

  const CodeSizes sizes = code_sizes();
  const LloydMaxCodebook* codebook = codebook_.get();
  const float* centroids = codebook ? codebook->centroids_f32().data() : nullptr;
  const std::uint8_t zero_index = codebook ? static_cast<std::uint8_t>(codebook->quantize(0.0f)) : 0;
  const NormDtype dtype = params_.norm_dtype;
  const bool correct_norm = params_.norm_correction;
  const float* qjl = qjl_matrix_.data();

  const std::int64_t block = std::min(n, kBlockRows);
  std::vector<float> unit(static_cast<std::size_t>(block * d));
  std::vector<float> rotated(static_cast<std::size_t>(block * p));
  std::vector<double> norms(static_cast<std::size_t>(block));

  for (std::int64_t first = 0; first < n; first += block) {
    const std::int64_t rows = std::min(block, n - first);
    // Pass 1: norms (double) and unit vectors.
    parallel_for(rows, d, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t r = begin; r < end; ++r) {
        const float* row = x + (first + r) * d;
        double norm_sq = 0.0;
        for (std::int64_t j = 0; j < d; ++j) norm_sq += static_cast<double>(row[j]) * row[j];
        const double norm = std::sqrt(norm_sq);
        norms[static_cast<std::size_t>(r)] = norm;
        float* u = unit.data() + r * d;
        if (norm == 0.0) {
          std::fill(u, u + d, 0.0f);
        } else {
          for (std::int64_t j = 0; j < d; ++j) u[j] = static_cast<float>(row[j] / norm);
        }
      }
    });
    rotation_.apply(unit.data(), rotated.data(), rows);
    // Pass 2: indices, stored norm, QJL signs and residual norm per row.
    parallel_for(rows, p * (2 + m), [&](std::int64_t begin, std::int64_t end) {
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
      std::vector<float> residual(prod ? static_cast<std::size_t>(p) : 0);
      std::vector<float> projection(prod ? static_cast<std::size_t>(m) : 0);
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t row = first + r;
        const double norm = norms[static_cast<std::size_t>(r)];
        const float* y = rotated.data() + r * p;
        std::uint8_t* index_out = out.indices + row * sizes.index_bytes;
        std::uint8_t* norm_out = out.norms + row * sizes.norm_bytes;
        if (norm == 0.0) {  // the zero vector: indices of 0.0, norm 0, signs +, residual norm 0
          std::fill(idx.begin(), idx.end(), zero_index);
          if (codebook) pack_indices(layout_, p, idx.data(), index_out);
          store_norm(dtype, 0.0, norm_out, what, "norm", row);
          if (prod) {
            std::fill(projection.begin(), projection.end(), 0.0f);
            pack_signs(projection.data(), m, out.qjl_signs + row * sizes.sign_bytes);
            store_norm(dtype, 0.0, out.residual_norms + row * sizes.residual_norm_bytes, what, "residual norm", row);
          }
          continue;
        }
        double stored_norm = norm;
        if (codebook) {
          double centroid_norm_sq = 0.0;
          for (std::int64_t j = 0; j < p; ++j) {
            const int k = codebook->quantize(y[j]);
            idx[static_cast<std::size_t>(j)] = static_cast<std::uint8_t>(k);
            const double c = centroids[k];
            centroid_norm_sq += c * c;
          }
          pack_indices(layout_, p, idx.data(), index_out);
          if (correct_norm && centroid_norm_sq > 0.0) stored_norm = norm / std::sqrt(centroid_norm_sq);
        }
        store_norm(dtype, stored_norm, norm_out, what, "norm", row);
        if (!prod) continue;
        double residual_sq = 0.0;
        for (std::int64_t j = 0; j < p; ++j) {
          const float value = codebook ? y[j] - centroids[idx[static_cast<std::size_t>(j)]] : y[j];
          residual[static_cast<std::size_t>(j)] = value;
          residual_sq += static_cast<double>(value) * value;
        }
        for (std::int64_t i = 0; i < m; ++i) projection[static_cast<std::size_t>(i)] = dot(qjl + i * p, residual.data(), p);
        pack_signs(projection.data(), m, out.qjl_signs + row * sizes.sign_bytes);
        store_norm(dtype, std::sqrt(residual_sq), out.residual_norms + row * sizes.residual_norm_bytes, what,
                   "residual norm", row);
      }
    });
  }
}

void Quantizer::decode(const ConstCodesView& codes, std::int64_t n, float* out) const {
  const char* what = "Quantizer.decode";
  check_count(n, what, "n");
  if (n == 0) return;
  const bool prod = params_.mode == QuantizerMode::kProd;
  check_pointer(out, what, "out");
  check_code_pointers(codes, codebook_ != nullptr, prod, what);
  const std::int64_t d = dim(), p = padded_dim(), m = qjl_dim();
  const CodeSizes sizes = code_sizes();
  const LloydMaxCodebook* codebook = codebook_.get();
  const float* centroids = codebook ? codebook->centroids_f32().data() : nullptr;
  const NormDtype dtype = params_.norm_dtype;
  const float* qjl = qjl_matrix_.data();

  const std::int64_t block = std::min(n, kBlockRows);
  std::vector<float> rotated(static_cast<std::size_t>(block * p));
  for (std::int64_t first = 0; first < n; first += block) {
    const std::int64_t rows = std::min(block, n - first);
    // Pass 1: the rotated-space reconstruction c[idx] (+ the QJL term) of each row.
    parallel_for(rows, p * (1 + m), [&](std::int64_t begin, std::int64_t end) {
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
      std::vector<float> signs(prod ? static_cast<std::size_t>(m) : 0);
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t row = first + r;
        float* z = rotated.data() + r * p;
        if (codebook) {
          unpack_indices(layout_, p, codes.indices + row * sizes.index_bytes, idx.data());
          for (std::int64_t j = 0; j < p; ++j) z[j] = centroids[idx[static_cast<std::size_t>(j)]];
        } else {
          std::fill(z, z + p, 0.0f);
        }
        if (!prod) continue;
        const float residual_norm =
            checked_norm(dtype, codes.residual_norms + row * sizes.residual_norm_bytes, what, "residual norm", row);
        if (residual_norm == 0.0f) continue;
        unpack_signs(codes.qjl_signs + row * sizes.sign_bytes, m, signs.data());
        const float scale = static_cast<float>(residual_norm * kSqrtHalfPi / static_cast<double>(m));
        for (std::int64_t i = 0; i < m; ++i) {
          const float coefficient = scale * signs[static_cast<std::size_t>(i)];
          const float* s_row = qjl + i * p;
          for (std::int64_t j = 0; j < p; ++j) z[j] += coefficient * s_row[j];
        }
      }
    });
    float* out_block = out + first * d;
    rotation_.inverse(rotated.data(), out_block, rows);
    // Pass 2: scale by the stored norm.
    parallel_for(rows, d, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t r = begin; r < end; ++r) {
        const float norm = checked_norm(dtype, codes.norms + (first + r) * sizes.norm_bytes, what, "norm", first + r);
        float* row = out_block + r * d;
        for (std::int64_t j = 0; j < d; ++j) row[j] *= norm;
      }
    });
  }
}

void Quantizer::inner_product(const ConstCodesView& codes, std::int64_t n, const float* y, std::int64_t m_q,
                              float* out) const {
  const char* what = "Quantizer.inner_product";
  check_count(n, what, "n");
  check_count(m_q, what, "number of queries");
  if (n == 0 || m_q == 0) return;
  const bool prod = params_.mode == QuantizerMode::kProd;
  check_pointer(y, what, "y");
  check_pointer(out, what, "out");
  check_code_pointers(codes, codebook_ != nullptr, prod, what);
  const std::int64_t d = dim(), p = padded_dim(), m = qjl_dim();
  check_finite_rows(y, m_q, d, what, "y");
  const CodeSizes sizes = code_sizes();
  const LloydMaxCodebook* codebook = codebook_.get();
  const float* centroids = codebook ? codebook->centroids_f32().data() : nullptr;
  const NormDtype dtype = params_.norm_dtype;

  // Queries rotated once; in prod mode also their QJL projections t = S y~.
  std::vector<float> queries(static_cast<std::size_t>(m_q * p));
  rotation_.apply(y, queries.data(), m_q);
  std::vector<float> projected(prod ? static_cast<std::size_t>(m_q * m) : 0);
  if (prod) {
    const float* qjl = qjl_matrix_.data();
    parallel_for(m_q, m * p, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t q = begin; q < end; ++q) {
        for (std::int64_t i = 0; i < m; ++i) {
          projected[static_cast<std::size_t>(q * m + i)] = dot(qjl + i * p, queries.data() + q * p, p);
        }
      }
    });
  }
  const double qjl_scale = prod ? kSqrtHalfPi / static_cast<double>(m) : 0.0;

  // Codes in tiles: unpack each code once into its centroid vector (and sign vector), then every
  // query takes dot products with the whole tile.
  const std::int64_t tiles = (n + kCodeTile - 1) / kCodeTile;
  parallel_for(tiles, kCodeTile * m_q * (p + m), [&](std::int64_t tile_begin, std::int64_t tile_end) {
    std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
    std::vector<float> tile_centroids(codebook ? static_cast<std::size_t>(kCodeTile * p) : 0);
    std::vector<float> tile_signs(prod ? static_cast<std::size_t>(kCodeTile * m) : 0);
    float tile_norm[kCodeTile];
    float tile_qjl_coefficient[kCodeTile];
    for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const std::int64_t first = tile * kCodeTile;
      const std::int64_t count = std::min(kCodeTile, n - first);
      for (std::int64_t c = 0; c < count; ++c) {
        const std::int64_t code = first + c;
        tile_norm[c] = checked_norm(dtype, codes.norms + code * sizes.norm_bytes, what, "norm", code);
        if (codebook) {
          unpack_indices(layout_, p, codes.indices + code * sizes.index_bytes, idx.data());
          float* vec = tile_centroids.data() + c * p;
          for (std::int64_t j = 0; j < p; ++j) vec[j] = centroids[idx[static_cast<std::size_t>(j)]];
        }
        if (prod) {
          const float residual_norm =
              checked_norm(dtype, codes.residual_norms + code * sizes.residual_norm_bytes, what, "residual norm", code);
          tile_qjl_coefficient[c] = static_cast<float>(residual_norm * qjl_scale);
          unpack_signs(codes.qjl_signs + code * sizes.sign_bytes, m, tile_signs.data() + c * m);
        }
      }
      for (std::int64_t q = 0; q < m_q; ++q) {
        const float* query = queries.data() + q * p;
        const float* t = prod ? projected.data() + q * m : nullptr;
        float* out_row = out + q * n + first;
        for (std::int64_t c = 0; c < count; ++c) {
          float score = codebook ? dot(query, tile_centroids.data() + c * p, p) : 0.0f;
          if (prod) score += tile_qjl_coefficient[c] * dot(t, tile_signs.data() + c * m, m);
          out_row[c] = tile_norm[c] * score;
        }
      }
    }
  });
}

}  // namespace rotorquant
