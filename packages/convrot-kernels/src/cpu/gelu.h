// GELU, tanh approximation, in fp32 (docs/format.md): the same formula as the
// CUDA backend's, written as x * sigmoid(2u), which has no cancellation for x << 0.
#pragma once

#include <cmath>

namespace convrot::cpu {

inline float gelu_tanh(float x) {
  // 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
  const float two_u = x * (1.5957691216057308f + 0.0713548162726009f * x * x);
  return x / (1.0f + std::exp(-two_u));
}

}  // namespace convrot::cpu
