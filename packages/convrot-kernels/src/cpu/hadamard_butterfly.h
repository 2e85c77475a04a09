// In-place regular Hadamard rotation of one group by radix-4 butterflies
// (docs/format.md): log4(g) stages of H4, then one exact scaling by 2^-log4(g).
#pragma once

namespace convrot::cpu {

inline void rotate_group(float* v, int group) {
  float scale = 1.0f;
  for (int stride = group / 4; stride >= 1; stride /= 4) {
    for (int base = 0; base < group; base += 4 * stride) {
      for (int j = base; j < base + stride; ++j) {
        const float a = v[j], b = v[j + stride], c = v[j + 2 * stride], d = v[j + 3 * stride];
        const float s = (a + b) + (c + d);
        v[j] = s - 2.0f * d;
        v[j + stride] = s - 2.0f * c;
        v[j + 2 * stride] = s - 2.0f * b;
        v[j + 3 * stride] = s - 2.0f * a;
      }
    }
    scale *= 0.5f;
  }
  for (int j = 0; j < group; ++j) v[j] *= scale;
}

}  // namespace convrot::cpu
