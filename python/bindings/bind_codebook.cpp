// Bindings of the Lloyd-Max codebooks (codebook.hpp). Thin: argument plumbing only;
// the GIL is released around the batched quantize / dequantize loops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "rotorquant/codebook.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {
namespace {

template <typename T>
std::string array_description(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) {
    const auto a = py::reinterpret_borrow<py::array>(obj);
    return "dtype " + std::string(py::str(a.dtype())) + ", shape " + shape_string(a) +
           ((a.flags() & py::array::c_style) ? ", C-contiguous" : ", not C-contiguous");
  }
  return std::string(py::str(py::type::of(obj).attr("__name__")));
}

// The object as a 1-D C-contiguous array of T (no copy, no conversion: the Python layer
// converts). Wrong dtype/layout -> TypeError, wrong rank -> ValueError.
template <typename T>
py::array_t<T, py::array::c_style> as_vector(const py::handle& obj, const char* what, const char* dtype_name) {
  using Array = py::array_t<T, py::array::c_style>;
  if (!Array::check_(obj)) {
    throw py::type_error(std::string(what) + ": expected a C-contiguous numpy array of dtype " + dtype_name +
                         ", got " + array_description<T>(obj));
  }
  auto array = py::reinterpret_borrow<Array>(obj);
  if (array.ndim() != 1) {
    throw py::value_error(std::string(what) + ": expected a 1-D array of shape (n,), got " +
                          array_description<T>(obj));
  }
  return array;
}

py::array_t<double> to_numpy(const std::vector<double>& values) {
  py::array_t<double> out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

py::array_t<float> to_numpy(const std::vector<float>& values) {
  py::array_t<float> out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

std::shared_ptr<const rotorquant::LloydMaxCodebook> solved(std::int64_t dim, int bits, const std::string& density) {
  const rotorquant::CodebookDensity kind = rotorquant::parse_codebook_density(density);
  py::gil_scoped_release release;  // a first solve can take milliseconds
  return rotorquant::lloyd_max_codebook(dim, bits, kind);
}

}  // namespace

void bind_codebook(py::module_& m) {
  m.def(
      "codebook",
      [](std::int64_t dim, int bits, const std::string& density) {
        const auto cb = solved(dim, bits, density);
        py::dict out;
        out["dim"] = cb->dim();
        out["bits"] = cb->bits();
        out["density"] = rotorquant::codebook_density_name(cb->density());
        out["levels"] = cb->levels();
        out["centroids"] = to_numpy(cb->centroids());
        out["boundaries"] = to_numpy(cb->boundaries());
        out["centroids_f32"] = to_numpy(cb->centroids_f32());
        out["boundaries_f32"] = to_numpy(cb->boundaries_f32());
        out["mse_per_coordinate"] = cb->mse_per_coordinate();
        out["mse_total"] = cb->mse_total();
        return out;
      },
      py::arg("dim"), py::arg("bits"), py::arg("density"),
      "Lloyd-Max codebook for (dim, bits, density in {'sphere', 'gaussian'}), solved once and cached: "
      "dict(dim, bits, density, levels, centroids (float64, ascending), boundaries (float64, midpoints), "
      "centroids_f32, boundaries_f32, mse_per_coordinate, mse_total).");

  m.def(
      "codebook_quantize",
      [](std::int64_t dim, int bits, const std::string& density, const py::handle& x) {
        const auto values = as_vector<float>(x, "codebook_quantize", "float32");
        const auto cb = solved(dim, bits, density);
        const std::int64_t n = static_cast<std::int64_t>(values.shape(0));
        py::array_t<std::uint8_t> indices(static_cast<py::ssize_t>(n));
        const float* in = values.data();
        std::uint8_t* out = indices.mutable_data();
        {
          py::gil_scoped_release release;
          cb->quantize(in, out, n);
        }
        return indices;
      },
      py::arg("dim"), py::arg("bits"), py::arg("density"), py::arg("x"),
      "Cell index (uint8) of each value of a 1-D C-contiguous float32 array; a value exactly on a "
      "float32 boundary goes to the upper cell, NaN to 0.");

  m.def(
      "codebook_dequantize",
      [](std::int64_t dim, int bits, const std::string& density, const py::handle& idx) {
        const auto indices = as_vector<std::uint8_t>(idx, "codebook_dequantize", "uint8");
        const auto cb = solved(dim, bits, density);
        const std::int64_t n = static_cast<std::int64_t>(indices.shape(0));
        py::array_t<float> values(static_cast<py::ssize_t>(n));
        const std::uint8_t* in = indices.data();
        float* out = values.mutable_data();
        {
          py::gil_scoped_release release;
          cb->dequantize(in, out, n);  // ValueError on an index >= 2^bits
        }
        return values;
      },
      py::arg("dim"), py::arg("bits"), py::arg("density"), py::arg("indices"),
      "float32 centroid of each index of a 1-D C-contiguous uint8 array.");
}

}  // namespace rotorquant_bindings
