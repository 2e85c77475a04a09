"""Real-width transformer configs and denoising-step inputs at 1024x1024, for benchmarks.

The weights are random: the benchmarks time a denoising step, which does not
depend on what the weights say. ``scale`` shrinks every width for a CPU smoke run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: object  # (blocks: tuple[int, ...] | None, tiny: bool) -> nn.Module
    inputs: object  # (model, batch: int, tiny: bool, device) -> dict of forward kwargs


def _flux(blocks, tiny):
    double, single = blocks if blocks else (19, 38)
    heads, head_dim = (2, 32) if tiny else (24, 128)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64 if tiny else 4096,
        pooled_projection_dim=32 if tiny else 768,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12) if tiny else (16, 56, 56),
    )


def _flux_inputs(model, batch, tiny, device):
    # 1024x1024: a 128x128 latent packed 2x2 into 4096 image tokens, 512 T5 tokens.
    image_tokens, text_tokens = (64, 16) if tiny else (4096, 512)
    side = int(image_tokens**0.5)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return {
        "hidden_states": torch.randn(batch, image_tokens, cfg.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
        "return_dict": False,
    }


def _pixart(blocks, tiny):
    layers = blocks[0] if blocks else 28
    return PixArtTransformer2DModel(
        num_attention_heads=2 if tiny else 16,
        attention_head_dim=32 if tiny else 72,  # PixArt-Σ: 1152 wide, group 64
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=64 if tiny else 1152,
        sample_size=16 if tiny else 128,
        patch_size=2,
        caption_channels=64 if tiny else 4096,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def _pixart_inputs(model, batch, tiny, device):
    cfg = model.config
    dtype = next(model.parameters()).dtype
    side, text_tokens = (16, 8) if tiny else (128, 300)
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.caption_channels, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def _sd3(blocks, tiny):
    layers = blocks[0] if blocks else 38
    heads, head_dim = (2, 32) if tiny else (38, 64)  # SD3.5-large: 2432 wide, group 64
    return SD3Transformer2DModel(
        sample_size=16 if tiny else 128,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64 if tiny else 4096,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=32 if tiny else 2048,
        out_channels=16,
        pos_embed_max_size=32 if tiny else 192,
        qk_norm="rms_norm",
    )


def _sd3_inputs(model, batch, tiny, device):
    cfg = model.config
    dtype = next(model.parameters()).dtype
    side, text_tokens = (16, 8) if tiny else (128, 333)  # 77 CLIP + 256 T5 tokens
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "return_dict": False,
    }


MODELS = {
    "flux": BenchModel("flux", _flux, _flux_inputs),
    "pixart": BenchModel("pixart", _pixart, _pixart_inputs),
    "sd3": BenchModel("sd3", _sd3, _sd3_inputs),
}


def build(name: str, blocks: tuple[int, ...] | None, tiny: bool, device, dtype=torch.bfloat16, seed: int = 0):
    """The model with random weights, created directly on device in dtype."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return MODELS[name].build(blocks, tiny).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
