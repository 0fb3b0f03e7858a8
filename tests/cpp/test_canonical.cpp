// The canonical encode arithmetic (docs/format.md, "Canonical encode arithmetic"): a straightforward
// scalar reference written here (std::fma chains, double norms, the boundary count, format.hpp's packing)
// must give byte-identical codes to Quantizer::encode for every rotation kind, both modes, several
// dimensions and bits 1..8, in every CPU kernel build this machine runs (portable, AVX2, AVX-512), for
// any thread count and batch split. The kernels are also checked one by one (gemm chains, boundary ties,
// bit packing).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rotorquant/codebook.hpp"
#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/parallel.hpp"
#include "rotorquant/quantizer.hpp"
#include "rotorquant/random.hpp"
#include "rotorquant/rotation.hpp"
#include "test_harness.hpp"

using rotorquant::NormDtype;
using rotorquant::Quantizer;
using rotorquant::QuantizerMode;
using rotorquant::QuantizerParams;
using rotorquant::RandomPurpose;
using rotorquant::RotationKind;
using rotorquant::detail::KernelIsa;

namespace {

const std::vector<RotationKind> kAllKinds = {RotationKind::kIdentity, RotationKind::kDense,  RotationKind::kHadamard,
                                             RotationKind::kRotor3,   RotationKind::kPlanar, RotationKind::kQuat,
                                             RotationKind::kRotorNetwork};
// (rotor_network pads them to 1, 3, 64, 96, 128, 135 = 3^3 * 5 and 256)
const std::vector<std::int64_t> kDims = {1, 3, 64, 96, 128, 130, 256};

std::vector<KernelIsa> supported_isas() {
  std::vector<KernelIsa> isas;
  for (KernelIsa isa : {KernelIsa::kPortable, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    if (rotorquant::detail::kernel_isa_supported(isa)) isas.push_back(isa);
  }
  return isas;
}

// Restores the kernel choice and thread count at scope exit.
struct KernelScope {
  KernelIsa isa = rotorquant::detail::kernel_isa();
  int threads = rotorquant::num_threads();
  ~KernelScope() {
    rotorquant::detail::set_kernel_isa(isa);
    rotorquant::set_num_threads(threads);
  }
};

// Rows with varied scales, a zero row and a row with one large coordinate.
std::vector<float> test_rows(std::int64_t n, std::int64_t dim, std::uint64_t seed) {
  const auto stream = rotorquant::make_stream(seed, RandomPurpose::kTest, 7);
  std::vector<float> x(static_cast<std::size_t>(n * dim));
  for (std::int64_t r = 0; r < n; ++r) {
    const double scale = std::ldexp(1.0, static_cast<int>(r % 9) - 4);
    for (std::int64_t j = 0; j < dim; ++j) {
      x[r * dim + j] = static_cast<float>(scale * stream.gaussian_at(static_cast<std::uint64_t>(r * dim + j)));
    }
  }
  if (n > 2) std::fill(x.begin() + dim, x.begin() + 2 * dim, 0.0f);  // row 1: the zero vector
  if (n > 3) x[3 * dim + dim / 2] = 1000.0f;
  return x;
}

struct OwnedCodes {
  std::vector<std::uint8_t> indices, norms, signs, residual_norms;
  OwnedCodes(const Quantizer& q, std::int64_t n) {
    const auto sizes = q.code_sizes();
    indices.assign(static_cast<std::size_t>(n * sizes.index_bytes), 0xCD);
    norms.assign(static_cast<std::size_t>(n * sizes.norm_bytes), 0xCD);
    signs.assign(static_cast<std::size_t>(n * sizes.sign_bytes), 0xCD);
    residual_norms.assign(static_cast<std::size_t>(n * sizes.residual_norm_bytes), 0xCD);
  }
  rotorquant::CodesView view() { return {indices.data(), norms.data(), signs.data(), residual_norms.data()}; }
  bool operator==(const OwnedCodes& o) const {
    return indices == o.indices && norms == o.norms && signs == o.signs && residual_norms == o.residual_norms;
  }
};

OwnedCodes encode(const Quantizer& q, const std::vector<float>& x, std::int64_t n) {
  OwnedCodes codes(q, n);
  q.encode(x.data(), n, codes.view());
  return codes;
}

void store_norm_bytes(NormDtype dtype, double value, std::uint8_t* dst) {
  const float f = static_cast<float>(value);
  if (dtype == NormDtype::kFloat16) {
    const std::uint16_t h = rotorquant::float_to_half(f);
    dst[0] = static_cast<std::uint8_t>(h & 0xFF);
    dst[1] = static_cast<std::uint8_t>(h >> 8);
  } else {
    std::uint32_t w;
    std::memcpy(&w, &f, 4);
    for (int k = 0; k < 4; ++k) dst[k] = static_cast<std::uint8_t>(w >> (8 * k));
  }
}

// The rotation y = Pi u of one unit row, exactly as the specification writes it.
std::vector<float> reference_rotate(const rotorquant::Rotation& rotation, const std::vector<double>& matrix,
                                    const float* u) {
  const std::int64_t d = rotation.dim(), p = rotation.padded_dim();
  std::vector<float> y(static_cast<std::size_t>(p), 0.0f);
  switch (rotation.kind()) {
    case RotationKind::kIdentity:
      for (std::int64_t j = 0; j < d; ++j) y[j] = u[j];
      break;
    case RotationKind::kDense:
      for (std::int64_t i = 0; i < p; ++i) {
        float acc = 0.0f;
        for (std::int64_t j = 0; j < d; ++j) acc = std::fma(static_cast<float>(matrix[i * p + j]), u[j], acc);
        y[i] = acc;
      }
      break;
    case RotationKind::kHadamard: {
      const std::vector<float>& signs = rotation.parameters();
      for (std::int64_t j = 0; j < d; ++j) y[j] = u[j] * signs[j];
      for (std::int64_t h = 1; h < p; h *= 2) {  // one butterfly stage per h, no fusion
        for (std::int64_t i = 0; i < p; i += 2 * h) {
          for (std::int64_t j = i; j < i + h; ++j) {
            const float a = y[j], b = y[j + h];
            y[j] = a + b;
            y[j + h] = a - b;
          }
        }
      }
      const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p)));
      for (std::int64_t i = 0; i < p; ++i) y[i] = y[i] * scale;
      break;
    }
    case RotationKind::kRotorNetwork: {  // docs/rotor_network.md section 5, stage by stage
      const std::vector<float>& params = rotation.parameters();
      for (std::int64_t j = 0; j < d; ++j) y[j] = u[j] * params[j];
      std::int64_t n2 = 1, odd = p;
      while (odd % 2 == 0) {
        odd /= 2;
        n2 *= 2;
      }
      for (std::int64_t h = 1; h < n2; h *= 2) {  // butterflies inside each segment of n2
        for (std::int64_t i = 0; i < p; ++i) {
          if ((i % n2) & h) continue;
          const float a = y[i], b = y[i + h];
          y[i] = a + b;
          y[i + h] = a - b;
        }
      }
      std::int64_t stride = n2, offset = p;
      int previous = 0;
      for (int r : {3, 5, 7}) {
        while (odd % r == 0) {
          odd /= r;
          if (previous != 0 && previous != r) offset += previous * previous;
          previous = r;
          const std::vector<float> w(y);
          for (std::int64_t i = 0; i < p; ++i) {
            const std::int64_t digit = (i / stride) % r, base = i - digit * stride;
            float acc = 0.0f;
            for (int l = 0; l < r; ++l) acc = std::fma(params[offset + digit * r + l], w[base + l * stride], acc);
            y[i] = acc;
          }
          stride *= r;
        }
      }
      if (n2 > 1) {
        const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n2)));
        for (std::int64_t i = 0; i < p; ++i) y[i] = y[i] * scale;
      }
      break;
    }
    default: {  // block kinds: the diagonal blocks of matrix(), rounded to float
      const std::int64_t k = rotation.kind() == RotationKind::kRotor3 ? 3 : rotation.kind() == RotationKind::kPlanar ? 2 : 4;
      std::vector<float> v(static_cast<std::size_t>(p), 0.0f);
      for (std::int64_t j = 0; j < d; ++j) v[j] = u[j];
      for (std::int64_t g = 0; g < p / k; ++g) {
        for (std::int64_t i = 0; i < k; ++i) {
          float acc = 0.0f;
          for (std::int64_t j = 0; j < k; ++j) {
            acc = std::fma(static_cast<float>(matrix[(g * k + i) * p + g * k + j]), v[g * k + j], acc);
          }
          y[g * k + i] = acc;
        }
      }
      break;
    }
  }
  return y;
}

