// DeviceQuantizer (codec.hpp): a Quantizer's derived data on a CUDA device and the launches of the
// fused codec kernels (codec_kernels.cuh; the general encode / decode kernels are compiled per rotation kind in
// codec_dispatch.cu). Compiled with --fmad=false (see CMakeLists.txt).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "check.cuh"
#include "codec_encode_dense.hpp"
#include "codec_encode_fast.hpp"
#include "codec_kernels.cuh"
#include "codec_launch.hpp"
#include "resident_blocks.hpp"
#include "rotorquant/cuda/codec.hpp"
#include "rotorquant/cuda/rotation.hpp"
#include "rotorquant/error.hpp"

namespace rotorquant {
namespace cuda {

namespace {

using rotorquant::detail::expected_got;
constexpr unsigned long long kNoRow = ~0ull;

template <typename T>
T* upload(const std::vector<T>& host, const char* context) {
  if (host.empty()) return nullptr;
  T* device = nullptr;
  ROTORQUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device), host.size() * sizeof(T)), context);
  const cudaError_t error = cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  if (error != cudaSuccess) {
    cudaFree(device);
    detail::throw_cuda_error(error, "cudaMemcpy", context);
  }
  return device;
}

// rows x cols row-major `source` copied into rows x padded_cols with zero columns appended.
std::vector<float> pad_columns(const float* source, std::int64_t rows, std::int64_t cols, std::int64_t padded_cols) {
  std::vector<float> out(static_cast<std::size_t>(rows * padded_cols), 0.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(out.data() + r * padded_cols, source + r * cols, static_cast<std::size_t>(cols) * sizeof(float));
  }
  return out;
}

int chunks_for(std::int64_t padded_dim) {
  int chunks = 1;
  while (32 * chunks < padded_dim) chunks *= 2;
  return chunks;
}

// ---- dispatch: kind (one translation unit each: codec_dispatch.cu), then chunks -------------------

void dispatch(RotationKind kind, int chunks, const float* x, const codec::CodecArgs& args, void* out,
              OutputDtype dtype, bool encode, int sms, cudaStream_t stream) {
  switch (kind) {
    case RotationKind::kIdentity:
      return codec::dispatch_chunks<codec::kIdentity>(chunks, x, args, out, dtype, encode, sms, stream);
    case RotationKind::kDense:
      return codec::dispatch_chunks<codec::kDense>(chunks, x, args, out, dtype, encode, sms, stream);
    case RotationKind::kHadamard:
      return codec::dispatch_chunks<codec::kHadamard>(chunks, x, args, out, dtype, encode, sms, stream);
    case RotationKind::kRotor3:
      return codec::dispatch_chunks<codec::kRotor3>(chunks, x, args, out, dtype, encode, sms, stream);
    case RotationKind::kPlanar:
      return codec::dispatch_chunks<codec::kPlanar>(chunks, x, args, out, dtype, encode, sms, stream);
    case RotationKind::kQuat:
      return codec::dispatch_chunks<codec::kQuat>(chunks, x, args, out, dtype, encode, sms, stream);
  }
  throw ValueError("cuda::DeviceQuantizer: unknown rotation kind");
}

template <int C>
void launch_scores_typed(const codec::CodecArgs& args, std::int64_t n, std::int64_t heads, const float* queries,
                         const float* projected, int group, float* out, int sms, cudaStream_t stream,
                         const char* context) {
  const std::size_t shared_floats = static_cast<std::size_t>(codec::kScoreCodes) * (args.padded_dim + 1) +
                                    (args.prod ? static_cast<std::size_t>(codec::kScoreCodes) * (args.qjl_dim + 1) : 0) +
                                    2 * codec::kScoreCodes;
  const std::size_t shared_bytes = shared_floats * sizeof(float);
  ROTORQUANT_CUDA_CHECK(cudaFuncSetAttribute(codec::scores_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(shared_bytes)),
                        context);
  const std::int64_t tiles = (n + codec::kScoreCodes - 1) / codec::kScoreCodes;
  const std::int64_t cap = std::max<std::int64_t>(1, static_cast<std::int64_t>(sms) * 16 / std::max<std::int64_t>(1, heads));
  const dim3 grid(static_cast<unsigned>(std::max<std::int64_t>(1, std::min(tiles, cap))), static_cast<unsigned>(heads));
  codec::scores_kernel<C><<<grid, codec::kScoreWarps * 32, shared_bytes, stream>>>(args, n, queries, projected, group,
                                                                                  out);
}

