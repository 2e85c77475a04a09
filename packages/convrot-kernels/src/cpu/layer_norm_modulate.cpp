#include <cmath>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/parallel_for.h"
#include "cpu/xor_butterfly.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// The CUDA kernel's summation order (primitives.h, NormModulate): both backends agree bit for bit.
float row_sum(const std::vector<float>& terms) {
  float lane[32] = {};
  for (size_t c = 0; 8 * c < terms.size(); ++c) {
    float chunk = 0.0f;
    for (size_t j = 8 * c; j < 8 * c + 8 && j < terms.size(); ++j) chunk = chunk + terms[j];
    lane[c % 32] = lane[c % 32] + chunk;
  }
  return xor_butterfly(lane);
}

}  // namespace

void layer_norm_modulate(const void* x, void* out, Float dtype, const NormModulate& p) {
  const int64_t rows = p.batch * p.tokens, k = p.k;
  parallel_for(rows, k * 8, [&](int64_t begin, int64_t end) {
    std::vector<float> v(static_cast<size_t>(k)), terms(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.tokens, s = r % p.tokens;
      const bool from_prefix = s < p.prefix_tokens;
      const void* src = from_prefix ? p.prefix : x;
      const int64_t first =
          from_prefix ? b * p.prefix_batch_stride + s * k : b * p.x_batch_stride + (s - p.prefix_tokens) * k;
      for (int64_t j = 0; j < k; ++j) v[j] = load_float(src, dtype, first + j);
      const float mean = row_sum(v) / float(k);
      for (int64_t j = 0; j < k; ++j) {
        const float d = v[j] - mean;
        terms[j] = d * d;
      }
      const float rstd = 1.0f / std::sqrt(row_sum(terms) / float(k) + p.eps);
      const int64_t mod = b * p.modulation_stride;
      for (int64_t j = 0; j < k; ++j) {
        const float normed = round_to(dtype, (v[j] - mean) * rstd);
        const float factor = round_to(dtype, 1.0f + load_float(p.scale, dtype, mod + j));
        const float scaled = round_to(dtype, normed * factor);
        store_float(out, dtype, r * k + j, scaled + load_float(p.shift, dtype, mod + j));
      }
    }
  });
}

}  // namespace convrot::cpu