// The whole encode of the specification, one row at a time.
OwnedCodes reference_encode(const Quantizer& q, const std::vector<float>& x, std::int64_t n) {
  OwnedCodes codes(q, n);
  const QuantizerParams& params = q.params();
  const std::int64_t d = q.dim(), p = q.padded_dim(), m = q.qjl_dim();
  const auto sizes = q.code_sizes();
  const rotorquant::LloydMaxCodebook* book = q.codebook();
  const std::vector<double> matrix = q.rotation().matrix();
  const bool prod = params.mode == QuantizerMode::kProd;
  std::vector<float> s_matrix(static_cast<std::size_t>(m * p));
  const auto qjl_stream = rotorquant::make_stream(params.seed, RandomPurpose::kQJL);
  for (std::int64_t i = 0; i < m * p; ++i) s_matrix[i] = static_cast<float>(qjl_stream.gaussian_at(static_cast<std::uint64_t>(i)));

  for (std::int64_t r = 0; r < n; ++r) {
    const float* row = x.data() + r * d;
    double norm_sq = 0.0;
    for (std::int64_t j = 0; j < d; ++j) norm_sq += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    const double norm = std::sqrt(norm_sq);
    std::vector<float> u(static_cast<std::size_t>(d), 0.0f);
    if (norm != 0.0) {
      for (std::int64_t j = 0; j < d; ++j) u[j] = static_cast<float>(static_cast<double>(row[j]) / norm);
    }
    const std::vector<float> y = reference_rotate(q.rotation(), matrix, u.data());
    std::vector<std::uint8_t> idx(static_cast<std::size_t>(p), 0);
    double centroid_sq = 0.0;
    if (book) {
      for (std::int64_t j = 0; j < p; ++j) {
        int count = 0;
        for (float b : book->boundaries_f32()) count += (norm == 0.0 ? 0.0f : y[j]) >= b ? 1 : 0;
        idx[j] = static_cast<std::uint8_t>(count);
        const double c = book->centroids_f32()[idx[j]];
        centroid_sq += c * c;
      }
      rotorquant::pack_indices(q.layout(), p, idx.data(), codes.indices.data() + r * sizes.index_bytes);
    }
    double stored = norm;
    if (params.norm_correction && norm != 0.0 && centroid_sq > 0.0) stored = norm / std::sqrt(centroid_sq);
    store_norm_bytes(params.norm_dtype, stored, codes.norms.data() + r * sizes.norm_bytes);
    if (!prod) continue;
    std::vector<float> residual(static_cast<std::size_t>(p));
    double residual_sq = 0.0;
    for (std::int64_t j = 0; j < p; ++j) {
      residual[j] = book ? y[j] - book->centroids_f32()[idx[j]] : y[j];
      residual_sq += static_cast<double>(residual[j]) * static_cast<double>(residual[j]);
    }
    std::vector<float> projection(static_cast<std::size_t>(m), 0.0f);  // zero vector: all signs +
    if (norm != 0.0) {
      for (std::int64_t i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (std::int64_t j = 0; j < p; ++j) acc = std::fma(s_matrix[i * p + j], residual[j], acc);
        projection[i] = acc;
      }
    }
    rotorquant::pack_signs(projection.data(), m, codes.signs.data() + r * sizes.sign_bytes);
    store_norm_bytes(params.norm_dtype, norm == 0.0 ? 0.0 : std::sqrt(residual_sq),
                     codes.residual_norms.data() + r * sizes.residual_norm_bytes);
  }
  return codes;
}

