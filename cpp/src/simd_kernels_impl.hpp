// The CPU kernels of detail/kernels.hpp, written once over a small vector traits type `V` and
// compiled once per instruction set (simd_kernels_{portable,avx2,avx512}.cpp). Each of those files
// includes this header INSIDE its own namespace, after its standard headers and after switching on
// its target options, so every function here is a distinct, ISA-specific copy (no shared inline
// functions between instruction sets). This header therefore includes nothing itself.
//
// V provides: W (lanes), T (vector type), zero(), load(p), load_partial(p, count) (count < W values, zeros after),
// store(p, v), set1(x), add(a, b), sub(a, b), mul(a, b),
// hsum(v) (sum of the lanes), fmadd(a, b, c) = a*b + c with one rounding, fma1(a, b, c) the scalar fused
// multiply-add, Butterfly (its apply(v) runs the Walsh-Hadamard stages h = 1, ..., W/2 inside one vector, see
// walsh_hadamard), kRegisterVectors (the largest Walsh-Hadamard transform, in vectors, kept in registers), and
// the register tile shapes kBigRows x kBigVectors and kSmallRows x 1 of the gemm.
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
// x <- H x (unnormalized) in the canonical stage order h = 1, 2, 4, ..., n/2, each (a, b) -> (a + b, a - b);
// then x <- x * scale when scaled (the canonical final multiply, fused into the last stage's stores).
// Vector builds: V::Butterfly::apply runs the stages h < W inside each vector (one permute and one
// fmadd(v, +-1, partner) per stage: v * +-1 is exact, so the fused result is the float a + b or a - b, bit
// for bit); stages h >= W pair whole vectors, in registers up to V::kRegisterVectors vectors, else in memory two
// stages (h, 2h) at a time as a radix-4 step with the values of two radix-2 steps ((a + b) + (c + d), ...).
// The scalar build fuses h = 1, 2 likewise.

// n = NV * W values: in (sign-flipped on the way in when signs != nullptr; the first `valid` of them, the rest
// zero) -> out (may equal in), all stages in registers.
template <int NV>
inline void walsh_hadamard_registers(const float* in, const float* signs, std::int64_t valid, float* out,
                                     bool scaled, typename V::T scale, const typename V::Butterfly& butterfly) {
  constexpr int W = V::W;
  typename V::T v[NV];
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    const std::int64_t count = valid - k * W;
    if (count >= W) {
      v[k] = V::load(in + k * W);
      if (signs) v[k] = V::mul(v[k], V::load(signs + k * W));
    } else if (count > 0) {
      v[k] = V::load_partial(in + k * W, count);
      if (signs) v[k] = V::mul(v[k], V::load_partial(signs + k * W, count));
    } else {
      v[k] = V::zero();
    }
    v[k] = butterfly.apply(v[k]);
  }
#pragma GCC unroll 4
  for (int h = 1; h < NV; h <<= 1) {
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) {
      if ((k & h) == 0) {
        const typename V::T a = v[k], b = v[k + h];
        v[k] = V::add(a, b);
        v[k + h] = V::sub(a, b);
      }
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) V::store(out + k * W, scaled ? V::mul(v[k], scale) : v[k]);
}

// NV when n = NV * W with NV a power of two <= V::kRegisterVectors (the register version applies), else 0.
inline int register_vectors(std::int64_t n) {
  if (V::W == 1 || n % V::W != 0) return 0;
  const std::int64_t vectors = n / V::W;
  if (vectors > V::kRegisterVectors || (vectors & (vectors - 1)) != 0) return 0;
  return static_cast<int>(vectors);
}

