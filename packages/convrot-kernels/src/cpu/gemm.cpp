#include <algorithm>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/parallel_for.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// Codes are widened to int16 once: int16 products summed pairwise into int32 map
// onto SSE2's pmaddwd (and NEON's smlal), so the compiler vectorizes the dots.
std::vector<int16_t> widen_codes(const void* q, int64_t rows, int64_t k, int bits) {
  std::vector<int16_t> wide(static_cast<size_t>(rows * k));
  if (bits == 8) {
    const auto* codes = static_cast<const int8_t*>(q);
    std::copy(codes, codes + rows * k, wide.begin());
    return wide;
  }
  const auto* packed = static_cast<const uint8_t*>(q);
  parallel_for(rows * k / 2, 2, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      wide[2 * j] = int16_t(int8_t(packed[j] << 4) >> 4);  // sign-extends the low nibble
      wide[2 * j + 1] = int16_t(int8_t(packed[j]) >> 4);
    }
  });
  return wide;
}

// Group-scaled 4-bit weights: each code times its group's multiplier (an int8 by the format's ranges).
void apply_group_scale(std::vector<int16_t>& wide, const uint8_t* group_scale, int64_t rows, int64_t k) {
  const int64_t groups = k / kWeightGroup;
  parallel_for(rows * groups, kWeightGroup, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int16_t multiplier = group_scale[g];
      int16_t* codes = wide.data() + g * kWeightGroup;
      for (int j = 0; j < kWeightGroup; ++j) codes[j] = int16_t(codes[j] * multiplier);
    }
  });
}

int32_t dot(const int16_t* a, const int16_t* b, int64_t k) {
  int32_t acc = 0;
  for (int64_t j = 0; j < k; ++j) acc += int32_t(a[j]) * b[j];
  return acc;
}

// One activation row against four consecutive weight rows: a[] is loaded once for four dots.
void dot_x4(const int16_t* a, const int16_t* w, int64_t k, int32_t* acc) {
  const int16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
  int32_t acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t v = a[j];
    acc0 += v * w0[j];
    acc1 += v * w1[j];
    acc2 += v * w2[j];
    acc3 += v * w3[j];
  }
  acc[0] = acc0, acc[1] = acc1, acc[2] = acc2, acc[3] = acc3;
}

}  // namespace

void gemm(const void* qa, const float* sa, const void* qw, const float* sw, const float* bias,
          void* out, Float out_dtype, int64_t m, int64_t n, int64_t k, GemmCodes codes) {
  const std::vector<int16_t> a = widen_codes(qa, m, k, codes.act_bits);
  std::vector<int16_t> w = widen_codes(qw, n, k, codes.weight_bits);
  if (codes.grouped()) apply_group_scale(w, codes.group_scale, n, k);
  const auto epilogue = [&](int64_t i, int64_t j, int32_t acc) {
    float y = float(acc) * sa[i] * sw[j];
    if (bias != nullptr) y += bias[j];
    store_float(out, out_dtype, i * n + j, y);
  };
  // A block of weight rows stays in cache while every activation row passes over it.
  constexpr int64_t kBlockN = 32;
  const int64_t n_blocks = (n + kBlockN - 1) / kBlockN;
  parallel_for(n_blocks, m * kBlockN * k, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t n0 = block_begin * kBlockN; n0 < std::min(n, block_end * kBlockN); n0 += kBlockN) {
      const int64_t n1 = std::min(n, n0 + kBlockN);
      for (int64_t i = 0; i < m; ++i) {
        const int16_t* a_row = a.data() + i * k;
        int64_t j = n0;
        for (int32_t acc[4]; j + 4 <= n1; j += 4) {
          dot_x4(a_row, w.data() + j * k, k, acc);
          for (int c = 0; c < 4; ++c) epilogue(i, j + c, acc[c]);
        }
        for (; j < n1; ++j) epilogue(i, j, dot(a_row, w.data() + j * k, k));
      }
    }
  });
}

}  // namespace convrot::cpu
