#include "cpu/parallel_for.h"
#include "primitives.h"

namespace convrot::cpu {

void pack_int4(const int8_t* q, uint8_t* packed, int64_t n_bytes) {
  parallel_for(n_bytes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      packed[j] = uint8_t((uint8_t(q[2 * j]) & 0x0f) | (uint8_t(q[2 * j + 1]) << 4));
    }
  });
}

void unpack_int4(const uint8_t* packed, int8_t* q, int64_t n_bytes) {
  parallel_for(n_bytes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // Shifting the nibble into the top of an int8 and back sign-extends it.
      q[2 * j] = int8_t(int8_t(packed[j] << 4) >> 4);
      q[2 * j + 1] = int8_t(int8_t(packed[j]) >> 4);
    }
  });
}

}  // namespace convrot::cpu
