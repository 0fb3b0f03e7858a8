// CUDA kernels of the fused decode attention (internal; launched by attention.cu and attention_split.cu,
// docs/attention.md).
//
// prepare (one warp per query row): q' = q * s, q~ = Pi_k q', both times scale * log2(e), into the workspace; launched
//   only where the tensor-core split kernel does not rotate the queries itself (prepare_launched), and then with a
//   full-precision window for q' alone.
// split (one block of kSplitWarps warps per (split, KV head x head chunk, sequence)): lanes are grouped L per
//   token, lane li of a group owning coordinates [li C, li C + C) of its token, so one step of a warp covers
//   32 / L tokens; the chunk's up to G query heads live in registers (G x C floats per lane). Per step: the
//   bit-plane words of those coordinates are loaded (one 2/4/8-byte load per plane), indices unpacked with
//   compile-time shifts, centroids read from a 32-entry shared table, partial dot products reduced over the L
//   lanes of the group by xor shuffles. Every warp keeps its own online-softmax state (scores in base 2) and
//   accumulates p_t n_t c[idx_t] into its G x C accumulator; warps and lane groups are merged once at the end,
//   and the block writes its (max, sum, accumulator) per query head into the workspace. The last split index
//   indices (num_splits .. num_splits + window_slots - 1) cover the full-precision tokens the same way, window_tokens
//   each, in the original domain. This SIMT kernel runs
//   float32 queries; float16 / bfloat16 queries take split_mma_kernel (attention_mma.cuh, tensor cores) for the code
//   tokens and this kernel, launched for the window's split indices only (split_offset), for the full-precision tokens.
// combine (one warp per query row): merges the splits, inverse value rotation of the code part, adds the
//   full-precision part and the value mean, converts to the output dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "warp_fwht.cuh"

