// The Hopper (sm_90a) GEMM: TMA loads, int8 wgmma, dequantisation epilogue.
//
// Hopper has no usable int4 tensor cores, so 4-bit codes stay packed in global
// and shared memory and are expanded to int8 on the way to the int8 tensor
// cores. One CTA computes a 128 x BN tile with three warp roles:
//   - warp 8 (the producer) streams packed K-slices of A and B into a ring of
//     STAGES shared-memory slots with the bulk tensor copy engine (TMA);
//   - warpgroups 0 and 1 (the consumers, 64 rows each) expand the slot's B
//     (weights) into an int8 tile in wgmma's 128-byte-swizzled K-major layout,
//     load their A (activations) fragments straight into registers and expand
//     them there, then issue wgmma with A from registers and B from shared
//     memory, keeping one K-slice of wgmma in flight while preparing the next.
// Expansion puts each nibble in the high half of an int8 (16 * code, no sign
// arithmetic: two bit operations per four codes), so the int32 sum is 256x the
// true one: exact for K < 2^17, and the epilogue multiplies by 2^-8 (exact).
// The K order inside a slice is permuted identically for A and B, which leaves
// the dot product unchanged. 8-bit codes skip expansion: A and B both go from
// TMA's 128-byte-swizzled slots to wgmma.
// The epilogue computes y = fp32(acc) * sa[m] * sw[n] + bias[n] in fp32 and
// stores bf16/fp16/fp32 directly: no int32 [M, N] tensor touches memory.
#include <cuda.h>


#include "common.cuh"
#include "gemm_kernels.h"
#include "tensor_map.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "Build Hopper code for sm_90a (CONVROT_CUDA_ARCHS=...;90a-real): the GEMM needs wgmma"
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "sm90_ptx.cuh"
#include "wgmma_ops.cuh"
#endif

namespace convrot::cuda::sm90 {
namespace {

constexpr int kBM = 128;               // rows of A per CTA: two consumer warpgroups of 64
constexpr int kBK = 128;               // K elements per pipeline slot
constexpr int kConsumerThreads = 256;  // warps 0-7
// Warps 8-11 form the producer warpgroup (one thread issues TMA): a whole
// warpgroup, so that setmaxnreg can move its registers to the consumers.
constexpr int kThreads = kConsumerThreads + 128;
constexpr int kExpandedBuffers = 3;  // int8 B tiles: one being written, up to two being read

template <int BITS, int BN, int STAGES>
struct Layout {
  static constexpr int kRowBytes = kBK * BITS / 8;  // bytes of one row of a slot
  static constexpr int kABytes = kBM * kRowBytes;
  static constexpr int kBBytes = BN * kRowBytes;
  static constexpr int kExpandedBytes = BITS == 4 ? BN * kBK : 0;
  static constexpr int kA = 0;
  static constexpr int kB = kA + STAGES * kABytes;
  static constexpr int kExpanded = kB + STAGES * kBBytes;
  static constexpr int kBarriers = kExpanded + kExpandedBuffers * kExpandedBytes;
  static constexpr int kBytes = kBarriers + 2 * STAGES * 8;
  static constexpr int kSmem = kBytes + 1024;  // slack to align the base to 1024 bytes
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "slots must keep 1024-byte alignment");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using namespace sm90_ptx;

// Barrier 1 among the 256 consumer threads (barrier 0 is __syncthreads).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a TMA tile with 64-byte rows, 64-byte swizzle.
__device__ __forceinline__ int swz64(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }

// The K permutation within a 128-wide slice (64 packed bytes = 16 words, word w
// holding k = 8w .. 8w+7): wgmma k-step kb (32 k), thread quad position t
// takes word 4t + kb, its low nibbles at positions 4t..4t+3, its high nibbles
// at 16+4t..16+4t+3. Both the A register fragments and the expanded B rows
// follow it.

// Expands this consumer thread's share of the slot's packed B into the int8 tile.
template <int BN>
__device__ __forceinline__ void expand_b(const uint8_t* packed, uint8_t* expanded, int ct) {
  if constexpr (BN == 256) {  // one row per thread, all four k-steps
    const int row = ct;
    uint4 chunk[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) chunk[t] = *reinterpret_cast<const uint4*>(packed + swz64(row, t));
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const uint32_t w0 = word(chunk[0], kb), w1 = word(chunk[1], kb), w2 = word(chunk[2], kb),
                     w3 = word(chunk[3], kb);
      *reinterpret_cast<uint4*>(expanded + swizzle128(row, 2 * kb)) =
          make_uint4(low_nibbles_x16(w0), low_nibbles_x16(w1), low_nibbles_x16(w2), low_nibbles_x16(w3));
      *reinterpret_cast<uint4*>(expanded + swizzle128(row, 2 * kb + 1)) =
          make_uint4(high_nibbles_x16(w0), high_nibbles_x16(w1), high_nibbles_x16(w2), high_nibbles_x16(w3));
    }
  } else {  // BN == 128: half a row per thread, k-steps 2h and 2h+1
    const int row = ct >> 1, h = ct & 1;
    uint2 part[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) part[t] = *reinterpret_cast<const uint2*>(packed + swz64(row, t) + 8 * h);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int kb = 2 * h + j;
      const uint32_t w0 = j ? part[0].y : part[0].x, w1 = j ? part[1].y : part[1].x, w2 = j ? part[2].y : part[2].x,
                     w3 = j ? part[3].y : part[3].x;
      *reinterpret_cast<uint4*>(expanded + swizzle128(row, 2 * kb)) =
          make_uint4(low_nibbles_x16(w0), low_nibbles_x16(w1), low_nibbles_x16(w2), low_nibbles_x16(w3));
      *reinterpret_cast<uint4*>(expanded + swizzle128(row, 2 * kb + 1)) =
          make_uint4(high_nibbles_x16(w0), high_nibbles_x16(w1), high_nibbles_x16(w2), high_nibbles_x16(w3));
    }
  }
}

