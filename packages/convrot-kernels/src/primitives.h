// The kernel primitives, one declaration per backend. Each takes raw pointers to
// row-major contiguous buffers that the caller (bindings.cpp) has checked and
// allocated; the numeric contract is docs/format.md.
#pragma once

#include <cstdint>

namespace convrot {

// Element type of a floating-point input or output buffer.
enum class Float { f32, f16, bf16 };

// Where row (b, s, h) of a [B, S, H, D] tensor starts: b * batch + s * token + h * head
// elements from its base; the D elements of a row are contiguous.
struct HeadStrides {
  int64_t batch, token, head;
};

// The shape and parameters of rms_norm_rope (docs/format.md): each row of D elements is
// divided by its root mean square (fp32, eps added to the mean square), multiplied by
// weight [D] (the dtype; null: none), rounded to the dtype (torch.nn.RMSNorm) and, when
// cos and sin (fp32 [S, D]) are given, rotated pairwise (elements 2i, 2i + 1) by position
// s's angles, in fp32, rounded to the dtype.
struct NormRope {
  int64_t batch, tokens, heads, dim;
  const void* weight;
  const float* cos;
  const float* sin;
  float eps;
};

// The layout of rms_norm_rope's mean square, which both backends sum in the same order:
// lane l of 32 adds the squares of elements [2 P l, 2 P (l + 1)) in order, then the 32 lane
// sums meet in an XOR butterfly (offsets 16, 8, 4, 2, 1). P, the pairs a lane holds, is the
// smallest power of two with 64 P >= D.
inline int rms_norm_rope_pairs_per_lane(int64_t dim) {
  int pairs = 1;
  while (64 * int64_t(pairs) < dim) pairs *= 2;
  return pairs;
}

// The shape and parameters of layer_norm_modulate (docs/format.md): `tokens` rows of k
// elements per batch, the first `prefix_tokens` of them read from `prefix`
// [batch, prefix_tokens, k] and the rest from x [batch, tokens - prefix_tokens, k] (the
// joint sequence of a Flux single block, never concatenated in memory). Within a batch the
// rows of x and prefix are contiguous; batches are `x_batch_stride` and
// `prefix_batch_stride` elements apart (slices of a joint sequence are read in place). Each row is
// layer-normalised without affine (fp32, eps added to the variance) and rounded to the
// dtype, then multiplied by (1 + scale[b]) and shifted by shift[b] (rows of k elements in the
// dtype, `modulation_stride` elements apart), each step rounded to the dtype as torch's eager
// ops round it. Mean and variance are summed in one fixed order on both backends: the
// elements of chunk c = j / 8 in order, then chunk c's sum to lane c % 32 of 32, each lane
// adding its chunk sums in order, and the lane sums meet in an XOR butterfly (16, 8, 4, 2, 1).
struct NormModulate {
  int64_t batch, tokens, prefix_tokens, k;
  int64_t x_batch_stride, prefix_batch_stride;
  const void* prefix;
  const void* scale;
  const void* shift;
  int64_t modulation_stride;
  float eps;
};

// The widest row layer_norm_modulate takes (its chunk sums stay in 128 KB of shared memory).
constexpr int64_t kLayerNormModulateMaxK = 262144;

// A gated residual in front of a norm (a DiT block's `x + gate * branch` before its second
// norm): row r of x (as NormModulate lays it out) becomes x + gate[b] * branch[r] (branch
// [rows, k] contiguous, gate rows of k elements `gate_stride` apart, all in the dtype; the
// product and the sum each rounded to the dtype, as torch's eager ops round them), which is
// written to `sum` [rows, k] (contiguous) and is what the norm then reads.
struct GatedResidual {
  const void* branch;
  const void* gate;
  int64_t gate_stride;
  void* sum;
};

// The rows rht_quantize reads, `k` elements each: row r is the concatenation of
// x[r, 0:k1] and x2[r, 0:k-k1] (x2 null when k1 == k), and its elements from
// column gelu_from on (k: none) first pass through GELU, tanh approximation,
// computed in fp32 and rounded to the input dtype. k1 and gelu_from are
// multiples of 16 (the CUDA rows are loaded in chunks of 16). With `norm`, the rows are
// instead those layer_norm_modulate(x, *norm) writes (x its x; x2 null, k1 == gelu_from == k),
// each value rounded to the dtype as it would be stored: the norm's output is rotated and
// quantized without going to memory. With `norm` and `residual` (no prefix), the norm reads
// the gated residual sum of x instead of x, and that sum is written out.
struct RowSource {
  const void* x;
  const void* x2;
  int64_t k1;
  int64_t gelu_from;
  const NormModulate* norm = nullptr;
  const GatedResidual* residual = nullptr;
};

// Codes per multiplier of group-scaled 4-bit weights (docs/format.md).
constexpr int kWeightGroup = 64;

// The code formats of a GEMM's operands (docs/format.md, GEMM): weight and activation widths
// (W4A4, W8A8, W4A8) and, for group-scaled 4-bit weights, their multipliers, uint8
// [n, k / kWeightGroup] in [1, 16]: the weight that enters the int8 product is code x multiplier.
struct GemmCodes {
  int weight_bits;
  int act_bits;
  const uint8_t* group_scale = nullptr;

