"""WeightStandIn: a ConvLinear's ``.weight``, the shape, dtype and device of a float weight without its values."""

from __future__ import annotations

import torch


class WeightStandIn(torch.Tensor):
    """A tensor of a quantized layer's float-weight shape [out_features, in_features], dtype and device,
    holding no storage.

    Code written for nn.Linear reads ``layer.weight`` for its metadata (PEFT sizes its LoRA layers and
    takes their dtype and device from it; diffusers' Flux LoRA loader compares shapes). Any
    computation with it (an op, a copy, ``fuse_lora``'s merge into it) raises a NotImplementedError
    that says the layer holds quantized codes (not a TypeError: torch turns those, in ``+=``, into
    Python's "unsupported operand"). ``.data`` and ``.detach()`` give another stand-in.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, layer, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, layer, shape, dtype, device):
        self.layer_name = type(layer).__name__ if isinstance(layer, torch.nn.Module) else str(layer)

    def __repr__(self) -> str:
        return f"WeightStandIn(shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        stand_in = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, WeightStandIn))
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return WeightStandIn(stand_in.layer_name, stand_in.shape, stand_in.dtype, stand_in.device)
        raise NotImplementedError(
            f"{stand_in.layer_name}.weight stands in for a float weight it does not hold (the layer stores "
            f"quantized codes): {func} cannot run on it. Merging a LoRA into a quantized layer in place "
            "(fuse_lora) is not supported: keep the LoRA as a side path (load_lora_weights, set_adapters), or "
            "requantize the layers with it merged: convrot_diffusers.merge_lora(pipe)"
        )
