#include <cmath>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/parallel_for.h"
#include "cpu/xor_butterfly.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

// The CUDA kernel's summation order (primitives.h), so that both backends agree bit for bit.
float sum_of_squares(const float* v, int64_t dim) {
  const int64_t per_lane = 2 * rms_norm_rope_pairs_per_lane(dim);
  float lane[32] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float square = v[d] * v[d];
    lane[d / per_lane] = lane[d / per_lane] + square;
  }
  return xor_butterfly(lane);
}

}  // namespace

void rms_norm_rope(const void* x, HeadStrides xs, void* out, HeadStrides os, Float dtype, const NormRope& p) {
  const int64_t rows = p.batch * p.tokens * p.heads;
  parallel_for(rows, p.dim * 8, [&](int64_t begin, int64_t end) {
    std::vector<float> v(static_cast<size_t>(p.dim));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % p.heads, s = (r / p.heads) % p.tokens, b = r / (p.heads * p.tokens);
      const int64_t in = b * xs.batch + s * xs.token + h * xs.head;
      const int64_t to = b * os.batch + s * os.token + h * os.head;
      for (int64_t d = 0; d < p.dim; ++d) v[d] = load_float(x, dtype, in + d);
      const float mean = sum_of_squares(v.data(), p.dim) / float(p.dim);
      const float inv_rms = 1.0f / std::sqrt(mean + p.eps);
      for (int64_t d = 0; d < p.dim; ++d) {
        const float normed = v[d] * inv_rms;
        v[d] = round_to(dtype, p.weight != nullptr ? normed * load_float(p.weight, dtype, d) : normed);
      }
      if (p.cos != nullptr) {
        const float* c = p.cos + s * p.dim;
        const float* sn = p.sin + s * p.dim;
        for (int64_t d = 0; d < p.dim; d += 2) {
          const float even_c = v[d] * c[d], odd_s = v[d + 1] * sn[d];
          const float odd_c = v[d + 1] * c[d + 1], even_s = v[d] * sn[d + 1];
          v[d] = even_c - odd_s;
          v[d + 1] = odd_c + even_s;
        }
      }
      for (int64_t d = 0; d < p.dim; ++d) store_float(out, dtype, to + d, v[d]);
    }
  });
}

}  // namespace convrot::cpu