inline void hadamard_vector_stages(float* __restrict x, std::int64_t n, std::int64_t h, typename V::T scale,
                                   bool scaled) {
  constexpr int W = V::W;
  for (; h < n; h <<= 1) {
    if (4 * h <= n) {  // stages h and 2h
      const bool last = 4 * h == n && scaled;
      for (std::int64_t i = 0; i < n; i += 4 * h) {
        for (std::int64_t j = i; j < i + h; j += W) {
          const typename V::T a = V::load(x + j), b = V::load(x + j + h), c = V::load(x + j + 2 * h),
                              d = V::load(x + j + 3 * h);
          const typename V::T s01 = V::add(a, b), d01 = V::sub(a, b), s23 = V::add(c, d), d23 = V::sub(c, d);
          typename V::T o0 = V::add(s01, s23), o1 = V::add(d01, d23), o2 = V::sub(s01, s23), o3 = V::sub(d01, d23);
          if (last) {
            o0 = V::mul(o0, scale);
            o1 = V::mul(o1, scale);
            o2 = V::mul(o2, scale);
            o3 = V::mul(o3, scale);
          }
          V::store(x + j, o0);
          V::store(x + j + h, o1);
          V::store(x + j + 2 * h, o2);
          V::store(x + j + 3 * h, o3);
        }
      }
      h <<= 1;  // with the loop's shift: h advances by two stages
    } else {  // one stage left: h = n / 2
      for (std::int64_t j = 0; j < h; j += W) {
        const typename V::T a = V::load(x + j), b = V::load(x + j + h);
        typename V::T o0 = V::add(a, b), o1 = V::sub(a, b);
        if (scaled) {
          o0 = V::mul(o0, scale);
          o1 = V::mul(o1, scale);
        }
        V::store(x + j, o0);
        V::store(x + j + h, o1);
      }
    }
  }
}

// x (n values, n a power of two) <- H x, times scale when scaled.
inline void walsh_hadamard_scaled(float* __restrict x, std::int64_t n, bool scaled, float scale,
                                  const typename V::Butterfly& butterfly) {
  constexpr int W = V::W;
  const typename V::T vscale = V::set1(scale);
  if (W > 1 && n >= W) {
    for (std::int64_t i = 0; i < n; i += W) V::store(x + i, butterfly.apply(V::load(x + i)));
    hadamard_vector_stages(x, n, W, vscale, scaled);
    return;
  }
  std::int64_t h = 1;
  if (n >= 4) {
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
  if (scaled) {
    for (std::int64_t i = 0; i < n; ++i) x[i] *= scale;
  }
}

inline float hadamard_scale(std::int64_t p) {
  return static_cast<float>(1.0 / __builtin_sqrt(static_cast<double>(p)));
}

// y = s .* pad(x) (exact: s_i = +-1), y[dim..p) = 0.
inline void sign_flip_padded(const float* __restrict x, const float* __restrict signs, std::int64_t dim,
                             std::int64_t p, float* __restrict y) {
  std::int64_t i = 0;
  for (; i + V::W <= dim; i += V::W) V::store(y + i, V::mul(V::load(x + i), V::load(signs + i)));
  for (; i < dim; ++i) y[i] = x[i] * signs[i];
  for (; i < p; ++i) y[i] = 0.0f;
}

template <int NV>
inline void hadamard_apply_rows(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                                std::int64_t rows) {
  const float scale = hadamard_scale(p);
  const typename V::Butterfly butterfly;
  const typename V::T vscale = V::set1(scale);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* __restrict y = out + r * p;
    if constexpr (NV > 0) {
      walsh_hadamard_registers<NV>(in + r * dim, signs, dim, y, true, vscale, butterfly);
    } else {
      sign_flip_padded(in + r * dim, signs, dim, p, y);
      walsh_hadamard_scaled(y, p, true, scale, butterfly);
    }
  }
}

inline void hadamard_apply(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                           std::int64_t rows) {
  switch (register_vectors(p)) {
    case 1: hadamard_apply_rows<1>(signs, dim, p, in, out, rows); break;
    case 2: hadamard_apply_rows<2>(signs, dim, p, in, out, rows); break;
    case 4: hadamard_apply_rows<4>(signs, dim, p, in, out, rows); break;
    case 8: hadamard_apply_rows<8>(signs, dim, p, in, out, rows); break;
    case 16: hadamard_apply_rows<(V::kRegisterVectors >= 16 ? 16 : 0)>(signs, dim, p, in, out, rows); break;
    default: hadamard_apply_rows<0>(signs, dim, p, in, out, rows); break;
  }
}

