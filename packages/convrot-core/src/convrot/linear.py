"""ConvLinear4bit / ConvLinear8bit: nn.Linear replacements with rotated, quantized weights and activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convrot_kernels import layer_norm_modulate, pack_int4

from .fused_input import materialize
from .hadamard import check_rotation, resolve_group_size
from .ops import linear_forward, normed_input_forward, residual_normed_input_forward, shared_input_forward
from .quantizer.fake_quant import simulated_linear
from .quantizer.weight import WEIGHT_GROUP, quantize_weight, quantize_weight_grouped
from .weight_stand_in import WeightStandIn

# Activation dtypes the kernels take; the output has the input's dtype.
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ConvLinear subclasses nn.Linear (without nn.Linear's float weight) so that LoRA loads onto it: diffusers
# builds the PEFT LoraConfig itself, leaving no place to register a custom LoRA layer
# (LoraConfig._register_custom_module), and PEFT's default dispatcher wraps any nn.Linear instance in its
# lora.Linear, which calls the base layer and adds lora_B(lora_A(x)) * scale on the same input. What
# PEFT and diffusers' loaders read of an nn.Linear besides its forward (in/out_features, bias, and
# weight's shape, dtype and device) the class provides; ``weight`` is a WeightStandIn, which refuses
# any computation with a clear error (a merge into it, fuse_lora, among them).
class ConvLinear(nn.Linear):
    """Base of ConvLinear4bit and ConvLinear8bit (``bits``, the weights' width, is set by the subclass).

    ``act_bits``: the activations' width, 4 or 8 (default: the weights'); ConvLinear4bit
    with ``act_bits=8`` is W4A8. ``weight_group_size``: None, or 64 for two-level
    group-scaled 4-bit weights (a multiplier per 64 codes, docs/format.md).

    Buffers (the state dict): ``qweight`` (uint8 [N, K/2] packed int4, or int8
    [N, K]), ``weight_scale`` (fp32 [N]), ``weight_group_scale`` (uint8 [N, K/64],
    group-scaled weights only) and ``bias`` (fp32 [N] or None). The
    weight codes are those of W rotated group-wise along in_features, so
    that quant(x R) quant(W R)^T approximates x W^T. Scales and bias are
    operands of the GEMM's fp32 epilogue and stay fp32 whatever the model's
    dtype; the output has the input's dtype.

    ``simulation_dtype``: None runs the kernels; a float dtype runs the same
    math in torch float ops of that dtype (see convrot.set_simulation).

    ``gelu_from``: None, or a column (a multiple of 16) from which the input
    passes through GELU (tanh approximation) inside the layer, fused into the
    activation quantization; ``forward(x, x2)`` then also takes the input in
    two parts, ``cat([x, x2], -1)``. Set by convrot_diffusers.fuse_activations
    together with the module whose GELU and concatenation it removes.

    An nn.Linear with no float weight: ``weight`` is a WeightStandIn of shape
    [out_features, in_features], dtype ``float_dtype`` (the replaced Linear's, following
    ``model.to(dtype)``) and the codes' device, for code that reads a Linear's weight for those
    (PEFT's LoRA layers take their dtype and device from it); it holds no values. convrot's
    own conversions (quantize_model, the presets) never re-quantize a ConvLinear.
    """

    bits: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 256,
        rotation: str = "regular",
        device=None,
        act_bits: int | None = None,
        weight_group_size: int | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the float weight this layer replaces
        if type(self) is ConvLinear:
            raise TypeError("ConvLinear is a base class: use ConvLinear4bit or ConvLinear8bit")
        check_rotation(rotation)
        self.act_bits = check_scheme(type(self).__name__, self.bits, act_bits, weight_group_size, in_features)
        self.weight_group_size = weight_group_size
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {out_features!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = resolve_group_size(in_features, group_size)
        self.rotation = rotation
        self.simulation_dtype: torch.dtype | None = None
        self.float_dtype = torch.get_default_dtype()
        self.gelu_from = None
        if self.bits == 4:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if weight_group_size is not None:
            groups = in_features // weight_group_size
            self.register_buffer(
                "weight_group_scale", torch.ones(out_features, groups, dtype=torch.uint8, device=device)
            )
        else:
            self.weight_group_scale = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 256,
        rotation: str = "regular",
        clip_search: bool = False,
        act_bits: int | None = None,
        weight_group_size: int | None = None,
    ) -> ConvLinear:
        """Quantizes an nn.Linear (on its own device); the Linear is left unchanged.

        ``group_size`` (the rotation's) falls back to the largest power of 4 below it that
        divides in_features (recorded as ``.group_size``). ``clip_search``
        picks a per-channel clipping ratio of the weight (data-free, see
        quantizer/clip_search.py; per-row scales only). ``act_bits`` and
        ``weight_group_size`` as the constructor's.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, ConvLinear):  # an nn.Linear subclass without float weights
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__} (already quantized)")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            rotation=rotation,
            device="meta",
            act_bits=act_bits,
            weight_group_size=weight_group_size,
        )
        if clip_search and weight_group_size is not None:
            raise ValueError("clip_search picks per-row clipping ratios; group-scaled weights do not take it")
        with torch.no_grad():
            if weight_group_size is not None:
                codes, scale, layer.weight_group_scale = quantize_weight_grouped(
                    linear.weight, layer.group_size, rotation
                )
            else:
                codes, scale = quantize_weight(linear.weight, cls.bits, layer.group_size, rotation, clip_search)
            layer.qweight = pack_int4(codes) if cls.bits == 4 else codes
            layer.weight_scale = scale
            layer.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        layer.float_dtype = linear.weight.dtype
        return layer

    @property
    def kind(self) -> str:
        """The scheme as a policy and checkpoint name: w4a4, w8a8, w4a8, w4a4g64 or w4a8g64."""
        return scheme_kind(self.bits, self.act_bits, self.weight_group_size)

    def _with_buffers(self, qweight, weight_scale, bias, weight_group_scale=None) -> ConvLinear:
        """A layer of this one's kind and settings holding the given buffers (out_features from them)."""
        layer = type(self)(
            self.in_features,
            weight_scale.shape[0],
            bias=bias is not None,
            group_size=self.group_size,
            rotation=self.rotation,
            device="meta",
            act_bits=self.act_bits,
            weight_group_size=self.weight_group_size,
        )
        layer.qweight, layer.weight_scale, layer.bias = qweight, weight_scale, bias
        layer.weight_group_scale = weight_group_scale
        layer.simulation_dtype = self.simulation_dtype
        layer.float_dtype = self.float_dtype
        layer.gelu_from = self.gelu_from
        return layer

    @property
    def weight(self) -> WeightStandIn:
        """The float weight's shape, dtype and device, without values (see WeightStandIn).

        Refused for a layer with ``gelu_from``: code that reads an nn.Linear's weight (a LoRA loader)
        assumes the layer's input is what it is given, and this layer applies a GELU to part of it.
        """
        if self.gelu_from is not None:
            raise ValueError(
                f"{type(self).__name__}({self.extra_repr()}) applies a GELU to its input "
                "(convrot_diffusers.fuse_activations), so a LoRA beside it would read the wrong input: call "
                "convrot_diffusers.unfuse_activations before loading a LoRA (fusing afterwards leaves "
                "LoRA layers unfused)"
            )
        return WeightStandIn(self, (self.out_features, self.in_features), self.float_dtype, self.qweight.device)

    def reset_parameters(self) -> None:
        raise TypeError(f"{type(self).__name__} holds quantized weights: there are no float parameters to reset")

    @property
    def gelu_from(self) -> int | None:
        return self._gelu_from

    @gelu_from.setter
    def gelu_from(self, column: int | None) -> None:
        valid = isinstance(column, int) and not isinstance(column, bool) and 0 <= column <= self.in_features
        if column is not None and not (valid and column % 16 == 0):
            raise ValueError(f"gelu_from must be None or a multiple of 16 in [0, {self.in_features}]; got {column!r}")
        self._gelu_from = column

    @staticmethod
    def shared_input_error(layers: Sequence[ConvLinear]) -> str | None:
        """Why these layers cannot read one quantized input (``forward_shared``), or None."""
        if not layers or not all(isinstance(layer, ConvLinear) for layer in layers):
            return "expected a non-empty sequence of ConvLinear layers"
        first = layers[0]
        for layer in layers[1:]:
            for what in ("in_features", "group_size", "rotation", "simulation_dtype", "gelu_from"):
                if getattr(layer, what) != getattr(first, what):
                    return f"layers with different {what}"
            if type(layer) is not type(first) or layer.kind != first.kind:
                return "layers with different schemes"
            if layer.qweight.device != first.qweight.device:
                return "layers on different devices"
        return None

    @staticmethod
    def concatenation_error(layers: Sequence[ConvLinear]) -> str | None:
        """Why ``concatenate`` would refuse these ConvLinear layers, or None when it can join them."""
        if error := ConvLinear.shared_input_error(layers):
            return f"cannot concatenate {error}"
        if len({layer.bias is None for layer in layers}) > 1:
            return "cannot concatenate layers with and without a bias"
        return None

    @classmethod
    def concatenate(cls, layers: Sequence[ConvLinear]) -> ConvLinear:
        """One layer whose output is the layers' outputs side by side (out_features add up).

        Exact: weights are quantized per output channel and activations per
        token, so the result equals ``torch.cat([layer(x) for layer in layers], -1)``
        bit for bit, at the cost of one activation quantization and one GEMM
        instead of one per layer. The layers must agree on everything but
        out_features; the new layer holds copies of their buffers.
        """
        layers = list(layers)
        if not layers or not all(isinstance(layer, ConvLinear) for layer in layers):
            raise TypeError("concatenate expects a non-empty sequence of ConvLinear layers")
        if error := cls.concatenation_error(layers):
            raise ValueError(error)
        first = layers[0]
        bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
        qweight = torch.cat([layer.qweight for layer in layers])
        group_scale = None
        if first.weight_group_scale is not None:
            group_scale = torch.cat([layer.weight_group_scale for layer in layers])
        return first._with_buffers(qweight, torch.cat([layer.weight_scale for layer in layers]), bias, group_scale)

    def split(self, out_features: Sequence[int]) -> list[ConvLinear]:
        """The inverse of concatenate: layers of the given out_features, copies of row ranges of this one."""
        sizes = list(out_features)
        if not sizes or any(not isinstance(size, int) or size < 1 for size in sizes) or sum(sizes) != self.out_features:
            raise ValueError(f"split sizes {sizes} must be positive ints adding up to out_features={self.out_features}")
        layers = []
        start = 0
        for size in sizes:
            rows = slice(start, start + size)
            bias = None if self.bias is None else self.bias[rows].clone()
            group_scale = None if self.weight_group_scale is None else self.weight_group_scale[rows].clone()
            layers.append(
                self._with_buffers(self.qweight[rows].clone(), self.weight_scale[rows].clone(), bias, group_scale)
            )
            start += size
        return layers

    def _check_input(self, x: torch.Tensor, x2: torch.Tensor | None) -> None:
        name = type(self).__name__
        if x2 is None:
            if x.shape[-1:] != (self.in_features,):
                raise ValueError(f"{name}: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        elif x2.shape[:-1] != x.shape[:-1] or x.shape[-1] + x2.shape[-1] != self.in_features:
            raise ValueError(
                f"{name}: x and x2 must share their leading dims and add up to {self.in_features} features; "
                f"got {tuple(x.shape)} and {tuple(x2.shape)}"
            )
        if x.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name}: input dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x2 is not None and (x2.dtype != x.dtype or x2.device != x.device):
            raise ValueError(f"{name}: x2 ({x2.dtype}, {x2.device}) must match x ({x.dtype}, {x.device})")
        if self.simulation_dtype is None and x.device != self.qweight.device:
            raise ValueError(f"{name}: input is on {x.device}, the layer on {self.qweight.device}")

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output for an input with no rows, as nn.Linear gives it (the kernels refuse M = 0)."""
        return x.new_empty((*x.shape[:-1], self.out_features))

    def forward(self, x: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on x [..., in_features], or on ``cat([x, x2], -1)`` given as x and x2.

        The kernels (``convrot_kernels.linear``) check the input; the float simulation checks it here.
        """
        if self.simulation_dtype is None and x.numel():
            return linear_forward(
                x, self.qweight, self.weight_scale, self.bias, self.bits, self.group_size, self.rotation, x2,
                self.gelu_from, self.act_bits, self.weight_group_scale,
            )  # fmt: skip
        self._check_input(x, x2)
        if not x.numel():
            return self._empty_output(x)
        return simulated_linear(
            materialize(x, x2, self.gelu_from),
            self.qweight,
            self.weight_scale,
            self.bias,
            self.bits,
            self.group_size,
            self.rotation,
            self.simulation_dtype,
            act_bits=self.act_bits,
            group_scale=self.weight_group_scale,
        )

    @staticmethod
    def _checked_group(layers, x: torch.Tensor, x2: torch.Tensor | None, caller: str) -> list[ConvLinear]:
        """layers as a list, once they can share an input and the first accepts x (and x2)."""
        layers = list(layers)
        if error := ConvLinear.shared_input_error(layers):
            raise ValueError(f"{caller}: {error}")
        layers[0]._check_input(x, x2)
        return layers

    @staticmethod
    def _scheme_operands(layers: list[ConvLinear]) -> dict:
        """The shared-input forwards' keyword arguments of the scheme: activation bits, each layer's group scales."""
        group_scales = None
        if layers[0].weight_group_scale is not None:
            group_scales = [layer.weight_group_scale for layer in layers]
        return {"act_bits": layers[0].act_bits, "group_scales": group_scales}

    @staticmethod
    def _group_operands(layers: list[ConvLinear]) -> tuple:
        """The shared-input ops' layer arguments: qweights, weight scales, biases, bits, group size, rotation."""
        first = layers[0]
        return (
            [layer.qweight for layer in layers],
            [layer.weight_scale for layer in layers],
            [layer.bias for layer in layers],
            first.bits,
            first.group_size,
            first.rotation,
        )

    @staticmethod
    def forward_shared(
        layers: Sequence[ConvLinear], x: torch.Tensor, x2: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[layer(x, x2) for layer in layers]``, bit for bit, with the input rotated and quantized once.

        For layers that read the same tensor (a Flux single block's proj_mlp and attention
        projections): the activation codes depend only on the input, so they are computed once
        and each layer runs only its GEMM. The layers must agree on all but out_features and bias
        (``shared_input_error``); unlike ``concatenate``, their weights stay where they are and
        each output is its own contiguous tensor.
        """
        layers = ConvLinear._checked_group(layers, x, x2, "forward_shared")
        first = layers[0]
        if first.simulation_dtype is not None or not x.numel():
            return [layer(x, x2) for layer in layers]
        return shared_input_forward(
            x, *ConvLinear._group_operands(layers), x2, first.gelu_from, **ConvLinear._scheme_operands(layers)
        )

    @staticmethod
    def forward_shared_normed(
        layers: Sequence[ConvLinear],
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        *,
        eps: float = 1e-6,
        prefix: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """``forward_shared(layers, layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix))``, bit for bit,
        with the AdaLN norm computed inside the activation quantization.

        For an AdaLN norm whose output only these layers read (a Flux single block's input norm):
        the normed tensor is never written to memory (``convrot_kernels.layer_norm_modulate_rht_quantize``).
        Arguments as ``convrot_kernels.layer_norm_modulate``; outputs [batch, tokens0 + tokens, out_features].
        Layers in float simulation, or with a GELU on their input, run through the normed tensor.
        """
        layers = ConvLinear._checked_group(layers, x, None, "forward_shared_normed")
        first = layers[0]
        if first.simulation_dtype is not None or first.gelu_from is not None:
            normed = layer_norm_modulate(x, scale, shift, eps=eps, prefix=prefix)
            return ConvLinear.forward_shared(layers, normed)
        return normed_input_forward(
            x, scale, shift, eps, prefix, *ConvLinear._group_operands(layers), **ConvLinear._scheme_operands(layers)
        )

    @staticmethod
    def forward_shared_residual_normed(
        layers: Sequence[ConvLinear],
        x: torch.Tensor,
        branch: torch.Tensor,
        gate: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        *,
        eps: float = 1e-6,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(h, forward_shared_normed(layers, h, scale, shift, eps=eps))`` for ``h = x + gate[:, None] * branch``,
        bit for bit (the product and the sum each rounded to x's dtype, as diffusers' eager ops round them).

        A DiT block's residual update before its second norm: the sum, the norm, the rotation and the
        quantization run in one kernel that reads x and branch once and writes h and the codes
        (``convrot_kernels.residual_layer_norm_modulate_rht_quantize``). x and branch [B, S, K], gate,
        scale and shift [B, K]. Layers in float simulation, or with a GELU on their input, run through
        the normed tensor.
        """
        layers = ConvLinear._checked_group(layers, x, None, "forward_shared_residual_normed")
        first = layers[0]
        if first.simulation_dtype is not None or first.gelu_from is not None:
            total = x + gate[:, None] * branch
            return total, ConvLinear.forward_shared_normed(layers, total, scale, shift, eps=eps)
        operands = (*ConvLinear._group_operands(layers),)
        scheme = ConvLinear._scheme_operands(layers)
        return residual_normed_input_forward(x, branch, gate, scale, shift, eps, *operands, **scheme)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() convert floating buffers; the weight scales and
        # the bias must stay fp32 (the epilogue's operands), so only their device follows.
        scale, bias = self.weight_scale, self.bias
        super()._apply(fn, recurse)
        # float_dtype follows a dtype conversion as a float parameter would.
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype)).dtype
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device)
        if bias is not None and self.bias.dtype != torch.float32:
            self.bias = bias.to(device=self.bias.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, rotation={self.rotation!r}"
            + ("" if self.act_bits == self.bits else f", act_bits={self.act_bits}")
            + ("" if self.weight_group_size is None else f", weight_group_size={self.weight_group_size}")
            + ("" if self.gelu_from is None else f", gelu_from={self.gelu_from}")
        )


