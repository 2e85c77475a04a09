// TMA descriptors, built through the driver entry point that the runtime hands
// out, so the module needs no link to libcuda and still loads without a GPU.
#include "tensor_map.h"

#include <stdexcept>

#include "common.cuh"

namespace convrot::cuda {
namespace {

using EncodeTiled = decltype(&cuTensorMapEncodeTiled);

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || p == nullptr) {
      throw std::runtime_error("convrot_kernels CUDA: the driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

namespace {

struct MapKey {
  const void* base;
  int64_t rows, cols;
  int elem_bytes, box_rows, box_cols;
  CUtensorMapSwizzle swizzle;
  bool operator==(const MapKey& o) const {
    return base == o.base && rows == o.rows && cols == o.cols && elem_bytes == o.elem_bytes &&
           box_rows == o.box_rows && box_cols == o.box_cols && swizzle == o.swizzle;
  }
};

CUtensorMap encode(const MapKey& key) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(key.cols), cuuint64_t(key.rows)};
  const cuuint64_t strides[1] = {cuuint64_t(key.cols * key.elem_bytes)};
  const cuuint32_t box[2] = {cuuint32_t(key.box_cols), cuuint32_t(key.box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      key.elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_UINT8;
  const CUresult r = encode_tiled()(&map, type, 2, const_cast<void*>(key.base), dims, strides, box, elem_strides,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, key.swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("convrot_kernels CUDA: cuTensorMapEncodeTiled failed");
  return map;
}

}  // namespace

// A descriptor is a pure function of its arguments, so a cache keyed on all of them is always
// right. A layer's weights keep their address, and the caching allocator hands activations the
// same few addresses step after step: most calls find their maps here instead of encoding them.
CUtensorMap tensor_map(const void* base, int elem_bytes, int64_t rows, int64_t cols, int box_rows, int box_cols,
                       CUtensorMapSwizzle swizzle) {
  constexpr int kEntries = 32;
  struct Entry {
    MapKey key;
    CUtensorMap map;
  };
  thread_local Entry entries[kEntries];
  thread_local int used = 0, next = 0;
  const MapKey key{base, rows, cols, elem_bytes, box_rows, box_cols, swizzle};
  for (int i = 0; i < used; ++i) {
    if (entries[i].key == key) return entries[i].map;
  }
  Entry& slot = entries[next];
  slot.key = key;
  slot.map = encode(key);
  next = (next + 1) % kEntries;
  used = used < kEntries ? used + 1 : kEntries;
  return slot.map;
}

}  // namespace convrot::cuda
