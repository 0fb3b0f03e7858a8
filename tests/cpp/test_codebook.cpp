// Tests of the Lloyd-Max codebooks (cpp/include/rotorquant/codebook.hpp, docs/codebook.md):
// optimality against independent oracles, golden values, bounds, the quantize rule,
// caching, thread safety and argument errors.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "rotorquant/codebook.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/random.hpp"
#include "test_harness.hpp"

using rotorquant::CodebookDensity;
using rotorquant::LloydMaxCodebook;
using rotorquant::lloyd_max_codebook;

namespace {

const double kPi = 3.14159265358979323846;

// Independent oracle for the Gaussian N(0, 1/d): conditional means of cells in long double,
// closed form (Phi differences and phi differences) without the solver's tail tricks.
struct CellOracle {
  long double probability;
  long double mean;
};

CellOracle gaussian_cell(long double a, long double b, long double sigma) {
  const auto cdf = [&](long double x) {
    if (std::isinf(x)) return x > 0 ? 1.0L : 0.0L;
    return 0.5L * std::erfcl(-x / (sigma * std::sqrt(2.0L)));
  };
  const auto phi = [&](long double x) {
    if (std::isinf(x)) return 0.0L;
    return std::exp(-0.5L * (x / sigma) * (x / sigma)) / (sigma * std::sqrt(2.0L * 3.14159265358979323846264L));
  };
  // For cells in the upper half use the upper tail for accuracy.
  long double p;
  if (a >= 0) {
    const auto upper = [&](long double x) {
      if (std::isinf(x)) return 0.0L;
      return 0.5L * std::erfcl(x / (sigma * std::sqrt(2.0L)));
    };
    p = upper(a) - upper(b);
  } else {
    p = cdf(b) - cdf(a);
  }
  const long double moment = sigma * sigma * (phi(a) - phi(b));
  return {p, moment / p};
}

// Independent oracle for the sphere density: composite Boole rule in theta (x = sin theta)
// for both the mass and the first moment (no closed forms), long double, fine steps.
CellOracle sphere_cell(long double a, long double b, std::int64_t dim) {
  const long double d = static_cast<long double>(dim);
  const long double theta_a = std::asin(std::max(-1.0L, std::min(1.0L, a)));
  const long double theta_b = std::asin(std::max(-1.0L, std::min(1.0L, b)));
  const long double sigma = 1.0L / std::sqrt(d);
  const long double h_target = std::min((theta_b - theta_a) / 400.0L, 0.002L * sigma);
  std::int64_t pieces = static_cast<std::int64_t>(std::ceil((theta_b - theta_a) / h_target));
  pieces = (pieces + 3) / 4 * 4;
  const long double h = (theta_b - theta_a) / pieces;
  long double mass = 0, moment = 0;
  for (std::int64_t k = 0; k <= pieces; ++k) {
    const long double theta = theta_a + h * k;
    const long double weight =
        (k == 0 || k == pieces) ? 7.0L : (k % 2 ? 32.0L : (k % 4 == 2 ? 12.0L : 14.0L));
    const long double c = std::cos(theta);
    const long double density = c > 0 ? std::pow(c, d - 2.0L) : (dim == 2 ? 1.0L : 0.0L);
    mass += weight * density;
    moment += weight * density * std::sin(theta);
  }
  return {mass * h * 2.0L / 45.0L, moment / mass};
}

// Normalisation of the sphere density, sqrt(pi) Gamma((d-1)/2) / Gamma(d/2).
long double sphere_normalisation(std::int64_t dim) {
  const long double d = static_cast<long double>(dim);
  return std::sqrt(3.14159265358979323846264L) * std::exp(std::lgammal((d - 1) / 2) - std::lgammal(d / 2));
}

// max over cells of sqrt(d) |c_i - E[X | cell_i]| with cells from the stored boundaries,
// plus the oracle's E[(X - Q(X))^2] in *mse_total.
double oracle_residual(const LloydMaxCodebook& cb, double* mse_total) {
  const std::int64_t dim = cb.dim();
  const long double sigma = 1.0L / std::sqrt(static_cast<long double>(dim));
  const int levels = cb.levels();
  long double worst = 0, explained = 0, total_probability = 0;
  for (int i = 0; i < levels; ++i) {
    const bool sphere = cb.density() == CodebookDensity::kSphere;
    const long double lower = sphere ? -1.0L : -std::numeric_limits<long double>::infinity();
    const long double a = i == 0 ? lower : static_cast<long double>(cb.boundaries()[i - 1]);
    const long double b = i == levels - 1 ? -lower : static_cast<long double>(cb.boundaries()[i]);
    CellOracle cell = sphere ? sphere_cell(a, b, dim) : gaussian_cell(a, b, sigma);
    if (sphere) cell.probability /= sphere_normalisation(dim);
    const long double c = cb.centroids()[i];
    worst = std::max(worst, std::fabs(c - cell.mean) / sigma);
    // E[(X - c)^2 ; cell] = E[X^2 ; cell] - 2 c M + c^2 P; summed: E X^2 - sum(2 c m - c^2) P.
    explained += cell.probability * (2 * c * cell.mean - c * c);
    total_probability += cell.probability;
  }
  *mse_total = static_cast<double>((1.0L / dim - explained) * dim);
  CHECK_NEAR(total_probability, 1.0, 1e-12);
  return static_cast<double>(worst);
}

const CodebookDensity kDensities[] = {CodebookDensity::kSphere, CodebookDensity::kGaussian};

}  // namespace

