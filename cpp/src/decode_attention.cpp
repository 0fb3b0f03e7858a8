#include "rotorquant/decode_attention.hpp"

#include "rotorquant/rotation.hpp"

namespace rotorquant {

std::string decode_attention_unsupported_reason(const QuantizerParams& keys, const QuantizerParams& values) {
  if (keys.dim != values.dim) return "keys and values have different dims";
  if (keys.rotation != values.rotation) return "keys and values use different rotations";
  if (keys.norm_dtype != values.norm_dtype) return "keys and values use different norm dtypes";
  if (keys.mode != QuantizerMode::kMSE || values.mode != QuantizerMode::kMSE) {
    return "the fused kernel handles mse mode only (prod codes carry a QJL sketch)";
  }
  for (int bits : {keys.bits, values.bits}) {
    if (bits < 2 || bits > 4) return "the fused kernel handles 2, 3 or 4 bits (got " + std::to_string(bits) + ")";
  }
  switch (keys.rotation) {
    case RotationKind::kIdentity:
    case RotationKind::kDense:
    case RotationKind::kHadamard:
    case RotationKind::kPlanar:
    case RotationKind::kQuat:
      break;
    default:
      return "the fused kernel handles the identity, dense, hadamard, planar and quat rotations (got " +
             rotation_kind_name(keys.rotation) + ")";
  }
  const std::int64_t padded = rotation_padded_dim(keys.rotation, keys.dim);
  if (padded != keys.dim || (keys.dim != 64 && keys.dim != 128 && keys.dim != 256)) {
    return "the fused kernel handles head_dim 64, 128 or 256 with no padding (got dim " + std::to_string(keys.dim) +
           ", padded_dim " + std::to_string(padded) + ")";
  }
  return std::string();
}

}  // namespace rotorquant
