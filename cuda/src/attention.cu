// DeviceDecodeAttention (attention.hpp): per-head rotation data and centroids on a CUDA device, argument checks
// and the three launches of attention_kernels.cuh (prepare, split, combine); the split launches are compiled per
// (head_dim, key bits) in attention_split.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attention_kernels.cuh"
#include "attention_launch.cuh"
#include "attention_mma.cuh"
#include "check.cuh"
#include "rotorquant/cuda/attention.hpp"
#include "rotorquant/decode_attention.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/rotation.hpp"

namespace rotorquant {
namespace cuda {

namespace {

using rotorquant::detail::expected_got;
constexpr const char* kContext = "cuda::DeviceDecodeAttention";
constexpr std::size_t kWorkspaceAlignment = 256;
// Split sizing (DeviceDecodeAttention::num_splits): a split spans a multiple of kSplitUnit tokens (one block
// iteration of the tensor-core kernel: 4 warps x 16 tokens); a block's fixed work (pair tables, query fragments, the
// block merge and its share of the combine) counts as kBlockOverheadTokens tokens; the grid is considered in waves of
// the blocks resident at once (resident_split_blocks per multiprocessor, the tensor-core kernel's occupancy).
constexpr std::int64_t kSplitUnit = attention::kSplitWarps * attention::kTileTokens;  // 64
constexpr std::int64_t kBlockOverheadTokens = 128;
constexpr std::int64_t kMaxSplits = 1024;
constexpr std::int64_t kMaxWaves = 8;
// The full-precision tokens (sinks + recent window) are split over up to kMaxWindowSlots slots of at least
// kWindowSlotTokens tokens each (a multiple of it), one SIMT block each per (KV head x head chunk, sequence): one block
// for 132 tokens took ~10 us of dependent rounds of loads at batch 1. The workspace always reserves kMaxWindowSlots
// (workspace_layout).
constexpr std::int64_t kMaxWindowSlots = 8;
constexpr std::int64_t kWindowSlotTokens = 32;
std::int64_t resident_split_blocks(std::int64_t dim) {  // the tensor-core kernel's __launch_bounds__ minimum
  return dim <= 128 ? attention::MmaShape<128>::kMinBlocks : attention::MmaShape<256>::kMinBlocks;
}

float* upload(const std::vector<float>& host) {
  if (host.empty()) return nullptr;
  float* device = nullptr;
  ROTORQUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device), host.size() * sizeof(float)), kContext);
  const cudaError_t error = cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  if (error != cudaSuccess) {
    cudaFree(device);
    detail::throw_cuda_error(error, "cudaMemcpy", kContext);
  }
  return device;
}

// Warps that merge one row in combine_kernel: with many splits (few rows, long contexts) a row's slots are spread over
// up to kCombineWarps warps (kCombinePartSlots: the spread), each keeping up to kCombineUnroll slots' loads in flight.
int combine_parts(std::int64_t splits) {
  int parts = 1;
  while (parts < attention::kCombineWarps && splits >= 2 * parts * attention::kCombinePartSlots) parts *= 2;
  return parts;
}

