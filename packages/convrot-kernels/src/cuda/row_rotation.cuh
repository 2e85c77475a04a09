// The row engine behind `rht` and `rht_quantize`: one thread block per row.
//
// A row (or, for rows longer than kMaxStaged, a segment of it) is read from
// global memory once, 16-byte vectors per thread, converted to fp32 and staged
// in shared memory. The radix-4 butterfly stages of docs/format.md then run in
// the order the contract fixes (stride g/4 first, stride 1 last):
//   - strides >= 16 as passes over shared memory, two stages per pass, each
//     thread holding the 16 (or 4) elements one butterfly work item touches;
//   - strides 4 and 1 in registers, on the contiguous 16-element chunk a thread
//     reloads, followed by the exact 2^-log4(g) scaling.
// `rht` writes that chunk out rounded to the input dtype. `rht_quantize` keeps
// it in shared memory, reduces the row's amax over the block, then packs codes
// straight from shared memory: x is read once and only codes and one scale per
// row are written. Rows longer than kMaxStaged are rotated segment by segment,
// twice (once for the amax, once for the codes): correct for any K, slower.
// A row may be the concatenation of two inputs, part of it passed through GELU
// on load (RowSource in primitives.h): the fused form of cat([a, gelu(b)]). On the
// fast path a row may also be layer_norm_modulate's output row, normalised and
// modulated in registers after loading (and before that, optionally, a gated
// residual sum x + gate * branch, which is also written out): the fused forms of a
// DiT block's AdaLN norms.
#pragma once

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "gelu.cuh"

namespace convrot::cuda::row_rotation {

// A RowSource typed: where element `col` of row `row` lives, and where GELU starts; for
// normed rows (RowSource::norm) the layer_norm_modulate parameters, rows of x and prefix by
// token (fewer than 2^31 rows, so 32-bit index arithmetic).
template <typename T>
struct Rows {
  const T* x;
  const T* x2;
  int64_t k1, k2;
  int64_t gelu_from;
  const T* prefix;
  const T* scale;
  const T* shift;
  int tokens, prefix_tokens;
  int64_t x_batch_stride, prefix_batch_stride, modulation_stride;
  float eps;
  const T* branch;  // RowSource::residual
  const T* gate;
  int64_t gate_stride;
  T* sum;

  __device__ __forceinline__ const T* at(int64_t row, int64_t col) const {
    return col < k1 ? x + row * k1 + col : x2 + row * k2 + (col - k1);
  }

  // A normed row's first element, read from the text prefix or x by its token; b: its batch.
  __device__ __forceinline__ const T* normed_row(int row, int& b) const {
    b = row / tokens;
    const int s = row - b * tokens;
    return s < prefix_tokens ? prefix + b * prefix_batch_stride + int64_t(s) * k1
                             : x + b * x_batch_stride + int64_t(s - prefix_tokens) * k1;
  }
};

template <typename T>
Rows<T> typed(const RowSource& src, int64_t k) {
  Rows<T> rows{static_cast<const T*>(src.x), static_cast<const T*>(src.x2), src.k1, k - src.k1, src.gelu_from};
  if (const NormModulate* n = src.norm) {
    rows.prefix = static_cast<const T*>(n->prefix);
    rows.scale = static_cast<const T*>(n->scale);
    rows.shift = static_cast<const T*>(n->shift);
    rows.tokens = int(n->tokens);
    rows.prefix_tokens = int(n->prefix_tokens);
    rows.x_batch_stride = n->x_batch_stride;
    rows.prefix_batch_stride = n->prefix_batch_stride;
    rows.modulation_stride = n->modulation_stride;
    rows.eps = n->eps;
  }
  if (const GatedResidual* g = src.residual) {
    rows.branch = static_cast<const T*>(g->branch);
    rows.gate = static_cast<const T*>(g->gate);
    rows.gate_stride = g->gate_stride;
    rows.sum = static_cast<T*>(g->sum);
  }
  return rows;
}

// GELU of a loaded chunk, rounded to the input dtype as the unfused model's GELU output would be.
// 16-bit results are rounded two at a time (one packing conversion per pair).
template <typename T, int W>
__device__ __forceinline__ void gelu_chunk(float (&v)[W]) {
  if constexpr (!std::is_same_v<T, float> && W % 2 == 0) {
#pragma unroll
    for (int q = 0; q < W; q += 2) round_pair<T>(gelu_tanh<T>(v[q]), gelu_tanh<T>(v[q + 1]), v[q], v[q + 1]);
  } else {
#pragma unroll
    for (int q = 0; q < W; ++q) v[q] = to_float(from_float<T>(gelu_tanh<T>(v[q])));
  }
}

constexpr int kMaxThreads = 512;
// Elements of a row staged in shared memory at once (64 KB of fp32): Flux's
// widest row (15360) fits in one segment. A multiple of every group size.
constexpr int kMaxStaged = 16384;

enum Mode { kRotate = 0, kQuant4 = 4, kQuant8 = 8 };

// Shared-memory slot of element i of a staged segment held in chunks of W.
// For W = 16 two permutations keep every access pattern conflict-free:
//  - the 16-byte quarter of a chunk is XORed with bits 1-2 of the chunk index,
//    so eight threads storing one float4 of eight consecutive chunks hit eight
//    distinct bank quads;
//  - chunk pairs are swapped on bits 6 ^ 8 of i, so the two half-warps of a
//    strided pass (elements 64 or 256 apart) land in opposite bank halves.
// Slots stay inside [0, round_up(len, 32)).
template <int W>
__device__ __forceinline__ int slot(int i) {
  if constexpr (W == 16) {
    const int c = i >> 4;
    const int chunk = c ^ (((c >> 2) ^ (c >> 4)) & 1);
    const int quarter = ((i >> 2) & 3) ^ ((c >> 1) & 3);
    return (chunk << 4) | (quarter << 2) | (i & 3);
  } else {
    return i;
  }
}

template <int W>
__device__ __forceinline__ void smem_store_chunk(float* buf, int first, const float (&v)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int p = 0; p < W / 4; ++p) {
      *reinterpret_cast<float4*>(buf + slot<W>(first + 4 * p)) = make_float4(v[4 * p], v[4 * p + 1], v[4 * p + 2], v[4 * p + 3]);
    }
  } else if constexpr (W == 2) {
    *reinterpret_cast<float2*>(buf + first) = make_float2(v[0], v[1]);
  } else {
    buf[first] = v[0];
  }
}

