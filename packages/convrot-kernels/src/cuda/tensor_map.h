// TMA descriptors for the Hopper GEMMs (host side).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace convrot::cuda {

// A row-major uint8 matrix [rows, row_bytes] read in boxes of [box_rows, box_bytes].
CUtensorMap tensor_map(const void* base, int64_t rows, int64_t row_bytes, int box_rows, int box_bytes,
                       CUtensorMapSwizzle swizzle);

}  // namespace convrot::cuda