// The status words of the input checks (docs/cuda_codec.md): three row indices, kNoRow when nothing was found, in
// device memory with a pinned host mirror.
constexpr std::size_t kStatusBytes = 4 * sizeof(unsigned long long);

void allocate_status(unsigned long long*& status, unsigned long long*& host_status, const char* context) {
  ROTORQUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&status), kStatusBytes), context);
  ROTORQUANT_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_status), kStatusBytes), context);
}

void free_status(unsigned long long*& status, unsigned long long*& host_status) noexcept {
  if (status) cudaFree(status);
  status = nullptr;
  if (host_status) cudaFreeHost(host_status);
  host_status = nullptr;
}

void reset_status(unsigned long long* status, cudaStream_t stream, const std::string& what) {
  ROTORQUANT_CUDA_CHECK(cudaMemsetAsync(status, 0xFF, 3 * sizeof(unsigned long long), stream), what.c_str());
}

// Copies the status back (synchronizing the stream) and throws the first problem a kernel reported: row_at / code_at
// name a reported index in the message ("row 5", "code 5", or a head / group / row position).
template <typename RowAt, typename CodeAt>
void raise_reported(const unsigned long long* status, unsigned long long* host_status, cudaStream_t stream,
                    const char* what, NormDtype norm_dtype, RowAt row_at, CodeAt code_at) {
  ROTORQUANT_CUDA_CHECK(
      cudaMemcpyAsync(host_status, status, 3 * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream), what);
  ROTORQUANT_CUDA_CHECK(cudaStreamSynchronize(stream), what);
  const std::string name(what);
  if (host_status[0] != kNoRow) {
    throw ValueError(name + ": " + row_at(host_status[0]) +
                     " contains non-finite values (NaN or Inf): expected finite values");
  }
  if (host_status[1] != kNoRow) {
    throw ValueError(name + ": the norm of " + row_at(host_status[1]) + " overflows " + norm_dtype_name(norm_dtype) +
                     (norm_dtype == NormDtype::kFloat16 ? ": expected norms <= 65504, use norm_dtype=\"float32\""
                                                        : ": expected norms <= 3.4e38"));
  }
  if (host_status[2] != kNoRow) {
    throw ValueError(expected_got(name + ": stored norm of " + code_at(host_status[2]), "a finite value >= 0",
                                  "a corrupted value"));
  }
}

}  // namespace

