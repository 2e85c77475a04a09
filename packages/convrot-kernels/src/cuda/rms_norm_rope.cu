// cuda::rms_norm_rope: RMSNorm of each D-element row (one attention head of one token),
// then the pairwise rotary embedding of the token's position; one pass over the rows.
// One warp per row: lane l holds the contiguous pairs [l P, l P + P) in registers (one
// vector access where the layout allows), so the row is read and written once and `out`
// may be `x` itself. The arithmetic is the CPU backend's, operation for operation (no
// contraction into FMAs, the same summation order). (Several rows per warp, to keep more
// bytes in flight, measured no faster on Flux's shapes.)
#include "common.cuh"

namespace convrot::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

// W contiguous elements of a row (W a power of two): all of them through load_chunk, or
// the first `held` one by one.
template <typename T, int W>
__device__ __forceinline__ void load_run(const T* src, int held, bool vec, float (&v)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) v[e] = 0.0f;
  if (held == W) return load_chunk<T, W>(src, vec, v);
#pragma unroll
  for (int e = 0; e < W; ++e) {
    if (e < held) v[e] = to_float(src[e]);
  }
}

// P: pairs per lane (D / 2 <= 32 P); VEC: every lane's run of 2P elements (and of cos/sin)
// is aligned to its size in x, out, cos and sin.
template <typename T, int P, bool VEC>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) rms_norm_rope_kernel(const T* x, HeadStrides xs, T* out,
                                                                          HeadStrides os, NormRope p) {
  constexpr int E = 2 * P;  // elements per lane
  const int lane = threadIdx.x % 32;
  const int64_t h = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
  if (h >= p.heads) return;
  const int64_t s = blockIdx.x, b = blockIdx.z;
  const int64_t first = int64_t(lane) * E;  // this lane's first element of the row
  const int64_t left = p.dim - first;
  const int held = left <= 0 ? 0 : left >= E ? E : int(left);  // elements this lane holds

  float v[E];
  load_run<T, E>(x + b * xs.batch + s * xs.token + h * xs.head + first, held, VEC, v);
  float acc = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc = __fadd_rn(acc, __fmul_rn(v[e], v[e]));  // zeros past `held`
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  const float inv_rms = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc, float(p.dim)), p.eps)));

  const T* weight = static_cast<const T*>(p.weight);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float normed = __fmul_rn(v[e], inv_rms);
    v[e] = round_to<T>(weight != nullptr && e < held ? __fmul_rn(normed, to_float(weight[first + e])) : normed);
  }
  if (p.cos != nullptr) {
    float c[E], sn[E];
    load_run<float, E>(p.cos + s * p.dim + first, held, VEC, c);
    load_run<float, E>(p.sin + s * p.dim + first, held, VEC, sn);
#pragma unroll
    for (int e = 0; e < E; e += 2) {
      const float even = v[e], odd = v[e + 1];
      v[e] = __fsub_rn(__fmul_rn(even, c[e]), __fmul_rn(odd, sn[e]));
      v[e + 1] = __fadd_rn(__fmul_rn(odd, c[e + 1]), __fmul_rn(even, sn[e + 1]));
    }
  }
  T* orow = out + b * os.batch + s * os.token + h * os.head + first;
  if (held == E) {
    store_chunk<T, E>(orow, VEC, v);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (e < held) orow[e] = from_float<T>(v[e]);
    }
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % uint64_t(bytes) == 0; }

template <typename T, int P>
void launch_as(const void* x, HeadStrides xs, void* out, HeadStrides os, const NormRope& p, cudaStream_t stream) {
  constexpr int64_t E = 2 * P;
  const bool vec = p.dim % E == 0 && aligned(x, E * sizeof(T)) && aligned(out, E * sizeof(T)) &&
                   (p.cos == nullptr || (aligned(p.cos, E * 4) && aligned(p.sin, E * 4))) &&
                   xs.batch % E == 0 && xs.token % E == 0 && xs.head % E == 0 && os.batch % E == 0 &&
                   os.token % E == 0 && os.head % E == 0;
  const dim3 grid(unsigned(p.tokens), unsigned(ceil_div<int64_t>(p.heads, kWarpsPerBlock)), unsigned(p.batch));
  const auto* xt = static_cast<const T*>(x);
  auto* ot = static_cast<T*>(out);
  if (vec) {
    rms_norm_rope_kernel<T, P, true><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(xt, xs, ot, os, p);
  } else {
    rms_norm_rope_kernel<T, P, false><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(xt, xs, ot, os, p);
  }
  check_launch("rms_norm_rope kernel");
}

template <typename T>
void launch(const void* x, HeadStrides xs, void* out, HeadStrides os, const NormRope& p, cudaStream_t stream) {
  switch (rms_norm_rope_pairs_per_lane(p.dim)) {
    case 1: return launch_as<T, 1>(x, xs, out, os, p, stream);
    case 2: return launch_as<T, 2>(x, xs, out, os, p, stream);
    case 4: return launch_as<T, 4>(x, xs, out, os, p, stream);
    case 8: return launch_as<T, 8>(x, xs, out, os, p, stream);
    case 16: return launch_as<T, 16>(x, xs, out, os, p, stream);
    default: throw std::runtime_error("convrot_kernels CUDA: rms_norm_rope takes rows of at most 1024 elements");
  }
}

}  // namespace

void rms_norm_rope(const void* x, HeadStrides xs, void* out, HeadStrides os, Float dtype, const NormRope& p,
                   void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return;
  if (p.tokens > 0x7fffffff || p.batch > 65535 || p.heads > 65535 * kWarpsPerBlock) {
    throw std::runtime_error(
        "convrot_kernels CUDA: rms_norm_rope takes fewer than 2^31 tokens, 65536 batches and 524281 heads");
  }
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case Float::f32: return launch<float>(x, xs, out, os, p, s);
    case Float::f16: return launch<__half>(x, xs, out, os, p, s);
    default: return launch<__nv_bfloat16>(x, xs, out, os, p, s);
  }
}

}  // namespace convrot::cuda
