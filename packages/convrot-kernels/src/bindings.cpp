// Python bindings of the primitives. Every output is allocated by the caller
// (destination passing), so this module never allocates device memory and never
// links libtorch. The Python package (convrot_kernels/_validation.py and the op
// modules) checks every argument once, with messages that name it; the entries here
// trust those checks. Hot-path entries take raw data pointers, because converting a
// tensor through DLPack costs microseconds, a large part of an eager layer's host time;
// the others take DLPack arrays. `device` is the operands' CUDA device, or -1 for the CPU:
// a CUDA entry makes it current for the launch (DeviceScope) and enqueues on `stream`.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fp8_e4m3.h"
#include "primitives.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::c_contig>;

namespace convrot {
namespace {

constexpr int kCpu = -1;

// A call of the CUDA backend, which a build without it lacks (dispatch refuses CUDA devices there).
#ifdef CONVROT_WITH_CUDA
#define CONVROT_CUDA_CALL(call) cuda::call
#else
#define CONVROT_CUDA_CALL(call) (void)0
#endif

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Runs on_cpu() with the GIL released for the CPU, or on_cuda() on `device`.
template <typename Cpu, typename Cuda>
void dispatch(int device, Cpu on_cpu, Cuda on_cuda) {
  if (device == kCpu) {
    nb::gil_scoped_release release;
    on_cpu();
    return;
  }
#ifdef CONVROT_WITH_CUDA
  cuda::DeviceScope scope(device);
  on_cuda();
#else
  (void)on_cuda;
  throw std::invalid_argument("convrot_kernels was built without its CUDA backend");
#endif
}

int device_of(const Array& a) { return a.device_type() == nb::device::cpu::value ? kCpu : int(a.device_id()); }

int64_t rows_of(const Array& a) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < a.ndim(); ++d) rows *= int64_t(a.shape(d));
  return rows;
}

void rht(Array x, Array out, int dtype, int group, uintptr_t stream) {
  const Float kind = Float(dtype);
  const int64_t k = int64_t(x.shape(x.ndim() - 1)), rows = rows_of(x);
  dispatch(
      device_of(x), [&] { cpu::rht(x.data(), out.data(), kind, rows, k, group); },
      [&] { CONVROT_CUDA_CALL(rht(x.data(), out.data(), kind, rows, k, group, as_stream(stream))); });
}

// The row source of x [M, x_k] followed by x2 [M, k - x_k] (x2 0: x_k == k), GELU from column
// gelu_from (negative: none); the layout rules of primitives.h's RowSource.
RowSource row_source(uintptr_t x, uintptr_t x2, int64_t x_k, int64_t k, int64_t gelu_from) {
  return RowSource{as_pointer<const void>(x), as_pointer<const void>(x2), x_k, gelu_from < 0 ? k : gelu_from};
}

void run_rht_quantize(const RowSource& src, Float dtype, int64_t m, int64_t k, int group, int bits, void* q,
                      float* scale, int device, uintptr_t stream) {
  dispatch(
      device, [&] { cpu::rht_quantize(src, dtype, m, k, group, bits, q, scale); },
      [&] { CONVROT_CUDA_CALL(rht_quantize(src, dtype, m, k, group, bits, q, scale, as_stream(stream))); });
}

void run_gemm(uintptr_t qa, uintptr_t sa, uintptr_t qw, uintptr_t sw, uintptr_t bias, uintptr_t out, Float dtype,
              int64_t m, int64_t n, int64_t k, GemmCodes codes, int device, uintptr_t stream) {
  const void *a = as_pointer<const void>(qa), *w = as_pointer<const void>(qw);
  const float *a_scale = as_pointer<const float>(sa), *w_scale = as_pointer<const float>(sw);
  const float* b = as_pointer<const float>(bias);
  void* y = as_pointer<void>(out);
  dispatch(
      device, [&] { cpu::gemm(a, a_scale, w, w_scale, b, y, dtype, m, n, k, codes); },
      [&] { CONVROT_CUDA_CALL(gemm(a, a_scale, w, w_scale, b, y, dtype, m, n, k, codes, as_stream(stream))); });
}