namespace rotorquant {
namespace cuda {
namespace attention {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kSplitWarps = 4;
constexpr int kSteps = 4;          // token steps per warp iteration (loads of kSteps steps are in flight together)
constexpr int kRowWarps = 4;       // query rows per block in prepare
constexpr int kTableSize = 16;     // centroids per side (bits <= 4)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kRescaleThreshold = 8.0f;  // log2 units

// Kinds as template-free runtime values (rotorquant::RotationKind numbering).
constexpr int kIdentity = 0, kDense = 1, kHadamard = 2, kPlanar = 4, kQuat = 5;
// dtype codes (OutputDtype numbering)
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;

struct KernelArgs {
  int batch, q_heads, kv_heads, group, head_chunks;
  int num_splits, tokens_per_split;
  // the full-precision tokens' slots after the code splits (>= 1; one slot holding "no token" without them) and the
  // tokens each covers (a multiple of kSplitWarps x the SIMT kernel's tokens per step)
  int window_slots, window_tokens;
  int split_offset;  // split = blockIdx.x + split_offset (the full-precision-only launch of the tensor-core path)
  int chunk_heads;   // query heads per head chunk (heads_per_block)
  const void* queries;
  int queries_dtype;
  void* out;
  int out_dtype;
  float scale_log2;  // softmax scale * log2(e)
  const std::uint8_t* key_indices;
  const std::uint8_t* key_norms;
  const std::uint8_t* value_indices;
  const std::uint8_t* value_norms;
  int key_index_bytes, value_index_bytes, norm_bytes;
  std::int64_t batch_stride, head_stride;
  const std::int32_t* block_table;
  std::int64_t max_blocks;
  int block_shift, block_mask;
  const std::int32_t* code_lengths;
  int max_code_length;
  const float* fp_keys;
  const float* fp_values;
  const std::int32_t* fp_lengths;
  std::int64_t fp_capacity;
  const float* key_scales;
  const float* value_means;
  const std::uint8_t* code_mask;
  std::int64_t code_mask_stride;
  const std::uint8_t* fp_mask;
  int kind;
  const float* key_rotation;    // per head key_rotation_floats
  const float* value_rotation;  // per head value_rotation_floats
  std::int64_t key_rotation_floats, value_rotation_floats;
  float hadamard_scale;
  const float* centroids;  // keys [0, 16), values [16, 32)
  float* q_rot;            // (batch * q_heads, P)
  float* q_raw;            // (batch * q_heads, P)
  float* partial_acc;      // (batch * q_heads, slots_per_row, P)
  float* partial_ml;       // (batch * q_heads, slots_per_row, 2)
  int combine_parts;       // warps merging one row in combine_kernel: 1, 2, 4 or 8 (kCombineWarps)
  int fused_rotation;      // split_mma_kernel rotates the queries itself (attention_mma.cuh, RawQueries)
};

// Workspace slots of one query row: the code splits, then the full-precision window's slots.
__host__ __device__ __forceinline__ int slots_per_row(const KernelArgs& a) { return a.num_splits + a.window_slots; }

// Whether prepare_queries_kernel runs: always but with the fused rotation, then only for the full-precision window's
// q_raw. Without it the tensor-core split kernel is a programmatic dependent of the stream's previous kernel, whatever
// it is (attention_split.cu, attention_mma.cuh).
__host__ __device__ __forceinline__ bool prepare_launched(const KernelArgs& a) {
  return !a.fused_rotation || a.fp_lengths != nullptr;
}

__device__ __forceinline__ int h_of_row(const KernelArgs& a, std::int64_t row) {  // the row's KV head
  return static_cast<int>(row % a.q_heads) / a.group;
}

// Programmatic dependent launch (sm_90): wait for the previous kernel of the stream (a no-op when this kernel was not
// launched as its dependent), and let the next one launch early.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void grid_dependents_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float load_as_float(const void* base, int dtype, std::int64_t i) {
  if (dtype == kF16) return __half2float(static_cast<const __half*>(base)[i]);
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

__device__ __forceinline__ void store_from_float(void* base, int dtype, std::int64_t i, float value) {
  if (dtype == kF16) {
    static_cast<__half*>(base)[i] = __float2half_rn(value);
  } else if (dtype == kBF16) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(value);
  } else {
    static_cast<float*>(base)[i] = value;
  }
}

// ---- rotations of one row held by a warp (coordinates j = 32 c + lane) -----------------------------

// Applies one head's rotation data to v. Forward (prepare: the key rotation of a query): hadamard signs, butterflies,
// scale; dense y_i = sum_k M[i][k] v_k from M^T; planar / quat y_g = B_g v_g. Inverse (combine: the value rotation
// of an accumulator): butterflies, scale, signs; dense x_j = sum_i M[i][j] y_i from M; blocks x_g = B_g^T y_g.
// Both dense products read rows of the uploaded matrix (M^T for keys, M for values): out_j = sum_k data[k][j] v_k.
template <int P, bool kInverse>
__device__ __forceinline__ void warp_rotate_row(const KernelArgs& a, const float* rotation, float* row_buffer,
                                                float (&v)[P / 32], int lane) {
  constexpr int CP = P / 32;
  if (a.kind == kHadamard) {
    if (!kInverse) {
#pragma unroll
      for (int c = 0; c < CP; ++c) v[c] *= rotation[32 * c + lane];
    }
    codec::warp_fwht<CP>(v, P, lane);
#pragma unroll
    for (int c = 0; c < CP; ++c) v[c] *= kInverse ? a.hadamard_scale * rotation[32 * c + lane] : a.hadamard_scale;
    return;
  }
  if (a.kind == kIdentity) return;
#pragma unroll
  for (int c = 0; c < CP; ++c) row_buffer[32 * c + lane] = v[c];
  __syncwarp();
  if (a.kind == kDense) {
#pragma unroll
    for (int c = 0; c < CP; ++c) v[c] = 0.0f;
    for (int k = 0; k < P; ++k) {
      const float x = row_buffer[k];
#pragma unroll
      for (int c = 0; c < CP; ++c) v[c] = fmaf(__ldg(rotation + k * P + 32 * c + lane), x, v[c]);
    }
  } else {  // planar / quat: k x k blocks, row-major
    const int K = a.kind == kPlanar ? 2 : 4;
#pragma unroll
    for (int c = 0; c < CP; ++c) {
      const int i = 32 * c + lane, g = i / K, ii = i - g * K;
      const float* block = rotation + g * K * K;
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) {
        acc = fmaf(__ldg(block + (kInverse ? k * K + ii : ii * K + k)), row_buffer[g * K + k], acc);
      }
      v[c] = acc;
    }
  }
}

// ---- prepare ------------------------------------------------------------------------------------

template <int P>
__global__ void __launch_bounds__(kRowWarps * 32) prepare_queries_kernel(KernelArgs a) {
  constexpr int CP = P / 32;
  __shared__ float buffer[kRowWarps][P];
  grid_dependents_launch();  // the split kernel may start its pair tables (it waits before reading q_rot)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kRowWarps + warp;
  if (row >= static_cast<std::int64_t>(a.batch) * a.q_heads) return;
  const int h = h_of_row(a, row);
  float q[CP];
#pragma unroll
  for (int c = 0; c < CP; ++c) {
    const int j = 32 * c + lane;
    q[c] = load_as_float(a.queries, a.queries_dtype, row * P + j);
    a.q_raw[row * P + j] = q[c] * a.scale_log2;
    if (a.key_scales) q[c] *= a.key_scales[h * P + j];
  }
  if (a.fused_rotation) return;  // the split kernel rotates (only the window's q_raw is needed)
  warp_rotate_row<P, false>(a, a.key_rotation + h * a.key_rotation_floats, buffer[warp], q, lane);
#pragma unroll
  for (int c = 0; c < CP; ++c) a.q_rot[row * P + 32 * c + lane] = q[c] * a.scale_log2;
}

// ---- split --------------------------------------------------------------------------------------

// Bit-plane words of C consecutive coordinates starting at coordinate li * C of a P-coordinate code
// (docs/format.md section 3): lo = the (first) plane's bits, hi = the 1-bit plane (3 bits) or the upper word (4 bits,
// C = 16).
template <int Bits, int C, int P>
__device__ __forceinline__ void load_code_words(const std::uint8_t* code, int li, unsigned& lo, unsigned& hi) {
  if (Bits == 2) {
    if (C == 16) lo = __ldg(reinterpret_cast<const unsigned*>(code) + li);
    else lo = __ldg(reinterpret_cast<const unsigned short*>(code) + li);
    hi = 0u;
  } else if (Bits == 3) {
    if (C == 16) {
      lo = __ldg(reinterpret_cast<const unsigned*>(code) + li);
      hi = __ldg(reinterpret_cast<const unsigned short*>(code + P / 4) + li);
    } else {
      lo = __ldg(reinterpret_cast<const unsigned short*>(code) + li);
      hi = __ldg(code + P / 4 + li);
    }
  } else {
    if (C == 16) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(code) + li);
      lo = w.x;
      hi = w.y;
    } else {
      lo = __ldg(reinterpret_cast<const unsigned*>(code) + li);
      hi = 0u;
    }
  }
}

