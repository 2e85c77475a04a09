// cuda::layer_norm_modulate: LayerNorm without affine, then AdaLN's modulation, one thread
// block per row. Thread t holds the 8-element chunks t, t + T, ... of the row and of the
// modulation vectors (in registers for up to 4 chunks a thread, else read again for each
// pass), all loaded before the first reduction, so the row is read once and written once.
// A row of a Flux single block comes from the text or the image tensor by its token, so the
// joint sequence is never concatenated. The arithmetic is the CPU backend's, operation for
// operation: two-pass mean and variance in the summation order of primitives.h (chunk sums
// in shared memory, added up by one warp), no contraction into FMAs, each modulation step
// rounded to the dtype.
#include "common.cuh"

namespace convrot::cuda {

namespace {

constexpr int kMaxThreads = 1024;

// Elements [j, j + 8) of a row of k, zeros past k.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t j, int64_t k, bool vec, float (&v)[8]) {
  if (j + 8 <= k) return load_chunk<T, 8>(row + j, vec, v);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = j + e < k ? to_float(row[j + e]) : 0.0f;
}

// The sum of the chunk sums sums[0, chunks) in primitives.h's order, for every thread: lane l
// of warp 0 adds sums l, l + 32, ... in order, then the lanes meet in an XOR butterfly.
__device__ __forceinline__ float row_total(float* sums, int chunks) {
  __syncthreads();
  if (threadIdx.x < 32) {
    float acc = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += 32) acc = __fadd_rn(acc, sums[c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
    if (threadIdx.x == 0) sums[chunks] = acc;
  }
  __syncthreads();
  return sums[chunks];
}

// CH: chunks per thread kept in registers; 0: none, every pass reads the row again.
// VEC: 16-byte accesses reach every whole chunk.
template <typename T, int CH>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_modulate_kernel(const T* x, T* out, NormModulate p,
                                                                          bool vec) {
  extern __shared__ float sums[];  // [chunks] chunk sums, then the row's total
  const int64_t r = blockIdx.x, k = p.k;
  const int64_t b = r / p.tokens, s = r % p.tokens;
  const T* row = s < p.prefix_tokens ? static_cast<const T*>(p.prefix) + b * p.prefix_batch_stride + s * k
                                     : x + b * p.x_batch_stride + (s - p.prefix_tokens) * k;
  const T* scale = static_cast<const T*>(p.scale) + b * p.modulation_stride;
  const T* shift = static_cast<const T*>(p.shift) + b * p.modulation_stride;
  const int chunks = int(ceil_div<int64_t>(k, 8));
  const int t = threadIdx.x, threads = blockDim.x;
  const int mine = t < chunks ? (chunks - t + threads - 1) / threads : 0;  // chunks this thread holds

  float v[CH > 0 ? CH : 1][8], sc[CH > 0 ? CH : 1][8], sh[CH > 0 ? CH : 1][8];
  if constexpr (CH > 0) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (i < mine) {
        const int64_t j = 8 * int64_t(t + i * threads);
        load8<T>(row, j, k, vec, v[i]);
        load8<T>(scale, j, k, vec, sc[i]);
        load8<T>(shift, j, k, vec, sh[i]);
      }
    }
  }
  // body(j, elements, scale, shift) for each chunk of this thread, j its first element.
  auto each_chunk = [&](auto&& body) {
    if constexpr (CH > 0) {
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        if (i < mine) body(8 * int64_t(t + i * threads), v[i], sc[i], sh[i]);
      }
    } else {
      for (int i = 0; i < mine; ++i) {
        const int64_t j = 8 * int64_t(t + i * threads);
        load8<T>(row, j, k, vec, v[0]);
        load8<T>(scale, j, k, vec, sc[0]);
        load8<T>(shift, j, k, vec, sh[0]);
        body(j, v[0], sc[0], sh[0]);
      }
    }
  };

  each_chunk([&](int64_t j, const float(&e)[8], const float(&)[8], const float(&)[8]) {
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (j + q < k) acc = __fadd_rn(acc, e[q]);
    }
    sums[j / 8] = acc;
  });
  const float mean = __fdiv_rn(row_total(sums, chunks), float(k));
  each_chunk([&](int64_t j, const float(&e)[8], const float(&)[8], const float(&)[8]) {
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float d = __fsub_rn(e[q], mean);
      if (j + q < k) acc = __fadd_rn(acc, __fmul_rn(d, d));
    }
    sums[j / 8] = acc;
  });
  const float rstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(row_total(sums, chunks), float(k)), p.eps)));

  T* orow = out + r * k;
  each_chunk([&](int64_t j, const float(&e)[8], const float(&scl)[8], const float(&sft)[8]) {
    float o[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float normed = round_to<T>(__fmul_rn(__fsub_rn(e[q], mean), rstd));
      const float scaled = round_to<T>(__fmul_rn(normed, round_to<T>(__fadd_rn(1.0f, scl[q]))));
      o[q] = __fadd_rn(scaled, sft[q]);
    }
    if (j + 8 <= k) {
      store_chunk<T, 8>(orow + j, vec, o);
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (j + q < k) orow[j + q] = from_float<T>(o[q]);
      }
    }
  });
}

template <typename T, int CH>
void launch_as(const void* x, void* out, const NormModulate& p, bool vec, int threads, size_t smem,
               cudaStream_t stream) {
  auto kernel = layer_norm_modulate_kernel<T, CH>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<unsigned(p.batch * p.tokens), threads, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(out), p,
                                                                   vec);
  check_launch("layer_norm_modulate kernel");
}

template <typename T>
void launch(const void* x, void* out, const NormModulate& p, cudaStream_t stream) {
  const bool vec = p.k % 8 == 0 && p.modulation_stride % 8 == 0 && p.x_batch_stride % 8 == 0 &&
                   p.prefix_batch_stride % 8 == 0 && aligned16(x) && aligned16(out) &&
                   (p.prefix == nullptr || aligned16(p.prefix)) && aligned16(p.scale) && aligned16(p.shift);
  const int64_t chunks = ceil_div<int64_t>(p.k, 8);
  const int threads = int(chunks < kMaxThreads ? ceil_div<int64_t>(chunks, 32) * 32 : kMaxThreads);
  const int64_t per_thread = ceil_div<int64_t>(chunks, threads);
  const size_t smem = size_t(chunks + 1) * sizeof(float);
  if (per_thread == 1) return launch_as<T, 1>(x, out, p, vec, threads, smem, stream);
  if (per_thread == 2) return launch_as<T, 2>(x, out, p, vec, threads, smem, stream);
  if (per_thread <= 4) return launch_as<T, 4>(x, out, p, vec, threads, smem, stream);
  launch_as<T, 0>(x, out, p, vec, threads, smem, stream);
}

}  // namespace

void layer_norm_modulate(const void* x, void* out, Float dtype, const NormModulate& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.k == 0) return;
  if (p.batch * p.tokens > 0x7fffffff || p.k > kLayerNormModulateMaxK) {
    throw std::runtime_error("convrot_kernels CUDA: layer_norm_modulate takes fewer than 2^31 rows of at most 262144");
  }
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case Float::f32: return launch<float>(x, out, p, s);
    case Float::f16: return launch<__half>(x, out, p, s);
    default: return launch<__nv_bfloat16>(x, out, p, s);
  }
}

}  // namespace convrot::cuda