int heads_per_block(std::int64_t group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

std::size_t aligned(std::size_t bytes) { return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

struct WorkspaceLayout {
  std::size_t q_rot = 0, q_raw = 0, partial_acc = 0, partial_ml = 0, total = 0;
};

// Per query row: `splits` code slots and kMaxWindowSlots full-precision slots (a call uses KernelArgs::window_slots
// of them; the workspace size must not depend on the window's capacity, which workspace_bytes does not take).
WorkspaceLayout workspace_layout(std::int64_t rows, std::int64_t dim, std::int64_t splits) {
  WorkspaceLayout layout;
  const std::int64_t slots = splits + kMaxWindowSlots;
  const std::size_t query_bytes = aligned(static_cast<std::size_t>(rows * dim) * sizeof(float));
  layout.q_rot = 0;
  layout.q_raw = query_bytes;
  layout.partial_acc = 2 * query_bytes;
  layout.partial_ml = layout.partial_acc + aligned(static_cast<std::size_t>(rows * slots * dim) * sizeof(float));
  layout.total = layout.partial_ml + aligned(static_cast<std::size_t>(rows * slots * 2) * sizeof(float));
  return layout;
}

// ---- dispatch: P, then key bits (one translation unit each: attention_split.cu) ---------------------

template <int P>
void dispatch_heads(int heads, int key_bits, int value_bits, const attention::KernelArgs& a, dim3 grid,
                    std::int64_t rows, cudaStream_t stream) {
  const unsigned row_blocks = static_cast<unsigned>((rows + attention::kRowWarps - 1) / attention::kRowWarps);
  if (attention::prepare_launched(a)) {
    attention::prepare_queries_kernel<P><<<row_blocks, attention::kRowWarps * 32, 0, stream>>>(a);
  }
  switch (key_bits) {
    case 2: attention::launch_splits<P, 2>(heads, value_bits, a, grid, stream); break;
    case 3: attention::launch_splits<P, 3>(heads, value_bits, a, grid, stream); break;
    case 4: attention::launch_splits<P, 4>(heads, value_bits, a, grid, stream); break;
    default: throw ValueError(expected_got(std::string(kContext) + ": key bits", "2, 3 or 4", std::to_string(key_bits)));
  }
  const int rows_per_combine_block = attention::kCombineWarps / a.combine_parts;
  const unsigned combine_blocks = static_cast<unsigned>((rows + rows_per_combine_block - 1) / rows_per_combine_block);
  attention::launch_dependent(attention::combine_kernel<P>, dim3(combine_blocks), attention::kCombineWarps * 32, 0, stream, a);
}

void check_aligned(const void* pointer, std::size_t alignment, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % alignment != 0) {
    throw ValueError(expected_got(std::string(kContext) + ".run: " + name,
                                  "a device pointer aligned to " + std::to_string(alignment) + " bytes",
                                  "an unaligned pointer"));
  }
}

void check_non_null(const void* pointer, const char* name) {
  if (pointer == nullptr) throw ValueError(expected_got(std::string(kContext) + ".run: " + name, "a device pointer", "null"));
}

}  // namespace

std::string DeviceDecodeAttention::unsupported_reason(const QuantizerParams& keys, const QuantizerParams& values) {
  return decode_attention_unsupported_reason(keys, values);
}

