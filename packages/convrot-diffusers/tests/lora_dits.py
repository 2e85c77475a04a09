"""Tiny transformers with LoRA state dicts made in code (fresh random weights), in diffusers' PEFT format
and in the kohya (sd-scripts) formats diffusers converts, for the LoRA tests (CPU and GPU)."""

from __future__ import annotations

import copy
import inspect

import tiny_dits
import torch
from tiny_dits import tiny_flux
from torch import nn

# A LoRA's B A moves each layer's output by this fraction of what the layer's own weight gives (trained
# LoRAs sit at or below it); at 0.5 the extra gain of every layer makes quantization errors grow by up to
# 1.3x through the two blocks, whatever the side path computes.
STRENGTH = 0.15


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load(arch: str, transformer, state: dict, adapter_name: str, **kwargs) -> None:
    """diffusers' loader: the architecture's pipeline's load_lora_weights (for Flux.1, FluxLoraLoaderMixin's,
    which looks each LoRA'd layer's weight up in the transformer's state dict)."""
    pipeline(arch, transformer).load_lora_weights(dict(state), adapter_name=adapter_name, **kwargs)


# Architectures under test: Flux.1 (its presets and fused blocks) and Qwen-Image (the generic path).
ARCHITECTURES = ("flux", "qwen-image")
PIPELINES = {"flux": "FluxPipeline", "qwen-image": "QwenImagePipeline"}


def build(arch: str, seed: int, device: str = "cpu", width: int = 128, blocks: int = 1, side: int = 4):
    """(bf16 transformer with seeded random weights, its sample inputs for seed). Flux takes a width (head
    dim 32 below 256, else 64), ``blocks`` double and single blocks and side x side image tokens."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "flux":
        head_dim = 32 if width < 256 else 64
        model = tiny_flux(width=width, head_dim=head_dim, double=blocks, single=blocks, seed=seed).to(device)
        tokens, text = side * side, 8
        config = model.config
        grid = torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
        inputs = {
            "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
            "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([3.5]),
            "img_ids": torch.stack(grid, -1).reshape(-1, 3),
            "txt_ids": torch.zeros(text, 3),
        }
        return model, inputs
    model, make_inputs = tiny_dits.build("QwenImageTransformer2DModel", seed, device=device)
    return model, make_inputs(generator)


def run(model, inputs) -> torch.Tensor:
    return tiny_dits.run(model, inputs)


def lora_targets(model) -> dict[str, nn.Linear]:
    """The float Linear layers of the model's blocks (where LoRAs are trained), by name."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and "blocks." in name
    }


def peft_lora(model, rank: int, generator: torch.Generator, strength: float = 0.5) -> dict[str, torch.Tensor]:
    """A LoRA of every block Linear in diffusers' PEFT format (``transformer.<name>.lora_A.weight`` ...),
    bf16, with B A of about ``strength`` times the RMS gain of the layer's own weight."""
    state = {}
    for name, layer in lora_targets(model).items():
        k, n = layer.in_features, layer.out_features
        down = torch.randn(rank, k, generator=generator) / k**0.5
        gain = layer.weight.float().std().item()
        up = torch.randn(n, rank, generator=generator) * (strength * gain * k**0.5 / rank**0.5)
        state[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
        state[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    return state


def _kohya_flux_names(model) -> dict[str, tuple[str, ...]]:
    """BFL's Flux layer names (as sd-scripts writes them) -> the diffusers layers they are, in row order."""
    names = {}
    for i in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{i}"
        for stream, attn, ff in (
            ("img", ("to_q", "to_k", "to_v"), "ff"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context"),
        ):
            names[f"double_blocks_{i}_{stream}_attn_qkv"] = tuple(f"{block}.attn.{p}" for p in attn)
            names[f"double_blocks_{i}_{stream}_attn_proj"] = (
                f"{block}.attn.{'to_out.0' if stream == 'img' else 'to_add_out'}",
            )
            names[f"double_blocks_{i}_{stream}_mlp_0"] = (f"{block}.{ff}.net.0.proj",)
            names[f"double_blocks_{i}_{stream}_mlp_2"] = (f"{block}.{ff}.net.2",)
    for i in range(len(model.single_transformer_blocks)):
        block = f"single_transformer_blocks.{i}"
        # linear1 (q, k, v and proj_mlp rows) is left out: diffusers splits it at Flux.1's real widths.
        names[f"single_blocks_{i}_linear2"] = (f"{block}.proj_out",)
    return names  # fmt: skip


def kohya_lora(arch: str, model, rank: int, generator: torch.Generator, strength: float = 0.5) -> dict:
    """The same kind of LoRA in the kohya format (``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha``), with BFL's layer names for Flux (fused qkv and linear1 rows), diffusers' for Qwen-Image."""
    layers = dict(model.named_modules())
    if arch == "flux":
        groups = _kohya_flux_names(model)
    else:
        groups = {name.replace(".", "_"): (name,) for name in lora_targets(model)}
    state = {}
    for kohya, parts in groups.items():
        k = layers[parts[0]].in_features
        n = sum(layers[part].out_features for part in parts)
        gain = layers[parts[0]].weight.float().std().item()
        state[f"lora_unet_{kohya}.lora_down.weight"] = (torch.randn(rank, k, generator=generator) / k**0.5).to(
            torch.bfloat16
        )
        up = torch.randn(n, rank, generator=generator) * (strength * gain * k**0.5 / rank**0.5)
        state[f"lora_unet_{kohya}.lora_up.weight"] = up.to(torch.bfloat16)
        state[f"lora_unet_{kohya}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def pipeline(arch: str, transformer):
    """The architecture's diffusers pipeline holding only the transformer (what the LoRA loaders need)."""
    import diffusers

    cls = getattr(diffusers, PIPELINES[arch])
    components = {name: None for name in inspect.signature(cls.__init__).parameters if name != "self"}
    return cls(**{**components, "transformer": transformer})


def quantized_copy(model, preset: str = "w4a4"):
    from convrot_diffusers import quantize_transformer

    return quantize_transformer(copy.deepcopy(model), preset=preset, progress=False)