TEST(density_names_round_trip) {
  CHECK(rotorquant::parse_codebook_density("sphere") == CodebookDensity::kSphere);
  CHECK(rotorquant::parse_codebook_density("gaussian") == CodebookDensity::kGaussian);
  CHECK(std::string(rotorquant::codebook_density_name(CodebookDensity::kSphere)) == "sphere");
  CHECK(std::string(rotorquant::codebook_density_name(CodebookDensity::kGaussian)) == "gaussian");
  CHECK_THROWS(rotorquant::parse_codebook_density("foo"), rotorquant::TypeError);
  CHECK_THROWS(rotorquant::parse_codebook_density("Sphere"), rotorquant::TypeError);
  CHECK_THROWS(rotorquant::parse_codebook_density(""), rotorquant::TypeError);
}

// The totals the design document quotes (d = 128, b = 1..4).
TEST(golden_mse_totals_d128) {
  const double sphere[4] = {0.3609, 0.1160, 0.0340, 0.0093};
  const double gaussian[4] = {0.3634, 0.1175, 0.0345, 0.0095};
  for (int b = 1; b <= 4; ++b) {
    CHECK_NEAR(lloyd_max_codebook(128, b, CodebookDensity::kSphere)->mse_total(), sphere[b - 1], 5e-5);
    CHECK_NEAR(lloyd_max_codebook(128, b, CodebookDensity::kGaussian)->mse_total(), gaussian[b - 1], 5e-5);
  }
}

// Golden values computed once by this solver (and, for b = 1, from closed forms).
// Changing them changes every stored code: only on purpose.
TEST(golden_centroids) {
  // b = 1: c = E|X|. Gaussian: sqrt(2 / pi) / sqrt(d). Sphere: 2 / ((d - 1) Z_d).
  const auto g1 = lloyd_max_codebook(128, 1, CodebookDensity::kGaussian);
  CHECK_NEAR(g1->centroids()[1], std::sqrt(2.0 / kPi / 128.0), 1e-15);
  CHECK(g1->centroids()[0] == -g1->centroids()[1]);
  CHECK(g1->boundaries()[0] == 0.0);
  CHECK_NEAR(g1->mse_total(), 1.0 - 2.0 / kPi, 1e-14);
  const auto s1 = lloyd_max_codebook(128, 1, CodebookDensity::kSphere);
  CHECK_NEAR(s1->centroids()[1], static_cast<double>(2.0L / (127.0L * sphere_normalisation(128))), 1e-15);
  CHECK_NEAR(s1->centroids()[1], 0.07066157273809423, 1e-15);

  const auto s2 = lloyd_max_codebook(128, 2, CodebookDensity::kSphere);
  CHECK_NEAR(s2->centroids()[2], 0.039991595197581477, 1e-14);
  CHECK_NEAR(s2->centroids()[3], 0.13304152024954907, 1e-14);
  const auto g2 = lloyd_max_codebook(128, 2, CodebookDensity::kGaussian);
  // Max's (1960) 4-level quantiser for N(0, 1): +-0.4528, +-1.510 (scaled by 1/sqrt(128) here).
  CHECK_NEAR(g2->centroids()[2] * std::sqrt(128.0), 0.4528, 5e-5);
  CHECK_NEAR(g2->centroids()[3] * std::sqrt(128.0), 1.510, 5e-4);
  CHECK_NEAR(g2->centroids()[2] * std::sqrt(128.0), 0.45278003463649208, 1e-13);
  CHECK_NEAR(g2->centroids()[3] * std::sqrt(128.0), 1.5104176084990959, 1e-13);
  const auto s3 = lloyd_max_codebook(128, 3, CodebookDensity::kSphere);
  const double s3_upper[4] = {0.021604310642152146, 0.066585608047421252, 0.11813976699678019, 0.1883971859701235};
  for (int i = 0; i < 4; ++i) CHECK_NEAR(s3->centroids()[4 + i], s3_upper[i], 1e-14);
  CHECK_NEAR(s3->mse_total(), 0.033965925793903229, 1e-13);
  CHECK_NEAR(lloyd_max_codebook(128, 3, CodebookDensity::kGaussian)->mse_total(), 0.034547760788503523, 1e-13);
}

