// The CPU kernels of detail/kernels.hpp, written once over a small vector traits type `V` and
// compiled once per instruction set (simd_kernels_{portable,avx2,avx512}.cpp). Each of those files
// includes this header INSIDE its own namespace, after its standard headers and after switching on
// its target options, so every function here is a distinct, ISA-specific copy (no shared inline
// functions between instruction sets). This header therefore includes nothing itself.
//
// V provides: W (lanes), T (vector type), zero(), load(p), store(p, v), set1(x), add(a, b), hsum(v) (sum of the
// lanes), fmadd(a, b, c) = a*b + c
// with one rounding, fma1(a, b, c) the scalar fused multiply-add, hadamard_low_stages (see walsh_hadamard),
// and the register tile shapes
// kBigRows x kBigVectors and kSmallRows x 1 of the gemm.
//
// Canonical kernels (docs/format.md, "Canonical encode arithmetic") keep, for every output, the exact
// chain of operations of the specification: vectorization runs ACROSS outputs, never within a chain.

// ---- gemm: out[r][i] = fma chain over j of mat[j][i] * in[r][j] -------------------------------------
template <int R, int NV>
inline void gemm_tile(const float* __restrict mat, std::int64_t in_dim, std::int64_t out_dim,
                      const float* __restrict in, std::int64_t in_stride, float* __restrict out,
                      std::int64_t out_stride) {
  typename V::T acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  const float* m = mat;
  for (std::int64_t j = 0; j < in_dim; ++j, m += out_dim) {
    typename V::T column[NV];
    for (int v = 0; v < NV; ++v) column[v] = V::load(m + v * V::W);
    for (int r = 0; r < R; ++r) {
      const typename V::T b = V::set1(in[r * in_stride + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(column[v], b, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) V::store(out + r * out_stride + v * V::W, acc[r][v]);
  }
}

template <int R, int NV>
inline void gemm_column_block(const float* mat, std::int64_t in_dim, std::int64_t out_dim, const float* in,
                              std::int64_t in_stride, float* out, std::int64_t out_stride, std::int64_t rows,
                              std::int64_t c0) {
  std::int64_t r = 0;
  for (; r + R <= rows; r += R) {
    gemm_tile<R, NV>(mat + c0, in_dim, out_dim, in + r * in_stride, in_stride, out + r * out_stride + c0, out_stride);
  }
  for (; r < rows; ++r) {
    gemm_tile<1, NV>(mat + c0, in_dim, out_dim, in + r * in_stride, in_stride, out + r * out_stride + c0, out_stride);
  }
}

inline void gemm(const float* mat, std::int64_t in_dim, std::int64_t out_dim, const float* in, std::int64_t in_stride,
                 float* out, std::int64_t out_stride, std::int64_t rows) {
  constexpr int W = V::W;
  std::int64_t c0 = 0;
  for (; c0 + V::kBigVectors * W <= out_dim; c0 += V::kBigVectors * W) {
    gemm_column_block<V::kBigRows, V::kBigVectors>(mat, in_dim, out_dim, in, in_stride, out, out_stride, rows, c0);
  }
  for (; c0 + W <= out_dim; c0 += W) {
    gemm_column_block<V::kSmallRows, 1>(mat, in_dim, out_dim, in, in_stride, out, out_stride, rows, c0);
  }
  for (; c0 < out_dim; ++c0) {  // fewer than W columns left: one chain each
    for (std::int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (std::int64_t j = 0; j < in_dim; ++j) acc = V::fma1(mat[j * out_dim + c0], in[r * in_stride + j], acc);
      out[r * out_stride + c0] = acc;
    }
  }
}

// ---- block kinds ------------------------------------------------------------------------------------
template <int K>
inline void block_apply_k(const float* __restrict blocks, std::int64_t groups, std::int64_t dim,
                          const float* __restrict in, float* __restrict out, std::int64_t rows) {
  const std::int64_t p = groups * K, full = dim / K;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * dim;
    float* y = out + r * p;
    for (std::int64_t g = 0; g < full; ++g) {
      const float* b = blocks + g * K * K;
      const float* v = x + g * K;
      for (int i = 0; i < K; ++i) {
        float acc = 0.0f;
        for (int j = 0; j < K; ++j) acc = V::fma1(b[i * K + j], v[j], acc);
        y[g * K + i] = acc;
      }
    }
    if (full < groups) {  // the last group, zero padded
      float v[K];
      for (int j = 0; j < K; ++j) v[j] = full * K + j < dim ? x[full * K + j] : 0.0f;
      const float* b = blocks + full * K * K;
      for (int i = 0; i < K; ++i) {
        float acc = 0.0f;
        for (int j = 0; j < K; ++j) acc = V::fma1(b[i * K + j], v[j], acc);
        y[full * K + i] = acc;
      }
    }
  }
}

template <int K>
inline void block_inverse_k(const float* __restrict blocks, std::int64_t groups, std::int64_t dim,
                            const float* __restrict in, float* __restrict out, std::int64_t rows) {
  const std::int64_t p = groups * K;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* y = in + r * p;
    float* x = out + r * dim;
    for (std::int64_t g = 0; g < groups; ++g) {
      const float* b = blocks + g * K * K;
      const float* v = y + g * K;
      for (int j = 0; j < K && g * K + j < dim; ++j) {
        float acc = 0.0f;
        for (int i = 0; i < K; ++i) acc = V::fma1(b[i * K + j], v[i], acc);
        x[g * K + j] = acc;
      }
    }
  }
}

inline void block_apply(int k, const float* blocks, std::int64_t groups, std::int64_t dim, const float* in, float* out,
                        std::int64_t rows) {
  switch (k) {
    case 2: block_apply_k<2>(blocks, groups, dim, in, out, rows); break;
    case 3: block_apply_k<3>(blocks, groups, dim, in, out, rows); break;
    default: block_apply_k<4>(blocks, groups, dim, in, out, rows); break;
  }
}

inline void block_inverse(int k, const float* blocks, std::int64_t groups, std::int64_t dim, const float* in,
                          float* out, std::int64_t rows) {
  switch (k) {
    case 2: block_inverse_k<2>(blocks, groups, dim, in, out, rows); break;
    case 3: block_inverse_k<3>(blocks, groups, dim, in, out, rows); break;
    default: block_inverse_k<4>(blocks, groups, dim, in, out, rows); break;
  }
}

// ---- hadamard ---------------------------------------------------------------------------------------
// x <- H x (unnormalized) in the canonical stage order; h = 1 and 2 fused as one radix-4 step (same values).
// V::hadamard_low_stages(x, n) may run the first stages itself and returns the next stride (1: none done).
inline void walsh_hadamard(float* __restrict x, std::int64_t n) {
  std::int64_t h = V::hadamard_low_stages(x, n);
  if (h == 1 && n >= 4) {
    for (std::int64_t i = 0; i < n; i += 4) {
      const float a0 = x[i], a1 = x[i + 1], a2 = x[i + 2], a3 = x[i + 3];
      const float s01 = a0 + a1, d01 = a0 - a1, s23 = a2 + a3, d23 = a2 - a3;
      x[i] = s01 + s23;
      x[i + 1] = d01 + d23;
      x[i + 2] = s01 - s23;
      x[i + 3] = d01 - d23;
    }
    h = 4;
  }
  for (; h < n; h <<= 1) {
    for (std::int64_t i = 0; i < n; i += 2 * h) {
      float* __restrict lo = x + i;
      float* __restrict hi = x + i + h;
      for (std::int64_t j = 0; j < h; ++j) {
        const float a = lo[j], b = hi[j];
        lo[j] = a + b;
        hi[j] = a - b;
      }
    }
  }
}

inline float hadamard_scale(std::int64_t p) {
  return static_cast<float>(1.0 / __builtin_sqrt(static_cast<double>(p)));
}

inline void hadamard_apply(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                           std::int64_t rows) {
  const float scale = hadamard_scale(p);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* __restrict x = in + r * dim;
    float* __restrict y = out + r * p;
    for (std::int64_t i = 0; i < dim; ++i) y[i] = x[i] * signs[i];
    for (std::int64_t i = dim; i < p; ++i) y[i] = 0.0f;
    walsh_hadamard(y, p);
    for (std::int64_t i = 0; i < p; ++i) y[i] *= scale;
  }
}

