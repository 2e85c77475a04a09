"""8-bit attention for the DiTs without fused Flux.1 processors: diffusers' own processors' computation,
the attention by ``convrot_kernels.attention_8bit`` (q/k int8, P/V fp8 e4m3; docs/format.md, "attention_8bit").

- Wan (WanAttnProcessor): the q/k RMSNorms normalise over all heads at once (not per head, as the
  rms_norm_rope kernel does), so projections, norms and Wan's rotary embedding stay torch's; the
  self-attention, the text cross-attention and the image-context attention of image-to-video models
  all go through the op.
- Flux.2 (Flux2AttnProcessor of the double blocks, Flux2ParallelSelfAttnProcessor of the single
  blocks' fused QKV + MLP projection): projections, per-head norms and rotary embedding as diffusers
  computes them (the classes differ from Flux.1's, whose fused processors use the norm kernel).

The processors with a KV cache (Flux2KV*) are left alone. ``fuse_qk_norm_rope(..., attention="int8")``
installs these (convrot_diffusers.qk_norm_rope), ``unfuse_qk_norm_rope`` gives the stock ones back.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux2, transformer_wan

from convrot_kernels import attention_8bit
from convrot_kernels.attention_8bit import DTYPES

TEXT_CONTEXT = 512  # Wan's text context length: the tokens of an image-to-video context after the image's


def attend_8bit(query, key, value, attention_mask, parallel_config) -> torch.Tensor:
    """[B, S, heads, head_dim] q, k, v -> [B, S, heads * head_dim] by convrot_kernels.attention_8bit, after
    the checks of what a call may bring that the op does not take (every processor with attention="int8")."""
    if attention_mask is not None:
        raise ValueError(
            'attention="int8" (convrot_kernels.attention_8bit) takes no attention mask; this call has '
            "one: fuse_qk_norm_rope(..., attention=None) attends with diffusers' backends, which do"
        )
    if parallel_config is not None:
        raise ValueError(
            'attention="int8" attends within one device: it does not run under diffusers\' context '
            "parallelism (enable_parallelism); fuse_qk_norm_rope(..., attention=None) does"
        )
    if query.dtype not in DTYPES:
        raise TypeError(
            f'attention="int8" takes bf16 or fp16 activations; this call has {query.dtype} '
            "(run the transformer in bf16)"
        )
    return attention_8bit(query, key, value).flatten(2, 3)


class Attention8bitProcessor:
    """What the processors share: the op in place of dispatch_attention_fn, and the calls it refuses."""

    _attention_backend = None
    _parallel_config = None
    attention = "int8"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attention={self.attention!r})"

    def _attend(self, query, key, value, attention_mask=None) -> torch.Tensor:
        """[B, S, heads, head_dim] q, k, v -> [B, S, heads * head_dim]."""
        return attend_8bit(query, key, value, attention_mask, self._parallel_config)


def _wan_rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each pair (x[2i], x[2i+1]) turned by the angle whose cosine is cos[..., 2i]
    and sine sin[..., 2i+1] (the angles come repeated per pair), in the angles' precision."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


class WanAttention8bitProcessor(Attention8bitProcessor):
    """diffusers' WanAttnProcessor with its attention calls by convrot_kernels.attention_8bit."""

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
        query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotated(query, *rotary_emb), _wan_rotated(key, *rotary_emb)
        out = self._attend(query, key, value, attention_mask)
        if image_context is not None:
            key_image, value_image = transformer_wan._get_added_kv_projections(attn, image_context)
            key_image = attn.norm_added_k(key_image)
            out = out + self._attend(
                query, key_image.unflatten(2, (attn.heads, -1)), value_image.unflatten(2, (attn.heads, -1))
            )
        return attn.to_out[1](attn.to_out[0](out))


def _heads(*tensors, head_dim: int):
    return [t.unflatten(-1, (-1, head_dim)) for t in tensors]


class Flux2Attention8bitProcessor(Attention8bitProcessor):
    """diffusers' Flux2AttnProcessor (Flux.2's double-stream attention) with convrot_kernels.attention_8bit."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        query, key, value, encoder_query, encoder_key, encoder_value = transformer_flux2._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = _heads(query, key, value, head_dim=attn.head_dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = _heads(
                encoder_query, encoder_key, encoder_value, head_dim=attn.head_dim
            )
            query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = self._attend(query, key, value, attention_mask)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states))
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        return attn.to_out[1](attn.to_out[0](hidden_states)), attn.to_add_out(encoder_hidden_states)


class Flux2ParallelSelfAttention8bitProcessor(Attention8bitProcessor):
    """diffusers' Flux2ParallelSelfAttnProcessor (Flux.2's single blocks: one projection for q, k, v and the
    MLP's input, one for the attention's and the MLP's outputs) with convrot_kernels.attention_8bit."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        # q, k, v and the MLP input in the proportions of the full projection (a column-sharded one keeps them).
        qkv_width, mlp_width = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_width // (qkv_width + mlp_width)
        qkv, mlp_hidden_states = hidden_states.split([local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = _heads(*qkv.chunk(3, dim=-1), head_dim=attn.head_dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = self._attend(query, key, value, attention_mask)
        return attn.to_out(torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1))


# attention class -> (diffusers' processor it replaces, the 8-bit one)
PROCESSORS = {
    transformer_wan.WanAttention: (transformer_wan.WanAttnProcessor, WanAttention8bitProcessor),
    transformer_flux2.Flux2Attention: (transformer_flux2.Flux2AttnProcessor, Flux2Attention8bitProcessor),
    transformer_flux2.Flux2ParallelSelfAttention: (
        transformer_flux2.Flux2ParallelSelfAttnProcessor,
        Flux2ParallelSelfAttention8bitProcessor,
    ),
}


def head_dim(module) -> int:
    return getattr(module, "head_dim", None) or module.inner_dim // module.heads


def stock_processor(module):
    """A new instance of diffusers' processor that the 8-bit one replaces on ``module``."""
    return next(stock for cls, (stock, _) in PROCESSORS.items() if isinstance(module, cls))()
