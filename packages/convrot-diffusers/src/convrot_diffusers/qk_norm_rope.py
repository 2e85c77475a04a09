"""Flux attention with the q/k RMSNorm and the rotary embedding in one kernel per tensor.

diffusers' ``FluxAttnProcessor`` normalises q and k (``torch.nn.RMSNorm`` over
each head) and rotates them (``apply_rotary_emb``) with about a dozen eager elementwise
kernels per tensor, half of them in fp32, then concatenates the text and image
streams: in an eager Flux step that is more time than the attention itself.
``fuse_qk_norm_rope`` gives each Flux attention module a processor that does the
same computation with ``convrot_kernels.rms_norm_rope``, one read and one write
per tensor, each stream written straight into its part of the joint q and k.
The roundings are torch's and diffusers' own (docs/format.md, "rms_norm_rope"):
outputs equal the stock processor's except for rare last-bit differences of the
mean square's summation order. Under torch.compile the processor calls the torch.library op,
which writes the text and image parts of the joint q (and k) itself.

Nothing here depends on quantization: it works on bf16 transformers too. Modules
with another processor (IP-Adapter, a user's own) are left alone, and a call the
kernel does not cover (another norm class, a weight of another dtype, angles
that are not fp32 [tokens, head_dim]) runs the stock processor.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections

from convrot_kernels import rms_norm_rope, rms_norm_rope_into

from .detect import transformer_of


def _covered(norm, dtype: torch.dtype, head_dim: int) -> bool:
    return (
        type(norm) is torch.nn.RMSNorm
        and tuple(norm.normalized_shape) == (head_dim,)
        and (norm.weight is None or norm.weight.dtype == dtype)
    )


def _eps(norm) -> float:
    return torch.finfo(torch.float32).eps if norm.eps is None else norm.eps  # torch.nn.RMSNorm's default


def _normed_rotated(parts, cos, sin) -> torch.Tensor:
    """RMSNorm + rotary embedding of each (x [B, S_i, H, D], norm), joined along the tokens in order
    (one part, or the text and the image stream's)."""
    if torch.compiler.is_compiling():  # one op call writes every part: no concatenation after it
        *text, (x, norm) = parts
        prefix = {}
        if text:
            ((text_x, text_norm),) = text
            prefix = {"prefix": text_x, "prefix_weight": text_norm.weight, "prefix_eps": _eps(text_norm)}
        return rms_norm_rope(x, norm.weight, cos, sin, eps=_eps(norm), **prefix)
    # Eagerly, destination-passing calls into one buffer (no custom-op dispatch on the host).
    starts = [0]
    for x, _ in parts:
        starts.append(starts[-1] + x.shape[1])

    def angles(i):
        return (None, None) if cos is None else (cos[starts[i] : starts[i + 1]], sin[starts[i] : starts[i + 1]])

    first = parts[0][0]
    joint = first.new_empty(first.shape[0], starts[-1], *first.shape[2:])
    for i, (x, norm) in enumerate(parts):
        rms_norm_rope_into(x, joint[:, starts[i] : starts[i + 1]], norm.weight, *angles(i), eps=_eps(norm))
    return joint


def _angles_covered(cos, sin, tokens: int, head_dim: int, device) -> bool:
    return all(
        isinstance(t, torch.Tensor)
        and t.dtype == torch.float32
        and t.shape == (tokens, head_dim)
        and t.device == device
        and t.is_contiguous()
        for t in (cos, sin)
    )


class FluxNormRopeAttnProcessor:
    """diffusers' FluxAttnProcessor with q/k RMSNorm, rotary embedding and stream concatenation fused."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self):
        self._stock = FluxAttnProcessor()

    def covers(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None) -> bool:
        """Whether the fused kernels compute this call (else it runs diffusers' processor)."""
        joint = attn.added_kv_proj_dim is not None
        if joint != (encoder_hidden_states is not None):  # a text stream without its projections, or the reverse
            return False
        norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if joint else [])
        tokens = hidden_states.shape[1] + (encoder_hidden_states.shape[1] if joint else 0)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        return all(_covered(norm, hidden_states.dtype, attn.head_dim) for norm in norms) and (
            cos is None or _angles_covered(cos, sin, tokens, attn.head_dim, hidden_states.device)
        )

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if not self.covers(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
            self._stock._attention_backend = self._attention_backend
            self._stock._parallel_config = self._parallel_config
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        if attn.added_kv_proj_dim is None:
            return self.attend_projected(attn, *projections[:3], image_rotary_emb, attention_mask)
        return self.attend_joint_projected(attn, *projections, image_rotary_emb, attention_mask)

    def attend_joint_projected(
        self,
        attn,
        query,
        key,
        value,
        encoder_query,
        encoder_key,
        encoder_value,
        image_rotary_emb=None,
        attention_mask=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A two-stream module's attention and output projections from its image and text projections
        [B, S, heads * head_dim] and [B, S0, heads * head_dim]: (image output, text output).

        For callers that computed the projections themselves (convrot_diffusers.activation_fusion
        computes a Flux double block's input norms inside their quantization); ``covers`` must hold.
        """
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        text_tokens = encoder_query.shape[1]
        query, key, value, encoder_query, encoder_key, encoder_value = (
            t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value, encoder_query, encoder_key, encoder_value)
        )
        query = _normed_rotated([(encoder_query, attn.norm_added_q), (query, attn.norm_q)], cos, sin)
        key = _normed_rotated([(encoder_key, attn.norm_added_k), (key, attn.norm_k)], cos, sin)
        value = torch.cat([encoder_value, value], dim=1)
        hidden_states = self._attention(query, key, value, attention_mask)
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def attend_projected(self, attn, query, key, value, image_rotary_emb=None, attention_mask=None) -> torch.Tensor:
        """A single-stream module's attention from its projections q, k, v [B, S, heads * head_dim].

        For callers that computed the projections themselves (convrot_diffusers.activation_fusion
        quantizes a Flux single block's input once for proj_mlp and them); ``covers`` must hold.
        """
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query = _normed_rotated([(query, attn.norm_q)], cos, sin)
        key = _normed_rotated([(key, attn.norm_k)], cos, sin)
        return self._attention(query, key, value, attention_mask)

    def _attention(self, query, key, value, attention_mask) -> torch.Tensor:
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return hidden_states.flatten(2, 3).to(query.dtype)


def _replace_processor(module, processor) -> None:
    """Gives ``module`` ``processor`` with the attention backend and parallel config of the one it replaces:
    a transformer under context parallelism (diffusers' enable_parallelism) keeps attending across ranks."""
    processor._attention_backend = module.processor._attention_backend
    processor._parallel_config = module.processor._parallel_config
    module.set_processor(processor)


def fuse_qk_norm_rope(pipe_or_transformer) -> int:
    """Gives every Flux attention module with diffusers' stock processor the fused one.

    Returns how many modules changed. Works on quantized and bf16 transformers alike, before or after
    ``enable_parallelism`` (the processor keeps the attention backend and parallel config);
    call it before torch.compile or CUDA-graph capture. ``unfuse_qk_norm_rope`` undoes it.
    """
    fused = 0
    for module in transformer_of(pipe_or_transformer).modules():
        if isinstance(module, FluxAttention) and type(module.processor) is FluxAttnProcessor:
            _replace_processor(module, FluxNormRopeAttnProcessor())
            fused += 1
    return fused


def unfuse_qk_norm_rope(pipe_or_transformer) -> int:
    """Gives the modules fuse_qk_norm_rope changed diffusers' stock processor back; returns how many."""
    restored = 0
    for module in transformer_of(pipe_or_transformer).modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, FluxNormRopeAttnProcessor):
            _replace_processor(module, FluxAttnProcessor())
            restored += 1
    return restored
