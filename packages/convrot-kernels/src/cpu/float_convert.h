// Host conversions between fp32 and the 16-bit float formats, round to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

#include "primitives.h"

namespace convrot::cpu {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}

inline uint16_t float_to_f16(float f) {
  _Float16 v = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

inline float load_float(const void* base, Float dtype, int64_t i) {
  switch (dtype) {
    case Float::f32: return static_cast<const float*>(base)[i];
    case Float::f16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

inline void store_float(void* base, Float dtype, int64_t i, float v) {
  switch (dtype) {
    case Float::f32: static_cast<float*>(base)[i] = v; break;
    case Float::f16: static_cast<uint16_t*>(base)[i] = float_to_f16(v); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
  }
}

// v rounded to dtype and back.
inline float round_to(Float dtype, float v) {
  switch (dtype) {
    case Float::f32: return v;
    case Float::f16: return f16_to_float(float_to_f16(v));
    default: return bf16_to_float(float_to_bf16(v));
  }
}

}  // namespace convrot::cpu
