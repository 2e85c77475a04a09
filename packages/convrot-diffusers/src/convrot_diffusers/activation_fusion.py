"""GELU, and Flux single blocks' concatenation and AdaLN norm, fused into the kernels that read them.

Every feed-forward computes ``proj(gelu(h))`` and Flux's single blocks
``proj_out(cat([attn, gelu(mlp)]))``: the activated (and concatenated) tensor
goes to memory only for the next layer's activation quantization to read it
back. ``fuse_activations`` hands that layer its input in parts instead
(ConvLinear's ``gelu_from`` and ``forward(x, x2)``), and the quantization
kernel applies the GELU and joins the parts as it loads each row. The GELU is
the same tanh approximation, rounded to the model's dtype, so outputs equal
the unfused model's except where a GELU value lies within a few fp32 ulps of
a rounding boundary (docs/format.md). Weights and the state dict are untouched.

Handled:
- diffusers' ``FeedForward`` with a tanh GELU (Flux, PixArt, SD3) whose output
  layer is a ConvLinear: the GELU module returns its projection, and the
  output layer applies the GELU;
- Flux's single blocks whose ``proj_out`` is a ConvLinear: their forward is
  replaced by the same computation with the concatenation and GELU moved into
  ``proj_out``, for the forward signature written here (diffusers 0.42's);
  blocks whose forward has another signature are left as they are. Their input
  norm (``AdaLayerNormZeroSingle`` of ``cat([text, image])``) is then
  ``convrot_kernels.layer_norm_modulate`` of the two parts, which reads each row
  once and never joins them: under torch.compile inductor's kernel for it read
  each row twice and was the costliest op of the step after the GEMMs and
  attention (docs/benchmarks.md). Its roundings are those of the eager norm
  (docs/format.md); layers in float simulation keep the torch norm, so that a
  simulated model's outputs stay those of the unfused one bit for bit. Where the
  attention has ``fuse_qk_norm_rope``'s processor and its projections and
  ``proj_mlp`` are alike ConvLinear layers (``ConvLinear.shared_input_error``),
  the normed input is rotated and quantized once for all of them
  (``ConvLinear.forward_shared``, exact) and the processor attends from the
  projections; otherwise the attention module runs as diffusers calls it.
"""

from __future__ import annotations

import inspect
import types

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn

from convrot import ConvLinear
from convrot_kernels import layer_norm_modulate

from .detect import transformer_of
from .qk_norm_rope import FluxNormRopeAttnProcessor


def _feed_forward_layers(module) -> tuple[GELU, ConvLinear] | None:
    """(GELU, output layer) of a FeedForward whose GELU can move into its output layer, or None."""
    if not isinstance(module, FeedForward) or len(module.net) < 3:
        return None
    act, dropout, out = module.net[0], module.net[1], module.net[2]
    fusable = (
        type(act) is GELU
        and act.approximate == "tanh"
        and isinstance(dropout, nn.Dropout)
        and dropout.p == 0  # a dropout between GELU and the layer would otherwise act on the pre-activation
        and isinstance(out, ConvLinear)
        and out.gelu_from is None
    )
    return (act, out) if fusable else None