inline void hadamard_inverse(const float* signs, std::int64_t dim, std::int64_t p, const float* in, float* out,
                             std::int64_t rows, float* scratch) {
  const float scale = hadamard_scale(p);
  const typename V::Butterfly butterfly;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* __restrict y = in + r * p;
    float* __restrict x = out + r * dim;
    for (std::int64_t i = 0; i < p; ++i) scratch[i] = y[i];
    walsh_hadamard_scaled(scratch, p, false, 1.0f, butterfly);
    for (std::int64_t i = 0; i < dim; ++i) x[i] = scratch[i] * scale * signs[i];
  }
}

// ---- rotor_network (detail/rotor_network.hpp, docs/rotor_network.md section 5) ------------------------
// Canonical forward: signs, Walsh-Hadamard butterflies on each contiguous segment of 2^a values, the odd
// block stages (every output an fmaf chain from +0.0f over its block row, ascending, all inputs of a group
// read before its outputs are written), then the float scale (fused into the last odd stage's stores). The
// odd stages vectorize across the stride (the W consecutive t of one group position), which keeps every
// output's chain; sizes whose power-of-two part is below W take W rows at a time instead (rows in lanes).
template <int R>
inline void rotor_network_odd_stage(const float* __restrict block, std::int64_t p, std::int64_t stride,
                                    float* __restrict v, bool scaled, typename V::T vscale, float scale) {
  const std::int64_t span = R * stride;
  const std::int64_t vector_end = stride / V::W * V::W;
  for (std::int64_t base = 0; base < p; base += span) {
    float* g = v + base;
    for (std::int64_t t = 0; t < vector_end; t += V::W) {
      typename V::T in[R];
      for (int l = 0; l < R; ++l) in[l] = V::load(g + l * stride + t);
      for (int k = 0; k < R; ++k) {
        typename V::T acc = V::zero();
        for (int l = 0; l < R; ++l) acc = V::fmadd(V::set1(block[k * R + l]), in[l], acc);
        V::store(g + k * stride + t, scaled ? V::mul(acc, vscale) : acc);
      }
    }
    for (std::int64_t t = vector_end; t < stride; ++t) {  // stride % W positions left (rows_in_lanes avoids most)
      float in[R];
      for (int l = 0; l < R; ++l) in[l] = g[l * stride + t];
      for (int k = 0; k < R; ++k) {
        float acc = 0.0f;
        for (int l = 0; l < R; ++l) acc = V::fma1(block[k * R + l], in[l], acc);
        g[k * stride + t] = scaled ? acc * scale : acc;
      }
    }
  }
}

// Rows in lanes: W rows at a time, transposed into buf (position i of row r at buf[i * W + r]), so that every stage
// is a vertical vector operation (lane r computes exactly row r's chain of operations) whatever the strides: for
// p whose power-of-two part is below W, where the row-by-row kernel falls back to scalar code.
constexpr std::int64_t kRowsInLanesMaxFloats = 8192;  // p * W floats of stack (32 KiB)

template <int R>
inline void rows_in_lanes_odd_stage(const float* __restrict block, std::int64_t p, std::int64_t stride,
                                    float* __restrict buf, bool scaled, typename V::T vscale) {
  constexpr int W = V::W;
  const std::int64_t span = R * stride;
  for (std::int64_t base = 0; base < p; base += span) {
    for (std::int64_t t = 0; t < stride; ++t) {
      float* g = buf + (base + t) * W;
      typename V::T in[R];
      for (int l = 0; l < R; ++l) in[l] = V::load(g + l * stride * W);
      for (int k = 0; k < R; ++k) {
        typename V::T acc = V::zero();
        for (int l = 0; l < R; ++l) acc = V::fmadd(V::set1(block[k * R + l]), in[l], acc);
        V::store(g + k * stride * W, scaled ? V::mul(acc, vscale) : acc);
      }
    }
  }
}

