// attention_8bit on the CPU (docs/format.md): the pre-pass, bit for bit the CUDA one's, and the
// reference of the sm_90a kernel's math in fp32 (std::exp2, its own summation order).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/float_convert.h"
#include "cpu/hadamard_butterfly.h"
#include "cpu/parallel_for.h"
#include "fp8_e4m3.h"
#include "primitives.h"

namespace convrot::cpu {

namespace {

constexpr int kRotationGroup = 64;
constexpr float kQmax = 127.0f;
constexpr float kE4m3Max = 448.0f;

const void* row_of(const void* base, Float dtype, const HeadStrides& st, int64_t b, int64_t n, int64_t h) {
  const int64_t offset = b * st.batch + n * st.token + h * st.head;
  return static_cast<const char*>(base) + offset * (dtype == Float::f32 ? 4 : 2);
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The larger of two amaxes, NaN (a non-finite value was seen) winning.
float amax_of(float a, float b) { return std::isnan(a) || std::isnan(b) ? kNaN : std::max(a, b); }

// Row (b, n, h) of x in fp32, rotated by rht(row, 64); returns its amax (NaN if a value is not finite).
float rotated_row(const void* x, Float dtype, const HeadStrides& st, int64_t b, int64_t n, int64_t h, int64_t dim,
                  float* row) {
  const void* src = row_of(x, dtype, st, b, n, h);
  for (int64_t d = 0; d < dim; ++d) row[d] = load_float(src, dtype, d);
  float amax = 0.0f;
  bool finite = true;
  for (int64_t g = 0; g < dim; g += kRotationGroup) rotate_group(row + g, kRotationGroup);
  for (int64_t d = 0; d < dim; ++d) {
    finite = finite && std::isfinite(row[d]);
    amax = std::max(amax, std::fabs(row[d]));
  }
  return finite ? amax : kNaN;
}

// Codes of a row at `scale`; a zero or NaN scale gives codes 0.
void quantize_codes(const float* row, int64_t dim, float scale, int8_t* q) {
  const bool zero = !(scale > 0.0f);
  for (int64_t d = 0; d < dim; ++d) {
    const float r = zero ? 0.0f : std::nearbyint(row[d] / scale);  // half to even
    q[d] = int8_t(std::fmin(std::fmax(r, -kQmax), kQmax));
  }
}

// q (one scale per row) or k (one per block of 128 rows) of head (b, h) into its codes.
void quantize_head(const void* x, Float dtype, const HeadStrides& st, int64_t b, int64_t h, int64_t tokens,
                   int64_t dim, bool per_block, int8_t* q8, float* scales) {
  const int64_t padded = attention_padded(tokens);
  std::vector<float> rows(size_t(kAttentionBlock * dim));
  std::memset(q8, 0, size_t(padded * dim));
  for (int64_t n0 = 0; n0 < padded; n0 += kAttentionBlock) {
    const int64_t count = std::max<int64_t>(0, std::min(kAttentionBlock, tokens - n0));
    float block_amax = 0.0f;
    for (int64_t r = 0; r < count; ++r) {
      const float amax = rotated_row(x, dtype, st, b, n0 + r, h, dim, rows.data() + r * dim);
      block_amax = amax_of(block_amax, amax);
      if (!per_block) {
        const float scale = amax / kQmax;
        scales[n0 + r] = scale;
        quantize_codes(rows.data() + r * dim, dim, scale, q8 + (n0 + r) * dim);
      }
    }
    if (per_block) {
      const float scale = block_amax / kQmax;
      scales[n0 / kAttentionBlock] = scale;
      for (int64_t r = 0; r < count; ++r) quantize_codes(rows.data() + r * dim, dim, scale, q8 + (n0 + r) * dim);
    } else {
      for (int64_t r = count; r < kAttentionBlock; ++r) scales[n0 + r] = 0.0f;
    }
  }
}

// v of head (b, h): per-channel scales, then the transposed codes with keys permuted in groups of 32.
void quantize_v(const void* v, Float dtype, const HeadStrides& st, int64_t b, int64_t h, int64_t tokens,
                int64_t dim, uint8_t* vt8, float* sv) {
  const int64_t padded = attention_padded(tokens);
  std::vector<float> amax(size_t(dim), 0.0f);
  for (int64_t n = 0; n < tokens; ++n) {
    const void* row = row_of(v, dtype, st, b, n, h);
    for (int64_t c = 0; c < dim; ++c) {
      const float x = load_float(row, dtype, c);
      amax[c] = std::isfinite(x) ? amax_of(amax[c], std::fabs(x)) : kNaN;
    }
  }
  for (int64_t c = 0; c < dim; ++c) sv[c] = amax[c] / kE4m3Max;
  std::memset(vt8, 0, size_t(dim * padded));
  for (int64_t g = 0; g < padded; g += 32) {
    for (int k = 0; k < 32; ++k) {
      const int64_t n = g + attention_key_of(k);
      if (n >= tokens) continue;
      const void* row = row_of(v, dtype, st, b, n, h);
      for (int64_t c = 0; c < dim; ++c) {
        vt8[c * padded + g + k] = sv[c] > 0.0f ? float_to_e4m3(load_float(row, dtype, c) / sv[c]) : 0;
      }
    }
  }
}

// The value of every e4m3 code.
struct E4m3Table {
  float value[256];
  E4m3Table() {
    for (int c = 0; c < 256; ++c) value[c] = e4m3_to_float(uint8_t(c));
  }
};

}  // namespace

void attention_8bit_prepass(const AttentionInputs& in, Float dtype, const AttentionCodes& codes) {
  const int64_t bh_count = in.batch * in.heads, dim = in.dim;
  const int64_t nq = attention_padded(in.q_tokens), nkv = attention_padded(in.kv_tokens);
  parallel_for(bh_count, (nq + 2 * nkv) * dim * 8, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / in.heads, h = bh % in.heads;
      quantize_head(in.q, dtype, in.qs, b, h, in.q_tokens, dim, false, codes.q8 + bh * nq * dim, codes.sq + bh * nq);
      quantize_head(in.k, dtype, in.ks, b, h, in.kv_tokens, dim, true, codes.k8 + bh * nkv * dim,
                    codes.sk + bh * (nkv / kAttentionBlock));
      quantize_v(in.v, dtype, in.vs, b, h, in.kv_tokens, dim, codes.vt8 + bh * dim * nkv, codes.sv + bh * dim);
    }
  });
}