DeviceDecodeAttention::DeviceDecodeAttention(const std::vector<const Quantizer*>& key_quantizers,
                                             const std::vector<const Quantizer*>& value_quantizers, int device) {
  if (key_quantizers.empty() || key_quantizers.size() != value_quantizers.size()) {
    throw ValueError(expected_got(std::string(kContext) + ": quantizers",
                                  "one key and one value quantizer per KV head (equal, non-zero counts)",
                                  std::to_string(key_quantizers.size()) + " key and " +
                                      std::to_string(value_quantizers.size()) + " value quantizers"));
  }
  for (std::size_t i = 0; i < key_quantizers.size(); ++i) {
    if (key_quantizers[i] == nullptr || value_quantizers[i] == nullptr) {
      throw ValueError(std::string(kContext) + ": expected non-null quantizers");
    }
  }
  const QuantizerParams key_params = key_quantizers[0]->params(), value_params = value_quantizers[0]->params();
  const std::string reason = unsupported_reason(key_params, value_params);
  if (!reason.empty()) throw ValueError(std::string(kContext) + ": unsupported quantizers: " + reason);
  auto same_except_seed = [](QuantizerParams a, QuantizerParams b) {
    a.seed = b.seed = 0;
    return a == b;
  };
  for (std::size_t i = 1; i < key_quantizers.size(); ++i) {
    if (!same_except_seed(key_quantizers[i]->params(), key_params) ||
        !same_except_seed(value_quantizers[i]->params(), value_params)) {
      throw ValueError(expected_got(std::string(kContext) + ": quantizer of KV head " + std::to_string(i),
                                    "the parameters of head 0 (except the seed)", "different parameters"));
    }
  }
  heads_ = static_cast<std::int64_t>(key_quantizers.size());
  dim_ = key_params.dim;
  key_bits_ = key_params.bits;
  value_bits_ = value_params.bits;
  kind_ = key_params.rotation;
  norm_dtype_ = key_params.norm_dtype;
  key_sizes_ = key_quantizers[0]->code_sizes();
  value_sizes_ = value_quantizers[0]->code_sizes();
  hadamard_scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim_)));

  // Per-head rotation data: what prepare (keys, forward) and combine (values, inverse) read.
  auto rotation_data = [&](const Rotation& rotation, bool forward) -> std::vector<float> {
    switch (rotation.kind()) {
      case RotationKind::kHadamard:
        return rotation.parameters();  // signs
      case RotationKind::kDense:
        return forward ? rotation.derived_matrices() : rotation.parameters();  // M^T / M, row-major p x p
      case RotationKind::kPlanar:
      case RotationKind::kQuat:
        return rotation.derived_matrices();  // k x k blocks, forward y = B v
      default:
        return {};
    }
  };
  std::vector<float> key_data, value_data;
  for (std::int64_t h = 0; h < heads_; ++h) {
    const std::vector<float> k = rotation_data(key_quantizers[static_cast<std::size_t>(h)]->rotation(), true);
    const std::vector<float> v = rotation_data(value_quantizers[static_cast<std::size_t>(h)]->rotation(), false);
    if (h == 0) {
      key_rotation_floats_ = static_cast<std::int64_t>(k.size());
      value_rotation_floats_ = static_cast<std::int64_t>(v.size());
    }
    if (static_cast<std::int64_t>(k.size()) != key_rotation_floats_ ||
        static_cast<std::int64_t>(v.size()) != value_rotation_floats_) {
      throw RuntimeError(std::string(kContext) + ": rotation data of KV head " + std::to_string(h) + " has the wrong size");
    }
    key_data.insert(key_data.end(), k.begin(), k.end());
    value_data.insert(value_data.end(), v.begin(), v.end());
  }
  std::vector<float> table(2 * attention::kTableSize, 0.0f);
  const std::vector<float>& kc = key_quantizers[0]->codebook()->centroids_f32();
  const std::vector<float>& vc = value_quantizers[0]->codebook()->centroids_f32();
  std::copy(kc.begin(), kc.end(), table.begin());
  std::copy(vc.begin(), vc.end(), table.begin() + attention::kTableSize);

  device_ = detail::resolve_device(device, kContext);
  detail::ScopedDevice scoped_device(device_, kContext);
  multiprocessor_count_ = detail::multiprocessor_count(device_, kContext);
  if (key_bits_ == 3) {  // the tensor-core kernel's byte-addressed 3-bit pair tables (attention_mma.cuh)
    int reserved = 0;
    ROTORQUANT_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device_), kContext);
    if (!attention::byte_table_fits_after(reserved)) {
      throw RuntimeError(std::string(kContext) + ": this device reserves " + std::to_string(reserved) +
                         " bytes of shared memory per block, which puts the 3-bit pair tables across a 64 KB "
                         "boundary; 3-bit keys are not supported on it");
    }
  }
  try {
    key_rotation_ = upload(key_data);
    value_rotation_ = upload(value_data);
    centroids_ = upload(table);
  } catch (...) {
    release();
    throw;
  }
}

DeviceDecodeAttention::~DeviceDecodeAttention() { release(); }

void DeviceDecodeAttention::release() noexcept {
  detail::release_on_device(device_, [this] {
    for (float** buffer : {&key_rotation_, &value_rotation_, &centroids_}) {
      if (*buffer) cudaFree(*buffer);
      *buffer = nullptr;
    }
  });
}