// Index of coordinate c (compile-time) among the C coordinates of the words.
template <int Bits, int C>
__device__ __forceinline__ int code_index(unsigned lo, unsigned hi, int c) {
  if (Bits == 2) return static_cast<int>((lo >> (2 * c)) & 3u);
  if (Bits == 3) return static_cast<int>((((lo >> (2 * c)) & 3u) << 1) | ((hi >> c) & 1u));
  if (C == 16 && c >= 8) return static_cast<int>((hi >> (4 * (c - 8))) & 15u);
  return static_cast<int>((lo >> (4 * c)) & 15u);
}

__device__ __forceinline__ float load_norm(const std::uint8_t* norms, std::int64_t row, int norm_bytes) {
  return norm_bytes == 2 ? __half2float(__ldg(reinterpret_cast<const __half*>(norms) + row))
                         : __ldg(reinterpret_cast<const float*>(norms) + row);
}

__device__ __forceinline__ std::int64_t code_row(const KernelArgs& a, int b, int h, int t) {
  if (a.block_table) {
    const std::int64_t block = __ldg(a.block_table + b * a.max_blocks + (t >> a.block_shift));
    return ((block * a.kv_heads + h) << a.block_shift) + (t & a.block_mask);
  }
  return b * a.batch_stride + h * a.head_stride + t;
}