// group 0 quantizes without rotating; x2 0: the row is x alone.
void rht_quantize(uintptr_t x, int x_dtype, int64_t m, int64_t x_k, uintptr_t x2, int64_t k, int64_t gelu_from,
                  int group, int bits, uintptr_t q, uintptr_t scale, int device, uintptr_t stream) {
  run_rht_quantize(row_source(x, x2, x_k, k, gelu_from), Float(x_dtype), m, k, group, bits, as_pointer<void>(q),
                   as_pointer<float>(scale), device, stream);
}

// The code scheme of a GEMM (docs/format.md): weight and activation widths, and the multipliers of
// group-scaled 4-bit weights, uint8 [N, K / 64] (0: none).
GemmCodes gemm_codes(int weight_bits, int act_bits, uintptr_t group_scale) {
  return GemmCodes{weight_bits, act_bits, as_pointer<const uint8_t>(group_scale)};
}

// bias 0: no bias.
void gemm(uintptr_t qa, uintptr_t sa, uintptr_t qw, uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dtype,
          int64_t m, int64_t n, int64_t k, int weight_bits, int act_bits, uintptr_t group_scale, int device,
          uintptr_t stream) {
  run_gemm(qa, sa, qw, sw, bias, out, Float(out_dtype), m, n, k, gemm_codes(weight_bits, act_bits, group_scale),
           device, stream);
}

// A quantized layer: rht_quantize of the input rows to act_bits codes into q / q_scale, then the
// GEMM with the weight codes into out (in the input's dtype), in one call.
void linear(uintptr_t x, int x_dtype, int64_t m, int64_t x_k, uintptr_t x2, int64_t k, int64_t gelu_from, int group,
            int weight_bits, int act_bits, uintptr_t group_scale, uintptr_t q, uintptr_t q_scale, uintptr_t qw,
            uintptr_t sw, uintptr_t bias, uintptr_t out, int64_t n, int device, uintptr_t stream) {
  const Float dtype = Float(x_dtype);
  run_rht_quantize(row_source(x, x2, x_k, k, gelu_from), dtype, m, k, group, act_bits, as_pointer<void>(q),
                   as_pointer<float>(q_scale), device, stream);
  run_gemm(q, q_scale, qw, sw, bias, out, dtype, m, n, k, gemm_codes(weight_bits, act_bits, group_scale), device,
           stream);
}

// Rows of [batch, tokens, heads, dim] at the given element strides (the last dimension
// contiguous); weight, cos and sin 0: absent (cos and sin go together).
void rms_norm_rope(uintptr_t x, int64_t x_batch, int64_t x_token, int64_t x_head, uintptr_t out, int64_t out_batch,
                   int64_t out_token, int64_t out_head, int dtype, int64_t batch, int64_t tokens, int64_t heads,
                   int64_t dim, uintptr_t weight, uintptr_t cos, uintptr_t sin, float eps, int device,
                   uintptr_t stream) {
  const Float kind = Float(dtype);
  const HeadStrides xs{x_batch, x_token, x_head}, os{out_batch, out_token, out_head};
  const NormRope p{batch, tokens, heads, dim, as_pointer<const void>(weight), as_pointer<const float>(cos),
                   as_pointer<const float>(sin), eps};
  const void* in = as_pointer<const void>(x);
  void* y = as_pointer<void>(out);
  dispatch(
      device, [&] { cpu::rms_norm_rope(in, xs, y, os, kind, p); },
      [&] { CONVROT_CUDA_CALL(rms_norm_rope(in, xs, y, os, kind, p, as_stream(stream))); });
}

