// The extension module rotorquant._core: thin bindings over rotorquant::core (and
// rotorquant::cuda when built). No algorithm lives here. Each concept binds itself
// in its own file (bind_<concept>.cpp); this file wires them and maps exceptions.
#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "rotorquant/error.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "rotorquant native core (C++ reference implementation and optional CUDA kernels)";
  m.attr("__version__") = ROTORQUANT_VERSION_STRING;

  // C++ exception types -> Python exception types, with the C++ message.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rotorquant::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const rotorquant::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const rotorquant::RuntimeError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  rotorquant_bindings::bind_system(m);
  rotorquant_bindings::bind_clifford(m);
  rotorquant_bindings::bind_codebook(m);
  rotorquant_bindings::bind_rotation(m);
  rotorquant_bindings::bind_cuda(m);
  rotorquant_bindings::bind_quantizer(m);
  rotorquant_bindings::bind_kv_cache(m);
  rotorquant_bindings::bind_attention(m);
}