// Online-softmax update of one warp with the scores (base 2) of its S steps; sc becomes the weights p.
// m is warp-uniform; l and acc are per lane group (summed over groups at the end).
template <int G, int C, int L, int S>
__device__ __forceinline__ void softmax_update(float (&sc)[S][G], float (&m)[G], float (&l)[G], float (&acc)[G][C]) {
#pragma unroll
  for (int hh = 0; hh < G; ++hh) {
    float mx = sc[0][hh];
#pragma unroll
    for (int s = 1; s < S; ++s) mx = fmaxf(mx, sc[s][hh]);
#pragma unroll
    for (int offset = L; offset < 32; offset <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, offset));
    // Lazy rescaling: the running max only moves when the tile max exceeds it by more than kRescaleThreshold
    // (base 2), so the accumulators are rescaled rarely; weights stay <= 2^kRescaleThreshold, exact either way
    // because the final normalization divides by the sum taken with the same max.
    if (mx == -INFINITY && m[hh] == -INFINITY) {
#pragma unroll
      for (int s = 0; s < S; ++s) sc[s][hh] = 0.0f;
      continue;
    }
    if (mx > m[hh] + kRescaleThreshold) {
      const float correction = fast_exp2(m[hh] - mx);  // 0 when m was -inf
      l[hh] *= correction;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[hh][c] *= correction;
      m[hh] = mx;
    }
    const float m_new = m[hh];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const float p = fast_exp2(sc[s][hh] - m_new);
      sc[s][hh] = p;
      l[hh] += p;
    }
  }
}

// The block's warps hold one online-softmax state each per query head (m, l in shared_m / shared_l, the
// accumulator in shared_acc, all G heads of the chunk): merges them and writes the block's (max, sum, accumulator)
// of query heads hq0 .. hq0 + nh - 1 into workspace slot `split`. Called after a __syncthreads().
template <int P, int G>
__device__ __forceinline__ void write_block_partials(const KernelArgs& a, const float (*shared_m)[G],
                                                     const float (*shared_l)[G], const float (*shared_acc)[G][P],
                                                     int b, int hq0, int nh, int split) {
  const int slots = slots_per_row(a);
  for (int e = threadIdx.x; e < nh * (P / 4); e += blockDim.x) {  // 4 coordinates per thread (16-byte accesses)
    const int hh = e / (P / 4), j = 4 * (e - hh * (P / 4));
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kSplitWarps; ++w) block_max = fmaxf(block_max, shared_m[w][hh]);
    float4 value = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float sum = 0.0f;
    if (block_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kSplitWarps; ++w) {
        const float weight = fast_exp2(shared_m[w][hh] - block_max);
        const float4 x = *reinterpret_cast<const float4*>(&shared_acc[w][hh][j]);
        value.x = fmaf(weight, x.x, value.x);
        value.y = fmaf(weight, x.y, value.y);
        value.z = fmaf(weight, x.z, value.z);
        value.w = fmaf(weight, x.w, value.w);
        sum = fmaf(weight, shared_l[w][hh], sum);
      }
    }
    const std::int64_t slot = (static_cast<std::int64_t>(b) * a.q_heads + hq0 + hh) * slots + split;
    *reinterpret_cast<float4*>(a.partial_acc + slot * P + j) = value;
    if (j == 0) {
      a.partial_ml[2 * slot] = block_max;
      a.partial_ml[2 * slot + 1] = sum;
    }
  }
}

// Coordinates per lane and the occupancy the register budget aims at: G query heads cost 2 G C registers
// (queries and accumulators). Measured on H100 (B = 32, 32K, G = 4): C = 16 at 2 blocks per SM (254 registers)
// ran 10-15% faster than C = 8 at 4 blocks per SM (128 registers), whose wider lane groups need more shuffles.
template <int G>
struct SplitShape {
  static constexpr int kCoordinates = G <= 4 ? 16 : 8;
  static constexpr int kMinBlocks = G <= 2 ? 4 : 2;
};