// d = 3: the coordinate is uniform on [-1, 1] (Archimedes), so the optimum is the uniform
// quantiser: c_i = -1 + (2 i + 1) / L and the total MSE is exactly 4^-b. This measures the
// distance to the true optimum, not just the local residual: the fixed point's Jacobian has
// condition ~ L^2 (a discrete Laplacian for this density), so double-precision rounding in
// the cell means (~1e-16) allows errors up to ~1e-16 L^2 (about 2e-12 at 8 bits).
TEST(sphere_d3_is_uniform_quantiser) {
  for (int b = 1; b <= 8; ++b) {
    const auto cb = lloyd_max_codebook(3, b, CodebookDensity::kSphere);
    const int levels = cb->levels();
    double worst = 0;
    for (int i = 0; i < levels; ++i)
      worst = std::max(worst, std::fabs(cb->centroids()[i] - (-1.0 + (2.0 * i + 1.0) / levels)));
    CHECK(worst < 1e-15 + 2e-16 * levels * levels);
    CHECK_NEAR(cb->mse_total(), std::pow(4.0, -b), 1e-10 * std::pow(4.0, -b));
  }
}

// Optimality: every stored centroid is the conditional mean of its cell (independent
// oracles), boundaries are midpoints, and the reported MSE matches the oracle's.
TEST(fixed_point_residual_against_oracle) {
  for (CodebookDensity density : kDensities) {
    for (std::int64_t dim : {std::int64_t{2}, std::int64_t{16}, std::int64_t{128}, std::int64_t{4096}}) {
      if (dim == 2 && density == CodebookDensity::kGaussian) continue;
      for (int b = 1; b <= 8; ++b) {
        if (density == CodebookDensity::kSphere && b > 6 && dim != 128) continue;  // oracle cost
        const auto cb = lloyd_max_codebook(dim, b, density);
        double oracle_mse = 0;
        const double residual = oracle_residual(*cb, &oracle_mse);
        if (!(residual < 1e-12)) {
          std::fprintf(stderr, "density %s dim %lld bits %d residual %.3g\n",
                       rotorquant::codebook_density_name(density), static_cast<long long>(dim), b, residual);
        }
        CHECK(residual < 1e-12);
        CHECK_NEAR(cb->mse_total(), oracle_mse, 1e-11 * oracle_mse + 1e-15);
        for (int j = 0; j + 1 < cb->levels(); ++j)
          CHECK(cb->boundaries()[j] == 0.5 * (cb->centroids()[j] + cb->centroids()[j + 1]));
      }
    }
  }
}

