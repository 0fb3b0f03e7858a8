// Bindings of the batched Cl(3,0) operations (rotorquant::clifford::*_batch).
// Thin: shape checks, output allocation, GIL release. The Python layer
// (rotorquant/clifford.py) converts and broadcasts inputs to C-contiguous float64.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.hpp"
#include "rotorquant/clifford.hpp"
#include "rotorquant/error.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {

namespace {

using DoubleArray = py::array_t<double, py::array::c_style>;


// Requires shape (n, width) and returns n.
std::int64_t rows_of(const DoubleArray& array, py::ssize_t width, const char* name) {
  if (array.ndim() != 2 || array.shape(1) != width) {
    throw rotorquant::ValueError(rotorquant::detail::expected_got(
        std::string(name) + " shape", "(n, " + std::to_string(width) + ")", shape_string(array)));
  }
  return static_cast<std::int64_t>(array.shape(0));
}

void require_same_rows(std::int64_t n_a, std::int64_t n_b, const char* what) {
  if (n_a != n_b) {
    throw rotorquant::ValueError(rotorquant::detail::expected_got(
        std::string(what) + ": row count", std::to_string(n_a) + " (same as the first argument)", std::to_string(n_b)));
  }
}

DoubleArray multivector_output(std::int64_t n) { return DoubleArray({static_cast<py::ssize_t>(n), py::ssize_t(8)}); }

DoubleArray geometric_product(const DoubleArray& a, const DoubleArray& b) {
  const std::int64_t n = rows_of(a, 8, "clifford_geometric_product: a");
  require_same_rows(n, rows_of(b, 8, "clifford_geometric_product: b"), "clifford_geometric_product: b");
  DoubleArray out = multivector_output(n);
  const double* pa = a.data();
  const double* pb = b.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::geometric_product_batch(pa, pb, po, n);
  }
  return out;
}

DoubleArray reverse(const DoubleArray& a) {
  const std::int64_t n = rows_of(a, 8, "clifford_reverse: a");
  DoubleArray out = multivector_output(n);
  const double* pa = a.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::reverse_batch(pa, po, n);
  }
  return out;
}

DoubleArray grade(const DoubleArray& a, int k) {
  const std::int64_t n = rows_of(a, 8, "clifford_grade: a");
  DoubleArray out = multivector_output(n);
  const double* pa = a.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::grade_projection_batch(pa, po, n, k);
  }
  return out;
}

DoubleArray norm(const DoubleArray& a) {
  const std::int64_t n = rows_of(a, 8, "clifford_norm: a");
  DoubleArray out(static_cast<py::ssize_t>(n));
  const double* pa = a.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::norm_batch(pa, po, n);
  }
  return out;
}

DoubleArray sandwich(const DoubleArray& rotors, const DoubleArray& x) {
  const std::int64_t n = rows_of(rotors, 8, "clifford_sandwich: rotors");
  require_same_rows(n, rows_of(x, 8, "clifford_sandwich: x"), "clifford_sandwich: x");
  DoubleArray out = multivector_output(n);
  const double* pr = rotors.data();
  const double* px = x.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::sandwich_batch(pr, px, po, n);
  }
  return out;
}

DoubleArray rotor(const DoubleArray& bivectors, const DoubleArray& angles) {
  const std::int64_t n = rows_of(bivectors, 3, "clifford_rotor: bivectors");
  if (angles.ndim() != 1 || angles.shape(0) != n) {
    throw rotorquant::ValueError(rotorquant::detail::expected_got("clifford_rotor: angles shape",
                                                                  "(" + std::to_string(n) + ",)", shape_string(angles)));
  }
  DoubleArray out = multivector_output(n);
  const double* pb = bivectors.data();
  const double* pa = angles.data();
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    rotorquant::clifford::rotor_from_bivector_angle_batch(pb, pa, po, n);
  }
  return out;
}

}  // namespace

void bind_clifford(py::module_& m) {
  m.def("clifford_geometric_product", &geometric_product, py::arg("a"), py::arg("b"),
        "Row-wise geometric product of two (n, 8) float64 arrays of Cl(3,0) multivectors "
        "[1, e1, e2, e3, e12, e13, e23, e123].");
  m.def("clifford_reverse", &reverse, py::arg("a"), "Row-wise reverse (grades 2 and 3 negated) of an (n, 8) array.");
  m.def("clifford_grade", &grade, py::arg("a"), py::arg("k"),
        "Row-wise grade-k part (k in 0..3) of an (n, 8) array.");
  m.def("clifford_norm", &norm, py::arg("a"), "Row-wise Euclidean norm of an (n, 8) array; returns (n,).");
  m.def("clifford_sandwich", &sandwich, py::arg("rotors"), py::arg("x"),
        "Row-wise R x R~ for (n, 8) arrays of rotors (any multivectors) and operands.");
  m.def("clifford_rotor", &rotor, py::arg("bivectors"), py::arg("angles"),
        "Rotors exp(-angle/2 B) = cos(angle/2) - sin(angle/2) B from (n, 3) unit bivectors "
        "[b12, b13, b23] and (n,) angles; returns (n, 8).");
}

}  // namespace rotorquant_bindings