template <int P, int G, int KB, int VB>
__global__ void __launch_bounds__(kSplitWarps * 32, SplitShape<G>::kMinBlocks) split_kernel(KernelArgs a) {
  constexpr int C = SplitShape<G>::kCoordinates;  // coordinates per lane
  constexpr int L = P / C;            // lanes per token
  static_assert(L >= 1 && L <= 32, "P / C lanes per token must fit a warp");
  constexpr int TPS = 32 / L;         // tokens per step
  constexpr int S = kSteps;
  constexpr int kWarpTokens = TPS * S;
  __shared__ float table[2 * kTableSize];
  __shared__ float shared_m[kSplitWarps][G], shared_l[kSplitWarps][G];
  __shared__ __align__(16) float shared_acc[kSplitWarps][G][P];

  if (threadIdx.x < 2 * kTableSize) table[threadIdx.x] = a.centroids[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group_slot = lane / L, li = lane - group_slot * L;
  const int b = blockIdx.z;
  const int h = blockIdx.y / a.head_chunks, chunk = blockIdx.y - h * a.head_chunks;
  const int split = blockIdx.x + a.split_offset;
  const int hq0 = h * a.group + chunk * G;
  const int nh = min(G, a.group - chunk * G);
  const bool full_precision = split >= a.num_splits;

  float q[G][C];
  {
    const float* source = full_precision ? a.q_raw : a.q_rot;
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
      const float* row = source + (static_cast<std::int64_t>(b) * a.q_heads + hq0 + (hh < nh ? hh : 0)) * P + li * C;
#pragma unroll
      for (int c4 = 0; c4 < C / 4; ++c4) {
        const float4 v = hh < nh ? *reinterpret_cast<const float4*>(row + 4 * c4) : make_float4(0.f, 0.f, 0.f, 0.f);
        q[hh][4 * c4] = v.x;
        q[hh][4 * c4 + 1] = v.y;
        q[hh][4 * c4 + 2] = v.z;
        q[hh][4 * c4 + 3] = v.w;
      }
    }
  }
  float m[G], l[G], acc[G][C];
#pragma unroll
  for (int hh = 0; hh < G; ++hh) {
    m[hh] = -INFINITY;
    l[hh] = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[hh][c] = 0.0f;
  }

  if (!full_precision) {
    const int length = a.code_lengths ? min(__ldg(a.code_lengths + b), a.max_code_length) : 0;
    const int begin = split * a.tokens_per_split;
    const int end = min(begin + a.tokens_per_split, length);
    for (int base = begin + warp * kWarpTokens; base < end; base += kSplitWarps * kWarpTokens) {
      unsigned klo[S], khi[S], vlo[S], vhi[S];
      float kn[S], vn[S];
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int t = base + s * TPS + group_slot;
        bool valid = t < end;
        if (valid && a.code_mask) valid = __ldg(a.code_mask + b * a.code_mask_stride + t) != 0;
        if (valid) {
          const std::int64_t r = code_row(a, b, h, t);
          load_code_words<KB, C, P>(a.key_indices + r * a.key_index_bytes, li, klo[s], khi[s]);
          load_code_words<VB, C, P>(a.value_indices + r * a.value_index_bytes, li, vlo[s], vhi[s]);
          kn[s] = load_norm(a.key_norms, r, a.norm_bytes);
          vn[s] = load_norm(a.value_norms, r, a.norm_bytes);
        } else {
          klo[s] = khi[s] = vlo[s] = vhi[s] = 0u;
          kn[s] = -INFINITY;  // marks the token invalid
          vn[s] = 0.0f;
        }
      }
      float sc[S][G];
#pragma unroll
      for (int s = 0; s < S; ++s) {
        float part[G];
#pragma unroll
        for (int hh = 0; hh < G; ++hh) part[hh] = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const float centroid = table[code_index<KB, C>(klo[s], khi[s], c)];
#pragma unroll
          for (int hh = 0; hh < G; ++hh) part[hh] = fmaf(q[hh][c], centroid, part[hh]);
        }
#pragma unroll
        for (int offset = 1; offset < L; offset <<= 1)
#pragma unroll
          for (int hh = 0; hh < G; ++hh) part[hh] += __shfl_xor_sync(kFullMask, part[hh], offset);
#pragma unroll
        for (int hh = 0; hh < G; ++hh) sc[s][hh] = kn[s] == -INFINITY ? -INFINITY : part[hh] * kn[s];
      }
      softmax_update<G, C, L, S>(sc, m, l, acc);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        float w[G];
#pragma unroll
        for (int hh = 0; hh < G; ++hh) w[hh] = sc[s][hh] * vn[s];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const float centroid = table[kTableSize + code_index<VB, C>(vlo[s], vhi[s], c)];
#pragma unroll
          for (int hh = 0; hh < G; ++hh) acc[hh][c] = fmaf(w[hh], centroid, acc[hh][c]);
        }
      }
    }
  } else if (a.fp_lengths) {
    // this slot's tokens [first, end) of the sequence's full-precision tokens
    const int first = (split - a.num_splits) * a.window_tokens;
    const int end = min(min(static_cast<std::int64_t>(__ldg(a.fp_lengths + b)), a.fp_capacity),
                        static_cast<std::int64_t>(first) + a.window_tokens);
    const std::int64_t stream_row = (static_cast<std::int64_t>(b) * a.kv_heads + h) * a.fp_capacity + first;
    // The loop below takes one dependent round of loads per kSplitWarps * TPS tokens; its keys and values are first
    // brought into L2 at once (bulk prefetches of 16 KB, one per thread; fp_keys / fp_values are 16-byte aligned),
    // so those rounds wait for L2 rather than for DRAM.
    {
      constexpr int kChunk = 16384;
      const std::int64_t bytes = end > first ? static_cast<std::int64_t>(end - first) * P * 4 : 0;
      const int chunks = static_cast<int>((bytes + kChunk - 1) / kChunk);
      for (int i = threadIdx.x; i < 2 * chunks; i += blockDim.x) {
        const int chunk = i >> 1;
        const float* base = ((i & 1) ? a.fp_values : a.fp_keys) + stream_row * P;
        const std::int64_t left = bytes - static_cast<std::int64_t>(chunk) * kChunk;
        const unsigned size = static_cast<unsigned>(left < kChunk ? left : kChunk);
        const char* start = reinterpret_cast<const char*>(base) + static_cast<std::int64_t>(chunk) * kChunk;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(start), "r"(size) : "memory");
      }
    }
    for (int base = first + warp * TPS; base < end; base += kSplitWarps * TPS) {
      const int t = base + group_slot;
      bool valid = t < end;
      if (valid && a.fp_mask) valid = __ldg(a.fp_mask + b * a.fp_capacity + t) != 0;
      const std::int64_t offset = (stream_row + (valid ? t - first : 0)) * P + li * C;
      float sc[1][G];
      {
        float part[G];
#pragma unroll
        for (int hh = 0; hh < G; ++hh) part[hh] = 0.0f;
        if (valid) {
#pragma unroll
          for (int c4 = 0; c4 < C / 4; ++c4) {
            const float4 k = __ldg(reinterpret_cast<const float4*>(a.fp_keys + offset) + c4);
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
              part[hh] = fmaf(q[hh][4 * c4], k.x, part[hh]);
              part[hh] = fmaf(q[hh][4 * c4 + 1], k.y, part[hh]);
              part[hh] = fmaf(q[hh][4 * c4 + 2], k.z, part[hh]);
              part[hh] = fmaf(q[hh][4 * c4 + 3], k.w, part[hh]);
            }
          }
        }
#pragma unroll
        for (int o = 1; o < L; o <<= 1)
#pragma unroll
          for (int hh = 0; hh < G; ++hh) part[hh] += __shfl_xor_sync(kFullMask, part[hh], o);
#pragma unroll
        for (int hh = 0; hh < G; ++hh) sc[0][hh] = valid ? part[hh] : -INFINITY;
      }
      softmax_update<G, C, L, 1>(sc, m, l, acc);
      if (valid) {
#pragma unroll
        for (int c4 = 0; c4 < C / 4; ++c4) {
          const float4 v = __ldg(reinterpret_cast<const float4*>(a.fp_values + offset) + c4);
#pragma unroll
          for (int hh = 0; hh < G; ++hh) {
            acc[hh][4 * c4] = fmaf(sc[0][hh], v.x, acc[hh][4 * c4]);
            acc[hh][4 * c4 + 1] = fmaf(sc[0][hh], v.y, acc[hh][4 * c4 + 1]);
            acc[hh][4 * c4 + 2] = fmaf(sc[0][hh], v.z, acc[hh][4 * c4 + 2]);
            acc[hh][4 * c4 + 3] = fmaf(sc[0][hh], v.w, acc[hh][4 * c4 + 3]);
          }
        }
      }
    }
  }

  // Merge the lane groups of the warp (same coordinates, different tokens), then the warps of the block.