TEST(symmetric_monotone_and_float_copies) {
  for (CodebookDensity density : kDensities) {
    for (std::int64_t dim : {std::int64_t{2}, std::int64_t{5}, std::int64_t{64}, std::int64_t{65536},
                             LloydMaxCodebook::kMaxDim}) {
      for (int b = 1; b <= 8; ++b) {
        const auto cb = lloyd_max_codebook(dim, b, density);
        const int levels = cb->levels();
        CHECK(cb->dim() == dim && cb->bits() == b && cb->density() == density);
        CHECK(levels == (1 << b));
        CHECK(static_cast<int>(cb->centroids().size()) == levels);
        CHECK(static_cast<int>(cb->boundaries().size()) == levels - 1);
        CHECK(static_cast<int>(cb->centroids_f32().size()) == levels);
        CHECK(static_cast<int>(cb->boundaries_f32().size()) == levels - 1);
        for (int i = 0; i < levels; ++i) {
          CHECK(cb->centroids()[i] == -cb->centroids()[levels - 1 - i]);
          CHECK(cb->centroids_f32()[i] == static_cast<float>(cb->centroids()[i]));
        }
        for (int j = 0; j + 1 < levels; ++j) {
          CHECK(cb->centroids()[j] < cb->boundaries()[j] && cb->boundaries()[j] < cb->centroids()[j + 1]);
          CHECK(cb->boundaries_f32()[j] == static_cast<float>(cb->boundaries()[j]));
          if (j > 0) CHECK(cb->boundaries_f32()[j - 1] < cb->boundaries_f32()[j]);
        }
        CHECK(cb->boundaries()[levels / 2 - 1] == 0.0);
        if (density == CodebookDensity::kSphere) CHECK(cb->centroids()[levels - 1] < 1.0);
        CHECK_NEAR(cb->mse_total(), cb->mse_per_coordinate() * static_cast<double>(dim),
                   1e-15 * cb->mse_total());
      }
    }
  }
}

// MSE falls with bits, and d * MSE lies between the bounds 4^-b and (sqrt(3) pi / 2) 4^-b
// for d >= 3 (d = 3 attains the lower bound; the d = 2 arcsine law goes below it, about
// 0.60 * 4^-b at b = 8). d * MSE * 4^b also grows with b toward the upper constant.
TEST(mse_decreasing_and_within_bounds) {
  const double upper_constant = std::sqrt(3.0) * kPi / 2.0;
  for (CodebookDensity density : kDensities) {
    for (std::int64_t dim : {std::int64_t{3}, std::int64_t{4}, std::int64_t{8}, std::int64_t{64},
                             std::int64_t{128}, std::int64_t{256}, std::int64_t{4096}}) {
      double previous_total = 1.0, previous_scaled = 0.0;
      for (int b = 1; b <= 8; ++b) {
        const double total = lloyd_max_codebook(dim, b, density)->mse_total();
        const double scaled = total * std::pow(4.0, b);
        CHECK(total < previous_total);
        CHECK(scaled >= 1.0 - 1e-9);
        CHECK(scaled <= upper_constant);
        CHECK(scaled >= previous_scaled - 1e-9);
        previous_total = total;
        previous_scaled = scaled;
      }
    }
  }
  const double arcsine_total = lloyd_max_codebook(2, 8, CodebookDensity::kSphere)->mse_total();
  CHECK(arcsine_total < std::pow(4.0, -8));
}

TEST(sphere_approaches_gaussian_as_dim_grows) {
  for (int b = 1; b <= 8; ++b) {
    const auto gaussian = lloyd_max_codebook(1024, b, CodebookDensity::kGaussian);
    double previous_gap = 1.0;
    for (std::int64_t dim : {std::int64_t{16}, std::int64_t{64}, std::int64_t{256}, std::int64_t{4096},
                             std::int64_t{65536}, LloydMaxCodebook::kMaxDim}) {
      const auto sphere = lloyd_max_codebook(dim, b, CodebookDensity::kSphere);
      const double gap = std::fabs(sphere->mse_total() - gaussian->mse_total()) / gaussian->mse_total();
      CHECK(gap < previous_gap);
      // The sphere's total is below the Gaussian's (lighter tails), by O(1/d).
      CHECK(sphere->mse_total() < gaussian->mse_total());
      previous_gap = gap;
    }
    CHECK(previous_gap < 1e-6);
    // Standardised centroids agree too.
    const auto big = lloyd_max_codebook(LloydMaxCodebook::kMaxDim, b, CodebookDensity::kSphere);
    const double scale = std::sqrt(static_cast<double>(LloydMaxCodebook::kMaxDim));
    for (int i = 0; i < big->levels(); ++i)
      CHECK_NEAR(big->centroids()[i] * scale, gaussian->centroids()[i] * std::sqrt(1024.0), 1e-5);
  }
  // The Gaussian codebook depends on d only through the 1/sqrt(d) scale.
  const auto g64 = lloyd_max_codebook(64, 5, CodebookDensity::kGaussian);
  const auto g4096 = lloyd_max_codebook(4096, 5, CodebookDensity::kGaussian);
  for (int i = 0; i < 32; ++i) CHECK_NEAR(g64->centroids()[i], 8.0 * g4096->centroids()[i], 1e-15);
}

