// The weight-streaming GEMM for few rows of activations (gemm_small_m.cu):
// AdaLN modulation layers and batch-1 paths, M <= kMaxM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../primitives.h"

namespace convrot::cuda::small_m {

constexpr int64_t kMaxM = 64;

// Whether the kernel handles these operands (any GPU from sm_80).
bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw);

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream);

}  // namespace convrot::cuda::small_m
