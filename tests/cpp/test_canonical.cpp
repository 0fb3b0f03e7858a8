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
                                             RotationKind::kRotor3,   RotationKind::kPlanar, RotationKind::kQuat};
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
  // Only padded_dim 1 (dim 1 with identity / dense / hadamard) has no mse stage: 3 kinds x 2 modes x 8 bits,
  // less prod at 1 bit (no mse stage needed).
  CHECK(skipped == 3 * (8 + 7));
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
