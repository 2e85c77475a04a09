// 8-bit attention on Hopper (sm_90a): the contract of docs/format.md, "8-bit attention" (issue 31), with the
// codes and scales the pre-pass writes. Non-causal softmax(scale * Q K^T) V per (batch, head).
#pragma once

#include "../primitives.h"

namespace convrot::cuda {

// The operands' shape (their pointers and strides are the pre-pass's business), the codes it wrote,
// and the output.
struct Attention8bit {
  AttentionInputs shape;  // dim 64 or 128
  AttentionCodes codes;   // padded counts as primitives.h's attention_padded
  float scale_log2;       // scale * log2(e)
  void* out;
  HeadStrides os;  // element strides of out [B, Nq, H, D]; D contiguous
  bool out_bf16;   // else fp16
};

// Throws std::runtime_error (with a message) on a device without sm_90a or a shape the kernel does not take.
void check_attention_8bit_sm90(const Attention8bit& a);

// Checks as check_attention_8bit_sm90, then enqueues the kernel.
void attention_8bit_sm90(const Attention8bit& a, void* stream);

}  // namespace convrot::cuda
