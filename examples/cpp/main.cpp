// Links rotorquant::core from an installed package: builds a rotor3 rotation and a
// Lloyd-Max codebook, quantizes random unit vectors, and checks the error against the
// codebook's expected MSE. Exits non-zero if anything is off.
#include <rotorquant/codebook.hpp>
#include <rotorquant/random.hpp>
#include <rotorquant/rotation.hpp>
#ifdef EXAMPLE_WITH_CUDA
#include <rotorquant/cuda/rotation.hpp>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  const std::int64_t dim = 128, n = 4000;
  const int bits = 3;
  rotorquant::Rotation rotation(rotorquant::RotationKind::kRotor3, dim, /*seed=*/7);
  const std::int64_t padded = rotation.padded_dim();
  auto book = rotorquant::lloyd_max_codebook(padded, bits, rotorquant::CodebookDensity::kSphere);

  // Random unit vectors from the project's own generator.
  const auto stream = rotorquant::make_stream(1, rotorquant::RandomPurpose::kTest);
  std::vector<float> x(static_cast<std::size_t>(n * dim));
  for (std::int64_t i = 0; i < n; ++i) {
    double norm2 = 0;
    for (std::int64_t j = 0; j < dim; ++j) {
      const double g = stream.gaussian_at(static_cast<std::uint64_t>(i * dim + j));
      x[static_cast<std::size_t>(i * dim + j)] = static_cast<float>(g);
      norm2 += g * g;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(norm2));
    for (std::int64_t j = 0; j < dim; ++j) x[static_cast<std::size_t>(i * dim + j)] *= inv;
  }

  std::vector<float> rotated(static_cast<std::size_t>(n * padded)), back(x.size());
  rotation.apply(x.data(), rotated.data(), n);
  std::vector<std::uint8_t> codes(rotated.size());
  book->quantize(rotated.data(), codes.data(), static_cast<std::int64_t>(rotated.size()));
  for (std::size_t k = 0; k < rotated.size(); ++k) rotated[k] = book->dequantize(codes[k]);
  rotation.inverse(rotated.data(), back.data(), n);

  double err = 0;
  for (std::size_t k = 0; k < x.size(); ++k) err += (x[k] - back[k]) * (x[k] - back[k]);
  err /= static_cast<double>(n);
  std::printf("rotorquant example: rotor3 d=%lld (padded %lld), %d bits: mean ||x - x^||^2 = %.4f "
              "(Lloyd-Max expects %.4f)\n",
              static_cast<long long>(dim), static_cast<long long>(padded), bits, err, book->mse_total());
  const bool ok = std::fabs(err - book->mse_total()) < 0.05 * book->mse_total();
#ifdef EXAMPLE_WITH_CUDA
  // The kernels are linked; they run only where a device is present (the runtime is static).
  std::printf("rotorquant::cuda linked: %d CUDA device(s), runtime %s\n", rotorquant::cuda::device_count(),
              rotorquant::cuda::runtime_version_string().c_str());
#endif
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