bool make_quantizer(const QuantizerParams& params, std::unique_ptr<Quantizer>* out) {
  try {
    out->reset(new Quantizer(params));
    return true;
  } catch (const rotorquant::ValueError&) {  // padded_dim 1 with an mse stage: no codebook exists
    return false;
  }
}

}  // namespace

TEST(gemm_kernel_is_the_fma_chain_of_every_output) {
  const auto stream = rotorquant::make_stream(11, RandomPurpose::kTest, 1);
  std::uint64_t counter = 0;
  for (KernelIsa isa : supported_isas()) {
    const auto& kernels = rotorquant::detail::kernels_for(isa);
    for (std::int64_t in_dim : {1, 2, 7, 16, 33, 128}) {
      for (std::int64_t out_dim : {1, 5, 8, 16, 17, 40, 64, 100, 129}) {
        for (std::int64_t rows : {1, 3, 9}) {
          std::vector<float> mat(static_cast<std::size_t>(in_dim * out_dim)), in(static_cast<std::size_t>(rows * in_dim));
          for (float& v : mat) v = static_cast<float>(stream.gaussian_at(counter++));
          for (float& v : in) v = static_cast<float>(stream.gaussian_at(counter++));
          std::vector<float> out(static_cast<std::size_t>(rows * out_dim), -7.0f);
          kernels.gemm(mat.data(), in_dim, out_dim, in.data(), in_dim, out.data(), out_dim, rows);
          bool same = true;
          for (std::int64_t r = 0; r < rows; ++r) {
            for (std::int64_t i = 0; i < out_dim; ++i) {
              float acc = 0.0f;
              for (std::int64_t j = 0; j < in_dim; ++j) acc = std::fma(mat[j * out_dim + i], in[r * in_dim + j], acc);
              same = same && std::memcmp(&acc, &out[r * out_dim + i], 4) == 0;
            }
          }
          if (!same) std::fprintf(stderr, "gemm %s in %lld out %lld rows %lld\n", rotorquant::detail::kernel_isa_name(isa),
                                  static_cast<long long>(in_dim), static_cast<long long>(out_dim), static_cast<long long>(rows));
          CHECK(same);
        }
      }
    }
  }
}

TEST(quantize_kernel_counts_boundaries_ties_go_up) {
  for (KernelIsa isa : supported_isas()) {
    const auto& kernels = rotorquant::detail::kernels_for(isa);
    for (int bits = 1; bits <= 8; ++bits) {
      const auto book = rotorquant::lloyd_max_codebook(128, bits, rotorquant::CodebookDensity::kSphere);
      const std::vector<float>& b = book->boundaries_f32();
      std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
      for (float v : b) {  // every boundary exactly, and its float neighbours
        values.push_back(v);
        values.push_back(std::nextafter(v, 2.0f));
        values.push_back(std::nextafter(v, -2.0f));
      }
      values.push_back(0.25f);  // odd length: vector bodies and scalar tails
      std::vector<std::uint8_t> idx(values.size(), 0xEE);
      kernels.quantize(values.data(), static_cast<std::int64_t>(values.size()), b.data(), static_cast<int>(b.size()), idx.data());
      bool same = true;
      for (std::size_t j = 0; j < values.size(); ++j) {
        int count = 0;
        for (float bk : b) count += values[j] >= bk ? 1 : 0;
        same = same && idx[j] == count && count == book->quantize(values[j]);
      }
      CHECK(same);
    }
  }
}

// ---- normalize: the unit vector is (float)((double)x / norm) bit for bit ---------------------------------
// The vector kernels multiply by 1 / norm and redo with the division only the coordinates whose product lies
// near a float rounding midpoint (or is tiny); these tests feed them random rows of every scale and rows built
// so that many x / norm lie within a double ulp of a midpoint, where the product alone rounds the wrong way.