DeviceQuantizer::DeviceQuantizer(const Quantizer& quantizer, int device)
    : params_(quantizer.params()), sizes_(quantizer.code_sizes()), layout_(quantizer.layout()) {
  const char* context = "cuda::DeviceQuantizer";
  dim_ = quantizer.dim();
  padded_dim_ = quantizer.padded_dim();
  qjl_dim_ = quantizer.qjl_dim();
  mse_bits_ = quantizer.mse_bits();
  if (padded_dim_ > kMaxDeviceCodecPaddedDim) {
    throw ValueError(expected_got(std::string(context) + ": padded_dim on the GPU",
                                  "<= " + std::to_string(kMaxDeviceCodecPaddedDim) +
                                      " (a row lives in the registers of one warp); use the CPU for larger dims",
                                  std::to_string(padded_dim_)));
  }
  if (params_.mode == QuantizerMode::kProd && qjl_dim_ > 4 * kMaxDeviceCodecPaddedDim) {
    throw ValueError(expected_got(std::string(context) + ": qjl_dim on the GPU",
                                  "<= " + std::to_string(4 * kMaxDeviceCodecPaddedDim), std::to_string(qjl_dim_)));
  }
  chunks_ = chunks_for(padded_dim_);
  columns_ = 32 * chunks_;
  qjl_columns_ = qjl_dim_ == 0 ? 0 : (qjl_dim_ + columns_ - 1) / columns_ * columns_;

  device_ = detail::resolve_device(device, context);
  detail::ScopedDevice scoped_device(device_, context);
  multiprocessor_count_ = detail::multiprocessor_count(device_, context);

  const Rotation& rotation = quantizer.rotation();
  const std::int64_t p = padded_dim_;
  try {
    switch (rotation.kind()) {
      case RotationKind::kHadamard: {
        std::vector<float> signs(static_cast<std::size_t>(columns_), 0.0f);
        std::copy(rotation.parameters().begin(), rotation.parameters().end(), signs.begin());
        rotation_parameters_ = upload(signs, context);
        break;
      }
      case RotationKind::kDense: {
        const std::vector<float>& transposed = rotation.derived_matrices();  // M^T
        if (static_cast<std::int64_t>(transposed.size()) != p * p) {
          throw RuntimeError(std::string(context) + ": dense derived matrix has the wrong size");
        }
        forward_matrix_ = upload(pad_columns(transposed.data(), p, p, columns_), context);
        inverse_matrix_ = upload(pad_columns(rotation.parameters().data(), p, p, columns_), context);
        if (params_.mode == QuantizerMode::kMSE && mse_bits_ >= 2 && mse_bits_ <= 4 && dim_ == p) {
          const codec::DenseEncodePlan plan = codec::make_dense_encode_plan(rotation.parameters().data(),
                                                                            static_cast<int>(p));
          dense_fragments_ = upload(plan.fragments, context);  // null when no plan covers p
          dense_error_base_ = plan.base;
          dense_error_slope_ = plan.slope;
        }
        break;
      }
      case RotationKind::kRotor3:
      case RotationKind::kPlanar:
      case RotationKind::kQuat: {
        const int k = rotation.kind() == RotationKind::kRotor3 ? 3 : rotation.kind() == RotationKind::kPlanar ? 2 : 4;
        if (static_cast<std::int64_t>(rotation.derived_matrices().size()) != p * k) {
          throw RuntimeError(std::string(context) + ": block matrices have the wrong size");
        }
        forward_matrix_ = upload(rotation.derived_matrices(), context);
        break;
      }
      case RotationKind::kIdentity: break;
      default:
        throw ValueError(expected_got(std::string(context) + ": rotation kind",
                                      "identity, dense, hadamard, rotor3, planar or quat (kinds with a fused kernel)",
                                      rotation.kind_name()));
    }
    if (const LloydMaxCodebook* codebook = quantizer.codebook()) {
      std::vector<float> table(codebook->boundaries_f32());
      table.insert(table.end(), codebook->centroids_f32().begin(), codebook->centroids_f32().end());
      codebook_ = upload(table, context);
      zero_centroid_ = codebook->centroids_f32()[static_cast<std::size_t>(codebook->quantize(0.0f))];
      boundaries_ = codebook->boundaries_f32();
    }
    if (params_.mode == QuantizerMode::kProd) {
      const std::vector<float>& s = quantizer.qjl_matrix();
      if (static_cast<std::int64_t>(s.size()) != qjl_dim_ * p) {
        throw RuntimeError(std::string(context) + ": QJL matrix has the wrong size");
      }
      std::vector<float> transposed(static_cast<std::size_t>(p * qjl_columns_), 0.0f);
      for (std::int64_t i = 0; i < qjl_dim_; ++i)
        for (std::int64_t j = 0; j < p; ++j) transposed[static_cast<std::size_t>(j * qjl_columns_ + i)] = s[static_cast<std::size_t>(i * p + j)];
      qjl_transposed_ = upload(transposed, context);
      qjl_matrix_ = upload(pad_columns(s.data(), qjl_dim_, p, columns_), context);
    }
    allocate_status(status_, host_status_, context);
    if (rotation.kind() != RotationKind::kHadamard || p <= kMaxDeviceHadamardPaddedDim) {
      rotation_ = std::make_unique<DeviceRotation>(rotation, device_);
    }
  } catch (...) {
    release();
    throw;
  }
}

DeviceQuantizer::~DeviceQuantizer() { release(); }

void DeviceQuantizer::release() noexcept {
  detail::release_on_device(device_, [this] {
    for (float** buffer : {&rotation_parameters_, &forward_matrix_, &inverse_matrix_, &qjl_transposed_, &qjl_matrix_,
                           &codebook_}) {
      if (*buffer) cudaFree(*buffer);
      *buffer = nullptr;
    }
    if (dense_fragments_) cudaFree(dense_fragments_);
    dense_fragments_ = nullptr;
    free_status(status_, host_status_);
  });
}

