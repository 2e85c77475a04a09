#include <algorithm>
#include <vector>

#include "cpu/float_convert.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// Products of int8 codes fit int16, which lets the compiler use pairwise
// multiply-add instructions; the sum is exact in int32 for the K we allow.
int32_t dot_int8(const int8_t* a, const int8_t* b, int64_t k) {
  int32_t acc = 0;
  for (int64_t j = 0; j < k; ++j) acc += int32_t(int16_t(a[j]) * int16_t(b[j]));
  return acc;
}

// 4-bit operands are expanded once so that the inner loop is a plain int8 dot product.
const int8_t* as_int8(const void* q, int64_t rows, int64_t k, int bits, std::vector<int8_t>& storage) {
  if (bits == 8) return static_cast<const int8_t*>(q);
  storage.resize(size_t(rows * k));
  unpack_int4(static_cast<const uint8_t*>(q), storage.data(), rows * k / 2);
  return storage.data();
}

}  // namespace

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias,
          void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, int bits) {
  std::vector<int8_t> a_storage, w_storage;
  const int8_t* a = as_int8(qa, m, k, bits, a_storage);
  const int8_t* w = as_int8(qw, n, k, bits, w_storage);
  // A block of weight rows stays in cache while every activation row passes over it.
  constexpr int64_t kBlockN = 32;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n0 = 0; n0 < n; n0 += kBlockN) {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t n1 = std::min(n, n0 + kBlockN);
      for (int64_t j = n0; j < n1; ++j) {
        float y = float(dot_int8(a + i * k, w + j * k, k)) * sa[i] * sw[j];
        if (bias != nullptr) y += bias[j];
        store_float(out, out_dtype, i * n + j, y);
      }
    }
  }
}

}  // namespace convrot::cpu
