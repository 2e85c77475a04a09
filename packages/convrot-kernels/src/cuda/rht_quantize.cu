// cuda::rht_quantize: rotation fused with per-row quantization, one pass over the input.
#include "row_rotation.cuh"

namespace convrot::cuda {

void rht_quantize(const RowSource& src, Float dtype, int64_t rows, int64_t k, int group, int bits, void* q,
                  float* scale, void* stream) {
  if (rows == 0) return;
  if (bits == 4) {
    row_rotation::launch<row_rotation::kQuant4>(src, dtype, rows, k, group, q, scale, stream);
  } else {
    row_rotation::launch<row_rotation::kQuant8>(src, dtype, rows, k, group, q, scale, stream);
  }
}

}  // namespace convrot::cuda