// The norm in the kernels' order: 8 interleaved partial sums, ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)),
// then the tail (dim % 8 coordinates) summed in order.
double kernel_order_norm(const float* row, std::int64_t dim) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const std::int64_t full = dim / 8 * 8;
  for (std::int64_t j = 0; j < full; ++j) acc[j % 8] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
  double tail = 0.0;
  for (std::int64_t j = full; j < dim; ++j) tail += static_cast<double>(row[j]) * static_cast<double>(row[j]);
  return std::sqrt(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail);
}

struct NormalizeCheck {
  int rows = 0, mismatches = 0, hard = 0;  // hard: coordinates where (float)(x * (1 / norm)) != the division's
};

// Runs every kernel build on `rows` rows of dim floats and compares norms and unit vectors bit for bit with
// the specification (the unit vector of a zero row: zeros).
void check_normalize(const std::vector<float>& x, std::int64_t dim, NormalizeCheck* result) {
  const std::int64_t rows = static_cast<std::int64_t>(x.size()) / dim;
  std::vector<double> expected_norms(static_cast<std::size_t>(rows));
  std::vector<float> expected(x.size(), 0.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    const double norm = kernel_order_norm(&x[r * dim], dim);
    expected_norms[r] = norm;
    if (norm == 0.0) continue;
    const double inverse = 1.0 / norm;
    for (std::int64_t j = 0; j < dim; ++j) {
      const float value = x[r * dim + j];
      expected[r * dim + j] = static_cast<float>(static_cast<double>(value) / norm);
      const float product = static_cast<float>(static_cast<double>(value) * inverse);
      if (std::memcmp(&product, &expected[r * dim + j], 4) != 0) ++result->hard;
    }
  }
  for (KernelIsa isa : supported_isas()) {
    const auto& kernels = rotorquant::detail::kernels_for(isa);
    std::vector<double> norms(static_cast<std::size_t>(rows), -1.0);
    std::vector<float> unit(x.size() + 3, 7.0f);  // 3 guard floats after the last row
    // next: the same rows again (only a prefetch hint)
    kernels.normalize(x.data(), dim, rows, norms.data(), unit.data(), dim, x.data(), rows);
    int bad = 0;
    for (std::int64_t r = 0; r < rows; ++r) bad += std::memcmp(&norms[r], &expected_norms[r], 8) != 0 ? 1 : 0;
    for (std::size_t i = 0; i < x.size(); ++i) bad += std::memcmp(&unit[i], &expected[i], 4) != 0 ? 1 : 0;
    for (std::size_t i = x.size(); i < unit.size(); ++i) bad += unit[i] != 7.0f ? 1 : 0;
    if (bad) std::fprintf(stderr, "normalize %s dim %lld: %d mismatches\n", rotorquant::detail::kernel_isa_name(isa),
                          static_cast<long long>(dim), bad);
    result->mismatches += bad;
  }
  result->rows += static_cast<int>(rows);
}

TEST(normalize_kernel_is_the_division_on_random_rows) {
  // Every dim up to 40 (vector bodies and tails) and the usual head sizes; per row a scale 2^s with s from -149
  // to 127 (subnormal inputs, results near the float subnormal range, huge norms), rows with zeros, one
  // nonzero coordinate, negative zeros, and a row mixing 2^100 and 2^-40 (unit coordinates below 2^-126).
  const auto stream = rotorquant::make_stream(77, RandomPurpose::kTest, 3);
  std::uint64_t counter = 0;
  NormalizeCheck check;
  std::vector<std::int64_t> dims;
  for (std::int64_t d = 1; d <= 40; ++d) dims.push_back(d);
  for (std::int64_t d : {63, 64, 80, 96, 112, 127, 128, 130, 160, 256, 1000}) dims.push_back(d);
  for (std::int64_t dim : dims) {
    const std::int64_t rows = 40;
    std::vector<float> x(static_cast<std::size_t>(rows * dim));
    for (std::int64_t r = 0; r < rows; ++r) {
      const int s = -149 + static_cast<int>(stream.bits_at(counter++) % 277);  // -149 .. 127
      for (std::int64_t j = 0; j < dim; ++j) {
        const double g = stream.gaussian_at(counter++);
        x[r * dim + j] = static_cast<float>(std::ldexp(g, r % 4 == 0 ? std::min(s, 120) : (r % 4 == 1 ? -20 : 0)));
      }
      if (r % 7 == 3) x[r * dim] = 0.0f;
      if (r % 7 == 4) x[r * dim + dim / 2] = -0.0f;
    }
    std::fill(x.begin(), x.begin() + dim, 0.0f);                   // row 0: the zero vector
    std::fill(x.begin() + dim, x.begin() + 2 * dim, 0.0f);         // row 1: one nonzero coordinate
    x[dim + dim / 3] = -3.5f;
    for (std::int64_t j = 0; j < dim; ++j) x[2 * dim + j] = j % 2 ? 0x1p100f : 0x1p-40f * static_cast<float>(j + 1);
    for (std::int64_t j = 0; j < dim; ++j) x[3 * dim + j] = std::ldexp(1.0f + j, -149 + static_cast<int>(j % 3));
    check_normalize(x, dim, &check);
  }
  std::printf("normalize: %d random rows, %d coordinates where the product alone rounds differently\n", check.rows,
              check.hard);
  CHECK(check.mismatches == 0);
}