inline void rotor_network_rows_in_lanes(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                                        const float* in, float* out, std::int64_t rows) {
  constexpr int W = V::W;
  const std::int64_t p = plan.padded_dim, n2 = plan.butterfly_size;
  const bool scaled = n2 > 1;
  const typename V::T vscale = V::set1(plan.scale);
  alignas(64) float buf[kRowsInLanesMaxFloats];
  for (std::int64_t r0 = 0; r0 < rows; r0 += W) {
    const std::int64_t lanes = rows - r0 < W ? rows - r0 : W;
    if (lanes < W || dim < p) {  // zero padding: positions >= dim, lanes >= rows
      for (std::int64_t i = 0; i < p * W; ++i) buf[i] = 0.0f;
    }
    for (std::int64_t r = 0; r < lanes; ++r) {  // signs (exact)
      const float* __restrict x = in + (r0 + r) * dim;
      float* __restrict lane = buf + r;
      for (std::int64_t i = 0; i < dim; ++i) lane[i * W] = x[i] * parameters[i];
    }
    for (std::int64_t h = 1; h < n2; h <<= 1) {  // butterflies, stage by stage
      const bool last = 2 * h == n2 && scaled && plan.num_odd_stages == 0;
      for (std::int64_t segment = 0; segment < p; segment += n2) {
        for (std::int64_t i = segment; i < segment + n2; i += 2 * h) {
          for (std::int64_t j = i; j < i + h; ++j) {
            const typename V::T a = V::load(buf + j * W), b = V::load(buf + (j + h) * W);
            V::store(buf + j * W, last ? V::mul(V::add(a, b), vscale) : V::add(a, b));
            V::store(buf + (j + h) * W, last ? V::mul(V::sub(a, b), vscale) : V::sub(a, b));
          }
        }
      }
    }
    for (int q = 0; q < plan.num_odd_stages; ++q) {
      const float* block = parameters + plan.block_offset[q];
      const bool last = q == plan.num_odd_stages - 1 && scaled;
      switch (plan.radix[q]) {
        case 3: rows_in_lanes_odd_stage<3>(block, p, plan.stride[q], buf, last, vscale); break;
        case 5: rows_in_lanes_odd_stage<5>(block, p, plan.stride[q], buf, last, vscale); break;
        default: rows_in_lanes_odd_stage<7>(block, p, plan.stride[q], buf, last, vscale); break;
      }
    }
    for (std::int64_t r = 0; r < lanes; ++r) {
      float* __restrict y = out + (r0 + r) * p;
      const float* __restrict lane = buf + r;
      for (std::int64_t i = 0; i < p; ++i) y[i] = lane[i * W];
    }
  }
}

// NV > 0: the butterfly segments (NV vectors each) in registers.
template <int NV>
inline void rotor_network_rows(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                               const float* in, float* out, std::int64_t rows) {
  const std::int64_t p = plan.padded_dim, n2 = plan.butterfly_size;
  const int stages = plan.num_odd_stages;
  const bool scaled = n2 > 1;  // the scale multiply exists only with butterflies (it is 1 otherwise)
  const typename V::Butterfly butterfly;
  const typename V::T vscale = V::set1(plan.scale);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * dim;
    float* __restrict y = out + r * p;
    // signs and butterflies, segment by segment (the scale goes with the last odd stage, or here without one)
    if constexpr (NV > 0) {
      for (std::int64_t segment = 0; segment < p; segment += n2) {
        const std::int64_t valid = dim - segment < 0 ? 0 : (dim - segment < n2 ? dim - segment : n2);
        walsh_hadamard_registers<NV>(x + segment, parameters + segment, valid, y + segment, scaled && stages == 0,
                                     vscale, butterfly);
      }
    } else {
      sign_flip_padded(x, parameters, dim, p, y);
      if (n2 > 1) {
        for (std::int64_t segment = 0; segment < p; segment += n2) {
          walsh_hadamard_scaled(y + segment, n2, scaled && stages == 0, plan.scale, butterfly);
        }
      }
    }
    for (int q = 0; q < stages; ++q) {
      const float* block = parameters + plan.block_offset[q];
      const bool last = q == stages - 1 && scaled;
      switch (plan.radix[q]) {
        case 3: rotor_network_odd_stage<3>(block, p, plan.stride[q], y, last, vscale, plan.scale); break;
        case 5: rotor_network_odd_stage<5>(block, p, plan.stride[q], y, last, vscale, plan.scale); break;
        default: rotor_network_odd_stage<7>(block, p, plan.stride[q], y, last, vscale, plan.scale); break;
      }
    }
  }
}