#pragma unroll
  for (int offset = L; offset < 32; offset <<= 1) {
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
      l[hh] += __shfl_xor_sync(kFullMask, l[hh], offset);
#pragma unroll
      for (int c = 0; c < C; ++c) acc[hh][c] += __shfl_xor_sync(kFullMask, acc[hh][c], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
      shared_m[warp][hh] = m[hh];
      shared_l[warp][hh] = l[hh];
    }
  }
  if (group_slot == 0) {
#pragma unroll
    for (int hh = 0; hh < G; ++hh)
#pragma unroll
      for (int c = 0; c < C; ++c) shared_acc[warp][hh][li * C + c] = acc[hh][c];
  }
  __syncthreads();
  write_block_partials<P, G>(a, shared_m, shared_l, shared_acc, b, hq0, nh, split);
}

// ---- combine ------------------------------------------------------------------------------------

// One row (query head of one sequence) is merged by a.combine_parts warps of a block (1, 2, 4 or 8): every warp finds the
// row's maximum and sum over all slots (lanes in parallel), warp `part` accumulates the code slots part, part + parts,
// ... kCombineUnroll at a time (independent loads in flight: few rows with many splits, as B = 1 at long contexts,
// would otherwise wait out one L2 round trip per split), and warp 0 of the row adds the others' sums from shared
// memory, the full-precision slot, rotates back and writes. A slot without tokens (maximum -inf) has no accumulator
// written (the full-precision slot when there is no window), so its loads are discarded, never multiplied.
// Launched as a programmatic dependent of the split launch (attention.cu, launch_dependent): it waits for the
// partials before its first read (the value means, an input of the call, are loaded before that). 8 slots per warp
// in flight instead of 4 (B = 1 / 128K: 2 rounds of L2 loads for 82 splits instead of 3): the tail after the split
// kernel 4.56 -> 4.16 us there, 3.70 -> 3.20 at B = 32 / 32K (H100, CUPTI); 16 instead of 8 (one round for 82 splits
// over 8 warps), with a row still spread over warps as for 8 (kCombinePartSlots): B = 1 / 128K 60.7 -> 59.9 us per
// call in graphs.
constexpr int kCombineUnroll = 16;
constexpr int kCombinePartSlots = 8;  // a row takes 2x more warps while it has >= 2 x warps x this many splits
constexpr int kCombineWarps = 8;  // warps per block: rows x parts