template <int W>
__device__ __forceinline__ void smem_load_chunk(const float* buf, int first, float (&v)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int p = 0; p < W / 4; ++p) {
      const float4 f = *reinterpret_cast<const float4*>(buf + slot<W>(first + 4 * p));
      v[4 * p] = f.x;
      v[4 * p + 1] = f.y;
      v[4 * p + 2] = f.z;
      v[4 * p + 3] = f.w;
    }
  } else if constexpr (W == 2) {
    const float2 f = *reinterpret_cast<const float2*>(buf + first);
    v[0] = f.x;
    v[1] = f.y;
  } else {
    v[0] = buf[first];
  }
}

// One butterfly stage at stride `s` (a power of 4, >= 16) over a staged segment.
__device__ __forceinline__ void stage_pass(float* buf, int len, int log2_s) {
  const int s = 1 << log2_s;
  for (int w = threadIdx.x; w < len / 4; w += blockDim.x) {
    const int base = ((w >> log2_s) << (log2_s + 2)) + (w & (s - 1));
    float e[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) e[a] = buf[slot<16>(base + a * s)];
    h4(e[0], e[1], e[2], e[3]);
#pragma unroll
    for (int a = 0; a < 4; ++a) buf[slot<16>(base + a * s)] = e[a];
  }
}

// Two butterfly stages, at strides 4s then s (s a power of 4, >= 16), in one pass.
__device__ __forceinline__ void stage_pair_pass(float* buf, int len, int log2_s) {
  const int s = 1 << log2_s;
  for (int w = threadIdx.x; w < len / 16; w += blockDim.x) {
    const int base = ((w >> log2_s) << (log2_s + 4)) + (w & (s - 1));
    float e[4][4];  // e[b][a] = element base + b * 4s + a * s
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int a = 0; a < 4; ++a) e[b][a] = buf[slot<16>(base + b * 4 * s + a * s)];
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) h4(e[0][a], e[1][a], e[2][a], e[3][a]);
#pragma unroll
    for (int b = 0; b < 4; ++b) h4(e[b][0], e[b][1], e[b][2], e[b][3]);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int a = 0; a < 4; ++a) buf[slot<16>(base + b * 4 * s + a * s)] = e[b][a];
    }
  }
}

// The stages at strides 4 and 1 (those a chunk of W holds) and the final scaling.
template <int W>
__device__ __forceinline__ void finish_chunk(float (&v)[W], int group, float unit) {
  if constexpr (W == 16) {
    if (group >= 16) {
#pragma unroll
      for (int a = 0; a < 4; ++a) h4(v[a], v[a + 4], v[a + 8], v[a + 12]);
    }
  }
  if constexpr (W % 4 == 0) {
    if (group >= 4) {
#pragma unroll
      for (int b = 0; b < W / 4; ++b) h4(v[4 * b], v[4 * b + 1], v[4 * b + 2], v[4 * b + 3]);
#pragma unroll
      for (int q = 0; q < W; ++q) v[q] *= unit;
    }
  }
}

// Applies every stage of stride >= 16 to a staged segment of `len` elements
// (group >= 64 only), between barriers: on return every thread may read any slot.
__device__ __forceinline__ void strided_passes(float* buf, int len, int group) {
  const int log4g = __ffs(group) / 2;  // group = 4^log4g; strides g/4 .. 16 remain
  int stages = log4g - 2;
  int log2_s = 2 * (log4g - 1);
  if (stages & 1) {
    __syncthreads();
    stage_pass(buf, len, log2_s);
    log2_s -= 2;
    --stages;
  }
  for (; stages > 0; stages -= 2) {
    __syncthreads();
    stage_pair_pass(buf, len, log2_s - 2);
    log2_s -= 4;
  }
  __syncthreads();
}

// Loads elements [base, base + len) of a row into shared memory and applies
// every stage of stride >= 16. On return this thread may read back its own
// chunks (c = tid, tid + T, ...).
template <typename T, int W>
__device__ __forceinline__ void stage_segment(const Rows<T>& src, int64_t row, int64_t base, int len, int group,
                                              bool vec, float* buf) {
  for (int c = threadIdx.x; c < len / W; c += blockDim.x) {
    const int64_t col = base + c * W;
    float v[W];
    load_chunk<T, W>(src.at(row, col), vec, v);
    if (col >= src.gelu_from) gelu_chunk<T, W>(v);
    smem_store_chunk<W>(buf, c * W, v);
  }
  if (group >= 64) strided_passes(buf, len, group);
}

