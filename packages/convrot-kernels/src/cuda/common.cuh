// Helpers shared by the CUDA primitives: error checks, float conversions and
// small device utilities. Every kernel is enqueued on the caller's stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <string>

#include "../primitives.h"
#include "device.h"

namespace convrot::cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("convrot_kernels CUDA: ") + what + ": " + cudaGetErrorString(status));
  }
}

// Launch errors (bad configuration, missing kernel image) surface here; errors
// of the kernel's execution surface at the caller's next synchronisation.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// A kernel's address as the runtime's cached queries (device.h) take it.
template <typename... Args>
void allow_dynamic_smem(void (*kernel)(Args...), size_t bytes) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

template <typename... Args>
int resident_blocks_per_multiprocessor(void (*kernel)(Args...), int threads, size_t smem) {
  return resident_blocks_per_multiprocessor(reinterpret_cast<const void*>(kernel), threads, smem);
}

// ---- element conversions (round to nearest even) ----

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v rounded to T's precision (and back): an eager torch op's rounding of its fp32 result.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// The two 16-bit values of a 32-bit word as fp32 (element 0 in the low half). bf16 widens by
// bit operations, one instruction each (the generic conversion spends two on the high half).
template <typename T>
__device__ __forceinline__ void pair_to_float(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  } else {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xFFFF0000u);
  }
}

// The elements of a 16-byte vector of T as fp32.
template <typename T>
__device__ __forceinline__ void vector_to_float(const uint4& raw, float* v) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) pair_to_float<T>(w[i], v[2 * i], v[2 * i + 1]);
  }
}

// a and b rounded to the 16-bit T and back, as r0 and r1: one packing conversion for both.
template <typename T>
__device__ __forceinline__ void round_pair(float a, float b, float& r0, float& r1) {
  uint32_t w;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(a, b);
    w = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    w = *reinterpret_cast<const uint32_t*>(&h);
  }
  pair_to_float<T>(w, r0, r1);
}

// Stores one fp32 value to an output of runtime dtype `dtype` at element index i.
__device__ __forceinline__ void store_as(void* out, Float dtype, int64_t i, float v) {
  switch (dtype) {
    case Float::f32: static_cast<float*>(out)[i] = v; break;
    case Float::f16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
  }
}

// Stores two adjacent fp32 values (element i even-aligned for the dtype) in one access.
__device__ __forceinline__ void store2_as(void* out, Float dtype, int64_t i, float v0, float v1) {
  switch (dtype) {
    case Float::f32: *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0, v1); break;
    case Float::f16: *reinterpret_cast<__half2*>(static_cast<__half*>(out) + i) = __floats2half2_rn(v0, v1); break;
    default:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + i) = __floats2bfloat162_rn(v0, v1);
      break;
  }
}

// ---- runs of contiguous elements ----

// W contiguous elements of T from global memory into fp32 registers; `vec`: the
// address is aligned to the run's bytes (16-byte multiples: to 16), so vector loads apply.
template <typename T, int W>
__device__ __forceinline__ void load_chunk(const T* src, bool vec, float (&v)[W]) {
  constexpr int kBytes = W * int(sizeof(T));
  if (vec && kBytes >= 4) {
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int p = 0; p < kBytes / 16; ++p) {
        vector_to_float<T>(__ldg(reinterpret_cast<const uint4*>(src) + p), v + p * (16 / sizeof(T)));
      }
      return;
    } else if constexpr (kBytes == 8 || kBytes == 4) {
      using Word = std::conditional_t<kBytes == 8, uint2, unsigned int>;  // one 8- or 4-byte load
      const Word raw = __ldg(reinterpret_cast<const Word*>(src));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < W; ++q) v[q] = to_float(e[q]);
      return;
    }
  }
#pragma unroll
  for (int q = 0; q < W; ++q) v[q] = to_float(src[q]);
}

// W fp32 values rounded to T into global memory; `vec` as for load_chunk.
template <typename T, int W>
__device__ __forceinline__ void store_chunk(T* dst, bool vec, const float (&v)[W]) {
  constexpr int kBytes = W * int(sizeof(T));
  if (vec) {
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int p = 0; p < kBytes / 16; ++p) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int q = 0; q < 16 / int(sizeof(T)); ++q) e[q] = from_float<T>(v[p * (16 / sizeof(T)) + q]);
        reinterpret_cast<uint4*>(dst)[p] = raw;
      }
      return;
    } else if constexpr (kBytes == 8 || kBytes == 4) {
      using Word = std::conditional_t<kBytes == 8, uint2, uint32_t>;  // one 8- or 4-byte store
      Word raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int q = 0; q < W; ++q) e[q] = from_float<T>(v[q]);
      *reinterpret_cast<Word*>(dst) = raw;
      return;
    }
  }
#pragma unroll
  for (int q = 0; q < W; ++q) dst[q] = from_float<T>(v[q]);
}

// ---- the H4 butterfly of docs/format.md: (a, b, c, d) @ H4 = (s - 2d, s - 2c, s - 2b, s - 2a) ----

// s - 2x as one FMA: 2x is exact, so fma(-2, x, s) rounds exactly once like the
// CPU's s - 2.0f * x, bit for bit, in 7 instructions per butterfly instead of 11.
__device__ __forceinline__ void h4(float& a, float& b, float& c, float& d) {
  const float s = (a + b) + (c + d);
  const float na = __fmaf_rn(-2.0f, d, s), nb = __fmaf_rn(-2.0f, c, s), nc = __fmaf_rn(-2.0f, b, s),
              nd = __fmaf_rn(-2.0f, a, s);
  a = na;
  b = nb;
  c = nc;
  d = nd;
}

}  // namespace convrot::cuda