// The NormModulate of the norm entries; prefix 0: every row comes from x (prefix_tokens 0).
NormModulate norm_modulate(int64_t batch, int64_t tokens, int64_t prefix_tokens, int64_t k, int64_t x_batch_stride,
                           uintptr_t prefix, int64_t prefix_batch_stride, uintptr_t scale, uintptr_t shift,
                           int64_t modulation_stride, float eps) {
  return NormModulate{batch,
                      tokens,
                      prefix_tokens,
                      k,
                      x_batch_stride,
                      prefix_batch_stride,
                      as_pointer<const void>(prefix),
                      as_pointer<const void>(scale),
                      as_pointer<const void>(shift),
                      modulation_stride,
                      eps};
}

void layer_norm_modulate(uintptr_t x, uintptr_t out, int dtype, int64_t batch, int64_t tokens, int64_t prefix_tokens,
                         int64_t k, int64_t x_batch_stride, uintptr_t prefix, int64_t prefix_batch_stride,
                         uintptr_t scale, uintptr_t shift, int64_t modulation_stride, float eps, int device,
                         uintptr_t stream) {
  const Float kind = Float(dtype);
  const NormModulate p = norm_modulate(batch, tokens, prefix_tokens, k, x_batch_stride, prefix, prefix_batch_stride,
                                       scale, shift, modulation_stride, eps);
  const void* in = as_pointer<const void>(x);
  void* y = as_pointer<void>(out);
  dispatch(
      device, [&] { cpu::layer_norm_modulate(in, y, kind, p); },
      [&] { CONVROT_CUDA_CALL(layer_norm_modulate(in, y, kind, p, as_stream(stream))); });
}

// rht_quantize of layer_norm_modulate's output rows (batch * tokens of them), which never go
// to memory; q and q_scale as rht_quantize's.
void layer_norm_modulate_rht_quantize(uintptr_t x, int dtype, int64_t batch, int64_t tokens, int64_t prefix_tokens,
                                      int64_t k, int64_t x_batch_stride, uintptr_t prefix,
                                      int64_t prefix_batch_stride, uintptr_t scale, uintptr_t shift,
                                      int64_t modulation_stride, float eps, int group, int bits, uintptr_t q,
                                      uintptr_t q_scale, int device, uintptr_t stream) {
  const NormModulate p = norm_modulate(batch, tokens, prefix_tokens, k, x_batch_stride, prefix, prefix_batch_stride,
                                       scale, shift, modulation_stride, eps);
  RowSource src{as_pointer<const void>(x), nullptr, k, k};
  src.norm = &p;
  run_rht_quantize(src, Float(dtype), batch * tokens, k, group, bits, as_pointer<void>(q), as_pointer<float>(q_scale),
                   device, stream);
}

// The same for the norm of x + gate * branch (GatedResidual; no prefix), whose rows are also written to sum.
void residual_layer_norm_modulate_rht_quantize(uintptr_t x, int dtype, int64_t batch, int64_t tokens, int64_t k,
                                               int64_t x_batch_stride, uintptr_t branch, uintptr_t gate,
                                               int64_t gate_stride, uintptr_t sum, uintptr_t scale, uintptr_t shift,
                                               int64_t modulation_stride, float eps, int group, int bits, uintptr_t q,
                                               uintptr_t q_scale, int device, uintptr_t stream) {
  const NormModulate p = norm_modulate(batch, tokens, 0, k, x_batch_stride, 0, 0, scale, shift, modulation_stride, eps);
  const GatedResidual g{as_pointer<const void>(branch), as_pointer<const void>(gate), gate_stride,
                        as_pointer<void>(sum)};
  RowSource src{as_pointer<const void>(x), nullptr, k, k};
  src.norm = &p;
  src.residual = &g;
  run_rht_quantize(src, Float(dtype), batch * tokens, k, group, bits, as_pointer<void>(q), as_pointer<float>(q_scale),
                   device, stream);
}

