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

// Throws std::runtime_error (with a message) on a shape or an alignment the kernel does not take; the device
// (sm_90, a build with sm_90a code) is its caller's to check.
void check_attention_8bit_sm90(const Attention8bit& a);

// Enqueues the kernel on a call check_attention_8bit_sm90 accepted (attention_8bit checks before its pre-pass).
void attention_8bit_sm90(const Attention8bit& a, void* stream);

}  // namespace convrot::cuda
