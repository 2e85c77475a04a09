"""Whole-model conversion: quantize_model and set_simulation."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .hadamard import check_rotation, resolve_group_size
from .linear import SCHEMES, ConvLinear, check_scheme, layer_from_linear
from .policy import check_policy, layer_kind


def is_convertible_linear(module: nn.Module) -> bool:
    # nn.MultiheadAttention reads its out_proj's weight directly, so that
    # Linear (a NonDynamicallyQuantizableLinear) cannot be replaced. A ConvLinear is an nn.Linear
    # already quantized.
    return isinstance(module, nn.Linear) and not isinstance(
        module, (nn.modules.linear.NonDynamicallyQuantizableLinear, ConvLinear)
    )


def _plan(model: nn.Module, policy: dict[str, str], group_size: int) -> list[tuple[list[str], str]]:
    """(all names of a Linear, kind) per Linear to convert, after checking each can be.

    Holds names only, never the modules, so that a converted Linear is freed
    as soon as the model stops referencing it.
    """
    names_by_module: dict[int, list[str]] = {}
    kinds: dict[int, str] = {}
    used_patterns = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not is_convertible_linear(module):
            continue
        if name == "":
            raise TypeError("the model itself is an nn.Linear: use ConvLinear4bit.from_linear")
        kind, pattern = layer_kind(name, policy)
        used_patterns.add(pattern)
        key = id(module)
        if key in kinds and kinds[key] != kind:
            first = names_by_module[key][0]
            raise ValueError(
                f"{first!r} and {name!r} are the same Linear module but the policy gives them "
                f"different kinds ({kinds[key]!r}, {kind!r})"
            )
        names_by_module.setdefault(key, []).append(name)
        kinds[key] = kind
        if kind == "skip" or len(names_by_module[key]) > 1:
            continue
        try:
            resolve_group_size(module.in_features, group_size)
            cls, act_bits, weight_group_size = SCHEMES[kind]
            check_scheme(kind, cls.bits, act_bits, weight_group_size, module.in_features)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        if module.weight.is_meta:
            raise ValueError(
                f"layer {name!r} has its weight on the meta device: load the weights before quantizing "
                "(or use convrot.load_quantized for a saved quantized model)"
            )
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"layer {name!r}: the weight holds NaN or Inf and cannot be quantized")
    unused = [pattern for pattern in policy if pattern not in used_patterns]
    if unused:
        warnings.warn(f"quantize_model: policy pattern(s) {unused} matched no Linear layer", stacklevel=3)
    return [(names_by_module[key], kinds[key]) for key in names_by_module if kinds[key] != "skip"]


def quantize_model(
    model: nn.Module,
    policy: Mapping[str, str] | None = None,
    group_size: int = 256,
    rotation: str = "regular",
    progress: bool = True,
    clip_search: bool = False,
) -> nn.Module:
    """Replaces the model's nn.Linear layers in place by ConvLinear4bit/8bit; returns the model.

    ``policy`` maps module-name glob patterns to a kind of convrot.KINDS ("w4a4", "w8a8",
    "w4a8", the group-scaled "w4a4g64" / "w4a8g64", or "skip")
    (first match wins; unmatched layers are W4A4; None quantizes every
    Linear to W4A4). Every layer is checked before any is converted, so bad
    input raises and leaves the model as it was. Each Linear is dropped as
    soon as its replacement is in place, so peak memory stays near the larger
    of the original and the quantized model (if nothing else references the
    original weights).
    """
    check_rotation(rotation)
    resolve_group_size(group_size, group_size)  # checks group_size itself
    plan = _plan(model, check_policy(policy), group_size)
    with torch.no_grad():
        for names, kind in tqdm(plan, desc="convrot: quantizing", unit="layer", disable=not progress):
            clip = clip_search and SCHEMES[kind][2] is None  # the clipping search sets per-row scales only
            layer = layer_from_linear(
                kind, model.get_submodule(names[0]), group_size=group_size, rotation=rotation, clip_search=clip
            )
            for name in names:
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, layer)
    return model


def set_simulation(model: nn.Module, dtype: torch.dtype | None = torch.float64) -> nn.Module:
    """Runs every ConvLinear of the model through the float-op simulation in ``dtype``
    (None: back to the kernels); returns the model."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"simulation dtype must be a floating-point dtype or None, got {dtype}")
    for module in model.modules():
        if isinstance(module, ConvLinear):
            module.simulation_dtype = dtype
    return model