template <int P>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(KernelArgs a) {
  constexpr int CP = P / 32;
  __shared__ float buffer[kCombineWarps][P];
  // the next kernel may start: the next call's split kernel, a programmatic dependent, sets up its tables meanwhile
  // (it waits for this grid before reading anything)
  grid_dependents_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int parts = a.combine_parts, part = warp % parts;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (kCombineWarps / parts) + warp / parts;
  const bool valid = row < static_cast<std::int64_t>(a.batch) * a.q_heads;
  // the value means (an input of the call, not of the split kernel): loaded before the wait, off the tail
  const int h = valid ? h_of_row(a, row) : 0;
  float mean[CP];
#pragma unroll
  for (int c = 0; c < CP; ++c) {
    mean[c] = a.value_means && valid && part == 0 ? __ldg(a.value_means + h * P + 32 * c + lane) : 0.0f;
  }
  grid_dependency_wait();
  const int slots = slots_per_row(a);
  const float* ml = a.partial_ml + (valid ? row : 0) * slots * 2;
  float row_max = -INFINITY;
  if (valid)
    for (int s = lane; s < slots; s += 32) row_max = fmaxf(row_max, ml[2 * s]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, offset));
  float rotated[CP];
#pragma unroll
  for (int c = 0; c < CP; ++c) rotated[c] = 0.0f;
  if (row_max != -INFINITY) {  // false for an invalid row (the barrier below is reached by every warp)
    const float* acc = a.partial_acc + row * slots * P + lane;
    for (int s0 = part; s0 < a.num_splits; s0 += kCombineUnroll * parts) {
      float weight[kCombineUnroll], x[kCombineUnroll][CP];
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) {
        const int s = s0 + u * parts;
        const float m = s < a.num_splits ? ml[2 * s] : -INFINITY;
        weight[u] = m == -INFINITY ? 0.0f : fast_exp2(m - row_max);
#pragma unroll
        for (int c = 0; c < CP; ++c) x[u][c] = m == -INFINITY ? 0.0f : acc[s * P + 32 * c];
      }
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u)
#pragma unroll
        for (int c = 0; c < CP; ++c) rotated[c] = fmaf(weight[u], x[u][c], rotated[c]);
    }
  }
  if (parts > 1) {
    if (part != 0) {
#pragma unroll
      for (int c = 0; c < CP; ++c) buffer[warp][32 * c + lane] = rotated[c];
    }
    __syncthreads();
    if (part == 0) {
      for (int w = warp + 1; w < warp + parts; ++w)
#pragma unroll
        for (int c = 0; c < CP; ++c) rotated[c] += buffer[w][32 * c + lane];
    }
    __syncthreads();  // buffer[warp] is the rotation's scratch below
  }
  if (!valid || part != 0) return;
  if (row_max == -INFINITY) {  // the row sees no token: zeros (as the CPU KVCache)
#pragma unroll
    for (int c = 0; c < CP; ++c) store_from_float(a.out, a.out_dtype, row * P + 32 * c + lane, 0.0f);
    return;
  }
  float sum = 0.0f;
  for (int s = lane; s < slots; s += 32) {
    if (ml[2 * s] != -INFINITY) sum += fast_exp2(ml[2 * s] - row_max) * ml[2 * s + 1];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
  float exact[CP];  // the full-precision slots, in the original domain
#pragma unroll
  for (int c = 0; c < CP; ++c) exact[c] = 0.0f;
  for (int s = a.num_splits; s < slots; ++s) {
    const float window_max = ml[2 * s];
    if (window_max == -INFINITY) continue;  // no token there: nothing written
    const float window_weight = fast_exp2(window_max - row_max);
    const float* window = a.partial_acc + (row * slots + s) * P;
#pragma unroll
    for (int c = 0; c < CP; ++c) exact[c] = fmaf(window_weight, window[32 * c + lane], exact[c]);
  }
  // Inverse value rotation of the code part (x = Pi_v^T y).
  warp_rotate_row<P, true>(a, a.value_rotation + h * a.value_rotation_floats, buffer[warp], rotated, lane);
  const float inverse_sum = 1.0f / sum;
#pragma unroll
  for (int c = 0; c < CP; ++c) {
    const int j = 32 * c + lane;
    float value = (rotated[c] + exact[c]) * inverse_sum;
    if (a.value_means) value += mean[c];
    store_from_float(a.out, a.out_dtype, row * P + j, value);
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace rotorquant
