// The GEMM implementations behind cuda::gemm (gemm.cu picks one per call).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../primitives.h"

namespace convrot::cuda {

namespace sm90 {
// TMA + wgmma kernel (gemm_sm90.cu), one 128 x tile_n (128 or 256) tile per CTA; runs only
// on compute capability 9.0 from an sm_90a build.
bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw);
void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, int tile_n, cudaStream_t stream);
}  // namespace sm90

namespace simt {
// Portable dp4a kernel (gemm_simt.cu): any shape, any architecture from sm_61.
void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream);
}  // namespace simt

}  // namespace convrot::cuda
