"""ComfyUI files written the way ComfyUI's converters write them: comfy-kitchen's own quantizers on the
original (BFL / MMDiT / Wan) tensors of tiny random transformers."""

from __future__ import annotations

import json

import pytest
import torch

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the reference for ComfyUI's format) is not installed")
from comfy_kitchen.backends.eager.quantization import int8_linear as ck_int8_linear  # noqa: E402
from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout, TensorWiseINT8Layout  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import convrot  # noqa: E402
from convrot_diffusers.comfy_keys import format_for_class, original_rows  # noqa: E402
from convrot_kernels import unpack_int4  # noqa: E402


def tiny_sd3(seed: int = 0):
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=256,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def tiny_dit(class_name: str):
    """A builder of the tiny Flux.2 / Qwen-Image / Wan transformer of tiny_dits (width 64)."""
    import tiny_dits

    return lambda seed=0: tiny_dits.build(class_name, seed)[0]


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """The float model's tensors under their original names (checked against diffusers' converter)."""
    original = format_for_class(type(model).__name__)
    state = model.state_dict()
    _, inverse = original_rows(original, model.config, {k: tuple(v.shape) for k, v in state.items()})
    return {
        name: torch.cat([state[key][rows.start : rows.stop] if state[key].dim() else state[key] for key, rows, _ in p])
        for name, p in inverse.items()
    }


def is_block_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and "blocks." in name and "norm" not in name


def write_comfy_file(
    model,
    path,
    int8_layers=("img_attn.proj", "x_block.attn.proj"),
    group_size: int | None = None,
    prefix: str = "",
    as_header: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantizes every block Linear with comfy-kitchen (int8 convrot for names containing one of
    ``int8_layers``, convrot_w4a4 otherwise) and writes the file; returns its tensors (unprefixed).
    ``group_size`` None: ComfyUI's 256, or the largest power of 4 dividing every quantized layer's width."""
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    state = original_state_dict(model)
    if group_size is None:
        group_size = 256
        while any(v.shape[1] % group_size for k, v in state.items() if is_block_linear(k, v)):
            group_size //= 4
    with ck.registry.use_backend("eager"):
        for name, value in state.items():
            if not is_block_linear(name, value):
                tensors[name] = value
                continue
            layer = name[: -len(".weight")]
            if any(part in layer for part in int8_layers):
                qdata, params = TensorWiseINT8Layout.quantize(
                    value, is_weight=True, per_channel=True, convrot=True, convrot_groupsize=group_size
                )
                conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group_size}
            else:
                qdata, params = TensorCoreConvRotW4A4Layout.quantize(value, convrot_groupsize=group_size)
                conf = {"format": "convrot_w4a4", "convrot_groupsize": group_size}
            tensors[name], tensors[f"{layer}.weight_scale"] = qdata, params.scale
            layers[layer] = conf
            if not as_header:
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    metadata = None
    if as_header:
        metadata = {"_quantization_metadata": json.dumps({"layers": {prefix + k: v for k, v in layers.items()}})}
    save_file({prefix + k: v.cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return tensors


def comfy_dequantize(tensors: dict[str, torch.Tensor], layer: str, conf: dict, shape) -> torch.Tensor:
    """A layer's fp32 weight as ComfyUI gets it: comfy-kitchen's QuantizedTensor built from the file's tensors."""
    from comfy_kitchen.tensor import QuantizedTensor

    qdata, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"]
    if conf["format"] == "convrot_w4a4":
        params = TensorCoreConvRotW4A4Layout.Params(
            scale=scale,
            orig_dtype=torch.float32,
            orig_shape=tuple(shape),
            convrot_groupsize=conf["convrot_groupsize"],
            quant_group_size=64,
        )
        layout = "TensorCoreConvRotW4A4Layout"
    else:
        params = TensorWiseINT8Layout.Params(
            scale=scale,
            orig_dtype=torch.float32,
            orig_shape=tuple(shape),
            convrot=True,
            convrot_groupsize=conf["convrot_groupsize"],
        )
        layout = "TensorWiseINT8Layout"
    with ck.registry.use_backend("eager"):
        return QuantizedTensor(qdata, layout, params).dequantize()


class KitchenLinear(torch.nn.Module):
    """A ConvLinear's codes and scales run by comfy-kitchen's eager ConvRot linears, as ComfyUI runs them."""

    def __init__(self, layer: convrot.ConvLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        with ck.registry.use_backend("eager"):
            if layer.bits == 4:
                return ck.convrot_w4a4_linear(
                    x, layer.qweight.view(torch.int8), layer.weight_scale, bias, convrot_groupsize=layer.group_size
                )
            return ck_int8_linear(
                x,
                layer.qweight,
                layer.weight_scale,
                bias,
                out_dtype=x.dtype,
                convrot=True,
                convrot_groupsize=layer.group_size,
            )


def hadamard64(n: int) -> torch.Tensor:
    """The normalized regular Hadamard matrix of order n (a power of 4) in float64, built here from H4."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < n:
        h = torch.kron(h, h4)
    return h / n**0.5


def convrot_w4a4_in_steps(x, codes, weight_scale, bias, group_size: int, rounded: torch.dtype | None):
    """The ConvRot W4A4 linear written out step by step, each step's result rounded to ``rounded``.

    ``torch.bfloat16``: what comfy-kitchen's eager ``convrot_w4a4_linear`` does with bf16 input (it computes
    in the input's dtype): the rotated activation, the scale absmax/7, the quotient x/scale before rounding,
    and in the epilogue the accumulator, its product by each scale (the weight scale itself cast to bf16)
    and the bias sum. None: every step in fp32 and one rounding of the output to x's dtype, as our kernels
    do. ``codes``: the weight's int4 codes as int8 [N, K]. Returns (output, activation codes)."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)

    def r(t):
        return t if rounded is None else t.to(rounded).float()

    h = hadamard64(group_size).float()
    v = r((x2d.float().reshape(-1, k // group_size, group_size) @ h).reshape(-1, k))
    scale = r(v.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 7)
    q = r(v / scale).round().clamp(-7, 7)  # round(): half to even, as both do
    acc = r(q.double() @ codes.double().t()).float()  # exact integers, then (comfy) rounded
    sw = r(weight_scale.float().reshape(1, -1))
    y = r(r(acc * scale) * sw)
    if bias is not None:
        y = r(y + r(bias.float()))
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0]), q


class StepsLinear(torch.nn.Module):
    """A ConvLinear4bit's codes run by ``convrot_w4a4_in_steps`` with the given rounding."""

    def __init__(self, layer: convrot.ConvLinear, rounded: torch.dtype | None):
        super().__init__()
        self.layer, self.rounded = layer, rounded
        self.codes = unpack_int4(layer.qweight)

    def forward(self, x):
        layer = self.layer
        return convrot_w4a4_in_steps(x, self.codes, layer.weight_scale, layer.bias, layer.group_size, self.rounded)[0]


def replace_convlinears(model, wrap) -> None:
    """Replaces every ConvLinear of the model in place by ``wrap(layer)`` (a module on the same tensors)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, convrot.ConvLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrap(module))


def run_on_kitchen(model) -> None:
    """Replaces every ConvLinear of the model in place by a KitchenLinear on the same tensors."""
    replace_convlinears(model, KitchenLinear)
