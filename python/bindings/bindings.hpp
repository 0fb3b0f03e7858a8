// Declarations shared by the binding files of rotorquant._core.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace rotorquant {
struct QuantizerParams;
}  // namespace rotorquant

namespace rotorquant_bindings {

void bind_system(pybind11::module_& m);    // bind_system.cpp: threads, build info
void bind_clifford(pybind11::module_& m);  // bind_clifford.cpp: batched Cl(3,0) operations
void bind_codebook(pybind11::module_& m);  // bind_codebook.cpp: Lloyd-Max codebooks
void bind_rotation(pybind11::module_& m);  // bind_rotation.cpp: Rotation on CPU arrays
void bind_cuda(pybind11::module_& m);      // bind_cuda.cpp: device queries and CUDA launches (stubs without CUDA)
void bind_quantizer(pybind11::module_& m);  // bind_quantizer.cpp: Quantizer, code (de)serialization
void bind_kv_cache(pybind11::module_& m);  // bind_kv_cache.cpp: compressed KV cache
void bind_attention(pybind11::module_& m);  // bind_attention.cpp: fused CUDA decode attention

// "(2, 3)" / "(5,)": an array's shape as Python prints it, for error messages (bind_util.cpp).
std::string shape_string(const pybind11::array& array);

// Any integer-like object (int, numpy integer) -> uint64; negative or >= 2**64 -> ValueError,
// not an integer -> TypeError; `what` names the caller in the message (bind_util.cpp).
std::uint64_t seed_from_object(const pybind11::object& seed_object, const char* what);

// A quantizer's parameters as the dict Python sees (Quantizer.params, KVCache.quantizer_params) (bind_quantizer.cpp).
pybind11::dict params_dict(const rotorquant::QuantizerParams& params);

}  // namespace rotorquant_bindings