__device__ __forceinline__ int quantize_value(float v, float scale, float inv, bool exact, float qmax) {
  float r;
  if (exact) {
    r = rintf(__fdiv_rn(v, scale));
  } else {
    const float t = v * inv;
    r = rintf(t);
    // v * (1/scale) is within 2 ulp of v / scale; only near a .5 tie can that
    // change the rounding, and there the correctly rounded quotient decides.
    if (fabsf(t - r) > 0.499f) r = rintf(__fdiv_rn(v, scale));
  }
  return int(fminf(fmaxf(r, -qmax - 1.0f), qmax));
}

// Round to nearest even with full-rate float adds instead of the quarter-rate
// F2I/I2F conversions: for |t| < 2^22, t + 1.5 * 2^23 rounds t to an integer
// (half to even) in the low mantissa bits, so the float's low 8 bits are the
// code's two's-complement byte and subtracting 1.5 * 2^23 back gives the
// rounded value exactly.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// Codes round(v * unit / scale) of 16 unscaled rotation outputs (unit a power
// of two, inv = unit / scale rounded once), as int whose low byte is the code.
// The fused v * inv + 1.5 * 2^23 rounds the exact product v * inv to an integer
// (see kRoundMagic), which is within qmax * 2^-23 of the quotient (at most
// qmax (1 + 2^-22) in magnitude). Only a product within that of a .5 tie can
// round the other way, so values within qmax * 2^-20 of a tie (8x margin) are
// recomputed with the correctly rounded division. The band decides
// speed: the check is per thread but the branch per warp (512 values), and a
// 0.001 band sent 64% of warps down the per-element path (ncu, 4-bit, K = 3072);
// this one sends ~0.7% (4-bit) / ~12% (8-bit). No clamp is needed: the quotient
// rounds into [-qmax, qmax].
template <int QMAX>
__device__ __forceinline__ void quantize_chunk(const float (&v)[16], float unit, float scale, float inv, bool exact,
                                               int (&q)[16]) {
  constexpr float kNearTie = 0.5f - QMAX * 0x1p-20f;
  // |v * inv - round(v * inv)|: the integer magic - u is exact, so one rounding.
  auto offset = [&](int e) { return fabsf(__fmaf_rn(v[e], inv, kRoundMagic - __int_as_float(q[e]))); };
  float largest = exact ? 1.0f : 0.0f;
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    q[e] = __float_as_int(__fmaf_rn(v[e], inv, kRoundMagic));
    largest = fmaxf(largest, offset(e));
  }
  if (largest > kNearTie) {
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      if (exact || offset(e) > kNearTie) q[e] = __float_as_int(__fdiv_rn(v[e] * unit, scale) + kRoundMagic);
    }
  }
}

// The low bytes of four ints as one word (byte i from q[i]): three byte permutes.
__device__ __forceinline__ uint32_t low_bytes(int q0, int q1, int q2, int q3) {
  return __byte_perm(__byte_perm(q0, q1, 0x0040), __byte_perm(q2, q3, 0x0040), 0x5410);
}

template <int W, int BITS>
__device__ __forceinline__ void store_codes(uint8_t* dst, bool vec, const int (&q)[W]) {
  if constexpr (BITS == 4) {
    if constexpr (W == 16) {
      if (vec) {
        // Even elements' codes in the low nibbles, odd elements' in the high ones.
        uint32_t word[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t even = low_bytes(q[8 * h], q[8 * h + 2], q[8 * h + 4], q[8 * h + 6]);
          const uint32_t odd = low_bytes(q[8 * h + 1], q[8 * h + 3], q[8 * h + 5], q[8 * h + 7]);
          word[h] = (even & 0x0F0F0F0Fu) | ((odd << 4) & 0xF0F0F0F0u);
        }
        *reinterpret_cast<uint2*>(dst) = make_uint2(word[0], word[1]);
        return;
      }
    }
#pragma unroll
    for (int j = 0; j < W / 2; ++j) dst[j] = uint8_t((q[2 * j] & 0xF) | ((q[2 * j + 1] & 0xF) << 4));
  } else {
    if constexpr (W % 4 == 0) {
      if (vec) {
        uint32_t words[W / 4];
#pragma unroll
        for (int j = 0; j < W / 4; ++j) words[j] = low_bytes(q[4 * j], q[4 * j + 1], q[4 * j + 2], q[4 * j + 3]);
        if constexpr (W == 16) {
          *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
        } else {
          *reinterpret_cast<uint32_t*>(dst) = words[0];
        }
        return;
      }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) dst[j] = uint8_t(q[j] & 0xFF);
  }
}

// Block-wide max of |v| and AND of finiteness; every thread gets the result.
// max(a, b), NaN if either is NaN (max.NaN), so a NaN amax survives the reduction.
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// `parity` alternates between consecutive calls of one block: a fast warp's next
// write cannot overtake a slow warp still reading this call's partial results.
__device__ __forceinline__ void block_amax(float& amax, bool& finite, int parity = 0) {
  __shared__ float warp_amax_buf[2][kMaxThreads / 32];
  __shared__ int warp_finite_buf[2][kMaxThreads / 32];
  float* warp_amax = warp_amax_buf[parity];
  int* warp_finite = warp_finite_buf[parity];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  finite = __all_sync(0xffffffffu, finite);
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if ((threadIdx.x & 31) == 0) {
    warp_amax[warp] = amax;
    warp_finite[warp] = finite;
  }
  __syncthreads();
  amax = 0.0f;
  finite = true;
  for (int w = 0; w < nwarps; ++w) {
    amax = fmax_nan(amax, warp_amax[w]);
    finite = finite && warp_finite[w];
  }
}

