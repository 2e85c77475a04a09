"""LoRA on ConvRot-quantized transformers through diffusers' loaders and PEFT (tiny models, random LoRAs)."""

import lora_dits
import pytest
import torch
from lora_dits import STRENGTH, build, kohya_lora, load, peft_lora, pipeline, quantized_copy, rel, run

import convrot
import convrot_diffusers
from convrot_diffusers.fusion import FusedAwayProjection

pytest.importorskip("peft")

CASES = [(arch, lora_format) for arch in lora_dits.ARCHITECTURES for lora_format in ("peft", "kohya")]


@pytest.mark.parametrize("arch, lora_format", [*CASES, *[(arch, "two adapters") for arch in lora_dits.ARCHITECTURES]])
def test_lora_on_quantized_model_adds_no_error_beyond_quantization(arch, lora_format, seed):
    model, inputs = build(arch, seed)
    quantized = quantized_copy(model)
    generator = torch.Generator().manual_seed(seed + 1)
    if lora_format == "kohya":
        adapters = {"style": kohya_lora(arch, model, 4, generator, STRENGTH)}
    else:
        adapters = {"style": peft_lora(model, 4, generator, STRENGTH)}
        if lora_format == "two adapters":
            adapters["subject"] = peft_lora(model, 8, generator, STRENGTH)
    outputs = {}
    for name, transformer in (("bf16", model), ("convrot", quantized)):
        outputs[name] = run(transformer, inputs)
        for adapter_name, state in adapters.items():
            load(arch, transformer, state, adapter_name)
        if len(adapters) > 1:
            transformer.set_adapters(list(adapters), [0.8, 0.6])
        outputs[name + "+lora"] = run(transformer, inputs)

    error = rel(outputs["convrot"], outputs["bf16"])
    lora_error = rel(outputs["convrot+lora"], outputs["bf16+lora"])
    # Issue 27's bound, 1.1x, for one adapter (measured 0.97-1.04x). Two adapters at 0.8 / 0.6 spread wider on
    # these tiny random models (Flux.1 0.95-1.09x over 40 seeds, Qwen-Image 0.94-1.09x over 190 with one seed
    # at 1.101x), so their bound is 1.15x: a LoRA path that added error of its own would still exceed it.
    bound = 1.15 if len(adapters) > 1 else 1.1
    assert lora_error <= bound * error, f"seed {seed}: {lora_error:.4f} with the LoRA, {error:.4f} without"
    # The LoRA did act on the quantized model: it moved its output by about what it moves bf16's (1.3-1.6x
    # measured on Flux.1 seeds). A kohya LoRA moves these tiny models' outputs by 0.5-0.7%, below the
    # quantization error, so "closer to bf16 + LoRA than without it" failed on some seeds.
    lora_effect = rel(outputs["bf16+lora"], outputs["bf16"])
    moved = rel(outputs["convrot+lora"], outputs["convrot"])
    assert moved >= 0.5 * lora_effect, (
        f"seed {seed}: the LoRA moved the quantized output by {moved:.4f}, bf16 by {lora_effect:.4f}"
    )
    lora_layers = [m for m in quantized.modules() if type(m).__name__ == "Linear" and hasattr(m, "base_layer")]
    assert lora_layers and all(isinstance(m.base_layer, convrot.ConvLinear) for m in lora_layers)
    assert all(m.lora_A[name].weight.dtype == torch.bfloat16 for m in lora_layers for name in m.lora_A)


def test_adapter_weight_zero_and_unload_give_the_quantized_output_bit_for_bit(seed):
    arch = "flux"
    model, inputs = build(arch, seed)
    quantized = quantized_copy(model)
    state_before = {key: tensor.clone() for key, tensor in quantized.state_dict().items()}
    reference = run(quantized, inputs)
    pipe = pipeline(arch, quantized)
    pipe.load_lora_weights(peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH), adapter_name="style")
    with_lora = run(quantized, inputs)
    assert not torch.equal(with_lora, reference)

    pipe.set_adapters(["style"], [0.0])
    assert torch.equal(run(quantized, inputs), reference)
    pipe.set_adapters(["style"], [1.0])
    assert torch.equal(run(quantized, inputs), with_lora)

    pipe.unload_lora_weights()
    assert torch.equal(run(quantized, inputs), reference)
    after = quantized.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[key], state_before[key]) for key in state_before)


@pytest.mark.parametrize("arch", lora_dits.ARCHITECTURES)
def test_pipeline_unload_and_hotswap_on_a_quantized_transformer(arch, seed):
    model, inputs = build(arch, seed)
    quantized = quantized_copy(model)
    generator = torch.Generator().manual_seed(seed)
    first, second = peft_lora(model, 4, generator, STRENGTH), peft_lora(model, 8, generator, STRENGTH)
    reference = run(quantized, inputs)

    pipe = pipeline(arch, quantized)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(dict(first), adapter_name="style")
    with_first = run(quantized, inputs)
    pipe.load_lora_weights(dict(second), adapter_name="style", hotswap=True)
    swapped = run(quantized, inputs)

    fresh = quantized_copy(model)
    pipeline(arch, fresh).load_lora_weights(dict(second), adapter_name="style")
    expected = run(fresh, inputs)
    assert not torch.equal(swapped, with_first)
    torch.testing.assert_close(swapped, expected, rtol=0, atol=1e-6 * expected.abs().max().item())

    pipe.unload_lora_weights()
    assert torch.equal(run(quantized, inputs), reference)


