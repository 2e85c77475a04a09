// The persistent Hopper (sm_90a) GEMM: TMA ring, int4 expansion by a producer
// warpgroup, int8 wgmma with A from registers, fused dequantisation epilogue.
//
// One CTA per SM walks output tiles of 256 x 144 (M x N) in a fixed stride
// (tile = blockIdx.x + i * gridDim.x, M fastest, so the CTAs of a wave share
// their weight tiles in L2). 144 columns make 3072- and 12288-wide layers
// come out in whole waves on 132 SMs at M = 4608 (3072 / 144 = 21.3 tiles),
// where 128 or 256 would leave a last wave a quarter full. Warp roles:
//   - warp 0, one thread: TMA loads of packed K-slices (128 codes; W4A8 64) of A
//     and B into a ring of kStages slots;
//   - warps 1-3 (4-bit codes only; 56 registers): expand each slot's packed B (weights) into
//     an int8 tile in wgmma's swizzled K-major layout, in a ring of
//     kExpandedSlots, so the consumers never stop to expand B (W4A4: the three warps split
//     every slice; W4A8: each warp expands whole slices, every third one);
//   - warps 4-11, two consumer warpgroups of 128 rows (two m64 blocks each):
//     load their packed A rows from the slot, expand them in registers, and
//     issue wgmma m64n144k32 with A from registers, B from the expanded tile.
//     Each K-slice goes out as two commit groups (k-steps 0-1, 2-3) so one
//     group is always in flight while the next group's A registers are built.
//     8-bit codes skip expansion: A and B go from TMA's 128-byte-swizzled
//     slots straight to wgmma.
// The K order inside a slice is permuted identically for A and B (thread quad
// position t reads packed bytes 16t..16t+15 of a row; word c of them feeds
// k-step c: its low nibbles at positions 4t..4t+3, its high nibbles at
// 16+4t..16+4t+3), which leaves every dot product unchanged.
// Nibbles are expanded to 16 * code (sm90_ptx.cuh), so 4-bit sums are 256x the
// true ones and the epilogue shifts them back exactly. The epilogue computes
// y = fp32(acc) * sa[m] * sw[n] + bias[n] in fp32; the producer meanwhile fills
// the ring for the CTA's next tile. For 16-bit outputs (the common case) the
// epilogue is "staged": each consumer warpgroup writes its 128 x 144 half of the
// tile into shared memory and one thread hands it to a TMA store, which runs on
// while the warpgroup starts its next tile; the tile's scales and bias were
// fetched into shared memory by cp.async at the tile's start. Storing from
// registers straight to global memory (the fallback for fp32 outputs and
// unaligned rows) keeps the warps in the epilogue ~10 us per tile longer.
//
// The other schemes of docs/format.md reuse these roles. W4A8: A is int8 and goes from its TMA
// slot straight to wgmma, as for 8-bit codes; K-slices are 64 codes (Layout says why), so A's
// slots and the expanded B have 64-byte rows in the 64-byte swizzle; the expansion warps write B
// in natural K order (16 * code, so sums are 16x the true ones), two threads per row, each warp
// whole slices in turn (slice s by warp s % 3). Group-scaled
// 4-bit weights: the expansion warps multiply each code by its group's multiplier
// (int4_decode.cuh), loaded from global memory (L2-resident), writing the true int8 value: per
// K-slice for W4A4, for a warp's next slice for W4A8.
#include <cuda.h>

#include <type_traits>

#include "common.cuh"
#include "gemm_sm90_persistent.h"
#include "tensor_map.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "int4_decode.cuh"
#include "sm90_ptx.cuh"
#include "wgmma_n144.cuh"
#endif

