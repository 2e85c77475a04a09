// cuda::rht: group-wise regular Hadamard rotation, rounded once to the input dtype.
#include "row_rotation.cuh"

namespace convrot::cuda {

void rht(const void* x, void* out, Float dtype, int64_t rows, int64_t k, int group, void* stream) {
  if (rows == 0 || k == 0) return;
  const RowSource src{x, nullptr, k, k};
  row_rotation::launch<row_rotation::kRotate>(src, dtype, rows, k, group, out, nullptr, stream);
}

}  // namespace convrot::cuda
