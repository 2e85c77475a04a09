// cuda::rht_quantize: rotation fused with per-row quantization, one pass over the input.
#include "row_rotation.cuh"

namespace convrot::cuda {

namespace {

// The gated residual sum of RowSource::residual, elementwise (the fallback's first step).
template <typename T>
__global__ void gated_residual_kernel(const T* x, NormModulate p, GatedResidual g, int64_t n) {
  const T* branch = static_cast<const T*>(g.branch);
  const T* gate = static_cast<const T*>(g.gate);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.k, j = i % p.k, b = r / p.tokens, s = r % p.tokens;
    const float gated = round_to<T>(__fmul_rn(to_float(gate[b * g.gate_stride + j]), to_float(branch[i])));
    static_cast<T*>(g.sum)[i] = from_float<T>(__fadd_rn(to_float(x[b * p.x_batch_stride + s * p.k + j]), gated));
  }
}

template <typename T>
void gated_residual(const void* x, const NormModulate& p, const GatedResidual& g, cudaStream_t stream) {
  const int64_t n = p.batch * p.tokens * p.k;
  const int64_t blocks = ceil_div<int64_t>(n, 256);
  gated_residual_kernel<T><<<unsigned(blocks < 8192 ? blocks : 8192), 256, 0, stream>>>(static_cast<const T*>(x), p,
                                                                                        g, n);
  check_launch("gated residual kernel");
}

template <int MODE>
void quantize_rows(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, void* q, float* scale,
                   void* stream) {
  if (src.norm == nullptr || row_rotation::fast_path_applies(src, k, q)) {
    return row_rotation::launch<MODE>(src, dtype, rows, k, group, q, scale, stream);
  }
  // Normed rows the fast path cannot hold (a width or alignment it does not take): the norm's
  // output (and before it a residual sum) through memory, then plain rows. The same values,
  // so the same codes.
  const size_t bytes = size_t(rows) * size_t(k) * (dtype == Float::f32 ? 4 : 2);
  const cudaStream_t s = as_stream(stream);
  const void* x = src.x;
  NormModulate norm = *src.norm;
  if (const GatedResidual* g = src.residual) {  // the sum first, then the norm of it
    switch (dtype) {
      case Float::f32: gated_residual<float>(x, norm, *g, s); break;
      case Float::f16: gated_residual<__half>(x, norm, *g, s); break;
      default: gated_residual<__nv_bfloat16>(x, norm, *g, s);
    }
    x = g->sum;
    norm.x_batch_stride = norm.tokens * k;
  }
  void* normed = nullptr;
  check(cudaMallocAsync(&normed, bytes, s), "cudaMallocAsync");
  layer_norm_modulate(x, normed, dtype, norm, stream);
  row_rotation::launch<MODE>(RowSource{normed, nullptr, k, k}, dtype, rows, k, group, q, scale, stream);
  check(cudaFreeAsync(normed, s), "cudaFreeAsync");
}

}  // namespace

void rht_quantize(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, int bits, void* q,
                  float* scale, void* stream) {
  if (rows == 0) return;
  if (bits == 4) {
    quantize_rows<row_rotation::kQuant4>(src, dtype, rows, k, group, q, scale, stream);
  } else {
    quantize_rows<row_rotation::kQuant8>(src, dtype, rows, k, group, q, scale, stream);
  }
}

}  // namespace convrot::cuda