namespace convrot::cuda::sm90_persistent {
namespace {

constexpr int kBM = 256;  // two consumer warpgroups x two m64 blocks
constexpr int kBN = 144;
constexpr int kThreads = 384;

// A_BITS, W_BITS: the activations' and weights' widths. STAGED: the 16-bit output tile is staged
// in shared memory for a TMA store (see above), which takes shared memory from the rings.
template <int A_BITS, int W_BITS, bool STAGED>
struct Layout {
  static constexpr bool kW4A8 = A_BITS == 8 && W_BITS == 4;
  // Codes per K-slice. W4A8's are 64: with 128, its 32 KB A slots left room for only two TMA
  // stages beside the staged output, and since the consumers release a slot one K-slice late,
  // TMA could not run ahead of the main loop (0.48-0.53x W4A4's speed). Half-width slices keep
  // the ring's bytes and double its depth in slices; their 64-byte rows take the 64-byte swizzle.
  // Its expansion warps take whole slices in turn, so both of its rings have a multiple of three
  // slots (StridedRing says why).
  static constexpr int kBK = kW4A8 ? 64 : 128;
  static constexpr int kARowBytes = kBK * A_BITS / 8;  // bytes of one row of a slot
  static constexpr int kBRowBytes = kBK * W_BITS / 8;
  static constexpr int kABytes = kBM * kARowBytes;
  static constexpr int kBBytes = kBN * kBRowBytes;
  static constexpr int kStages = kW4A8 ? 6 : STAGED ? 3 : W_BITS == 4 ? 5 : 4;
  static constexpr int kExpandedSlots = W_BITS == 4 ? (kW4A8 ? (STAGED ? 3 : 6) : STAGED ? 4 : 3) : 0;
  static constexpr int kExpandedBytes = kBN * kBK;
  static constexpr int kOutBytes = STAGED ? kBM * kBN * 2 : 0;  // two [128][kBN] 16-bit halves
  static constexpr int kScaleFloats = 2 * kBN + kBM / 2;         // per consumer warpgroup: sw, bias, sa
  static constexpr int kA = 0;
  static constexpr int kB = kA + kStages * kABytes;
  static constexpr int kExpanded = kB + kStages * kBBytes;
  static constexpr int kOut = kExpanded + kExpandedSlots * kExpandedBytes;
  static constexpr int kScales = kOut + kOutBytes;
  static constexpr int kBarriers = kScales + (STAGED ? 2 * kScaleFloats * 4 : 0);
  static constexpr int kNumBarriers = 2 * kStages + 2 * kExpandedSlots;
  static constexpr int kSmem = kBarriers + 8 * kNumBarriers + 1024;  // + slack to align the base to 1024
  // What wgmma reads (8-bit slots, expanded B) keeps the 1024-byte alignment of the swizzle;
  // packed 4-bit slots, read by ordinary loads, need TMA's 128.
  static_assert(kABytes % 1024 == 0 && kExpandedBytes % 1024 == 0 && kOutBytes % 1024 == 0 &&
                    kBBytes % (W_BITS == 8 ? 1024 : 128) == 0 && kExpanded % 1024 == 0,
                "slots must keep the 1024-byte alignment of the swizzle");
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
  static_assert(W_BITS == 8 || (kStages >= 2 && kExpandedSlots >= 2), "slots are released one K-slice late");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using namespace sm90_ptx;

constexpr int kExpandWarps = 3;                             // warps 1-3
constexpr int kExpandRowsPerPass = kExpandWarps * 32 / 4;  // four threads per row
static_assert(kBN % kExpandRowsPerPass == 0, "whole expansion passes");
constexpr int kConsumerWarps = 8;                           // warps 4-11

constexpr int kEpilogueGroup = 3;  // column pairs whose scales are loaded before the group's stores

template <typename T>
__device__ __forceinline__ void store_two(T* out, int64_t at, float y0, float y1) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float2*>(out + at) = make_float2(y0, y1);
  } else if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(out + at) = __floats2half2_rn(y0, y1);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(out + at) = __floats2bfloat162_rn(y0, y1);
  }
}

// y = fp32(acc >> SHIFT) * sa[m] * sw[n] + bias[n] for the two m64 blocks of a consumer thread,
// stored as T. FULL: the whole tile lies inside the output and pairs of columns can be stored
// together, so no element needs a bounds check. The output type and FULL are compile-time so
// that each variant is short straight-line code: with the type switched per store, the
// epilogue was ~500 KB of machine code and ran out of the instruction cache, some 20 us per
// tile. Scales are loaded a group at a time, ahead of the group's stores (which may alias
// them as far as the compiler knows).
template <int SHIFT, typename T, bool FULL>
__device__ __forceinline__ void store_tile_as(int (&acc)[2][kBN / 2], const float* __restrict__ sa,
                                              const float* __restrict__ sw, const float* __restrict__ bias, T* out,
                                              int m, int n, int row0, int col0, bool pairs) {
  float s_row[2][2];
  bool row_ok[2][2];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 64 * mb + 8 * h;
      row_ok[mb][h] = FULL || row < m;
      s_row[mb][h] = row_ok[mb][h] ? __ldg(sa + row) : 0.0f;
    }
  }