// Four floats whose squares, at coordinates 0..3 of a row, sum (in the kernels' order) to RN(target^2): the
// row's norm is then exactly target, whatever much smaller coordinates follow (their squares are absorbed).
std::vector<float> filler_for_norm(double target) {
  const double square = target * target;
  const float f1 = static_cast<float>(target * (1.0 - 0x1p-12));
  const float f2 = static_cast<float>(std::sqrt(square - static_cast<double>(f1) * f1) * (1.0 - 0x1p-12));
  const double rest = square - (static_cast<double>(f1) * f1 + static_cast<double>(f2) * f2);  // exact (Sterbenz)
  const float f3 = static_cast<float>(std::sqrt(rest) * (1.0 - 0x1p-12));
  const float f4 = static_cast<float>(std::sqrt(rest - static_cast<double>(f3) * f3));
  return {f1, f2, f3, f4};
}

// Calls visit(m, N) for every odd m in 3..301 and every double N within a few ulps of 2 / m with RN(1 / N) = m / 2
// exactly (the norms of the midpoint test below).
template <typename Visit>
void for_each_norm_with_half_odd_reciprocal(Visit&& visit) {
  for (int m = 3; m <= 301; m += 2) {
    double candidate = 2.0 / m;
    for (int step = 0; step < 3; ++step) candidate = std::nextafter(candidate, 0.0);
    for (int step = 0; step < 7; ++step, candidate = std::nextafter(candidate, 1.0)) {
      if (1.0 / candidate == m / 2.0) visit(m, candidate);
    }
  }
}

TEST(normalize_kernel_is_the_division_next_to_float_midpoints) {
  // Rows whose norm N has RN(1 / N) = m / 2 exactly (m odd; N a few doubles away from 2 / m), and coordinates
  // x = X * 2^e with X * m odd and 2^24 <= X * m < 2^25: then x * RN(1 / N) is exactly X * m / 2 * 2^e, a
  // midpoint between two floats (rounded to even), while x / N is up to ~1 double ulp beside it, so it often
  // rounds to the other float. Also rows whose quotients land next to float subnormal midpoints (odd multiples
  // of 2^-150) and around 2^-126.
  const auto stream = rotorquant::make_stream(78, RandomPurpose::kTest, 4);
  std::uint64_t counter = 0;
  NormalizeCheck check;
  int built = 0, norm_as_built = 0;
  // a row of dim coordinates: the filler for norm target at 0..3, then coordinate(j) for j >= 4
  const auto check_row = [&](double target, std::int64_t dim, auto&& coordinate) {
    std::vector<float> x(static_cast<std::size_t>(dim), 0.0f);
    const std::vector<float> filler = filler_for_norm(target);
    std::copy(filler.begin(), filler.end(), x.begin());
    for (std::int64_t j = 4; j < dim; ++j) x[j] = coordinate(j);
    ++built;
    norm_as_built += kernel_order_norm(x.data(), dim) == target ? 1 : 0;
    check_normalize(x, dim, &check);
  };
  for_each_norm_with_half_odd_reciprocal([&](int m, double candidate) {
    const int k = static_cast<int>(counter % 9) * 11 - 40;  // norms from 2^-40 to 2^48
    const double target = std::ldexp(candidate, k);
    const std::int64_t dim = 8 * (5 + static_cast<std::int64_t>(counter % 12));  // 40 .. 128: no tail
    // X * m in [1.25 * 2^24, 2^25): the upper part of the binade, where a double ulp is the smallest relative step
    const std::int64_t low = ((std::int64_t{5} << 22) + m - 1) / m, high = ((std::int64_t{1} << 25) - 1) / m;
    check_row(target, dim, [&](std::int64_t j) {
      std::int64_t mantissa = low + static_cast<std::int64_t>(stream.bits_at(counter++) % (high - low + 1));
      mantissa |= 1;  // X odd (m odd): X * m odd
      if (mantissa > high) mantissa -= 2;
      const float sign = stream.bits_at(counter++) & 1 ? -1.0f : 1.0f;
      return sign * std::ldexp(static_cast<float>(mantissa), k - 60 - 24 + static_cast<int>(j % 5));
    });
  });
  const int hard_normal = check.hard;
  // Subnormal results: the same norms times 2^100, x = X * 2^-49 with X * m odd: x * RN(1 / N) = X * m * 2^-150 is
  // an odd multiple of 2^-150, a midpoint between two subnormal floats (or, for X * m near 2^24, next to 2^-126).
  for_each_norm_with_half_odd_reciprocal([&](int m, double candidate) {
    check_row(std::ldexp(candidate, 100), 64, [&](std::int64_t j) {
      std::int64_t mantissa;
      if (j < 12) {  // X * m next to 2^24 (quotients next to 2^-126, the smallest normal float)
        mantissa = (std::int64_t{1} << 24) / m + (j - 8);
      } else {  // X * m in the upper part of a random binade
        const int binade = 2 + static_cast<int>(stream.bits_at(counter++) % 22);  // X * m in [2^binade, 2^(binade+1))
        const std::int64_t low = ((std::int64_t{5} << binade) / 4 + m - 1) / m;
        const std::int64_t high = std::max(low, ((std::int64_t{2} << binade) - 1) / m);
        mantissa = low + static_cast<std::int64_t>(stream.bits_at(counter++) % (high - low + 1));
      }
      mantissa |= 1;
      return (j % 2 ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mantissa), -49);
    });
  });
  const int hard_subnormal = check.hard - hard_normal;
  std::printf("normalize: %d adversarial rows (%d with the norm as built), coordinates where the product alone "
              "rounds differently: %d normal, %d subnormal\n", check.rows, norm_as_built, hard_normal, hard_subnormal);
  CHECK(norm_as_built == built);  // the construction works: every x / norm is next to a midpoint
  CHECK(hard_normal >= 100);      // and the test can tell the multiply-only shortcut from the specification,
  CHECK(hard_subnormal >= 100);   // in the normal and in the subnormal float range
  CHECK(check.mismatches == 0);
}

