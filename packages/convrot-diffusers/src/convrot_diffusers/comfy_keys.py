"""Tensor names of a model's original checkpoint (what ComfyUI files use) and of its diffusers transformer.

Original to diffusers is diffusers' own single-file conversion
(``diffusers.loaders.single_file_utils``), run once on *row tags* instead of
weights: every row of every tensor of the file becomes an int64 that names its
tensor and row, so the converted state dict says, for each diffusers tensor,
which rows of which file tensors it is made of (fused q/k/v and Flux's linear1
split along the output dimension, AdaLN shift/scale swapped). Rows are
independent in a weight quantized per output channel, so the same map moves
codes and scales exactly. A converter that did anything but move whole rows
is refused (``KeyMapError``).

diffusers has no conversion back, so the original tensor names of each
architecture are written here once, as data (``OriginalFormat.layout``: which
diffusers tensors each original tensor holds); the row order within each comes
from diffusers' converter, and a layout that disagrees with it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# ComfyUI checkpoints that bundle VAE and text encoders prefix the transformer's tensors with this.
COMFY_MODEL_PREFIX = "model.diffusion_model."


class KeyMapError(ValueError):
    """The file's tensor names do not fit the architecture's original checkpoint."""


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of the tensor ``key``."""

    key: str
    start: int
    stop: int


def _flux_converter():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return convert_flux_transformer_checkpoint_to_diffusers


def _sd3_converter():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers


def _linear(original: str, *parts: str) -> list[tuple[str, tuple[str, ...]]]:
    """An original Linear holding the given diffusers Linears' rows (weight and bias)."""
    return [(f"{original}.{t}", tuple(f"{p}.{t}" for p in parts)) for t in ("weight", "bias")]