// attention_8bit's operands: q [batch, q_tokens, heads, dim], k and v [batch, kv_tokens, heads, dim]
// at the given element strides (dim contiguous), and its pre-pass buffers (primitives.h's AttentionCodes).
AttentionInputs attention_inputs(uintptr_t q, int64_t q_batch, int64_t q_token, int64_t q_head, uintptr_t k,
                                 int64_t k_batch, int64_t k_token, int64_t k_head, uintptr_t v, int64_t v_batch,
                                 int64_t v_token, int64_t v_head, int64_t batch, int64_t heads, int64_t q_tokens,
                                 int64_t kv_tokens, int64_t dim) {
  return AttentionInputs{batch,
                         heads,
                         q_tokens,
                         kv_tokens,
                         dim,
                         as_pointer<const void>(q),
                         {q_batch, q_token, q_head},
                         as_pointer<const void>(k),
                         {k_batch, k_token, k_head},
                         as_pointer<const void>(v),
                         {v_batch, v_token, v_head}};
}

AttentionCodes attention_codes(uintptr_t q8, uintptr_t sq, uintptr_t k8, uintptr_t sk, uintptr_t vt8, uintptr_t sv) {
  return AttentionCodes{as_pointer<int8_t>(q8), as_pointer<float>(sq),  as_pointer<int8_t>(k8),
                        as_pointer<float>(sk),  as_pointer<uint8_t>(vt8), as_pointer<float>(sv)};
}

// The pre-pass alone (its codes and scales, for tests and inspection).
void attention_8bit_prepass(uintptr_t q, int64_t q_batch, int64_t q_token, int64_t q_head, uintptr_t k,
                            int64_t k_batch, int64_t k_token, int64_t k_head, uintptr_t v, int64_t v_batch,
                            int64_t v_token, int64_t v_head, int dtype, int64_t batch, int64_t heads,
                            int64_t q_tokens, int64_t kv_tokens, int64_t dim, uintptr_t q8, uintptr_t sq,
                            uintptr_t k8, uintptr_t sk, uintptr_t vt8, uintptr_t sv, int device, uintptr_t stream) {
  const AttentionInputs in = attention_inputs(q, q_batch, q_token, q_head, k, k_batch, k_token, k_head, v, v_batch,
                                              v_token, v_head, batch, heads, q_tokens, kv_tokens, dim);
  const AttentionCodes codes = attention_codes(q8, sq, k8, sk, vt8, sv);
  const Float kind = Float(dtype);
  dispatch(
      device, [&] { cpu::attention_8bit_prepass(in, kind, codes); },
      [&] { CONVROT_CUDA_CALL(attention_8bit_prepass(in, kind, codes, as_stream(stream))); });
}

// The pre-pass into the given buffers, then the attention over its codes into out (q's dtype).
void attention_8bit(uintptr_t q, int64_t q_batch, int64_t q_token, int64_t q_head, uintptr_t k, int64_t k_batch,
                    int64_t k_token, int64_t k_head, uintptr_t v, int64_t v_batch, int64_t v_token, int64_t v_head,
                    int dtype, int64_t batch, int64_t heads, int64_t q_tokens, int64_t kv_tokens, int64_t dim,
                    uintptr_t q8, uintptr_t sq, uintptr_t k8, uintptr_t sk, uintptr_t vt8, uintptr_t sv,
                    float scale_log2, uintptr_t out, int64_t out_batch, int64_t out_token, int64_t out_head,
                    int device, uintptr_t stream) {
  const AttentionInputs in = attention_inputs(q, q_batch, q_token, q_head, k, k_batch, k_token, k_head, v, v_batch,
                                              v_token, v_head, batch, heads, q_tokens, kv_tokens, dim);
  const AttentionCodes codes = attention_codes(q8, sq, k8, sk, vt8, sv);
  const Float kind = Float(dtype);
  const HeadStrides os{out_batch, out_token, out_head};
  void* y = as_pointer<void>(out);
  dispatch(
      device,
      [&] {
        cpu::attention_8bit_prepass(in, kind, codes);
        cpu::attention_8bit(in, codes, scale_log2, y, os, kind);
      },
      [&] { CONVROT_CUDA_CALL(attention_8bit(in, codes, scale_log2, y, os, kind, as_stream(stream))); });
}