TEST(normalize_kernel_gives_non_finite_norms_for_non_finite_rows) {
  // The encode relies on it to reject NaN / Inf rows without a separate pass (and finite rows never overflow).
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float big = std::numeric_limits<float>::max();
  for (KernelIsa isa : supported_isas()) {
    const auto& kernels = rotorquant::detail::kernels_for(isa);
    for (std::int64_t dim : {1, 7, 16, 33, 128}) {
      for (float bad : {inf, -inf, nan}) {
        for (std::int64_t at : {std::int64_t{0}, dim - 1, dim / 2}) {
          std::vector<float> x(static_cast<std::size_t>(2 * dim), big);  // row 0: all float max (finite norm)
          x[dim + at] = bad;
          std::vector<double> norms(2);
          std::vector<float> unit(x.size());
          kernels.normalize(x.data(), dim, 2, norms.data(), unit.data(), dim, nullptr, 0);
          CHECK(std::isfinite(norms[0]) && !std::isfinite(norms[1]));
        }
      }
    }
  }
}

TEST(quantize_pack_kernel_equals_quantize_then_pack) {
  // Every bit width (1..4 take the comparison-mask path, 5..8 the index bytes), sizes with and without a
  // vector tail, several rows; values: random, every boundary and its float neighbours, zeros of both signs.
  const auto stream = rotorquant::make_stream(79, RandomPurpose::kTest, 5);
  std::uint64_t counter = 0;
  for (KernelIsa isa : supported_isas()) {
    const auto& kernels = rotorquant::detail::kernels_for(isa);
    for (int bits = 1; bits <= 8; ++bits) {
      for (std::int64_t p : {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 64, 70, 96, 98, 128, 130, 256}) {
        const auto book = rotorquant::lloyd_max_codebook(std::max<std::int64_t>(p, 2), bits,
                                                         rotorquant::CodebookDensity::kSphere);
        const std::vector<float>& b = book->boundaries_f32();
        const rotorquant::PlaneLayout layout = rotorquant::plane_layout(p, bits);
        const std::int64_t rows = 3, stride = layout.bytes_per_vector;
        std::vector<float> y(static_cast<std::size_t>(rows * p));
        std::vector<float> special = {0.0f, -0.0f};
        for (float v : b) {
          special.push_back(v);
          special.push_back(std::nextafter(v, 2.0f));
          special.push_back(std::nextafter(v, -2.0f));
        }
        for (std::size_t i = 0; i < y.size(); ++i) {
          const double spread = 2.0 / std::sqrt(static_cast<double>(p));
          y[i] = i % 3 == 0 ? special[stream.bits_at(counter++) % special.size()]
                            : static_cast<float>(stream.gaussian_at(counter++) * spread);
        }
        std::vector<std::uint8_t> idx(y.size());
        for (std::size_t i = 0; i < y.size(); ++i) {
          int count = 0;
          for (float bk : b) count += y[i] >= bk ? 1 : 0;
          idx[i] = static_cast<std::uint8_t>(count);
        }
        std::vector<std::uint8_t> expected(static_cast<std::size_t>(rows * stride) + 8, 0x5A);
        for (std::int64_t r = 0; r < rows; ++r) rotorquant::pack_indices(layout, p, &idx[r * p], &expected[r * stride]);
        std::vector<std::uint8_t> actual(expected.size(), 0x5A), scratch(y.size());
        kernels.quantize_pack(y.data(), p, rows, b.data(), static_cast<int>(b.size()), layout, scratch.data(),
                              actual.data(), stride);
        if (actual != expected) {
          std::fprintf(stderr, "quantize_pack %s bits %d p %lld\n", rotorquant::detail::kernel_isa_name(isa), bits,
                       static_cast<long long>(p));
        }
        CHECK(actual == expected);  // incl. the 8 guard bytes after the last row: untouched
      }
    }
  }
}

TEST(fast_packing_equals_the_format) {
  const auto stream = rotorquant::make_stream(5, RandomPurpose::kTest, 2);
  std::uint64_t counter = 0;
  for (int bits = 0; bits <= 8; ++bits) {
    for (std::int64_t p = 1; p <= 70; ++p) {
      const rotorquant::PlaneLayout layout = rotorquant::plane_layout(p, bits);
      std::vector<std::uint8_t> idx(static_cast<std::size_t>(p));
      for (auto& v : idx) v = static_cast<std::uint8_t>(stream.bits_at(counter++) & ((1u << bits) - 1u));
      std::vector<std::uint8_t> expected(static_cast<std::size_t>(layout.bytes_per_vector) + 8, 0x5A);
      std::vector<std::uint8_t> actual = expected;
      rotorquant::pack_indices(layout, p, idx.data(), expected.data());
      rotorquant::detail::pack_indices_fast(layout, p, idx.data(), actual.data());
      CHECK(actual == expected);  // incl. the 8 guard bytes after the vector: untouched
      std::vector<std::uint8_t> back(static_cast<std::size_t>(p) + 8, 0x77);
      rotorquant::detail::unpack_indices_fast(layout, p, expected.data(), back.data());
      if (bits > 0) CHECK(std::equal(idx.begin(), idx.end(), back.begin()));
      CHECK(std::all_of(back.begin() + p, back.end(), [](std::uint8_t v) { return v == 0x77; }));
    }
  }
}