// One block per row. MODE kRotate writes the rotated row to `out` (T);
// kQuant4 / kQuant8 write codes to `out` (uint8 / int8) and the row scale.
// group == 0 (quantization only) skips every stage.
template <typename T, int W, int MODE>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(const Rows<T> src, int64_t k, int group, int seg_len,
                                                           bool vec, void* __restrict__ out,
                                                           float* __restrict__ scale_out) {
  extern __shared__ float4 smem4[];
  float* buf = reinterpret_cast<float*>(smem4);
  const int64_t row = blockIdx.x;
  const int nseg = int(ceil_div<int64_t>(k, seg_len));
  float unit = 1.0f;  // 2^-log4(group), exact
  for (int g = group; g > 1; g >>= 2) unit *= 0.5f;

  float amax = 0.0f;
  bool finite = true;
  for (int seg = 0; seg < nseg; ++seg) {
    const int64_t base = int64_t(seg) * seg_len;
    const int len = int(k - base < seg_len ? k - base : seg_len);
    if (seg > 0) __syncthreads();  // the previous segment's strided passes are done with buf
    stage_segment<T, W>(src, row, base, len, group, vec, buf);
    for (int c = threadIdx.x; c < len / W; c += blockDim.x) {
      float v[W];
      smem_load_chunk<W>(buf, c * W, v);
      finish_chunk<W>(v, group, unit);
      if constexpr (MODE == kRotate) {
        store_chunk<T, W>(static_cast<T*>(out) + row * k + base + c * W, vec, v);
      } else {
#pragma unroll
        for (int q = 0; q < W; ++q) {
          const float a = fabsf(v[q]);
          amax = fmaxf(amax, a);
          finite = finite && (a <= FLT_MAX);
        }
        if (nseg == 1) smem_store_chunk<W>(buf, c * W, v);
      }
    }
  }
  if constexpr (MODE != kRotate) {
    constexpr float qmax = MODE == kQuant4 ? 7.0f : 127.0f;
    block_amax(amax, finite);
    const float scale = finite ? __fdiv_rn(amax, qmax) : __int_as_float(0x7fc00000);
    if (threadIdx.x == 0) scale_out[row] = scale;
    const bool zero = !(scale > 0.0f);  // all-zero, underflowed or non-finite row
    const float inv = __frcp_rn(scale);
    const bool exact = !(inv <= FLT_MAX);
    constexpr int kCodeBytesNum = MODE == kQuant4 ? 1 : 2;  // bytes per element = num / 2
    uint8_t* qrow = static_cast<uint8_t*>(out) + row * k * kCodeBytesNum / 2;
    for (int seg = 0; seg < nseg; ++seg) {
      const int64_t base = int64_t(seg) * seg_len;
      const int len = int(k - base < seg_len ? k - base : seg_len);
      if (nseg > 1) {
        __syncthreads();
        stage_segment<T, W>(src, row, base, len, group, vec, buf);
      }
      for (int c = threadIdx.x; c < len / W; c += blockDim.x) {
        float v[W];
        smem_load_chunk<W>(buf, c * W, v);
        if (nseg > 1) finish_chunk<W>(v, group, unit);
        int q[W];
#pragma unroll
        for (int j = 0; j < W; ++j) q[j] = zero ? 0 : quantize_value(v[j], scale, inv, exact, qmax);
        store_codes<W, MODE>(qrow + (base + c * W) * kCodeBytesNum / 2, vec, q);
      }
    }
  }
}

// Shared-memory layout of the fast path for group 256. Element
// i = 256 blk + 64 b + 16 a + lo of a row (b, a: the digits of strides 64 and
// 16) lives at word 272 blk + 16 lo + 4 (b ^ ((lo >> 1) & 3)) + a. A chunk
// owner (fixed blk, b, a) then stores its 16 elements at a per-thread base plus
// a compile-time offset, and a butterfly work item (fixed blk, lo) finds its 16
// elements in four 16-byte vectors; both patterns are bank-conflict-free (the
// 16-word pad moves odd blocks to the other bank half, the XOR spreads the
// vectors of eight consecutive work items over the 32 banks).
constexpr int kBlockWords256 = 272;

// Chunk c's 16 elements (blk = c >> 4, b = (c >> 2) & 3, a = c & 3): element lo at word
// (base ^ 4 ((lo >> 1) & 3)) + 16 lo, base = 272 blk + 4 b + a. The XOR touches only bits 2-3,
// which are b's (272 blk has none there), so each of the four quarters costs one XOR and the
// rest are immediate offsets.
__device__ __forceinline__ int chunk_base_256(int c) { return kBlockWords256 * (c >> 4) + (c & 15); }

__device__ __forceinline__ void store_chunk_256(float* buf, int c, const float (&v)[16]) {
  const int base = chunk_base_256(c);
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    float* quarter = buf + (base ^ (4 * f));
#pragma unroll
    for (int lo : {2 * f, 2 * f + 1, 2 * f + 8, 2 * f + 9}) quarter[16 * lo] = v[lo];
  }
}

__device__ __forceinline__ void load_chunk_256(const float* buf, int c, float (&v)[16]) {
  const int base = chunk_base_256(c);
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    const float* quarter = buf + (base ^ (4 * f));
#pragma unroll
    for (int lo : {2 * f, 2 * f + 1, 2 * f + 8, 2 * f + 9}) v[lo] = quarter[16 * lo];
  }
}

