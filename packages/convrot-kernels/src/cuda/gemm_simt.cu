// The portable GEMM: int8 dot products with dp4a in 64 x 64 tiles, 4-bit codes
// sign-extended on their way into shared memory. It serves every shape and
// architecture the Hopper kernel does not (K not a multiple of 32, non-Hopper
// GPUs); correctness, not speed, is its job.
#include "common.cuh"
#include "gemm_kernels.h"

namespace convrot::cuda::simt {
namespace {

constexpr int kTile = 64;      // rows of A and of B per block
constexpr int kWords = 16;     // int8x4 words of K per shared-memory slice (64 codes)
constexpr int kThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs

// Four consecutive codes k0 .. k0+3 of row `row` as an int8x4 word, zero past the matrix; with
// `group_scale` (4-bit weights, uint8 [rows, k / 64]) each code times its group's multiplier.
template <int BITS>
__device__ __forceinline__ int load_word(const void* q, int64_t rows, int64_t k, int64_t row, int64_t k0,
                                         const uint8_t* group_scale = nullptr) {
  if (row >= rows) return 0;
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t kk = k0 + e;
    if (kk >= k) break;
    int code;
    if constexpr (BITS == 4) {
      const uint8_t byte = static_cast<const uint8_t*>(q)[row * (k / 2) + kk / 2];
      code = (kk & 1) ? int(int8_t(byte) >> 4) : int(int8_t(byte << 4) >> 4);
      if (group_scale != nullptr) code *= int(group_scale[row * (k / kWeightGroup) + kk / kWeightGroup]);
    } else {
      code = static_cast<const int8_t*>(q)[row * k + kk];
    }
    word |= (uint32_t(code) & 0xFF) << (8 * e);
  }
  return int(word);
}

// A_BITS, W_BITS: the activations' and weights' code widths; group_scale as load_word's.
template <int A_BITS, int W_BITS>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const void* __restrict__ qa, const float* __restrict__ sa,
                                                        const void* __restrict__ qw, const float* __restrict__ sw,
                                                        const uint8_t* __restrict__ group_scale,
                                                        const float* __restrict__ bias, void* __restrict__ out,
                                                        Float out_dtype, int64_t m, int64_t n, int64_t k) {
  __shared__ int a_tile[kWords][kTile + 1];
  __shared__ int b_tile[kWords][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += 4 * kWords) {
    for (int idx = threadIdx.x; idx < kTile * kWords; idx += kThreads) {
      const int r = idx / kWords, w = idx % kWords;
      a_tile[w][r] = load_word<A_BITS>(qa, m, k, m0 + r, k0 + 4 * w);
      b_tile[w][r] = load_word<W_BITS>(qw, n, k, n0 + r, k0 + 4 * w, group_scale);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_tile[w][ty + 16 * i];
        b[i] = b_tile[w][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= n) continue;
      float y = __fmul_rn(__fmul_rn(float(acc[i][j]), sa[row]), sw[col]);
      if (bias != nullptr) y = __fadd_rn(y, bias[col]);
      store_as(out, out_dtype, row * n + col, y);
    }
  }
}

}  // namespace

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream) {
  if (ceil_div<int64_t>(m, kTile) > 65535) throw std::runtime_error("convrot_kernels CUDA: M too large for the portable GEMM");
  const dim3 grid(unsigned(ceil_div<int64_t>(n, kTile)), unsigned(ceil_div<int64_t>(m, kTile)));
  const uint8_t* group_scale = codes.group_scale;
  if (codes.weight_bits == 8) {
    gemm_kernel<8, 8><<<grid, kThreads, 0, stream>>>(qa, sa, qw, sw, nullptr, bias, out, out_dtype, m, n, k);
  } else if (codes.act_bits == 8) {
    gemm_kernel<8, 4><<<grid, kThreads, 0, stream>>>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k);
  } else {
    gemm_kernel<4, 4><<<grid, kThreads, 0, stream>>>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k);
  }
  check_launch("portable gemm");
}

}  // namespace convrot::cuda::simt
