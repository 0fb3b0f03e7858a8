// What the fused CUDA decode-attention kernels (cuda/include/rotorquant/cuda/attention.hpp, docs/attention.md)
// support. In the core so that every build (with or without CUDA) answers the same way and callers can choose
// the fused path or a fallback before touching a device.
#pragma once

#include <string>

#include "rotorquant/quantizer.hpp"

namespace rotorquant {

// Empty when the fused kernels handle this pair of key / value quantizer parameters (seeds aside), else a
// sentence saying why not: mse mode, bits 2..4 each, equal dims / rotations / norm dtypes, rotation identity,
// dense, hadamard, planar or quat, and padded_dim == dim in {64, 128, 256}.
std::string decode_attention_unsupported_reason(const QuantizerParams& keys, const QuantizerParams& values);

}  // namespace rotorquant