void pack_int4(Array q, Array packed, uintptr_t stream) {
  const auto* src = static_cast<const int8_t*>(q.data());
  auto* dst = static_cast<uint8_t*>(packed.data());
  const int64_t bytes = int64_t(packed.size());
  dispatch(
      device_of(q), [&] { cpu::pack_int4(src, dst, bytes); },
      [&] { CONVROT_CUDA_CALL(pack_int4(src, dst, bytes, as_stream(stream))); });
}

void unpack_int4(Array packed, Array q, uintptr_t stream) {
  const auto* src = static_cast<const uint8_t*>(packed.data());
  auto* dst = static_cast<int8_t*>(q.data());
  const int64_t bytes = int64_t(packed.size());
  dispatch(
      device_of(packed), [&] { cpu::unpack_int4(src, dst, bytes); },
      [&] { CONVROT_CUDA_CALL(unpack_int4(src, dst, bytes, as_stream(stream))); });
}

// The portable fp32 -> e4m3 conversion both pre-passes use (fp8_e4m3.h), on the CPU, for its tests.
void e4m3_codes(Array x, Array codes) {
  const auto* src = static_cast<const float*>(x.data());
  auto* dst = static_cast<uint8_t*>(codes.data());
  const int64_t n = int64_t(x.size());
  nb::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_e4m3(src[i]);
}

// kernel: "automatic", "small_m", "sm90_persistent", "sm90" or "simt" (checked in Python).
void force_gemm_kernel(const std::string& kernel, int sm90_tile_n) {
#ifdef CONVROT_WITH_CUDA
  using cuda::GemmKernel;
  const GemmKernel choice = kernel == "small_m"           ? GemmKernel::small_m
                            : kernel == "sm90_persistent" ? GemmKernel::sm90_persistent
                            : kernel == "sm90"            ? GemmKernel::sm90
                            : kernel == "simt"            ? GemmKernel::simt
                                                          : GemmKernel::automatic;
  cuda::force_gemm_kernel(choice, sm90_tile_n);
#else
  (void)kernel;
  (void)sm90_tile_n;
#endif
}

nb::dict build_info() {
  nb::dict info;
#ifdef CONVROT_WITH_CUDA
  info["cuda"] = true;
  nb::list archs;
  const std::string spec = CONVROT_CUDA_ARCHS;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t end = spec.find(',', start) == std::string::npos ? spec.size() : spec.find(',', start);
    if (end > start) archs.append(spec.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_archs"] = nb::list();
#endif
  return info;
}

}  // namespace
}  // namespace convrot

