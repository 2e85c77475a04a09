// cuda::attention_8bit_prepass and cuda::attention_8bit (docs/format.md, attention_8bit).
//
// The pre-pass writes the CPU backend's bytes: the same butterflies (common.cuh's h4, then the exact
// 2^-3 scaling), IEEE divisions and round-half-even, and the one fp32 -> e4m3 converter
// (fp8_e4m3.h). Simple kernels (not fused into the attention, nor into rms_norm_rope):
//   - q, then k: one block of 128 threads per (128-row block, bh), a thread per row, its D values
//     in registers: rotate, amax (per row for q; reduced over the block for k), codes.
//   - v scales: per-channel amaxes of each block of 128 keys, folded by atomicMax, then / 448.
//   - v codes: one block per (128-key block, bh): codes staged in shared memory [128 keys][D], written
//     transposed, keys permuted within groups of 32.
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

constexpr int kBlock = 128;  // rows per pre-pass block (= the attention's key block, sk's block)
constexpr int kGroup = 64;   // the rotation's order
constexpr float kQmax = 127.0f;
constexpr float kE4m3Max = 448.0f;
constexpr int kNaNBits = 0x7fc00000;  // the CPU backend's NaN scale (std::numeric_limits<float>::quiet_NaN())

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

// One butterfly stage of stride S over a group of 64 (the CPU's order: bases ascending, then j).
template <int S>
__device__ __forceinline__ void rotation_stage(float* v) {
#pragma unroll
  for (int base = 0; base < kGroup; base += 4 * S) {
#pragma unroll
    for (int j = base; j < base + S; ++j) h4(v[j], v[j + S], v[j + 2 * S], v[j + 3 * S]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBlock) qk_codes_kernel(const QkJob job, int64_t heads) {
  const int64_t n0 = int64_t(blockIdx.x) * kBlock;
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t n = n0 + threadIdx.x;
  const bool valid = n < job.tokens;

  float v[D];
  bool finite = true;
  float amax = 0.0f;
  if (valid) {
    const T* row = static_cast<const T*>(job.x) + b * job.st.batch + n * job.st.token + h * job.st.head;
    load_chunk<T, D>(row, job.vec, v);
#pragma unroll
    for (int g = 0; g < D; g += kGroup) {
      rotation_stage<16>(v + g);
      rotation_stage<4>(v + g);
      rotation_stage<1>(v + g);
    }
#pragma unroll
    for (int d = 0; d < D; ++d) {
      v[d] = __fmul_rn(v[d], 0.125f);  // 2^-log4(64), exact
      finite = finite && isfinite(v[d]);
      amax = fmaxf(amax, fabsf(v[d]));
    }
  }
  float scale;
  if (job.per_block) {
    __shared__ float warp_amax[kBlock / 32];
    float m = amax;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = m;
    const bool all_finite = __syncthreads_and(finite);
    float block_amax = 0.0f;
#pragma unroll
    for (int w = 0; w < kBlock / 32; ++w) block_amax = fmaxf(block_amax, warp_amax[w]);
    scale = all_finite ? __fdiv_rn(block_amax, kQmax) : __int_as_float(kNaNBits);
    if (threadIdx.x == 0) job.scales[bh * (job.padded / kBlock) + n0 / kBlock] = scale;
  } else {
    scale = !valid ? 0.0f : finite ? __fdiv_rn(amax, kQmax) : __int_as_float(kNaNBits);
    job.scales[bh * job.padded + n] = scale;
  }
  const bool zero = !valid || !(scale > 0.0f);
  uint32_t packed[D / 4];
#pragma unroll
  for (int w = 0; w < D / 4; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float r = zero ? 0.0f : fminf(fmaxf(rintf(__fdiv_rn(v[4 * w + e], scale)), -kQmax), kQmax);
      word |= uint32_t(uint8_t(int8_t(r))) << (8 * e);
    }
    packed[w] = word;
  }
  uint4* dst = reinterpret_cast<uint4*>(job.codes + (bh * job.padded + n) * D);
#pragma unroll
  for (int p = 0; p < D / 16; ++p) dst[p] = make_uint4(packed[4 * p], packed[4 * p + 1], packed[4 * p + 2], packed[4 * p + 3]);
}

// The v channels' amax: each block of 128 keys of head bh folds its per-channel amax into amax_bits
// (sv's storage, zeroed first) by an integer atomicMax, exact for non-negative floats; a non-finite
// value contributes the NaN 0x7fc00000, above every finite float's bits. Threads: D channels x
// (256 / D) token lanes (coalesced rows).
template <typename T, int D>
__global__ void __launch_bounds__(256) v_amax_kernel(const T* v, HeadStrides st, int64_t heads, int64_t tokens,
                                                     int* amax_bits) {
  constexpr int kLanes = 256 / D;
  __shared__ int lane_bits[kLanes][D];
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t n0 = int64_t(blockIdx.x) * kBlock;
  const T* head = v + b * st.batch + h * st.head;
  const int c = threadIdx.x % D, lane = threadIdx.x / D;
  float amax = 0.0f;
  bool finite = true;
  for (int64_t n = n0 + lane; n < n0 + kBlock && n < tokens; n += kLanes) {
    const float x = to_float(head[n * st.token + c]);
    finite = finite && isfinite(x);
    amax = fmaxf(amax, fabsf(x));
  }
  lane_bits[lane][c] = finite ? __float_as_int(amax) : kNaNBits;
  __syncthreads();
  if (lane == 0) {
    int bits = lane_bits[0][c];
    for (int l = 1; l < kLanes; ++l) bits = max(bits, lane_bits[l][c]);
    atomicMax(amax_bits + bh * D + c, bits);
  }
}

// sv = amax / 448 in place (the NaN written as the CPU's 0x7fc00000, not the GPU's canonical NaN).
__global__ void v_scales_kernel(float* sv, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int bits = __float_as_int(sv[i]);
  sv[i] = bits == kNaNBits ? __int_as_float(kNaNBits) : __fdiv_rn(sv[i], kE4m3Max);
}

// The codes of one block of 128 keys of head bh: staged key-major in shared memory (coalesced reads of
// v's rows), then written transposed with the keys permuted: the stored position k (0..31) of a 32-key
// group holds key attention_key_of(k) (primitives.h), four positions (4 bytes) a thread.
template <typename T, int D>
__global__ void __launch_bounds__(256) v_codes_kernel(const T* v, HeadStrides st, int64_t heads, int64_t tokens,
                                                      int64_t padded, const float* sv, uint8_t* vt8) {
  constexpr int kThreads = 256;
  __shared__ float scale[D];
  __shared__ uint8_t tile[kBlock][D + 4];  // a row of D + 4 bytes: the transposed reads spread over the banks
  const int64_t bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int64_t n0 = int64_t(blockIdx.x) * kBlock;
  const T* head = v + b * st.batch + h * st.head;
  if (threadIdx.x < D) scale[threadIdx.x] = sv[bh * D + threadIdx.x];
  __syncthreads();
  for (int i = threadIdx.x; i < kBlock * D; i += kThreads) {
    const int r = i / D, c = i % D;
    const int64_t n = n0 + r;
    uint8_t code = 0;
    if (n < tokens && scale[c] > 0.0f) code = float_to_e4m3(__fdiv_rn(to_float(head[n * st.token + c]), scale[c]));
    tile[r][c] = code;
  }
  __syncthreads();
  uint32_t* out = reinterpret_cast<uint32_t*>(vt8 + bh * D * padded + n0);
  for (int i = threadIdx.x; i < D * kBlock / 4; i += kThreads) {
    const int c = i / (kBlock / 4), pos = 4 * (i % (kBlock / 4));
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = (pos + e) % 32, g = (pos + e) / 32;
      word |= uint32_t(tile[32 * g + attention_key_of(k)][c]) << (8 * e);
    }
    out[int64_t(c) * (padded / 4) + i % (kBlock / 4)] = word;
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
  const QkJob q{in.q, in.qs, in.q_tokens, nq, codes.q8, codes.sq, false, rows_aligned16<T>(in.q, in.qs)};
  const QkJob k{in.k, in.ks, in.kv_tokens, nkv, codes.k8, codes.sk, true, rows_aligned16<T>(in.k, in.ks)};
  qk_codes_kernel<T, D><<<dim3(unsigned(nq / kBlock), unsigned(bh)), kBlock, 0, stream>>>(q, in.heads);
  check_launch("attention_8bit pre-pass (q)");
  qk_codes_kernel<T, D><<<dim3(unsigned(nkv / kBlock), unsigned(bh)), kBlock, 0, stream>>>(k, in.heads);
  check_launch("attention_8bit pre-pass (k)");
  const T* v = static_cast<const T*>(in.v);
  check(cudaMemsetAsync(codes.sv, 0, size_t(bh * D) * sizeof(float), stream), "attention_8bit pre-pass (sv)");
  v_amax_kernel<T, D><<<dim3(unsigned(nkv / kBlock), unsigned(bh)), 256, 0, stream>>>(
      v, in.vs, in.heads, in.kv_tokens, reinterpret_cast<int*>(codes.sv));
  check_launch("attention_8bit pre-pass (v amax)");
  v_scales_kernel<<<unsigned(ceil_div<int64_t>(bh * D, 256)), 256, 0, stream>>>(codes.sv, bh * D);
  check_launch("attention_8bit pre-pass (v scales)");
  const dim3 v_grid(unsigned(nkv / kBlock), unsigned(bh));
  v_codes_kernel<T, D><<<v_grid, 256, 0, stream>>>(v, in.vs, in.heads, in.kv_tokens, nkv, codes.sv, codes.vt8);
  check_launch("attention_8bit pre-pass (v codes)");
}

[[noreturn]] void fail(const std::string& why) { throw std::runtime_error("convrot_kernels attention_8bit: " + why); }

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
  attention_8bit_prepass(shape, dtype, codes, stream);
  Attention8bit a;
  a.batch_heads = shape.batch * shape.heads;
  a.heads = shape.heads;
  a.q_tokens = shape.q_tokens;
  a.kv_tokens = shape.kv_tokens;
  a.dim = shape.dim;
  a.q8 = codes.q8;
  a.sq = codes.sq;
  a.k8 = codes.k8;
  a.sk = codes.sk;
  a.vt8 = codes.vt8;
  a.sv = codes.sv;
  a.scale_log2 = scale_log2;
  a.out = out;
  a.out_batch = os.batch;
  a.out_token = os.token;
  a.out_head = os.head;
  a.out_bf16 = dtype == Float::bf16;
  attention_8bit_sm90(a, stream);  // checks the device (sm_90) and the shape
}

}  // namespace convrot::cuda