#pragma unroll
  for (int j0 = 0; j0 < kBN / 8; j0 += kEpilogueGroup) {
    float w[kEpilogueGroup][2], b[kEpilogueGroup][2];
#pragma unroll
    for (int j = 0; j < kEpilogueGroup; ++j) {
      const int col = col0 + 8 * (j0 + j);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = FULL || col + e < n;
        w[j][e] = ok ? __ldg(sw + col + e) : 0.0f;
        b[j][e] = ok && bias != nullptr ? __ldg(bias + col + e) : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kEpilogueGroup; ++j) {
      const int col = col0 + 8 * (j0 + j);
      if (!FULL && col >= n) continue;
      const bool second = FULL || col + 1 < n;
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!row_ok[mb][h]) continue;
          const int i = 4 * (j0 + j) + 2 * h;
          float y0 = __fmul_rn(__fmul_rn(float(acc[mb][i] >> SHIFT), s_row[mb][h]), w[j][0]);
          float y1 = __fmul_rn(__fmul_rn(float(acc[mb][i + 1] >> SHIFT), s_row[mb][h]), w[j][1]);
          if (bias != nullptr) {
            y0 = __fadd_rn(y0, b[j][0]);
            y1 = __fadd_rn(y1, b[j][1]);
          }
          const int64_t at = int64_t(row0 + 64 * mb + 8 * h) * n + col;
          if (FULL || (pairs && second)) {
            store_two(out, at, y0, y1);
          } else {
            out[at] = from_float<T>(y0);
            if (second) out[at + 1] = from_float<T>(y1);
          }
        }
      }
    }
  }
}

template <int SHIFT, typename T>
__device__ __forceinline__ void store_tile_as(int (&acc)[2][kBN / 2], const float* __restrict__ sa,
                                              const float* __restrict__ sw, const float* __restrict__ bias, void* out,
                                              int m, int n, int row0, int col0, bool pairs, bool full) {
  T* typed = static_cast<T*>(out);
  if (full) {
    store_tile_as<SHIFT, T, true>(acc, sa, sw, bias, typed, m, n, row0, col0, pairs);
  } else {
    store_tile_as<SHIFT, T, false>(acc, sa, sw, bias, typed, m, n, row0, col0, pairs);
  }
}

template <int SHIFT>
__device__ __forceinline__ void store_tile(int (&acc)[2][kBN / 2], const float* __restrict__ sa,
                                           const float* __restrict__ sw, const float* __restrict__ bias, void* out,
                                           Float out_dtype, int m, int n, int row0, int col0, bool pairs, bool full) {
  switch (out_dtype) {
    case Float::f32: return store_tile_as<SHIFT, float>(acc, sa, sw, bias, out, m, n, row0, col0, pairs, full);
    case Float::f16: return store_tile_as<SHIFT, __half>(acc, sa, sw, bias, out, m, n, row0, col0, pairs, full);
    default: return store_tile_as<SHIFT, __nv_bfloat16>(acc, sa, sw, bias, out, m, n, row0, col0, pairs, full);
  }
}


template <typename T>
__device__ __forceinline__ uint32_t pack_two(float y0, float y1) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(y0, y1);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(y0, y1);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Starts the copy of a warpgroup's epilogue operands into `scales`: sw and bias of the tile's
// columns, sa of the warpgroup's rows; zeros past the matrix edges (and for a missing bias).
template <int SCALE_FLOATS>
__device__ __forceinline__ void fetch_scales(uint32_t scales, const float* sa, const float* sw, const float* bias,
                                             int m, int n, int row0, int col0) {
  for (int i = threadIdx.x & 127; i < SCALE_FLOATS; i += 128) {
    const float* src;
    bool valid;
    if (i < kBN) {
      valid = col0 + i < n;
      src = sw + col0 + i;
    } else if (i < 2 * kBN) {
      valid = bias != nullptr && col0 + i - kBN < n;
      src = bias + col0 + i - kBN;
    } else {
      valid = row0 + i - 2 * kBN < m;
      src = sa + row0 + i - 2 * kBN;
    }
    cp_async4(scales + 4 * i, valid ? src : sw, valid);
  }
  cp_async_commit();
}

// y = fp32(acc >> SHIFT) * sa[m] * sw[n] (+ bias[n]) of a consumer thread, written as T into its
// warpgroup's [128][kBN] stage at (local_row, local_col); the scales come from `scales`.
template <int SHIFT, typename T>
__device__ __forceinline__ void stage_tile_as(int (&acc)[2][kBN / 2], uint32_t scales, bool has_bias,
                                              uint32_t stage, int local_row, int local_col) {
  float s_row[2][2];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) s_row[mb][h] = lds32f(scales + 4 * (2 * kBN + local_row + 64 * mb + 8 * h));
  }
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const int col = local_col + 8 * j;
    const float2 w = lds64f(scales + 4 * col);
    const float2 b = lds64f(scales + 4 * (kBN + col));
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 4 * j + 2 * h;
        float y0 = __fmul_rn(__fmul_rn(float(acc[mb][i] >> SHIFT), s_row[mb][h]), w.x);
        float y1 = __fmul_rn(__fmul_rn(float(acc[mb][i + 1] >> SHIFT), s_row[mb][h]), w.y);
        if (has_bias) {  // not + 0.0f without a bias: that would turn -0 into +0
          y0 = __fadd_rn(y0, b.x);
          y1 = __fadd_rn(y1, b.y);
        }
        sts32(stage + (local_row + 64 * mb + 8 * h) * (kBN * 2) + col * 2, pack_two<T>(y0, y1));
      }
    }
  }
}

