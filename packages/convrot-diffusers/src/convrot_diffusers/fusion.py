"""Fused QKV projections of a quantized transformer: one activation quantization and one GEMM for q, k and v.

diffusers' own ``fuse_qkv_projections`` concatenates ``nn.Linear`` weights and
keeps the separate layers; for ConvLinear layers it cannot run (they hold
packed codes, no ``.weight``). ``fuse_qkv_projections`` here concatenates the
quantized layers instead (exact: ConvLinear.concatenate) and drops the
separate ones, so the weights take no more memory; diffusers' attention code
then reads ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` as it does for its own
fusion. ``unfuse_qkv_projections`` splits them back (exact too). Each separate
layer's name keeps a ``FusedAwayProjection``, which holds nothing: a LoRA
loaded onto a fused model targets it by name and fails with its message
(unfuse first) instead of being dropped as keys without a module. Layers that
carry a LoRA (PEFT's layers, not ConvLinear) are left unfused.

Two kinds of attention modules are handled:
- the ones that choose the fused path by their ``fused_projections`` flag
  (diffusers' AttentionModuleMixin, e.g. Flux);
- the older ``Attention`` class (PixArt, SD3), whose fused path is a separate
  processor class (``FusedAttnProcessor2_0``, ``FusedJointAttnProcessor2_0``).
A module is left unfused when its projections differ in bit width (e.g.
Flux "mix" keeps the single blocks' to_v at W8A8), are not all quantized, or
its processor has no fused counterpart that computes the same thing (SD3.5:
diffusers' fused joint processor skips the q/k RMSNorms, so SD3.5 stays unfused).
"""

from __future__ import annotations

import functools

from diffusers.models import attention_processor
from diffusers.models.attention import AttentionModuleMixin
from torch import nn

import convrot
from convrot import ConvLinear

from .detect import transformer_of

# Fused name -> the layers it replaces, in diffusers' concatenation order.
SELF_QKV = ("to_qkv", ("to_q", "to_k", "to_v"))
CROSS_KV = ("to_kv", ("to_k", "to_v"))
ADDED_QKV = ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")

# The older Attention class: its processor and the fused processor that reads to_qkv / to_kv / to_added_qkv.
FUSED_PROCESSORS = {
    attention_processor.AttnProcessor2_0: attention_processor.FusedAttnProcessor2_0,
    attention_processor.JointAttnProcessor2_0: attention_processor.FusedJointAttnProcessor2_0,
}


class FusedAwayProjection(nn.Module):
    """What a projection's name holds while fuse_qkv_projections has joined the layer into another: nothing
    to run, and a message for code that finds it by name (PEFT's error when a LoRA targets it)."""

    def __init__(self, name: str, fused_name: str):
        super().__init__()
        self.name, self.fused_name = name, fused_name

    def message(self) -> str:
        return (
            f"{self.name} is fused into {self.fused_name} by convrot_diffusers.fuse_qkv_projections: call "
            "convrot_diffusers.unfuse_qkv_projections before loading a LoRA (fusing afterwards leaves the "
            "layers that carry a LoRA separate)"
        )

    def extra_repr(self) -> str:
        return self.message()

    def forward(self, *args, **kwargs):
        raise RuntimeError(self.message())


def _groups(module) -> list[tuple[str, tuple[str, ...]]]:
    """The (fused name, layer names) this attention module can fuse."""
    cross = getattr(module, "is_cross_attention", False)
    groups = [CROSS_KV if cross else SELF_QKV]
    if all(getattr(module, name, None) is not None for name in ADDED_QKV[1]):
        groups.append(ADDED_QKV)
    return groups


def _fusable(module, groups) -> bool:
    for _, names in groups:
        layers = [getattr(module, name, None) for name in names]
        if not all(isinstance(layer, ConvLinear) for layer in layers) or ConvLinear.concatenation_error(layers):
            return False
    return True