class ConvLinear4bit(ConvLinear):
    """4-bit weights (packed two per byte) and 4-bit per-token activations (W4A4), or
    8-bit ones with ``act_bits=8`` (W4A8); ``weight_group_size=64``: group-scaled weights."""

    bits = 4


class ConvLinear8bit(ConvLinear):
    """W8A8: int8 weights and int8 per-token activations."""

    bits = 8


# The schemes by name (policy kinds, checkpoint metadata): (class, act_bits, weight_group_size).
SCHEMES: dict[str, tuple[type[ConvLinear], int, int | None]] = {
    "w4a4": (ConvLinear4bit, 4, None),
    "w8a8": (ConvLinear8bit, 8, None),
    "w4a8": (ConvLinear4bit, 8, None),
    "w4a4g64": (ConvLinear4bit, 4, WEIGHT_GROUP),
    "w4a8g64": (ConvLinear4bit, 8, WEIGHT_GROUP),
}


def scheme_kind(bits: int, act_bits: int, weight_group_size: int | None) -> str:
    """The name of a scheme in SCHEMES."""
    return f"w{bits}a{act_bits}" + ("" if weight_group_size is None else f"g{weight_group_size}")


def layer_for_kind(kind: str, in_features: int, out_features: int, **kwargs) -> ConvLinear:
    """An empty ConvLinear of the scheme ``kind`` (a key of SCHEMES); kwargs as the constructor's."""
    cls, act_bits, weight_group_size = SCHEMES[kind]
    return cls(in_features, out_features, act_bits=act_bits, weight_group_size=weight_group_size, **kwargs)


