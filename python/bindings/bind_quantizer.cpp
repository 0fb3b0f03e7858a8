// Bindings of rotorquant::Quantizer and the code serialization (quantizer.hpp) on C-contiguous
// numpy arrays. Thin: argument checks and buffer plumbing only; the GIL is released around
// construction, encode, decode, inner_product and the (de)serialization of code batches.
//
// Codes travel as four 2-D uint8 arrays with one row per vector:
//   indices (n, index_bytes), norms (n, norm_bytes), qjl_signs (n, sign_bytes), residual_norms
//   (n, residual_norm_bytes); the sign and residual arrays have 0 columns in mse mode.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "rotorquant/codebook.hpp"
#include "rotorquant/format.hpp"
#include "rotorquant/quantizer.hpp"
#include "rotorquant/rotation.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {
namespace {

using FloatArray = py::array_t<float, py::array::c_style>;
using ByteArray = py::array_t<std::uint8_t, py::array::c_style>;

std::string describe(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) {
    const auto a = py::reinterpret_borrow<py::array>(obj);
    return "dtype " + std::string(py::str(a.dtype())) + ", shape " + shape_string(a) +
           ((a.flags() & py::array::c_style) ? ", C-contiguous" : ", not C-contiguous");
  }
  return std::string(py::str(py::type::of(obj).attr("__name__")));
}

// The object itself as a C-contiguous array of T (no copy, no conversion: the Python layer
// converts); wrong dtype / layout -> TypeError.
template <typename Array>
Array as_array(const py::handle& obj, const std::string& what, const char* name, const char* dtype) {
  if (!Array::check_(obj)) {
    throw py::type_error(what + ": expected " + name + " as a C-contiguous numpy array of dtype " + dtype + ", got " +
                         describe(obj));
  }
  return py::reinterpret_borrow<Array>(obj);
}

// ValueError unless a is 2-D with `cols` columns (and `rows` rows when rows >= 0); returns its rows.
std::int64_t check_matrix(const py::array& a, std::int64_t rows, std::int64_t cols, const std::string& what,
                          const char* name) {
  if (a.ndim() != 2 || a.shape(1) != cols || (rows >= 0 && a.shape(0) != rows)) {
    const std::string expected_rows = rows >= 0 ? std::to_string(rows) : std::string("n");
    throw py::value_error(what + ": expected " + name + " of shape (" + expected_rows + ", " + std::to_string(cols) +
                          "), got " + shape_string(a));
  }
  return static_cast<std::int64_t>(a.shape(0));
}

// The four code arrays, checked against the quantizer's per-vector widths and a common n.
struct CodeArrays {
  ByteArray indices, norms, qjl_signs, residual_norms;
  std::int64_t n = 0;
  rotorquant::ConstCodesView view() const {
    return {indices.data(), norms.data(), qjl_signs.data(), residual_norms.data()};
  }
};

CodeArrays code_arrays(const rotorquant::Quantizer& q, const py::handle& indices, const py::handle& norms,
                       const py::handle& qjl_signs, const py::handle& residual_norms, const std::string& what) {
  const rotorquant::CodeSizes sizes = q.code_sizes();
  CodeArrays c;
  c.indices = as_array<ByteArray>(indices, what, "indices", "uint8");
  c.norms = as_array<ByteArray>(norms, what, "norms", "uint8");
  c.qjl_signs = as_array<ByteArray>(qjl_signs, what, "qjl_signs", "uint8");
  c.residual_norms = as_array<ByteArray>(residual_norms, what, "residual_norms", "uint8");
  c.n = check_matrix(c.indices, -1, sizes.index_bytes, what, "indices");
  check_matrix(c.norms, c.n, sizes.norm_bytes, what, "norms");
  check_matrix(c.qjl_signs, c.n, sizes.sign_bytes, what, "qjl_signs");
  check_matrix(c.residual_norms, c.n, sizes.residual_norm_bytes, what, "residual_norms");
  return c;
}