// The stages at strides 64 and 16 for work item w (blk = w >> 4, lo = w & 15).
__device__ __forceinline__ void stride_64_16_item_256(float* buf, int w) {
  // Vector b of the item at word (base ^ 4 b), base = 272 blk + 16 lo + 4 ((lo >> 1) & 3).
  const int lo = w & 15, base = kBlockWords256 * (w >> 4) + 16 * lo + 2 * (lo & 6);
  float e[4][4];  // e[b][a]
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const float4 f = *reinterpret_cast<const float4*>(buf + (base ^ (4 * b)));
    e[b][0] = f.x;
    e[b][1] = f.y;
    e[b][2] = f.z;
    e[b][3] = f.w;
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) h4(e[0][a], e[1][a], e[2][a], e[3][a]);
#pragma unroll
  for (int b = 0; b < 4; ++b) h4(e[b][0], e[b][1], e[b][2], e[b][3]);
#pragma unroll
  for (int b = 0; b < 4; ++b) *reinterpret_cast<float4*>(buf + (base ^ (4 * b))) = make_float4(e[b][0], e[b][1], e[b][2], e[b][3]);
}

// max(|a|, b), NaN if either is NaN: one instruction that also tracks finiteness.
__device__ __forceinline__ float max_abs_nan(float a, float b) { return fmax_nan(fabsf(a), b); }

// Block-wide NaN-propagating max for the fast path: warp partials go to a
// 16-slot shared array (slots of absent warps hold 0) read back as float4s.
// `parity` alternates between rows so a fast warp cannot overwrite partials a
// slow warp is still reading.
__device__ __forceinline__ float block_max_nan(float v, float (*partials)[kMaxThreads / 32], int parity) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) partials[parity][threadIdx.x / 32] = v;
  __syncthreads();
  const int nwarps = blockDim.x / 32;
  float r = 0.0f;
  for (int w = 0; w < nwarps; w += 4) {
    const float4 p = *reinterpret_cast<const float4*>(&partials[parity][w]);
    r = fmax_nan(fmax_nan(r, p.x), fmax_nan(fmax_nan(p.y, p.z), p.w));
  }
  return r;
}

// Where the fast path's rows come from: plain rows of x; parts (x and x2, GELU from a
// column; the per-chunk choice cost plain rows ~5% on the H100, so each has its own
// instance); layer_norm_modulate's output rows (RowSource::norm); or those of a gated
// residual sum, which is also written out (RowSource::residual).
enum Source { kPlainRows, kPartRows, kNormedRows, kResidualNormedRows };
constexpr bool normed(Source s) { return s == kNormedRows || s == kResidualNormedRows; }

// The total of sums[0, n) in layer_norm_modulate's order (its row_total): lane l adds sums
// l, l + 32, ... in order, then the lanes meet in an XOR butterfly. Every warp computes it
// alike, so one barrier before it is all a block needs.
__device__ __forceinline__ float warp_total(const float* sums, int n) {
  float acc = 0.0f;
  for (int c = threadIdx.x & 31; c < n; c += 32) acc = __fadd_rn(acc, sums[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  return acc;
}

// a and b rounded to T and back (16-bit T: one packing conversion for both).
template <typename T>
__device__ __forceinline__ void round_both(float& a, float& b) {
  if constexpr (std::is_same_v<T, float>) return;
  else round_pair<T>(a, b, a, b);
}

// x + gate * branch for a chunk of 16 (GatedResidual: product and sum each rounded to T).
template <typename T>
__device__ __forceinline__ void add_gated(float (&x)[16], const float (&branch)[16], const T* gate) {
  float g[16];
  load_chunk<T, 16>(gate, true, g);
#pragma unroll
  for (int q = 0; q < 16; q += 2) {
    float p0 = __fmul_rn(g[q], branch[q]), p1 = __fmul_rn(g[q + 1], branch[q + 1]);
    round_both<T>(p0, p1);
    x[q] = __fadd_rn(x[q], p0);
    x[q + 1] = __fadd_rn(x[q + 1], p1);
    round_both<T>(x[q], x[q + 1]);
  }
}

// The block's row through layer_norm_modulate (primitives.h, NormModulate), in place in
// registers, with that kernel's summation order, operations and roundings: so the codes equal
// rht_quantize of its output bit for bit. Chunk c of 16 holds the norm's 8-element chunks
// 2c and 2c + 1, whose sums go to shared memory (`sums`, 2 x K/8 floats: one half per
// statistic, so that no barrier more is needed between rows).
template <typename T, int CPT, typename Has>
__device__ __forceinline__ void normalize_modulate(float (&v)[CPT][16], const Rows<T>& src, int b, int k, float* sums,
                                                   Has has) {
  const int n8 = k / 8;
  float* mean_sums = sums;
  float* var_sums = sums + n8;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    if (has(j)) {
      float s[2] = {0.0f, 0.0f};
#pragma unroll
      for (int q = 0; q < 16; ++q) s[q / 8] = __fadd_rn(s[q / 8], v[j][q]);
      *reinterpret_cast<float2*>(mean_sums + 2 * (j * blockDim.x + threadIdx.x)) = make_float2(s[0], s[1]);
    }
  }
  __syncthreads();
  const float mean = __fdiv_rn(warp_total(mean_sums, n8), float(k));
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    if (has(j)) {
      float s[2] = {0.0f, 0.0f};
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        const float d = __fsub_rn(v[j][q], mean);
        s[q / 8] = __fadd_rn(s[q / 8], __fmul_rn(d, d));
      }
      *reinterpret_cast<float2*>(var_sums + 2 * (j * blockDim.x + threadIdx.x)) = make_float2(s[0], s[1]);
    }
  }
  __syncthreads();
  const float rstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(warp_total(var_sums, n8), float(k)), src.eps)));
  const T* scale = src.scale + b * src.modulation_stride;
  const T* shift = src.shift + b * src.modulation_stride;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    if (has(j)) {
      const int col = (j * blockDim.x + threadIdx.x) * 16;
      float factor[16], offset[16];
      load_chunk<T, 16>(scale + col, true, factor);
      load_chunk<T, 16>(shift + col, true, offset);
#pragma unroll
      for (int q = 0; q < 16; q += 2) {
        float n0 = __fmul_rn(__fsub_rn(v[j][q], mean), rstd), n1 = __fmul_rn(__fsub_rn(v[j][q + 1], mean), rstd);
        float f0 = __fadd_rn(1.0f, factor[q]), f1 = __fadd_rn(1.0f, factor[q + 1]);
        round_both<T>(n0, n1);
        round_both<T>(f0, f1);
        float m0 = __fmul_rn(n0, f0), m1 = __fmul_rn(n1, f1);
        round_both<T>(m0, m1);
        v[j][q] = __fadd_rn(m0, offset[q]);
        v[j][q + 1] = __fadd_rn(m1, offset[q + 1]);
        round_both<T>(v[j][q], v[j][q + 1]);
      }
    }
  }
}