namespace {

void check_count(std::int64_t n, const std::string& what, const char* name) {
  if (n < 0) throw ValueError(expected_got(what + ": " + name, ">= 0", std::to_string(n)));
}

void check_pointer(const void* pointer, const std::string& what, const char* name) {
  if (pointer == nullptr) throw ValueError(expected_got(what + ": " + name, "a non-null device pointer", "null"));
}

void check_alignment(const void* pointer, std::size_t alignment, const std::string& what, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % alignment != 0) {
    throw ValueError(expected_got(what + ": " + name, "a pointer aligned to " + std::to_string(alignment) + " bytes",
                                  "an unaligned pointer"));
  }
}

codec::PlaneInfo plane_info(const PlaneLayout& layout) {
  codec::PlaneInfo info{};
  info.num_planes = layout.num_planes;
  for (int p = 0; p < 4; ++p) {
    info.width[p] = layout.width[p] == 0 ? 1 : layout.width[p];
    info.shift[p] = layout.shift[p];
    info.offset[p] = static_cast<int>(layout.plane_offset[p]);
    info.bytes[p] = static_cast<int>(layout.plane_bytes[p]);
  }
  return info;
}

}  // namespace

void DeviceQuantizer::finish_checks(void* stream, const char* what, bool check) const {
  detail::check_launch(what);
  if (!check) return;
  raise_reported(
      status_, host_status_, static_cast<cudaStream_t>(stream), what, params_.norm_dtype,
      [](unsigned long long row) { return "row " + std::to_string(row); },
      [](unsigned long long code) { return "code " + std::to_string(code); });
}

// The arguments every kernel takes: the code arrays of `n` vectors (checked for presence and norm alignment)
// and the quantizer's device tables.
codec::CodecArgs DeviceQuantizer::code_args(const ConstCodesView& codes, std::int64_t n, const std::string& what) const {
  const bool prod = params_.mode == QuantizerMode::kProd;
  if (mse_bits_ > 0) check_pointer(codes.indices, what, "indices");
  check_pointer(codes.norms, what, "norms");
  check_alignment(codes.norms, sizes_.norm_bytes, what, "norms");
  if (prod) {
    check_pointer(codes.qjl_signs, what, "qjl_signs");
    check_pointer(codes.residual_norms, what, "residual_norms");
    check_alignment(codes.residual_norms, sizes_.norm_bytes, what, "residual_norms");
  }
  codec::CodecArgs args{};
  args.n = n;
  args.dim = static_cast<int>(dim_);
  args.padded_dim = static_cast<int>(padded_dim_);
  args.indices = const_cast<std::uint8_t*>(codes.indices);
  args.norms = const_cast<std::uint8_t*>(codes.norms);
  args.signs = const_cast<std::uint8_t*>(codes.qjl_signs);
  args.residual_norms = const_cast<std::uint8_t*>(codes.residual_norms);
  args.index_bytes = static_cast<int>(sizes_.index_bytes);
  args.sign_bytes = static_cast<int>(sizes_.sign_bytes);
  args.norm_bytes = static_cast<int>(sizes_.norm_bytes);
  args.planes = plane_info(layout_);
  args.codebook = codebook_;
  args.levels = mse_bits_ > 0 ? (1 << mse_bits_) : 0;
  args.rotation_parameters = rotation_parameters_;
  args.forward_matrix = forward_matrix_;
  args.inverse_matrix = inverse_matrix_;
  args.columns = static_cast<int>(columns_);
  args.hadamard_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(padded_dim_)));
  args.prod = prod;
  args.qjl_dim = static_cast<int>(qjl_dim_);
  args.qjl_columns = static_cast<int>(qjl_columns_);
  args.qjl_transposed = qjl_transposed_;
  args.qjl_matrix = qjl_matrix_;
  args.status = status_;
  return args;
}

