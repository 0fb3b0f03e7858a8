// Bindings of rotorquant::KVCache (kv_cache.hpp) on C-contiguous numpy arrays. Thin: shape checks and
// buffer plumbing only (the Python layer, rotorquant/_kv_cache.py, converts frameworks and dtypes);
// the GIL is released around construction, append, attend and dequantize.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "rotorquant/detail/kv_statistics.hpp"
#include "rotorquant/kv_cache.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {
namespace {

using FloatArray = py::array_t<float, py::array::c_style>;
using ByteArray = py::array_t<std::uint8_t, py::array::c_style>;
using IndexArray = py::array_t<std::int64_t, py::array::c_style>;

template <typename Array>
Array checked(const py::handle& obj, const char* what, const char* name, const char* dtype) {
  if (!Array::check_(obj)) {
    throw py::type_error(std::string(what) + ": expected " + name + " as a C-contiguous numpy array of dtype " + dtype +
                         ", got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<Array>(obj);
}

void check_4d(const py::array& a, std::int64_t heads, std::int64_t head_dim, const char* what, const char* name) {
  if (a.ndim() != 4 || (heads > 0 && a.shape(1) != heads) || a.shape(3) != head_dim) {
    throw py::value_error(std::string(what) + ": expected " + name + " of shape (batch, " +
                          (heads > 0 ? std::to_string(heads) : std::string("heads")) + ", tokens, " +
                          std::to_string(head_dim) + "), got " + shape_string(a));
  }
}

}  // namespace

void bind_kv_cache(py::module_& m) {
  using rotorquant::KVCache;
  using rotorquant::KVCacheParams;
  py::class_<KVCache>(m, "KVCache", "Compressed KV cache (C++ core); use rotorquant.KVCache")
      .def(py::init([](std::int64_t num_layers, std::int64_t num_kv_heads, std::int64_t head_dim, int key_bits,
                       int value_bits, const std::string& rotation, const std::string& mode,
                       std::int64_t residual_window, std::int64_t sink_tokens,
                       const std::vector<std::int64_t>& protected_layers,
                       int protected_bits, const py::object& seed, bool center_keys, bool center_values,
                       float key_channel_scaling, const std::string& norm_dtype, bool norm_correction) {
             KVCacheParams p;
             p.num_layers = num_layers;
             p.num_kv_heads = num_kv_heads;
             p.head_dim = head_dim;
             p.key_bits = key_bits;
             p.value_bits = value_bits;
             p.rotation = rotorquant::parse_rotation_kind(rotation);
             p.mode = rotorquant::parse_quantizer_mode(mode);
             p.residual_window = residual_window;
             p.sink_tokens = sink_tokens;
             p.protected_layers = protected_layers;
             p.protected_bits = protected_bits;
             p.seed = seed_from_object(seed, "KVCache");
             p.center_keys = center_keys;
             p.center_values = center_values;
             p.key_channel_scaling = key_channel_scaling;
             p.norm_dtype = rotorquant::parse_norm_dtype(norm_dtype);
             p.norm_correction = norm_correction;
             py::gil_scoped_release release;
             return new KVCache(p);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("key_bits"),
           py::arg("value_bits"), py::arg("rotation"), py::arg("mode"), py::arg("residual_window"),
           py::arg("sink_tokens"), py::arg("protected_layers"), py::arg("protected_bits"), py::arg("seed"), py::arg("center_keys"),
           py::arg("center_values"), py::arg("key_channel_scaling"), py::arg("norm_dtype"), py::arg("norm_correction"))
      .def_property_readonly("batch_size", &KVCache::batch_size)
      .def("is_protected", &KVCache::is_protected, py::arg("layer"))
      .def(
          "append",
          [](KVCache& c, std::int64_t layer, const py::handle& keys_obj, const py::handle& values_obj) {
            const char* what = "KVCache.append";
            FloatArray keys = checked<FloatArray>(keys_obj, what, "keys", "float32");
            FloatArray values = checked<FloatArray>(values_obj, what, "values", "float32");
            check_4d(keys, c.num_kv_heads(), c.head_dim(), what, "keys");
            check_4d(values, c.num_kv_heads(), c.head_dim(), what, "values");
            if (keys.shape(0) != values.shape(0) || keys.shape(2) != values.shape(2)) {
              throw py::value_error(std::string(what) + ": expected values of the keys' shape " + shape_string(keys) +
                                    ", got " + shape_string(values));
            }
            const float* k = keys.data();
            const float* v = values.data();
            const std::int64_t batch = keys.shape(0), tokens = keys.shape(2);
            py::gil_scoped_release release;
            c.append(layer, k, v, batch, tokens);
          },
          py::arg("layer"), py::arg("keys"), py::arg("values"))
      .def(
          "attend",
          [](const KVCache& c, std::int64_t layer, const py::handle& queries_obj, float scale, bool causal,
             const py::object& mask_obj) {
            const char* what = "KVCache.attend";
            FloatArray queries = checked<FloatArray>(queries_obj, what, "queries", "float32");
            check_4d(queries, -1, c.head_dim(), what, "queries");
            const std::int64_t batch = queries.shape(0), q_heads = queries.shape(1), q_len = queries.shape(2);
            const std::uint8_t* mask = nullptr;
            ByteArray mask_array;
            if (!mask_obj.is_none()) {
              mask_array = checked<ByteArray>(mask_obj, what, "mask", "uint8");
              const std::int64_t seq = c.seq_length(layer);
              if (mask_array.ndim() != 3 || mask_array.shape(0) != batch || mask_array.shape(1) != q_len ||
                  mask_array.shape(2) != seq) {
                throw py::value_error(std::string(what) + ": expected mask of shape (" + std::to_string(batch) + ", " +
                                      std::to_string(q_len) + ", " + std::to_string(seq) + "), got " +
                                      shape_string(mask_array));
              }
              mask = mask_array.data();
            }
            FloatArray out({batch, q_heads, q_len, c.head_dim()});
            const float* q = queries.data();
            float* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              c.attend(layer, q, batch, q_heads, q_len, scale, causal, mask, o);
            }
            return out;
          },
          py::arg("layer"), py::arg("queries"), py::arg("scale"), py::arg("causal"), py::arg("mask") = py::none())
      .def(
          "dequantize",
          [](const KVCache& c, std::int64_t layer) {
            const std::int64_t seq = c.seq_length(layer);
            const std::int64_t batch = c.batch_size();
            FloatArray keys({batch, c.num_kv_heads(), seq, c.head_dim()});
            FloatArray values({batch, c.num_kv_heads(), seq, c.head_dim()});
            float* k = keys.mutable_data();
            float* v = values.mutable_data();
            {
              py::gil_scoped_release release;
              c.dequantize(layer, k, v);
            }
            return py::make_tuple(keys, values);
          },
          py::arg("layer"))
      .def(
          "codes",
          [](const KVCache& c, std::int64_t layer, std::int64_t kv_head, bool values) {
            const std::int64_t count = c.quantized_length(layer);
            const std::int64_t batch = c.batch_size();
            const rotorquant::CodeSizes sizes =
                (values ? c.value_quantizer(layer, kv_head) : c.key_quantizer(layer, kv_head)).code_sizes();
            const std::int64_t widths[4] = {sizes.index_bytes, sizes.norm_bytes, sizes.sign_bytes,
                                            sizes.residual_norm_bytes};
            std::vector<ByteArray> arrays;
            for (std::int64_t width : widths) arrays.emplace_back(std::vector<py::ssize_t>{batch, count, width});
            for (std::int64_t b = 0; b < batch; ++b) {
              const rotorquant::ConstCodesView view = c.codes(layer, b, kv_head, values);
              const std::uint8_t* sources[4] = {view.indices, view.norms, view.qjl_signs, view.residual_norms};
              for (int f = 0; f < 4; ++f) {
                const std::int64_t bytes = count * widths[f];
                if (bytes > 0) std::copy(sources[f], sources[f] + bytes, arrays[static_cast<std::size_t>(f)].mutable_data() + b * bytes);
              }
            }
            return py::make_tuple(arrays[0], arrays[1], arrays[2], arrays[3]);
          },
          py::arg("layer"), py::arg("kv_head"), py::arg("values"),
          "(indices, norms, qjl_signs, residual_norms) uint8 arrays of shape (batch, quantized_length, bytes).")
      .def("seq_length", &KVCache::seq_length, py::arg("layer"))
      .def("quantized_length", &KVCache::quantized_length, py::arg("layer"))
      .def("window_length", &KVCache::window_length, py::arg("layer"))
      .def("sink_length", &KVCache::sink_length, py::arg("layer"))
      .def("nbytes", &KVCache::nbytes)
      .def("code_bytes_per_token", &KVCache::code_bytes_per_token, py::arg("layer"))
      .def(
          "reorder",
          [](KVCache& c, const py::handle& indices_obj) {
            IndexArray indices = checked<IndexArray>(indices_obj, "KVCache.reorder", "beam_indices", "int64");
            if (indices.ndim() != 1) {
              throw py::value_error("KVCache.reorder: expected beam_indices of shape (n,), got " + shape_string(indices));
            }
            const std::int64_t* data = indices.data();
            const std::int64_t count = indices.shape(0);
            py::gil_scoped_release release;
            c.reorder(data, count);
          },
          py::arg("beam_indices"))
      .def("crop", &KVCache::crop, py::arg("length"))
      .def("reset", &KVCache::reset)
      .def("key_mean", &KVCache::key_mean, py::arg("layer"), py::arg("kv_head"))
      .def("value_mean", &KVCache::value_mean, py::arg("layer"), py::arg("kv_head"))
      .def("key_scale", &KVCache::key_scale, py::arg("layer"), py::arg("kv_head"))
      .def(
          "quantizer_params",
          [](const KVCache& c, std::int64_t layer, std::int64_t kv_head, bool values) {
            const rotorquant::Quantizer& q = values ? c.value_quantizer(layer, kv_head) : c.key_quantizer(layer, kv_head);
            return params_dict(q.params());
          },
          py::arg("layer"), py::arg("kv_head"), py::arg("values"));
  m.def(
      "kv_chunk_statistics",
      [](const py::handle& keys_obj, const py::handle& values_obj, bool center_keys, bool center_values,
         float key_channel_scaling) {
        const char* what = "KVCache.append";
        FloatArray keys = checked<FloatArray>(keys_obj, what, "keys", "float32");
        FloatArray values = checked<FloatArray>(values_obj, what, "values", "float32");
        if (keys.ndim() != 4) {
          throw py::value_error(std::string(what) + ": expected keys of shape (batch, heads, tokens, head_dim), got " +
                                shape_string(keys));
        }
        if (values.ndim() != 4 || keys.shape(0) != values.shape(0) || keys.shape(1) != values.shape(1) ||
            keys.shape(2) != values.shape(2) || keys.shape(3) != values.shape(3)) {
          throw py::value_error(std::string(what) + ": expected values of the keys' shape " + shape_string(keys) +
                                ", got " + shape_string(values));
        }
        const std::int64_t batch = keys.shape(0), heads = keys.shape(1), tokens = keys.shape(2), d = keys.shape(3);
        const float* k = keys.data();
        const float* v = values.data();
        rotorquant::detail::KVChunkStatistics stats;
        {
          py::gil_scoped_release release;
          stats = rotorquant::detail::kv_chunk_statistics(k, v, batch, heads, tokens, d, center_keys, center_values,
                                                          key_channel_scaling, what);
        }
        auto as_array = [&](const std::vector<float>& data) -> py::object {
          if (data.empty()) return py::none();
          FloatArray out({heads, d});
          std::copy(data.begin(), data.end(), out.mutable_data());
          return out;
        };
        return py::make_tuple(as_array(stats.key_mean), as_array(stats.value_mean), as_array(stats.key_scale));
      },
      py::arg("keys"), py::arg("values"), py::arg("center_keys"), py::arg("center_values"),
      py::arg("key_channel_scaling"),
      "Statistics a KVCache fixes from the first chunk of a layer: (key_mean, value_mean, key_scale), each a "
      "(heads, head_dim) float32 array or None when disabled; keys/values (batch, heads, tokens, head_dim) float32.");
  m.def("kv_quantizer_seed", &rotorquant::kv_quantizer_seed, py::arg("seed"), py::arg("layer"), py::arg("kv_head"),
        py::arg("num_kv_heads"), py::arg("kind"));
}

}  // namespace rotorquant_bindings