TEST(eight_bits_solve_fast) {
  for (CodebookDensity density : kDensities) {
    for (std::int64_t dim : {std::int64_t{128}, std::int64_t{4096}, std::int64_t{65536}}) {
      const auto start = std::chrono::steady_clock::now();
      const LloydMaxCodebook cb(dim, 8, density);  // uncached
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      CHECK(seconds < 0.5);
      CHECK(cb.levels() == 256);
    }
  }
}

TEST(cache_returns_shared_object_across_threads) {
  const auto first = lloyd_max_codebook(128, 4, CodebookDensity::kSphere);
  CHECK(first == lloyd_max_codebook(128, 4, CodebookDensity::kSphere));
  CHECK(first != lloyd_max_codebook(128, 4, CodebookDensity::kGaussian));
  CHECK(first != lloyd_max_codebook(129, 4, CodebookDensity::kSphere));

  // Several threads ask for a key nobody asked for before, at the same moment.
  const int thread_count = 8;
  std::vector<std::shared_ptr<const LloydMaxCodebook>> results(thread_count);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < thread_count; ++k) {
    threads.emplace_back([&, k] {
      ready.fetch_add(1);
      while (ready.load() < thread_count) std::this_thread::yield();
      results[k] = lloyd_max_codebook(777, 8, CodebookDensity::kSphere);
    });
  }
  for (auto& t : threads) t.join();
  for (int k = 0; k < thread_count; ++k) {
    CHECK(results[k] != nullptr);
    CHECK(results[k] == results[0]);
  }
}

TEST(quantize_tie_rule_and_special_values) {
  for (int b = 1; b <= 8; ++b) {
    const auto cb = lloyd_max_codebook(128, b, CodebookDensity::kSphere);
    const int levels = cb->levels();
    const auto& boundaries = cb->boundaries_f32();
    for (int j = 0; j + 1 < levels; ++j) {
      const float boundary = boundaries[j];
      CHECK(cb->quantize(boundary) == j + 1);  // exactly on a boundary: upper cell
      CHECK(cb->quantize(std::nextafter(boundary, -1.0f)) == j);
      CHECK(cb->quantize(std::nextafter(boundary, 1.0f)) == j + 1);
    }
    CHECK(cb->quantize(0.0f) == levels / 2);
    CHECK(cb->quantize(-0.0f) == levels / 2);
    CHECK(cb->quantize(std::numeric_limits<float>::quiet_NaN()) == 0);
    CHECK(cb->quantize(-std::numeric_limits<float>::infinity()) == 0);
    CHECK(cb->quantize(std::numeric_limits<float>::infinity()) == levels - 1);
    CHECK(cb->quantize(-1.0f) == 0);
    CHECK(cb->quantize(1.0f) == levels - 1);
    for (int i = 0; i < levels; ++i) {
      CHECK(cb->quantize(cb->centroids_f32()[i]) == i);
      CHECK(cb->dequantize(i) == cb->centroids_f32()[i]);
    }
  }
}

