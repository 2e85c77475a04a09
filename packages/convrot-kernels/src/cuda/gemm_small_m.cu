// The weight-streaming GEMM for M <= 64. With few activation rows the GEMM is
// a pass over the packed weights (N x K/2 bytes, 4x fewer than bf16), so the
// kernel is built to keep HBM busy rather than the tensor cores:
//   - each block owns 16 weight rows; its 8 warps split K between them in slices
//     of 64 packed bytes per row (four threads x 16 bytes), warp w taking slices
//     w, w + 8, ...;
//   - every thread streams its own 16-byte pieces through a ring of kStages slices
//     in shared memory, filled by cp.async (L2 only for weights; with M <= 16 the
//     activations' pieces ride along through L1): only the thread that copied a
//     piece reads it, so the ring needs no barrier, and the loads in flight hold
//     no registers. (Loading into registers instead, as an earlier version did,
//     left HBM idle between each warp's rounds of loads: 1 x 12288 x 3072 took
//     10.6 us against 7.3 on the H200, docs/benchmarks.md of 8b40706.) With more activation
//     rows they come from __ldg, L1/L2-resident;
//   - weights and activations go from the ring into mma.sync m16n8k32 fragments;
//   - the warps' int32 partial sums meet in shared memory, and the fp32
//     epilogue y = fp32(acc) * sa[m] * sw[n] + bias[n] writes the output (at M <= 16
//     its scales and bias are loaded at the start, so that their latency hides under
//     the loop).
// 4-bit codes use the nibble expansion and K permutation of the Hopper GEMM
// (gemm_sm90_persistent.cu): thread quad position t loads packed bytes
// 16t..16t+15 of a slice row; word c feeds k-step c, low nibbles at positions
// 4t..4t+3 and high nibbles at 16+4t..16+4t+3, each as 16 * code, so the sums
// are 256x the true ones until the epilogue's exact shift. 8-bit codes: words
// 2c and 2c+1 of the 16 bytes feed k-step c at positions 4t.. and 16+4t...
// W4A8 (docs/format.md): a thread's 16 weight bytes hold codes 32t..32t+31 of the slice, so it
// takes the 32 activation bytes of those codes (two pieces a row) and splits words 2c, 2c+1
// into their even and odd bytes, the K order of the nibbles (the sums are 16x the true ones).
// Group-scaled weights decode to the true code x multiplier (int4_decode.cuh). The block's
// multipliers ([16 rows][groups], contiguous in group_scale) are copied into shared memory at its
// start, with its first slice. (Read from global memory per slice, each slice waited on its
// multiplier loads, from HBM when L2 is cold: group-scaled W4A8 took 1.3-1.6x W4A8's time on
// the H100, 694e7d0.)
#include "common.cuh"
#include "gemm_small_m.h"
#include "int4_decode.cuh"

