// The weight-streaming GEMM for M <= 64. With few activation rows the GEMM is
// a pass over the packed weights (N x K/2 bytes, 4x fewer than bf16), so the
// kernel is built to keep HBM busy rather than the tensor cores:
//   - each block owns 16 weight rows (8 at M <= 16 where 16-row blocks would not
//     fill every SM's resident block slots: fewer bytes in flight); its
//     8 warps split K between them in slices of 64 packed bytes per row, and every
//     thread issues the 16-byte loads of several slices (streaming, no L1
//     allocation) before it uses any;
//   - weights go straight from those loads into mma.sync m16n8k32 B fragments
//     (no shared memory), activations (a few KB, L1/L2-resident) into A
//     fragments of up to four 16-row blocks;
//   - the warps' int32 partial sums meet in shared memory, and the fp32
//     epilogue y = fp32(acc) * sa[m] * sw[n] + bias[n] writes the output, its
//     scales and bias loaded at the start so that their latency hides under the loop.
// 4-bit codes use the nibble expansion and K permutation of the Hopper GEMM
// (gemm_sm90_persistent.cu): thread quad position t loads packed bytes
// 16t..16t+15 of a slice row; word c feeds k-step c, low nibbles at positions
// 4t..4t+3 and high nibbles at 16+4t..16+4t+3, each as 16 * code, so the sums
// are 256x the true ones until the epilogue's exact shift. 8-bit codes: words
// 2c and 2c+1 of the 16 bytes feed k-step c at positions 4t.. and 16+4t...
#include "common.cuh"
#include "gemm_small_m.h"

namespace convrot::cuda::small_m {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlocksPerSm = 3;  // 16-row blocks resident per SM at M <= 16 (80 registers a thread)
constexpr int kSliceBytes = 64;  // bytes of a row per warp and slice: four threads x 16 bytes

__device__ __forceinline__ uint4 load_streaming(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ uint32_t low_nibbles_x16(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t high_nibbles_x16(uint32_t w) { return w & 0xF0F0F0F0u; }

// c += a * b: m16n8k32, int8 operands, int32 accumulators.
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// MB: 16-row blocks of activations; NB: 8-row blocks of weights; UNROLL: slices whose loads a
// thread issues before using them.
template <int BITS, int MB, int NB, int UNROLL>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const uint8_t* __restrict__ qa, const float* __restrict__ sa, const uint8_t* __restrict__ qw,
                const float* __restrict__ sw, const float* __restrict__ bias, void* __restrict__ out, Float out_dtype,
                int m, int n, int row_bytes) {
  __shared__ int partial[MB * NB * 4][kWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int g = lane >> 2, quarter = lane & 3;
  const int n0 = blockIdx.x * 8 * NB;
  const int num_slices = (row_bytes + kSliceBytes - 1) / kSliceBytes;

  // Entry e of lane l of the partial sums: accumulator r = e % 4 of n8 block (e / 4) % NB and
  // m16 block e / (4 NB), i.e. token 16 * mb + l / 4 (+ 8 for r >= 2) and weight row
  // 8 * nb + 2 * (l % 4) + r % 2. Thread t turns entries t, t + kThreads, ... into outputs.
  constexpr int kEntries = MB * NB * 4 * 32, kMine = (kEntries + kThreads - 1) / kThreads;
  const auto entry = [&](int i, int& token, int& row) {  // token = m: nothing to write
    const int idx = threadIdx.x + i * kThreads, e = idx / 32, l = idx % 32;
    const int r = e % 4, nb = (e / 4) % NB, mb = e / (4 * NB);
    token = 16 * mb + l / 4 + (r >= 2 ? 8 : 0);
    row = n0 + 8 * nb + 2 * (l % 4) + r % 2;
    if (idx >= kEntries || token >= m || row >= n) token = m;
  };
  // With one entry a thread, its scales and bias are loaded before the main loop, so that
  // their latency hides under it; more would cost registers, and resident blocks.
  constexpr bool kEarly = kMine == 1;
  float out_sa[kMine], out_sw[kMine], out_bias[kMine];
  const auto load_operands = [&] {
#pragma unroll
    for (int i = 0; i < kMine; ++i) {
      int token, row;
      entry(i, token, row);
      const bool ok = token < m;
      out_sa[i] = ok ? sa[token] : 0.0f;
      out_sw[i] = ok ? sw[row] : 0.0f;
      out_bias[i] = ok && bias != nullptr ? bias[row] : 0.0f;
    }
  };
  if constexpr (kEarly) load_operands();

  const uint8_t* w_row[NB];
  bool w_ok[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int row = n0 + 8 * nb + g;
    w_ok[nb] = row < n;
    w_row[nb] = qw + int64_t(w_ok[nb] ? row : 0) * row_bytes + 16 * quarter;
  }
  const uint8_t* a_row[MB][2];
  bool a_ok[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int token = 16 * mb + 8 * h + g;
      a_ok[mb][h] = token < m;
      a_row[mb][h] = qa + int64_t(a_ok[mb][h] ? token : 0) * row_bytes + 16 * quarter;
    }
  }

  int acc[MB][NB][4] = {};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int first = warp; first < num_slices; first += kWarps * UNROLL) {
    uint4 w[UNROLL][NB], x[UNROLL][MB][2];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int slice = first + u * kWarps;
      const int offset = slice * kSliceBytes;
      const bool in = slice < num_slices && offset + 16 * quarter < row_bytes;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) w[u][nb] = in && w_ok[nb] ? load_streaming(w_row[nb] + offset) : zero;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          x[u][mb][h] = in && a_ok[mb][h] ? __ldg(reinterpret_cast<const uint4*>(a_row[mb][h] + offset)) : zero;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int step = 0; step < (BITS == 4 ? 4 : 2); ++step) {
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            const uint4 &lo = x[u][mb][0], &hi = x[u][mb][1];
            if constexpr (BITS == 4) {
              mma_s8(acc[mb][nb], low_nibbles_x16(word(lo, step)), low_nibbles_x16(word(hi, step)),
                     high_nibbles_x16(word(lo, step)), high_nibbles_x16(word(hi, step)),
                     low_nibbles_x16(word(w[u][nb], step)), high_nibbles_x16(word(w[u][nb], step)));
            } else {
              mma_s8(acc[mb][nb], word(lo, 2 * step), word(hi, 2 * step), word(lo, 2 * step + 1),
                     word(hi, 2 * step + 1), word(w[u][nb], 2 * step), word(w[u][nb], 2 * step + 1));
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[(mb * NB + nb) * 4 + r][warp][lane] = acc[mb][nb][r];
    }
  }
  __syncthreads();
  if constexpr (!kEarly) load_operands();
#pragma unroll
  for (int i = 0; i < kMine; ++i) {
    int token, row;
    entry(i, token, row);
    if (token < m) {
      const int idx = threadIdx.x + i * kThreads, e = idx / 32, l = idx % 32;
      int sum = 0;
#pragma unroll
      for (int wp = 0; wp < kWarps; ++wp) sum += partial[e][wp][l];
      float y = __fmul_rn(__fmul_rn(float(sum >> (BITS == 4 ? 8 : 0)), out_sa[i]), out_sw[i]);
      if (bias != nullptr) y = __fadd_rn(y, out_bias[i]);
      store_as(out, out_dtype, int64_t(token) * n + row, y);
    }
  }
}

