#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "rotorquant/parallel.hpp"

namespace py = pybind11;

namespace rotorquant_bindings {

void bind_system(py::module_& m) {
  m.def("num_threads", &rotorquant::num_threads, "Worker threads used by batched CPU calls.");
  m.def("set_num_threads", &rotorquant::set_num_threads, py::arg("n"),
        "Set the worker thread count for batched CPU calls (n <= 0 restores the default).");
#ifdef ROTORQUANT_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cuda_archs") = ROTORQUANT_CUDA_ARCHS_STRING;
#if defined(__VERSION__)
  m.attr("compiler") = __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}

}  // namespace rotorquant_bindings