TEST(quantize_is_nearest_centroid_and_batch_equals_scalar) {
  const auto cb = lloyd_max_codebook(64, 3, CodebookDensity::kGaussian);
  const rotorquant::RandomStream stream = rotorquant::make_stream(11, rotorquant::RandomPurpose::kTest, 40);
  const int n = 100003;
  std::vector<float> values(n);
  for (int i = 0; i < n; ++i) values[i] = static_cast<float>(stream.gaussian_at(i) * 0.2);
  // A few exact boundaries and specials in the batch as well.
  for (int j = 0; j < 7; ++j) values[j] = cb->boundaries_f32()[j];
  values[7] = std::numeric_limits<float>::quiet_NaN();
  values[8] = -0.0f;
  std::vector<std::uint8_t> indices(n);
  cb->quantize(values.data(), indices.data(), n);
  std::vector<float> decoded(n);
  cb->dequantize(indices.data(), decoded.data(), n);
  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    CHECK(indices[i] == cb->quantize(values[i]));
    CHECK(decoded[i] == cb->dequantize(indices[i]));
    if (i < 9) continue;
    // Nearest centroid (away from boundary ties).
    int best = 0;
    for (int k = 1; k < cb->levels(); ++k)
      if (std::fabs(values[i] - cb->centroids()[k]) < std::fabs(values[i] - cb->centroids()[best])) best = k;
    bool near_boundary = false;
    for (double boundary : cb->boundaries()) near_boundary |= std::fabs(values[i] - boundary) < 1e-6;
    if (!near_boundary && best != indices[i]) ++mismatches;
  }
  CHECK(mismatches == 0);
  // Empty batches are fine.
  cb->quantize(values.data(), indices.data(), 0);
  cb->dequantize(indices.data(), decoded.data(), 0);
}

// Quantising N(0, 1/d) samples with the Gaussian codebook reproduces its MSE.
TEST(monte_carlo_mse_matches) {
  const std::int64_t dim = 128;
  const int n = 200000;
  const rotorquant::RandomStream stream = rotorquant::make_stream(2024, rotorquant::RandomPurpose::kTest, 41);
  std::vector<float> values(n);
  const double sigma = 1.0 / std::sqrt(static_cast<double>(dim));
  for (int i = 0; i < n; ++i) values[i] = static_cast<float>(stream.gaussian_at(i) * sigma);
  std::vector<std::uint8_t> indices(n);
  std::vector<float> decoded(n);
  for (int b = 1; b <= 4; ++b) {
    const auto cb = lloyd_max_codebook(dim, b, CodebookDensity::kGaussian);
    cb->quantize(values.data(), indices.data(), n);
    cb->dequantize(indices.data(), decoded.data(), n);
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += (static_cast<double>(values[i]) - decoded[i]) * (values[i] - decoded[i]);
    const double mse = sum / n;
    CHECK_NEAR(mse / cb->mse_per_coordinate(), 1.0, 0.02);
  }
}

TEST(bad_arguments_throw) {
  CHECK_THROWS(lloyd_max_codebook(1, 3, CodebookDensity::kSphere), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(0, 3, CodebookDensity::kSphere), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(-128, 3, CodebookDensity::kGaussian), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(LloydMaxCodebook::kMaxDim + 1, 3, CodebookDensity::kSphere),
               rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(128, 0, CodebookDensity::kSphere), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(128, 9, CodebookDensity::kSphere), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(128, -1, CodebookDensity::kGaussian), rotorquant::ValueError);
  CHECK_THROWS(LloydMaxCodebook(128, 9, CodebookDensity::kGaussian), rotorquant::ValueError);
  CHECK_THROWS(lloyd_max_codebook(128, 3, static_cast<CodebookDensity>(7)), rotorquant::TypeError);
  try {
    lloyd_max_codebook(128, 9, CodebookDensity::kSphere);
    CHECK(false);
  } catch (const rotorquant::ValueError& e) {
    const std::string message = e.what();
    CHECK(message.find("expected") != std::string::npos);
    CHECK(message.find("got 9") != std::string::npos);
  }
  const auto cb = lloyd_max_codebook(128, 3, CodebookDensity::kSphere);
  CHECK_THROWS(cb->dequantize(-1), rotorquant::ValueError);
  CHECK_THROWS(cb->dequantize(8), rotorquant::ValueError);
  std::vector<std::uint8_t> bad = {0, 7, 8};
  std::vector<float> out(3);
  CHECK_THROWS(cb->dequantize(bad.data(), out.data(), 3), rotorquant::ValueError);
  float value = 0.0f;
  std::uint8_t index = 0;
  CHECK_THROWS(cb->quantize(&value, &index, -1), rotorquant::ValueError);
}