def _fused_processor(module, groups):
    """The fused processor for an older-style Attention module, or None when there is none."""
    fused = FUSED_PROCESSORS.get(type(module.processor))
    # diffusers' fused joint processor needs the text stream (SD3.5's second, image-only attention
    # has none) and skips the q/k RMSNorms (SD3.5 has them): fusing there would change the output.
    if fused is attention_processor.FusedJointAttnProcessor2_0 and (
        ADDED_QKV not in groups or any(getattr(module, norm, None) is not None for norm in QK_NORMS)
    ):
        return None
    return None if fused is None else fused()


def _is_fused(module) -> bool:
    return hasattr(module, "_convrot_fused")


def fuse_qkv_projections(pipe_or_transformer) -> int:
    """Fuses the quantized q/k/v projections of every attention module; returns how many modules were fused.

    Call it after quantizing (or loading a quantized transformer), and before
    torch.compile or CUDA-graph capture. Outputs are unchanged bit for bit.
    """
    transformer = transformer_of(pipe_or_transformer)
    fused = 0
    for module in list(transformer.modules()):  # the loop replaces submodules
        flagged = isinstance(module, AttentionModuleMixin)
        if not (flagged or isinstance(module, attention_processor.Attention)) or _is_fused(module):
            continue
        if flagged and not module._supports_qkv_fusion:
            continue
        groups = _groups(module)
        processor = None if flagged else _fused_processor(module, groups)
        if not _fusable(module, groups) or (not flagged and processor is None):
            continue
        parts = {}
        for fused_name, names in groups:
            layers = [getattr(module, name) for name in names]
            setattr(module, fused_name, ConvLinear.concatenate(layers))
            parts[fused_name] = [(name, layer.out_features) for name, layer in zip(names, layers, strict=True)]
            for name in names:
                setattr(module, name, FusedAwayProjection(name, fused_name))
        module._convrot_fused = parts
        if flagged:
            module.fused_projections = True
            # diffusers' own unfuse would delete to_qkv and lose its weights: route it here.
            module.unfuse_projections = functools.partial(_unfuse_module, module)
        else:
            module._convrot_unfused_processor = module.processor
            module.set_processor(processor)
        fused += 1
    return fused


def _unfuse_module(module) -> None:
    for fused_name, parts in module._convrot_fused.items():
        layers = getattr(module, fused_name).split([size for _, size in parts])
        for (name, _), layer in zip(parts, layers, strict=True):
            setattr(module, name, layer)
        delattr(module, fused_name)
    del module._convrot_fused
    if isinstance(module, AttentionModuleMixin):
        module.fused_projections = False
        del module.unfuse_projections
    else:
        module.set_processor(module._convrot_unfused_processor)
        del module._convrot_unfused_processor


def unfuse_qkv_projections(pipe_or_transformer) -> int:
    """Splits what fuse_qkv_projections fused back into separate layers; returns how many modules were unfused."""
    modules = [module for module in transformer_of(pipe_or_transformer).modules() if _is_fused(module)]
    for module in modules:
        _unfuse_module(module)
    return len(modules)


def separate_layers_state(transformer, state_dict: dict) -> tuple[dict, dict]:
    """(state dict, quantized layers by name) of the transformer with its q/k/v projections separate, as a
    fresh transformer of its config has them, computed without changing it (ConvLinear.split is exact)."""
    state, layers = dict(state_dict), convrot.quantized_layers(transformer)
    for module_name, module in transformer.named_modules():
        if not _is_fused(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        for fused_name, parts in module._convrot_fused.items():
            del layers[prefix + fused_name]
            for key in [key for key in state if key.startswith(f"{prefix}{fused_name}.")]:
                del state[key]
            separate = getattr(module, fused_name).split([size for _, size in parts])
            for (name, _), layer in zip(parts, separate, strict=True):
                layers[prefix + name] = layer
                state.update({f"{prefix}{name}.{key}": tensor for key, tensor in layer.state_dict().items()})
    return state, layers
