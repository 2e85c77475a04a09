// 8-bit attention on Hopper (sm_90a): the contract of docs/format.md, "8-bit attention" (issue 31), with the
// codes and scales the pre-pass writes. Non-causal softmax(scale * Q K^T) V per (batch, head).
#pragma once

#include <cstdint>

namespace convrot::cuda {

struct Attention8bit {
  int64_t batch_heads, heads, q_tokens, kv_tokens, dim;  // dim 64 or 128; padded counts derived as above
  const int8_t* q8;
  const float* sq;  // [BH, Nq_pad, D], [BH, Nq_pad]
  const int8_t* k8;
  const float* sk;  // [BH, Nkv_pad, D], [BH, Nkv_pad / 128]
  const uint8_t* vt8;
  const float* sv;                                    // [BH, D, Nkv_pad] e4m3 codes, permuted keys; [BH, D]
  float scale_log2;                                   // scale * log2(e)
  void* out;
  int64_t out_batch, out_token, out_head;  // element strides of out [B, Nq, H, D]; D contiguous
  bool out_bf16;                           // else fp16
};

// Throws std::runtime_error (with a message) on a device without sm_90a or a shape it does not take.
void attention_8bit_sm90(const Attention8bit& a, void* stream);

}  // namespace convrot::cuda