// The ring position of an expansion warp that takes every STRIDE-th K-slice of the CTA's walk
// (W4A8: slice s goes to warp s % 3), starting at `slot`. The warp skips the other warps' slices,
// and a parity wait cannot tell "this round done" from "the round before not done yet": with
// SLOTS a multiple of STRIDE, the previous round of every slot it waits on was its own, so it
// has seen that round done.
template <int SLOTS, int STRIDE>
struct StridedRing {
  static_assert(SLOTS % STRIDE == 0, "each slot's previous round is the same warp's");
  int slot;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    slot += STRIDE;
    if (slot >= SLOTS) {
      slot -= SLOTS;
      phase ^= 1;
    }
  }
};

// An expansion warp's end of a K-slice: its generic-proxy stores of the expanded B are made
// visible to wgmma (async proxy), then one lane frees the packed slot (after the stores that
// consumed its loads) and marks the expanded slot full; both rings move on.
template <typename PackedRing, typename ExpandedRing>
__device__ __forceinline__ void hand_over_expanded_slot(uint64_t* empty, uint64_t* expanded_full, PackedRing& ring,
                                                        ExpandedRing& xring, int lane) {
  fence_proxy_async();
  __syncwarp();
  if (lane == 0) {
    mbar_arrive(&empty[ring.slot]);
    mbar_arrive(&expanded_full[xring.slot]);
  }
  ring.advance();
  xring.advance();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// map_out (a 16-bit [m, n] tensor map, boxes of [128][kBN]) is used only when STAGED. GROUPED:
// 4-bit weights with multipliers group_scale [n, k / 64].
template <int A_BITS, int W_BITS, bool GROUPED, bool STAGED>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                const __grid_constant__ CUtensorMap map_out, const float* __restrict__ sa, const float* __restrict__ sw,
                const uint8_t* __restrict__ group_scale, const float* __restrict__ bias, void* __restrict__ out,
                Float out_dtype, int m, int n, int k, int tiles_m, int num_tiles, bool pairs) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<A_BITS, W_BITS, STAGED>;
  constexpr int BITS = W_BITS;  // whether B is expanded; A_BITS says how the consumers read A
  constexpr int S = L::kStages, E = L::kExpandedSlots;
  extern __shared__ uint8_t smem_raw[];
  // Derived from smem_raw by an offset (not through an integer), so the compiler keeps it in
  // the shared space; smem_base is the same place as a shared-window address for ld/st.shared.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t smem_base = smem_addr(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);  // slot loaded by TMA
  uint64_t* empty = full + S;                                         // slot free for TMA
  uint64_t* expanded_full = empty + S;                                // expanded B written
  uint64_t* expanded_empty = expanded_full + E;                       // expanded B read by wgmma

  const int num_k = (k + L::kBK - 1) / L::kBK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;

  // Expansion warps that write each K-slice: W4A4's three split every slice, W4A8's take whole
  // slices in turn (see its expansion loop).
  constexpr int kSliceExpanders = L::kW4A8 ? 1 : kExpandWarps;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], BITS == 4 ? kConsumerWarps + kSliceExpanders : kConsumerWarps);
    }
    for (int e = 0; e < E; ++e) {
      mbar_init(&expanded_full[e], kSliceExpanders);
      mbar_init(&expanded_empty[e], kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // W4A8 with group scales: the SS consumers need fewer registers than the RS ones, and the
  // expansion warps' multipliers spill at 56.
  constexpr bool kWideProducer = GROUPED && A_BITS == 8;
  if (warp < 4) {  // producer warpgroup
    if constexpr (kWideProducer) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 64;");
    } else {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    }
    if (warp == 0) {
      if (lane == 0) {
        Ring<S> ring;
        for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
          const int row_a = (tile % tiles_m) * kBM, row_b = (tile / tiles_m) * kBN;
          for (int kt = 0; kt < num_k; ++kt) {
            mbar_wait(&empty[ring.slot], ring.phase ^ 1);
            mbar_arrive_expect_tx(&full[ring.slot], L::kABytes + L::kBBytes);
            tma_load_2d(smem + L::kA + ring.slot * L::kABytes, &map_a, kt * L::kARowBytes, row_a, &full[ring.slot]);
            tma_load_2d(smem + L::kB + ring.slot * L::kBBytes, &map_b, kt * L::kBRowBytes, row_b, &full[ring.slot]);
            ring.advance();
          }
        }
      }
    } else if constexpr (BITS == 4 && A_BITS == 4) {
      // Four threads per row, one 16-byte quarter of its packed bytes each (codes 32 quarter ..
      // 32 quarter + 31 of the slice, all of one multiplier's group).
      const int et = threadIdx.x - 32, quarter = et & 3;
      const int groups = k / kWeightGroup;
      Ring<S> ring;
      Ring<E> xring;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const int tile_col = (tile / tiles_m) * kBN;
        for (int kt = 0; kt < num_k; ++kt) {
          mbar_wait(&full[ring.slot], ring.phase);
          mbar_wait(&expanded_empty[xring.slot], xring.phase ^ 1);
          const uint32_t packed = smem_base + L::kB + ring.slot * L::kBBytes + 16 * quarter;
          // Permuted order: word c of a quarter at 4 quarter in chunks 2c, 2c + 1.
          const uint32_t expanded = smem_base + L::kExpanded + xring.slot * L::kExpandedBytes + 4 * quarter;
          // This quarter's multipliers of the tile's rows (GROUPED; rows past n read none).
          const uint8_t* tile_group_scale = group_scale + int64_t(tile_col) * groups + 2 * kt + quarter / 2;
          const bool group_in = 2 * kt + quarter / 2 < groups;
          // All six passes' loads before any store. The expansion warps bound the main loop (ncu:
          // consumers spent half their main-loop samples waiting for an expanded slot), and with
          // 56 registers instead of 40 (consumers 224 instead of 232, no spills) they can keep
          // all loads in flight: 4608 x 3072 x 3072 74.2 -> 69.3 us, x 12288 271.6 -> 254.2 us.
          // Group-scaled weights batch two passes: with six (or three), their multipliers and
          // addresses spill from the expansion warps' 56 registers (ptxas -v).
          constexpr int kPasses = kBN / kExpandRowsPerPass, kBatch = GROUPED ? 2 : 6;
          static_assert(kPasses % kBatch == 0, "whole batches");
#pragma unroll
          for (int first = 0; first < kPasses; first += kBatch) {
            uint4 v[kBatch];
            uint32_t multiplier[kBatch];
#pragma unroll
            for (int i = 0; i < kBatch; ++i) {
              const int row = (et >> 2) + (first + i) * kExpandRowsPerPass;
              v[i] = lds128(packed + row * 64);
              if constexpr (GROUPED) {
                const bool ok = group_in && tile_col + row < n;
                multiplier[i] = ok ? uint32_t(__ldg(tile_group_scale + row * groups)) : 1u;
              }
            }
#pragma unroll
            for (int i = 0; i < kBatch; ++i) {
              const int row = (et >> 2) + (first + i) * kExpandRowsPerPass;
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const uint32_t w = word(v[i], c);
                const uint32_t even = GROUPED ? low_nibbles_scaled(w, multiplier[i]) : low_nibbles_x16(w);
                const uint32_t odd = GROUPED ? high_nibbles_scaled(w, multiplier[i]) : high_nibbles_x16(w);
                sts32(expanded + swizzle128(row, 2 * c), even);
                sts32(expanded + swizzle128(row, 2 * c + 1), odd);
              }
            }
          }
          hand_over_expanded_slot(empty, expanded_full, ring, xring, lane);
        }
      }
    } else if constexpr (BITS == 4) {
      // W4A8: 64-code slices, B expanded in natural K order (A comes from TMA unpermuted). Each
      // expansion warp expands whole slices, slice s of the CTA's walk by warp s % 3: the end of a
      // slice (proxy fence, warp sync, two arrivals) is paid once per slice instead of once in
      // each of three warps, and a warp has three slices of main-loop time for its own, where
      // with every warp on every slice each slice's fixed cost came back every 64 codes. Two
      // lanes per row, one 16-byte half of its 32 packed bytes each: 32 codes, which expand to
      // two whole 16-byte chunks of the row, stored with one 16-byte store each. A quarter warp
      // then covers 4 rows x 2 chunks, eight distinct 16-byte bank groups in the 64-byte swizzle
      // (4-byte stores of 8 rows x 4 quarters hit each bank 4 times).
      constexpr int kRowsPerPass = 32 / 2, kPasses = kBN / kRowsPerPass;
      // Passes whose packed rows are loaded together; the next batch's loads are issued before
      // this batch's stores, and the first batch's before the wait for the expanded slot.
      constexpr int kBatch = 3, kBatches = kPasses / kBatch;
      static_assert(kPasses % kBatch == 0 && L::kBRowBytes == 32, "two 16-byte halves per row, whole batches");
      const int first_slice = warp - 1, row0 = lane >> 1, half = lane & 1;
      const int groups = k / kWeightGroup;  // GROUPED: one group per 64-code slice, num_k == groups
      const int my_tiles = blockIdx.x < num_tiles ? (num_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
      const int slices = my_tiles * num_k;
      // GROUPED: the tile and K-slice of the warp's next slice, whose multipliers (global memory,
      // L1- or L2-resident) are loaded right after the proxy fence that ends the slice before
      // (the fence waits for loads in flight), so they have the warp's wait for its next slice,
      // some two slices of main loop, to arrive.
      int next_tile = blockIdx.x, next_kt = first_slice;
      const auto step_slice = [&](int slices_ahead) {
        if constexpr (GROUPED) {
          next_kt += slices_ahead;
          while (next_kt >= num_k) {
            next_kt -= num_k;
            next_tile += gridDim.x;
          }
        }
      };
      uint32_t multiplier[kPasses] = {};
      const auto load_multipliers = [&]() {
        if constexpr (GROUPED) {
          const int tile_col = (next_tile / tiles_m) * kBN;
#pragma unroll
          for (int i = 0; i < kPasses; ++i) {
            const int col = tile_col + row0 + i * kRowsPerPass;
            const bool ok = next_tile < num_tiles && col < n;
            multiplier[i] = ok ? uint32_t(__ldg(group_scale + int64_t(col) * groups + next_kt)) : 1u;
          }
        }
      };
      step_slice(0);
      load_multipliers();
      StridedRing<S, kExpandWarps> ring{first_slice};
      StridedRing<E, kExpandWarps> xring{first_slice};
      for (int slice = first_slice; slice < slices; slice += kExpandWarps) {
        mbar_wait(&full[ring.slot], ring.phase);
        const uint32_t packed = smem_base + L::kB + ring.slot * L::kBBytes + row0 * L::kBRowBytes + 16 * half;
        const uint32_t expanded = smem_base + L::kExpanded + xring.slot * L::kExpandedBytes;
        uint4 v[2][kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) v[0][i] = lds128(packed + i * kRowsPerPass * L::kBRowBytes);
        mbar_wait(&expanded_empty[xring.slot], xring.phase ^ 1);
#pragma unroll
        for (int b = 0; b < kBatches; ++b) {
          if (b + 1 < kBatches) {
#pragma unroll
            for (int i = 0; i < kBatch; ++i) {
              v[(b + 1) & 1][i] = lds128(packed + ((b + 1) * kBatch + i) * kRowsPerPass * L::kBRowBytes);
            }
          }
#pragma unroll
          for (int i = 0; i < kBatch; ++i) {
            const int pass = b * kBatch + i, row = row0 + pass * kRowsPerPass;
            uint32_t codes[8];  // the expanded row bytes 32 half .. 32 half + 31
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint32_t w = word(v[b & 1][i], c);
              const uint32_t even = GROUPED ? low_nibbles_scaled(w, multiplier[pass]) : low_nibbles_x16(w);
              const uint32_t odd = GROUPED ? high_nibbles_scaled(w, multiplier[pass]) : high_nibbles_x16(w);
              codes[2 * c] = first_four(even, odd);
              codes[2 * c + 1] = last_four(even, odd);
            }
            sts128(expanded + swizzle64(row, 2 * half), codes[0], codes[1], codes[2], codes[3]);
            sts128(expanded + swizzle64(row, 2 * half + 1), codes[4], codes[5], codes[6], codes[7]);
          }
        }
        hand_over_expanded_slot(empty, expanded_full, ring, xring, lane);
        step_slice(kExpandWarps);
        load_multipliers();
      }
    }
    return;
  }

  // consumer warpgroups
  if constexpr (kWideProducer) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 216;");
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
  }
  const int cw = warp - 4;
  const int wg = cw >> 2;
  const int wrow = wg * 128 + (cw & 3) * 16 + (lane >> 2);  // this thread's first row in the tile
  const int quarter = lane & 3;
  int acc[2][kBN / 2];
  Ring<S> ring;
  Ring<E> xring;
  const uint32_t scales = smem_base + L::kScales + wg * (L::kScaleFloats * 4);
  const uint32_t stage = smem_base + L::kOut + wg * (L::kOutBytes / 2);
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int tile_row = (tile % tiles_m) * kBM, tile_col = (tile / tiles_m) * kBN;
    if constexpr (STAGED) fetch_scales<L::kScaleFloats>(scales, sa, sw, bias, m, n, tile_row + 128 * wg, tile_col);
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) acc[mb][i] = 0;
    }
    if constexpr (A_BITS == 4) {
      // A packed slot is released one K-slice late, once wgmma instructions that consumed the
      // registers loaded from it have issued: an arrive right after the loads can overtake
      // them, and TMA then overwrites rows not yet read.
      int previous = 0, previous_expanded = 0;  // slots of the previous K-slice
      for (int kt = 0; kt < num_k; ++kt) {
        mbar_wait(&full[ring.slot], ring.phase);
        const uint32_t packed = smem_base + L::kA + ring.slot * L::kABytes + wrow * 64 + 16 * quarter;
        uint4 rows[2][2];  // [m64 block][row g, row g + 8]
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
          for (int h = 0; h < 2; ++h) rows[mb][h] = lds128(packed + (64 * mb + 8 * h) * 64);
        }
        mbar_wait(&expanded_full[xring.slot], xring.phase);
        const uint8_t* expanded = smem + L::kExpanded + xring.slot * L::kExpandedBytes;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // The group before last is done: its A registers (this half's) may be rewritten.
          wgmma_wait<1>();
          if (kt > 0 && lane == 0) {
            if (half == 0) mbar_arrive(&empty[previous]);
            else mbar_arrive(&expanded_empty[previous_expanded]);
          }
          uint32_t a[2][2][4];  // [m64 block][k-step of this half][fragment register]
#pragma unroll
          for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int step = 2 * half + c;
              a[mb][c][0] = low_nibbles_x16(word(rows[mb][0], step));
              a[mb][c][1] = low_nibbles_x16(word(rows[mb][1], step));
              a[mb][c][2] = high_nibbles_x16(word(rows[mb][0], step));
              a[mb][c][3] = high_nibbles_x16(word(rows[mb][1], step));
            }
          }
          // All of this half's A registers are written before the fence: an A register written
          // between two wgmma makes ptxas insert another fence before each of them.
