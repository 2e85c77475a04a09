"""merge_lora: LoRAs merged into a quantized transformer's weights (requantized), the LoRA layers removed.

diffusers' ``fuse_lora`` adds ``scale * B A`` to each layer's float weight in place; a ConvLinear holds
codes, so it refuses (convrot.WeightStandIn). Here each LoRA'd ConvLinear's weight is dequantized exactly
(float64), the adapters' ``scale * B A`` added, and the sum quantized again with the layer's own scheme by
convrot's quantizers; a float Linear with a LoRA gets the sum rounded to its dtype, as PEFT's merge does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from convrot import ConvLinear
from convrot.hadamard import rotate_groups
from convrot.quantizer.dequantize import dequantize_weight
from convrot.quantizer.weight import WEIGHT_GROUP, quantize_weight, quantize_weight_grouped
from convrot_kernels import pack_int4, unpack_int4

from .detect import _transformer_or_self

logger = logging.getLogger(__name__)


@dataclass
class LayerMergeError:
    """One merged layer's weight errors, each relative to a Frobenius norm.

    ``error``: ||W_merged - W_eff|| / ||W_eff||, measured (W_eff = dequantized base weight + the adapters'
    scale x B A, in float64). ``delta``: ||W_eff - W_base|| / ||W_base||, what the LoRA moves the weight.
    ``base_rounding`` and ``merged_rounding``: the rounding error a uniform-rounding model gives the base's
    and the merged layer's quantization steps (step^2 / 12 per weight, over ||W||), the scheme's own cost
    against which ``error`` is read (the base's float weight is gone, so its own error cannot be measured).
    A float layer has ``kind`` "float" and errors of rounding to its dtype.
    """

    kind: str
    error: float
    delta: float
    base_rounding: float
    merged_rounding: float


@dataclass
class MergeReport:
    """What merge_lora did: the adapters merged with their scales, per-layer errors, the overall error
    (sqrt of the summed squared errors over the summed squared W_eff norms, quantized layers only) and the
    adapters that were loaded but not named (removed with the LoRA layers, not merged)."""

    adapters: list[str]
    layers: dict[str, LayerMergeError] = field(default_factory=dict)
    error: float = 0.0
    discarded: list[str] = field(default_factory=list)


def _dequantized(layer: ConvLinear) -> torch.Tensor:
    """The float64 weight [N, K] a ConvLinear's codes stand for, in the model's basis (exact)."""
    if layer.weight_group_scale is None:
        return dequantize_weight(
            layer.qweight, layer.weight_scale, layer.bits, layer.group_size, layer.rotation, dtype=torch.float64
        )
    codes = unpack_int4(layer.qweight).to(torch.float64)
    steps = layer.weight_group_scale.to(torch.float64).repeat_interleave(WEIGHT_GROUP, dim=-1)
    return rotate_groups(
        codes * steps * layer.weight_scale.to(torch.float64)[:, None], layer.rotation, layer.group_size
    )


def _steps(layer: ConvLinear, scale: torch.Tensor, group_scale: torch.Tensor | None) -> torch.Tensor:
    """Each weight's quantization step, [N, 1] or [N, K]."""
    steps = scale.to(torch.float64)[:, None]
    if group_scale is not None:
        steps = steps * group_scale.to(torch.float64).repeat_interleave(WEIGHT_GROUP, dim=-1)
    return steps.expand(layer.out_features, layer.in_features)


def _requantized(layer: ConvLinear, weight: torch.Tensor, clip_search: bool) -> dict[str, torch.Tensor]:
    """The buffers of ``weight`` quantized with the layer's scheme (codes, scales, group multipliers)."""
    if layer.weight_group_scale is not None:
        codes, scale, group_scale = quantize_weight_grouped(weight, layer.group_size, layer.rotation)
        return {"qweight": pack_int4(codes), "weight_scale": scale, "weight_group_scale": group_scale}
    codes, scale = quantize_weight(weight, layer.bits, layer.group_size, layer.rotation, clip_search)
    return {"qweight": pack_int4(codes) if layer.bits == 4 else codes, "weight_scale": scale}


def _delta(name: str, module, adapters: list[str]) -> torch.Tensor:
    """sum over ``adapters`` of scaling x B A (float64), the scaling including set_adapters' weight."""
    base = module.get_base_layer()
    delta = torch.zeros(
        base.out_features, base.in_features, dtype=torch.float64, device=module.lora_A[adapters[0]].weight.device
    )
    for adapter in adapters:
        if module.use_dora.get(adapter) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(
                f"merge_lora: {name}'s adapter {adapter!r} is DoRA or fan-in-fan-out, which it does not merge"
            )
        down, up = module.lora_A[adapter], module.lora_B[adapter]
        if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)) or up.bias is not None:
            raise ValueError(f"merge_lora: {name}'s adapter {adapter!r} is not a plain B A (a LoRA bias or variant)")
        delta += module.scaling[adapter] * (up.weight.to(torch.float64) @ down.weight.to(torch.float64))
    return delta


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = b.norm().item()
    return (a - b).norm().item() / norm if norm else (a - b).norm().item()


