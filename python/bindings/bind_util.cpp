// Argument helpers shared by the binding files (no algorithm logic).
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {

std::string shape_string(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
    if (axis > 0) text += ", ";
    text += std::to_string(array.shape(axis));
  }
  if (array.ndim() == 1) text += ",";
  return text + ")";
}

std::uint64_t seed_from_object(const py::object& seed_object, const char* what) {
  PyObject* index = PyNumber_Index(seed_object.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error(std::string(what) + ": expected an integer seed, got " +
                         std::string(py::str(py::type::of(seed_object).attr("__name__"))));
  }
  const py::int_ seed = py::reinterpret_steal<py::int_>(index);
  if (PyObject_RichCompareBool(seed.ptr(), py::int_(0).ptr(), Py_LT) == 1) {
    throw py::value_error(std::string(what) + ": expected seed >= 0 (a uint64), got " + std::string(py::str(seed)));
  }
  const unsigned long long value = PyLong_AsUnsignedLongLong(seed.ptr());
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(what) + ": expected seed < 2**64 (a uint64), got " + std::string(py::str(seed)));
  }
  return static_cast<std::uint64_t>(value);
}

}  // namespace rotorquant_bindings