inline void rotor_network_apply_rows(const RotorNetworkPlan& plan, const float* parameters, std::int64_t dim,
                                     const float* in, float* out, std::int64_t rows) {
  if (V::W > 1 && plan.butterfly_size < V::W && plan.padded_dim * V::W <= kRowsInLanesMaxFloats) {
    rotor_network_rows_in_lanes(plan, parameters, dim, in, out, rows);
    return;
  }
  switch (plan.butterfly_size > 1 ? register_vectors(plan.butterfly_size) : 0) {
    case 1: rotor_network_rows<1>(plan, parameters, dim, in, out, rows); break;
    case 2: rotor_network_rows<2>(plan, parameters, dim, in, out, rows); break;
    case 4: rotor_network_rows<4>(plan, parameters, dim, in, out, rows); break;
    case 8: rotor_network_rows<8>(plan, parameters, dim, in, out, rows); break;
    case 16: rotor_network_rows<(V::kRegisterVectors >= 16 ? 16 : 0)>(plan, parameters, dim, in, out, rows); break;
    default: rotor_network_rows<0>(plan, parameters, dim, in, out, rows); break;
  }
}

// ---- norms and unit vectors -------------------------------------------------------------------------
// The canonical unit vector is u_j = (float)((double)x_j / norm): a double division per coordinate, the
// slowest operation of the encode (vdivpd runs at about 2 cycles per double on every width). The vector
// builds compute p = (double)x_j * inv_norm with inv_norm = 1.0 / norm (double) and round p to float instead,
// and recompute with the true division exactly the coordinates where the two could round differently (the
// scalar build keeps the division, which is faster than the check in scalar code):
//
//   Let v = x_j / norm (real), q = RN(v) the double the specification rounds to float, p = RN(x_j * inv_norm),
//   inv_norm = (1 / norm)(1 + a), p = v (1 + a)(1 + b), q = v (1 + c), |a|, |b|, |c| <= u = 2^-53 (all
//   operands and results are normal doubles: |x_j| in [2^-149, 2^128), norm in [2^-149, 2^141), so |v| in
//   [2^-290, 1] and 1 / norm in (2^-142, 2^150)). Then |p - q| <= |v| (3u + u^2) <= |p| (3u + u^2) / (1 - u)^2
//   < 3.0000001 u |p| < 3.0000001 ulp(p) with ulp(p) = 2^(e - 52) for p in [2^e, 2^(e+1)).
//   Rounding to float is monotone, so (float)p != (float)q needs a float rounding boundary (a midpoint between
//   two adjacent floats) in the closed interval between p and q, i.e. within 4 double ulps of p. For
//   |p| >= 2^-126 (normal float range) the nearest such midpoints are odd multiples of 2^(e - 24): the doubles
//   of p's binade whose low 29 significand bits are 1 << 28 (midpoints of neighbouring binades are 2^-25
//   relative away, much farther than 4 ulps). So when the low 29 bits of p lie outside
//   [2^28 - 8, 2^28 + 7] (a window wider than the +-3 needed), (float)p == (float)q.
//   Coordinates with 0 < |(float)p| < 2^-125 (a float subnormal or near it, where the rounding points are
//   the subnormal midpoints, odd multiples of 2^-150) are recomputed too (the vector builds take the superset
//   0 < |x_j| < tiny_input_bound_bits(norm)); every other coordinate has |p| > 2^-126, where the above holds.
//   p == 0 only for x_j == 0, where both give the same signed zero.
//
// Each recomputed coordinate costs one division; random data needs one in about 3e7 coordinates (the window
// is 16 of 2^29 values), and the adversarial cases of tests/cpp/test_canonical.cpp (normalize_kernel_*:
// hundreds of coordinates where the product alone rounds to the other float) all go through the division.
// norm_sq keeps the order of the first implementation (8 interleaved partial sums, then
// ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)) + tail): the products are exact in double, and every
// build gives the same bits (the specification allows any order; this one never changed).
constexpr std::uint64_t kMidpointWindowMask = 0x1FFFFFF0ull;            // low 29 bits, less the window's 4
constexpr std::uint64_t kMidpointWindowStart = (1ull << 28) - 8;       // [2^28 - 8, 2^28 + 7]
constexpr float kSmallestExactUnit = 2.3509887e-38f;                   // 2^-125