def merge_lora(
    pipe_or_transformer, adapter_names: list[str] | str | None = None, clip_search: bool = False
) -> MergeReport:
    """Merges LoRAs into a quantized transformer's weights and removes its LoRA layers; returns a MergeReport.

    For every layer PEFT wrapped, W_eff = its weight + sum over ``adapter_names`` (default: the active
    adapters) of scale x B A, with the weights set_adapters gave them. A ConvLinear's W_eff (its codes
    dequantized exactly, in float64) is quantized again with its own scheme (w4a4, w4a8, w8a8 or
    group-scaled; ``clip_search`` as quantize's, per-row scales only) and its codes and scales replaced;
    a float Linear's weight becomes W_eff rounded to its dtype (PEFT's merge). Then every LoRA layer of the
    transformer is removed, as ``unload_lora`` does (adapters not named are dropped, listed in
    ``report.discarded``), leaving a plain quantized model that saves and loads as any other.

    Everything is checked and every new weight computed before the model changes: no LoRA loaded, an
    unknown adapter name, or a layer it cannot merge (a LoRA on a non-Linear layer, DoRA, a LoRA bias)
    raise a ValueError naming it and leave the model as it was. Per-layer and overall errors are logged
    (INFO) and returned.
    """
    from peft.tuners.lora import LoraLayer

    transformer = _transformer_or_self(pipe_or_transformer)
    wrapped = {name: module for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}
    if not wrapped:
        raise ValueError(f"merge_lora: {type(transformer).__name__} has no LoRA loaded (load_lora_weights first)")
    loaded = sorted({adapter for module in wrapped.values() for adapter in module.lora_A})
    if adapter_names is None:
        if any(module.disable_adapters for module in wrapped.values()):
            raise ValueError(
                f"merge_lora: the LoRAs are disabled (disable_lora): enable_lora, or name the adapters to merge "
                f"(loaded: {loaded})"
            )
        names = sorted({a for module in wrapped.values() for a in module.active_adapters if a in module.lora_A})
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [a for a in names if a not in loaded]
        if unknown:
            raise ValueError(f"merge_lora: unknown adapter(s) {unknown}; loaded: {loaded}")
    if not names:
        raise ValueError(f"merge_lora: no adapter is active or named (loaded: {loaded}); name the adapters to merge")

    report = MergeReport(adapters=names, discarded=[a for a in loaded if a not in names])
    updates = {}
    squared_error = squared_norm = 0.0
    for name, module in wrapped.items():
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"merge_lora: {name} is a {type(base).__name__}; it merges LoRAs on Linear layers only")
        here = [a for a in names if a in module.lora_A]
        if not here:
            continue
        delta = _delta(name, module, here)
        if isinstance(base, ConvLinear):
            if clip_search and base.weight_group_scale is not None:
                raise ValueError(f"merge_lora: {name} is group-scaled ({base.kind}); clip_search is for per-row scales")
            w_base = _dequantized(base)
            w_eff = w_base + delta
            try:
                buffers = _requantized(base, w_eff, clip_search)
            except ValueError as error:  # a weight with NaN or Inf: the quantizer's message, with the layer's name
                raise ValueError(f"merge_lora: {name}: {error}") from None
            merged = base._with_buffers(
                buffers["qweight"], buffers["weight_scale"], base.bias, buffers.get("weight_group_scale")
            )
            w_merged = _dequantized(merged)
            base_steps = _steps(base, base.weight_scale, base.weight_group_scale)
            merged_steps = _steps(base, buffers["weight_scale"], buffers.get("weight_group_scale"))
            entry = LayerMergeError(
                kind=base.kind,
                error=_rel(w_merged, w_eff),
                delta=_rel(w_eff, w_base),
                base_rounding=(base_steps.square().sum() / 12).sqrt().item() / w_base.norm().item(),
                merged_rounding=(merged_steps.square().sum() / 12).sqrt().item() / w_eff.norm().item(),
            )
            squared_error += (w_merged - w_eff).norm().item() ** 2
            squared_norm += w_eff.norm().item() ** 2
        else:
            w_base = base.weight.detach().to(torch.float64)
            w_eff = w_base + delta
            buffers = {"weight": w_eff.to(base.weight.dtype)}
            entry = LayerMergeError(
                "float", _rel(buffers["weight"].to(torch.float64), w_eff), _rel(w_eff, w_base), 0.0, 0.0
            )
            if not torch.isfinite(buffers["weight"]).all():
                raise ValueError(f"merge_lora: {name}'s merged weight is not finite")
        updates[name] = (base, buffers)
        report.layers[name] = entry
    report.error = (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0

    with torch.no_grad():
        for base, buffers in updates.values():
            for key, value in buffers.items():
                if key == "weight":
                    base.weight.copy_(value)
                else:
                    setattr(base, key, value)
    transformer.unload_lora()
    for name, entry in report.layers.items():
        logger.info(
            "merge_lora %s (%s): error %.4g (LoRA moved it %.4g; rounding model %.4g before, %.4g after)",
            name, entry.kind, entry.error, entry.delta, entry.base_rounding, entry.merged_rounding,
        )  # fmt: skip
    logger.info("merge_lora: adapters %s merged into %d layers, overall error %.4g", names, len(updates), report.error)
    return report