namespace convrot::cuda::small_m {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kSliceBytes = 64;  // bytes of a row per warp and slice: four threads x 16 bytes
constexpr int kNB = 2;           // 8-row blocks of weights per block: 16 rows
// Slices each thread has in flight: 4. Against 6 on the H200, 4 was faster at 11 of 12 shapes
// and within 0.5% at the last (docs/benchmarks.md of 8b40706). W4A8 at M <= 16 carries 2 weight
// and 4 activation pieces a slice: 4 slices (96 KB) and the partial sums (8 KB) fit two blocks on
// an SM, against W4A4's three. Where the layer has more blocks than two per SM can hold at once,
// the COMPACT variant runs instead: 3 slices, and the partial sums in the ring once every warp
// has read its last slice, three blocks per SM.
constexpr int stages(bool compact) { return compact ? 3 : 4; }
// The most bytes of multipliers a block stages: 16 rows of k / 64 < 2^17 / 64 groups.
constexpr size_t kMaxMultiplierBytes = size_t(16) * ((int64_t(1) << 17) / 64);
// With one 16-row block of activations, their two 16-byte pieces a slice ride in the ring too
// (through L1, which every block of the SM reads them from); with more, they are __ldg'd.
constexpr bool activations_in_ring(int mb) { return mb == 1; }
// 16-byte pieces of an activation row per thread and slice: two for W4A8, one otherwise.
constexpr int activation_pieces(int a_bits, int w_bits) { return a_bits > w_bits ? 2 : 1; }
// 16-byte pieces a slice in the ring.
constexpr int ring_pieces(int mb, int ap) { return kNB + (activations_in_ring(mb) ? 2 * ap : 0); }

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

// Copy 16 bytes from global to shared memory (cp.async, sm_80+), bypassing L1 or through it;
// with `valid` false they write 16 zero bytes and read nothing.
__device__ __forceinline__ void copy_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async16_l1(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory"); }
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// A_BITS, W_BITS: the activations' and weights' widths; GROUPED: 4-bit weights with multipliers
// (group_scale [n, groups]); MB: 16-row blocks of activations (1, 2 or 4); COMPACT: see stages().
// row_bytes is a weight row's; an activation row has kAP times as many.
template <int A_BITS, int W_BITS, bool GROUPED, int MB, bool COMPACT>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const uint8_t* __restrict__ qa, const float* __restrict__ sa, const uint8_t* __restrict__ qw,
                const float* __restrict__ sw, const uint8_t* __restrict__ group_scale, int groups,
                const float* __restrict__ bias, void* __restrict__ out, Float out_dtype, int m, int n, int row_bytes) {
  constexpr bool kActivationsInRing = activations_in_ring(MB);
  constexpr int kAP = activation_pieces(A_BITS, W_BITS);
  constexpr int kPieces = ring_pieces(MB, kAP);
  constexpr int kStages = stages(COMPACT);
  // The epilogue's shift: 16 * code from each nibble operand expanded that way.
  constexpr int kShift = (A_BITS == 4 ? 4 : 0) + (W_BITS == 4 && !GROUPED ? 4 : 0);
  extern __shared__ uint4 ring[];  // [kStages][kPieces][kThreads], then (GROUPED) the multipliers
  int (*partial)[kWarps][32];      // [MB * kNB * 4][kWarps][32]
  if constexpr (COMPACT) {
    static_assert(kStages * kPieces * kThreads * 16 >= MB * kNB * 4 * kWarps * 32 * 4, "partial sums fit the ring");
    partial = reinterpret_cast<int(*)[kWarps][32]>(ring);
  } else {
    __shared__ int partial_sums[MB * kNB * 4][kWarps][32];
    partial = partial_sums;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int g = lane >> 2, quarter = lane & 3;
  const int n0 = blockIdx.x * 8 * kNB;
  const int num_slices = (row_bytes + kSliceBytes - 1) / kSliceBytes;
  const int slices = num_slices > warp ? (num_slices - warp + kWarps - 1) / kWarps : 0;  // warp, warp + 8, ...

  // Entry e of lane l of the partial sums: accumulator r = e % 4 of n8 block (e / 4) % kNB and
  // m16 block e / (4 kNB), i.e. token 16 * mb + l / 4 (+ 8 for r >= 2) and weight row
  // 8 * nb + 2 * (l % 4) + r % 2. Thread t turns entries t, t + kThreads, ... into outputs.
  constexpr int kEntries = MB * kNB * 4 * 32, kMine = (kEntries + kThreads - 1) / kThreads;
  const auto entry = [&](int i, int& token, int& row) {  // token = m: nothing to write
    const int idx = threadIdx.x + i * kThreads, e = idx / 32, l = idx % 32;
    const int r = e % 4, nb = (e / 4) % kNB, mb = e / (4 * kNB);
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

  const uint8_t* w_row[kNB];
  bool w_ok[kNB];
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
    const int row = n0 + 8 * nb + g;
    w_ok[nb] = row < n;
    w_row[nb] = qw + int64_t(w_ok[nb] ? row : 0) * row_bytes + 16 * quarter;
  }
  // GROUPED: the multipliers of the block's rows, copied by 16-byte cp.async where group_scale
  // is 16-byte aligned (the block's first byte lies n0 x groups in, a multiple of 16), riding in
  // the first slice's commit group; the bytes left over (all, unaligned) by plain loads.
  uint8_t* multipliers = reinterpret_cast<uint8_t*>(ring + kStages * kPieces * kThreads);
  if constexpr (GROUPED) {
    const int bytes = min(8 * kNB, n - n0) * groups;
    const uint8_t* src = group_scale + int64_t(n0) * groups;
    const int vectors = (reinterpret_cast<uintptr_t>(group_scale) & 15) == 0 ? bytes / 16 : 0;
    const uint32_t dst = uint32_t(__cvta_generic_to_shared(multipliers));
    for (int i = threadIdx.x; i < vectors; i += kThreads) copy_async16(dst + 16 * i, src + 16 * i, true);
    for (int i = 16 * vectors + threadIdx.x; i < bytes; i += kThreads) multipliers[i] = src[i];
  }
  const uint8_t* a_row[MB][2];
  bool a_ok[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int token = 16 * mb + 8 * h + g;
      a_ok[mb][h] = token < m;
      a_row[mb][h] = qa + int64_t(a_ok[mb][h] ? token : 0) * row_bytes * kAP + 16 * kAP * quarter;
    }
  }

  const uint32_t slot_base = uint32_t(__cvta_generic_to_shared(ring)) + 16 * threadIdx.x;
  const auto slot = [&](int j, int piece) { return slot_base + uint32_t(((j % kStages) * kPieces + piece) * kThreads * 16); };
  // Slice j of this warp into its slot, as one commit group (empty past the last slice, so
  // that group j is always the j-th).
  const auto issue = [&](int j) {
    if (j < slices) {
      const int offset = (warp + j * kWarps) * kSliceBytes;
      const bool in = offset + 16 * quarter < row_bytes;
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) copy_async16(slot(j, nb), w_row[nb] + (in ? offset : 0), in && w_ok[nb]);
      if constexpr (kActivationsInRing) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int p = 0; p < kAP; ++p) {
            copy_async16_l1(slot(j, kNB + kAP * h + p), a_row[0][h] + (in ? kAP * offset + 16 * p : 0), in && a_ok[0][h]);
          }
        }
      }
    }
    copy_async_commit();
  };
