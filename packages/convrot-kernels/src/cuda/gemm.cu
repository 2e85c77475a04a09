// cuda::gemm: picks, per call, the fastest kernel that applies:
//   - Hopper, M <= 64: the weight-streaming kernel (gemm_small_m.cu);
//   - Hopper, 64 < M <= 128, or M <= 512 with N <= 4096: the 128 x 128-tile TMA +
//     wgmma kernel (gemm_sm90.cu), whose many small tiles fill the SMs where the
//     persistent kernel's 256 x 144 tiles leave most of them idle (docs/benchmarks.md:
//     at M = 128, N = 12288 20.0 vs 27.5 us; at M = 512, N = 3072 18.9 vs 26.9 us at
//     K = 3072 and 55.6 vs 86.4 us at K = 12288; wider N or M = 1024 favour the persistent one);
//   - Hopper, larger M: the persistent TMA + wgmma kernel (gemm_sm90_persistent.cu);
//   - anywhere else, or shapes those do not take: the portable dp4a kernel.
// CONVROT_GEMM_KERNEL=small_m|sm90_persistent|sm90|simt forces one kernel
// wherever it supports the call, and CONVROT_SM90_TILE_N=128|256 the forced sm90
// kernel's tile width (tests and benchmarks compare them that way).
#include <cstdlib>
#include <cstring>

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

// Compute capability of the current device, looked up once per device.
int device_cc() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= kMaxDevices) return current_device_cc();
  if (cached[device] == 0) cached[device] = current_device_cc();
  return cached[device];
}

enum class Kernel { automatic, small_m, sm90_persistent, sm90, simt };

Kernel forced_kernel() {
  const char* env = std::getenv("CONVROT_GEMM_KERNEL");
  if (env == nullptr || *env == '\0') return Kernel::automatic;
  if (std::strcmp(env, "small_m") == 0) return Kernel::small_m;
  if (std::strcmp(env, "sm90_persistent") == 0) return Kernel::sm90_persistent;
  if (std::strcmp(env, "sm90") == 0) return Kernel::sm90;
  if (std::strcmp(env, "simt") == 0) return Kernel::simt;
  throw std::runtime_error(std::string("CONVROT_GEMM_KERNEL must be small_m, sm90_persistent, sm90 or simt, not '") +
                           env + "'");
}

// Tile width of a forced sm90 kernel: 256 unless CONVROT_SM90_TILE_N=128.
int forced_sm90_tile_n() {
  const char* env = std::getenv("CONVROT_SM90_TILE_N");
  return env != nullptr && std::atoi(env) == 128 ? 128 : 256;
}

}  // namespace

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes, void* stream) {
  if (m == 0 || n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const Kernel forced = forced_kernel();
  const bool hopper = built_for_hopper() && device_cc() == 90;
  const auto allowed = [forced](Kernel kernel) { return forced == Kernel::automatic || forced == kernel; };
  const bool medium_m = forced == Kernel::automatic && m > 64 && (m <= 128 || (m <= 512 && n <= 4096));
  if (hopper && allowed(Kernel::small_m) && small_m::supports(m, n, k, codes, qa, qw)) {
    small_m::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  } else if (hopper && medium_m && sm90::supports(m, n, k, codes, qa, qw)) {
    sm90::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, 128, s);
  } else if (hopper && allowed(Kernel::sm90_persistent) && sm90_persistent::supports(m, n, k, codes, qa, qw)) {
    sm90_persistent::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  } else if (hopper && forced == Kernel::sm90 && sm90::supports(m, n, k, codes, qa, qw)) {
    sm90::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, forced_sm90_tile_n(), s);
  } else {
    simt::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, s);
  }
}

}  // namespace convrot::cuda
