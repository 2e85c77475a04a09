#include <vector>

#include "cpu/float_convert.h"
#include "cpu/hadamard_butterfly.h"
#include "cpu/parallel_for.h"
#include "primitives.h"

namespace convrot::cpu {

void rht(const void* x, void* out, Float dtype, int64_t rows, int64_t k, int group) {
  parallel_for(rows, k * 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(group));
    for (int64_t g0 = begin * k; g0 < end * k; g0 += group) {
      for (int j = 0; j < group; ++j) buf[j] = load_float(x, dtype, g0 + j);
      rotate_group(buf.data(), group);
      for (int j = 0; j < group; ++j) store_float(out, dtype, g0 + j, buf[j]);
    }
  });
}

}  // namespace convrot::cpu
