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

``fuse_qk_norm_rope(..., attention="int8")`` also replaces the attention itself (diffusers'
dispatch_attention_fn, the backend the module had) by ``convrot_kernels.attention_8bit``: q and k
Hadamard-rotated and quantized to int8, P and V in fp8 e4m3, softmax in fp32 (docs/format.md,
"attention_8bit"). That is an opt-in of these processors rather than a diffusers attention backend:
diffusers' backends are the members of a closed enum (AttentionBackendName), which a package cannot
extend without patching diffusers. The op has no mask, dropout or context parallelism: a call with a
mask and a module under enable_parallelism raise instead of attending differently; calls the norm
kernel does not cover keep the 8-bit attention (torch's norms and rotary embedding, then the op).
On Wan and Flux.2 the same option gives their attention modules the processors of
convrot_diffusers.attention_8bit_processors (diffusers' computation, the attention by the op).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections

from convrot_kernels import rms_norm_rope, rms_norm_rope_into
from convrot_kernels.attention_8bit import HEAD_DIMS as ATTENTION_8BIT_HEAD_DIMS

from . import attention_8bit_processors
from .detect import denoiser_of


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


def _normed_rotated_by_torch(parts, image_rotary_emb) -> torch.Tensor:
    """What _normed_rotated computes, the stock processor's way (each part's norm module, the join,
    diffusers' apply_rotary_emb): for calls the kernel does not cover."""
    joint = torch.cat([norm(x) for x, norm in parts], dim=1) if len(parts) > 1 else parts[0][1](parts[0][0])
    return joint if image_rotary_emb is None else apply_rotary_emb(joint, image_rotary_emb, sequence_dim=1)


def _angles_covered(cos, sin, tokens: int, head_dim: int, device) -> bool:
    return all(
        isinstance(t, torch.Tensor)
        and t.dtype == torch.float32
        and t.shape == (tokens, head_dim)
        and t.device == device
        and t.is_contiguous()
        for t in (cos, sin)
    )


ATTENTIONS = (None, "int8")  # None: the module's diffusers attention backend; "int8": attention_8bit


def check_attention(attention) -> None:
    """Raises ValueError unless ``attention`` is one of ATTENTIONS."""
    if attention is None or (isinstance(attention, str) and attention in ATTENTIONS):
        return
    hint = ""
    if attention == "fp8":
        hint = (
            ' (the 8-bit attention quantizes q and k to int8 and P and V to fp8 e4m3: it is "int8"; '
            "there is no variant with fp8 q and k)"
        )
    raise ValueError(f'attention must be None (diffusers\' attention) or "int8"; got {attention!r}{hint}')


class FluxNormRopeAttnProcessor:
    """diffusers' FluxAttnProcessor with q/k RMSNorm, rotary embedding and stream concatenation fused;
    with ``attention="int8"``, the attention by convrot_kernels.attention_8bit."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention: str | None = None):
        check_attention(attention)
        self.attention = attention
        self._stock = FluxAttnProcessor()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attention={self.attention!r})"

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
        covered = self.covers(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        joint = attn.added_kv_proj_dim is not None
        # Without the norm kernel, the 8-bit attention still runs (torch's norms); a text stream without
        # its projections (or the reverse) is the stock processor's to handle or refuse.
        if not (covered or (self.attention is not None and joint == (encoder_hidden_states is not None))):
            self._stock._attention_backend = self._attention_backend
            self._stock._parallel_config = self._parallel_config
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        if not joint:
            return self.attend_projected(attn, *projections[:3], image_rotary_emb, attention_mask, kernel=covered)
        return self.attend_joint_projected(attn, *projections, image_rotary_emb, attention_mask, kernel=covered)

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
        kernel: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A two-stream module's attention and output projections from its image and text projections
        [B, S, heads * head_dim] and [B, S0, heads * head_dim]: (image output, text output).

        For callers that computed the projections themselves (convrot_diffusers.activation_fusion
        computes a Flux double block's input norms inside their quantization); ``covers`` must hold
        unless ``kernel`` is False (torch's norms and rotary embedding).
        """
        text_tokens = encoder_query.shape[1]
        query, key, value, encoder_query, encoder_key, encoder_value = (
            t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value, encoder_query, encoder_key, encoder_value)
        )
        normed_rotated = self._norm_rope(image_rotary_emb, kernel)
        query = normed_rotated([(encoder_query, attn.norm_added_q), (query, attn.norm_q)])
        key = normed_rotated([(encoder_key, attn.norm_added_k), (key, attn.norm_k)])
        value = torch.cat([encoder_value, value], dim=1)
        hidden_states = self._attention(query, key, value, attention_mask)
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def attend_projected(
        self, attn, query, key, value, image_rotary_emb=None, attention_mask=None, kernel: bool = True
    ) -> torch.Tensor:
        """A single-stream module's attention from its projections q, k, v [B, S, heads * head_dim].

        For callers that computed the projections themselves (convrot_diffusers.activation_fusion
        quantizes a Flux single block's input once for proj_mlp and them); ``covers`` must hold
        unless ``kernel`` is False (torch's norms and rotary embedding).
        """
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        normed_rotated = self._norm_rope(image_rotary_emb, kernel)
        query = normed_rotated([(query, attn.norm_q)])
        key = normed_rotated([(key, attn.norm_k)])
        return self._attention(query, key, value, attention_mask)

    @staticmethod
    def _norm_rope(image_rotary_emb, kernel: bool):
        if not kernel:
            return lambda parts: _normed_rotated_by_torch(parts, image_rotary_emb)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        return lambda parts: _normed_rotated(parts, cos, sin)

    def _attention(self, query, key, value, attention_mask) -> torch.Tensor:
        if self.attention == "int8":
            return attention_8bit_processors.attend_8bit(query, key, value, attention_mask, self._parallel_config)
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


def _check_attention_8bit_applies(transformer, modules: dict) -> None:
    """Raises ValueError (before any module changes) where attention="int8" cannot serve ``modules``
    (name -> attention module): none at all, a head dimension the op does not take, a GPU other than
    Hopper, context parallelism."""
    if not modules:
        raise ValueError(
            f'attention="int8" comes with the fused Flux.1 attention processors and those of Wan and Flux.2; '
            f"{type(transformer).__name__} has no FluxAttention module with diffusers' FluxAttnProcessor (or the "
            "fused one) and no Wan or Flux.2 attention module with diffusers' stock processor, so nothing would use it"
        )
    for name, module in modules.items():
        head_dim = attention_8bit_processors.head_dim(module)
        if head_dim not in ATTENTION_8BIT_HEAD_DIMS:
            raise ValueError(
                f'attention="int8": {name} has head dimension {head_dim}; '
                f"convrot_kernels.attention_8bit takes {' or '.join(map(str, ATTENTION_8BIT_HEAD_DIMS))}"
            )
        device = next(module.parameters()).device
        if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
            raise ValueError(
                f'attention="int8": {name} is on {torch.cuda.get_device_name(device)}; the 8-bit attention\'s CUDA '
                "kernel needs compute capability 9.0 (Hopper, sm_90a)"
            )
        if module.processor._parallel_config is not None:
            raise ValueError(
                f'attention="int8": {name} runs under context parallelism (enable_parallelism), which the '
                "8-bit attention does not do"
            )


def _modules(transformer, attention_class, stock, ours) -> dict:
    """name -> module for the modules of attention_class with diffusers' stock processor or ours."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, attention_class)
        and (type(module.processor) is stock or isinstance(module.processor, ours))
    }


def fuse_qk_norm_rope(pipe_or_transformer, *, attention: str | None = None) -> int:
    """Gives every Flux attention module with diffusers' stock processor the fused one.

    ``attention``: None keeps the module's diffusers attention backend; "int8" attends with
    ``convrot_kernels.attention_8bit`` (q/k int8, P/V fp8 e4m3; head dimensions 64 and 128, no mask;
    CUDA needs Hopper, sm_90a), on Flux.1 through the fused processors and on Wan and Flux.2 through
    attention_8bit_processors' (diffusers' computation, no norm kernel: Wan's q/k norms span all heads,
    Flux.2's classes are not Flux.1's). Already fused modules get the ``attention`` asked for. The
    processors show it (``module.processor.attention``, their repr).

    Returns how many modules changed. Works on quantized and bf16 transformers alike, before or after
    ``enable_parallelism`` (the processor keeps the attention backend and parallel config; not with
    attention="int8"); call it before torch.compile or CUDA-graph capture. ``unfuse_qk_norm_rope``
    undoes it. Bad arguments raise before any module changes.
    """
    check_attention(attention)
    transformer = denoiser_of(pipe_or_transformer)
    flux = _modules(transformer, FluxAttention, FluxAttnProcessor, FluxNormRopeAttnProcessor)
    others = {}
    for attention_class, (stock, ours) in attention_8bit_processors.PROCESSORS.items():
        others.update(
            {name: (m, stock, ours) for name, m in _modules(transformer, attention_class, stock, ours).items()}
        )
    if attention is not None:
        _check_attention_8bit_applies(transformer, {**flux, **{name: m for name, (m, _, _) in others.items()}})
    changed = 0
    for module in flux.values():
        if type(module.processor) is FluxAttnProcessor:
            _replace_processor(module, FluxNormRopeAttnProcessor(attention))
            changed += 1
        elif module.processor.attention != attention:
            module.processor.attention = attention
            changed += 1
    for module, stock, ours in others.values():
        if getattr(module.processor, "attention", None) != attention:
            _replace_processor(module, stock() if attention is None else ours())
            changed += 1
    return changed


def unfuse_qk_norm_rope(pipe_or_transformer) -> int:
    """Gives the modules fuse_qk_norm_rope changed diffusers' stock processors back; returns how many."""
    restored = 0
    for module in denoiser_of(pipe_or_transformer).modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, FluxNormRopeAttnProcessor):
            _replace_processor(module, FluxAttnProcessor())
            restored += 1
        elif isinstance(getattr(module, "processor", None), attention_8bit_processors.Attention8bitProcessor):
            _replace_processor(module, attention_8bit_processors.stock_processor(module))
            restored += 1
    return restored
