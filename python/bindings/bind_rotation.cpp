// Bindings of rotorquant::Rotation (rotation.hpp) on C-contiguous float32 numpy arrays.
// Thin: shape checks and buffer plumbing only; the GIL is released around the batched maps.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "bindings.hpp"
#include "rotorquant/rotation.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {
namespace {

using FloatArray = py::array_t<float, py::array::c_style>;


// The array itself as a C-contiguous float32 array (no copy, no conversion: the Python
// layer converts); anything else -> TypeError naming dtype and layout.
FloatArray as_float_array(const py::handle& obj, const char* what, const char* name) {
  if (!FloatArray::check_(obj)) {
    std::string got;
    if (py::isinstance<py::array>(obj)) {
      const auto a = py::reinterpret_borrow<py::array>(obj);
      got = "dtype " + std::string(py::str(a.dtype())) +
            ((a.flags() & py::array::c_style) ? ", C-contiguous" : ", not C-contiguous");
    } else {
      got = std::string(py::str(py::type::of(obj).attr("__name__")));
    }
    throw py::type_error(std::string(what) + ": expected " + name +
                         " as a C-contiguous numpy array of dtype float32, got " + got);
  }
  return py::reinterpret_borrow<FloatArray>(obj);
}


// Throws ValueError "<what>: expected <name> of shape (n, cols), got (...)" unless a is (n, cols);
// returns n.
std::int64_t check_rows(const py::array& a, std::int64_t cols, const char* what, const char* name) {
  if (a.ndim() != 2 || a.shape(1) != cols) {
    throw py::value_error(std::string(what) + ": expected " + name + " of shape (n, " + std::to_string(cols) +
                          "), got " + shape_string(a));
  }
  return static_cast<std::int64_t>(a.shape(0));
}

void check_out(const py::array& out, std::int64_t n, std::int64_t cols, const char* what) {
  if (out.ndim() != 2 || out.shape(0) != n || out.shape(1) != cols) {
    throw py::value_error(std::string(what) + ": expected out of shape (" + std::to_string(n) + ", " +
                          std::to_string(cols) + "), got " + shape_string(out));
  }
  if (!out.writeable()) throw py::value_error(std::string(what) + ": expected a writeable out array, got a read-only one");
}

void check_no_overlap(const FloatArray& in, const FloatArray& out, const char* what) {
  const auto* in_begin = reinterpret_cast<const char*>(in.data());
  const auto* in_end = in_begin + in.nbytes();
  const auto* out_begin = reinterpret_cast<const char*>(out.data());
  const auto* out_end = out_begin + out.nbytes();
  if (in.nbytes() > 0 && out.nbytes() > 0 && in_begin < out_end && out_begin < in_end) {
    throw py::value_error(std::string(what) + ": expected out not to overlap the input, got overlapping memory");
  }
}


}  // namespace