#pragma unroll
          for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
#pragma unroll
              for (int r = 0; r < 4; ++r) pin_register(a[mb][c][r]);
            }
          }
          wgmma_fence();
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int mb = 0; mb < 2; ++mb) {
              wgmma_rs_n144(acc[mb], a[mb][c], smem_desc_k128(expanded + 32 * (2 * half + c)));
            }
          }
          wgmma_commit();
        }
        previous = ring.slot;
        previous_expanded = xring.slot;
        ring.advance();
        xring.advance();
      }
      wgmma_wait<0>();
      if (lane == 0) {
        mbar_arrive(&empty[previous]);
        mbar_arrive(&expanded_empty[previous_expanded]);
      }
    } else {
      // 8-bit A from its slot; B from its slot (8-bit weights) or from the expanded ring (W4A8).
      int previous = 0, previous_expanded = 0;  // slots of the previous K-slice
      for (int kt = 0; kt < num_k; ++kt) {
        mbar_wait(&full[ring.slot], ring.phase);
        const uint8_t* tile_a = smem + L::kA + ring.slot * L::kABytes + wg * 128 * L::kARowBytes;
        const uint8_t* tile_b = smem + L::kB + ring.slot * L::kBBytes;
        if constexpr (W_BITS == 4) {
          mbar_wait(&expanded_full[xring.slot], xring.phase);
          tile_b = smem + L::kExpanded + xring.slot * L::kExpandedBytes;
        }
        wgmma_fence();
#pragma unroll
        for (int c = 0; c < L::kBK / 32; ++c) {
#pragma unroll
          for (int mb = 0; mb < 2; ++mb) {
            wgmma_ss_n144(acc[mb], smem_desc_k<L::kBK>(tile_a + mb * 64 * L::kARowBytes + 32 * c),
                          smem_desc_k<L::kBK>(tile_b + 32 * c));
          }
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous slice's wgmma are done: its slots can be refilled
        if (kt > 0 && lane == 0) {
          mbar_arrive(&empty[previous]);
          if constexpr (W_BITS == 4) mbar_arrive(&expanded_empty[previous_expanded]);
        }
        previous = ring.slot;
        ring.advance();
        if constexpr (W_BITS == 4) {
          previous_expanded = xring.slot;
          xring.advance();
        }
      }
      wgmma_wait<0>();
      if (lane == 0) {
        mbar_arrive(&empty[previous]);
        if constexpr (W_BITS == 4) mbar_arrive(&expanded_empty[previous_expanded]);
      }
    }
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) pin_register(acc[mb][i]);
    }
    constexpr int kShift = (A_BITS == 4 ? 4 : 0) + (W_BITS == 4 && !GROUPED ? 4 : 0);
    if constexpr (STAGED) {
      // The stage is free once this warpgroup's previous TMA store has read it; the
      // barriers order each thread's stage writes and scale reads against the others'.
      const bool leader = (threadIdx.x & 127) == 0;
      if (leader) bulk_wait_read();
      cp_async_wait_all();
      named_barrier_sync(1 + wg, 128);
      const int local_row = wrow - 128 * wg;
      if (out_dtype == Float::f16) {
        stage_tile_as<kShift, __half>(acc, scales, bias != nullptr, stage, local_row, 2 * quarter);
      } else {
        stage_tile_as<kShift, __nv_bfloat16>(acc, scales, bias != nullptr, stage, local_row, 2 * quarter);
      }
      fence_proxy_async();
      named_barrier_sync(1 + wg, 128);
      if (leader && tile_row + 128 * wg < m) {
        tma_store_2d(&map_out, tile_col, tile_row + 128 * wg, stage);
        bulk_commit();
      }
    } else {
      const bool full = pairs && tile_row + kBM <= m && tile_col + kBN <= n;
      store_tile<kShift>(acc, sa, sw, bias, out, out_dtype, m, n, tile_row + wrow, tile_col + 2 * quarter, pairs,
                         full);
    }
  }
  if (STAGED && (threadIdx.x & 127) == 0) bulk_wait();
