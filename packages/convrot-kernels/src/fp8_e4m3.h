// fp32 -> fp8 e4m3 (torch.float8_e4m3fn) by round to nearest even with saturation, the
// semantics of PTX cvt.rn.satfinite.e4m3x2.f32 (docs/format.md, attention_8bit). Portable
// integer code that the CPU and the CUDA pre-pass share, so that both write the same bytes.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define CONVROT_HOST_DEVICE __host__ __device__
#else
#define CONVROT_HOST_DEVICE
#endif

namespace convrot {

CONVROT_HOST_DEVICE inline uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

CONVROT_HOST_DEVICE inline uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;      // NaN
  if (a > 0x43e00000u) return sign | 0x7e;      // above 448 (infinity included): saturate to 448
  if (a < 0x3c800000u) {                        // below 2^-6: subnormal, steps of 2^-9 = 2^-6 * 2^-3
    // The value in units of 2^-9 is m = a's significand (with its implicit bit) shifted right by
    // (127 - 9 - e) + 23 - 23 bits; rounded half to even. Exponents below 2^-10 round to 0 or 1 unit.
    const int e = int(a >> 23) - 127;        // < -6
    const int shift = 23 + (-9 - e);         // bits dropped from the 24-bit significand, >= 21
    if (shift > 24) return sign;             // below 2^-10 (half a unit, a tie rounds to 0): 0
    const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
    const uint32_t kept = sig >> shift, rest = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
    const uint32_t m = kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
    return sign | uint8_t(m);                // m = 8 is 2^-6, the smallest normal: its code is 8 too
  }
  // Normal: keep 3 mantissa bits, half to even (a carry moves into the exponent as it should).
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t exponent = (r >> 23) - 127 + 7, mantissa = (r >> 20) & 7u;
  return sign | uint8_t((exponent << 3) | mantissa);
}

// The value of an e4m3 code (NaN for 0x7f / 0xff).
CONVROT_HOST_DEVICE inline float e4m3_to_float(uint8_t code) {
  const uint32_t exponent = (code >> 3) & 15u, mantissa = code & 7u;
  if (exponent == 0) {
    const float v = float(mantissa) * (1.0f / 512.0f);
    return (code & 0x80) ? -v : v;
  }
  const uint32_t sign = uint32_t(code & 0x80) << 24;
  const uint32_t bits = exponent == 15 && mantissa == 7 ? sign | 0x7fc00000u  // NaN
                                                        : sign | ((exponent - 7 + 127) << 23) | (mantissa << 20);
  float v;
#ifdef __CUDA_ARCH__
  v = __uint_as_float(bits);
#else
  std::memcpy(&v, &bits, 4);
#endif
  return v;
}

}  // namespace convrot
