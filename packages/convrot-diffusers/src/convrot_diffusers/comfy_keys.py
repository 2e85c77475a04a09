"""Tensor names of a model's original checkpoint (what ComfyUI files use) and of its diffusers transformer.

Original to diffusers is diffusers' own single-file conversion (the one
``from_single_file`` runs for the class), run once on *row tags* instead of
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
Qwen-Image's original checkpoints use diffusers' own names (its converter is
the identity), so it has no layout.
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


def _diffusers_converter(class_name: str) -> Callable[[], Callable]:
    """The conversion ``from_single_file`` runs for ``class_name`` (identity for Qwen-Image, whose
    original checkpoints already use diffusers' names)."""

    def converter():
        from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

        return SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"]

    return converter


def _linear(original: str, *parts: str) -> list[tuple[str, tuple[str, ...]]]:
    """An original Linear holding the given diffusers Linears' rows (weight and bias)."""
    return [(f"{original}.{t}", tuple(f"{p}.{t}" for p in parts)) for t in ("weight", "bias")]


def _double_block_attention(o: str, d: str) -> list[tuple[str, tuple[str, ...]]]:
    """A BFL double block's joint attention (Flux.1 and Flux.2 name it alike): original ``o``, diffusers ``d``."""
    return [
        *_linear(f"{o}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
        *_linear(f"{o}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
        *_linear(f"{o}.img_attn.proj", f"{d}.attn.to_out.0"),
        *_linear(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
        (f"{o}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
        (f"{o}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        (f"{o}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",)),
        (f"{o}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",)),
    ]


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
            *_double_block_attention(o, d),
            *_linear(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"),
            *_linear(f"{o}.img_mlp.2", f"{d}.ff.net.2"),
            *_linear(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *_linear(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
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


def _flux2_layout(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    entries = [
        *_linear("img_in", "x_embedder"),
        *_linear("txt_in", "context_embedder"),
        *_linear("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        *_linear("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        *_linear("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        *_linear("single_stream_modulation.lin", "single_stream_modulation.linear"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ]
    if config.get("guidance_embeds", True):
        entries += _linear("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1")
        entries += _linear("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2")
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        entries += [
            *_double_block_attention(o, d),
            *_linear(f"{o}.img_mlp.0", f"{d}.ff.linear_in"),
            *_linear(f"{o}.img_mlp.2", f"{d}.ff.linear_out"),
            *_linear(f"{o}.txt_mlp.0", f"{d}.ff_context.linear_in"),
            *_linear(f"{o}.txt_mlp.2", f"{d}.ff_context.linear_out"),
        ]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        entries += [
            *_linear(f"{o}.linear1", f"{d}.attn.to_qkv_mlp_proj"),
            *_linear(f"{o}.linear2", f"{d}.attn.to_out"),
            (f"{o}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            (f"{o}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        ]
    return entries


def _wan_layout(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    entries = [
        *_linear("patch_embedding", "patch_embedding"),
        *_linear("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        *_linear("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        *_linear("time_projection.1", "condition_embedder.time_proj"),
        *_linear("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        *_linear("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        *_linear("head.head", "proj_out"),
        ("head.modulation", ("scale_shift_table",)),
    ]
    if config.get("image_dim") is not None:  # image-to-video: the CLIP image embedding's MLP
        image = "condition_embedder.image_embedder"
        entries += [
            *_linear("img_emb.proj.0", f"{image}.norm1"),
            *_linear("img_emb.proj.1", f"{image}.ff.net.0.proj"),
            *_linear("img_emb.proj.3", f"{image}.ff.net.2"),
            *_linear("img_emb.proj.4", f"{image}.norm2"),
        ]
    for i in range(config["num_layers"]):
        o = d = f"blocks.{i}"
        entries += [(f"{o}.modulation", (f"{d}.scale_shift_table",))]
        for attention, ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            a, b = f"{o}.{attention}", f"{d}.{ours}"
            entries += [
                *_linear(f"{a}.q", f"{b}.to_q"),
                *_linear(f"{a}.k", f"{b}.to_k"),
                *_linear(f"{a}.v", f"{b}.to_v"),
                *_linear(f"{a}.o", f"{b}.to_out.0"),
                (f"{a}.norm_q.weight", (f"{b}.norm_q.weight",)),
                (f"{a}.norm_k.weight", (f"{b}.norm_k.weight",)),
            ]
        entries += [
            *_linear(f"{o}.cross_attn.k_img", f"{d}.attn2.add_k_proj"),
            *_linear(f"{o}.cross_attn.v_img", f"{d}.attn2.add_v_proj"),
            (f"{o}.cross_attn.norm_k_img.weight", (f"{d}.attn2.norm_added_k.weight",)),
            # Wan's norm3 (the cross-attention's) is diffusers' norm2; its norm2 (the MLP's) has no weights.
            *_linear(f"{o}.norm3", f"{d}.norm2"),
            *_linear(f"{o}.ffn.0", f"{d}.ffn.net.0.proj"),
            *_linear(f"{o}.ffn.2", f"{d}.ffn.net.2"),
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


def _flux2_config(shapes: Mapping[str, tuple]) -> dict:
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128:
        # Every published Flux.2 (dev, Klein) has 128-wide heads with rotary axes (32, 32, 32, 32).
        raise KeyMapError(
            f"a Flux.2 transformer with {head_dim}-wide heads: its rotary axes cannot be read from the file; "
            "pass its diffusers config (--config)"
        )
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": _count_blocks(shapes, "double_blocks."),
        "num_single_layers": _count_blocks(shapes, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "timestep_guidance_channels": shapes["time_in.in_layer.weight"][1],
        "mlp_ratio": shapes["double_blocks.0.img_mlp.0.weight"][0] / 2 / hidden,  # SwiGLU: gate and up rows
        "axes_dims_rope": [32, 32, 32, 32],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def _qwen_image_config(shapes: Mapping[str, tuple]) -> dict:
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if head_dim != 128 or in_channels % 4 or shapes["proj_out.weight"][0] % 4:
        # Qwen-Image and its edits: 128-wide heads, rotary axes (16, 56, 56), latents in 2x2 patches.
        raise KeyMapError(
            f"a Qwen-Image transformer with {head_dim}-wide heads and {in_channels} input channels: its rotary "
            "axes and patch size cannot be read from the file; pass its diffusers config (--config)"
        )
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": shapes["proj_out.weight"][0] // 4,
        "num_layers": _count_blocks(shapes, "transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "axes_dims_rope": [16, 56, 56],
        "use_additional_t_cond": "time_text_embed.addition_t_embedding.weight" in shapes,
    }


def _wan_config(shapes: Mapping[str, tuple]) -> dict:
    hidden, in_channels, *patch = shapes["patch_embedding.weight"]
    # Wan's q/k norms span all heads, so the file does not say how wide a head is; every Wan 2.x has 128.
    head_dim = 128
    if hidden % head_dim or len(patch) != 3:
        raise KeyMapError(
            f"a Wan transformer of width {hidden}: not a whole number of 128-wide heads; pass its diffusers "
            "config (--config)"
        )
    image = shapes.get("img_emb.proj.0.weight")
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": patch,
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shapes["head.head.weight"][0] // math.prod(patch),
        "text_dim": shapes["text_embedding.0.weight"][1],
        "freq_dim": shapes["time_embedding.0.weight"][1],
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": _count_blocks(shapes, "blocks."),
        "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        "image_dim": image[0] if image else None,
        "added_kv_proj_dim": hidden if "blocks.0.cross_attn.k_img.weight" in shapes else None,
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
    # Which diffusers tensors each original tensor holds; None: the original names are diffusers' own.
    layout: Callable[[Mapping], list[tuple[str, tuple[str, ...]]]] | None
    infer_config: Callable[[Mapping[str, tuple]], dict]
    # The width the converter hard-codes (Flux's linear1 split assumes 3072), or None.
    converter_width: int | None = None
    width_key: str | None = None  # the file tensor whose first dimension is the width


ORIGINAL_FORMATS = (
    OriginalFormat(
        "FluxTransformer2DModel",
        "double_blocks.0.img_mod.lin.weight",  # Flux.2's double blocks share their modulation
        _diffusers_converter("FluxTransformer2DModel"),
        _flux_layout,
        _flux_config,
        converter_width=3072,
        width_key="img_in.weight",
    ),
    OriginalFormat(
        "SD3Transformer2DModel",
        "joint_blocks.0.x_block.attn.qkv.weight",
        _diffusers_converter("SD3Transformer2DModel"),
        _sd3_layout,
        _sd3_config,
    ),
    OriginalFormat(
        "Flux2Transformer2DModel",
        "single_stream_modulation.lin.weight",
        _diffusers_converter("Flux2Transformer2DModel"),
        _flux2_layout,
        _flux2_config,
    ),
    OriginalFormat(
        "QwenImageTransformer2DModel",
        "transformer_blocks.0.img_mod.1.weight",
        _diffusers_converter("QwenImageTransformer2DModel"),
        None,
        _qwen_image_config,
    ),
    OriginalFormat(
        "WanTransformer3DModel",
        "head.modulation",
        _diffusers_converter("WanTransformer3DModel"),
        _wan_layout,
        _wan_config,
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
    matches = [original for original in ORIGINAL_FORMATS if original.signature in keys]
    if len(matches) == 1:
        return matches[0]
    if matches:
        found = ", ".join(f"{o.signature!r} ({o.transformer_class})" for o in matches)
        raise KeyMapError(f"the file's tensor names fit several architectures: it holds {found}")
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
    entries = original.layout(config) if original.layout else [(key, (key,)) for key in diffusers_shapes]
    layout = [(o, parts) for o, parts in entries if all(p in diffusers_shapes for p in parts)]
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
