// cuda::attention_8bit_prepass and cuda::attention_8bit (docs/format.md, attention_8bit).
//
// The pre-pass writes the CPU backend's bytes: the same butterflies (common.cuh's h4, stages 16, 4, 1
// of each group of 64, then the exact 2^-3 scaling), IEEE divisions (__fdiv_rn) and round-half-even
// (rintf), and the fp32 -> e4m3 rounding of fp8_e4m3.h (on sm_89 and later the cvt instruction that
// does it, e4m3x4). It is memory-bound work (it reads q, k, v, reads v a second time and writes the
// codes, ~155 MB at Flux's shape), so it is built to keep the loads coalesced and many of them in
// flight; the arithmetic (~15 us of issue at Flux's shape) hides under them. Two kernels and a
// memset (sv's words to 0xFF, the empty amax):
//   1. qkv_kernel, one grid over the 128-row tiles of q, of k, then of v (tile index: the head
//      fastest, so that concurrent blocks read neighbouring heads of the same tokens):
//      - a q or k tile (2D threads): its 128 rows staged in shared memory by coalesced 16-byte loads
//        (a row is D / 8 consecutive lanes; rows whose start is not 16-byte aligned are read by 2-byte
//        loads into the same vectors), each group of 64 values in a 144-byte slot (16 bytes of
//        padding: the reads below hit 8 different 16-byte bank quads per quarter warp). Then a thread
//        per group of 64 rotates its group in registers with the CPU's stage order, and the row's amax
//        (q, the two groups of D = 128 by one shuffle) or the block's (k, shuffles, then shared
//        memory) gives the scale; each thread writes its 64 codes as four 16-byte stores. Padding rows
//        are staged as zeros, whose amax 0 and codes 0 are what the CPU writes for them. q and k are
//        read with the streaming (evict-first) hint, so that L2 keeps v for kernel 2.
//      - a v tile: the per-channel amax of 128 keys, 16-byte loads (D / 8 lanes a row, 16 rows a
//        pass), the values' |x| compared as integer bits (exact for non-negative floats; a non-finite
//        value counts as the NaN 0x7fc00000, above every finite float's bits), reduced over the block
//        in shared memory and folded into sv's word as atomicMin(~bits), so that the 0xFF memset is
//        the empty amax. The complemented word has its top bit set; a scale (>= +0 or the NaN
//        0x7fc00000) never does.
//   2. v_codes_kernel, a block per (128-key tile, bh), the tiles in the reverse of kernel 1's order
//      (the v tiles kernel 1 read last are the likeliest still in L2): each block reads sv's D words;
//      a word with its top bit set is ~amax and becomes amax / 448 (the NaN written as the CPU's
//      0x7fc00000), which the block stores back; a word without is a scale another block stored.
//      Every block stores the same value, so the race is benign, and no launch of its own is needed
//      for sv. The codes (16-byte loads as above) are staged key-major in shared memory, then written
//      transposed with the keys permuted within groups of 32, 128 contiguous bytes a warp store.
// The two passes over v are inherent: sv is a per-channel amax over all of a head's keys.
// Registers (sm_90a, ptxas): qkv_kernel 97 at D = 128 (two blocks of 256 threads an SM, up to 64 KB of
// loads in flight), 82 at D = 64; v_codes_kernel 67-68 and 51-52; no spills.
// cuda::attention_8bit checks the device, runs the pre-pass, then the sm_90a kernel of attention_sm90.cu.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention_sm90.h"
#include "common.cuh"
#include "fp8_e4m3.h"