TEST(rotation_apply_is_canonical) {
  KernelScope scope;
  for (KernelIsa isa : supported_isas()) {
    rotorquant::detail::set_kernel_isa(isa);
    for (RotationKind kind : kAllKinds) {
      for (std::int64_t d : kDims) {
        const rotorquant::Rotation rotation(kind, d, 3);
        const std::int64_t n = 5, p = rotation.padded_dim();
        std::vector<float> x = test_rows(n, d, 4);
        std::vector<float> y(static_cast<std::size_t>(n * p));
        rotation.apply(x.data(), y.data(), n);
        const std::vector<double> matrix = rotation.matrix();
        bool same = true;
        for (std::int64_t r = 0; r < n; ++r) {
          const std::vector<float> expected = reference_rotate(rotation, matrix, x.data() + r * d);
          same = same && std::memcmp(expected.data(), y.data() + r * p, static_cast<std::size_t>(p) * 4) == 0;
        }
        if (!same) std::fprintf(stderr, "apply %s %s d=%lld\n", rotorquant::detail::kernel_isa_name(isa),
                                rotorquant::rotation_kind_name(kind).c_str(), static_cast<long long>(d));
        CHECK(same);
      }
    }
  }
}

TEST(encode_equals_the_scalar_reference_byte_for_byte) {
  KernelScope scope;
  const std::vector<KernelIsa> isas = supported_isas();
  int compared = 0, skipped = 0;
  for (RotationKind kind : kAllKinds) {
    for (std::int64_t d : kDims) {
      for (QuantizerMode mode : {QuantizerMode::kMSE, QuantizerMode::kProd}) {
        for (int bits = 1; bits <= 8; ++bits) {
          QuantizerParams params;
          params.dim = d;
          params.bits = bits;
          params.rotation = kind;
          params.mode = mode;
          params.seed = 1000 + static_cast<std::uint64_t>(bits);
          // Vary the options that touch the encode arithmetic: norm dtype, norm correction, qjl_dim.
          params.norm_dtype = bits % 2 ? NormDtype::kFloat16 : NormDtype::kFloat32;
          params.norm_correction = mode == QuantizerMode::kMSE && bits % 3 == 0;
          if (mode == QuantizerMode::kProd && bits == 5) params.qjl_dim = 37;
          std::unique_ptr<Quantizer> q;
          if (!make_quantizer(params, &q)) {
            ++skipped;
            continue;
          }
          const std::int64_t n = 19;
          const std::vector<float> x = test_rows(n, d, 100 + static_cast<std::uint64_t>(d));
          const OwnedCodes expected = reference_encode(*q, x, n);
          for (KernelIsa isa : isas) {
            rotorquant::detail::set_kernel_isa(isa);
            const bool same = encode(*q, x, n) == expected;
            if (!same) {
              std::fprintf(stderr, "encode %s %s d=%lld %s bits=%d\n", rotorquant::detail::kernel_isa_name(isa),
                           rotorquant::rotation_kind_name(kind).c_str(), static_cast<long long>(d),
                           rotorquant::quantizer_mode_name(mode).c_str(), bits);
            }
            CHECK(same);
            ++compared;
          }
        }
      }
    }
  }
  std::printf("compared %d encodes (%zu kernel builds), skipped %d configurations without a codebook\n", compared,
              isas.size(), skipped);
  // Only padded_dim 1 (dim 1 with identity / dense / hadamard / rotor_network) has no mse stage: 4 kinds x
  // 2 modes x 8 bits, less prod at 1 bit (no mse stage needed).
  CHECK(skipped == 4 * (8 + 7));
}

TEST(codes_do_not_depend_on_threads_batch_or_kernels) {
  KernelScope scope;
  for (RotationKind kind : kAllKinds) {
    for (QuantizerMode mode : {QuantizerMode::kMSE, QuantizerMode::kProd}) {
      QuantizerParams params;
      params.dim = 96;
      params.bits = 3;
      params.rotation = kind;
      params.mode = mode;
      params.seed = 9;
      const Quantizer q(params);
      const std::int64_t n = 301;
      const std::vector<float> x = test_rows(n, 96, 21);
      rotorquant::set_num_threads(1);
      rotorquant::detail::set_kernel_isa(KernelIsa::kPortable);
      const OwnedCodes expected = encode(q, x, n);
      for (KernelIsa isa : supported_isas()) {
        rotorquant::detail::set_kernel_isa(isa);
        for (int threads : {1, 2, 3, 7}) {
          rotorquant::set_num_threads(threads);
          CHECK(encode(q, x, n) == expected);
        }
        // Row by row, and in uneven batches: the same bytes.
        OwnedCodes pieces(q, n);
        const auto sizes = q.code_sizes();
        std::int64_t first = 0;
        for (std::int64_t size : {1, 2, 33, 64, 65, 136}) {
          const std::int64_t rows = std::min(size, n - first);
          rotorquant::CodesView view{pieces.indices.data() + first * sizes.index_bytes,
                                     pieces.norms.data() + first * sizes.norm_bytes,
                                     pieces.signs.data() + first * sizes.sign_bytes,
                                     pieces.residual_norms.data() + first * sizes.residual_norm_bytes};
          q.encode(x.data() + first * 96, rows, view);
          first += rows;
        }
        CHECK(first == n);
        CHECK(pieces == expected);
      }
    }
  }
}

