// Declarations shared by the binding files of rotorquant._core.
#pragma once

#include <pybind11/pybind11.h>

namespace rotorquant_bindings {

void bind_system(pybind11::module_& m);    // bind_system.cpp: threads, build info
void bind_clifford(pybind11::module_& m);  // bind_clifford.cpp: batched Cl(3,0) operations
void bind_codebook(pybind11::module_& m);  // bind_codebook.cpp: Lloyd-Max codebooks
void bind_rotation(pybind11::module_& m);  // bind_rotation.cpp: Rotation on CPU arrays
void bind_cuda(pybind11::module_& m);      // bind_cuda.cpp: device queries and CUDA launches (stubs without CUDA)
void bind_quantizer(pybind11::module_& m);  // bind_quantizer.cpp: Quantizer, code (de)serialization

}  // namespace rotorquant_bindings