void DeviceQuantizer::encode(const float* x, std::int64_t n, const CodesView& out, void* stream, bool check) const {
  const std::string what = "cuda::DeviceQuantizer::encode";
  check_count(n, what, "n");
  if (n == 0) return;
  check_pointer(x, what, "x");
  codec::CodecArgs args = code_args(ConstCodesView{out.indices, out.norms, out.qjl_signs, out.residual_norms}, n,
                                    what);
  args.words_ok_indices = sizes_.index_bytes % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.indices) % 4 == 0 &&
                          padded_dim_ % 32 == 0;
  args.words_ok_signs = sizes_.sign_bytes % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.qjl_signs) % 4 == 0;
  args.norm_correction = params_.norm_correction;

  detail::ScopedDevice scoped_device(device_, what.c_str());
  std::unique_lock<std::mutex> lock(check_mutex_, std::defer_lock);
  if (check) lock.lock();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (check) reset_status(status_, s, what);
  // mse mode, bits 2..4: dense at dim 64 / 128 the tensor-core kernel, the other kinds at dim 64 / 128 / 256 the
  // fast kernel; everything else (and an x that is not 16-byte aligned) the general one
  const bool fused =
      params_.rotation == RotationKind::kDense
          ? codec::launch_encode_dense(x, args, boundaries_.data(), dense_fragments_, dense_error_base_,
                                       dense_error_slope_, multiprocessor_count_, s)
          : codec::launch_encode_fast(static_cast<int>(params_.rotation), x, args, boundaries_.data(),
                                      multiprocessor_count_, s);
  if (!fused) {
    dispatch(params_.rotation, chunks_, x, args, nullptr, OutputDtype::kFloat32, true, multiprocessor_count_, s);
  }
  finish_checks(stream, what.c_str(), check);
}

void DeviceQuantizer::decode(const ConstCodesView& codes, std::int64_t n, void* out, OutputDtype dtype, void* stream,
                             bool check) const {
  const std::string what = "cuda::DeviceQuantizer::decode";
  check_count(n, what, "n");
  if (n == 0) return;
  check_pointer(out, what, "out");
  codec::CodecArgs args = code_args(codes, n, what);
  const int dtype_value = static_cast<int>(dtype);
  if (dtype_value < 0 || dtype_value > 2) {
    throw TypeError(expected_got(what + ": dtype", "float32 (0), float16 (1) or bfloat16 (2)", std::to_string(dtype_value)));
  }
  check_alignment(out, dtype == OutputDtype::kFloat32 ? 4 : 2, what, "out");

  detail::ScopedDevice scoped_device(device_, what.c_str());
  std::unique_lock<std::mutex> lock(check_mutex_, std::defer_lock);
  if (check) lock.lock();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (check) reset_status(status_, s, what);
  dispatch(params_.rotation, chunks_, nullptr, args, out, dtype, false, multiprocessor_count_, s);
  finish_checks(stream, what.c_str(), check);
}