// The fast path, for 16-byte-aligned rows of K % 16 == 0 and K <= 16384: a
// persistent grid whose blocks walk rows (row = blockIdx.x + i * gridDim.x).
// Each thread keeps its CPT chunks in registers; while one row is rotated and
// quantized, the block's next row is already on its way into shared memory
// (cp.async, no registers held), which hides memory latency that one block per
// row cannot. Shared memory serves only
// the strided stages (group >= 64) and the amax reduction; codes are packed
// straight from registers.
// Chunks per thread the fast path may hold in registers.
constexpr int kFastMaxChunksPerThread = 4;

// Threads per block for CPT chunks per thread such that two blocks stay resident
// per SM without spilling (65536 / (2 x threads) registers a thread): twice the
// warps of one block per SM to hide latency with.
constexpr int two_block_threads(int cpt) { return cpt <= 2 ? 384 : cpt == 3 ? 320 : 256; }

template <typename T, int MODE, int CPT, int MIN_BLOCKS, Source SOURCE>
__global__ void __launch_bounds__(MIN_BLOCKS == 2 ? two_block_threads(CPT) : kMaxThreads, MIN_BLOCKS) rows_fast_kernel(const Rows<T> src, int64_t rows, int k,
                                                                int group, int work_words, void* __restrict__ out,
                                                                float* __restrict__ scale_out) {
  extern __shared__ float4 smem4[];
  float* buf = reinterpret_cast<float*>(smem4);                // fp32 working area (group >= 64)
  uint4* staged = reinterpret_cast<uint4*>(buf + work_words);  // the next row, as loaded
  constexpr int kStagedRows = SOURCE == kResidualNormedRows ? 2 : 1;  // x's row, then the branch's
  float* norm_sums = reinterpret_cast<float*>(staged) + kStagedRows * k * sizeof(T) / sizeof(float);
  constexpr int kVec = 16 * int(sizeof(T)) / 16;               // 16-byte vectors per chunk
  const int nchunks = k / 16;
  // Whether this thread has chunk j. Chunks j < CPT - 1 always exist (launch_fast_as sizes
  // the block so), which spares their code the branch.
  auto has = [&](int j) { return j < CPT - 1 || j * int(blockDim.x) + int(threadIdx.x) < nchunks; };
  float unit = 1.0f;
  for (int g = group; g > 1; g >>= 2) unit *= 0.5f;

  // Each thread stages and later reads back only its own chunks: no barrier needed.
  auto fetch = [&](int64_t row) {
    int b;
    const T* first = normed(SOURCE) ? src.normed_row(int(row), b) : src.x + row * k;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int c = j * blockDim.x + threadIdx.x;
      if (has(j)) {
        const uint4* chunk = reinterpret_cast<const uint4*>(SOURCE == kPartRows ? src.at(row, c * 16) : first + c * 16);
#pragma unroll
        for (int p = 0; p < kVec; ++p) {
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                           static_cast<uint32_t>(__cvta_generic_to_shared(staged + c * kVec + p))),
                       "l"(chunk + p)
                       : "memory");
          if constexpr (SOURCE == kResidualNormedRows) {
            const uint4* branch = reinterpret_cast<const uint4*>(src.branch + row * k + c * 16);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<uint32_t>(
                             __cvta_generic_to_shared(staged + (nchunks + c) * kVec + p))),
                         "l"(branch + p)
                         : "memory");
          }
        }
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };

  __shared__ __align__(16) float partials[2][kMaxThreads / 32];
  if (threadIdx.x < 2 * kMaxThreads / 32) partials[threadIdx.x / 16][threadIdx.x % 16] = 0.0f;  // absent warps
  __syncthreads();

  int64_t row = blockIdx.x;
  if (row < rows) fetch(row);
  for (int parity = 0; row < rows; row += gridDim.x, parity ^= 1) {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    float v[CPT][16];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int c = j * blockDim.x + threadIdx.x;
      if (has(j)) {
#pragma unroll
        for (int p = 0; p < kVec; ++p) vector_to_float<T>(staged[c * kVec + p], v[j] + p * (16 / sizeof(T)));
        if constexpr (SOURCE == kPartRows) {
          if (c * 16 >= src.gelu_from) gelu_chunk<T, 16>(v[j]);
        }
        if constexpr (SOURCE == kResidualNormedRows) {
          float branch[16];
#pragma unroll
          for (int p = 0; p < kVec; ++p) {
            vector_to_float<T>(staged[(nchunks + c) * kVec + p], branch + p * (16 / sizeof(T)));
          }
          add_gated(v[j], branch, src.gate + (int(row) / src.tokens) * src.gate_stride + c * 16);
          store_chunk<T, 16>(src.sum + row * k + c * 16, true, v[j]);
        }
      }
    }
    if (row + gridDim.x < rows) fetch(row + gridDim.x);  // in flight during this row's work
    if constexpr (normed(SOURCE)) normalize_modulate<T, CPT>(v, src, int(row) / src.tokens, k, norm_sums, has);

    if (group == 256) {
      // Chunk c = j * blockDim + tid: a warp's 32 chunks are two whole 256-groups
      // (blockDim is a multiple of 32), and work item c touches only group c / 16,
      // so the stages need only warp-level synchronisation, every row.
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) store_chunk_256(buf, c, v[j]);
      }
      __syncwarp();
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int w = j * blockDim.x + threadIdx.x;
        if (has(j)) stride_64_16_item_256(buf, w);
      }
      __syncwarp();
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) load_chunk_256(buf, c, v[j]);
      }
    } else if (group >= 64) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) smem_store_chunk<16>(buf, c * 16, v[j]);
      }
      strided_passes(buf, k, group);
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) smem_load_chunk<16>(buf, c * 16, v[j]);
      }
    }
    // The stages of strides 4 and 1; the exact 2^-log4(g) scaling is applied here
    // for kRotate and folded into the quantizer's reciprocal otherwise.