inline void hadamard_inverse(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                             std::int64_t rows, float* scratch) {
  const float scale = hadamard_scale(p);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* __restrict y = in + r * p;
    float* __restrict x = out + r * dim;
    for (std::int64_t i = 0; i < p; ++i) scratch[i] = y[i];
    walsh_hadamard(scratch, p);
    for (std::int64_t i = 0; i < dim; ++i) x[i] = scratch[i] * scale * signs[i];
  }
}

// ---- norms and unit vectors -------------------------------------------------------------------------
inline void normalize(const float* x, std::int64_t dim, std::int64_t rows, double* norms, float* unit,
                      std::int64_t unit_stride) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* __restrict row = x + r * dim;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::int64_t j = 0;
    for (; j + 8 <= dim; j += 8) {
      for (int k = 0; k < 8; ++k) {
        const double value = static_cast<double>(row[j + k]);
        acc[k] += value * value;
      }
    }
    double tail = 0.0;
    for (; j < dim; ++j) tail += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    const double norm_sq = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
    const double norm = __builtin_sqrt(norm_sq);
    norms[r] = norm;
    float* __restrict u = unit + r * unit_stride;
    if (norm == 0.0) {
      for (std::int64_t i = 0; i < dim; ++i) u[i] = 0.0f;
    } else {
      for (std::int64_t i = 0; i < dim; ++i) u[i] = static_cast<float>(static_cast<double>(row[i]) / norm);
    }
  }
}