void DeviceQuantizer::scores(const ConstCodesView& codes, std::int64_t n, std::int64_t heads, const float* queries,
                             std::int64_t group, float* out, void* stream, bool check) const {
  const std::string what = "cuda::DeviceQuantizer::scores";
  check_count(n, what, "n");
  check_count(group, what, "group (queries per head)");
  if (heads < 1) throw ValueError(expected_got(what + ": heads", ">= 1", std::to_string(heads)));
  if (heads > 65535) throw ValueError(expected_got(what + ": heads", "<= 65535", std::to_string(heads)));
  if (n == 0 || group == 0) return;
  const bool prod = params_.mode == QuantizerMode::kProd;
  if (prod && qjl_dim_ > kMaxDeviceCodecPaddedDim) {
    throw ValueError(expected_got(what + ": qjl_dim for GPU scores", "<= " + std::to_string(kMaxDeviceCodecPaddedDim),
                                  std::to_string(qjl_dim_)));
  }
  if (!rotation_) throw ValueError(what + ": this rotation has no GPU query rotation (hadamard padded_dim too large)");
  check_pointer(queries, what, "queries");
  check_pointer(out, what, "out");
  codec::CodecArgs args = code_args(codes, heads * n, what);

  detail::ScopedDevice scoped_device(device_, what.c_str());
  std::unique_lock<std::mutex> lock(check_mutex_, std::defer_lock);
  if (check) lock.lock();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const std::int64_t count = heads * group;
  if (check) {
    reset_status(status_, s, what);
    const std::int64_t total = count * dim_;
    const unsigned blocks = static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>((total + 255) / 256, multiprocessor_count_ * 8)));
    codec::find_nonfinite_rows_kernel<<<blocks, 256, 0, s>>>(queries, count, dim_, status_);
  }
  // Workspace: rotated queries (count x p) and their QJL projections (count x m), stream-ordered.
  const std::size_t workspace_floats = static_cast<std::size_t>(count * padded_dim_ + (prod ? count * qjl_dim_ : 0));
  float* workspace = nullptr;
  ROTORQUANT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&workspace), workspace_floats * sizeof(float), s),
                        what.c_str());
  float* rotated = workspace;
  float* projected = prod ? workspace + count * padded_dim_ : nullptr;
  try {
    rotation_->apply(queries, rotated, count, stream);
    if (prod) {
      const std::int64_t total = count * qjl_dim_;
      const unsigned blocks = static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>((total + 255) / 256, multiprocessor_count_ * 16)));
      codec::project_queries_kernel<<<blocks, 256, 0, s>>>(rotated, count, static_cast<int>(padded_dim_),
                                                           qjl_transposed_, static_cast<int>(qjl_columns_),
                                                           static_cast<int>(qjl_dim_), projected);
    }
    switch (chunks_) {
      case 1: launch_scores_typed<1>(args, n, heads, rotated, projected, static_cast<int>(group), out, multiprocessor_count_, s, what.c_str()); break;
      case 2: launch_scores_typed<2>(args, n, heads, rotated, projected, static_cast<int>(group), out, multiprocessor_count_, s, what.c_str()); break;
      case 4: launch_scores_typed<4>(args, n, heads, rotated, projected, static_cast<int>(group), out, multiprocessor_count_, s, what.c_str()); break;
      case 8: launch_scores_typed<8>(args, n, heads, rotated, projected, static_cast<int>(group), out, multiprocessor_count_, s, what.c_str()); break;
      default: launch_scores_typed<16>(args, n, heads, rotated, projected, static_cast<int>(group), out, multiprocessor_count_, s, what.c_str()); break;
    }
    detail::check_launch(what.c_str());
  } catch (...) {
    cudaFreeAsync(workspace, s);
    throw;
  }
  ROTORQUANT_CUDA_CHECK(cudaFreeAsync(workspace, s), what.c_str());
  finish_checks(stream, what.c_str(), check);
}

// ---- DeviceQuantizerGroup ---------------------------------------------------------------------

namespace {

// The non-overlap rule of HeadLayout: the (h, g, r) -> element / row map with extents (heads, groups, n) and strides
// (head_stride, group_stride, row_stride), rows `row_size` long, is injective when, ordered by stride, every
// dimension of extent > 1 strides over all of the smaller ones (a sufficient condition, the usual one for tensors).
bool disjoint_rows(std::int64_t heads, std::int64_t groups, std::int64_t n, std::int64_t head_stride,
                   std::int64_t group_stride, std::int64_t row_stride, std::int64_t row_size) {
  if (heads == 0 || groups == 0 || n == 0) return true;  // no row at all
  struct Extent {
    std::int64_t size, stride;
  };
  std::vector<Extent> dims;
  for (const Extent e : {Extent{heads, head_stride}, Extent{groups, group_stride}, Extent{n, row_stride}}) {
    if (e.size > 1) dims.push_back(e);
  }
  std::sort(dims.begin(), dims.end(), [](const Extent& a, const Extent& b) { return a.stride < b.stride; });
  std::int64_t span = row_size;  // elements covered by the dimensions so far
  for (const Extent& e : dims) {
    if (e.stride < span) return false;
    span = e.stride * (e.size - 1) + span;
  }
  return true;
}

// encode writes the code rows (checked disjoint), decode the x rows (out).
void check_layout(const HeadLayout& layout, std::int64_t heads, std::int64_t n, std::int64_t dim, bool encode,
                  const std::string& what) {
  if (layout.groups < 1 || layout.groups > 65535) {
    throw ValueError(expected_got(what + ": layout.groups", "in [1, 65535]", std::to_string(layout.groups)));
  }
  const std::pair<const char*, std::int64_t> strides[] = {{"x_head_stride", layout.x_head_stride},
                                                          {"x_group_stride", layout.x_group_stride},
                                                          {"code_head_stride", layout.code_head_stride},
                                                          {"code_group_stride", layout.code_group_stride}};
  for (const auto& [name, value] : strides) {
    if (value < 0) throw ValueError(expected_got(what + ": layout." + name, ">= 0", std::to_string(value)));
  }
  if (encode && !disjoint_rows(heads, layout.groups, n, layout.code_head_stride, layout.code_group_stride, 1, 1)) {
    throw ValueError(expected_got(what + ": code rows of (heads, groups, n) = (" + std::to_string(heads) + ", " +
                                      std::to_string(layout.groups) + ", " + std::to_string(n) + ")",
                                  "non-overlapping (code_head_stride / code_group_stride apart by whole blocks)",
                                  "strides (" + std::to_string(layout.code_head_stride) + ", " +
                                      std::to_string(layout.code_group_stride) + ")"));
  }
  if (!encode && !disjoint_rows(heads, layout.groups, n, layout.x_head_stride, layout.x_group_stride, dim, dim)) {
    throw ValueError(expected_got(what + ": output rows of (heads, groups, n, dim) = (" + std::to_string(heads) +
                                      ", " + std::to_string(layout.groups) + ", " + std::to_string(n) + ", " +
                                      std::to_string(dim) + ")",
                                  "non-overlapping", "strides (" + std::to_string(layout.x_head_stride) + ", " +
                                                         std::to_string(layout.x_group_stride) + ")"));
  }
}

}  // namespace