// The epilogue: y = fp32(acc) * unit * sa[m] * sw[n] + bias[n], in fp32, left to right.
// The output is written through a pointer the compiler must assume may alias the
// scales, so a scale loaded between two stores waits for the first: all scales
// and biases of a group of columns are loaded (read-only path) before the
// group's first store, one load latency per group instead of one per store.
constexpr int kEpilogueGroup = 8;  // n8 column blocks per group

template <int BN>
__device__ __forceinline__ void store_tile(const int (&acc)[BN / 2], float unit, const float* __restrict__ sa,
                                           const float* __restrict__ sw, const float* __restrict__ bias, void* out,
                                           Float out_dtype, int m, int n, int row0, int col0, bool pairs) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  float s_row[2];
  bool row_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    row_ok[half] = row < m;
    s_row[half] = row_ok[half] ? __ldg(sa + row) : 0.0f;
  }
#pragma unroll
  for (int j0 = 0; j0 < BN / 8; j0 += kEpilogueGroup) {
    float w[kEpilogueGroup][2], b[kEpilogueGroup][2];
#pragma unroll
    for (int j = 0; j < kEpilogueGroup; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + 8 * (j0 + j) + 2 * tig + e;
        w[j][e] = col < n ? __ldg(sw + col) : 0.0f;
        b[j][e] = col < n && bias != nullptr ? __ldg(bias + col) : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kEpilogueGroup; ++j) {
      const int col = col0 + 8 * (j0 + j) + 2 * tig;
      if (col >= n) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (!row_ok[half]) continue;
        float y[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          y[e] = __fmul_rn(__fmul_rn(__fmul_rn(float(acc[4 * (j0 + j) + 2 * half + e]), unit), s_row[half]), w[j][e]);
          if (bias != nullptr) y[e] = __fadd_rn(y[e], b[j][e]);
        }
        const int64_t at = int64_t(row0 + g + 8 * half) * n + col;
        if (pairs && col + 1 < n) {
          store2_as(out, out_dtype, at, y[0], y[1]);
        } else {
          store_as(out, out_dtype, at, y[0]);
          if (col + 1 < n) store_as(out, out_dtype, at + 1, y[1]);
        }
      }
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <int BITS, int BN, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                const float* __restrict__ sa, const float* __restrict__ sw, const float* __restrict__ bias,
                void* __restrict__ out, Float out_dtype, int m, int n, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<BITS, BN, STAGES>;
  extern __shared__ uint8_t smem_raw[];
  // Offsetting the array itself (not an integer address) keeps the accesses LDS/STS.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* empty = full + STAGES;

  const int num_k = (k + kBK - 1) / kBK;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= kConsumerThreads / 32) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (warp == kConsumerThreads / 32 && lane == 0) {
      for (int kt = 0; kt < num_k; ++kt) {
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(&empty[s], ((kt / STAGES) & 1) ^ 1);
        mbar_arrive_expect_tx(&full[s], L::kABytes + L::kBBytes);
        tma_load_2d(smem + L::kA + s * L::kABytes, &map_a, kt * L::kRowBytes, m0, &full[s]);
        tma_load_2d(smem + L::kB + s * L::kBBytes, &map_b, kt * L::kRowBytes, n0, &full[s]);
      }
    }
    return;
  }

  // consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int ct = threadIdx.x;      // 0..255
  const int wg = ct / 128;         // rows wg*64 .. wg*64+63 of the tile
  const int wrow = (warp & 3) * 16;  // this warp's 16 rows within the warpgroup
  int acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0;

  if constexpr (BITS == 4) {
    const int r0 = wg * 64 + wrow + (lane >> 2), tig = lane & 3;
    uint32_t a_regs[2][4][4];  // [parity of the slice][k-step][fragment register]
    auto slice = [&](int kt, auto parity) {
      constexpr int P = decltype(parity)::value;
      const int s = kt % STAGES;
      const uint8_t* packed_a = smem + L::kA + s * L::kABytes;
      const uint8_t* packed_b = smem + L::kB + s * L::kBBytes;
      uint8_t* expanded = smem + L::kExpanded + (kt % kExpandedBuffers) * L::kExpandedBytes;
      mbar_wait(&full[s], (kt / STAGES) & 1);
      expand_b<BN>(packed_b, expanded, ct);
      const uint4 lo_row = *reinterpret_cast<const uint4*>(packed_a + swz64(r0, tig));
      const uint4 hi_row = *reinterpret_cast<const uint4*>(packed_a + swz64(r0 + 8, tig));
      fence_proxy_async();
      consumers_sync();  // the whole expanded B tile is written
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        a_regs[P][kb][0] = low_nibbles_x16(word(lo_row, kb));
        a_regs[P][kb][1] = low_nibbles_x16(word(hi_row, kb));
        a_regs[P][kb][2] = high_nibbles_x16(word(lo_row, kb));
        a_regs[P][kb][3] = high_nibbles_x16(word(hi_row, kb));
#pragma unroll
        for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a_regs[P][kb][r]));  // computed before the fence
      }
      // Release the packed slot only now: an mbarrier arrive issued right after the
      // shared-memory loads can overtake them (it does not wait for their data), and
      // the next TMA into the slot then overwrites A rows not yet read. Using the
      // loaded registers first guarantees the loads completed.
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
      wgmma_fence();
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) wgmma_rs<BN>(acc, a_regs[P][kb], smem_desc(expanded + 32 * kb));
      wgmma_commit();
      wgmma_wait<1>();  // the previous slice's wgmma (and its A registers) are done
    };
    int kt = 0;
    for (; kt + 1 < num_k; kt += 2) {
      slice(kt, std::integral_constant<int, 0>{});
      slice(kt + 1, std::integral_constant<int, 1>{});
    }
    if (kt < num_k) slice(kt, std::integral_constant<int, 0>{});
    wgmma_wait<0>();
  } else {
    for (int kt = 0; kt < num_k; ++kt) {
      const int s = kt % STAGES;
      const uint8_t* tile_a = smem + L::kA + s * L::kABytes + wg * 64 * L::kRowBytes;
      const uint8_t* tile_b = smem + L::kB + s * L::kBBytes;
      mbar_wait(&full[s], (kt / STAGES) & 1);
      wgmma_fence();
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) wgmma_ss<BN>(acc, smem_desc(tile_a + 32 * kb), smem_desc(tile_b + 32 * kb));
      wgmma_commit();
      wgmma_wait<1>();  // slice kt-1 is done: its slot can be refilled
      if (kt > 0 && lane == 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
    }
    wgmma_wait<0>();
  }

  const float unit = BITS == 4 ? 1.0f / 256.0f : 1.0f;
  const bool pairs = (n % 2) == 0 && (reinterpret_cast<uintptr_t>(out) & 7) == 0;
  store_tile<BN>(acc, unit, sa, sw, bias, out, out_dtype, m, n, m0 + wg * 64 + wrow, n0, pairs);
