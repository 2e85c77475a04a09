// TMA descriptors for the Hopper GEMMs (host side).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace convrot::cuda {

// A row-major matrix [rows, cols] of 1- or 2-byte elements (elem_bytes), loaded or stored
// in boxes of [box_rows, box_cols].
CUtensorMap tensor_map(const void* base, int elem_bytes, int64_t rows, int64_t cols, int box_rows, int box_cols,
                       CUtensorMapSwizzle swizzle);

}  // namespace convrot::cuda