DeviceQuantizerGroup::DeviceQuantizerGroup(const std::vector<const Quantizer*>& quantizers, int device) {
  const char* context = "cuda::DeviceQuantizerGroup";
  if (quantizers.empty() || quantizers.size() > 65535) {
    throw ValueError(expected_got(std::string(context) + ": number of quantizers (heads)", "in [1, 65535]",
                                  std::to_string(quantizers.size())));
  }
  for (std::size_t h = 0; h < quantizers.size(); ++h) {
    if (quantizers[h] == nullptr) {
      throw ValueError(expected_got(std::string(context) + ": quantizer " + std::to_string(h), "a Quantizer", "null"));
    }
    QuantizerParams first = quantizers.front()->params(), other = quantizers[h]->params();
    first.seed = other.seed = 0;
    if (first != other) {
      throw ValueError(std::string(context) + ": quantizer " + std::to_string(h) +
                       " has other parameters than quantizer 0: expected equal parameters except the seed");
    }
  }
  device_ = detail::resolve_device(device, context);
  detail::ScopedDevice scoped_device(device_, context);
  try {
    members_.reserve(quantizers.size());
    for (const Quantizer* q : quantizers) members_.push_back(std::make_unique<DeviceQuantizer>(*q, device_));
    const DeviceQuantizer& first = *members_.front();
    std::vector<codec::HeadTables> tables(members_.size());
    for (std::size_t h = 0; h < members_.size(); ++h) {
      const DeviceQuantizer& m = *members_[h];
      // the kernels read the codebook of head 0: equal parameters give equal codebooks (checked, bit for bit)
      if (m.boundaries_ != first.boundaries_ || m.zero_centroid_ != first.zero_centroid_) {
        throw RuntimeError(std::string(context) + ": head " + std::to_string(h) + " has another codebook than head 0");
      }
      if ((m.dense_fragments_ == nullptr) != (first.dense_fragments_ == nullptr)) {
        throw RuntimeError(std::string(context) + ": head " + std::to_string(h) + " has another dense encode plan");
      }
      tables[h] = codec::HeadTables{m.rotation_parameters_, m.forward_matrix_, m.inverse_matrix_, m.qjl_transposed_,
                                    m.qjl_matrix_, m.dense_fragments_, m.dense_error_base_, m.dense_error_slope_};
    }
    head_tables_ = upload(tables, context);
    allocate_status(status_, host_status_, context);
  } catch (...) {
    release();
    throw;
  }
}

DeviceQuantizerGroup::~DeviceQuantizerGroup() { release(); }

void DeviceQuantizerGroup::release() noexcept {
  detail::release_on_device(device_, [this] {
    if (head_tables_) cudaFree(head_tables_);
    head_tables_ = nullptr;
    free_status(status_, host_status_);
  });
}

codec::CodecArgs DeviceQuantizerGroup::launch_args(const ConstCodesView& codes, std::int64_t n,
                                                   const HeadLayout& layout, const std::string& what) const {
  codec::CodecArgs args = members_.front()->code_args(codes, n, what);
  args.head_tables = head_tables_;
  args.launch_heads = static_cast<int>(members_.size());
  args.launch_groups = static_cast<int>(layout.groups);
  args.x_head_stride = layout.x_head_stride;
  args.x_group_stride = layout.x_group_stride;
  args.code_head_stride = layout.code_head_stride;
  args.code_group_stride = layout.code_group_stride;
  args.status = status_;
  return args;
}

