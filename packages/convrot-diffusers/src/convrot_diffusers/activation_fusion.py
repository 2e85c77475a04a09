"""GELU, and Flux blocks' concatenation and AdaLN norms, fused into the kernels that read them.

Every feed-forward computes ``proj(gelu(h))`` and Flux's single blocks
``proj_out(cat([attn, gelu(mlp)]))``: the activated (and concatenated) tensor
goes to memory only for the next layer's activation quantization to read it
back. ``fuse_activations`` hands that layer its input in parts instead
(ConvLinear's ``gelu_from`` and ``forward(x, x2)``), and the quantization
kernel applies the GELU and joins the parts as it loads each row. The GELU is
the same tanh approximation, rounded to the model's dtype, so outputs equal
the unfused model's except where a GELU value lies within a few fp32 ulps of
a rounding boundary (docs/format.md). Weights and the state dict are untouched.

Each fused module becomes an instance of a subclass of its diffusers class
(``DeferredGELU``, ``ConvRotFluxSingleTransformerBlock``,
``ConvRotFluxTransformerBlock``): fusing sets the instance's class, unfusing
sets it back, so the module keeps its submodules, state dict and any diffusers
hook, and ``print(model)`` names what was fused. The block classes compute
diffusers' block forwards, identical from 0.36.0 to 0.42.1, so block fusion is
refused outside the tested diffusers range (versions.py).

Handled:
- diffusers' ``FeedForward`` with a tanh GELU (Flux, PixArt, SD3) whose output
  layer is a ConvLinear: its GELU module becomes a ``DeferredGELU``, which
  returns its projection, and the output layer applies the GELU;
- Flux's single blocks whose ``proj_out`` is a ConvLinear
  (``ConvRotFluxSingleTransformerBlock``): the concatenation and GELU move into
  ``proj_out``. Their input norm (``AdaLayerNormZeroSingle`` of ``cat([text,
  image])``) is then ``convrot_kernels.layer_norm_modulate`` of the two parts,
  which reads each row once and never joins them: under torch.compile
  inductor's kernel for it read each row twice and was the costliest op of the
  step after the GEMMs and attention (`git show 8b40706:docs/benchmarks.md`). Its roundings are
  those of the eager norm (docs/format.md); layers in float simulation keep the
  torch norm, so that a simulated model's outputs stay those of the unfused one
  bit for bit. Where the attention has ``fuse_qk_norm_rope``'s processor and
  its projections and ``proj_mlp`` are alike ConvLinear layers
  (``ConvLinear.shared_input_error``), the normed input is rotated and quantized
  once for all of them (``ConvLinear.forward_shared``, exact) and the processor
  attends from the projections; otherwise the attention module runs as
  diffusers calls it. When both apply, the norm itself runs inside that
  quantization (``ConvLinear.forward_shared_normed``, exact): the normed tensor
  never goes to memory.
- Flux's double blocks whose attention projections are ConvLinear layers
  (``ConvRotFluxTransformerBlock``): each stream's input norm
  (``AdaLayerNormZero``, a LayerNorm without affine) is computed inside the
  quantization of that stream's q, k and v projections, where the processor is
  ``fuse_qk_norm_rope``'s, ``joint_attention_kwargs`` is empty and each
  stream's projections are alike kernel layers; otherwise the block computes
  AdaLayerNormZero's own formula and calls the attention as diffusers does
  (simulated layers always do, so simulated outputs stay bit for bit).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from convrot import ConvLinear
from convrot_kernels import layer_norm_modulate

from .detect import transformer_of
from .qk_norm_rope import FluxNormRopeAttnProcessor
from .versions import check_diffusers


class FusedModule:
    """Base of the classes fuse_activations gives a diffusers module in place of its own (``stock_class``)."""

    stock_class: type[nn.Module]

    @classmethod
    def fuse(cls, module: nn.Module) -> None:
        module.__class__ = cls
        module._on_fuse()

    def unfuse(self) -> None:
        self._on_unfuse()
        self.__class__ = self.stock_class

    def _on_fuse(self) -> None:
        """Sets what the fused forward needs of the submodules (e.g. a layer's gelu_from)."""

    def _on_unfuse(self) -> None:
        """Undoes _on_fuse."""


def _fused_forward(forward):
    """Decorates a FusedModule subclass's forward. A diffusers hook registered while the module was fused
    holds this method bound to the instance and keeps calling it after unfuse_activations has given the
    instance its stock class back: from then on it runs the stock forward."""

    @functools.wraps(forward)
    def dispatch(self, *args, **kwargs):
        if isinstance(self, FusedModule):
            return forward(self, *args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    return dispatch


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


def _plain_layer_norm(norm) -> bool:
    """Whether norm is the LayerNorm layer_norm_modulate computes (no weight or bias, over the last dim)."""
    return type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None and len(norm.normalized_shape) == 1


def _kernel_norm_covers(norm, proj_out: ConvLinear) -> bool:
    """Whether layer_norm_modulate computes this AdaLN norm (a LayerNorm without affine, kernel layers)."""
    return (
        type(norm) is AdaLayerNormZeroSingle
        and _plain_layer_norm(getattr(norm, "norm", None))
        and proj_out.simulation_dtype is None
    )


def _kernel_norm(self, encoder_hidden_states, hidden_states, shift) -> bool:
    """Whether layer_norm_modulate computes this single block's input norm for these inputs."""
    dtypes = {encoder_hidden_states.dtype, hidden_states.dtype, shift.dtype}
    return _kernel_norm_covers(self.norm, self.proj_out) and len(dtypes) == 1


def _joint_norm(self, encoder_hidden_states, hidden_states, shift, scale, kernel_norm: bool) -> torch.Tensor:
    """self.norm(cat([text, image], 1), emb=temb)'s normed joint sequence, from its shift and scale chunks."""
    if kernel_norm:
        return layer_norm_modulate(hidden_states, scale, shift, eps=self.norm.norm.eps, prefix=encoder_hidden_states)
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    return self.norm.norm(joint) * (1 + scale[:, None]) + shift[:, None]  # AdaLayerNormZeroSingle's own


def _stream_projections(attn, text: bool = False) -> list[ConvLinear | None]:
    """The layers that compute an attention module's q, k and v (of the image stream, or with text=True the
    text stream's), as diffusers' _get_qkv_projections picks them (one fused or three; None where absent)."""
    if getattr(attn, "fused_projections", False):
        return [getattr(attn, "to_added_qkv" if text else "to_qkv", None)]
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if text else ("to_q", "to_k", "to_v")
    return [getattr(attn, name, None) for name in names]


def _split_qkv(projections: list[torch.Tensor]) -> list[torch.Tensor]:
    """q, k and v from the outputs of _stream_projections' layers (one fused output or three)."""
    return list(projections[0].chunk(3, dim=-1)) if len(projections) == 1 else projections


def _shared_layers(self, normed_like, image_rotary_emb, joint_attention_kwargs) -> list[ConvLinear] | None:
    """[proj_mlp, *attention projections] when they can read one quantized input (of normed_like's shape,
    dtype and device) and the processor can attend from their outputs, else None."""
    processor = self.attn.processor
    layers = [self.proj_mlp, *_stream_projections(self.attn)]
    shareable = (
        not joint_attention_kwargs
        and isinstance(processor, FluxNormRopeAttnProcessor)
        and ConvLinear.shared_input_error(layers) is None
        and processor.covers(self.attn, normed_like, None, image_rotary_emb)
    )
    return layers if shareable else None


def _attend_projected(self, projections, image_rotary_emb) -> torch.Tensor:
    query, key, value = _split_qkv(projections)
    return self.attn.processor.attend_projected(self.attn, query, key, value, image_rotary_emb)


def _mlp_and_attention(
    self, encoder_hidden_states, hidden_states, joint, shift, scale, image_rotary_emb, joint_attention_kwargs
):
    """(proj_mlp(x), self.attn(x)) for x the block's normed joint input: x quantized once for both where the
    layers and processor allow, and normed inside that quantization where layer_norm_modulate covers the norm.
    joint is cat([text, image], 1)."""
    kernel_norm = _kernel_norm(self, encoder_hidden_states, hidden_states, shift)
    # With the kernel's norm, the normed tensor has the joint sequence's shape, dtype and device.
    norm_hidden_states = (
        None if kernel_norm else _joint_norm(self, encoder_hidden_states, hidden_states, shift, scale, False)
    )
    layers = _shared_layers(
        self, joint if kernel_norm else norm_hidden_states, image_rotary_emb, joint_attention_kwargs
    )
    if layers and kernel_norm:
        mlp_hidden_states, *projections = ConvLinear.forward_shared_normed(
            layers, hidden_states, scale, shift, eps=self.norm.norm.eps, prefix=encoder_hidden_states
        )
        return mlp_hidden_states, _attend_projected(self, projections, image_rotary_emb)
    if kernel_norm:
        norm_hidden_states = _joint_norm(self, encoder_hidden_states, hidden_states, shift, scale, True)
    if layers:
        mlp_hidden_states, *projections = ConvLinear.forward_shared(layers, norm_hidden_states)
        return mlp_hidden_states, _attend_projected(self, projections, image_rotary_emb)
    attn_output = self.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    return self.proj_mlp(norm_hidden_states), attn_output


def _normed_joint_attention(
    self, hidden_states, encoder_hidden_states, image_mod, text_mod, image_rotary_emb, joint_attention_kwargs
):
    """self.attn of the two streams' norm1 outputs, each norm computed inside the quantization of its stream's
    projections (image_mod, text_mod: the (shift, scale) chunks); None where the norms, layers or processor
    do not allow it."""
    attn = self.attn
    processor = attn.processor
    streams = (_stream_projections(attn), _stream_projections(attn, text=True))
    dtypes = {hidden_states.dtype, encoder_hidden_states.dtype, image_mod[0].dtype, text_mod[0].dtype}
    if (
        joint_attention_kwargs
        or not isinstance(processor, FluxNormRopeAttnProcessor)
        or len(dtypes) != 1
        or not all(_plain_layer_norm(norm.norm) for norm in (self.norm1, self.norm1_context))
        or any(ConvLinear.shared_input_error(layers) is not None for layers in streams)
        or any(layers[0].simulation_dtype is not None for layers in streams)  # simulations keep torch's norm
        or not processor.covers(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    ):
        return None
    projections = []
    for layers, x, (shift, scale), norm in zip(
        streams,
        (hidden_states, encoder_hidden_states),
        (image_mod, text_mod),
        (self.norm1, self.norm1_context),
        strict=True,
    ):
        outputs = ConvLinear.forward_shared_normed(layers, x, scale, shift, eps=norm.norm.eps)
        projections += _split_qkv(outputs)
    return processor.attend_joint_projected(attn, *projections, image_rotary_emb)


def _projection_of_fused_feed_forward(ff) -> ConvLinear | None:
    """The first layer of a feed-forward whose GELU fuse_activations moved into its output layer (its GELU
    module then returns this layer's output), else None."""
    if not isinstance(ff, FeedForward) or len(ff.net) < 3 or not isinstance(ff.net[0], DeferredGELU):
        return None
    proj = getattr(ff.net[0], "proj", None)
    return proj if isinstance(proj, ConvLinear) else None


def _gated_residual_feed_forward(ff, norm, x, branch, gate, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, ff(norm(h) * (1 + scale[:, None]) + shift[:, None])) for h = x + gate[:, None] * branch: a double block's
    stream after its attention. Where the norm is a kernel LayerNorm and the feed-forward's GELU has moved into
    its output layer, the sum, the norm and the first layer's activation quantization run in one kernel
    (``ConvLinear.forward_shared_residual_normed``, exact); otherwise diffusers' ops."""
    first = _projection_of_fused_feed_forward(ff)
    if (
        _plain_layer_norm(norm)
        and first is not None
        and first.simulation_dtype is None
        and len({x.dtype, branch.dtype, gate.dtype, scale.dtype}) == 1
    ):
        total, (projected,) = ConvLinear.forward_shared_residual_normed(
            [first], x, branch, gate, scale, shift, eps=norm.eps
        )
        for module in ff.net[1:]:
            projected = module(projected)
        return total, projected
    total = x + gate.unsqueeze(1) * branch
    return total, ff(norm(total) * (1 + scale[:, None]) + shift[:, None])


class DeferredGELU(FusedModule, GELU):
    """diffusers' GELU module of a FeedForward whose output layer (a ConvLinear) applies the GELU: it returns
    its projection."""

    stock_class = GELU

    @_fused_forward
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class ConvRotFluxSingleTransformerBlock(FusedModule, FluxSingleTransformerBlock):
    """FluxSingleTransformerBlock with proj_out given cat([attn, gelu(mlp)]) in parts, the input norm read from
    the text and image parts (and computed inside the quantization of the layers that read it), and proj_mlp
    and the attention projections reading one quantized input."""

    stock_class = FluxSingleTransformerBlock

    @classmethod
    def fusable(cls, block) -> bool:
        """Whether a FluxSingleTransformerBlock can take this class."""
        act, proj_out = block.act_mlp, block.proj_out
        return (
            isinstance(act, nn.GELU)
            and act.approximate == "tanh"
            and isinstance(proj_out, ConvLinear)
            and proj_out.gelu_from is None
            and (proj_out.in_features - block.proj_mlp.out_features) % 16 == 0
        )

    def _on_fuse(self) -> None:
        self.proj_out.gelu_from = self.proj_out.in_features - self.proj_mlp.out_features

    def _on_unfuse(self) -> None:
        self.proj_out.gelu_from = None

    @_fused_forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_len = encoder_hidden_states.shape[1]
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # The GELU of the MLP branch runs inside proj_out.
        mlp_hidden_states, attn_output = _mlp_and_attention(
            self, encoder_hidden_states, hidden_states, residual, shift, scale, image_rotary_emb, joint_attention_kwargs
        )
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out(attn_output, mlp_hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class ConvRotFluxTransformerBlock(FusedModule, FluxTransformerBlock):
    """FluxTransformerBlock with each stream's input norm (norm1, norm1_context) computed inside the
    quantization of its attention projections, where those and the processor allow, and each stream's residual
    update and second norm inside the quantization of its feed-forward's input."""

    stock_class = FluxTransformerBlock

    @classmethod
    def fusable(cls, block) -> bool:
        """Whether a FluxTransformerBlock can take this class."""
        return all(
            type(norm) is AdaLayerNormZero and norm.emb is None for norm in (block.norm1, block.norm1_context)
        ) and isinstance(_stream_projections(block.attn)[0], ConvLinear)

    @_fused_forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(self.norm1.silu(temb)).chunk(
            6, dim=1
        )
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
            self.norm1_context.silu(temb)
        ).chunk(6, dim=1)
        joint_attention_kwargs = joint_attention_kwargs or {}
        attention_outputs = _normed_joint_attention(
            self,
            hidden_states,
            encoder_hidden_states,
            (shift_msa, scale_msa),
            (c_shift_msa, c_scale_msa),
            image_rotary_emb,
            joint_attention_kwargs,
        )
        if attention_outputs is None:  # AdaLayerNormZero's own formula, then diffusers' call
            norm_hidden_states = self.norm1.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            norm_encoder_hidden_states = (
                self.norm1_context.norm(encoder_hidden_states) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
            )
            attention_outputs = self.attn(
                hidden_states=norm_hidden_states,
                encoder_hidden_states=norm_encoder_hidden_states,
                image_rotary_emb=image_rotary_emb,
                **joint_attention_kwargs,
            )
        # From here on diffusers' forward, each stream's residual update and second norm through
        # _gated_residual_feed_forward.
        attn_output, context_attn_output = attention_outputs[:2]
        hidden_states, ff_output = _gated_residual_feed_forward(
            self.ff, self.norm2, hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp
        )
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
        if len(attention_outputs) == 3:  # IP-Adapter's image attention
            hidden_states = hidden_states + attention_outputs[2]

        encoder_hidden_states, context_ff_output = _gated_residual_feed_forward(
            self.ff_context,
            self.norm2_context,
            encoder_hidden_states,
            context_attn_output,
            c_gate_msa,
            c_scale_mlp,
            c_shift_mlp,
        )
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


BLOCK_CLASSES = (ConvRotFluxSingleTransformerBlock, ConvRotFluxTransformerBlock)
_FUSED_BY_STOCK = {cls.stock_class: cls for cls in BLOCK_CLASSES}


def _register_with_diffusers_hooks(transformer) -> None:
    """Lets diffusers' caching hooks (FirstBlockCache, MagCache...) and regional compilation treat the fused
    blocks as the stock ones: the hooks look a block's metadata up by its exact class, compile_repeated_blocks
    by its class name."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls in BLOCK_CLASSES:
        try:
            TransformerBlockRegistry.get(cls)
            continue  # registered by an earlier fusion
        except ValueError:
            pass
        try:
            stock = TransformerBlockRegistry.get(cls.stock_class)
        except ValueError:  # diffusers has no metadata for the stock block: nothing to inherit
            continue
        # A copy: register() sets the metadata's class, which the stock block's must keep.
        TransformerBlockRegistry.register(model_class=cls, metadata=dataclasses.replace(stock))
    repeated = list(getattr(type(transformer), "_repeated_blocks", []))
    if repeated:
        extra = [cls.__name__ for cls in BLOCK_CLASSES if cls.stock_class.__name__ in repeated]
        transformer._repeated_blocks = repeated + [name for name in extra if name not in repeated]


def _hooked(module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and bool(registry.hooks)


def _plan(transformer) -> list[tuple[str, nn.Module, type[FusedModule] | None]]:
    """(name, module, block class or None for a feed-forward) per module fuse_activations changes: blocks of
    exactly diffusers' classes (a subclass has a forward of its own)."""
    plan = []
    for name, module in transformer.named_modules():
        if _feed_forward_layers(module):
            plan.append((name, module, None))
        elif (cls := _FUSED_BY_STOCK.get(type(module))) is not None and cls.fusable(module):
            plan.append((name, module, cls))
    return plan


def fuse_activations(pipe_or_transformer) -> int:
    """Fuses GELUs (and Flux blocks' concatenation and input norms) into the quantized layers after them.

    Returns how many modules (feed-forwards, single and double blocks) were changed. Call it after
    quantizing or loading, before torch.compile, CUDA-graph capture or diffusers hooks (caching, offloading):
    it saves a read and a write of the activated tensor per feed-forward (and of the concatenated or normed
    one per block). Raises UnsupportedDiffusersError, changing nothing, when there are Flux blocks to fuse and
    the installed diffusers is outside the range their classes were written for.
    """
    transformer = transformer_of(pipe_or_transformer)
    plan = _plan(transformer)
    if any(cls is not None for _, _, cls in plan):
        check_diffusers("fuse_activations of Flux blocks")
    # A feed-forward's fused module is its GELU; a block's, the block.
    hooked = [name for name, module, cls in plan if _hooked(module if cls else module.net[0])]
    if hooked:
        raise ValueError(
            f"fuse_activations: {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''} already carry diffusers "
            "hooks, which would keep calling the unfused forward: fuse before enabling caching or offloading"
        )
    for _, module, cls in plan:
        if cls is None:
            act, out = _feed_forward_layers(module)
            DeferredGELU.fuse(act)
            out.gelu_from = 0
        else:
            cls.fuse(module)
    if any(cls is not None for _, _, cls in plan):
        _register_with_diffusers_hooks(transformer)
    return len(plan)


def unfuse_activations(pipe_or_transformer) -> int:
    """Undoes fuse_activations (diffusers hooks installed since stay); returns how many modules were restored."""
    transformer = transformer_of(pipe_or_transformer)
    restored = 0
    for module in transformer.modules():
        if isinstance(module, FeedForward) and isinstance(module.net[0], DeferredGELU):
            module.net[0].unfuse()
            module.net[2].gelu_from = None
            restored += 1
        elif isinstance(module, BLOCK_CLASSES):
            module.unfuse()
            restored += 1
    if "_repeated_blocks" in vars(transformer):
        del transformer._repeated_blocks
    return restored
