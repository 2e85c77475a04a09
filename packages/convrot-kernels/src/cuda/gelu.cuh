// GELU, tanh approximation (docs/format.md), in fp32, as x * sigmoid(2u): the
// same formula as the CPU backend's cpu/gelu.h, without cancellation for x << 0.
// A 16-bit input's result is rounded to 8 or 11 bits afterwards, so the fast
// exp and division (a few fp32 ulps) suffice there; fp32 inputs get the
// accurate ones.
#pragma once

#include <type_traits>

namespace convrot::cuda {

template <typename T>
__device__ __forceinline__ float gelu_tanh(float x) {
  // 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
  const float two_u = x * (1.5957691216057308f + 0.0713548162726009f * (x * x));
  if constexpr (std::is_same_v<T, float>) {
    return x / (1.0f + expf(-two_u));
  } else {
    return __fdividef(x, 1.0f + __expf(-two_u));
  }
}

}  // namespace convrot::cuda