#pragma unroll
  for (int j = 0; j < kStages; ++j) issue(j);
  if constexpr (kEarly) load_operands();
  if constexpr (GROUPED) {  // every thread's multiplier copies have landed
    copy_async_wait<kStages - 1>();
    __syncthreads();
  }

  int acc[MB][kNB][4] = {};
  for (int j = 0; j < slices; ++j) {
    const int offset = (warp + j * kWarps) * kSliceBytes;
    const bool in = offset + 16 * quarter < row_bytes;
    uint4 x[MB][2][kAP];
    if constexpr (!kActivationsInRing) {
      const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int p = 0; p < kAP; ++p) {
            x[mb][h][p] = in && a_ok[mb][h]
                              ? __ldg(reinterpret_cast<const uint4*>(a_row[mb][h] + kAP * offset + 16 * p))
                              : zero;
          }
        }
      }
    }
    uint32_t multiplier[kNB];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      multiplier[nb] = GROUPED && in && w_ok[nb] ? uint32_t(multipliers[(8 * nb + g) * groups + offset / 32 + quarter / 2])
                                                 : 1u;
    }
    copy_async_wait<kStages - 1>();  // this thread's group j has landed
    if constexpr (kActivationsInRing) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int p = 0; p < kAP; ++p) x[0][h][p] = lds128(slot(j, kNB + kAP * h + p));
      }
    }
    uint4 w[kNB];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) w[nb] = lds128(slot(j, nb));
#pragma unroll
    for (int step = 0; step < (W_BITS == 4 ? 4 : 2); ++step) {
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        uint32_t b0 = 0, b1 = 0;
        if constexpr (W_BITS == 4) {
          b0 = GROUPED ? low_nibbles_scaled(word(w[nb], step), multiplier[nb]) : low_nibbles_x16(word(w[nb], step));
          b1 = GROUPED ? high_nibbles_scaled(word(w[nb], step), multiplier[nb]) : high_nibbles_x16(word(w[nb], step));
        }
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          if constexpr (W_BITS == 4 && A_BITS == 4) {
            const uint4 &lo = x[mb][0][0], &hi = x[mb][1][0];
            mma_s8(acc[mb][nb], low_nibbles_x16(word(lo, step)), low_nibbles_x16(word(hi, step)),
                   high_nibbles_x16(word(lo, step)), high_nibbles_x16(word(hi, step)), b0, b1);
          } else if constexpr (W_BITS == 4) {
            // Codes 32t + 8 step .. + 7 of rows g and g + 8: words 2 (step % 2), + 1 of piece step / 2.
            const uint4 &lo = x[mb][0][step / 2], &hi = x[mb][1][step / 2];
            const int w0 = 2 * (step % 2);
            mma_s8(acc[mb][nb], even_bytes(word(lo, w0), word(lo, w0 + 1)), even_bytes(word(hi, w0), word(hi, w0 + 1)),
                   odd_bytes(word(lo, w0), word(lo, w0 + 1)), odd_bytes(word(hi, w0), word(hi, w0 + 1)), b0, b1);
          } else {
            const uint4 &lo = x[mb][0][0], &hi = x[mb][1][0];
            mma_s8(acc[mb][nb], word(lo, 2 * step), word(hi, 2 * step), word(lo, 2 * step + 1),
                   word(hi, 2 * step + 1), word(w[nb], 2 * step), word(w[nb], 2 * step + 1));
          }
        }
      }
    }
    issue(j + kStages);  // into the slot just read: its words are already in registers
  }
  if constexpr (COMPACT) __syncthreads();  // every warp is done with the ring the partial sums overwrite