namespace convrot::cuda {

namespace {

constexpr int kBlock = 128;  // rows per pre-pass tile (= the attention's key block, sk's block)
constexpr int kGroup = 64;   // the rotation's order
constexpr int kSlot = 144;   // bytes of shared memory a staged group of 64 16-bit values takes (128 + 16)
constexpr float kQmax = 127.0f;
constexpr float kE4m3Max = 448.0f;
constexpr int kNaNBits = 0x7fc00000;  // the CPU backend's NaN scale (std::numeric_limits<float>::quiet_NaN())

[[noreturn]] void fail(const std::string& why) { throw std::runtime_error("convrot_kernels attention_8bit: " + why); }

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

struct QkJob {
  const void* x;
  HeadStrides st;
  int64_t tokens, padded;
  int8_t* codes;  // [BH, padded, D]
  float* scales;  // [BH, padded] (per row) or [BH, padded / 128] (per block)
  bool per_block;
  bool vec;  // rows start at 16-byte boundaries: vector loads
};

struct VJob {
  const void* x;
  HeadStrides st;
  int64_t tokens, padded;
  bool vec;
};

struct Prepass {
  QkJob q, k;
  VJob v;
  uint32_t* sv;  // sv's words: ~amax bits during kernel 1
  int64_t heads, bh;
  int64_t q_tiles, k_tiles;  // tiles of q, of k (= of v) in all, bh * padded / 128
};

// Four e4m3 codes, v0's in the low byte: the rounding float_to_e4m3 spells out (round to nearest even,
// saturating), which sm_89 and later do in one instruction a pair.
__device__ inline uint32_t e4m3x4(float v0, float v1, float v2, float v3) {
#if __CUDA_ARCH__ >= 890
  uint16_t lo, hi;  // cvt's first source goes to the upper byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(v1), "f"(v0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(v3), "f"(v2));
  return uint32_t(lo) | uint32_t(hi) << 16;
#else
  return uint32_t(float_to_e4m3(v0)) | uint32_t(float_to_e4m3(v1)) << 8 | uint32_t(float_to_e4m3(v2)) << 16 |
         uint32_t(float_to_e4m3(v3)) << 24;
#endif
}

// Eight consecutive 16-bit elements (element 0 in the low half of x): one 16-byte load, or eight
// 2-byte ones where the row is not 16-byte aligned. `stream`: the evict-first hint (read once).
template <bool kStream>
__device__ __forceinline__ uint4 load8(const void* p, bool vec) {
  if (vec) {
    const uint4* v = static_cast<const uint4*>(p);
    return kStream ? __ldcs(v) : __ldg(v);
  }
  const unsigned short* e = static_cast<const unsigned short*>(p);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned short lo = kStream ? __ldcs(e + 2 * i) : __ldg(e + 2 * i);
    const unsigned short hi = kStream ? __ldcs(e + 2 * i + 1) : __ldg(e + 2 * i + 1);
    w[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One butterfly stage of stride S over a group of 64 (the CPU's order: bases ascending, then j; the
// butterflies of a stage are independent, so any order gives the same values).
template <int S>
__device__ __forceinline__ void rotation_stage(float* v) {
#pragma unroll
  for (int base = 0; base < kGroup; base += 4 * S) {
#pragma unroll
    for (int j = base; j < base + S; ++j) h4(v[j], v[j + S], v[j + 2 * S], v[j + 3 * S]);
  }
}

// How kThreads threads read a 128-row tile of one head, D 16-bit values a row: thread t takes the 16-byte
// vector t % kChunks of rows t / kChunks + i kRows, i < kPasses (a row is kChunks consecutive lanes).
template <int D, int kThreads>
struct TileLanes {
  static constexpr int kChunks = D / 8;
  static constexpr int kRows = kThreads / kChunks;
  static constexpr int kPasses = kBlock / kRows;
};

// This thread's vectors of the tile of rows [n0, n0 + 128) of head bh (rows past the tokens read as
// zeros, which the codes and amaxes take as padding).
template <typename T, int D, int kThreads, bool kStream>
__device__ __forceinline__ void load_tile(const void* x, const HeadStrides& st, int64_t tokens, bool vec,
                                          int64_t heads, int64_t bh, int64_t n0,
                                          uint4 (&raw)[TileLanes<D, kThreads>::kPasses]) {
  using L = TileLanes<D, kThreads>;
  const T* head = static_cast<const T*>(x) + bh / heads * st.batch + bh % heads * st.head;
  const int chunk = threadIdx.x % L::kChunks, lane = threadIdx.x / L::kChunks;
#pragma unroll
  for (int i = 0; i < L::kPasses; ++i) {
    const int64_t n = n0 + lane + i * L::kRows;
    raw[i] = n < tokens ? load8<kStream>(head + n * st.token + 8 * chunk, vec) : make_uint4(0, 0, 0, 0);
  }
}

// The codes and scale(s) of one 128-row tile of q or k (blockDim.x = 2D).
template <typename T, int D>
__device__ __forceinline__ void qk_tile(const QkJob& job, int64_t heads, int64_t bh_count, int64_t tile,
                                        unsigned char* smem) {
  constexpr int kThreads = 2 * D;
  using L = TileLanes<D, kThreads>;
  constexpr int kParts = D / kGroup;  // groups of 64 a row
  const int64_t bh = tile % bh_count, n0 = tile / bh_count * kBlock;
  const int tid = threadIdx.x;
  {
    const int chunk = tid % L::kChunks, lane = tid / L::kChunks;
    uint4 raw[L::kPasses];
    load_tile<T, D, kThreads, true>(job.x, job.st, job.tokens, job.vec, heads, bh, n0, raw);
#pragma unroll
    for (int i = 0; i < L::kPasses; ++i) {
      const int r = lane + i * L::kRows;
      *reinterpret_cast<uint4*>(smem + (r * kParts + chunk / 8) * kSlot + 16 * (chunk % 8)) = raw[i];
    }
  }
  __syncthreads();

  // Thread tid: group `part` of row r.
  const int r = tid / kParts, part = tid % kParts;
  float v[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup / 8; ++j) {
    vector_to_float<T>(*reinterpret_cast<const uint4*>(smem + tid * kSlot + 16 * j), v + 8 * j);
  }
  rotation_stage<16>(v);
  rotation_stage<4>(v);
  rotation_stage<1>(v);
  bool finite = true;
  float amax = 0.0f;
#pragma unroll
  for (int d = 0; d < kGroup; ++d) {
    v[d] = __fmul_rn(v[d], 0.125f);  // 2^-log4(64), exact
    finite = finite && isfinite(v[d]);
    amax = fmaxf(amax, fabsf(v[d]));
  }
  if constexpr (kParts == 2) {  // the row's other group is in the neighbouring lane
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    finite = __shfl_xor_sync(0xffffffffu, int(finite), 1) && finite;
  }
  float scale;
  if (job.per_block) {
    __shared__ float warp_amax[kThreads / 32];
    float m = amax;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (tid % 32 == 0) warp_amax[tid / 32] = m;
    const bool all_finite = __syncthreads_and(finite);
    float block_amax = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) block_amax = fmaxf(block_amax, warp_amax[w]);
    scale = all_finite ? __fdiv_rn(block_amax, kQmax) : __int_as_float(kNaNBits);
    if (tid == 0) job.scales[bh * (job.padded / kBlock) + n0 / kBlock] = scale;
  } else {
    // A padding row was staged as zeros: amax 0, scale 0, as the CPU writes.
    scale = finite ? __fdiv_rn(amax, kQmax) : __int_as_float(kNaNBits);
    if (part == 0) job.scales[bh * job.padded + n0 + r] = scale;
  }
  const bool zero = !(scale > 0.0f);
  uint4* dst = reinterpret_cast<uint4*>(job.codes + (bh * job.padded + n0 + r) * D + part * kGroup);
#pragma unroll
  for (int p = 0; p < kGroup / 16; ++p) {
    uint32_t packed[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = v[16 * p + 4 * w + e];
        const float q = zero ? 0.0f : fminf(fmaxf(rintf(__fdiv_rn(x, scale)), -kQmax), kQmax);
        word |= uint32_t(uint8_t(int8_t(q))) << (8 * e);
      }
      packed[w] = word;
    }
    dst[p] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// The per-channel amax of one 128-key tile of v, folded into sv's words (blockDim.x = 2D).
template <typename T, int D>
__device__ __forceinline__ void v_amax_tile(const VJob& job, uint32_t* sv, int64_t heads, int64_t bh_count,
                                            int64_t tile, unsigned char* smem) {
  using L = TileLanes<D, 2 * D>;
  constexpr int kRows = L::kRows;
  const int64_t bh = tile % bh_count, n0 = tile / bh_count * kBlock;
  const int tid = threadIdx.x, chunk = tid % L::kChunks, lane = tid / L::kChunks;
  uint4 raw[L::kPasses];
  load_tile<T, D, 2 * D, false>(job.x, job.st, job.tokens, job.vec, heads, bh, n0, raw);
  int m[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // |x|'s bits; padding keys (zeros) add nothing
#pragma unroll
  for (int i = 0; i < L::kPasses; ++i) {
    float x[8];
    vector_to_float<T>(raw[i], x);
#pragma unroll
    for (int e = 0; e < 8; ++e) m[e] = max(m[e], isfinite(x[e]) ? __float_as_int(fabsf(x[e])) : kNaNBits);
  }
  int* lanes = reinterpret_cast<int*>(smem);  // [kRows][D]
  int4* mine = reinterpret_cast<int4*>(lanes + lane * D + 8 * chunk);
  mine[0] = make_int4(m[0], m[1], m[2], m[3]);
  mine[1] = make_int4(m[4], m[5], m[6], m[7]);
  __syncthreads();
  if (tid < D) {
    int bits = lanes[tid];
#pragma unroll
    for (int l = 1; l < kRows; ++l) bits = max(bits, lanes[l * D + tid]);
    atomicMin(sv + bh * D + tid, ~uint32_t(bits));
  }
}

// Kernel 1: the tiles of q, then of k, then of v's amaxes.
template <typename T, int D>
__global__ void __launch_bounds__(2 * D) qkv_kernel(const Prepass p) {
  constexpr int kQkBytes = kBlock * (D / kGroup) * kSlot, kVBytes = TileLanes<D, 2 * D>::kRows * D * 4;
  __shared__ __align__(16) unsigned char smem[kQkBytes > kVBytes ? kQkBytes : kVBytes];
  const int64_t t = blockIdx.x;
  if (t < p.q_tiles) {
    qk_tile<T, D>(p.q, p.heads, p.bh, t, smem);
  } else if (t < p.q_tiles + p.k_tiles) {
    qk_tile<T, D>(p.k, p.heads, p.bh, t - p.q_tiles, smem);
  } else {
    v_amax_tile<T, D>(p.v, p.sv, p.heads, p.bh, t - p.q_tiles - p.k_tiles, smem);
  }
}

// Kernel 2: the codes of one 128-key tile of v (the tiles in the reverse of kernel 1's order), staged
// key-major in shared memory, then written transposed with the keys permuted: the stored position k
// (0..31) of a 32-key group holds key attention_key_of(k) (primitives.h), four positions (4 bytes) a
// thread.
template <typename T, int D>
__global__ void __launch_bounds__(256) v_codes_kernel(const VJob job, int64_t heads, int64_t bh_count,
                                                      int64_t tiles, uint32_t* sv, uint8_t* vt8) {
  constexpr int kThreads = 256;
  using L = TileLanes<D, kThreads>;
  __shared__ float scale[D];
  __shared__ __align__(16) uint8_t tile[kBlock][D + 4];  // D + 4 bytes a row: the transposed reads
                                                         // spread over the banks
  const int64_t t = tiles - 1 - int64_t(blockIdx.x);
  const int64_t bh = t % bh_count, n0 = t / bh_count * kBlock;
  const int tid = threadIdx.x, chunk = tid % L::kChunks, lane = tid / L::kChunks;
  uint4 raw[L::kPasses];
  load_tile<T, D, kThreads, false>(job.x, job.st, job.tokens, job.vec, heads, bh, n0, raw);
  if (tid < D) {
    const uint32_t word = __ldcg(sv + bh * D + tid);
    float s;
    if (word & 0x80000000u) {  // ~amax bits: this block is among the first to see the head's amax
      const uint32_t amax = ~word;
      s = amax == uint32_t(kNaNBits) ? __int_as_float(kNaNBits) : __fdiv_rn(__uint_as_float(amax), kE4m3Max);
      sv[bh * D + tid] = __float_as_uint(s);  // every block stores this same value
    } else {
      s = __uint_as_float(word);  // stored by another block
    }
    scale[tid] = s;
  }
  __syncthreads();
  float s[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = scale[8 * chunk + e];
#pragma unroll
  for (int i = 0; i < L::kPasses; ++i) {
    float x[8];
    vector_to_float<T>(raw[i], x);  // a padding key is zeros: codes 0
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = s[e] > 0.0f ? __fdiv_rn(x[e], s[e]) : 0.0f;  // code 0 for 0
    const uint32_t w[2] = {e4m3x4(v[0], v[1], v[2], v[3]), e4m3x4(v[4], v[5], v[6], v[7])};
    uint32_t* row = reinterpret_cast<uint32_t*>(&tile[lane + i * L::kRows][8 * chunk]);
    row[0] = w[0];
    row[1] = w[1];
  }
  __syncthreads();
  uint32_t* out = reinterpret_cast<uint32_t*>(vt8 + bh * D * job.padded + n0);
  for (int i = tid; i < D * kBlock / 4; i += kThreads) {
    const int c = i / (kBlock / 4), pos = 4 * (i % (kBlock / 4));
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = (pos + e) % 32, g = (pos + e) / 32;
      word |= uint32_t(tile[32 * g + attention_key_of(k)][c]) << (8 * e);
    }
    out[int64_t(c) * (job.padded / 4) + i % (kBlock / 4)] = word;
  }
}

template <typename T>
bool rows_aligned16(const void* x, const HeadStrides& st) {
  constexpr int64_t kPerVector = 16 / sizeof(T);
  return aligned16(x) && st.batch % kPerVector == 0 && st.token % kPerVector == 0 && st.head % kPerVector == 0;
}

template <typename T, int D>
void launch_prepass(const AttentionInputs& in, const AttentionCodes& codes, cudaStream_t stream) {
  const int64_t bh = in.batch * in.heads;
  const int64_t nq = attention_padded(in.q_tokens), nkv = attention_padded(in.kv_tokens);
  Prepass p;
  p.q = QkJob{in.q, in.qs, in.q_tokens, nq, codes.q8, codes.sq, false, rows_aligned16<T>(in.q, in.qs)};
  p.k = QkJob{in.k, in.ks, in.kv_tokens, nkv, codes.k8, codes.sk, true, rows_aligned16<T>(in.k, in.ks)};
  p.v = VJob{in.v, in.vs, in.kv_tokens, nkv, rows_aligned16<T>(in.v, in.vs)};
  p.sv = reinterpret_cast<uint32_t*>(codes.sv);
  p.heads = in.heads;
  p.bh = bh;
  p.q_tiles = bh * (nq / kBlock);
  p.k_tiles = bh * (nkv / kBlock);
  const int64_t blocks = p.q_tiles + 2 * p.k_tiles;
  if (blocks > 0x7fffffff) fail("too many 128-row tiles for one grid");
  check(cudaMemsetAsync(codes.sv, 0xFF, size_t(bh * D) * sizeof(float), stream), "attention_8bit pre-pass (sv)");
  qkv_kernel<T, D><<<unsigned(blocks), 2 * D, 0, stream>>>(p);
  check_launch("attention_8bit pre-pass (q, k, v amax)");
  v_codes_kernel<T, D><<<unsigned(p.k_tiles), 256, 0, stream>>>(p.v, in.heads, bh, p.k_tiles, p.sv, codes.vt8);
  check_launch("attention_8bit pre-pass (v codes)");
}

}  // namespace

void attention_8bit_prepass(const AttentionInputs& in, Float dtype, const AttentionCodes& codes, void* stream) {
  if (in.dim != 64 && in.dim != 128) fail("head dim must be 64 or 128, got " + std::to_string(in.dim));
  if (in.batch * in.heads > 65535) fail("batch * heads must be at most 65535 (the grid's y dimension)");
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case Float::bf16:
      return in.dim == 128 ? launch_prepass<__nv_bfloat16, 128>(in, codes, s)
                           : launch_prepass<__nv_bfloat16, 64>(in, codes, s);
    case Float::f16:
      return in.dim == 128 ? launch_prepass<__half, 128>(in, codes, s) : launch_prepass<__half, 64>(in, codes, s);
    default: fail("q, k and v must be bf16 or fp16");
  }
}

void attention_8bit(const AttentionInputs& shape, const AttentionCodes& codes, float scale_log2, void* out,
                    HeadStrides os, Float dtype, void* stream) {
  // Checked before the pre-pass, so that a refused call enqueues nothing.
  if (current_device().compute_capability != 90) fail("the kernel needs an sm_90 (Hopper) GPU");
  if (!built_for_hopper()) {
    fail("the kernel is sm_90a code, which this build lacks (build with CONVROT_CUDA_ARCHS including 90a-real)");
  }
  if (dtype != Float::bf16 && dtype != Float::f16) fail("the output must be bf16 or fp16");
  const Attention8bit a{shape, codes, scale_log2, out, os, dtype == Float::bf16};
  check_attention_8bit_sm90(a);
  attention_8bit_prepass(shape, dtype, codes, stream);
  attention_8bit_sm90(a, stream);
}

}  // namespace convrot::cuda