void DeviceQuantizerGroup::finish_checks(void* stream, const char* what, bool check, std::int64_t n,
                                         std::int64_t groups) const {
  detail::check_launch(what);
  if (!check) return;
  // a reported row is (head * groups + group) * n + row
  const auto where = [&](unsigned long long flat) {
    const std::int64_t f = static_cast<std::int64_t>(flat);
    return "head " + std::to_string(f / n / groups) + ", group " + std::to_string(f / n % groups) + ", row " +
           std::to_string(f % n);
  };
  raise_reported(status_, host_status_, static_cast<cudaStream_t>(stream), what, params().norm_dtype, where,
                 [&](unsigned long long flat) { return "the code at " + where(flat); });
}

void DeviceQuantizerGroup::encode(const float* x, std::int64_t n, const HeadLayout& layout, const CodesView& out,
                                  void* stream, bool check) const {
  const std::string what = "cuda::DeviceQuantizerGroup::encode";
  check_count(n, what, "n");
  const DeviceQuantizer& first = *members_.front();
  check_layout(layout, heads(), n, first.dim_, true, what);
  if (n == 0) return;
  check_pointer(x, what, "x");
  codec::CodecArgs args =
      launch_args(ConstCodesView{out.indices, out.norms, out.qjl_signs, out.residual_norms}, n, layout, what);
  const CodeSizes sizes = first.sizes_;
  args.words_ok_indices = sizes.index_bytes % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.indices) % 4 == 0 &&
                          first.padded_dim_ % 32 == 0;
  args.words_ok_signs = sizes.sign_bytes % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.qjl_signs) % 4 == 0;
  args.norm_correction = first.params_.norm_correction;

  detail::ScopedDevice scoped_device(device_, what.c_str());
  std::unique_lock<std::mutex> lock(check_mutex_, std::defer_lock);
  if (check) lock.lock();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (check) reset_status(status_, s, what);
  // the same kernel choice as DeviceQuantizer::encode (the per-head fragments and bounds come from the head tables)
  const int sms = first.multiprocessor_count_;
  const bool fused =
      first.params_.rotation == RotationKind::kDense
          ? codec::launch_encode_dense(x, args, first.boundaries_.data(), first.dense_fragments_,
                                       first.dense_error_base_, first.dense_error_slope_, sms, s)
          : codec::launch_encode_fast(static_cast<int>(first.params_.rotation), x, args, first.boundaries_.data(), sms,
                                      s);
  if (!fused) dispatch(first.params_.rotation, first.chunks_, x, args, nullptr, OutputDtype::kFloat32, true, sms, s);
  finish_checks(stream, what.c_str(), check, n, layout.groups);
}

void DeviceQuantizerGroup::decode(const ConstCodesView& codes, std::int64_t n, const HeadLayout& layout, void* out,
                                  OutputDtype dtype, void* stream, bool check) const {
  const std::string what = "cuda::DeviceQuantizerGroup::decode";
  check_count(n, what, "n");
  const DeviceQuantizer& first = *members_.front();
  const int dtype_value = static_cast<int>(dtype);
  if (dtype_value < 0 || dtype_value > 2) {
    throw TypeError(expected_got(what + ": dtype", "float32 (0), float16 (1) or bfloat16 (2)", std::to_string(dtype_value)));
  }
  check_layout(layout, heads(), n, first.dim_, false, what);
  if (n == 0) return;
  check_pointer(out, what, "out");
  check_alignment(out, dtype == OutputDtype::kFloat32 ? 4 : 2, what, "out");
  codec::CodecArgs args = launch_args(codes, n, layout, what);

  detail::ScopedDevice scoped_device(device_, what.c_str());
  std::unique_lock<std::mutex> lock(check_mutex_, std::defer_lock);
  if (check) lock.lock();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (check) reset_status(status_, s, what);
  dispatch(first.params_.rotation, first.chunks_, nullptr, args, out, dtype, false, first.multiprocessor_count_, s);
  finish_checks(stream, what.c_str(), check, n, layout.groups);
}

}  // namespace cuda
}  // namespace rotorquant
