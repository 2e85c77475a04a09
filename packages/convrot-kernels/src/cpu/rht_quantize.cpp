#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/gelu.h"
#include "cpu/hadamard_butterfly.h"
#include "cpu/layer_norm_modulate.h"
#include "cpu/parallel_for.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// Codes of one fp32 row by the per-row symmetric rule of docs/format.md.
// Returns the row's scale; writes the codes as int8 into q.
float quantize_row(const float* v, int64_t k, int bits, int8_t* q) {
  const float qmax = float((1 << (bits - 1)) - 1);
  float amax = 0.0f;
  bool finite = true;
  for (int64_t j = 0; j < k; ++j) {
    finite = finite && std::isfinite(v[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
  const float scale = finite ? amax / qmax : std::numeric_limits<float>::quiet_NaN();
  if (!finite || scale == 0.0f) {
    for (int64_t j = 0; j < k; ++j) q[j] = 0;
    return scale;
  }
  for (int64_t j = 0; j < k; ++j) {
    const float r = std::nearbyint(v[j] / scale);  // default rounding mode: half to even
    q[j] = int8_t(std::fmin(std::fmax(r, -qmax - 1.0f), qmax));
  }
  return scale;
}

}  // namespace

void rht_quantize(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, int bits, void* q,
                  float* scale) {
  const int64_t k2 = k - src.k1;
  parallel_for(rows, k * 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(k)), terms(src.norm != nullptr ? static_cast<size_t>(k) : 0);
    std::vector<int8_t> codes(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      if (src.norm != nullptr) {
        load_norm_input_row(src.x, dtype, *src.norm, r, row.data());
        const int64_t b = r / src.norm->tokens;
        if (const GatedResidual* res = src.residual) {
          for (int64_t j = 0; j < k; ++j) {
            const float gated = round_to(dtype, load_float(res->gate, dtype, b * res->gate_stride + j) *
                                                    load_float(res->branch, dtype, r * k + j));
            row[j] = round_to(dtype, row[j] + gated);
            store_float(res->sum, dtype, r * k + j, row[j]);
          }
        }
        normalize_modulate_row(dtype, *src.norm, b, row.data(), terms.data());
      } else {
        for (int64_t j = 0; j < src.k1; ++j) row[j] = load_float(src.x, dtype, r * src.k1 + j);
        for (int64_t j = 0; j < k2; ++j) row[src.k1 + j] = load_float(src.x2, dtype, r * k2 + j);
      }
      for (int64_t j = src.gelu_from; j < k; ++j) row[j] = round_to(dtype, gelu_tanh(row[j]));
      if (group > 0) {
        for (int64_t g0 = 0; g0 < k; g0 += group) rotate_group(row.data() + g0, group);
      }
      scale[r] = quantize_row(row.data(), k, bits, codes.data());
      if (bits == 4) {
        pack_int4(codes.data(), static_cast<uint8_t*>(q) + r * (k / 2), k / 2);
      } else {
        std::copy(codes.begin(), codes.end(), static_cast<int8_t*>(q) + r * k);
      }
    }
  });
}

}  // namespace convrot::cpu
