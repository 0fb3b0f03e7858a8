// In-place fast Walsh-Hadamard transform in Sylvester (natural) order:
// x <- H x with H[i][j] = (-1)^popcount(i & j), H of size n x n, n a power of two.
// Unnormalized (H H = n I); callers scale by 1/sqrt(n) for the orthogonal version.
#pragma once

#include <cstdint>

namespace rotorquant {
namespace detail {

// True when n is a power of two (n >= 1).
inline bool is_power_of_two(std::int64_t n) { return n >= 1 && (n & (n - 1)) == 0; }

// Smallest power of two >= n (n >= 1).
inline std::int64_t next_power_of_two(std::int64_t n) {
  std::int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// x <- H x, n a power of two (not checked: internal helper).
// Butterfly stages of width h = 1, 2, 4, ...: (a, b) -> (a + b, a - b). The inner
// loop over j is contiguous and independent, so it vectorizes for h >= 4.
template <class T>
inline void fast_walsh_hadamard_inplace(T* __restrict x, std::int64_t n) {
  // First two stages fused as a radix-4 step on contiguous quadruples.
  std::int64_t h = 1;
  if (n >= 4) {
    for (std::int64_t i = 0; i < n; i += 4) {
      const T a0 = x[i], a1 = x[i + 1], a2 = x[i + 2], a3 = x[i + 3];
      const T s01 = a0 + a1, d01 = a0 - a1, s23 = a2 + a3, d23 = a2 - a3;
      x[i] = s01 + s23;
      x[i + 1] = d01 + d23;
      x[i + 2] = s01 - s23;
      x[i + 3] = d01 - d23;
    }
    h = 4;
  }
  for (; h < n; h <<= 1) {
    for (std::int64_t i = 0; i < n; i += 2 * h) {
      T* __restrict lo = x + i;
      T* __restrict hi = x + i + h;
      for (std::int64_t j = 0; j < h; ++j) {
        const T a = lo[j], b = hi[j];
        lo[j] = a + b;
        hi[j] = a - b;
      }
    }
  }
}

}  // namespace detail
}  // namespace rotorquant