def _flux_layout(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    entries = [
        *_linear("img_in", "x_embedder"),
        *_linear("txt_in", "context_embedder"),
        *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ]
    if config.get("guidance_embeds"):
        entries += _linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        entries += _linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        entries += [
            *_linear(f"{o}.img_mod.lin", f"{d}.norm1.linear"),
            *_linear(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"),
            *_linear(f"{o}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
            *_linear(f"{o}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
            *_linear(f"{o}.img_attn.proj", f"{d}.attn.to_out.0"),
            *_linear(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
            *_linear(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"),
            *_linear(f"{o}.img_mlp.2", f"{d}.ff.net.2"),
            *_linear(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *_linear(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
            (f"{o}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            (f"{o}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
            (f"{o}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",)),
            (f"{o}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",)),
        ]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        entries += [
            *_linear(f"{o}.modulation.lin", f"{d}.norm.linear"),
            *_linear(f"{o}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
            *_linear(f"{o}.linear2", f"{d}.proj_out"),
            (f"{o}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            (f"{o}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        ]
    return entries


def _sd3_layout(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    entries = [
        ("pos_embed", ("pos_embed.pos_embed",)),
        *_linear("x_embedder.proj", "pos_embed.proj"),
        *_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        *_linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        *_linear("context_embedder", "context_embedder"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ]
    qk_norm = config.get("qk_norm") is not None
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        entries += [
            *_linear(f"{x}.attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
            *_linear(f"{c}.attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
            *_linear(f"{x}.attn.proj", f"{d}.attn.to_out.0"),
            *_linear(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear"),
            *_linear(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear"),
            *_linear(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj"),
            *_linear(f"{x}.mlp.fc2", f"{d}.ff.net.2"),
        ]
        if i != last:  # the last block's context stream ends before its output projection and MLP
            entries += [
                *_linear(f"{c}.attn.proj", f"{d}.attn.to_add_out"),
                *_linear(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                *_linear(f"{c}.mlp.fc2", f"{d}.ff_context.net.2"),
            ]
        if qk_norm:
            entries += [
                (f"{x}.attn.ln_q.weight", (f"{d}.attn.norm_q.weight",)),
                (f"{x}.attn.ln_k.weight", (f"{d}.attn.norm_k.weight",)),
                (f"{c}.attn.ln_q.weight", (f"{d}.attn.norm_added_q.weight",)),
                (f"{c}.attn.ln_k.weight", (f"{d}.attn.norm_added_k.weight",)),
            ]
        if i in tuple(config.get("dual_attention_layers") or ()):
            entries += [
                *_linear(f"{x}.attn2.qkv", f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"),
                *_linear(f"{x}.attn2.proj", f"{d}.attn2.to_out.0"),
            ]
            if qk_norm:
                entries += [
                    (f"{x}.attn2.ln_q.weight", (f"{d}.attn2.norm_q.weight",)),
                    (f"{x}.attn2.ln_k.weight", (f"{d}.attn2.norm_k.weight",)),
                ]
    return entries


def _flux_config(shapes: Mapping[str, tuple]) -> dict:
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128:
        # Every published Flux.1 has 128-wide heads with rotary axes (16, 56, 56); others are ambiguous.
        raise KeyMapError(
            f"a Flux transformer with {head_dim}-wide heads: its rotary axes cannot be read from the file; "
            "pass its diffusers config (--config)"
        )
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": _count_blocks(shapes, "double_blocks."),
        "num_single_layers": _count_blocks(shapes, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": [16, 56, 56],
    }


def _sd3_config(shapes: Mapping[str, tuple]) -> dict:
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    num_layers = _count_blocks(shapes, "joint_blocks.")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    # MMDiT's heads are 64 wide (hidden = 64 x depth); with q/k norms the file says so itself.
    head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else 64
    positions = shapes["pos_embed"][1]
    side = math.isqrt(positions)
    if side * side != positions or hidden % head_dim:
        raise KeyMapError(f"pos_embed {shapes['pos_embed']} and width {hidden} do not fit SD3; pass --config")
    dual = sorted({int(key.split(".")[1]) for key in shapes if ".attn2." in key})
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": side,
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def _count_blocks(shapes: Mapping[str, tuple], prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".")[0]) for key in shapes if key.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise KeyMapError(f"the file's {prefix}N blocks are not numbered 0..{len(indices) - 1}: {sorted(indices)}")
    return len(indices)


@dataclass(frozen=True)
class OriginalFormat:
    """How one architecture's original checkpoint names its tensors."""

    transformer_class: str
    signature: str  # a tensor name only this architecture's checkpoints have
    converter: Callable[[], Callable]
    layout: Callable[[Mapping], list[tuple[str, tuple[str, ...]]]]
    infer_config: Callable[[Mapping[str, tuple]], dict]
    # The width the converter hard-codes (Flux's linear1 split assumes 3072), or None.
    converter_width: int | None = None
    width_key: str | None = None  # the file tensor whose first dimension is the width


ORIGINAL_FORMATS = (
    OriginalFormat(
        "FluxTransformer2DModel",
        "double_blocks.0.img_attn.qkv.weight",
        _flux_converter,
        _flux_layout,
        _flux_config,
        converter_width=3072,
        width_key="img_in.weight",
    ),
    OriginalFormat(
        "SD3Transformer2DModel",
        "joint_blocks.0.x_block.attn.qkv.weight",
        _sd3_converter,
        _sd3_layout,
        _sd3_config,
    ),
)


def format_for_class(class_name: str) -> OriginalFormat:
    for original in ORIGINAL_FORMATS:
        if original.transformer_class == class_name:
            return original
    supported = ", ".join(o.transformer_class for o in ORIGINAL_FORMATS)
    raise KeyMapError(f"no ComfyUI key mapping for {class_name}; supported: {supported}")


def format_for_keys(keys) -> OriginalFormat:
    keys = set(keys)
    for original in ORIGINAL_FORMATS:
        if original.signature in keys:
            return original
    signatures = ", ".join(f"{o.signature!r} ({o.transformer_class})" for o in ORIGINAL_FORMATS)
    raise KeyMapError(f"the file's tensor names match no supported architecture (looked for {signatures})")


def _scale_factor(original: OriginalFormat, rows: Mapping[str, int]) -> int:
    """How many probe rows stand for one real row: the converter's hard-coded width over the model's."""
    if original.converter_width is None:
        return 1
    if original.width_key not in rows:
        raise KeyMapError(f"a {original.transformer_class} checkpoint without {original.width_key!r}")
    width = rows[original.width_key]
    if original.converter_width % width:
        raise KeyMapError(
            f"{original.transformer_class} of width {width}: diffusers' converter assumes width "
            f"{original.converter_width}, which {width} does not divide"
        )
    return original.converter_width // width


def diffusers_rows(original: OriginalFormat, rows: Mapping[str, int]) -> dict[str, list[Rows]]:
    """For each diffusers tensor, the runs of file-tensor rows it is made of, in order.

    ``rows``: the file's tensor names (original names, no prefix) and their
    first dimensions (0-d tensors: 1). Every row of every listed tensor must
    land in exactly one diffusers tensor.
    """
    scale = _scale_factor(original, rows)
    names = sorted(rows)
    if len(names) >= 2**31 or any(n * scale >= 2**32 for n in rows.values()):
        raise KeyMapError("too many tensors or rows to tag")
    probe = {
        name: torch.arange(rows[name] * scale, dtype=torch.int64) + (index << 32) for index, name in enumerate(names)
    }
    try:
        converted = original.converter()(dict(probe))
    except (KeyError, RuntimeError, IndexError, ValueError) as error:
        raise KeyMapError(
            f"diffusers' {original.transformer_class} conversion cannot read the file's tensor names: "
            f"{type(error).__name__}: {error}"
        ) from None
    used = {name: 0 for name in names}
    mapping: dict[str, list[Rows]] = {}
    for key, tags in converted.items():
        if not isinstance(tags, torch.Tensor) or tags.dtype != torch.int64 or tags.dim() != 1:
            raise KeyMapError(f"diffusers' conversion builds {key!r} by more than moving rows")
        runs = []
        values = tags.tolist()
        start = 0
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[i - 1] + 1:
                index, first = values[start] >> 32, values[start] & 0xFFFFFFFF
                length = i - start
                if first % scale or length % scale:
                    raise KeyMapError(f"diffusers' conversion splits {names[index]!r} at a row that is not the model's")
                runs.append(Rows(names[index], first // scale, (first + length) // scale))
                used[names[index]] += length // scale
                start = i
        mapping[key] = runs
    if unused := sorted(name for name in names if used[name] != rows[name]):
        raise KeyMapError(
            f"tensor(s) {unused[:5]} of the file have no place in {original.transformer_class}"
            + (f" (and {len(unused) - 5} more)" if len(unused) > 5 else "")
        )
    return mapping


def original_rows(original: OriginalFormat, config: Mapping, diffusers_shapes: Mapping[str, tuple]):
    """(original tensor -> rows, original tensor -> [(diffusers tensor, its rows, original rows)]) for writing.

    The original names and which diffusers tensors each holds come from
    ``original.layout``; the row order within each from diffusers' converter,
    which must reproduce the layout exactly (else KeyMapError).
    """
    layout = [(o, parts) for o, parts in original.layout(config) if all(p in diffusers_shapes for p in parts)]
    listed = {p for _, parts in layout for p in parts}
    if missing := sorted(set(diffusers_shapes) - listed):
        raise KeyMapError(f"{original.transformer_class}: no original name for {missing[:5]}")
    rows = {o: sum(diffusers_shapes[p][0] if diffusers_shapes[p] else 1 for p in parts) for o, parts in layout}
    forward = diffusers_rows(original, rows)
    if set(forward) != listed:
        raise KeyMapError(
            f"diffusers' conversion and the {original.transformer_class} layout disagree on "
            f"{sorted(set(forward) ^ listed)[:5]}"
        )
    inverse: dict[str, list[tuple[str, Rows, Rows]]] = {o: [] for o, _ in layout}
    for key, runs in forward.items():
        offset = 0
        for run in runs:
            length = run.stop - run.start
            inverse[run.key].append((key, Rows(key, offset, offset + length), run))
            offset += length
    for pieces in inverse.values():
        pieces.sort(key=lambda piece: piece[2].start)
    return rows, inverse


def strip_model_prefix(keys) -> tuple[str, list[str]]:
    """('model.diffusion_model.' or '', the keys without it); refuses a file mixing both."""
    keys = list(keys)
    prefixed = [k for k in keys if k.startswith(COMFY_MODEL_PREFIX)]
    if not prefixed:
        return "", keys
    if others := [k for k in keys if not k.startswith(COMFY_MODEL_PREFIX)]:
        raise KeyMapError(
            f"the file holds tensors outside {COMFY_MODEL_PREFIX!r} ({others[:3]}...): a full checkpoint with "
            "VAE or text encoders; extract the diffusion model first"
        )
    return COMFY_MODEL_PREFIX, [k[len(COMFY_MODEL_PREFIX) :] for k in prefixed]
