#include <vector>

#include "cpu/float_convert.h"
#include "cpu/hadamard_butterfly.h"
#include "primitives.h"

namespace convrot::cpu {

void rht(const void* x, void* out, Float dtype, int64_t rows, int64_t k, int group) {
#pragma omp parallel
  {
    std::vector<float> buf(group);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g0 = r * k; g0 < (r + 1) * k; g0 += group) {
        for (int j = 0; j < group; ++j) buf[j] = load_float(x, dtype, g0 + j);
        rotate_group(buf.data(), group);
        for (int j = 0; j < group; ++j) store_float(out, dtype, g0 + j, buf[j]);
      }
    }
  }
}

}  // namespace convrot::cpu
