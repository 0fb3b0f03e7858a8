// Host-side API of the fused CUDA codec (library target rotorquant::cuda).
//
// A DeviceQuantizer holds everything a rotorquant::Quantizer derives from its parameters (rotation
// parameters and the CPU's derived block / dense matrices, float32 codebook boundaries and centroids,
// the QJL matrix) in the memory of one CUDA device, and launches three fused kernels on raw device
// pointers and a caller's stream (no CUDA type in this header: streams are `void*` cudaStream_t):
//
//   encode:  x (n, dim) float32 -> codes (the four SoA arrays of docs/format.md, byte-identical to
//            Quantizer::encode on the CPU: the kernels follow "Canonical encode arithmetic" of
//            docs/format.md: fmaf chains in ascending order, no contraction elsewhere, ties -> upper cell).
//            One launch; x is read once.
//   decode:  codes -> (n, dim) float32 / float16 / bfloat16 (CPU result to ~1e-5 relative).
//   scores:  estimates of <q, x_j> on the codes (never decoding the set), grouped-query layout:
//            codes of `heads` KV heads (rows h*n .. h*n+n-1), queries (heads * group, dim) row-major
//            (query row h*group + g belongs to head h) -> out (heads, group, n) float32.
//            heads = 1, group = m gives Quantizer::inner_product's (m, n).
//
// Checks that need the data (non-finite input rows, norms overflowing the norm dtype, corrupted stored
// norms) are flagged by the kernels in a device status word; with check = true the call waits for its
// stream once at the end (one cudaStreamSynchronize) and throws ValueError naming the first bad row,
// like the CPU. With check = false the call is fully asynchronous and bad rows give unspecified codes.
// Calls that check are serialized per DeviceQuantizer (the status word is shared).
//
// Supported on the GPU: padded_dim <= kMaxDeviceCodecPaddedDim (any dim: padded to a multiple of 32 in
// registers), every rotation kind, bits 1..8 (mse) / 1..8 (prod), any qjl_dim. Others: ValueError.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "rotorquant/quantizer.hpp"

namespace rotorquant {
namespace cuda {

// Largest padded_dim the fused codec handles (a row lives in the registers of one warp).
constexpr std::int64_t kMaxDeviceCodecPaddedDim = 512;

enum class OutputDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

class DeviceRotation;
class DeviceQuantizerGroup;
namespace codec {
struct CodecArgs;   // kernel arguments (cuda/src/codec_kernels.cuh)
struct HeadTables;  // per-head tables of a multi-head launch (cuda/src/codec_kernels.cuh)
}  // namespace codec

class DeviceQuantizer {
 public:
  // Uploads the quantizer's derived data to `device` (-1: the current device); the caller's current
  // device is unchanged afterwards. ValueError for an unsupported padded_dim or a bad device index,
  // RuntimeError when CUDA fails.
  explicit DeviceQuantizer(const Quantizer& quantizer, int device = -1);
  ~DeviceQuantizer();
  DeviceQuantizer(const DeviceQuantizer&) = delete;
  DeviceQuantizer& operator=(const DeviceQuantizer&) = delete;

  int device() const { return device_; }
  const QuantizerParams& params() const { return params_; }
  CodeSizes code_sizes() const { return sizes_; }

  // x: n x dim float32 (device). out: the four device arrays sized as in Quantizer::code_sizes()
  // (indices may be null when there is no mse stage; signs / residual norms only in prod mode).
  void encode(const float* x, std::int64_t n, const CodesView& out, void* stream, bool check = true) const;
  // codes -> out (n, dim) in `dtype` (device memory).
  void decode(const ConstCodesView& codes, std::int64_t n, void* out, OutputDtype dtype, void* stream,
              bool check = true) const;
  // codes: heads * n codes; queries: (heads * group, dim) float32; out: (heads, group, n) float32.
  void scores(const ConstCodesView& codes, std::int64_t n, std::int64_t heads, const float* queries,
              std::int64_t group, float* out, void* stream, bool check = true) const;

 private:
  friend class DeviceQuantizerGroup;  // builds its per-head tables from these buffers
  void finish_checks(void* stream, const char* what, bool check) const;
  codec::CodecArgs code_args(const ConstCodesView& codes, std::int64_t n, const std::string& what) const;
  void release() noexcept;  // frees the device buffers (destructor, failed construction)