#endif
}

// ---- host side ----

template <int A_BITS, int W_BITS, bool GROUPED, bool STAGED>
void launch(const void* qa, const float* sa, const void* qw, const float* sw, const uint8_t* group_scale,
            const float* bias, void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  using L = Layout<A_BITS, W_BITS, STAGED>;
  // 4-bit slots are read row by row by ordinary loads (no swizzle needed: a warp's 16-byte
  // loads cover 512 contiguous bytes); 8-bit slots go to wgmma, in the swizzle of their rows.
  const auto swizzle = [](int bits) {
    if (bits == 4) return CU_TENSOR_MAP_SWIZZLE_NONE;
    return L::kBK == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  };
  const CUtensorMap map_a = tensor_map(qa, 1, m, k * A_BITS / 8, kBM, L::kARowBytes, swizzle(A_BITS));
  const CUtensorMap map_b = tensor_map(qw, 1, n, k * W_BITS / 8, kBN, L::kBRowBytes, swizzle(W_BITS));
  const CUtensorMap map_out = STAGED ? tensor_map(out, 2, m, n, kBM / 2, kBN, CU_TENSOR_MAP_SWIZZLE_NONE) : map_a;
  const int tiles_m = int(ceil_div<int64_t>(m, kBM));
  const int num_tiles = tiles_m * int(ceil_div<int64_t>(n, kBN));
  const int sms = current_device().multiprocessors;
  const int grid = num_tiles < sms ? num_tiles : sms;
  const bool pairs = n % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & 7) == 0;
  auto kernel = gemm_kernel<A_BITS, W_BITS, GROUPED, STAGED>;
  allow_dynamic_smem(kernel, L::kSmem);
  kernel<<<grid, kThreads, L::kSmem, stream>>>(map_a, map_b, map_out, sa, sw, group_scale, bias, out, out_dtype,
                                               int(m), int(n), int(k), tiles_m, num_tiles, pairs);
  check_launch("sm90 persistent gemm");
}

