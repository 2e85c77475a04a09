#include <cmath>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/layer_norm_modulate.h"
#include "cpu/parallel_for.h"
#include "cpu/xor_butterfly.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// The CUDA kernel's summation order (primitives.h, NormModulate): both backends agree bit for bit.
float row_sum(const float* terms, int64_t k) {
  float lane[32] = {};
  for (int64_t c = 0; 8 * c < k; ++c) {
    float chunk = 0.0f;
    for (int64_t j = 8 * c; j < 8 * c + 8 && j < k; ++j) chunk = chunk + terms[j];
    lane[c % 32] = lane[c % 32] + chunk;
  }
  return xor_butterfly(lane);
}

}  // namespace

void load_norm_input_row(const void* x, Float dtype, const NormModulate& p, int64_t r, float* row) {
  const int64_t k = p.k;
  const int64_t b = r / p.tokens, s = r % p.tokens;
  const bool from_prefix = s < p.prefix_tokens;
  const void* src = from_prefix ? p.prefix : x;
  const int64_t first =
      from_prefix ? b * p.prefix_batch_stride + s * k : b * p.x_batch_stride + (s - p.prefix_tokens) * k;
  for (int64_t j = 0; j < k; ++j) row[j] = load_float(src, dtype, first + j);
}

void normalize_modulate_row(Float dtype, const NormModulate& p, int64_t b, float* row, float* terms) {
  const int64_t k = p.k;
  const float mean = row_sum(row, k) / float(k);
  for (int64_t j = 0; j < k; ++j) {
    const float d = row[j] - mean;
    terms[j] = d * d;
  }
  const float rstd = 1.0f / std::sqrt(row_sum(terms, k) / float(k) + p.eps);
  const int64_t mod = b * p.modulation_stride;
  for (int64_t j = 0; j < k; ++j) {
    const float normed = round_to(dtype, (row[j] - mean) * rstd);
    const float factor = round_to(dtype, 1.0f + load_float(p.scale, dtype, mod + j));
    const float scaled = round_to(dtype, normed * factor);
    row[j] = round_to(dtype, scaled + load_float(p.shift, dtype, mod + j));
  }
}

void layer_norm_modulate(const void* x, void* out, Float dtype, const NormModulate& p) {
  const int64_t rows = p.batch * p.tokens, k = p.k;
  parallel_for(rows, k * 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(k)), terms(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      load_norm_input_row(x, dtype, p, r, row.data());
      normalize_modulate_row(dtype, p, r / p.tokens, row.data(), terms.data());
      for (int64_t j = 0; j < k; ++j) store_float(out, dtype, r * k + j, row[j]);
    }
  });
}

}  // namespace convrot::cpu
