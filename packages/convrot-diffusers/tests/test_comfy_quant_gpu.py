"""ComfyUI files on the GPU: a file loads straight onto CUDA and runs on the CUDA kernels (no comfy-kitchen needed)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

import convrot
import convrot_diffusers
from convrot_diffusers.comfy_quant import load_comfy, save_comfy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def flux(seed: int):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=8,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def test_a_comfy_file_loads_onto_cuda_and_matches_the_cpu_layers(tmp_path):
    model = flux(seed=0)
    convrot_diffusers.quantize_transformer(model, "w4a4", progress=False)
    save_comfy(model, tmp_path / "flux.safetensors", progress=False)
    loaded = load_comfy(tmp_path / "flux.safetensors", device="cuda")  # config from the file (128-wide heads)
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, convrot.ConvLinear)}
    assert layers and all(m.qweight.is_cuda for m in layers.values())
    generator = torch.Generator().manual_seed(1)
    for name, layer in layers.items():
        x = torch.randn(77, layer.in_features, generator=generator).to(torch.bfloat16)
        on_gpu = layer(x.cuda()).cpu()
        on_cpu = model.get_submodule(name)(x)
        # The backends agree bit for bit except where the rotation's fp32 rounding meets a rounding tie.
        assert (on_gpu == on_cpu).float().mean() > 0.999, name
        torch.testing.assert_close(on_gpu, on_cpu, rtol=0.05, atol=0.05 * on_cpu.abs().max().item())