#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[(mb * kNB + nb) * 4 + r][warp][lane] = acc[mb][nb][r];
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
      float y = __fmul_rn(__fmul_rn(float(sum >> kShift), out_sa[i]), out_sw[i]);
      if (bias != nullptr) y = __fadd_rn(y, out_bias[i]);
      store_as(out, out_dtype, int64_t(token) * n + row, y);
    }
  }
}

// The kernel and its dynamic shared memory for this call.
template <int A_BITS, int W_BITS, bool GROUPED, int MB, bool COMPACT>
auto configured(int64_t k, size_t& smem) {
  auto kernel = gemm_kernel<A_BITS, W_BITS, GROUPED, MB, COMPACT>;
  constexpr size_t kRingBytes =
      size_t(stages(COMPACT)) * ring_pieces(MB, activation_pieces(A_BITS, W_BITS)) * kThreads * 16;
  constexpr size_t kPartialBytes = COMPACT ? 0 : size_t(MB) * kNB * 4 * kWarps * 32 * 4;  // static shared memory
  // The limit is the largest any K needs: the attribute is cached per kernel and size, so a
  // per-call size could leave a smaller limit set than a later call with a seen size needs.
  allow_dynamic_smem(kernel, kRingBytes + kPartialBytes + (GROUPED ? kMaxMultiplierBytes : 0));
  smem = kRingBytes + (GROUPED ? size_t(ceil_div<int64_t>(8 * kNB * (k / kWeightGroup), 16)) * 16 : 0);
  return kernel;
}

template <int A_BITS, int W_BITS, bool GROUPED, int MB>
void launch(const void* qa, const float* sa, const void* qw, const float* sw, const uint8_t* group_scale,
            const float* bias, void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(n, 8 * kNB);
  size_t smem = 0;
  auto kernel = configured<A_BITS, W_BITS, GROUPED, MB, false>(k, smem);
  if constexpr (A_BITS == 8 && W_BITS == 4 && MB == 1) {
    const int resident = resident_blocks_per_multiprocessor(kernel, kThreads, smem);
    if (blocks > int64_t(resident) * current_device().multiprocessors) {
      kernel = configured<A_BITS, W_BITS, GROUPED, MB, true>(k, smem);
    }
  }
  kernel<<<unsigned(blocks), kThreads, smem, stream>>>(
      static_cast<const uint8_t*>(qa), sa, static_cast<const uint8_t*>(qw), sw, group_scale, int(k / kWeightGroup),
      bias, out, out_dtype, int(m), int(n), int(k * W_BITS / 8));
  check_launch("small-M gemm");
}

template <int A_BITS, int W_BITS, bool GROUPED>
void launch_scheme(const void* qa, const float* sa, const void* qw, const float* sw, const uint8_t* group_scale,
                   const float* bias, void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (m <= 16) return launch<A_BITS, W_BITS, GROUPED, 1>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k, stream);
  if (m <= 32) return launch<A_BITS, W_BITS, GROUPED, 2>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k, stream);
  launch<A_BITS, W_BITS, GROUPED, 4>(qa, sa, qw, sw, group_scale, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace

bool supports(int64_t m, int64_t n, int64_t k, const GemmCodes& codes, const void* qa, const void* qw) {
  const int bits = codes.weight_bits;
  const int64_t row_bytes = k * bits / 8;
  return m >= 1 && m <= kMaxM && row_bytes > 0 && row_bytes % 16 == 0 && row_bytes < (int64_t(1) << 29) &&
         aligned16(qa) && aligned16(qw) && n < (int64_t(1) << 31) && (bits == 8 || k < (int64_t(1) << 17)) &&
         (!codes.grouped() || k % kWeightGroup == 0);
}

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
          Float out_dtype, int64_t m, int64_t n, int64_t k, const GemmCodes& codes, cudaStream_t stream) {
  const uint8_t* gs = codes.group_scale;
  if (codes.weight_bits == 8) return launch_scheme<8, 8, false>(qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  if (codes.act_bits == 8) {
    if (codes.grouped()) return launch_scheme<8, 4, true>(qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
    return launch_scheme<8, 4, false>(qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  }
  if (codes.grouped()) return launch_scheme<4, 4, true>(qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
  launch_scheme<4, 4, false>(qa, sa, qw, sw, gs, bias, out, out_dtype, m, n, k, stream);
}

}  // namespace convrot::cuda::small_m
