// rotorquant._core.CudaDecodeAttention: the fused decode-attention launches on raw device pointers
// (cuda/include/rotorquant/cuda/attention.hpp). Python (python/rotorquant/_attention.py) validates tensors.
// Without a CUDA build the name exists and its constructor raises RuntimeError; the support query works always.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "rotorquant/decode_attention.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/quantizer.hpp"

#ifdef ROTORQUANT_WITH_CUDA
#include "rotorquant/cuda/attention.hpp"
#endif

namespace py = pybind11;

namespace rotorquant_bindings {

namespace {

#ifndef ROTORQUANT_WITH_CUDA
struct CudaDecodeAttentionUnavailable {};
#else
template <typename T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
#endif

// The reason the fused kernel does not support these parameters ("" when it does); same answer without CUDA.
std::string unsupported_reason(std::int64_t dim, int key_bits, int value_bits, const std::string& rotation,
                               const std::string& mode, const std::string& norm_dtype) {
  rotorquant::QuantizerParams k;
  k.dim = dim;
  k.bits = key_bits;
  k.rotation = rotorquant::parse_rotation_kind(rotation);
  k.mode = rotorquant::parse_quantizer_mode(mode);
  k.norm_dtype = rotorquant::parse_norm_dtype(norm_dtype);
  rotorquant::QuantizerParams v = k;
  v.bits = value_bits;
  return rotorquant::decode_attention_unsupported_reason(k, v);
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("decode_attention_unsupported_reason", &unsupported_reason, py::arg("dim"), py::arg("key_bits"),
        py::arg("value_bits"), py::arg("rotation"), py::arg("mode"), py::arg("norm_dtype"),
        "Empty when the fused decode-attention kernel supports these parameters, else the reason.");
#ifdef ROTORQUANT_WITH_CUDA
  using rotorquant::cuda::DecodeAttentionArgs;
  using rotorquant::cuda::DeviceDecodeAttention;
  py::class_<DeviceDecodeAttention>(m, "CudaDecodeAttention",
                                    "Fused decode attention on packed codes (cuda/include/rotorquant/cuda/attention.hpp).")
      .def(py::init([](const std::vector<const rotorquant::Quantizer*>& keys,
                       const std::vector<const rotorquant::Quantizer*>& values, int device) {
             return new DeviceDecodeAttention(keys, values, device);
           }),
           py::arg("key_quantizers"), py::arg("value_quantizers"), py::arg("device") = -1, py::keep_alive<1, 2>(),
           py::keep_alive<1, 3>())
      .def_property_readonly("device", &DeviceDecodeAttention::device)
      .def_property_readonly("num_kv_heads", &DeviceDecodeAttention::num_kv_heads)
      .def_property_readonly("head_dim", &DeviceDecodeAttention::head_dim)
      .def("num_splits", &DeviceDecodeAttention::num_splits, py::arg("batch"), py::arg("q_heads"),
           py::arg("max_code_length"))
      .def("workspace_bytes", &DeviceDecodeAttention::workspace_bytes, py::arg("batch"), py::arg("q_heads"),
           py::arg("max_code_length"))
      .def(
          "run",
          [](const DeviceDecodeAttention& self, std::int64_t batch, std::int64_t q_heads, std::uintptr_t queries,
             int queries_dtype, std::uintptr_t out, int out_dtype, float scale, std::uintptr_t key_indices,
             std::uintptr_t key_norms, std::uintptr_t value_indices, std::uintptr_t value_norms,
             std::int64_t batch_stride, std::int64_t head_stride, std::uintptr_t block_table, std::int64_t max_blocks,
             std::int64_t block_size, std::uintptr_t code_lengths, std::int64_t max_code_length,
             std::uintptr_t fp_keys, std::uintptr_t fp_values, std::uintptr_t fp_lengths, std::int64_t fp_capacity,
             std::uintptr_t key_scales, std::uintptr_t value_means, std::uintptr_t code_mask,
             std::int64_t code_mask_stride, std::uintptr_t fp_mask, std::uintptr_t workspace,
             std::size_t workspace_bytes, std::uintptr_t stream) {
            DecodeAttentionArgs a;
            a.batch = batch;
            a.q_heads = q_heads;
            a.queries = pointer<const void>(queries);
            a.queries_dtype = static_cast<rotorquant::cuda::OutputDtype>(queries_dtype);
            a.out = pointer<void>(out);
            a.out_dtype = static_cast<rotorquant::cuda::OutputDtype>(out_dtype);
            a.scale = scale;
            a.key_indices = pointer<const std::uint8_t>(key_indices);
            a.key_norms = pointer<const std::uint8_t>(key_norms);
            a.value_indices = pointer<const std::uint8_t>(value_indices);
            a.value_norms = pointer<const std::uint8_t>(value_norms);
            a.layout.batch_stride = batch_stride;
            a.layout.head_stride = head_stride;
            a.layout.block_table = pointer<const std::int32_t>(block_table);
            a.layout.max_blocks_per_sequence = max_blocks;
            a.layout.block_size = block_size;
            a.code_lengths = pointer<const std::int32_t>(code_lengths);
            a.max_code_length = max_code_length;
            a.fp_keys = pointer<const float>(fp_keys);
            a.fp_values = pointer<const float>(fp_values);
            a.fp_lengths = pointer<const std::int32_t>(fp_lengths);
            a.fp_capacity = fp_capacity;
            a.key_scales = pointer<const float>(key_scales);
            a.value_means = pointer<const float>(value_means);
            a.code_mask = pointer<const std::uint8_t>(code_mask);
            a.code_mask_stride = code_mask_stride;
            a.fp_mask = pointer<const std::uint8_t>(fp_mask);
            a.workspace = pointer<void>(workspace);
            a.workspace_bytes = workspace_bytes;
            self.run(a, reinterpret_cast<void*>(stream));
          },
          py::arg("batch"), py::arg("q_heads"), py::arg("queries"), py::arg("queries_dtype"), py::arg("out"),
          py::arg("out_dtype"), py::arg("scale"), py::arg("key_indices"), py::arg("key_norms"),
          py::arg("value_indices"), py::arg("value_norms"), py::arg("batch_stride"), py::arg("head_stride"),
          py::arg("block_table"), py::arg("max_blocks"), py::arg("block_size"), py::arg("code_lengths"),
          py::arg("max_code_length"), py::arg("fp_keys"), py::arg("fp_values"), py::arg("fp_lengths"),
          py::arg("fp_capacity"), py::arg("key_scales"), py::arg("value_means"), py::arg("code_mask"),
          py::arg("code_mask_stride"), py::arg("fp_mask"), py::arg("workspace"), py::arg("workspace_bytes"),
          py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
          "Launches prepare / split / combine on `stream` (device pointers as ints, 0 = absent).");
#else
  py::class_<CudaDecodeAttentionUnavailable>(m, "CudaDecodeAttention",
                                             "Unavailable: rotorquant was built without CUDA support.")
      .def(py::init([](const py::object&, const py::object&, int) -> CudaDecodeAttentionUnavailable* {
             throw rotorquant::RuntimeError("rotorquant was built without CUDA support");
           }),
           py::arg("key_quantizers"), py::arg("value_quantizers"), py::arg("device") = -1);
#endif
}

}  // namespace rotorquant_bindings
