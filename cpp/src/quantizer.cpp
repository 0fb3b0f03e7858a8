// CPU implementation of the quantizer engine (quantizer.hpp): parameter validation,
// encode / decode and inner products computed on the codes. Serialization lives in
// serialization.cpp, the bit layout in format.cpp.
//
// Batched entry points split the rows over threads; each thread walks its rows in tiles of kTileRows
// through the CPU kernels (detail/kernels.hpp: normalize -> rotate -> quantize -> pack while the tile is in
// cache), with scratch buffers allocated once per thread chunk, never per row. The encode arithmetic is the
// canonical one of docs/format.md ("Canonical encode arithmetic"); every row's codes depend only on that
// row, so they are identical for any thread count, batch size and kernel build.
#include "rotorquant/quantizer.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/random.hpp"

namespace rotorquant {
namespace {

constexpr std::int64_t kMaxQjlDim = 65536;
// The QJL matrix holds m * padded_dim floats; beyond this (1 GiB) construction is refused.
constexpr std::int64_t kMaxQjlEntries = std::int64_t{1} << 28;
// Rows per tile of the fused per-thread passes (a tile's buffers stay in the L1/L2 cache at d = 128).
constexpr std::int64_t kTileRows = 32;
// Codes per tile in inner_product, and queries per pass (the kernels' column width: a multiple of 16).
constexpr std::int64_t kCodeTile = 64;
constexpr std::int64_t kQueryChunk = 32;
// Up to this many queries, inner_product takes per-pair dot products instead of the gemm micro-kernel.
constexpr std::int64_t kFewQueries = 3;
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
    if ((half & 0x7C00u) == 0x7C00u) {  // exponent all ones: inf (or NaN)
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

bool row_is_finite(const float* row, std::int64_t len) {
  std::uint32_t any_exponent_all_ones = 0;  // branch-free: some value has exponent 0xFF (Inf or NaN)
  for (std::int64_t j = 0; j < len; ++j) {
    std::uint32_t bits;
    std::memcpy(&bits, row + j, sizeof bits);
    any_exponent_all_ones |= (bits & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
  }
  return any_exponent_all_ones == 0;
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

// Sign bits of values (bit i set when values[i] >= 0), as pack_signs.
void pack_sign_bits(const float* values, std::int64_t m, std::uint8_t* out) {
  const std::int64_t full = m / 8;
  for (std::int64_t b = 0; b < full; ++b) {
    unsigned byte = 0;
    for (int k = 0; k < 8; ++k) byte |= (values[8 * b + k] >= 0.0f ? 1u : 0u) << k;
    out[b] = static_cast<std::uint8_t>(byte);
  }
  if (full * 8 < m) {
    unsigned byte = 0;
    for (std::int64_t j = full * 8; j < m; ++j) byte |= (values[j] >= 0.0f ? 1u : 0u) << (j - full * 8);
    out[full] = static_cast<std::uint8_t>(byte);
  }
}

// Double sum of squares in four interleaved partial sums (the specification allows any order here).
double sum_of_squares(const float* v, std::int64_t len) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  std::int64_t j = 0;
  for (; j + 4 <= len; j += 4) {
    for (int k = 0; k < 4; ++k) acc[k] += static_cast<double>(v[j + k]) * static_cast<double>(v[j + k]);
  }
  for (; j < len; ++j) acc[0] += static_cast<double>(v[j]) * static_cast<double>(v[j]);
  return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

// Tiles of rows handed to worker threads on demand (a loaded core takes fewer tiles). Each tile's result
// depends only on its rows, so the split never changes the output.
class TileQueue {
 public:
  TileQueue(std::int64_t n, std::int64_t tile) : n_(n), tile_(tile) {}
  bool pop(std::int64_t* first, std::int64_t* rows) {
    const std::int64_t begin = next_.fetch_add(tile_);
    if (begin >= n_) return false;
    *first = begin;
    *rows = std::min(tile_, n_ - begin);
    return true;
  }

 private:
  std::int64_t n_, tile_;
  std::atomic<std::int64_t> next_{0};
};

// Runs worker(queue) on as many threads as the work deserves (one when n * row_cost is small).
template <typename Worker>
void run_tiles(std::int64_t n, std::int64_t tile, std::int64_t row_cost, const Worker& worker) {
  TileQueue queue(n, tile);
  const std::int64_t tiles = (n + tile - 1) / tile;
  const std::int64_t by_work = std::max<std::int64_t>(1, n * std::max<std::int64_t>(row_cost, 1) / (1 << 17));
  const std::int64_t workers =
      std::max<std::int64_t>(1, std::min<std::int64_t>({static_cast<std::int64_t>(num_threads()), tiles, by_work}));
  constexpr std::int64_t kOneWorkerEach = std::int64_t{1} << 24;  // makes parallel_for start `workers` threads
  parallel_for(workers, kOneWorkerEach, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t w = begin; w < end; ++w) worker(queue);
  });
}

}  // namespace

namespace detail {

struct QuantizerTables {
  std::vector<float> qjl_transposed;    // prod: S^T, padded_dim x m
};

}  // namespace detail

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
  auto tables = std::make_shared<detail::QuantizerTables>();
  if (params_.mode == QuantizerMode::kProd) {
    const std::int64_t m = qjl_dim();
    tables->qjl_transposed.resize(qjl_matrix_.size());
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t j = 0; j < p; ++j) tables->qjl_transposed[j * m + i] = qjl_matrix_[i * p + j];
    }
  }
  tables_ = std::move(tables);
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

  const CodeSizes sizes = code_sizes();
  const LloydMaxCodebook* codebook = codebook_.get();
  const float* centroids = codebook ? codebook->centroids_f32().data() : nullptr;
  const float* boundaries = codebook ? codebook->boundaries_f32().data() : nullptr;
  const int num_boundaries = codebook ? codebook->levels() - 1 : 0;
  const std::uint8_t zero_index = codebook ? static_cast<std::uint8_t>(codebook->quantize(0.0f)) : 0;
  const NormDtype dtype = params_.norm_dtype;
  const bool correct_norm = params_.norm_correction;
  const detail::QuantizerTables& tables = *tables_;
  const detail::Kernels& kernels = detail::kernels();

  const bool identity = params_.rotation == RotationKind::kIdentity;  // then p == d
  // mse mode without norm correction needs no index bytes: quantize and pack in one kernel pass.
  const bool pack_in_quantize = codebook != nullptr && !prod && !correct_norm;
  const std::int64_t row_cost = d * (params_.rotation == RotationKind::kDense ? p : 8) + p * (4 + m);
  const std::int64_t tile = std::min(kTileRows, n);
  run_tiles(n, tile, row_cost, [&](TileQueue& queue) {
    std::vector<double> norms(static_cast<std::size_t>(tile));
    std::vector<float> unit(static_cast<std::size_t>(tile * d));
    std::vector<float> rotated(static_cast<std::size_t>(tile * p));
    std::vector<std::uint8_t> idx(static_cast<std::size_t>(tile * p));
    std::vector<float> residual(prod ? static_cast<std::size_t>(tile * p) : 0);
    std::vector<float> projection(prod ? static_cast<std::size_t>(tile * m) : 0);
    std::vector<double> residual_norms(prod ? static_cast<std::size_t>(tile) : 0);
    // Each worker takes its next tile before computing the current one, so that normalize can prefetch it.
    std::int64_t first = 0, rows = 0, next_first = 0, next_rows = 0;
    bool have_next = queue.pop(&next_first, &next_rows);
    while (have_next) {
      first = next_first;
      rows = next_rows;
      have_next = queue.pop(&next_first, &next_rows);
      const float* x_tile = x + first * d;
      // 1. norms and unit vectors (canonical). A row holding NaN or Inf, and only such a row, gets a non-finite
      // norm (squares of finite floats summed in double cannot overflow): the finiteness check costs no pass.
      kernels.normalize(x_tile, d, rows, norms.data(), unit.data(), d, have_next ? x + next_first * d : nullptr,
                        have_next ? next_rows : 0);
      for (std::int64_t r = 0; r < rows; ++r) {
        if (!std::isfinite(norms[static_cast<std::size_t>(r)])) {
          throw ValueError(std::string(what) + ": x row " + std::to_string(first + r) +
                           " contains non-finite values (NaN or Inf): expected finite values");
        }
      }
      // 2. rotation (identity: the unit vectors themselves), 3. indices (canonical), packed in the same pass
      // when nothing else needs the index bytes.
      const float* y_tile = rotated.data();
      if (identity) {
        y_tile = unit.data();
      } else {
        rotation_.apply_rows(unit.data(), rotated.data(), rows);
      }
      if (pack_in_quantize) {
        kernels.quantize_pack(y_tile, p, rows, boundaries, num_boundaries, layout_, idx.data(),
                              out.indices + first * sizes.index_bytes, sizes.index_bytes);
      } else if (codebook) {
        kernels.quantize(y_tile, rows * p, boundaries, num_boundaries, idx.data());
      }
      // 4. prod: residual r = y - c[idx] and its sign sketch sign(S r).
      if (prod) {
        for (std::int64_t r = 0; r < rows; ++r) {
          const float* y = y_tile + r * p;
          float* res = residual.data() + r * p;
          if (codebook) {
            const std::uint8_t* row_idx = idx.data() + r * p;
            for (std::int64_t j = 0; j < p; ++j) res[j] = y[j] - centroids[row_idx[j]];
          } else {
            std::memcpy(res, y, static_cast<std::size_t>(p) * sizeof(float));
          }
          residual_norms[static_cast<std::size_t>(r)] = std::sqrt(sum_of_squares(res, p));
        }
        kernels.gemm(tables.qjl_transposed.data(), p, m, residual.data(), p, projection.data(), m, rows);
      }
      // 5. bytes of every row.
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t row = first + r;
        const double norm = norms[static_cast<std::size_t>(r)];
        std::uint8_t* row_idx = idx.data() + r * p;
        std::uint8_t* index_out = out.indices + row * sizes.index_bytes;
        std::uint8_t* norm_out = out.norms + row * sizes.norm_bytes;
        if (norm == 0.0) {  // the zero vector: indices of 0.0, norm 0, signs +, residual norm 0
          if (codebook) {
            std::memset(row_idx, zero_index, static_cast<std::size_t>(p));
            detail::pack_indices_fast(layout_, p, row_idx, index_out);
          }
          store_norm(dtype, 0.0, norm_out, what, "norm", row);
          if (prod) {
            std::memset(out.qjl_signs + row * sizes.sign_bytes, 0xFF, static_cast<std::size_t>(sizes.sign_bytes));
            if (m % 8 != 0) out.qjl_signs[row * sizes.sign_bytes + sizes.sign_bytes - 1] = static_cast<std::uint8_t>((1u << (m % 8)) - 1u);
            store_norm(dtype, 0.0, out.residual_norms + row * sizes.residual_norm_bytes, what, "residual norm", row);
          }
          continue;
        }
        double stored_norm = norm;
        if (codebook && !pack_in_quantize) {
          detail::pack_indices_fast(layout_, p, row_idx, index_out);
          if (correct_norm) {
            double acc[4] = {0.0, 0.0, 0.0, 0.0};
            for (std::int64_t j = 0; j < p; ++j) {
              const double c = centroids[row_idx[j]];
              acc[j & 3] += c * c;
            }
            const double centroid_norm_sq = (acc[0] + acc[2]) + (acc[1] + acc[3]);
            if (centroid_norm_sq > 0.0) stored_norm = norm / std::sqrt(centroid_norm_sq);
          }
        }
        store_norm(dtype, stored_norm, norm_out, what, "norm", row);
        if (!prod) continue;
        pack_sign_bits(projection.data() + r * m, m, out.qjl_signs + row * sizes.sign_bytes);
        store_norm(dtype, residual_norms[static_cast<std::size_t>(r)],
                   out.residual_norms + row * sizes.residual_norm_bytes, what, "residual norm", row);
      }
    }
  });
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
  const int levels = codebook ? codebook->levels() : 0;
  const NormDtype dtype = params_.norm_dtype;
  const detail::Kernels& kernels = detail::kernels();
  const double qjl_scale = prod ? kSqrtHalfPi / static_cast<double>(m) : 0.0;

  const std::int64_t row_cost = d * (params_.rotation == RotationKind::kDense ? p : 8) + p * (2 + m);
  const std::int64_t tile = std::min(kTileRows, n);
  run_tiles(n, tile, row_cost, [&](TileQueue& queue) {
    std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
    std::vector<float> rotated(static_cast<std::size_t>(tile * p));
    std::vector<float> scratch(static_cast<std::size_t>(p));
    std::vector<float> signs(prod ? static_cast<std::size_t>(tile * m) : 0);
    std::vector<float> sketch(prod ? static_cast<std::size_t>(tile * p) : 0);
    std::vector<float> norms(static_cast<std::size_t>(tile));
    std::int64_t first = 0, rows = 0;
    while (queue.pop(&first, &rows)) {
      // The rotated-space reconstruction c[idx] (+ the QJL term), times the norm.
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t row = first + r;
        const float norm = checked_norm(dtype, codes.norms + row * sizes.norm_bytes, what, "norm", row);
        norms[static_cast<std::size_t>(r)] = norm;
        float* z = rotated.data() + r * p;
        if (codebook) {
          detail::unpack_indices_fast(layout_, p, codes.indices + row * sizes.index_bytes, idx.data());
          kernels.lookup(idx.data(), p, centroids, levels, prod ? 1.0f : norm, z);
        } else {
          std::fill(z, z + p, 0.0f);
        }
        if (!prod) continue;
        const float residual_norm =
            checked_norm(dtype, codes.residual_norms + row * sizes.residual_norm_bytes, what, "residual norm", row);
        const float coefficient = static_cast<float>(residual_norm * qjl_scale);
        const std::uint8_t* bits = codes.qjl_signs + row * sizes.sign_bytes;
        float* s = signs.data() + r * m;
        std::uint32_t coefficient_bits;  // +coefficient for a set bit, -coefficient otherwise (branch-free)
        std::memcpy(&coefficient_bits, &coefficient, sizeof coefficient_bits);
        for (std::int64_t i = 0; i < m; ++i) {
          const std::uint32_t clear = ((static_cast<std::uint32_t>(bits[i >> 3]) >> (i & 7)) & 1u) ^ 1u;
          const std::uint32_t value = coefficient_bits ^ (clear << 31);
          std::memcpy(s + i, &value, sizeof value);
        }
      }
      if (prod) {  // z = norm * (c[idx] + coefficient * S^T sign)
        kernels.gemm(qjl_matrix_.data(), m, p, signs.data(), m, sketch.data(), p, rows);
        for (std::int64_t r = 0; r < rows; ++r) {
          const float norm = norms[static_cast<std::size_t>(r)];
          float* z = rotated.data() + r * p;
          const float* t = sketch.data() + r * p;
          for (std::int64_t j = 0; j < p; ++j) z[j] = (z[j] + t[j]) * norm;
        }
      }
      rotation_.inverse_rows(rotated.data(), out + first * d, rows, scratch.data());
    }
  });
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
  const int levels = codebook ? codebook->levels() : 0;
  const NormDtype dtype = params_.norm_dtype;
  const detail::Kernels& kernels = detail::kernels();

  // Queries rotated once; in prod mode also their QJL projections t = S y~ and sum_i t_i.
  std::vector<float> queries(static_cast<std::size_t>(m_q * p));
  rotation_.apply(y, queries.data(), m_q);
  std::vector<float> projected(prod ? static_cast<std::size_t>(m_q * m) : 0);
  if (prod) {
    const float* qjl_t = tables_->qjl_transposed.data();
    parallel_for(m_q, m * p, [&](std::int64_t begin, std::int64_t end) {
      kernels.gemm(qjl_t, p, m, queries.data() + begin * p, p, projected.data() + begin * m, m, end - begin);
    });
  }
  const double qjl_scale = prod ? kSqrtHalfPi / static_cast<double>(m) : 0.0;
  const std::int64_t nibbles = (m + 3) / 4;

  // Passes of up to kQueryChunk queries (columns padded to a multiple of 16 with zero queries).
  for (std::int64_t q0 = 0; q0 < m_q; q0 += kQueryChunk) {
    const std::int64_t count = std::min(kQueryChunk, m_q - q0);
    const std::int64_t width = (count + 15) / 16 * 16;
    // Queries transposed: column q of row j is query q0+q's rotated coordinate j.
    std::vector<float> query_columns(static_cast<std::size_t>(p * width), 0.0f);
    for (std::int64_t q = 0; q < count; ++q) {
      for (std::int64_t j = 0; j < p; ++j) query_columns[j * width + q] = queries[(q0 + q) * p + j];
    }
    // prod: <t, sign> = 2 * sum(t_i : bit i set) - sum(t_i), the first sum from a table over each nibble of the
    // sign bits: lut[(16 b + v) * width + q] = sum of t_q[4b + k] over the set bits k of v.
    std::vector<float> lut(prod ? static_cast<std::size_t>(nibbles * 16 * width) : 0, 0.0f);
    std::vector<float> t_sum(prod ? static_cast<std::size_t>(width) : 0, 0.0f);
    if (prod) {
      for (std::int64_t q = 0; q < count; ++q) {
        const float* t = projected.data() + (q0 + q) * m;
        double total = 0.0;
        for (std::int64_t i = 0; i < m; ++i) total += t[i];
        t_sum[static_cast<std::size_t>(q)] = static_cast<float>(total);
        for (std::int64_t b = 0; b < nibbles; ++b) {
          for (unsigned v = 1; v < 16; ++v) {
            const unsigned low = v & (v - 1u);  // v without its lowest set bit
            int k = 0;
            while (!((v >> k) & 1u)) ++k;
            const float value = 4 * b + k < m ? t[4 * b + k] : 0.0f;
            lut[(16 * b + v) * width + q] = lut[(16 * b + low) * width + q] + value;
          }
        }
      }
    }
    run_tiles(n, kCodeTile, width * (p + nibbles), [&](TileQueue& queue) {
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
      std::vector<float> tile_centroids(static_cast<std::size_t>(kCodeTile * p), 0.0f);
      std::vector<float> scores(static_cast<std::size_t>(kCodeTile * width));
      std::vector<float> sign_sums(prod ? static_cast<std::size_t>(width) : 0);
      float tile_norm[kCodeTile];
      std::int64_t first = 0, codes_in_tile = 0;
      while (queue.pop(&first, &codes_in_tile)) {
        for (std::int64_t c = 0; c < codes_in_tile; ++c) {
          const std::int64_t code = first + c;
          tile_norm[c] = checked_norm(dtype, codes.norms + code * sizes.norm_bytes, what, "norm", code);
          if (codebook) {
            detail::unpack_indices_fast(layout_, p, codes.indices + code * sizes.index_bytes, idx.data());
            kernels.lookup(idx.data(), p, centroids, levels, 1.0f, tile_centroids.data() + c * p);
          }
        }
        if (!codebook) {  // prod at 1 bit: no mse term
          std::fill(scores.begin(), scores.begin() + codes_in_tile * width, 0.0f);
        } else if (count <= kFewQueries) {  // a 16-column gemm would be mostly zero padding: plain dot products
          kernels.dots(queries.data() + q0 * p, count, tile_centroids.data(), codes_in_tile, p, scores.data(), width);
        } else {
          kernels.gemm(query_columns.data(), p, width, tile_centroids.data(), p, scores.data(), width, codes_in_tile);
        }
        if (prod) {
          for (std::int64_t c = 0; c < codes_in_tile; ++c) {
            const std::int64_t code = first + c;
            const float residual_norm = checked_norm(dtype, codes.residual_norms + code * sizes.residual_norm_bytes,
                                                     what, "residual norm", code);
            const float coefficient = static_cast<float>(residual_norm * qjl_scale);
            kernels.nibble_lut_sum(codes.qjl_signs + code * sizes.sign_bytes, m, lut.data(), width, sign_sums.data());
            float* row = scores.data() + c * width;
            for (std::int64_t q = 0; q < count; ++q) {
              row[q] += coefficient * (2.0f * sign_sums[static_cast<std::size_t>(q)] - t_sum[static_cast<std::size_t>(q)]);
            }
          }
        }
        for (std::int64_t q = 0; q < count; ++q) {
          float* out_row = out + (q0 + q) * n + first;
          for (std::int64_t c = 0; c < codes_in_tile; ++c) out_row[c] = tile_norm[c] * scores[c * width + q];
        }
      }
    });
  }
}

}  // namespace rotorquant
