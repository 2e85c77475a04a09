// The CUDA kernels' warp reduction, on the host: 32 lane sums meeting in an XOR butterfly.
#pragma once

namespace convrot::cpu {

// Lane l adds lane l ^ o for o = 16, 8, 4, 2, 1, as __shfl_xor_sync reductions do; every lane
// then holds the same sum, returned. The CPU backends that must agree with a CUDA warp's
// summation order bit for bit use this.
inline float xor_butterfly(float (&lane)[32]) {
  for (int off = 16; off > 0; off /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ off];
    for (int l = 0; l < 32; ++l) lane[l] = next[l];
  }
  return lane[0];
}

}  // namespace convrot::cpu