// ---- scalar quantize / lookup (the vector builds override them for the common sizes) ----------------
inline int quantize_one(float y, const float* boundaries, int num_boundaries) {
  if (((num_boundaries + 1) & num_boundaries) == 0) {  // 2^b - 1 boundaries: branch-free binary search
    int index = 0;
    for (int step = (num_boundaries + 1) >> 1; step > 0; step >>= 1) {
      index += boundaries[index + step - 1] <= y ? step : 0;
    }
    return index;
  }
  int count = 0;
  for (int k = 0; k < num_boundaries; ++k) count += y >= boundaries[k] ? 1 : 0;
  return count;
}

inline void quantize_scalar(const float* y, std::int64_t count, const float* boundaries, int num_boundaries,
                            std::uint8_t* idx) {
  for (std::int64_t j = 0; j < count; ++j) idx[j] = static_cast<std::uint8_t>(quantize_one(y[j], boundaries, num_boundaries));
}

inline void lookup_scalar(const std::uint8_t* idx, std::int64_t count, const float* table, int table_size, float scale,
                          float* out) {
  for (std::int64_t j = 0; j < count; ++j) out[j] = table[idx[j]] * scale;
}

// ---- the QJL sign term of inner products: table sums over the nibbles of the sign bits ---------------
inline void nibble_lut_sum(const std::uint8_t* bits, std::int64_t m, const float* lut, std::int64_t width,
                           float* acc) {
  const std::int64_t nibbles = (m + 3) / 4;
  for (std::int64_t q0 = 0; q0 < width; q0 += 4 * V::W) {
    const std::int64_t vectors = (width - q0) / V::W < 4 ? (width - q0) / V::W : 4;
    typename V::T sum[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    for (std::int64_t b = 0; b < nibbles; ++b) {
      const unsigned nibble = (bits[b >> 1] >> ((b & 1) * 4)) & 0xFu;
      const float* row = lut + (16 * b + nibble) * width + q0;
      for (std::int64_t v = 0; v < vectors; ++v) sum[v] = V::add(sum[v], V::load(row + v * V::W));
    }
    for (std::int64_t v = 0; v < vectors; ++v) V::store(acc + q0 + v * V::W, sum[v]);
  }
}

// ---- dot products of row pairs (few-query inner products; not canonical) ------------------------------
inline void dots(const float* a, std::int64_t count_a, const float* b, std::int64_t count_b, std::int64_t len,
                 float* out, std::int64_t out_stride) {
  for (std::int64_t j = 0; j < count_b; ++j) {
    const float* __restrict bj = b + j * len;
    for (std::int64_t i = 0; i < count_a; ++i) {
      const float* __restrict ai = a + i * len;
      typename V::T acc0 = V::zero(), acc1 = V::zero();
      std::int64_t k = 0;
      for (; k + 2 * V::W <= len; k += 2 * V::W) {
        acc0 = V::fmadd(V::load(ai + k), V::load(bj + k), acc0);
        acc1 = V::fmadd(V::load(ai + k + V::W), V::load(bj + k + V::W), acc1);
      }
      for (; k + V::W <= len; k += V::W) acc0 = V::fmadd(V::load(ai + k), V::load(bj + k), acc0);
      float sum = V::hsum(V::add(acc0, acc1));
      for (; k < len; ++k) sum = V::fma1(ai[k], bj[k], sum);
      out[j * out_stride + i] = sum;
    }
  }
}
