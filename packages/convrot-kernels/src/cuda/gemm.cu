// cuda::gemm: picks the Hopper kernel where it applies, the portable one elsewhere.
#include "common.cuh"
#include "gemm_kernels.h"

namespace convrot::cuda {
namespace {

// Whether this build holds Hopper machine code (nvcc lists its targets, host side too).
constexpr bool built_for_hopper() {
#ifdef __CUDA_ARCH_LIST__
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int arch : archs) {
    if (arch == 900) return true;
  }
#endif
  return false;
}

}  // namespace

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, int bits, void* stream) {
  if (m == 0 || n == 0) return;
  const cudaStream_t s = as_stream(stream);
  if (built_for_hopper() && current_device_cc() == 90 && sm90::supports(m, n, k, bits, qa, qw)) {
    sm90::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, bits, s);
  } else {
    simt::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, bits, s);
  }
}

}  // namespace convrot::cuda