def layer_from_linear(kind: str, linear: nn.Linear, **kwargs) -> ConvLinear:
    """``from_linear`` of the scheme ``kind``; kwargs as from_linear's (group_size, rotation, clip_search)."""
    cls, act_bits, weight_group_size = SCHEMES[kind]
    return cls.from_linear(linear, act_bits=act_bits, weight_group_size=weight_group_size, **kwargs)


def check_scheme(name: str, bits: int, act_bits: int | None, weight_group_size: int | None, in_features: int) -> int:
    """The activation bits of a valid scheme; raises a ValueError naming the layer class otherwise."""
    act_bits = bits if act_bits is None else act_bits
    if isinstance(act_bits, bool) or act_bits not in (4, 8):
        raise ValueError(f"{name}: act_bits must be 4 or 8, got {act_bits!r}")
    if bits == 8 and act_bits != 8:
        raise ValueError(f"{name}: 8-bit weights take 8-bit activations (act_bits=8), got act_bits={act_bits}")
    if weight_group_size is not None:
        if bits != 4 or weight_group_size != WEIGHT_GROUP:
            raise ValueError(
                f"{name}: weight_group_size must be None or {WEIGHT_GROUP} (4-bit weights only), "
                f"got {weight_group_size!r}"
            )
        if not isinstance(in_features, int) or in_features % WEIGHT_GROUP:
            raise ValueError(
                f"{name}: group-scaled weights need in_features a multiple of {WEIGHT_GROUP}, got {in_features!r}"
            )
    return int(act_bits)
