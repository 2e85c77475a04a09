"""Diffusers DiTs without a preset of their own, built in code (tiny or at real widths), with sample inputs.

``python tiny_dits.py`` prints the SQNR table of docs/diffusers.md ("Other DiTs"): each
architecture's transformer output under the default preset against the unquantized bf16 model,
through the kernels and in float64 simulation, over seeds 0-9.
"""

from __future__ import annotations

import copy

import torch
from diffusers import FluxTransformer2DModel

import convrot
from convrot_diffusers import quantize_transformer
from convrot_diffusers.metrics import sqnr

DTYPE = torch.bfloat16


# Per architecture: the transformer class, its tiny config (width 64, two blocks per block list, for
# the CPU tests) and its real widths (the released models' config.json, blocks cut to what a test
# sets, for the GPU tests), and a function making sample inputs from the model's config.
TINY = {
    "Flux2Transformer2DModel": dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        timestep_guidance_channels=64,
        axes_dims_rope=(8, 8, 8, 8),
    ),
    "QwenImageTransformer2DModel": dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    ),
    "WanTransformer3DModel": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=128,
        num_layers=2,
    ),
    "LTX2VideoTransformer3DModel": dict(
        in_channels=64,
        out_channels=64,
        num_attention_heads=2,
        attention_head_dim=32,
        cross_attention_dim=64,
        audio_in_channels=64,
        audio_out_channels=64,
        audio_num_attention_heads=2,
        audio_attention_head_dim=32,
        audio_cross_attention_dim=64,
        num_layers=2,
        caption_channels=64,
    ),
}

# The classes' defaults are the released widths (FLUX.2-dev, Qwen-Image, Wan2.1-T2V-14B, LTX-2) but
# for the block counts, which the caller sets.
REAL = {
    "Flux2Transformer2DModel": dict(num_layers=1, num_single_layers=2),
    "QwenImageTransformer2DModel": dict(num_layers=2),
    "WanTransformer3DModel": dict(num_layers=2),
    "LTX2VideoTransformer3DModel": dict(num_layers=2),
}


def tiny_flux(width: int = 256, head_dim: int = 64, double: int = 1, single: int = 1, seed: int = 0):
    """A tiny random Flux.1 transformer in bf16 (its presets and fused blocks; the ComfyUI and LoRA tests)."""
    torch.manual_seed(seed)
    heads = width // head_dim
    rope = (16, 56, 56) if head_dim == 128 else (16, (head_dim - 16) // 2, (head_dim - 16) // 2)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=rope,
    )
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def _flux2_inputs(config, generator, tokens_side=4, text=8):
    tokens = tokens_side * tokens_side
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack(
            torch.meshgrid(*(torch.arange(n) for n in (1, 1, tokens_side, tokens_side)), indexing="ij"), -1
        )
        .reshape(tokens, 4)
        .float(),
        "txt_ids": torch.zeros(text, 4),
    }


def _qwen_image_inputs(config, generator, tokens_side=4, text=8):
    return {
        "hidden_states": torch.randn(1, tokens_side * tokens_side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, tokens_side, tokens_side)],
    }


def _wan_inputs(config, generator, tokens_side=4, text=8):
    size = 2 * tokens_side  # patches of 2x2
    return {
        "hidden_states": torch.randn(1, config.in_channels, 2, size, size, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, text, config.text_dim, generator=generator),
    }


def _ltx2_inputs(config, generator, tokens_side=4, text=8):
    frames, audio_frames = 2, 8
    return {
        "hidden_states": torch.randn(1, frames * tokens_side**2, config.in_channels, generator=generator),
        "audio_hidden_states": torch.randn(1, audio_frames, config.audio_in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.caption_channels, generator=generator),
        "audio_encoder_hidden_states": torch.randn(1, text, config.caption_channels, generator=generator),
        "timestep": torch.tensor([0.5]),
        "num_frames": frames,
        "height": tokens_side,
        "width": tokens_side,
        "audio_num_frames": audio_frames,
    }


INPUTS = {
    "Flux2Transformer2DModel": _flux2_inputs,
    "QwenImageTransformer2DModel": _qwen_image_inputs,
    "WanTransformer3DModel": _wan_inputs,
    "LTX2VideoTransformer3DModel": _ltx2_inputs,
}
BUILDERS = tuple(TINY)


def build(class_name: str, seed: int, real: bool = False, device: str = "cpu", **input_sizes):
    """(bf16 model with seeded random weights, a function of a generator making its inputs)."""
    import diffusers

    torch.manual_seed(seed)
    config = (REAL if real else TINY)[class_name]
    with torch.device(device):  # initialised where it runs: the real-width models are billions of weights
        model = getattr(diffusers, class_name)(**config).to(dtype=DTYPE).eval()

    def inputs(generator):
        return INPUTS[class_name](model.config, generator, **input_sizes)

    return model, inputs


def run(model, inputs) -> torch.Tensor:
    device = next(model.parameters()).device
    cast = {
        k: (v.to(device, DTYPE) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }
    with torch.no_grad():
        out = model(**cast, return_dict=False)[0]
    return out.float().cpu()


def sqnr_pair(class_name: str, seed: int, preset: str = "mix", **build_options) -> tuple[float, float, torch.Tensor]:
    """(kernel SQNR dB, float64-simulation SQNR dB, kernel output) of ``preset`` against the bf16 model."""
    model, make_inputs = build(class_name, seed, **build_options)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    reference = run(model, inputs)
    quantized = quantize_transformer(copy.deepcopy(model), preset=preset, progress=False)
    found = run(quantized, inputs)
    simulated = run(convrot.set_simulation(quantized, torch.float64), inputs)
    return sqnr(reference, found), sqnr(reference, simulated), found


def main() -> None:
    torch.set_num_threads(2)
    print("| transformer | preset | kernels SQNR (dB) | float64 simulation SQNR (dB) | kernels - simulation (dB) |")
    print("| --- | --- | --- | --- | --- |")
    for class_name in BUILDERS:
        for preset in ("mix", "w4a4"):
            pairs = [sqnr_pair(class_name, seed, preset)[:2] for seed in range(10)]
            found, simulated = [p[0] for p in pairs], [p[1] for p in pairs]
            gaps = [f - s for f, s in pairs]
            print(
                f"| {class_name} | {preset} | {min(found):.1f}-{max(found):.1f} | "
                f"{min(simulated):.1f}-{max(simulated):.1f} | {min(gaps):+.2f} to {max(gaps):+.2f} |"
            )


if __name__ == "__main__":
    main()