  QuantizerParams params_;
  CodeSizes sizes_;
  PlaneLayout layout_;
  int device_ = 0;
  int multiprocessor_count_ = 1;
  std::int64_t dim_ = 0, padded_dim_ = 0, qjl_dim_ = 0, columns_ = 0, qjl_columns_ = 0;
  int chunks_ = 1;  // coordinates per lane: padded_dim <= 32 * chunks_
  int mse_bits_ = 0;
  float zero_centroid_ = 0.0f;
  std::vector<float> boundaries_;  // the codebook's float32 boundaries on the host (fast encode kernel parameter)
  // Device buffers (one allocation each; null when unused).
  float* rotation_parameters_ = nullptr;  // hadamard signs (padded to 32 * chunks_ with zeros) / block params
  float* forward_matrix_ = nullptr;       // dense: M^T (padded_dim x columns_); blocks: derived k x k matrices
  float* inverse_matrix_ = nullptr;       // dense: M (padded_dim x columns_)
  std::uint32_t* dense_fragments_ = nullptr;  // dense, mse 2..4 bits, dim 64 / 128: fp16 M for the tensor-core encode
  float dense_error_base_ = 0.0f, dense_error_slope_ = 0.0f;  // its error bound (codec_encode_dense.cuh)
  float* qjl_transposed_ = nullptr;       // S^T (padded_dim x qjl_columns_) for encode and query projections
  float* qjl_matrix_ = nullptr;           // S (qjl_dim x columns_) for decode
  float* codebook_ = nullptr;             // boundaries (levels - 1) then centroids (levels), float32
  unsigned long long* status_ = nullptr;  // device: [first bad row, first overflow row]
  unsigned long long* host_status_ = nullptr;  // pinned mirror
  std::unique_ptr<DeviceRotation> rotation_;    // queries of scores
  mutable std::mutex check_mutex_;
};

// Where the rows of a multi-head call live. Head h (< heads), group g (< groups), row r (< n): the input row of
// encode (float32) / output row of decode (dtype) starts at element h * x_head_stride + g * x_group_stride + r * dim
// of x / out; its code is row h * code_head_stride + g * code_group_stride + r of each of the four code arrays
// (row k of a field at byte k * that field's bytes per vector). Strides count elements / code rows, >= 0; the code
// rows (and the decode output rows) of different (h, g, r) must not overlap. A group is e.g. one sequence of a
// batch: a (batch, heads, tokens, dim) tensor has x_head_stride = tokens * dim, x_group_stride = heads * tokens * dim.
struct HeadLayout {
  std::int64_t groups = 1;
  std::int64_t x_head_stride = 0, x_group_stride = 0;
  std::int64_t code_head_stride = 0, code_group_stride = 0;
};

// The codecs of several heads with the same quantizer parameters except the seed (the per-(layer, head) quantizers
// of a KV cache) on one device: one encode (decode) call covers every head and group in ONE kernel launch, with
// codes bit-identical to each head's DeviceQuantizer (and so to the CPU). Holds one DeviceQuantizer per head plus a
// device table of their per-head data; launches take raw device pointers and a caller's stream (see DeviceQuantizer
// for the checks: with check = true the call synchronizes once and reports the first bad (head, group, row)).
class DeviceQuantizerGroup {
 public:
  // quantizers: one per head, non-null, 1 .. 65535 of them, equal parameters except the seed (ValueError
  // otherwise); device -1: the current device. Kinds without a fused CUDA codec: ValueError (as DeviceQuantizer).
  DeviceQuantizerGroup(const std::vector<const Quantizer*>& quantizers, int device = -1);
  ~DeviceQuantizerGroup();
  DeviceQuantizerGroup(const DeviceQuantizerGroup&) = delete;
  DeviceQuantizerGroup& operator=(const DeviceQuantizerGroup&) = delete;

  int device() const { return device_; }
  std::int64_t heads() const { return static_cast<std::int64_t>(members_.size()); }
  const QuantizerParams& params() const { return members_.front()->params(); }
  CodeSizes code_sizes() const { return members_.front()->code_sizes(); }
  const DeviceQuantizer& head(std::int64_t h) const { return *members_.at(static_cast<std::size_t>(h)); }

  // Encodes heads() x layout.groups x n rows of x (float32) into the code arrays `out` (their base pointers).
  void encode(const float* x, std::int64_t n, const HeadLayout& layout, const CodesView& out, void* stream,
              bool check = true) const;
  // Decodes heads() x layout.groups x n codes into out (float32 / float16 / bfloat16 rows, x strides of layout).
  void decode(const ConstCodesView& codes, std::int64_t n, const HeadLayout& layout, void* out, OutputDtype dtype,
              void* stream, bool check = true) const;

 private:
  codec::CodecArgs launch_args(const ConstCodesView& codes, std::int64_t n, const HeadLayout& layout,
                               const std::string& what) const;
  void finish_checks(void* stream, const char* what, bool check, std::int64_t n, std::int64_t groups) const;
  void release() noexcept;

  std::vector<std::unique_ptr<DeviceQuantizer>> members_;
  int device_ = 0;
  codec::HeadTables* head_tables_ = nullptr;   // device: one entry per head
  unsigned long long* status_ = nullptr;       // device: [first bad row, first overflow row, first bad code]
  unsigned long long* host_status_ = nullptr;  // pinned mirror
  mutable std::mutex check_mutex_;
};

}  // namespace cuda
}  // namespace rotorquant
