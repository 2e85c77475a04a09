// Python bindings of the primitives. Every output is allocated by the caller
// (destination passing), so this module never allocates device memory and never
// links libtorch: tensors arrive through DLPack. The Python package validates
// arguments with readable messages first; the checks here guard the memory
// safety of direct calls.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "primitives.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::c_contig>;

namespace convrot {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw nb::value_error(message.c_str());
}

bool is(const Array& a, nb::dlpack::dtype_code code, int bits) {
  const auto dt = a.dtype();
  return dt.code == uint8_t(code) && dt.bits == bits && dt.lanes == 1;
}

Float float_kind(const Array& a, const char* name) {
  if (is(a, nb::dlpack::dtype_code::Float, 32)) return Float::f32;
  if (is(a, nb::dlpack::dtype_code::Float, 16)) return Float::f16;
  if (is(a, nb::dlpack::dtype_code::Bfloat, 16)) return Float::bf16;
  throw nb::type_error((std::string(name) + " must be float32, float16 or bfloat16").c_str());
}

void require_codes(const Array& q, int bits, const char* name) {
  if (bits == 4) {
    require(is(q, nb::dlpack::dtype_code::UInt, 8), std::string(name) + " must be uint8 (packed int4)");
  } else {
    require(is(q, nb::dlpack::dtype_code::Int, 8), std::string(name) + " must be int8");
  }
}

void require_fp32(const Array& a, const char* name) {
  require(is(a, nb::dlpack::dtype_code::Float, 32), std::string(name) + " must be float32");
}

void require_bits(int bits) { require(bits == 4 || bits == 8, "bits must be 4 or 8"); }

void require_group(int group, int64_t k) {
  require(group >= 4 && group <= 1024 && (group & (group - 1)) == 0 && (__builtin_ctz(group) % 2) == 0,
          "group_size must be a power of 4 between 4 and 1024");
  require(k % group == 0, "the last dimension must be a multiple of group_size");
}

// All arrays on one device; returns true for CUDA, false for CPU.
bool on_cuda(std::initializer_list<const Array*> arrays) {
  const Array& first = **arrays.begin();
  for (const Array* a : arrays) {
    require(a->device_type() == first.device_type() && a->device_id() == first.device_id(),
            "all tensors must be on the same device");
  }
  if (first.device_type() == nb::device::cpu::value) return false;
  require(first.device_type() == nb::device::cuda::value, "tensors must be on the CPU or a CUDA device");
#ifndef CONVROT_WITH_CUDA
  throw nb::value_error("convrot_kernels was built without its CUDA backend");
#endif
  return true;
}

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

int64_t rows_of(const Array& a) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < a.ndim(); ++d) rows *= int64_t(a.shape(d));
  return rows;
}

void rht(Array x, Array out, int group, uintptr_t stream) {
  const Float dtype = float_kind(x, "x");
  require(x.ndim() >= 1 && out.ndim() == x.ndim() && out.size() == x.size() && out.dtype() == x.dtype(),
          "out must have the shape and dtype of x");
  const int64_t k = x.ndim() ? int64_t(x.shape(x.ndim() - 1)) : 1;
  require_group(group, k);
  const int64_t rows = rows_of(x);
  if (x.size() == 0) return;
  if (on_cuda({&x, &out})) {
#ifdef CONVROT_WITH_CUDA
    cuda::rht(x.data(), out.data(), dtype, rows, k, group, as_stream(stream));
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::rht(x.data(), out.data(), dtype, rows, k, group);
  }
}

// The two kernels' dispatch to a backend, shared by the tensor entries (which check their
// arrays first) and the raw-pointer entries (whose Python callers check the tensors).
// group == 0 quantizes without rotating.
void run_rht_quantize(const RowSource& src, Float dtype, int64_t m, int64_t k, int group, int bits, void* q,
                      float* scale, bool cuda, uintptr_t stream) {
  if (m == 0) return;
  if (cuda) {
#ifdef CONVROT_WITH_CUDA
    cuda::rht_quantize(src, dtype, m, k, group, bits, q, scale, as_stream(stream));
#else
    throw nb::value_error("convrot_kernels was built without its CUDA backend");
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::rht_quantize(src, dtype, m, k, group, bits, q, scale);
  }
}