void attention_8bit(const AttentionInputs& shape, const AttentionCodes& codes, float scale_log2, void* out,
                    HeadStrides os, Float dtype) {
  static const E4m3Table e4m3;
  const int64_t dim = shape.dim, nq = attention_padded(shape.q_tokens), nkv = attention_padded(shape.kv_tokens);
  const int64_t tiles = (shape.q_tokens + kAttentionBlock - 1) / kAttentionBlock;
  const int64_t bh_count = shape.batch * shape.heads;
  parallel_for(bh_count * tiles, kAttentionBlock * nkv * dim * 4, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(kAttentionBlock)), acc(static_cast<size_t>(dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / tiles, i0 = (item % tiles) * kAttentionBlock;
      const int64_t b = bh / shape.heads, h = bh % shape.heads;
      const int8_t* q8 = codes.q8 + bh * nq * dim;
      const int8_t* k8 = codes.k8 + bh * nkv * dim;
      const uint8_t* vt8 = codes.vt8 + bh * dim * nkv;
      const float* sv = codes.sv + bh * dim;
      const int64_t rows = std::min(kAttentionBlock, shape.q_tokens - i0);
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const float qscale = codes.sq[bh * nq + i] * scale_log2;
        float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j0 = 0; j0 < nkv; j0 += kAttentionBlock) {
          const float kscale = codes.sk[bh * (nkv / kAttentionBlock) + j0 / kAttentionBlock];
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < kAttentionBlock; ++j) {
            if (j0 + j >= shape.kv_tokens) {
              s[j] = -std::numeric_limits<float>::infinity();
              continue;
            }
            int32_t dot = 0;
            for (int64_t d = 0; d < dim; ++d) dot += int32_t(q8[i * dim + d]) * int32_t(k8[(j0 + j) * dim + d]);
            s[j] = float(dot) * qscale * kscale;
            block_max = std::max(block_max, s[j]);
          }
          const float m_new = std::max(m, block_max);
          const float alpha = std::exp2(m - m_new);
          m = m_new;
          l *= alpha;
          for (float& a : acc) a *= alpha;
          for (int64_t j = 0; j < kAttentionBlock; ++j) {
            const float p = std::exp2(s[j] - m);  // 0 for masked keys
            l += p;
            s[j] = e4m3.value[float_to_e4m3(kE4m3Max * p)];
          }
          // Stored position k of a 32-key group holds key attention_key_of(k).
          for (int64_t c = 0; c < dim; ++c) {
            const uint8_t* vrow = vt8 + c * nkv + j0;
            float sum = 0.0f;
            for (int64_t g = 0; g < kAttentionBlock; g += 32) {
              for (int k = 0; k < 32; ++k) sum += s[g + attention_key_of(k)] * e4m3.value[vrow[g + k]];
            }
            acc[c] += sum;
          }
        }
        const int64_t offset = b * os.batch + i * os.token + h * os.head;
        char* dst = static_cast<char*>(out) + offset * (dtype == Float::f32 ? 4 : 2);
        const float denom = kE4m3Max * l;
        for (int64_t c = 0; c < dim; ++c) store_float(dst, dtype, c, acc[c] * sv[c] / denom);
      }
    }
  });
}

}  // namespace convrot::cpu
