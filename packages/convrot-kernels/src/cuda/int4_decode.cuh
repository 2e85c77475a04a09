// Decoding of packed 4-bit codes into int8x4 words for the tensor-core GEMMs, beyond the
// 16 * code expansion (low_nibbles_x16 / high_nibbles_x16): group-scaled weights, whose
// decoded value code x multiplier is an int8 (docs/format.md), and the byte shuffles that put
// 8-bit activations into the K order of packed nibbles.
#pragma once

#include <cstdint>

namespace convrot::cuda {

// Four 4-bit two's complement codes biased by 8, one in [0, 15] in the low half of each byte,
// times `multiplier` (1..16) as four int8 bytes. (code + 8) x multiplier + 128 - 8 x multiplier
// = code x multiplier + 128 lies in [0, 240] in every byte, so one 32-bit multiply-add carries
// nothing between bytes (128 - 8 x multiplier is in [0, 120]: its replicated constant borrows
// none either), and flipping bit 7 leaves code x multiplier, in [-128, 112], in each byte. With
// the mask and the bias, nvcc makes this five operations (sm_90a SASS) where the bytewise
// subtraction of 8 x multiplier (__vsub4) took seven.
__device__ __forceinline__ uint32_t scaled_codes(uint32_t biased, uint32_t multiplier) {
  return (biased * multiplier + (0x80808080u - 0x08080808u * multiplier)) ^ 0x80808080u;
}

// Codes 0, 2, 4, 6 (low nibbles) and 1, 3, 5, 7 (high nibbles) of a packed word, scaled.
__device__ __forceinline__ uint32_t low_nibbles_scaled(uint32_t w, uint32_t multiplier) {
  return scaled_codes((w ^ 0x88888888u) & 0x0F0F0F0Fu, multiplier);
}
__device__ __forceinline__ uint32_t high_nibbles_scaled(uint32_t w, uint32_t multiplier) {
  return scaled_codes(((w ^ 0x88888888u) >> 4) & 0x0F0F0F0Fu, multiplier);
}

// Bytes 0, 2, 4, 6 and 1, 3, 5, 7 of the eight bytes (a, b): the even and odd codes of eight
// consecutive 8-bit codes, in the order low_nibbles / high_nibbles give those of a packed word.
__device__ __forceinline__ uint32_t even_bytes(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x6420); }
__device__ __forceinline__ uint32_t odd_bytes(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7531); }

// The inverse: codes 0-3 and 4-7 of a packed word in natural order, from its even codes
// (one per byte of `even`) and odd codes (`odd`).
__device__ __forceinline__ uint32_t first_four(uint32_t even, uint32_t odd) { return __byte_perm(even, odd, 0x5140); }
__device__ __forceinline__ uint32_t last_four(uint32_t even, uint32_t odd) { return __byte_perm(even, odd, 0x7362); }

}  // namespace convrot::cuda
