// The persistent warp-specialised Hopper GEMM (gemm_sm90_persistent.cu): for
// M large enough to fill the GPU with 256 x 144 output tiles.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../primitives.h"

namespace convrot::cuda::sm90_persistent {

// Whether the kernel handles these operands; the caller checks first that the
// device has compute capability 9.0 and the build holds sm_90a code.
bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw);

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream);

}  // namespace convrot::cuda::sm90_persistent