template <int BITS, int MB, int NB, int UNROLL>
void launch(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
            Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const int row_bytes = int(k * BITS / 8);
  const unsigned blocks = unsigned(ceil_div<int64_t>(n, 8 * NB));
  gemm_kernel<BITS, MB, NB, UNROLL><<<blocks, kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(qa), sa, static_cast<const uint8_t*>(qw), sw, bias, out, out_dtype, int(m), int(n),
      row_bytes);
  check_launch("small-M gemm");
}

template <int BITS>
void launch_bits(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
                 Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (m <= 16) {
    // 8-row blocks where 16-row ones would not fill every SM's resident slots: measured faster
    // on the H200 (e.g. 1 x 12288 x 3072: 10.9 vs 11.7 us); at M = 64 they were slower.
    if (ceil_div<int64_t>(n, 16) < kBlocksPerSm * multiprocessors()) {
      return launch<BITS, 1, 1, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
    }
    return launch<BITS, 1, 2, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
  }
  if (m <= 32) return launch<BITS, 2, 2, 2>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
  launch<BITS, 4, 2, 2>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace

bool supports(int64_t m, int64_t n, int64_t k, int bits, const void* qa, const void* qw) {
  const int64_t row_bytes = k * bits / 8;
  return m >= 1 && m <= kMaxM && row_bytes > 0 && row_bytes % 16 == 0 && row_bytes < (int64_t(1) << 30) &&
         aligned16(qa) && aligned16(qw) && n < (int64_t(1) << 31) && (bits == 8 || k < (int64_t(1) << 17));
}

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, int bits, cudaStream_t stream) {
  if (bits == 4) return launch_bits<4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
  launch_bits<8>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace convrot::cuda::small_m