// The bits of a float T with |x| < T for every x whose product x * (1 / norm) (double) can be below 2^-125:
// T >= 2^-125 * norm * (1 + 2^-40), rounded up to a float (at least the smallest subnormal). The vector
// builds redo the lanes with 0 < |x| < T (a superset of the lanes unit_needs_division calls tiny).
inline std::uint32_t tiny_input_bound_bits(double norm) {
  const double bound = norm * 2.3509887016445750e-38 * (1.0 + 0x1p-40);  // 2^-125 * norm * (1 + 2^-40)
  float rounded = static_cast<float>(bound);
  std::uint32_t bits;
  __builtin_memcpy(&bits, &rounded, sizeof bits);
  if (static_cast<double>(rounded) < bound) ++bits;  // round up (bits of non-negative floats are ordered)
  if (bits > 0x7F800000u) bits = 0x7F800000u;       // never beyond +inf (norm is finite here anyway)
  return bits == 0 ? 1u : bits;
}

inline bool unit_needs_division(double product, float rounded, float x) {
  std::uint64_t bits;
  __builtin_memcpy(&bits, &product, sizeof bits);
  const bool near_midpoint = ((bits - kMidpointWindowStart) & kMidpointWindowMask) == 0;
  const bool tiny = x != 0.0f && __builtin_fabsf(rounded) < kSmallestExactUnit;
  return near_midpoint || tiny;
}

inline float unit_coordinate(float x, double norm, double inv_norm) {
  const double product = static_cast<double>(x) * inv_norm;
  const float rounded = static_cast<float>(product);
  return unit_needs_division(product, rounded, x) ? static_cast<float>(static_cast<double>(x) / norm) : rounded;
}

inline double combine_partial_sums(const double* acc, double tail) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// The tail (dim % 8 trailing coordinates), summed in order.
inline double tail_sum_of_squares(const float* row, std::int64_t from, std::int64_t dim) {
  double tail = 0.0;
  for (std::int64_t j = from; j < dim; ++j) tail += static_cast<double>(row[j]) * static_cast<double>(row[j]);
  return tail;
}

// norms[r] = sqrt of row r's sum of squares for the vector builds, whose SumsOfSquares<R>(x, dim, out) sums R
// consecutive rows at once (R = 4 hides the accumulator chains' latency; the last rows % 4 one by one).
using SumsOfSquares = void (*)(const float* x, std::int64_t dim, double* norm_sq);
template <SumsOfSquares Four, SumsOfSquares One>
inline void row_norms(const float* x, std::int64_t dim, std::int64_t rows, double* norms) {
  std::int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    double norm_sq[4];
    Four(x + r * dim, dim, norm_sq);
    for (int k = 0; k < 4; ++k) norms[r + k] = __builtin_sqrt(norm_sq[k]);
  }
  for (; r < rows; ++r) {
    double norm_sq;
    One(x + r * dim, dim, &norm_sq);
    norms[r] = __builtin_sqrt(norm_sq);
  }
}

inline double norm_squared_scalar(const float* __restrict row, std::int64_t dim) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    for (int k = 0; k < 8; ++k) {
      const double value = static_cast<double>(row[j + k]);
      acc[k] += value * value;
    }
  }
  return combine_partial_sums(acc, tail_sum_of_squares(row, j, dim));
}

// u[from..dim) of one row (norm != 0), multiply and check (the vector builds' tails).
inline void unit_row_scalar(const float* __restrict row, std::int64_t from, std::int64_t dim, double norm,
                            double inv_norm, float* __restrict u) {
  for (std::int64_t i = from; i < dim; ++i) u[i] = unit_coordinate(row[i], norm, inv_norm);
}

// A hint for the rows the caller processes next (the encode streams its input once): their cache lines are
// requested while this tile is computed, one row per row, so that the loads overlap the arithmetic.
inline void prefetch_row(const float* row, std::int64_t dim) {
  const char* begin = reinterpret_cast<const char*>(row);
  const std::int64_t bytes = dim * static_cast<std::int64_t>(sizeof(float));
  for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(begin + b, 0, 3);
  __builtin_prefetch(begin + bytes - 1, 0, 3);
}

