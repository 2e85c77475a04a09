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


# Width 3072 (24 heads of 128), as released: FLUX.2 [klein] 4B, Qwen-Image, Wan 2.2 TI2V-5B; one block of each kind.
REAL_WIDTH = {
    "Flux2Transformer2DModel": dict(
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=7680,
        timestep_guidance_channels=256,
        axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    ),
    "QwenImageTransformer2DModel": dict(num_layers=1),
    "WanTransformer3DModel": dict(
        num_attention_heads=24,
        in_channels=48,
        out_channels=48,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=14336,
        num_layers=1,
    ),
}


@pytest.mark.parametrize("class_name", REAL_WIDTH)
def test_real_width_model_output_matches_comfy_kitchens_eager_path(class_name, tmp_path):
    """As test_comfy_quant's test_model_output_matches_comfy_kitchens_eager_path at width 3072, on CUDA: a file
    written by comfy-kitchen's quantizers, run by our CUDA kernels and by comfy-kitchen's eager linears with fp32
    activations, the outputs within a quarter of the quantized model's error against the float model."""
    pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the reference for ComfyUI's format) is not installed")
    import diffusers
    import tiny_dits
    from comfy_files import run_on_kitchen, write_comfy_file

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(diffusers, class_name)(**REAL_WIDTH[class_name]).to(torch.bfloat16).eval()
    write_comfy_file(model, tmp_path / "model.safetensors")  # group 256, comfy-kitchen's eager quantizers
    sample = tiny_dits.INPUTS[class_name](model.config, torch.Generator().manual_seed(1))
    kwargs = {
        k: (v.cuda().float() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
        for k, v in sample.items()
    }
    with torch.no_grad():
        reference = torch.nn.Module.to(model, torch.float32)(**kwargs, return_dict=False)[0].float()
        del model
        ours = load_comfy(tmp_path / "model.safetensors", device="cuda", dtype=torch.float32)  # config from the file
        assert isinstance(ours, getattr(diffusers, class_name))
        y_ours = ours(**kwargs, return_dict=False)[0].float()
        run_on_kitchen(ours)
        y_kitchen = ours(**kwargs, return_dict=False)[0].float()
    error = (y_kitchen - reference).norm()
    assert 0 < error / reference.norm() < 0.5
    assert (y_ours - y_kitchen).norm() <= 0.25 * error, (
        f"ours vs comfy-kitchen {(y_ours - y_kitchen).norm():.4g}, error {error:.4g}"
    )