def _projection_only(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' GELU module without its GELU, which the next layer applies."""
    return self.proj(hidden_states)


def _kernel_norm_covers(norm, proj_out: ConvLinear) -> bool:
    """Whether layer_norm_modulate computes this AdaLN norm (a LayerNorm without affine, kernel layers)."""
    inner = getattr(norm, "norm", None)
    return (
        type(norm) is AdaLayerNormZeroSingle
        and type(inner) is nn.LayerNorm
        and inner.weight is None
        and inner.bias is None
        and len(inner.normalized_shape) == 1
        and proj_out.simulation_dtype is None
    )


def _joint_norm(self, encoder_hidden_states, hidden_states, temb) -> tuple[torch.Tensor, torch.Tensor]:
    """self.norm(cat([text, image], 1), emb=temb): (normed joint sequence, gate)."""
    shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
    dtypes = {encoder_hidden_states.dtype, hidden_states.dtype, shift.dtype}
    if _kernel_norm_covers(self.norm, self.proj_out) and len(dtypes) == 1:
        normed = layer_norm_modulate(hidden_states, scale, shift, eps=self.norm.norm.eps, prefix=encoder_hidden_states)
        return normed, gate
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    return self.norm.norm(joint) * (1 + scale[:, None]) + shift[:, None], gate  # AdaLayerNormZeroSingle's own


def _attention_projections(attn) -> list[ConvLinear | None]:
    """The layers that compute a single-stream attention module's q, k and v (one fused or three; None where absent)."""
    names = ("to_qkv",) if getattr(attn, "fused_projections", False) else ("to_q", "to_k", "to_v")
    return [getattr(attn, name, None) for name in names]


def _mlp_and_attention(self, norm_hidden_states, image_rotary_emb, joint_attention_kwargs):
    """(proj_mlp(x), self.attn(x)), with x quantized once for both where the layers and processor allow."""
    processor = self.attn.processor
    layers = [self.proj_mlp, *_attention_projections(self.attn)]
    if (
        not joint_attention_kwargs
        and isinstance(processor, FluxNormRopeAttnProcessor)
        and ConvLinear.shared_input_error(layers) is None
        and processor.covers(self.attn, norm_hidden_states, None, image_rotary_emb)
    ):
        mlp_hidden_states, *projections = ConvLinear.forward_shared(layers, norm_hidden_states)
        query, key, value = projections[0].chunk(3, dim=-1) if len(projections) == 1 else projections
        return mlp_hidden_states, processor.attend_projected(self.attn, query, key, value, image_rotary_emb)
    attn_output = self.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    return self.proj_mlp(norm_hidden_states), attn_output


def _fused_single_block_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxSingleTransformerBlock.forward (diffusers 0.42) with proj_out given cat([attn, gelu(mlp)]) in parts,
    the input norm read from the text and image parts, and proj_mlp and the attention projections reading one
    quantized input."""
    text_seq_len = encoder_hidden_states.shape[1]
    norm_hidden_states, gate = _joint_norm(self, encoder_hidden_states, hidden_states, temb)
    residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    # The GELU of the MLP branch runs inside proj_out.
    mlp_hidden_states, attn_output = _mlp_and_attention(
        self, norm_hidden_states, image_rotary_emb, joint_attention_kwargs
    )
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


_SINGLE_BLOCK_PARAMETERS = list(inspect.signature(_fused_single_block_forward).parameters)


def _single_block_fusable(block) -> bool:
    if not isinstance(block, FluxSingleTransformerBlock) or "forward" in vars(block):
        return False
    act, proj_out = block.act_mlp, block.proj_out
    return (
        list(inspect.signature(type(block).forward).parameters) == _SINGLE_BLOCK_PARAMETERS
        and isinstance(act, nn.GELU)
        and act.approximate == "tanh"
        and isinstance(proj_out, ConvLinear)
        and proj_out.gelu_from is None
        and (proj_out.in_features - block.proj_mlp.out_features) % 16 == 0
    )


def fuse_activations(pipe_or_transformer) -> int:
    """Fuses GELUs (and Flux single blocks' concatenation) into the quantized layers after them.

    Returns how many modules (feed-forwards and single blocks) were changed. Call it after
    quantizing or loading, before torch.compile or CUDA-graph capture; it saves a read and a
    write of the activated tensor per feed-forward (and of the concatenated one per single block).
    """
    fused = 0
    for module in transformer_of(pipe_or_transformer).modules():
        if layers := _feed_forward_layers(module):
            act, out = layers
            act.forward = types.MethodType(_projection_only, act)
            out.gelu_from = 0
            fused += 1
        elif _single_block_fusable(module):
            module.proj_out.gelu_from = module.proj_out.in_features - module.proj_mlp.out_features
            module.forward = types.MethodType(_fused_single_block_forward, module)
            fused += 1
    return fused


def unfuse_activations(pipe_or_transformer) -> int:
    """Undoes fuse_activations; returns how many modules were restored."""
    restored = 0
    for module in transformer_of(pipe_or_transformer).modules():
        if isinstance(module, FeedForward) and "forward" in vars(module.net[0]):
            del module.net[0].forward
            module.net[2].gelu_from = None
            restored += 1
        elif isinstance(module, FluxSingleTransformerBlock) and "forward" in vars(module):
            del module.forward
            module.proj_out.gelu_from = None
            restored += 1
    return restored
