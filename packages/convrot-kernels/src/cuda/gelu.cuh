// GELU, tanh approximation (docs/format.md), in fp32, as x * sigmoid(2u): the
// same formula as the CPU backend's cpu/gelu.h, without cancellation for x << 0.
// A 16-bit input's result is rounded to 8 or 11 bits afterwards, so the fast
// exp2 and reciprocal (a few fp32 ulps) suffice there; fp32 inputs get the
// accurate ones.
#pragma once

#include <type_traits>

namespace convrot::cuda {

template <typename T>
__device__ __forceinline__ float gelu_tanh(float x) {
  if constexpr (std::is_same_v<T, float>) {
    // 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
    const float two_u = x * (1.5957691216057308f + 0.0713548162726009f * (x * x));
    return x / (1.0f + expf(-two_u));
  } else {
    // exp(-2u) as 2^t, t = -2u log2(e) with log2(e) folded into the constants (one multiply
    // fewer). The flush-to-zero exp2 skips the subnormal fix-up __expf carries (three
    // instructions): a result below 2^-126 leaves 1 + e == 1 either way. In this kernel's
    // issue-bound GELU rows those four instructions were a tenth of the work.
    const float t = x * (-2.302208198144325f - 0.1029432395800235f * (x * x));  // -2u log2(e)
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(t));
    return __fdividef(x, 1.0f + e);
  }
}

}  // namespace convrot::cuda