#pragma unroll
    for (int j = 0; j < CPT; ++j) finish_chunk<16>(v[j], group, MODE == kRotate ? unit : 1.0f);

    if constexpr (MODE == kRotate) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) store_chunk<T, 16>(static_cast<T*>(out) + row * k + c * 16, true, v[j]);
      }
    } else {
      constexpr float qmax = MODE == kQuant4 ? 7.0f : 127.0f;
      float amax = 0.0f;  // of the unscaled values; NaN if any value is NaN
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (has(j)) {
#pragma unroll
          for (int q = 0; q < 16; ++q) amax = max_abs_nan(v[j][q], amax);
        }
      }
      amax = block_max_nan(amax, partials, parity) * unit;  // exact scaling
      const bool finite = amax <= FLT_MAX;
      const float scale = finite ? __fdiv_rn(amax, qmax) : __int_as_float(0x7fc00000);
      if (threadIdx.x == 0) scale_out[row] = scale;
      const bool zero = !(scale > 0.0f);
      // v * unit * (1 / scale) with one rounding: unit is a power of two.
      const float inv = __fmul_rn(__frcp_rn(scale), unit);
      const bool exact = !(inv <= FLT_MAX) || inv < 1e-30f;
      constexpr int kCodeBytesNum = MODE == kQuant4 ? 1 : 2;  // bytes per element = num / 2
      uint8_t* qrow = static_cast<uint8_t*>(out) + row * k * kCodeBytesNum / 2;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = j * blockDim.x + threadIdx.x;
        if (has(j)) {
          int q[16];
          if (zero) {
#pragma unroll
            for (int e = 0; e < 16; ++e) q[e] = 0;
          } else {
            quantize_chunk<int(qmax)>(v[j], unit, scale, inv, exact, q);
          }
          store_codes<16, MODE>(qrow + c * 16 * kCodeBytesNum / 2, true, q);
        }
      }
    }
  }
}

template <typename T, int MODE, int CPT, int MIN_BLOCKS, Source SOURCE>
void launch_fast_as(const RowSource& src, int64_t rows, int64_t k, int group, void* out, float* scale,
                    cudaStream_t stream) {
  const int nchunks = int(k / 16);
  const int threads = int(ceil_div(ceil_div(nchunks, CPT), 32)) * 32;
  if ((CPT - 1) * threads > nchunks) throw std::logic_error("row rotation fast path: too few chunks for CPT");
  const size_t words = group == 256 ? size_t(k / 256) * kBlockWords256
                      : group >= 64  ? size_t(ceil_div(int(k), 32)) * 32
                                     : 0;
  const size_t norm_words = normed(SOURCE) ? size_t(k / 8) * 2 : 0;
  const size_t staged_rows = SOURCE == kResidualNormedRows ? 2 : 1;
  const size_t smem = (words + norm_words) * sizeof(float) + staged_rows * size_t(k) * sizeof(T);
  auto kernel = rows_fast_kernel<T, MODE, CPT, MIN_BLOCKS, SOURCE>;
  allow_dynamic_smem(kernel, smem);
  const int64_t resident =
      int64_t(resident_blocks_per_multiprocessor(kernel, threads, smem)) * current_device().multiprocessors;
  const unsigned grid = unsigned(rows < resident ? rows : resident);
  kernel<<<grid, threads, smem, stream>>>(typed<T>(src, k), rows, int(k), group, int(words), out, scale);
  check_launch("row rotation kernel (fast path)");
}