// The split count with the least modelled time waves(s) * (tokens_per_split(s) + kBlockOverheadTokens), waves(s) =
// ceil(s * blocks_per_split / resident blocks): whole waves of long splits rather than a partial last wave or an
// idle GPU (B = 1 at 128K tokens: 82 splits of 1600 tokens in one wave instead of 128 of 1024 in 1.55 waves; B = 1
// at 32K: 74 of 448 instead of 32 of 1024, 256 blocks for 660 resident). A pure function of its arguments and the
// device, so workspace_bytes and run agree.
std::int64_t DeviceDecodeAttention::num_splits(std::int64_t batch, std::int64_t q_heads,
                                               std::int64_t max_code_length) const {
  if (batch < 1 || q_heads < 1 || max_code_length < 1) return 1;
  const std::int64_t group = std::max<std::int64_t>(1, q_heads / heads_);
  const std::int64_t chunks = (group + heads_per_block(group) - 1) / heads_per_block(group);
  const std::int64_t blocks_per_split = batch * heads_ * chunks;
  const std::int64_t capacity = std::max<std::int64_t>(1, multiprocessor_count_ * resident_split_blocks(dim_));
  const std::int64_t units = (max_code_length + kSplitUnit - 1) / kSplitUnit;
  // For a given number of waves the most splits that fit are the cheapest (shortest splits), so only kMaxWaves
  // candidates are costed (the same minimum as trying every count; a few divisions per call on the decode path).
  const std::int64_t first_wave = (blocks_per_split + capacity - 1) / capacity;
  std::int64_t best = 1, best_cost = std::numeric_limits<std::int64_t>::max();
  for (std::int64_t waves = first_wave; waves < first_wave + kMaxWaves; ++waves) {
    const std::int64_t splits =
        std::max<std::int64_t>(1, std::min({kMaxSplits, units, waves * capacity / blocks_per_split}));
    const std::int64_t split_units = (units + splits - 1) / splits;
    const std::int64_t used = (units + split_units - 1) / split_units;  // splits that get tokens
    const std::int64_t cost =
        (used * blocks_per_split + capacity - 1) / capacity * (split_units * kSplitUnit + kBlockOverheadTokens);
    if (cost < best_cost) {
      best = used;
      best_cost = cost;
    }
  }
  return best;
}

std::size_t DeviceDecodeAttention::workspace_bytes(std::int64_t batch, std::int64_t q_heads,
                                                   std::int64_t max_code_length) const {
  if (batch < 1 || q_heads < 1) return 0;
  return workspace_layout(batch * q_heads, dim_, num_splits(batch, q_heads, max_code_length)).total;
}

