"""Wan's attention with 8-bit attention: diffusers' WanAttnProcessor computation, the attention by
``convrot_kernels.attention_8bit`` (q/k int8, P/V fp8 e4m3; docs/format.md, "attention_8bit").

Wan's q/k RMSNorms normalise over all heads at once (not per head, as Flux's and the rms_norm_rope
kernel do), so the norms, projections and rotary embedding stay torch's; the self-attention, the text
cross-attention and the image-context attention of image-to-video models all go through the op.
``fuse_qk_norm_rope(..., attention="int8")`` installs it (convrot_diffusers.qk_norm_rope).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from convrot_kernels import attention_8bit
from convrot_kernels.attention_8bit import DTYPES

TEXT_CONTEXT = 512  # Wan's text context length: the tokens of an image-to-video context after the image's


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each pair (x[2i], x[2i+1]) turned by the angle whose cosine is cos[..., 2i]
    and sine sin[..., 2i+1] (the angles come repeated per pair), in the angles' precision."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


class WanAttention8bitProcessor:
    """diffusers' WanAttnProcessor with its attention calls by convrot_kernels.attention_8bit."""

    _attention_backend = None
    _parallel_config = None
    attention = "int8"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attention={self.attention!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        image_context = None
        if attn.add_k_proj is not None:
            image_tokens = encoder_hidden_states.shape[1] - TEXT_CONTEXT
            image_context = encoder_hidden_states[:, :image_tokens]
            encoder_hidden_states = encoder_hidden_states[:, image_tokens:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotated(query, *rotary_emb), _rotated(key, *rotary_emb)
        out = self._attend(query, key, value, attention_mask)
        if image_context is not None:
            key_image, value_image = _get_added_kv_projections(attn, image_context)
            key_image = attn.norm_added_k(key_image)
            out = out + self._attend(
                query, key_image.unflatten(2, (attn.heads, -1)), value_image.unflatten(2, (attn.heads, -1)), None
            )
        return attn.to_out[1](attn.to_out[0](out))

    def _attend(self, query, key, value, attention_mask) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(
                'attention="int8" (convrot_kernels.attention_8bit) takes no attention mask; this call has one'
            )
        if self._parallel_config is not None:
            raise ValueError(
                'attention="int8" attends within one device: it does not run under diffusers\' context parallelism'
            )
        if query.dtype not in DTYPES:
            raise TypeError(
                f'attention="int8" takes bf16 or fp16 activations; this call has {query.dtype} (run the transformer '
                "in bf16)"
            )
        return attention_8bit(query, key, value).flatten(2, 3)