void bind_rotation(py::module_& m) {
  using rotorquant::Rotation;

  m.def(
      "rotation_kinds", []() { return rotorquant::rotation_kind_names(); },
      "Names of the rotation kinds: identity, dense, hadamard, rotor3, planar, quat, rotor_network.");
  m.def(
      "rotation_padded_dim",
      [](const std::string& kind, std::int64_t dim) {
        return rotorquant::rotation_padded_dim(rotorquant::parse_rotation_kind(kind), dim);
      },
      py::arg("kind"), py::arg("dim"), "Number of coordinates of the rotated vector for a kind and an input dim.");

  py::class_<Rotation>(m, "Rotation",
                       "A random orthogonal map R^dim -> R^padded_dim (zero padding), built from (kind, dim, seed).")
      .def(py::init([](const std::string& kind, std::int64_t dim, const py::object& seed) {
             const std::uint64_t seed_value = seed_from_object(seed, "Rotation");
             return Rotation(rotorquant::parse_rotation_kind(kind), dim, seed_value);
           }),
           py::arg("kind"), py::arg("dim"), py::arg("seed") = 0)
      .def_property_readonly("kind", &Rotation::kind_name)
      .def_property_readonly("dim", &Rotation::dim)
      .def_property_readonly("padded_dim", &Rotation::padded_dim)
      .def_property_readonly("seed", &Rotation::seed)
      .def_property_readonly("num_parameters", &Rotation::num_parameters)
      .def(
          "parameters",
          [](const Rotation& self) {
            const auto& params = self.parameters();
            FloatArray out(static_cast<py::ssize_t>(params.size()));
            if (!params.empty()) std::memcpy(out.mutable_data(), params.data(), params.size() * sizeof(float));
            return out;
          },
          "The float32 parameters that define the map (a copy); layout in rotation.hpp.")
      .def(
          "matrix",
          [](const Rotation& self) {
            std::vector<double> mat;
            {
              py::gil_scoped_release release;
              mat = self.matrix();
            }
            const py::ssize_t p = static_cast<py::ssize_t>(self.padded_dim());
            py::array_t<double, py::array::c_style> out({p, p});
            std::memcpy(out.mutable_data(), mat.data(), mat.size() * sizeof(double));
            return out;
          },
          "The orthogonal (padded_dim, padded_dim) float64 matrix M: apply(x) = M @ pad(x).")
      .def(
          "apply",
          [](const Rotation& self, const py::object& x_object) {
            const FloatArray x = as_float_array(x_object, "Rotation.apply", "x");
            const std::int64_t n = check_rows(x, self.dim(), "Rotation.apply", "x");
            FloatArray out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(self.padded_dim())});
            const float* in_ptr = x.data();
            float* out_ptr = out.mutable_data();
            {
              py::gil_scoped_release release;
              self.apply(in_ptr, out_ptr, n);
            }
            return out;
          },
          py::arg("x"), "x: float32 C-contiguous (n, dim) -> (n, padded_dim).")
      .def(
          "inverse",
          [](const Rotation& self, const py::object& y_object) {
            const FloatArray y = as_float_array(y_object, "Rotation.inverse", "y");
            const std::int64_t n = check_rows(y, self.padded_dim(), "Rotation.inverse", "y");
            FloatArray out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(self.dim())});
            const float* in_ptr = y.data();
            float* out_ptr = out.mutable_data();
            {
              py::gil_scoped_release release;
              self.inverse(in_ptr, out_ptr, n);
            }
            return out;
          },
          py::arg("y"), "y: float32 C-contiguous (n, padded_dim) -> (n, dim).")
      .def(
          "apply_into",
          [](const Rotation& self, const py::object& x_object, const py::object& out_object) {
            const FloatArray x = as_float_array(x_object, "Rotation.apply_into", "x");
            FloatArray out = as_float_array(out_object, "Rotation.apply_into", "out");
            const std::int64_t n = check_rows(x, self.dim(), "Rotation.apply_into", "x");
            check_out(out, n, self.padded_dim(), "Rotation.apply_into");
            check_no_overlap(x, out, "Rotation.apply_into");
            const float* in_ptr = x.data();
            float* out_ptr = out.mutable_data();
            py::gil_scoped_release release;
            self.apply(in_ptr, out_ptr, n);
          },
          py::arg("x"), py::arg("out"),
          "Writes apply(x) into out: float32 C-contiguous (n, padded_dim).")
      .def(
          "inverse_into",
          [](const Rotation& self, const py::object& y_object, const py::object& out_object) {
            const FloatArray y = as_float_array(y_object, "Rotation.inverse_into", "y");
            FloatArray out = as_float_array(out_object, "Rotation.inverse_into", "out");
            const std::int64_t n = check_rows(y, self.padded_dim(), "Rotation.inverse_into", "y");
            check_out(out, n, self.dim(), "Rotation.inverse_into");
            check_no_overlap(y, out, "Rotation.inverse_into");
            const float* in_ptr = y.data();
            float* out_ptr = out.mutable_data();
            py::gil_scoped_release release;
            self.inverse(in_ptr, out_ptr, n);
          },
          py::arg("y"), py::arg("out"),
          "Writes inverse(y) into out: float32 C-contiguous (n, dim).")
      .def("__repr__", [](const Rotation& self) {
        return "Rotation(kind='" + self.kind_name() + "', dim=" + std::to_string(self.dim()) +
               ", seed=" + std::to_string(self.seed()) + ")";
      });
}

}  // namespace rotorquant_bindings