// The row source of x [M, k1] followed by x2 [M, k - k1] (x2 null: k1 == k), GELU from
// column gelu_from (negative: none); the layout rules of primitives.h's RowSource.
RowSource row_source(const void* x, const void* x2, int64_t k1, int64_t k, int64_t gelu_from) {
  require(x2 != nullptr || k1 == k, "without x2 the row is x alone");
  require(x2 == nullptr || k1 % 16 == 0, "with x2, x's width must be a multiple of 16");
  require(gelu_from <= k, "gelu_from must not exceed the row width");
  require(gelu_from < 0 || gelu_from % 16 == 0, "gelu_from must be a multiple of 16");
  return RowSource{x, x2, k1, gelu_from < 0 ? k : gelu_from};
}

void run_gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias, void* out,
              Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes, bool cuda, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  if (cuda) {
#ifdef CONVROT_WITH_CUDA
    cuda::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes, as_stream(stream));
#else
    throw nb::value_error("convrot_kernels was built without its CUDA backend");
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::gemm(qa, sa, qw, sw, bias, out, out_dtype, m, n, k, codes);
  }
}

void rht_quantize(Array x, Array q, Array scale, int group, int bits, uintptr_t stream, std::optional<Array> x2,
                  int64_t gelu_from) {
  const Float dtype = float_kind(x, "x");
  require_bits(bits);
  require(x.ndim() == 2, "x must be 2-D [M, K]");
  const int64_t m = int64_t(x.shape(0)), k1 = int64_t(x.shape(1));
  int64_t k = k1;
  if (x2) {
    require(x2->ndim() == 2 && int64_t(x2->shape(0)) == m && x2->dtype() == x.dtype(),
            "x2 must be 2-D [M, K2] with x's dtype");
    k += int64_t(x2->shape(1));
  }
  const RowSource src = row_source(x.data(), x2 ? x2->data() : nullptr, k1, k, gelu_from);
  if (group != 0) require_group(group, k);
  require(k % 2 == 0 || bits == 8, "K must be even for 4-bit codes");
  require_codes(q, bits, "q");
  require(q.ndim() == 2 && int64_t(q.shape(0)) == m && int64_t(q.shape(1)) == (bits == 4 ? k / 2 : k),
          "q has the wrong shape");
  require_fp32(scale, "scale");
  require(scale.ndim() == 1 && int64_t(scale.shape(0)) == m, "scale must be float32 [M]");
  if (m == 0) return;
  const bool cuda = x2 ? on_cuda({&x, &*x2, &q, &scale}) : on_cuda({&x, &q, &scale});
  run_rht_quantize(src, dtype, m, k, group, bits, q.data(), static_cast<float*>(scale.data()), cuda, stream);
}

