// cuda::pack_int4 / unpack_int4: two 4-bit two's-complement codes per byte,
// element 2j in the low nibble. Each thread handles 8 bytes of packed data
// (16 codes) with 8- and 16-byte accesses where the buffers allow.
#include "common.cuh"

namespace convrot::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 8;

__device__ __forceinline__ uint32_t pack4(uint32_t codes) {  // 4 int8 codes -> 2 packed bytes (low 16 bits)
  const uint32_t b0 = codes & 0xF, b1 = (codes >> 8) & 0xF, b2 = (codes >> 16) & 0xF, b3 = (codes >> 24) & 0xF;
  return b0 | (b1 << 4) | (b2 << 8) | (b3 << 12);
}

// 2 packed bytes (low 16 bits) -> 4 sign-extended int8 codes.
__device__ __forceinline__ uint32_t unpack2(uint32_t bytes) {
  uint32_t out = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int32_t nibble = int32_t(bytes << (28 - 4 * j)) >> 28;  // sign-extends nibble j
    out |= (uint32_t(nibble) & 0xFF) << (8 * j);
  }
  return out;
}

__global__ void pack_kernel(const int8_t* __restrict__ q, uint8_t* __restrict__ packed, int64_t n_bytes, bool vec) {
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kBytesPerThread;
  if (first >= n_bytes) return;
  if (vec && first + kBytesPerThread <= n_bytes) {
    const uint4 codes = *reinterpret_cast<const uint4*>(q + 2 * first);
    uint2 out;
    out.x = pack4(codes.x) | (pack4(codes.y) << 16);
    out.y = pack4(codes.z) | (pack4(codes.w) << 16);
    *reinterpret_cast<uint2*>(packed + first) = out;
    return;
  }
  for (int64_t j = first; j < first + kBytesPerThread && j < n_bytes; ++j) {
    packed[j] = uint8_t((uint8_t(q[2 * j]) & 0xF) | (uint8_t(q[2 * j + 1]) << 4));
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, int8_t* __restrict__ q, int64_t n_bytes, bool vec) {
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kBytesPerThread;
  if (first >= n_bytes) return;
  if (vec && first + kBytesPerThread <= n_bytes) {
    const uint2 in = *reinterpret_cast<const uint2*>(packed + first);
    const uint4 out = make_uint4(unpack2(in.x & 0xFFFF), unpack2(in.x >> 16), unpack2(in.y & 0xFFFF), unpack2(in.y >> 16));
    *reinterpret_cast<uint4*>(q + 2 * first) = out;
    return;
  }
  for (int64_t j = first; j < first + kBytesPerThread && j < n_bytes; ++j) {
    q[2 * j] = int8_t(int8_t(packed[j] << 4) >> 4);
    q[2 * j + 1] = int8_t(int8_t(packed[j]) >> 4);
  }
}

unsigned blocks_for(int64_t n_bytes) {
  return unsigned(ceil_div<int64_t>(n_bytes, int64_t(kThreads) * kBytesPerThread));
}

}  // namespace

void pack_int4(const int8_t* q, uint8_t* packed, int64_t n_bytes, void* stream) {
  if (n_bytes == 0) return;
  const bool vec = aligned16(q) && (reinterpret_cast<uintptr_t>(packed) & 7) == 0;
  pack_kernel<<<blocks_for(n_bytes), kThreads, 0, as_stream(stream)>>>(q, packed, n_bytes, vec);
  check_launch("pack_int4");
}

void unpack_int4(const uint8_t* packed, int8_t* q, int64_t n_bytes, void* stream) {
  if (n_bytes == 0) return;
  const bool vec = aligned16(q) && (reinterpret_cast<uintptr_t>(packed) & 7) == 0;
  unpack_kernel<<<blocks_for(n_bytes), kThreads, 0, as_stream(stream)>>>(packed, q, n_bytes, vec);
  check_launch("unpack_int4");
}

}  // namespace convrot::cuda
