// Random orthogonal maps used before scalar quantization.
//
// A Rotation maps R^dim into R^padded_dim (padded_dim >= dim: zero padding to a
// multiple of the block size, or to a power of two for hadamard), is an isometry
// (||apply(x)|| = ||x||), and inverse(apply(x)) == x. matrix() is the orthogonal
// padded_dim x padded_dim matrix M of the map on the padded space:
// apply(x) = M @ pad(x), inverse(y) = (M^T @ y)[:dim].
//
// Every kind is built from (dim, seed) alone through the project's counter-based
// generator (random.hpp), so it is identical on every platform and on the GPU,
// which receives the float parameters below (parameters()).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rotorquant {

enum class RotationKind : int {
  kIdentity = 0,  // no rotation (for studies); padded_dim = dim; no parameters
  kDense = 1,     // Haar orthogonal: QR of a Gaussian matrix with sign fix; padded_dim = dim
  kHadamard = 2,  // random signs then normalized Walsh-Hadamard; padded_dim = next power of two
  kRotor3 = 3,    // Cl(3,0) rotor sandwich R v R~ per group of 3; padded_dim = 3*ceil(dim/3)
  kPlanar = 4,    // Givens rotation per pair; padded_dim = 2*ceil(dim/2)
  kQuat = 5,      // 4-D rotation qL v qR per group of 4; padded_dim = 4*ceil(dim/4)
  kRotorNetwork = 6,  // random signs, Hadamard butterflies, balanced odd-radix rotor blocks (3, 5, 7);
                      // padded_dim = smallest 2^a 3^i 5^j 7^k >= dim (docs/rotor_network.md)
};

// Names used everywhere (Python, files): "identity", "dense", "hadamard", "rotor3", "planar", "quat",
// "rotor_network".
const std::vector<std::string>& rotation_kind_names();
std::string rotation_kind_name(RotationKind kind);
RotationKind parse_rotation_kind(const std::string& name);  // throws TypeError on an unknown name

// Number of coordinates of the rotated vector for a kind and an input dimension.
std::int64_t rotation_padded_dim(RotationKind kind, std::int64_t dim);

class Rotation {
 public:
  // dim >= 1 (hadamard, rotor_network: dim <= 2^24; dense: dim <= 4096, built by an O(d^3) QR). Throws ValueError otherwise.
  Rotation(RotationKind kind, std::int64_t dim, std::uint64_t seed = 0);

  RotationKind kind() const { return kind_; }
  std::string kind_name() const { return rotation_kind_name(kind_); }
  std::int64_t dim() const { return dim_; }
  std::int64_t padded_dim() const { return padded_dim_; }
  std::uint64_t seed() const { return seed_; }

  // The float parameters that define the map, exactly as every backend uses them:
  //   identity: none
  //   dense:    padded_dim*padded_dim floats, row-major M (y = M x)
  //   hadamard: padded_dim signs (+1/-1): y = H (s .* pad(x)) / sqrt(padded_dim),
  //             H the Sylvester Hadamard matrix, H[i][j] = (-1)^popcount(i & j)
  //   rotor3:   4 floats per group [s, b12, b13, b23], a unit rotor R = s + b12 e12 + b13 e13 + b23 e23;
  //             the group (x0, x1, x2) is the vector x0 e1 + x1 e2 + x2 e3 and y = R x R~
  //   planar:   2 floats per pair [c, s] = [cos t, sin t]: (y0, y1) = (c x0 - s x1, s x0 + c x1)
  //   quat:     8 floats per group: left unit quaternion (w, x, y, z), then right (w, x, y, z);
  //             v = x0 + x1 i + x2 j + x3 k, y = qL * v * qR (Hamilton product)
  //   rotor_network: padded_dim signs (+1/-1), then one r x r row-major block B_r per distinct odd
  //             prime factor r of padded_dim (ascending: 3, 5, 7; fixed constants):
  //             y = (B_{r_Q} (x) ... (x) B_{r_1} (x) H_{2^a} / sqrt(2^a)) (s .* pad(x)),
  //             padded_dim = 2^a r_1 ... r_Q (detail/rotor_network.hpp, docs/rotor_network.md)
  const std::vector<float>& parameters() const { return parameters_; }
  // Number of stored float parameters (parameters().size()).
  std::int64_t num_parameters() const { return static_cast<std::int64_t>(parameters_.size()); }

  // Batched maps on row-major float32 arrays; rows are processed in parallel threads.
  // apply:   in (n, dim)        -> out (n, padded_dim)
  // inverse: in (n, padded_dim) -> out (n, dim)
  // in and out must not overlap.
  void apply(const float* in, float* out, std::int64_t n) const;
  void inverse(const float* in, float* out, std::int64_t n) const;
  // The same maps on `rows` rows in the calling thread (no threads started), for callers that run
  // their own threads over blocks of rows (the quantizer). inverse_rows needs padded_dim floats of scratch.
  // Each row's result is bit-identical to apply()/inverse() (format.md §8 for the forward map).
  void apply_rows(const float* in, float* out, std::int64_t rows) const;
  void inverse_rows(const float* in, float* out, std::int64_t rows, float* scratch) const;

  // The orthogonal padded_dim x padded_dim matrix, row-major, in float64.
  std::vector<double> matrix() const;

  // The float matrices the CPU encode path derives from parameters() and multiplies by (the canonical
  // encode arithmetic of docs/format.md uses exactly these floats; the CUDA codec uploads them):
  //   dense: M^T row-major (padded_dim^2 floats); rotor3 / planar / quat: one row-major k x k block
  //   matrix per group (groups * k * k floats); identity / hadamard: empty.
  const std::vector<float>& derived_matrices() const { return fast_matrices_; }

 private:
  RotationKind kind_;
  std::int64_t dim_;
  std::int64_t padded_dim_;
  std::uint64_t seed_;
  std::vector<float> parameters_;
  // Derived from parameters_ at construction, for speed only (not part of the contract):
  // dense: M^T row-major; rotor3 / planar / quat: one row-major k x k block matrix per group.
  // rotor_network: unused (its stage plan is recomputed from padded_dim, see rotor_network.hpp).
  std::vector<float> fast_matrices_;
};

}  // namespace rotorquant