ByteArray byte_matrix(std::int64_t rows, std::int64_t cols) {
  return ByteArray({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
}

ByteArray byte_matrix(const std::vector<std::uint8_t>& data, std::int64_t rows, std::int64_t cols) {
  if (static_cast<std::int64_t>(data.size()) != rows * cols) {
    throw py::value_error("codes_from_bytes: expected a section of " + std::to_string(rows) + " x " +
                          std::to_string(cols) + " bytes, got " + std::to_string(data.size()) + " bytes");
  }
  ByteArray out = byte_matrix(rows, cols);
  if (!data.empty()) std::memcpy(out.mutable_data(), data.data(), data.size());
  return out;
}



// Per-vector widths of the four code arrays for serialized parameters (without building the
// quantizer, whose dense rotation may take long to construct).
rotorquant::CodeSizes widths_of(const rotorquant::QuantizerParams& p) {
  const std::int64_t padded = rotorquant::rotation_padded_dim(p.rotation, p.dim);
  const bool prod = p.mode == rotorquant::QuantizerMode::kProd;
  rotorquant::CodeSizes sizes;
  sizes.index_bytes = rotorquant::plane_layout(padded, prod ? p.bits - 1 : p.bits).bytes_per_vector;
  sizes.norm_bytes = rotorquant::norm_dtype_size(p.norm_dtype);
  if (prod) {
    sizes.sign_bytes = rotorquant::sign_bytes(p.qjl_dim == 0 ? padded : p.qjl_dim);
    sizes.residual_norm_bytes = sizes.norm_bytes;
  }
  return sizes;
}

// A read-only view of a bytes-like object (bytes, bytearray, memoryview, 1-D uint8 array).
struct ByteSpan {
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;
};

ByteSpan byte_span(const py::buffer_info& info, const std::string& what) {
  const bool contiguous = info.ndim <= 1 && (info.ndim == 0 || info.size <= 1 || info.strides[0] == info.itemsize);
  if (!contiguous) {
    throw py::type_error(what + ": expected a contiguous bytes-like object, got a buffer with ndim " +
                         std::to_string(info.ndim));
  }
  return {static_cast<const std::uint8_t*>(info.ptr), static_cast<std::size_t>(info.size * info.itemsize)};
}

}  // namespace

py::dict params_dict(const rotorquant::QuantizerParams& p) {
  py::dict d;
  d["dim"] = p.dim;
  d["bits"] = p.bits;
  d["rotation"] = rotorquant::rotation_kind_name(p.rotation);
  d["mode"] = rotorquant::quantizer_mode_name(p.mode);
  d["seed"] = p.seed;
  d["codebook"] = std::string(rotorquant::codebook_density_name(p.codebook));
  d["norm_dtype"] = rotorquant::norm_dtype_name(p.norm_dtype);
  d["norm_correction"] = p.norm_correction;
  d["qjl_dim"] = p.qjl_dim;
  return d;
}

void bind_quantizer(py::module_& m) {
  using rotorquant::Quantizer;

  py::class_<Quantizer>(m, "Quantizer",
                        "TurboQuant / RotorQuant quantizer (rotation + Lloyd-Max codebook, optionally + a 1-bit QJL "
                        "sketch of the residual in 'prod' mode), built from its parameters alone.")
      .def(py::init([](std::int64_t dim, int bits, const std::string& rotation, const std::string& mode,
                       const py::object& seed, const std::string& codebook, const std::string& norm_dtype,
                       bool norm_correction, std::int64_t qjl_dim) {
             rotorquant::QuantizerParams p;
             p.dim = dim;
             p.bits = bits;
             p.rotation = rotorquant::parse_rotation_kind(rotation);
             p.mode = rotorquant::parse_quantizer_mode(mode);
             p.seed = seed_from_object(seed, "Quantizer");
             p.codebook = rotorquant::parse_codebook_density(codebook);
             p.norm_dtype = rotorquant::parse_norm_dtype(norm_dtype);
             p.norm_correction = norm_correction;
             p.qjl_dim = qjl_dim;
             py::gil_scoped_release release;  // dense rotations and QJL matrices take a while to build
             return Quantizer(p);
           }),
           py::arg("dim"), py::arg("bits"), py::arg("rotation") = "dense", py::arg("mode") = "mse",
           py::arg("seed") = 0, py::arg("codebook") = "sphere", py::arg("norm_dtype") = "float16",
           py::arg("norm_correction") = false, py::arg("qjl_dim") = 0)
      .def_property_readonly("dim", &Quantizer::dim)
      .def_property_readonly("bits", [](const Quantizer& q) { return q.params().bits; })
      .def_property_readonly("padded_dim", &Quantizer::padded_dim)
      .def_property_readonly("mse_bits", &Quantizer::mse_bits)
      .def_property_readonly("qjl_dim", &Quantizer::qjl_dim, "m, the rows of the QJL matrix (prod), 0 in mse mode")
      .def_property_readonly("rotation", [](const Quantizer& q) { return q.rotation().kind_name(); })
      .def_property_readonly("mode", [](const Quantizer& q) { return rotorquant::quantizer_mode_name(q.params().mode); })
      .def_property_readonly("seed", [](const Quantizer& q) { return q.params().seed; })
      .def_property_readonly("codebook",
                             [](const Quantizer& q) { return std::string(rotorquant::codebook_density_name(q.params().codebook)); })
      .def_property_readonly("norm_dtype",
                             [](const Quantizer& q) { return rotorquant::norm_dtype_name(q.params().norm_dtype); })
      .def_property_readonly("norm_correction", [](const Quantizer& q) { return q.params().norm_correction; })
      .def_property_readonly("num_parameters", &Quantizer::num_parameters)
      .def_property_readonly("index_bytes", [](const Quantizer& q) { return q.code_sizes().index_bytes; },
                             "bytes of packed indices per vector")
      .def_property_readonly("norm_bytes", [](const Quantizer& q) { return q.code_sizes().norm_bytes; })
      .def_property_readonly("sign_bytes", [](const Quantizer& q) { return q.code_sizes().sign_bytes; })
      .def_property_readonly("residual_norm_bytes", [](const Quantizer& q) { return q.code_sizes().residual_norm_bytes; })
      .def("params", [](const Quantizer& q) { return params_dict(q.params()); },
           "dict(dim, bits, rotation, mode, seed, codebook, norm_dtype, norm_correction, qjl_dim): the "
           "parameters as given (qjl_dim 0 means padded_dim).")
      .def(
          "centroids",
          [](const Quantizer& q) {
            const rotorquant::LloydMaxCodebook* cb = q.codebook();
            const std::size_t levels = cb ? cb->centroids().size() : 0;
            py::array_t<double> out(static_cast<py::ssize_t>(levels));
            if (levels) std::memcpy(out.mutable_data(), cb->centroids().data(), levels * sizeof(double));
            return out;
          },
          "float64 centroids of the mse stage (empty when it has no bits)")
      .def(
          "qjl_matrix",
          [](const Quantizer& q) {
            const std::vector<float>& s = q.qjl_matrix();
            const py::ssize_t rows = static_cast<py::ssize_t>(q.qjl_dim()), cols = static_cast<py::ssize_t>(q.padded_dim());
            py::array_t<float> out({rows, s.empty() ? py::ssize_t{0} : cols});
            if (!s.empty()) std::memcpy(out.mutable_data(), s.data(), s.size() * sizeof(float));
            return out;
          },
          "float32 QJL matrix S (qjl_dim, padded_dim) of prod mode ((0, 0) in mse mode).")
      .def("rotation_object", [](const Quantizer& q) { return rotorquant::Rotation(q.rotation()); },
           "A copy of the quantizer's Rotation.")
      .def(
          "encode",
          [](const Quantizer& q, const py::handle& x_object) {
            const std::string what = "Quantizer.encode";
            const FloatArray x = as_array<FloatArray>(x_object, what, "x", "float32");
            const std::int64_t n = check_matrix(x, -1, q.dim(), what, "x");
            const rotorquant::CodeSizes sizes = q.code_sizes();
            ByteArray indices = byte_matrix(n, sizes.index_bytes), norms = byte_matrix(n, sizes.norm_bytes),
                      signs = byte_matrix(n, sizes.sign_bytes), residual = byte_matrix(n, sizes.residual_norm_bytes);
            const rotorquant::CodesView view{indices.mutable_data(), norms.mutable_data(), signs.mutable_data(),
                                             residual.mutable_data()};
            const float* data = x.data();
            {
              py::gil_scoped_release release;
              q.encode(data, n, view);
            }
            return py::make_tuple(indices, norms, signs, residual);
          },
          py::arg("x"),
          "x: float32 C-contiguous (n, dim) -> (indices, norms, qjl_signs, residual_norms), uint8 arrays of shape "
          "(n, index_bytes), (n, norm_bytes), (n, sign_bytes), (n, residual_norm_bytes).")
      .def(
          "decode",
          [](const Quantizer& q, const py::handle& indices, const py::handle& norms, const py::handle& qjl_signs,
             const py::handle& residual_norms) {
            const CodeArrays codes = code_arrays(q, indices, norms, qjl_signs, residual_norms, "Quantizer.decode");
            FloatArray out({static_cast<py::ssize_t>(codes.n), static_cast<py::ssize_t>(q.dim())});
            float* out_ptr = out.mutable_data();
            {
              py::gil_scoped_release release;
              q.decode(codes.view(), codes.n, out_ptr);
            }
            return out;
          },
          py::arg("indices"), py::arg("norms"), py::arg("qjl_signs"), py::arg("residual_norms"),
          "The four code arrays (as from encode) -> float32 (n, dim).")
      .def(
          "inner_product",
          [](const Quantizer& q, const py::handle& indices, const py::handle& norms, const py::handle& qjl_signs,
             const py::handle& residual_norms, const py::handle& y_object) {
            const std::string what = "Quantizer.inner_product";
            const CodeArrays codes = code_arrays(q, indices, norms, qjl_signs, residual_norms, what);
            const FloatArray y = as_array<FloatArray>(y_object, what, "y", "float32");
            const std::int64_t m_q = check_matrix(y, -1, q.dim(), what, "y");
            FloatArray out({static_cast<py::ssize_t>(m_q), static_cast<py::ssize_t>(codes.n)});
            const float* y_ptr = y.data();
            float* out_ptr = out.mutable_data();
            {
              py::gil_scoped_release release;
              q.inner_product(codes.view(), codes.n, y_ptr, m_q, out_ptr);
            }
            return out;
          },
          py::arg("indices"), py::arg("norms"), py::arg("qjl_signs"), py::arg("residual_norms"), py::arg("y"),
          "Estimates of <y_i, x_j> computed on the codes: y float32 (m, dim) -> float32 (m, n).")
      .def(
          "to_bytes",
          [](const Quantizer& q) {
            const std::vector<std::uint8_t> blob = q.to_bytes();
            return py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
          },
          "The serialized parameters (docs/format.md).")
      .def_static(
          "params_from_bytes",
          [](const py::buffer& data) {
            const py::buffer_info info = data.request();
            const ByteSpan span = byte_span(info, "Quantizer.params_from_bytes");
            return params_dict(Quantizer::params_from_bytes(span.data, span.size));
          },
          py::arg("data"), "Parameters dict of a serialized quantizer (ValueError on bad input).")
      .def("__repr__", [](const Quantizer& q) {
        const auto& p = q.params();
        return "Quantizer(dim=" + std::to_string(p.dim) + ", bits=" + std::to_string(p.bits) + ", rotation='" +
               q.rotation().kind_name() + "', mode='" + rotorquant::quantizer_mode_name(p.mode) +
               "', seed=" + std::to_string(p.seed) + ", codebook='" + rotorquant::codebook_density_name(p.codebook) +
               "', norm_dtype='" + rotorquant::norm_dtype_name(p.norm_dtype) +
               "', norm_correction=" + (p.norm_correction ? "True" : "False") +
               ", qjl_dim=" + std::to_string(p.qjl_dim) + ")";
      });

  m.def(
      "codes_to_bytes",
      [](const Quantizer& q, const py::handle& indices, const py::handle& norms, const py::handle& qjl_signs,
         const py::handle& residual_norms) {
        const CodeArrays codes = code_arrays(q, indices, norms, qjl_signs, residual_norms, "codes_to_bytes");
        std::vector<std::uint8_t> blob;
        {
          py::gil_scoped_release release;
          blob = rotorquant::codes_to_bytes(q.params(), codes.n, codes.view());
        }
        return py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
      },
      py::arg("quantizer"), py::arg("indices"), py::arg("norms"), py::arg("qjl_signs"), py::arg("residual_norms"),
      "Serialized batch of codes: header (parameters, n, section sizes), the four arrays, CRC-32.");

  m.def(
      "codes_from_bytes",
      [](const py::buffer& data) {
        const py::buffer_info info = data.request();
        const ByteSpan span = byte_span(info, "codes_from_bytes");
        rotorquant::DecodedCodes decoded;
        {
          py::gil_scoped_release release;
          decoded = rotorquant::codes_from_bytes(span.data, span.size);
        }
        const rotorquant::CodeSizes w = widths_of(decoded.params);
        return py::make_tuple(params_dict(decoded.params), byte_matrix(decoded.indices, decoded.n, w.index_bytes),
                              byte_matrix(decoded.norms, decoded.n, w.norm_bytes),
                              byte_matrix(decoded.qjl_signs, decoded.n, w.sign_bytes),
                              byte_matrix(decoded.residual_norms, decoded.n, w.residual_norm_bytes));
      },
      py::arg("data"),
      "(params dict, indices, norms, qjl_signs, residual_norms) from codes_to_bytes output (ValueError on "
      "truncated, corrupted or inconsistent input).");
}

}  // namespace rotorquant_bindings