  static GemmCodes uniform(int bits) { return {bits, bits, nullptr}; }
  bool grouped() const { return group_scale != nullptr; }
  int64_t weight_row_bytes(int64_t k) const { return k * weight_bits / 8; }
  int64_t act_row_bytes(int64_t k) const { return k * act_bits / 8; }
};

// The operands of attention_8bit (docs/format.md): q [batch, q_tokens, heads, dim] and k, v
// [batch, kv_tokens, heads, dim] at the given element strides (dim contiguous), one dtype.
struct AttentionInputs {
  int64_t batch, heads, q_tokens, kv_tokens, dim;
  const void* q;
  HeadStrides qs;
  const void* k;
  HeadStrides ks;
  const void* v;
  HeadStrides vs;
};

// Token counts rounded up to attention_8bit's key block (128): the padded rows of its codes.
constexpr int64_t kAttentionBlock = 128;
constexpr int64_t attention_padded(int64_t tokens) {
  return (tokens + kAttentionBlock - 1) / kAttentionBlock * kAttentionBlock;
}

// attention_8bit's pre-pass outputs (docs/format.md), BH = batch * heads: q8 int8 [BH, Nq_pad, D],
// sq [BH, Nq_pad], k8 int8 [BH, Nkv_pad, D], sk [BH, Nkv_pad / 128], vt8 e4m3 codes [BH, D, Nkv_pad]
// (keys permuted within groups of 32), sv [BH, D].
struct AttentionCodes {
  int8_t* q8;
  float* sq;
  int8_t* k8;
  float* sk;
  uint8_t* vt8;
  float* sv;
};

// The stored position k (0..31) of a group of 32 keys in vt8 holds key attention_key_of(k).
constexpr int attention_key_of(int k) { return 16 * (k / 16) + 8 * ((k % 4) / 2) + 2 * ((k % 16) / 4) + (k % 2); }

namespace cpu {

// out[r, :] = rht(x[r, :], group) for each of `rows` rows of `k` elements.
void rht(const void* x, void* out, Float dtype, int64_t rows, int64_t k, int group);

// Rotates each row of `src` group-wise (group == 0: no rotation), then quantizes
// it to `bits` (4 or 8) per row. q is uint8 [rows, k/2] packed for 4 bits, int8
// [rows, k] for 8 bits; scale is fp32 [rows].
void rht_quantize(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, int bits, void* q,
                  float* scale);

// out[m, n] = (sum_k qa[m, k] w[n, k]) * sa[m] * sw[n] + bias[n], w the decoded weight codes
// (docs/format.md); bias may be null.
void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias,
          void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes);

// Packs pairs of int8 codes in [-8, 7] into bytes (element 2j in the low nibble), and back.
void pack_int4(const int8_t* q, uint8_t* packed, int64_t n_bytes);
void unpack_int4(const uint8_t* packed, int8_t* q, int64_t n_bytes);

// out[b, s, h, :] = rms_norm_rope(x[b, s, h, :]) for every row; out may be x itself.
void rms_norm_rope(const void* x, HeadStrides xs, void* out, HeadStrides os, Float dtype, const NormRope& p);

// attention_8bit's pre-pass: the codes and scales of q, k, v into `codes`.
void attention_8bit_prepass(const AttentionInputs& in, Float dtype, const AttentionCodes& codes);

// attention_8bit over the pre-pass's codes (the reference of the sm_90a kernel's math), out
// [batch, q_tokens, heads, dim] at strides os (dim contiguous) in dtype; scale_log2 = scale * log2(e).
void attention_8bit(const AttentionInputs& shape, const AttentionCodes& codes, float scale_log2, void* out,
                    HeadStrides os, Float dtype);

// out [batch, tokens, k] (contiguous) = layer_norm_modulate of the rows of x and p.prefix.
void layer_norm_modulate(const void* x, void* out, Float dtype, const NormModulate& p);

}  // namespace cpu

#ifdef CONVROT_WITH_CUDA
namespace cuda {

// Same contracts as the CPU backend. Device pointers on the current device (a DeviceScope
// makes it the operands' device); work is enqueued on `stream` (a cudaStream_t of that device)
// and never synchronised. Launch errors throw std::runtime_error.

// Makes `device` the current CUDA device for the scope's lifetime and restores the previous
// one after: the operands' device decides where a kernel runs, not the caller's current device.
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_;
  bool changed_;
};

// The GEMM kernels cuda::gemm can run. `automatic` picks per call (gemm.cu); any other forces
// that kernel for every later call, which throws std::invalid_argument where it cannot run the
// call (tests and benchmarks compare kernels that way).
enum class GemmKernel { automatic, small_m, sm90_persistent, sm90, simt };
void force_gemm_kernel(GemmKernel kernel, int sm90_tile_n);

void rht(const void* x, void* out, Float dtype, int64_t rows, int64_t k, int group, void* stream);
void rht_quantize(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, int bits, void* q,
                  float* scale, void* stream);
void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias,
          void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes, void* stream);
void pack_int4(const int8_t* q, uint8_t* packed, int64_t n_bytes, void* stream);
void unpack_int4(const uint8_t* packed, int8_t* q, int64_t n_bytes, void* stream);
void rms_norm_rope(const void* x, HeadStrides xs, void* out, HeadStrides os, Float dtype, const NormRope& p,
                   void* stream);
void layer_norm_modulate(const void* x, void* out, Float dtype, const NormModulate& p, void* stream);
void attention_8bit_prepass(const AttentionInputs& in, Float dtype, const AttentionCodes& codes, void* stream);
// attention_8bit_prepass of `shape`'s operands into codes, then the sm_90a kernel over them
// (cuda/attention_sm90.h) into out, dtype bf16 or fp16; throws std::runtime_error, before any work,
// on another GPU or a build without sm_90a code.
void attention_8bit(const AttentionInputs& shape, const AttentionCodes& codes, float scale_log2, void* out,
                    HeadStrides os, Float dtype, void* stream);

}  // namespace cuda
#endif

}  // namespace convrot