def test_fuse_lora_is_refused_and_changes_nothing(seed):
    model, inputs = build("qwen-image", seed)
    quantized = quantized_copy(model)
    pipe = pipeline("qwen-image", quantized)
    pipe.load_lora_weights(peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH), adapter_name="a")
    with_lora = run(quantized, inputs)
    for safe_fusing in (False, True):
        with pytest.raises(NotImplementedError, match="fuse_lora.*convrot_diffusers.merge_lora"):
            pipe.fuse_lora(safe_fusing=safe_fusing)
        assert torch.equal(run(quantized, inputs), with_lora)


def _attention_only(state: dict) -> dict:
    """The LoRA's attention layers (its feed-forward and single-block output layers left out)."""
    return {key: value for key, value in state.items() if ".attn." in key}


@pytest.mark.parametrize("which", ["all layers", "attention only"])
def test_flux_fusions_after_a_lora_step_aside_for_its_layers(which, seed):
    model, inputs = build("flux", seed)
    quantized = quantized_copy(model)
    state = peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH)
    load("flux", quantized, state if which == "all layers" else _attention_only(state), "style")
    unfused = run(quantized, inputs)

    fused_qkv = convrot_diffusers.fuse_qkv_projections(quantized)
    convrot_diffusers.fuse_activations(quantized)
    convrot_diffusers.fuse_qk_norm_rope(quantized)
    assert fused_qkv == 0  # every attention module has LoRA'd projections
    attn = quantized.transformer_blocks[0].attn
    assert not attn.fused_projections and hasattr(attn.to_q, "lora_A")
    fused = run(quantized, inputs)
    # Where fusions do apply (attention only: the feed-forwards' GELU), outputs differ only at GELU rounding ties.
    assert rel(fused, unfused) < 1e-3, f"seed {seed}"
    if which == "all layers":
        assert torch.equal(fused, unfused)
    else:
        assert quantized.transformer_blocks[0].ff.net[2].gelu_from == 0


def test_a_lora_after_flux_fusions_is_refused_by_name_and_changes_nothing(seed):
    model, inputs = build("flux", seed)
    quantized = quantized_copy(model)
    state = peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH)

    convrot_diffusers.fuse_qkv_projections(quantized)
    assert isinstance(quantized.transformer_blocks[0].attn.to_q, FusedAwayProjection)
    before = run(quantized, inputs)
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        load("flux", quantized, _attention_only(state), "style")
    assert torch.equal(run(quantized, inputs), before)
    convrot_diffusers.unfuse_qkv_projections(quantized)

    convrot_diffusers.fuse_activations(quantized)
    before = run(quantized, inputs)
    with pytest.raises(ValueError, match="unfuse_activations"):
        load("flux", quantized, state, "style")
    assert torch.equal(run(quantized, inputs), before)

    # Unfusing, loading, fusing again: the LoRA'd layers stay unfused and the output is the unfused one.
    convrot_diffusers.unfuse_activations(quantized)
    load("flux", quantized, state, "style")
    unfused = run(quantized, inputs)
    convrot_diffusers.fuse_activations(quantized)
    assert torch.equal(run(quantized, inputs), unfused)


def test_compiled_lora_layer_around_a_convlinear_matches_eager(seed):
    """Dynamo traces PEFT's layer around a ConvLinear in one graph (aot_eager: no C++ build on CPU; the GPU
    test compiles whole models with inductor)."""
    model, inputs = build("qwen-image", seed)
    quantized = quantized_copy(model)
    load("qwen-image", quantized, peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH), "style")
    layer = quantized.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer, convrot.ConvLinear4bit)
    x = torch.randn(2, 8, layer.in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", lora_dits.ARCHITECTURES)
def test_lora_on_a_saved_and_reloaded_quantized_transformer(arch, tmp_path, seed):
    import diffusers
    from safetensors import safe_open

    model, inputs = build(arch, seed)
    quantized = quantized_copy(model)
    state = {key: tensor.clone() for key, tensor in quantized.state_dict().items()}
    lora = peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH)
    load(arch, quantized, lora, "style")
    with_lora = run(quantized, inputs)
    pipeline(arch, quantized).unload_lora_weights()
    quantized.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(path, framework="pt") as handle:
        assert set(handle.keys()) == set(state)  # the quantized layers' codes, no weight of theirs
    cls = getattr(diffusers, type(model).__name__)
    reloaded = cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert all(m.float_dtype == torch.bfloat16 for m in reloaded.modules() if isinstance(m, convrot.ConvLinear))
    found = reloaded.state_dict()
    assert found.keys() == state.keys() and all(torch.equal(found[key], state[key]) for key in state)
    load(arch, reloaded, lora, "style")
    assert torch.equal(run(reloaded, inputs), with_lora)


def test_saving_with_adapters_loaded_is_refused_and_writes_no_weights(tmp_path, seed):
    model, _ = build("qwen-image", seed)
    quantized = quantized_copy(model)
    load("qwen-image", quantized, peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH), "style")
    with pytest.raises(ValueError, match="unload_lora"):
        quantized.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    quantized.unload_lora()
    quantized.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
