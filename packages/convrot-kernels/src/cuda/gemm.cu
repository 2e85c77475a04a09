// cuda::gemm: picks, per call, the fastest kernel that applies:
//   - compute capability 8.0 and up, M <= 64: the weight-streaming kernel (gemm_small_m.cu,
//     mma.sync and cp.async; measured on Hopper only);
//   - Hopper, 64 < M <= 128, or M <= 512 with N <= 4096: the 128 x 128-tile TMA +
//     wgmma kernel (gemm_sm90.cu), whose many small tiles fill the SMs where the
//     persistent kernel's 256 x 144 tiles leave most of them idle (at M = 128, N = 12288
//     20.0 vs 27.5 us; at M = 512, N = 3072 18.9 vs 26.9 us at K = 3072 and 55.6 vs
//     86.4 us at K = 12288; wider N or M = 1024 favour the persistent one);
//   - Hopper, larger M: the persistent TMA + wgmma kernel (gemm_sm90_persistent.cu);
//   - anywhere else, or shapes those do not take: the portable dp4a kernel.
// force_gemm_kernel pins one kernel instead (tests and benchmarks compare them that way).
#include <atomic>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "gemm_kernels.h"
#include "gemm_small_m.h"
#include "gemm_sm90_persistent.h"

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

std::atomic<GemmKernel> forced_kernel{GemmKernel::automatic};
std::atomic<int> forced_sm90_tile_n{256};

const char* kernel_name(GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::small_m: return "small_m";
    case GemmKernel::sm90_persistent: return "sm90_persistent";
    case GemmKernel::sm90: return "sm90";
    case GemmKernel::simt: return "simt";
    default: return "automatic";
  }
}

[[noreturn]] void cannot_force(GemmKernel kernel, const char* why) {
  throw std::invalid_argument(std::string("the forced GEMM kernel '") + kernel_name(kernel) +
                              "' cannot run this call: " + why);
}

}  // namespace

void force_gemm_kernel(GemmKernel kernel, int sm90_tile_n) {
  if (sm90_tile_n != 128 && sm90_tile_n != 256) throw std::invalid_argument("sm90_tile_n must be 128 or 256");
  forced_kernel.store(kernel);
  forced_sm90_tile_n.store(sm90_tile_n);
}

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes, void* stream) {
  if (m == 0 || n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int cc = current_device().compute_capability;
  const bool hopper = built_for_hopper() && cc == 90;
  const bool small_m_ok = cc >= 80 && small_m::supports(m, n, k, codes, qa, qw);
  switch (forced_kernel.load()) {
    case GemmKernel::automatic:
      break;
    case GemmKernel::small_m:
      if (!small_m_ok) cannot_force(GemmKernel::small_m, "it needs compute capability 8.0+, M <= 64, rows of whole 16-byte pieces and 16-byte aligned codes");
      return small_m::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
    case GemmKernel::sm90_persistent:
      if (!hopper || !sm90_persistent::supports(m, n, k, codes, qa, qw)) {
        cannot_force(GemmKernel::sm90_persistent, "it needs an sm_90a build on compute capability 9.0, rows of whole 16-byte pieces, 16-byte aligned codes and a code scheme it implements");
      }
      return sm90_persistent::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
    case GemmKernel::sm90:
      if (!hopper || !sm90::supports(m, n, k, codes, qa, qw)) {
        cannot_force(GemmKernel::sm90, "it needs an sm_90a build on compute capability 9.0, rows of whole 16-byte pieces, 16-byte aligned codes and a code scheme it implements");
      }
      return sm90::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, forced_sm90_tile_n.load(), s);
    case GemmKernel::simt:
      return simt::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  }
  const bool medium_m = m > 64 && (m <= 128 || (m <= 512 && n <= 4096));
  if (small_m_ok) {
    small_m::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  } else if (hopper && medium_m && sm90::supports(m, n, k, codes, qa, qw)) {
    sm90::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, 128, s);
  } else if (hopper && sm90_persistent::supports(m, n, k, codes, qa, qw)) {
    sm90_persistent::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  } else {
    simt::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  }
}

}  // namespace convrot::cuda