inline void normalize(const float* x, std::int64_t dim, std::int64_t rows, double* norms, float* unit,
                      std::int64_t unit_stride, const float* next, std::int64_t next_rows) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* __restrict row = x + r * dim;
    if (r < next_rows) prefetch_row(next + r * dim, dim);
    const double norm = __builtin_sqrt(norm_squared_scalar(row, dim));
    norms[r] = norm;
    float* __restrict u = unit + r * unit_stride;
    if (norm == 0.0) {
      for (std::int64_t i = 0; i < dim; ++i) u[i] = 0.0f;
    } else {  // the specification's division: scalar code has no cheaper exact way (a vectorizing compiler
              // turns this loop into 2-4 divisions per instruction)
      for (std::int64_t i = 0; i < dim; ++i) u[i] = static_cast<float>(static_cast<double>(row[i]) / norm);
    }
  }
  for (std::int64_t r = rows; r < next_rows; ++r) prefetch_row(next + r * dim, dim);
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

// Quantize and pack through the index bytes (any bits; the vector builds replace it for 1..4 bits).
inline void quantize_pack_bytes(const float* y, std::int64_t p, std::int64_t rows, const float* boundaries,
                                int num_boundaries, const PlaneLayout& layout, std::uint8_t* idx_scratch,
                                std::uint8_t* out, std::int64_t out_stride) {
  quantize_scalar(y, rows * p, boundaries, num_boundaries, idx_scratch);
  for (std::int64_t r = 0; r < rows; ++r) pack_indices_fast(layout, p, idx_scratch + r * p, out + r * out_stride);
}

// ---- packing index bits straight from boundary comparisons --------------------------------------------
// With 2^b - 1 strictly ascending boundaries the index (the number of boundaries <= y) is found bit by bit, highest
// first, as quantize_one's binary search does: bit b-1 = (y >= B[2^(b-1) - 1]); with the bits found so far
// forming the prefix P (i bits), the next bit is (y >= B[(2P + 1) 2^(b-1-i) - 1]). The vector builds compare W
// values at a time, choose each lane's threshold with a tree of blends on the bits found so far, and keep every
// bit as a mask over the W values; the planes (format.hpp: value j of a plane of width w at bit j*w, least
// significant first) are those masks interleaved.
template <int B>
struct BinarySearchThresholds {
  // The threshold index of prefix P at step i (i bits found): (2P + 1) * 2^(B-1-i) - 1.
  static constexpr int index(int i, int prefix) { return (2 * prefix + 1) * (1 << (B - 1 - i)) - 1; }
};

// Spreads the 8 bits of a byte to every 2nd / 4th bit (bit k -> bit 2k / 4k).
struct BitSpreadTables {
  std::uint16_t two[256];
  std::uint32_t four[256];
  constexpr BitSpreadTables() : two(), four() {
    for (unsigned b = 0; b < 256; ++b) {
      unsigned t2 = 0, t4 = 0;
      for (int k = 0; k < 8; ++k) {
        t2 |= ((b >> k) & 1u) << (2 * k);
        t4 |= ((b >> k) & 1u) << (4 * k);
      }
      two[b] = static_cast<std::uint16_t>(t2);
      four[b] = t4;
    }
  }
};
constexpr BitSpreadTables kBitSpread{};

// Stores the plane bytes of one chunk of `count` values (count * width / 8 rounded up, at most 8 bytes).
inline void store_plane_chunk(std::uint64_t packed, std::int64_t count, int width, std::uint8_t* dst) {
  const std::int64_t bytes = (count * width + 7) / 8;
  if (bytes == 8) {
    __builtin_memcpy(dst, &packed, 8);
  } else if (bytes == 4) {
    const std::uint32_t word = static_cast<std::uint32_t>(packed);
    __builtin_memcpy(dst, &word, 4);
  } else if (bytes == 2) {
    const std::uint16_t word = static_cast<std::uint16_t>(packed);
    __builtin_memcpy(dst, &word, 2);
  } else {
    for (std::int64_t k = 0; k < bytes; ++k) dst[k] = static_cast<std::uint8_t>(packed >> (8 * k));
  }
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
