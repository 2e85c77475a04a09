"""LoRA on quantized transformers through the CUDA kernels, eager and under torch.compile (inductor), loaded
by the pipelines' load_lora_weights (lora_dits.load; Flux.1's FluxLoraLoaderMixin looks weights up by name).

Run on a CUDA machine: ``python -m pytest packages/convrot-diffusers/tests/test_lora_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from lora_dits import ARCHITECTURES, STRENGTH, build, load, peft_lora, quantized_copy, rel, run

import convrot_diffusers

pytestmark = pytest.mark.gpu
pytest.importorskip("peft")

# Flux at a width where the kernels' tiles are full, with two blocks of each kind; Qwen-Image at its tiny config.
SIZES = {"flux": {"width": 512, "blocks": 2, "side": 8}, "qwen-image": {}}


def _setup(arch: str, seed: int, rank: int = 4, hotswap_rank: int | None = None):
    model, inputs = build(arch, seed, device="cuda", **SIZES[arch])
    quantized = quantized_copy(model)
    generator = torch.Generator().manual_seed(seed + 1)
    loras = [peft_lora(model, r, generator, STRENGTH) for r in (rank, hotswap_rank or rank)]
    return model, quantized, inputs, loras


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gpu_lora_on_quantized_model_adds_no_error_beyond_quantization(arch, seed):
    model, quantized, inputs, (lora, _) = _setup(arch, seed)
    outputs = {}
    for name, transformer in (("bf16", model), ("convrot", quantized)):
        outputs[name] = run(transformer, inputs)
        load(arch, transformer, lora, "style")
        outputs[name + "+lora"] = run(transformer, inputs)
    error = rel(outputs["convrot"], outputs["bf16"])
    lora_error = rel(outputs["convrot+lora"], outputs["bf16+lora"])
    print(f"{arch}: {error:.4f} without the LoRA, {lora_error:.4f} with it")
    assert lora_error <= 1.1 * error, f"seed {seed}"
    assert lora_error < rel(outputs["convrot"], outputs["bf16+lora"]), f"seed {seed}"
    quantized.set_adapters(["style"], [0.0])
    assert torch.equal(run(quantized, inputs), outputs["convrot"])
    quantized.unload_lora()
    assert torch.equal(run(quantized, inputs), outputs["convrot"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gpu_compiled_lora_model_and_hotswap_without_recompiling(arch, seed):
    """Inductor keeps bf16 intermediates in fp32 across fused ops, and random-weight models carry those
    differences on (on the CPU a tiny Flux's compiled output is 4% from its eager one, bf16 or quantized,
    twice the quantization error): compiled outputs are held to the same model's compile drift without a LoRA."""
    model, quantized, inputs, (first, second) = _setup(arch, seed, rank=4, hotswap_rank=8)
    eager_plain = run(quantized, inputs)
    torch._dynamo.reset()
    drift = rel(run(torch.compile(quantized), inputs), eager_plain)
    quantized.enable_lora_hotswap(target_rank=8)
    load(arch, quantized, first, "style")
    eager_first = run(quantized, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(quantized)
    compiled_first = run(compiled, inputs)
    bound = 1.5 * drift + 1e-3
    print(f"{arch}: compile drift {drift:.4f} without a LoRA, {rel(compiled_first, eager_first):.4f} with it")
    assert rel(compiled_first, eager_first) <= bound, f"seed {seed}"

    with torch._dynamo.config.patch(error_on_recompile=True):
        load(arch, quantized, second, "style", hotswap=True)
        compiled_second = run(compiled, inputs)
    fresh = quantized_copy(model)
    load(arch, fresh, second, "style")
    eager_second = run(fresh, inputs)
    assert rel(compiled_second, eager_second) <= bound, f"seed {seed}"
    assert rel(compiled_second, compiled_first) > 0.5 * rel(eager_second, eager_first)  # the swap took effect


def test_gpu_flux_fusions_with_a_lora_match_the_unfused_model(seed):
    model, quantized, inputs, (lora, _) = _setup("flux", seed)
    error = rel(run(quantized, inputs), run(model, inputs))
    attention_only = {key: value for key, value in lora.items() if ".attn." in key}
    load("flux", quantized, attention_only, "style")
    unfused = run(quantized, inputs)
    convrot_diffusers.fuse_qkv_projections(quantized)
    convrot_diffusers.fuse_activations(quantized)
    convrot_diffusers.fuse_qk_norm_rope(quantized)
    assert quantized.transformer_blocks[0].ff.net[2].gelu_from == 0  # the fusions apply around the LoRA
    # Unfused and fused outputs differ at GELU rounding ties only; a LoRA left out would differ by about error.
    assert rel(run(quantized, inputs), unfused) < 0.1 * error, f"seed {seed}"
