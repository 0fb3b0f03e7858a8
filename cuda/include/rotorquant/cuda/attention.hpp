// Host-side API of the fused decode-attention kernels (library target rotorquant::cuda; docs/attention.md).
//
// Decode attention (one query position per sequence) computed directly on packed codes, flash-decoding style:
//   1. prepare:  per (sequence, query head): q' = q * s (key channel scales), q~ = Pi_k q' (the KV head's key
//                rotation), both pre-multiplied by scale * log2(e);
//   2. split:    one thread block per (split of the sequence, KV head, sequence) serves up to 8 query heads of that
//                KV head from one load of each code: unpack in registers, centroid lookup, scores
//                n_t * <q~, c[idx_t]>, an online softmax, values accumulated in the value rotation's domain;
//                one extra split per (KV head, sequence) covers the full-precision tokens (sinks + window);
//   3. combine:  merges the splits' (max, sum, accumulator), applies the inverse value rotation once per query
//                head, adds the full-precision part and the value mean, writes fp32 / fp16 / bf16.
// No host synchronization and no allocation happen in run(): the caller passes a workspace of
// workspace_bytes(...) bytes, so the launches can be captured in a CUDA graph.
//
// Supported (unsupported_reason() says why not otherwise): mse mode, key and value bits 2, 3 or 4 each,
// padded_dim == dim in {64, 128, 256}, rotations identity / dense / hadamard / planar / quat, norm dtype
// float16 or float32 (with or without norm correction), any number of query heads per KV head (GQA, MQA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rotorquant/cuda/codec.hpp"
#include "rotorquant/quantizer.hpp"

namespace rotorquant {
namespace cuda {

// Where the codes of token t (0-based among the codes) of sequence b and KV head h sit, as a row of the code arrays
// (indices row r at byte r * index_bytes, norm at byte r * norm_bytes):
//   contiguous (block_table == nullptr): r = b * batch_stride + h * head_stride + t
//   paged: r = (block_table[b * max_blocks_per_sequence + t / block_size] * num_kv_heads + h) * block_size
//              + t % block_size, block_size a power of two.
struct CodeLayout {
  std::int64_t batch_stride = 0;
  std::int64_t head_stride = 0;
  const std::int32_t* block_table = nullptr;  // device, (batch, max_blocks_per_sequence)
  std::int64_t max_blocks_per_sequence = 0;
  std::int64_t block_size = 0;
};

struct DecodeAttentionArgs {
  std::int64_t batch = 0;
  std::int64_t q_heads = 0;                    // a multiple of num_kv_heads
  const void* queries = nullptr;               // (batch, q_heads, head_dim) contiguous, in queries_dtype
  OutputDtype queries_dtype = OutputDtype::kFloat32;
  void* out = nullptr;                         // (batch, q_heads, head_dim) contiguous, in out_dtype
  OutputDtype out_dtype = OutputDtype::kFloat32;
  float scale = 0.0f;                          // softmax scale; <= 0 means 1 / sqrt(head_dim)
  // Codes (docs/format.md): indices and norms of keys and of values, rows as in `layout`.
  const std::uint8_t* key_indices = nullptr;
  const std::uint8_t* key_norms = nullptr;
  const std::uint8_t* value_indices = nullptr;
  const std::uint8_t* value_norms = nullptr;
  CodeLayout layout;
  const std::int32_t* code_lengths = nullptr;  // device, (batch): tokens held as codes per sequence (null: none)
  // Host bound >= every code length (sizes the split grid). Contiguous layout: the rows of tokens t < max_code_length
  // of every (b, h) must be addressable device memory (a code buffer of that capacity; the kernel may prefetch them
  // into L2 before it reads the lengths), though only tokens below code_lengths[b] are read.
  std::int64_t max_code_length = 0;
  // Full-precision tokens (sinks + recent window) in the original domain, centered as the KV cache stores them:
  // (batch, num_kv_heads, fp_capacity, head_dim) float32 contiguous; slots [0, fp_lengths[b]) are used.
  const float* fp_keys = nullptr;
  const float* fp_values = nullptr;
  const std::int32_t* fp_lengths = nullptr;    // device, (batch); null: no full-precision tokens
  std::int64_t fp_capacity = 0;
  // Exact re-parameterizations (device, (num_kv_heads, head_dim) float32; null = off): code scores use q * s
  // (keys were divided by s before quantizing); value_means are added to the output of rows that see a token.
  const float* key_scales = nullptr;
  const float* value_means = nullptr;
  // Optional masks (device bytes, non-zero = may attend): code_mask[b * code_mask_stride + t] for code token t,
  // fp_mask[b * fp_capacity + i] for full-precision slot i.
  const std::uint8_t* code_mask = nullptr;
  std::int64_t code_mask_stride = 0;
  const std::uint8_t* fp_mask = nullptr;
  void* workspace = nullptr;                   // device, >= workspace_bytes(batch, q_heads, max_code_length)
  std::size_t workspace_bytes = 0;
};

class DeviceDecodeAttention {
 public:
  // One key and one value quantizer per KV head (same parameters except the seed; as KVCache builds them).
  // ValueError when unsupported (the message says why) or the lists disagree; RuntimeError when CUDA fails.
  DeviceDecodeAttention(const std::vector<const Quantizer*>& key_quantizers,
                        const std::vector<const Quantizer*>& value_quantizers, int device = -1);
  ~DeviceDecodeAttention();
  DeviceDecodeAttention(const DeviceDecodeAttention&) = delete;
  DeviceDecodeAttention& operator=(const DeviceDecodeAttention&) = delete;

  // Empty when the fused kernels support this pair of quantizer parameters, else the reason.
  static std::string unsupported_reason(const QuantizerParams& keys, const QuantizerParams& values);

  int device() const { return device_; }
  std::int64_t num_kv_heads() const { return heads_; }
  std::int64_t head_dim() const { return dim_; }
  CodeSizes key_code_sizes() const { return key_sizes_; }
  CodeSizes value_code_sizes() const { return value_sizes_; }

  // Number of sequence splits run() uses for these sizes (>= 1), and the workspace it needs.
  std::int64_t num_splits(std::int64_t batch, std::int64_t q_heads, std::int64_t max_code_length) const;
  std::size_t workspace_bytes(std::int64_t batch, std::int64_t q_heads, std::int64_t max_code_length) const;

  // Asynchronous on `stream` (a cudaStream_t, nullptr = legacy default stream). ValueError for bad arguments.
  void run(const DecodeAttentionArgs& args, void* stream) const;

 private:
  void release() noexcept;

  int device_ = 0;
  int multiprocessor_count_ = 1;
  std::int64_t heads_ = 0, dim_ = 0;
  int key_bits_ = 0, value_bits_ = 0;
  RotationKind kind_ = RotationKind::kIdentity;
  NormDtype norm_dtype_ = NormDtype::kFloat16;
  CodeSizes key_sizes_{}, value_sizes_{};
  std::int64_t key_rotation_floats_ = 0, value_rotation_floats_ = 0;  // per head
  float hadamard_scale_ = 1.0f;
  // Device buffers: per-head rotation data (hadamard signs / dense M^T (keys) or M (values) / block matrices),
  // centroids (keys then values, 16 floats each).
  float* key_rotation_ = nullptr;
  float* value_rotation_ = nullptr;
  float* centroids_ = nullptr;
};

}  // namespace cuda
}  // namespace rotorquant