#endif
}

// ---- host side ----

template <int BITS, int BN, int STAGES>
void launch(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
            Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  using L = Layout<BITS, BN, STAGES>;
  const CUtensorMapSwizzle swizzle = BITS == 4 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
  const int64_t row_bytes = k * BITS / 8;
  const CUtensorMap map_a = tensor_map(qa, 1, m, row_bytes, kBM, L::kRowBytes, swizzle);
  const CUtensorMap map_b = tensor_map(qw, 1, n, row_bytes, BN, L::kRowBytes, swizzle);
  auto kernel = gemm_kernel<BITS, BN, STAGES>;
  allow_dynamic_smem(kernel, L::kSmem);
  const dim3 grid(unsigned(ceil_div<int64_t>(n, BN)), unsigned(ceil_div<int64_t>(m, kBM)));
  kernel<<<grid, kThreads, L::kSmem, stream>>>(map_a, map_b, sa, sw, bias, out, out_dtype, int(m), int(n), int(k));
  check_launch("sm90 gemm");
}

}  // namespace

// W4A4 and W8A8 only: the other schemes (docs/format.md) take the persistent or portable kernel.
bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw) {
  const int bits = codes.weight_bits;
  if (codes.act_bits != bits || codes.grouped()) return false;
  const int64_t row_bytes = k * bits / 8;
  return row_bytes % 16 == 0 && row_bytes > 0 && aligned16(qa) && aligned16(qw) && m < (int64_t(1) << 31) &&
         n < (int64_t(1) << 31) && (bits == 8 || k < (int64_t(1) << 17));
}

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, int tile_n, cudaStream_t stream) {
  const int bits = codes.weight_bits;
  const bool wide = tile_n == 256;
  if (bits == 4) {
    if (wide) return launch<4, 256, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
    return launch<4, 128, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
  }
  if (wide) return launch<8, 256, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
  return launch<8, 128, 4>(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace convrot::cuda::sm90
