// dtype.h — host conversions between the payload types and fp32 (combine accumulates in fp32).
#pragma once

#include <cstdint>
#include <cstring>

namespace deepep4j {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, NaN stays NaN. Both results are computed and one is selected (no branch), so loops over
// rows vectorise.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = (bits >> 16) | 0x40u;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float fp16_to_float(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return float(h);
}

inline uint16_t float_to_fp16(float f) {
  _Float16 h = _Float16(f);
  uint16_t v;
  std::memcpy(&v, &h, 2);
  return v;
}

}  // namespace deepep4j
