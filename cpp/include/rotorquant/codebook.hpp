// Lloyd-Max scalar codebooks for the coordinates of a randomly rotated unit vector.
//
// After a random rotation, one coordinate X of a unit vector in R^d has the density
//   sphere:   f_d(x) = (1 - x^2)^((d-3)/2) / Z_d  on [-1, 1]
//   gaussian: N(0, 1/d)                           (its large-d approximation)
// A LloydMaxCodebook holds the 2^bits centroids (conditional means of their cells)
// and the 2^bits - 1 interior boundaries (midpoints of neighbouring centroids) that
// minimise E[(X - Q(X))^2], solved to ~1e-12 (Newton on the boundary fixed point).
// Math, solver and golden values: docs/codebook.md.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rotorquant {

enum class CodebookDensity {
  kSphere,    // exact coordinate density of a uniform unit vector in R^d
  kGaussian,  // N(0, 1/d)
};

// "sphere" / "gaussian"; any other name throws rotorquant::TypeError.
CodebookDensity parse_codebook_density(const std::string& name);
// The inverse of parse_codebook_density.
const char* codebook_density_name(CodebookDensity density);

class LloydMaxCodebook {
 public:
  static constexpr std::int64_t kMinDim = 2;
  static constexpr std::int64_t kMaxDim = std::int64_t{1} << 24;
  static constexpr int kMinBits = 1;
  static constexpr int kMaxBits = 8;

  // Solves the codebook (no caching; prefer lloyd_max_codebook()). Throws
  // rotorquant::ValueError for dim outside [2, 2^24] or bits outside [1, 8].
  LloydMaxCodebook(std::int64_t dim, int bits, CodebookDensity density);

  std::int64_t dim() const { return dim_; }
  int bits() const { return bits_; }
  CodebookDensity density() const { return density_; }
  int levels() const { return 1 << bits_; }

  // Ascending, size levels(); exactly symmetric: c[i] == -c[levels-1-i].
  const std::vector<double>& centroids() const { return centroids_; }
  // Ascending, size levels()-1; boundaries[i] = (c[i] + c[i+1]) / 2 (so the middle one is 0).
  const std::vector<double>& boundaries() const { return boundaries_; }
  // The same values rounded to float32 (round to nearest): what quantize() and the GPU use.
  const std::vector<float>& centroids_f32() const { return centroids_f32_; }
  const std::vector<float>& boundaries_f32() const { return boundaries_f32_; }

  // E[(X - Q(X))^2] for one coordinate under the codebook's density (double centroids).
  double mse_per_coordinate() const { return mse_per_coordinate_; }
  // dim() * mse_per_coordinate(): expected squared error of a whole unit vector.
  double mse_total() const { return mse_per_coordinate_ * static_cast<double>(dim_); }

  // Cell index of x: the number of float32 boundaries b with b <= x. So a value exactly
  // on a boundary goes to the UPPER cell (0.0f -> levels/2), -inf -> 0, +inf -> levels-1,
  // NaN -> 0 (every comparison with NaN is false). Computed by a branch-free binary
  // search over boundaries_f32() that a GPU kernel reproduces bit-exactly.
  int quantize(float x) const {
    int index = 0;
    for (int step = levels() >> 1; step > 0; step >>= 1) {
      if (boundaries_f32_[static_cast<std::size_t>(index + step - 1)] <= x) index += step;
    }
    return index;
  }
  // centroids_f32()[index]; throws rotorquant::ValueError if index is outside [0, levels).
  float dequantize(int index) const;

  // Batched forms over n values (parallel over chunks). quantize writes one index per
  // byte (bits <= 8). dequantize throws rotorquant::ValueError if any index >= levels.
  void quantize(const float* values, std::uint8_t* indices, std::int64_t n) const;
  void dequantize(const std::uint8_t* indices, float* values, std::int64_t n) const;

 private:
  std::int64_t dim_;
  int bits_;
  CodebookDensity density_;
  std::vector<double> centroids_;
  std::vector<double> boundaries_;
  std::vector<float> centroids_f32_;
  std::vector<float> boundaries_f32_;
  double mse_per_coordinate_ = 0.0;
};

// The codebook for (dim, bits, density), solved once per process and shared: every
// caller asking for the same key gets the same object. Thread-safe; concurrent first
// requests for one key solve it once. Throws rotorquant::ValueError for bad arguments.
std::shared_ptr<const LloydMaxCodebook> lloyd_max_codebook(std::int64_t dim, int bits,
                                                           CodebookDensity density);

}  // namespace rotorquant