NB_MODULE(_C, m) {
  using namespace nb::literals;
  m.doc() = "ConvRot kernel primitives (destination passing, unchecked; see convrot_kernels for the API)";
  // Outputs take no implicit conversion: a converted (copied) output would receive the results and be dropped.
  m.def("rht", &convrot::rht, "x"_a, "out"_a.noconvert(), "dtype"_a, "group_size"_a, "stream"_a);
  m.def("rht_quantize", &convrot::rht_quantize, "x"_a, "x_dtype"_a, "m"_a, "x_k"_a, "x2"_a, "k"_a, "gelu_from"_a,
        "group_size"_a, "bits"_a, "q"_a, "scale"_a, "device"_a, "stream"_a);
  m.def("gemm", &convrot::gemm, "qa"_a, "sa"_a, "qw"_a, "sw"_a, "bias"_a, "out"_a, "out_dtype"_a, "m"_a, "n"_a, "k"_a,
        "weight_bits"_a, "act_bits"_a, "group_scale"_a, "device"_a, "stream"_a);
  m.def("linear", &convrot::linear, "x"_a, "x_dtype"_a, "m"_a, "x_k"_a, "x2"_a, "k"_a, "gelu_from"_a, "group_size"_a,
        "weight_bits"_a, "act_bits"_a, "group_scale"_a, "q"_a, "q_scale"_a, "qw"_a, "sw"_a, "bias"_a, "out"_a, "n"_a,
        "device"_a, "stream"_a);
  m.def("rms_norm_rope", &convrot::rms_norm_rope, "x"_a, "x_batch"_a, "x_token"_a, "x_head"_a, "out"_a,
        "out_batch"_a, "out_token"_a, "out_head"_a, "dtype"_a, "batch"_a, "tokens"_a, "heads"_a, "dim"_a, "weight"_a,
        "cos"_a, "sin"_a, "eps"_a, "device"_a, "stream"_a);
  m.def("layer_norm_modulate", &convrot::layer_norm_modulate, "x"_a, "out"_a, "dtype"_a, "batch"_a, "tokens"_a,
        "prefix_tokens"_a, "k"_a, "x_batch_stride"_a, "prefix"_a, "prefix_batch_stride"_a, "scale"_a, "shift"_a,
        "modulation_stride"_a, "eps"_a, "device"_a, "stream"_a);
  m.def("layer_norm_modulate_rht_quantize", &convrot::layer_norm_modulate_rht_quantize, "x"_a, "dtype"_a, "batch"_a,
        "tokens"_a, "prefix_tokens"_a, "k"_a, "x_batch_stride"_a, "prefix"_a, "prefix_batch_stride"_a, "scale"_a,
        "shift"_a, "modulation_stride"_a, "eps"_a, "group_size"_a, "bits"_a, "q"_a, "q_scale"_a, "device"_a,
        "stream"_a);
  m.def("residual_layer_norm_modulate_rht_quantize", &convrot::residual_layer_norm_modulate_rht_quantize, "x"_a,
        "dtype"_a, "batch"_a, "tokens"_a, "k"_a, "x_batch_stride"_a, "branch"_a, "gate"_a, "gate_stride"_a, "sum"_a,
        "scale"_a, "shift"_a, "modulation_stride"_a, "eps"_a, "group_size"_a, "bits"_a, "q"_a, "q_scale"_a,
        "device"_a, "stream"_a);
  m.def("attention_8bit_prepass", &convrot::attention_8bit_prepass, "q"_a, "q_batch"_a, "q_token"_a, "q_head"_a,
        "k"_a, "k_batch"_a, "k_token"_a, "k_head"_a, "v"_a, "v_batch"_a, "v_token"_a, "v_head"_a, "dtype"_a,
        "batch"_a, "heads"_a, "q_tokens"_a, "kv_tokens"_a, "dim"_a, "q8"_a, "sq"_a, "k8"_a, "sk"_a, "vt8"_a,
        "sv"_a, "device"_a, "stream"_a);
  m.def("attention_8bit", &convrot::attention_8bit, "q"_a, "q_batch"_a, "q_token"_a, "q_head"_a, "k"_a,
        "k_batch"_a, "k_token"_a, "k_head"_a, "v"_a, "v_batch"_a, "v_token"_a, "v_head"_a, "dtype"_a, "batch"_a,
        "heads"_a, "q_tokens"_a, "kv_tokens"_a, "dim"_a, "q8"_a, "sq"_a, "k8"_a, "sk"_a, "vt8"_a, "sv"_a,
        "scale_log2"_a, "out"_a, "out_batch"_a, "out_token"_a, "out_head"_a, "device"_a, "stream"_a);
  m.def("pack_int4", &convrot::pack_int4, "q"_a, "packed"_a.noconvert(), "stream"_a);
  m.def("unpack_int4", &convrot::unpack_int4, "packed"_a, "q"_a.noconvert(), "stream"_a);
  m.def("e4m3_codes", &convrot::e4m3_codes, "x"_a, "codes"_a.noconvert());
  m.def("force_gemm_kernel", &convrot::force_gemm_kernel, "kernel"_a, "sm90_tile_n"_a);
  m.def("build_info", &convrot::build_info);
}