template <typename T, int MODE, int CPT, int MIN_BLOCKS>
void launch_fast(const RowSource& src, int64_t rows, int64_t k, int group, void* out, float* scale,
                 cudaStream_t stream) {
  if constexpr (MODE != kRotate) {  // `rht` rows are always plain
    if (src.residual != nullptr) {
      return launch_fast_as<T, MODE, CPT, MIN_BLOCKS, kResidualNormedRows>(src, rows, k, group, out, scale, stream);
    }
    if (src.norm != nullptr) {
      return launch_fast_as<T, MODE, CPT, MIN_BLOCKS, kNormedRows>(src, rows, k, group, out, scale, stream);
    }
    if (src.x2 != nullptr || src.gelu_from < k) {
      return launch_fast_as<T, MODE, CPT, MIN_BLOCKS, kPartRows>(src, rows, k, group, out, scale, stream);
    }
  }
  launch_fast_as<T, MODE, CPT, MIN_BLOCKS, kPlainRows>(src, rows, k, group, out, scale, stream);
}

// Whether 16-byte vector accesses reach every chunk of these rows (given k % W == 0 and, for
// normed rows, 16-bit elements: strides of 8 elements keep every row 16-byte aligned).
inline bool vectorizable(const RowSource& src, const void* out) {
  if (const NormModulate* n = src.norm) {
    if ((n->x_batch_stride | n->prefix_batch_stride | n->modulation_stride) % 8 != 0 ||
        (n->prefix != nullptr && !aligned16(n->prefix)) || !aligned16(n->scale) || !aligned16(n->shift)) {
      return false;
    }
  }
  if (const GatedResidual* g = src.residual) {
    if (g->gate_stride % 8 != 0 || !aligned16(g->branch) || !aligned16(g->gate) || !aligned16(g->sum)) return false;
  }
  return aligned16(src.x) && (src.x2 == nullptr || aligned16(src.x2)) && aligned16(out);
}

// Whether the fast path takes these rows; it needs 16-byte vectors throughout.
inline bool fast_path_applies(const RowSource& src, int64_t k, const void* out) {
  const int64_t max_chunks = kFastMaxChunksPerThread * two_block_threads(kFastMaxChunksPerThread);
  return k % 16 == 0 && k / 16 <= max_chunks && vectorizable(src, out);
}

// Chunks per thread: at least 2 (amortises the per-row reduction over more
// elements), as few as fit two resident blocks per SM; 1 for short rows.
template <typename T, int MODE>
void launch_fast_any(const RowSource& src, int64_t rows, int64_t k, int group, void* out, float* scale,
                     cudaStream_t stream) {
  const int64_t nchunks = k / 16;
  if (nchunks <= 2 * two_block_threads(2) && nchunks >= 128) {
    return launch_fast<T, MODE, 2, 2>(src, rows, k, group, out, scale, stream);
  }
  if (nchunks < 128) return launch_fast<T, MODE, 1, 1>(src, rows, k, group, out, scale, stream);
  if (nchunks <= 3 * two_block_threads(3)) return launch_fast<T, MODE, 3, 2>(src, rows, k, group, out, scale, stream);
  return launch_fast<T, MODE, 4, 2>(src, rows, k, group, out, scale, stream);
}

// The widest chunk (16, 4, 2 or 1 elements) that divides k; 16 and 4 are
// multiples of every group size they serve (group <= 4 needs W >= 4 only).
inline int chunk_width(int64_t k) {
  if (k % 16 == 0) return 16;
  if (k % 4 == 0) return 4;
  if (k % 2 == 0) return 2;
  return 1;
}

template <typename T, int W, int MODE>
void launch_typed(const RowSource& src, int64_t rows, int64_t k, int group, void* out, float* scale,
                  cudaStream_t stream) {
  const int seg_len = int(k < kMaxStaged ? k : kMaxStaged);
  const int chunks = seg_len / W;
  const int threads = chunks >= kMaxThreads ? kMaxThreads : int(ceil_div(chunks, 32)) * 32;
  const size_t smem = size_t(ceil_div(seg_len, 32)) * 32 * sizeof(float);
  auto kernel = rows_kernel<T, W, MODE>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<dim3(unsigned(rows)), threads, smem, stream>>>(typed<T>(src, k), k, group, seg_len,
                                                          vectorizable(src, out), out, scale);
  check_launch("row rotation kernel");
}

template <typename T, int MODE>
void launch_width(const RowSource& src, int64_t rows, int64_t k, int group, void* out, float* scale,
                  cudaStream_t stream) {
  if (fast_path_applies(src, k, out)) return launch_fast_any<T, MODE>(src, rows, k, group, out, scale, stream);
  switch (chunk_width(k)) {
    case 16: return launch_typed<T, 16, MODE>(src, rows, k, group, out, scale, stream);
    case 4: return launch_typed<T, 4, MODE>(src, rows, k, group, out, scale, stream);
    default:
      if constexpr (MODE != kRotate) {  // odd widths occur only without rotation
        if (k % 2 == 0) return launch_typed<T, 2, MODE>(src, rows, k, group, out, scale, stream);
        if constexpr (MODE == kQuant8) return launch_typed<T, 1, MODE>(src, rows, k, group, out, scale, stream);
      }
      throw std::runtime_error("convrot_kernels CUDA: unsupported row width for this primitive");
  }
}

// Rows of `src` (dtype) through the engine; `scale` is null for kRotate.
template <int MODE>
void launch(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, void* out, float* scale,
            void* stream) {
  if (rows > 0x7fffffff) throw std::runtime_error("convrot_kernels CUDA: more than 2^31 - 1 rows");
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case Float::f32: return launch_width<float, MODE>(src, rows, k, group, out, scale, s);
    case Float::f16: return launch_width<__half, MODE>(src, rows, k, group, out, scale, s);
    default: return launch_width<__nv_bfloat16, MODE>(src, rows, k, group, out, scale, s);
  }
}

}  // namespace convrot::cuda::row_rotation