// bits: the weights' code width; act_bits the activations' (negative: bits); group_scale the
// multipliers of group-scaled 4-bit weights, uint8 [N, K / 64] (docs/format.md).
void gemm(Array qa, Array sa, Array qw, Array sw, std::optional<Array> bias, Array out, int bits,
          uintptr_t stream, int act_bits, std::optional<Array> group_scale) {
  if (act_bits < 0) act_bits = bits;
  require_bits(bits);
  require_bits(act_bits);
  require(bits == 4 || act_bits == 8, "8-bit weights need 8-bit activations");
  require_codes(qa, act_bits, "qa");
  require_codes(qw, bits, "qw");
  require(qa.ndim() == 2 && qw.ndim() == 2, "qa and qw must be 2-D");
  const int64_t m = int64_t(qa.shape(0)), n = int64_t(qw.shape(0));
  const int64_t k = int64_t(qa.shape(1)) * (act_bits == 4 ? 2 : 1);
  require(int64_t(qw.shape(1)) * (bits == 4 ? 2 : 1) == k, "qa and qw must hold the same K");
  GemmCodes codes{bits, act_bits, nullptr};
  if (group_scale) {
    require(bits == 4, "group scales go with 4-bit weights");
    require(k % kWeightGroup == 0, "group-scaled weights need K a multiple of 64");
    require(is(*group_scale, nb::dlpack::dtype_code::UInt, 8) && group_scale->ndim() == 2 &&
                int64_t(group_scale->shape(0)) == n && int64_t(group_scale->shape(1)) == k / kWeightGroup,
            "group_scale must be uint8 [N, K / 64]");
    codes.group_scale = static_cast<const uint8_t*>(group_scale->data());
  }
  require_fp32(sa, "sa");
  require_fp32(sw, "sw");
  require(sa.ndim() == 1 && int64_t(sa.shape(0)) == m, "sa must be float32 [M]");
  require(sw.ndim() == 1 && int64_t(sw.shape(0)) == n, "sw must be float32 [N]");
  const Float out_dtype = float_kind(out, "out");
  require(out.ndim() == 2 && int64_t(out.shape(0)) == m && int64_t(out.shape(1)) == n, "out must be [M, N]");
  const float* b = nullptr;
  if (bias) {
    require_fp32(*bias, "bias");
    require(bias->ndim() == 1 && int64_t(bias->shape(0)) == n, "bias must be float32 [N]");
    b = static_cast<const float*>(bias->data());
  }
  const bool cuda = bias ? on_cuda({&qa, &sa, &qw, &sw, &*bias, &out}) : on_cuda({&qa, &sa, &qw, &sw, &out});
  if (group_scale) on_cuda({&qa, &*group_scale});
  run_gemm(qa.data(), static_cast<const float*>(sa.data()), qw.data(), static_cast<const float*>(sw.data()), b,
           out.data(), out_dtype, m, n, k, codes, cuda, stream);
}

// ---- raw-pointer entries for hot paths ----
// The Python callers (rht_quantize_into, gemm_into, rms_norm_rope_into, layer_norm_modulate) check dtypes,
// shapes, layouts and devices first: converting each tensor through DLPack costs ~6 us, most of an eager layer's host time.