void DeviceDecodeAttention::run(const DecodeAttentionArgs& args, void* stream) const {
  const std::string what = std::string(kContext) + ".run";
  auto fail = [&](const std::string& name, const std::string& expected, const std::string& got) {
    throw ValueError(expected_got(what + ": " + name, expected, got));
  };
  if (args.batch < 0) fail("batch", ">= 0", std::to_string(args.batch));
  if (args.batch == 0) return;
  if (args.q_heads < 1 || args.q_heads % heads_ != 0) {
    fail("q_heads", "a positive multiple of num_kv_heads = " + std::to_string(heads_), std::to_string(args.q_heads));
  }
  if (args.batch > std::numeric_limits<int>::max() / 2 || args.q_heads > 65535) {
    fail("batch x q_heads", "batch < 2^30 and q_heads <= 65535", std::to_string(args.batch) + " x " + std::to_string(args.q_heads));
  }
  if (args.max_code_length < 0 || args.max_code_length > std::numeric_limits<int>::max() / 2) {
    fail("max_code_length", "0 .. 2^30", std::to_string(args.max_code_length));
  }
  if (args.fp_capacity < 0 || args.fp_capacity > std::numeric_limits<int>::max() / 2) {
    fail("fp_capacity", "0 .. 2^30", std::to_string(args.fp_capacity));
  }
  if (!(std::isfinite(args.scale))) fail("scale", "a finite float (<= 0: 1/sqrt(head_dim))", "a non-finite value");
  check_non_null(args.queries, "queries");
  check_non_null(args.out, "out");
  check_aligned(args.queries, 4, "queries");
  check_aligned(args.out, 4, "out");
  const bool has_codes = args.code_lengths != nullptr && args.max_code_length > 0;
  if (has_codes) {
    check_non_null(args.key_indices, "key_indices");
    check_non_null(args.key_norms, "key_norms");
    check_non_null(args.value_indices, "value_indices");
    check_non_null(args.value_norms, "value_norms");
    check_aligned(args.key_indices, 8, "key_indices");
    check_aligned(args.value_indices, 8, "value_indices");
    const std::size_t norm_bytes = static_cast<std::size_t>(key_sizes_.norm_bytes);
    check_aligned(args.key_norms, norm_bytes, "key_norms");
    check_aligned(args.value_norms, norm_bytes, "value_norms");
    check_aligned(args.code_lengths, 4, "code_lengths");
    const CodeLayout& layout = args.layout;
    if (layout.block_table) {
      check_aligned(layout.block_table, 4, "block_table");
      if (layout.block_size < 1 || layout.block_size > (1 << 20) || (layout.block_size & (layout.block_size - 1)) != 0) {
        fail("block_size", "a power of two in [1, 2^20]", std::to_string(layout.block_size));
      }
      if (layout.max_blocks_per_sequence * layout.block_size < args.max_code_length) {
        fail("max_blocks_per_sequence * block_size", ">= max_code_length = " + std::to_string(args.max_code_length),
             std::to_string(layout.max_blocks_per_sequence * layout.block_size));
      }
    } else if (layout.batch_stride < 0 || layout.head_stride < 0) {
      fail("code strides", ">= 0 rows", std::to_string(layout.batch_stride) + ", " + std::to_string(layout.head_stride));
    }
    if (args.code_mask && args.code_mask_stride < args.max_code_length) {
      fail("code_mask_stride", ">= max_code_length = " + std::to_string(args.max_code_length),
           std::to_string(args.code_mask_stride));
    }
  }
  const bool has_fp = args.fp_lengths != nullptr && args.fp_capacity > 0;
  if (has_fp) {
    check_non_null(args.fp_keys, "fp_keys");
    check_non_null(args.fp_values, "fp_values");
    check_aligned(args.fp_keys, 16, "fp_keys");
    check_aligned(args.fp_values, 16, "fp_values");
    check_aligned(args.fp_lengths, 4, "fp_lengths");
  }
  if (args.key_scales) check_aligned(args.key_scales, 4, "key_scales");
  if (args.value_means) check_aligned(args.value_means, 4, "value_means");

  const std::int64_t rows = args.batch * args.q_heads;
  const std::int64_t max_length = has_codes ? args.max_code_length : 0;
  const std::int64_t splits = num_splits(args.batch, args.q_heads, max_length);
  const WorkspaceLayout layout = workspace_layout(rows, dim_, splits);
  if (args.workspace == nullptr || args.workspace_bytes < layout.total) {
    fail("workspace", ">= " + std::to_string(layout.total) + " bytes (workspace_bytes())",
         args.workspace == nullptr ? "null" : std::to_string(args.workspace_bytes) + " bytes");
  }
  check_aligned(args.workspace, kWorkspaceAlignment, "workspace");

  const std::int64_t group = args.q_heads / heads_;
  const int heads = heads_per_block(group);
  attention::KernelArgs a{};
  a.batch = static_cast<int>(args.batch);
  a.q_heads = static_cast<int>(args.q_heads);
  a.kv_heads = static_cast<int>(heads_);
  a.group = static_cast<int>(group);
  a.head_chunks = static_cast<int>((group + heads - 1) / heads);
  a.chunk_heads = heads;
  a.split_offset = 0;
  a.num_splits = static_cast<int>(splits);
  {
    const std::int64_t per_slot = (args.fp_capacity + kMaxWindowSlots - 1) / kMaxWindowSlots;
    const std::int64_t tokens = std::max<std::int64_t>(
        kWindowSlotTokens, (per_slot + kWindowSlotTokens - 1) / kWindowSlotTokens * kWindowSlotTokens);
    a.window_tokens = static_cast<int>(tokens);
    a.window_slots = has_fp ? static_cast<int>((args.fp_capacity + tokens - 1) / tokens) : 1;
  }
  a.combine_parts = combine_parts(splits);
  {
    // tokens per split: whole units (a multiple of 16, so tiles never straddle pages of >= 16 tokens)
    const std::int64_t units = (max_length + kSplitUnit - 1) / kSplitUnit;
    a.tokens_per_split = static_cast<int>(std::max<std::int64_t>(1, (units + splits - 1) / splits) * kSplitUnit);
  }
  a.queries = args.queries;
  a.queries_dtype = static_cast<int>(args.queries_dtype);
  a.out = args.out;
  a.out_dtype = static_cast<int>(args.out_dtype);
  const float scale = args.scale > 0.0f ? args.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim_)));
  a.scale_log2 = scale * attention::kLog2e;
  a.key_indices = args.key_indices;
  a.key_norms = args.key_norms;
  a.value_indices = args.value_indices;
  a.value_norms = args.value_norms;
  a.key_index_bytes = static_cast<int>(key_sizes_.index_bytes);
  a.value_index_bytes = static_cast<int>(value_sizes_.index_bytes);
  a.norm_bytes = static_cast<int>(key_sizes_.norm_bytes);
  a.batch_stride = args.layout.batch_stride;
  a.head_stride = args.layout.head_stride;
  a.block_table = args.layout.block_table;
  a.max_blocks = args.layout.max_blocks_per_sequence;
  if (args.layout.block_table) {
    int shift = 0;
    while ((std::int64_t{1} << shift) < args.layout.block_size) ++shift;
    a.block_shift = shift;
    a.block_mask = static_cast<int>(args.layout.block_size - 1);
  }
  a.code_lengths = has_codes ? args.code_lengths : nullptr;
  a.max_code_length = static_cast<int>(max_length);
  a.fp_keys = args.fp_keys;
  a.fp_values = args.fp_values;
  a.fp_lengths = has_fp ? args.fp_lengths : nullptr;
  a.fp_capacity = args.fp_capacity;
  a.key_scales = args.key_scales;
  a.value_means = args.value_means;
  a.code_mask = args.code_mask;
  a.code_mask_stride = args.code_mask_stride;
  a.fp_mask = args.fp_mask;
  a.kind = static_cast<int>(kind_);
  a.key_rotation = key_rotation_;
  a.value_rotation = value_rotation_;
  a.key_rotation_floats = key_rotation_floats_;
  a.value_rotation_floats = value_rotation_floats_;
  a.hadamard_scale = hadamard_scale_;
  a.centroids = centroids_;
  // The tensor-core kernel rotates the queries itself where the rotation is local (not dense) and the queries can be
  // read as 8-byte quads (attention_mma.cuh, RawQueries): no prepare launch to wait for.
  a.fused_rotation = args.queries_dtype != OutputDtype::kFloat32 && kind_ != RotationKind::kDense &&
                     reinterpret_cast<std::uintptr_t>(args.queries) % 8 == 0;
  char* base = static_cast<char*>(args.workspace);
  a.q_rot = reinterpret_cast<float*>(base + layout.q_rot);
  a.q_raw = reinterpret_cast<float*>(base + layout.q_raw);
  a.partial_acc = reinterpret_cast<float*>(base + layout.partial_acc);
  a.partial_ml = reinterpret_cast<float*>(base + layout.partial_ml);

  detail::ScopedDevice scoped_device(device_, kContext);
  const dim3 grid(static_cast<unsigned>(splits + a.window_slots), static_cast<unsigned>(heads_ * a.head_chunks),
                  static_cast<unsigned>(args.batch));
  if (grid.y > 65535 || grid.z > 65535) {
    fail("batch / heads", "batch <= 65535 and num_kv_heads x head chunks <= 65535",
         std::to_string(args.batch) + " / " + std::to_string(grid.y));
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dim_) {
    case 64: dispatch_heads<64>(heads, key_bits_, value_bits_, a, grid, rows, s); break;
    case 128: dispatch_heads<128>(heads, key_bits_, value_bits_, a, grid, rows, s); break;
    case 256: dispatch_heads<256>(heads, key_bits_, value_bits_, a, grid, rows, s); break;
    default: fail("head_dim", "64, 128 or 256", std::to_string(dim_));
  }
  detail::check_launch(what.c_str());
}

}  // namespace cuda
}  // namespace rotorquant