template <int A_BITS, int W_BITS, bool GROUPED>
void launch_scheme(bool staged, const void* qa, const float* sa, const void* qw, const float* sw,
                   const uint8_t* group_scale, const float* bias, void* out, Float out_dtype, int64_t m, int64_t n,
                   int64_t k, cudaStream_t stream) {
  if (staged) return launch<A_BITS, W_BITS, GROUPED, true>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k, stream);
  launch<A_BITS, W_BITS, GROUPED, false>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k, stream);
}

// The TMA store needs 16-bit elements, rows a multiple of 16 bytes and a 16-byte aligned base.
bool staged_output(Float out_dtype, int64_t n, const void* out) {
  return out_dtype != Float::f32 && n % 8 == 0 && aligned16(out);
}

}  // namespace

bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw) {
  const int bits = codes.weight_bits;
  const int64_t row_bytes = k * bits / 8;
  const int64_t tiles = ceil_div<int64_t>(m, kBM) * ceil_div<int64_t>(n, kBN);
  return row_bytes > 0 && row_bytes % 16 == 0 && aligned16(qa) && aligned16(qw) && tiles < (int64_t(1) << 31) &&
         m < (int64_t(1) << 31) && n < (int64_t(1) << 31) && (bits == 8 || k < (int64_t(1) << 17)) &&
         (!codes.grouped() || k % kWeightGroup == 0);
}

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream) {
  const bool staged = staged_output(out_dtype, n, out);
  const uint8_t* gs = codes.group_scale;
  if (codes.weight_bits == 8) return launch_scheme<8, 8, false>(staged, qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  if (codes.act_bits == 8) {
    if (codes.grouped()) return launch_scheme<8, 4, true>(staged, qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
    return launch_scheme<8, 4, false>(staged, qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  }
  if (codes.grouped()) return launch_scheme<4, 4, true>(staged, qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  launch_scheme<4, 4, false>(staged, qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace convrot::cuda::sm90_persistent