Float float_code(int code) {
  require(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return Float(code);
}

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// x2 0: the row is x alone; x_k -1: x is k wide.
void rht_quantize_ptr(uintptr_t x, int x_dtype, int64_t m, int64_t k, int group, int bits, uintptr_t q,
                      uintptr_t scale, bool cuda, uintptr_t stream, uintptr_t x2, int64_t x_k, int64_t gelu_from) {
  const Float dtype = float_code(x_dtype);
  require_bits(bits);
  if (group != 0) require_group(group, k);
  const RowSource src =
      row_source(as_pointer<const void>(x), as_pointer<const void>(x2), x_k < 0 ? k : x_k, k, gelu_from);
  run_rht_quantize(src, dtype, m, k, group, bits, as_pointer<void>(q), as_pointer<float>(scale), cuda, stream);
}

// bias 0: no bias.
void gemm_ptr(uintptr_t qa, uintptr_t sa, uintptr_t qw, uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dtype,
              int64_t m, int64_t n, int64_t k, int bits, bool cuda, uintptr_t stream) {
  const Float dtype = float_code(out_dtype);
  require_bits(bits);
  run_gemm(as_pointer<const void>(qa), as_pointer<const float>(sa), as_pointer<const void>(qw),
           as_pointer<const float>(sw), as_pointer<const float>(bias), as_pointer<void>(out), dtype, m, n, k,
           GemmCodes::uniform(bits), cuda, stream);
}

// Rows of [batch, tokens, heads, dim] at the given element strides (the last dimension
// contiguous); weight, cos and sin 0: absent (cos and sin go together).
void rms_norm_rope_ptr(uintptr_t x, int64_t x_batch, int64_t x_token, int64_t x_head, uintptr_t out,
                       int64_t out_batch, int64_t out_token, int64_t out_head, int dtype, int64_t batch,
                       int64_t tokens, int64_t heads, int64_t dim, uintptr_t weight, uintptr_t cos, uintptr_t sin,
                       float eps, bool cuda, uintptr_t stream) {
  const Float kind = float_code(dtype);
  require(batch >= 0 && tokens >= 0 && heads >= 0, "shape must not be negative");
  require(dim >= 2 && dim % 2 == 0 && dim <= 1024, "the head dimension must be even, 2 to 1024");
  require((cos == 0) == (sin == 0), "cos and sin go together");
  const HeadStrides xs{x_batch, x_token, x_head}, os{out_batch, out_token, out_head};
  const NormRope p{batch,
                   tokens,
                   heads,
                   dim,
                   as_pointer<const void>(weight),
                   as_pointer<const float>(cos),
                   as_pointer<const float>(sin),
                   eps};
  if (batch == 0 || tokens == 0 || heads == 0) return;
  if (cuda) {
#ifdef CONVROT_WITH_CUDA
    cuda::rms_norm_rope(as_pointer<const void>(x), xs, as_pointer<void>(out), os, kind, p, as_stream(stream));
#else
    throw nb::value_error("convrot_kernels was built without its CUDA backend");
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::rms_norm_rope(as_pointer<const void>(x), xs, as_pointer<void>(out), os, kind, p);
  }
}

// The NormModulate of the raw-pointer entries, checked; prefix 0: every row comes from x
// (prefix_tokens must be 0).
NormModulate norm_modulate(int64_t batch, int64_t tokens, int64_t prefix_tokens, int64_t k, int64_t x_batch_stride,
                           uintptr_t prefix, int64_t prefix_batch_stride, uintptr_t scale, uintptr_t shift,
                           int64_t modulation_stride, float eps) {
  require(batch >= 0 && tokens >= 0 && k >= 0, "shape must not be negative");
  require(0 <= prefix_tokens && prefix_tokens <= tokens && (prefix != 0 || prefix_tokens == 0),
          "prefix_tokens must be in [0, tokens], and 0 without a prefix");
  require(scale != 0 && shift != 0 && modulation_stride >= k, "scale and shift rows of k elements are required");
  require(x_batch_stride >= 0 && prefix_batch_stride >= 0, "batch strides must not be negative");
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

void layer_norm_modulate_ptr(uintptr_t x, uintptr_t out, int dtype, int64_t batch, int64_t tokens,
                             int64_t prefix_tokens, int64_t k, int64_t x_batch_stride, uintptr_t prefix,
                             int64_t prefix_batch_stride, uintptr_t scale, uintptr_t shift,
                             int64_t modulation_stride, float eps, bool cuda, uintptr_t stream) {
  const Float kind = float_code(dtype);
  const NormModulate p = norm_modulate(batch, tokens, prefix_tokens, k, x_batch_stride, prefix, prefix_batch_stride,
                                       scale, shift, modulation_stride, eps);
  if (batch == 0 || tokens == 0 || k == 0) return;
  if (cuda) {
#ifdef CONVROT_WITH_CUDA
    cuda::layer_norm_modulate(as_pointer<const void>(x), as_pointer<void>(out), kind, p, as_stream(stream));
#else
    throw nb::value_error("convrot_kernels was built without its CUDA backend");
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::layer_norm_modulate(as_pointer<const void>(x), as_pointer<void>(out), kind, p);
  }
}

// rht_quantize of layer_norm_modulate's output rows (batch * tokens of them), which never go
// to memory; q and q_scale as rht_quantize_ptr's.
void layer_norm_modulate_rht_quantize_ptr(uintptr_t x, int dtype, int64_t batch, int64_t tokens,
                                          int64_t prefix_tokens, int64_t k, int64_t x_batch_stride, uintptr_t prefix,
                                          int64_t prefix_batch_stride, uintptr_t scale, uintptr_t shift,
                                          int64_t modulation_stride, float eps, int group, int bits, uintptr_t q,
                                          uintptr_t q_scale, bool cuda, uintptr_t stream) {
  const Float kind = float_code(dtype);
  require_bits(bits);
  if (group != 0) require_group(group, k);
  require(bits == 8 || k % 2 == 0, "K must be even to pack 4-bit codes two per byte");
  const NormModulate p = norm_modulate(batch, tokens, prefix_tokens, k, x_batch_stride, prefix, prefix_batch_stride,
                                       scale, shift, modulation_stride, eps);
  if (batch == 0 || tokens == 0 || k == 0) return;
  RowSource src{as_pointer<const void>(x), nullptr, k, k};
  src.norm = &p;
  run_rht_quantize(src, kind, batch * tokens, k, group, bits, as_pointer<void>(q), as_pointer<float>(q_scale), cuda,
                   stream);
}

// The same for the norm of x + gate * branch (GatedResidual; no prefix), whose rows are also written to sum.
void residual_layer_norm_modulate_rht_quantize_ptr(uintptr_t x, int dtype, int64_t batch, int64_t tokens, int64_t k,
                                                   int64_t x_batch_stride, uintptr_t branch, uintptr_t gate,
                                                   int64_t gate_stride, uintptr_t sum, uintptr_t scale,
                                                   uintptr_t shift, int64_t modulation_stride, float eps, int group,
                                                   int bits, uintptr_t q, uintptr_t q_scale, bool cuda,
                                                   uintptr_t stream) {
  const Float kind = float_code(dtype);
  require_bits(bits);
  if (group != 0) require_group(group, k);
  require(bits == 8 || k % 2 == 0, "K must be even to pack 4-bit codes two per byte");
  require(branch != 0 && gate != 0 && sum != 0 && gate_stride >= k, "branch, gate rows of k elements and sum are required");
  const NormModulate p =
      norm_modulate(batch, tokens, 0, k, x_batch_stride, 0, 0, scale, shift, modulation_stride, eps);
  const GatedResidual g{as_pointer<const void>(branch), as_pointer<const void>(gate), gate_stride,
                        as_pointer<void>(sum)};
  if (batch == 0 || tokens == 0 || k == 0) return;
  RowSource src{as_pointer<const void>(x), nullptr, k, k};
  src.norm = &p;
  src.residual = &g;
  run_rht_quantize(src, kind, batch * tokens, k, group, bits, as_pointer<void>(q), as_pointer<float>(q_scale), cuda,
                   stream);
}

void pack_int4(Array q, Array packed, uintptr_t stream) {
  require(is(q, nb::dlpack::dtype_code::Int, 8), "q must be int8");
  require(is(packed, nb::dlpack::dtype_code::UInt, 8), "packed must be uint8");
  require(q.size() == 2 * packed.size(), "packed must hold half as many elements as q");
  if (packed.size() == 0) return;
  const auto* src = static_cast<const int8_t*>(q.data());
  auto* dst = static_cast<uint8_t*>(packed.data());
  if (on_cuda({&q, &packed})) {
#ifdef CONVROT_WITH_CUDA
    cuda::pack_int4(src, dst, int64_t(packed.size()), as_stream(stream));
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::pack_int4(src, dst, int64_t(packed.size()));
  }
}

void unpack_int4(Array packed, Array q, uintptr_t stream) {
  require(is(packed, nb::dlpack::dtype_code::UInt, 8), "packed must be uint8");
  require(is(q, nb::dlpack::dtype_code::Int, 8), "q must be int8");
  require(q.size() == 2 * packed.size(), "q must hold twice as many elements as packed");
  if (packed.size() == 0) return;
  const auto* src = static_cast<const uint8_t*>(packed.data());
  auto* dst = static_cast<int8_t*>(q.data());
  if (on_cuda({&packed, &q})) {
#ifdef CONVROT_WITH_CUDA
    cuda::unpack_int4(src, dst, int64_t(packed.size()), as_stream(stream));
#endif
  } else {
    nb::gil_scoped_release release;
    cpu::unpack_int4(src, dst, int64_t(packed.size()));
  }
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
  m.doc() = "ConvRot kernel primitives (destination passing; see convrot_kernels for the API)";
  // Outputs take no implicit conversion: a converted (copied) output would receive the results and be dropped.
  m.def("rht", &convrot::rht, "x"_a, "out"_a.noconvert(), "group_size"_a, "stream"_a = 0);
  m.def("rht_quantize", &convrot::rht_quantize, "x"_a, "q"_a.noconvert(), "scale"_a.noconvert(), "group_size"_a,
        "bits"_a, "stream"_a = 0, "x2"_a.none() = nb::none(), "gelu_from"_a = -1);
  m.def("gemm", &convrot::gemm, "qa"_a, "sa"_a, "qw"_a, "sw"_a, "bias"_a.none(), "out"_a.noconvert(), "bits"_a,
        "stream"_a = 0, "act_bits"_a = -1, "group_scale"_a.none() = nb::none());
  m.def("rht_quantize_ptr", &convrot::rht_quantize_ptr, "x"_a, "x_dtype"_a, "m"_a, "k"_a, "group_size"_a, "bits"_a,
        "q"_a, "scale"_a, "cuda"_a, "stream"_a, "x2"_a = 0, "x_k"_a = -1, "gelu_from"_a = -1);
  m.def("gemm_ptr", &convrot::gemm_ptr, "qa"_a, "sa"_a, "qw"_a, "sw"_a, "bias"_a, "out"_a, "out_dtype"_a, "m"_a, "n"_a,
        "k"_a, "bits"_a, "cuda"_a, "stream"_a);
  m.def("rms_norm_rope_ptr", &convrot::rms_norm_rope_ptr, "x"_a, "x_batch"_a, "x_token"_a, "x_head"_a, "out"_a,
        "out_batch"_a, "out_token"_a, "out_head"_a, "dtype"_a, "batch"_a, "tokens"_a, "heads"_a, "dim"_a, "weight"_a,
        "cos"_a, "sin"_a, "eps"_a, "cuda"_a, "stream"_a);
  m.def("layer_norm_modulate_ptr", &convrot::layer_norm_modulate_ptr, "x"_a, "out"_a, "dtype"_a, "batch"_a,
        "tokens"_a, "prefix_tokens"_a, "k"_a, "x_batch_stride"_a, "prefix"_a, "prefix_batch_stride"_a, "scale"_a,
        "shift"_a, "modulation_stride"_a, "eps"_a,
        "cuda"_a, "stream"_a);
  m.def("layer_norm_modulate_rht_quantize_ptr", &convrot::layer_norm_modulate_rht_quantize_ptr, "x"_a, "dtype"_a,
        "batch"_a, "tokens"_a, "prefix_tokens"_a, "k"_a, "x_batch_stride"_a, "prefix"_a, "prefix_batch_stride"_a,
        "scale"_a, "shift"_a, "modulation_stride"_a, "eps"_a, "group_size"_a, "bits"_a, "q"_a, "q_scale"_a, "cuda"_a,
        "stream"_a);
  m.def("residual_layer_norm_modulate_rht_quantize_ptr", &convrot::residual_layer_norm_modulate_rht_quantize_ptr,
        "x"_a, "dtype"_a, "batch"_a, "tokens"_a, "k"_a, "x_batch_stride"_a, "branch"_a, "gate"_a, "gate_stride"_a,
        "sum"_a, "scale"_a, "shift"_a, "modulation_stride"_a, "eps"_a, "group_size"_a, "bits"_a, "q"_a, "q_scale"_a,
        "cuda"_a, "stream"_a);
  m.def("pack_int4", &convrot::pack_int4, "q"_a, "packed"_a.noconvert(), "stream"_a = 0);
  m.def("unpack_int4", &convrot::unpack_int4, "packed"_a, "q"_a.noconvert(), "stream"_a = 0);
  m.def("build_info", &convrot::build_info);
}