TEST(decode_and_inner_product_agree_across_kernels) {
  // Not bit-exact by contract (1e-5 relative): every kernel build within that of the portable one.
  KernelScope scope;
  for (RotationKind kind : kAllKinds) {
    for (QuantizerMode mode : {QuantizerMode::kMSE, QuantizerMode::kProd}) {
      QuantizerParams params;
      params.dim = 130;
      params.bits = 4;
      params.rotation = kind;
      params.mode = mode;
      const Quantizer q(params);
      const std::int64_t n = 70, queries = 35;
      const std::vector<float> x = test_rows(n, 130, 5), y = test_rows(queries, 130, 6);
      rotorquant::detail::set_kernel_isa(KernelIsa::kPortable);
      OwnedCodes codes = encode(q, x, n);
      const rotorquant::ConstCodesView view{codes.indices.data(), codes.norms.data(), codes.signs.data(),
                                            codes.residual_norms.data()};
      std::vector<float> decoded(static_cast<std::size_t>(n * 130)), scores(static_cast<std::size_t>(queries * n));
      q.decode(view, n, decoded.data());
      q.inner_product(view, n, y.data(), queries, scores.data());
      for (KernelIsa isa : supported_isas()) {
        rotorquant::detail::set_kernel_isa(isa);
        std::vector<float> d2(decoded.size()), s2(scores.size());
        q.decode(view, n, d2.data());
        q.inner_product(view, n, y.data(), queries, s2.data());
        double worst = 0.0;
        for (std::size_t i = 0; i < d2.size(); ++i) {
          const std::int64_t r = static_cast<std::int64_t>(i) / 130;
          double row_norm = 0.0;
          for (std::int64_t j = 0; j < 130; ++j) row_norm = std::max(row_norm, std::fabs(static_cast<double>(decoded[r * 130 + j])));
          worst = std::max(worst, std::fabs(d2[i] - decoded[i]) / std::max(row_norm, 1e-30));
        }
        CHECK(worst <= 1e-5);
        double worst_ip = 0.0;
        for (std::int64_t qi = 0; qi < queries; ++qi) {
          double qn = 0.0;
          for (std::int64_t j = 0; j < 130; ++j) qn += static_cast<double>(y[qi * 130 + j]) * y[qi * 130 + j];
          for (std::int64_t c = 0; c < n; ++c) {
            double xn = 0.0;
            for (std::int64_t j = 0; j < 130; ++j) xn += static_cast<double>(decoded[c * 130 + j]) * decoded[c * 130 + j];
            const double scale = std::sqrt(qn * xn) + 1e-30;
            worst_ip = std::max(worst_ip, std::fabs(s2[qi * n + c] - scores[qi * n + c]) / scale);
          }
        }
        CHECK(worst_ip <= 1e-5);
      }
    }
  }
}

TEST(few_query_inner_products_match_the_batched_path) {
  // One to three queries take plain dot products, larger batches the gemm micro-kernel: same scores within
  // float rounding (|difference| <= 1e-5 * |q| * |x^| with x^ the decoded vector; both sum 130 products).
  for (RotationKind kind : {RotationKind::kDense, RotationKind::kRotor3, RotationKind::kHadamard}) {
    for (QuantizerMode mode : {QuantizerMode::kMSE, QuantizerMode::kProd}) {
      for (int bits : {1, 3}) {
        QuantizerParams params;
        params.dim = 130;
        params.bits = bits;
        params.rotation = kind;
        params.mode = mode;
        std::unique_ptr<Quantizer> q;
        if (!make_quantizer(params, &q)) continue;
        const std::int64_t n = 77, queries = 20;
        const std::vector<float> x = test_rows(n, 130, 8), y = test_rows(queries, 130, 9);
        OwnedCodes codes = encode(*q, x, n);
        const rotorquant::ConstCodesView view{codes.indices.data(), codes.norms.data(), codes.signs.data(),
                                              codes.residual_norms.data()};
        std::vector<float> batched(static_cast<std::size_t>(queries * n)), decoded(static_cast<std::size_t>(n * 130));
        q->inner_product(view, n, y.data(), queries, batched.data());
        q->decode(view, n, decoded.data());
        double worst = 0.0;
        for (std::int64_t first = 0; first < queries; first += 3) {  // groups of 3 (and a last one of 2)
          const std::int64_t count = std::min<std::int64_t>(3, queries - first);
          std::vector<float> few(static_cast<std::size_t>(count * n));
          q->inner_product(view, n, y.data() + first * 130, count, few.data());
          for (std::int64_t qi = 0; qi < count; ++qi) {
            double qn = 0.0;
            for (std::int64_t j = 0; j < 130; ++j) qn += static_cast<double>(y[(first + qi) * 130 + j]) * y[(first + qi) * 130 + j];
            for (std::int64_t c = 0; c < n; ++c) {
              double xn = 0.0;
              for (std::int64_t j = 0; j < 130; ++j) xn += static_cast<double>(decoded[c * 130 + j]) * decoded[c * 130 + j];
              const double diff = std::fabs(static_cast<double>(few[qi * n + c]) - batched[(first + qi) * n + c]);
              worst = std::max(worst, diff / (std::sqrt(qn * xn) + 1e-30));
            }
          }
        }
        CHECK(worst <= 1e-5);
      }
    }
  }
}
