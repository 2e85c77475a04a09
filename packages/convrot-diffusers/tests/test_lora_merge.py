"""merge_lora: LoRAs requantized into a quantized transformer's weights (tiny models, random LoRAs)."""

import copy

import pytest
import torch
from lora_dits import STRENGTH, build, kohya_lora, peft_lora, pipeline, quantized_copy, rel, run

import convrot
import convrot_diffusers
from convrot_diffusers.lora_merge import _dequantized

pytest.importorskip("peft")


def _with_lora(arch, seed, preset="w4a4", policy=None, adapters=("style",), lora_format="peft"):
    """(bf16 model, inputs, quantized copy with the LoRAs loaded (diffusers' PEFT format or kohya's), its pipeline)."""
    model, inputs = build(arch, seed)
    if policy is None:
        quantized = quantized_copy(model, preset)
    else:
        quantized = convrot_diffusers.quantize_transformer(copy.deepcopy(model), policy=policy, progress=False)
    pipe = pipeline(arch, quantized)
    generator = torch.Generator().manual_seed(seed + 1)
    for rank, name in enumerate(adapters, start=4):
        make = peft_lora if lora_format == "peft" else lambda *args: kohya_lora(arch, *args)
        pipe.load_lora_weights(make(model, rank, generator, STRENGTH), adapter_name=name)
    return model, inputs, quantized, pipe


def _measured_base_error(model, quantized) -> float:
    """Relative error of the quantized block layers' weights against the bf16 ones (the scheme's own cost)."""
    floats = dict(model.named_modules())
    num = den = 0.0
    for name, layer in quantized.named_modules():
        if isinstance(layer, convrot.ConvLinear) and "blocks." in name:
            weight = floats[name.removesuffix(".base_layer")].weight.to(torch.float64)
            num += (_dequantized(layer) - weight).norm().item() ** 2
            den += weight.norm().item() ** 2
    return (num / den) ** 0.5


CASES = [("flux", "w4a4", "peft"), ("flux", "w4a8g64", "peft"), ("flux", "mix", "peft"), ("flux", "w4a4", "kohya")]


@pytest.mark.parametrize("arch, preset, lora_format", [*CASES, ("qwen-image", "w4a4", "peft")])
def test_merged_model_matches_the_quantized_model_with_its_lora(arch, preset, lora_format, seed):
    model, inputs, quantized, pipe = _with_lora(
        arch, seed, preset, adapters=("style", "subject"), lora_format=lora_format
    )
    pipe.set_adapters(["style", "subject"], [0.8, 0.6])
    unquantized_error = rel(run(quantized_copy(model, preset), inputs), run(model, inputs))
    with_lora = run(quantized, inputs)
    base_error = _measured_base_error(model, quantized)
    # W_eff from PEFT's own delta (its get_delta_weight, scaled by set_adapters' weights), to check the merge by.
    effective = {}
    for name, module in quantized.named_modules():
        if hasattr(module, "lora_A"):
            delta = sum(module.get_delta_weight(a).to(torch.float64) for a in module.active_adapters)
            effective[name] = (module.get_base_layer(), _dequantized(module.get_base_layer()) + delta)

    report = convrot_diffusers.merge_lora(pipe)
    merged = run(quantized, inputs)
    assert not any(hasattr(m, "lora_A") for m in quantized.modules())
    assert report.adapters == ["style", "subject"] and not report.discarded
    lora_layers = [n for n, m in quantized.named_modules() if isinstance(m, convrot.ConvLinear) and "blocks." in n]
    assert sorted(report.layers) == sorted(effective)
    if lora_format == "peft":  # a LoRA of every block layer (kohya's Flux file leaves linear1 out)
        assert sorted(report.layers) == sorted(lora_layers)
    # The merged weights against PEFT's W_eff: a LoRA dropped or mis-scaled would leave them 0.15 away.
    num = sum((_dequantized(layer) - w_eff).norm().item() ** 2 for layer, w_eff in effective.values())
    den = sum(w_eff.norm().item() ** 2 for _, w_eff in effective.values())
    assert abs((num / den) ** 0.5 - report.error) < 1e-5  # PEFT computes B A in fp32
    # Requantizing rounds W_eff once more, on a grid as fine as the base's: the weights' error is at most the
    # base's own against bf16 (measured 0.91-0.95x over 10 seeds per case), and the uniform-rounding estimate
    # the report gives for the base is that measured error within 10% (0.99x).
    assert report.error <= base_error, f"seed {seed}: {report.error:.4f} merging, {base_error:.4f} quantizing"
    base_model = (sum(e.base_rounding**2 for e in report.layers.values()) / len(report.layers)) ** 0.5
    assert abs(base_model / base_error - 1) < 0.1, f"{base_model:.4f} estimated, {base_error:.4f} measured"
    # Each layer's measured error against the uniform-rounding estimate for its new steps: 0.90-0.92x at
    # 4 bits (a LoRA moves a weight by less than a step), 0.99-1.003x at 8 bits (rounding is uniform there).
    assert all(e.error <= 1.05 * e.merged_rounding for e in report.layers.values())
    # So the merged model is about as far from the one it replaces as quantizing moved the model (0.82-1.10x
    # over 10 seeds per case).
    error = rel(merged, with_lora)
    assert error <= 1.2 * unquantized_error, f"seed {seed}: {error:.4f} merged, {unquantized_error:.4f} quantizing"


def test_a_float_layer_with_a_lora_is_merged_in_its_dtype(seed):
    policy = {"*ff.net.2": "skip", "*": "w4a4"}
    model, inputs, quantized, pipe = _with_lora("flux", seed, policy=policy)
    with_lora = run(quantized, inputs)
    plain = convrot_diffusers.quantize_transformer(copy.deepcopy(model), policy=policy, progress=False)
    unquantized_error = rel(run(plain, inputs), run(model, inputs))
    report = convrot_diffusers.merge_lora(pipe)
    floats = {n for n, e in report.layers.items() if e.kind == "float"}
    assert floats and all(n.endswith("ff.net.2") for n in floats)
    assert all(report.layers[n].error < 2**-8 for n in floats)  # bf16 rounding of W_eff
    assert rel(run(quantized, inputs), with_lora) <= 1.2 * unquantized_error


@pytest.mark.parametrize("preset", ["w4a4", "w4a8", "mix"])
def test_adapter_weight_zero_merges_to_the_base_codes_bit_for_bit(preset, seed):
    model, inputs = build("flux", seed)
    quantized = quantized_copy(model, preset)
    before = {key: tensor.clone() for key, tensor in quantized.state_dict().items()}
    reference = run(quantized, inputs)
    pipe = pipeline("flux", quantized)
    pipe.load_lora_weights(peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH), adapter_name="style")
    pipe.set_adapters(["style"], [0.0])
    report = convrot_diffusers.merge_lora(pipe)
    after = quantized.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    assert torch.equal(run(quantized, inputs), reference)
    assert report.error == 0.0 and report.layers


def test_merged_model_saves_and_reloads_bit_for_bit(tmp_path, seed):
    import diffusers

    model, inputs, quantized, pipe = _with_lora("flux", seed, "mix")
    convrot_diffusers.merge_lora(pipe, "style")
    merged = run(quantized, inputs)
    state = quantized.state_dict()
    quantized.save_pretrained(tmp_path)
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    found = reloaded.state_dict()
    assert found.keys() == state.keys() and all(torch.equal(found[key], state[key]) for key in state)
    assert torch.equal(run(reloaded, inputs), merged)


def test_merging_one_of_two_adapters_discards_the_other():
    model, inputs, quantized, pipe = _with_lora("flux", 0, adapters=("style", "subject"))
    pipe.set_adapters(["style"], [1.0])
    only_style = run(quantized, inputs)
    report = convrot_diffusers.merge_lora(quantized, ["style"])
    assert report.discarded == ["subject"]
    assert rel(run(quantized, inputs), only_style) < 0.03


def test_bad_input_raises_before_any_change(seed):
    model, inputs, quantized, pipe = _with_lora("flux", seed)
    with_lora = run(quantized, inputs)
    state = {key: tensor.clone() for key, tensor in quantized.state_dict().items()}
    for names, match in ((["nope"], "unknown adapter.*nope.*loaded: \\['style'\\]"), ([], "no adapter is active")):
        with pytest.raises(ValueError, match=match):
            convrot_diffusers.merge_lora(pipe, names)
    pipe.disable_lora()
    with pytest.raises(ValueError, match="disabled"):
        convrot_diffusers.merge_lora(pipe)
    pipe.enable_lora()
    # A layer it cannot merge, found after others it could: nothing is changed either.
    last = [m for m in quantized.modules() if hasattr(m, "lora_B")][-1]
    last.lora_B["style"].bias = torch.nn.Parameter(torch.zeros(last.out_features, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="LoRA bias"):
        convrot_diffusers.merge_lora(pipe)
    last.lora_B["style"].bias = None
    up = last.lora_B["style"].weight
    kept = up.detach().clone()
    with torch.no_grad():
        up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="merge_lora: .*(NaN or Inf|not finite)"):
        convrot_diffusers.merge_lora(pipe)
    with torch.no_grad():
        up.copy_(kept)
    after = quantized.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[key], state[key]) for key in state)
    assert torch.equal(run(quantized, inputs), with_lora)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="no LoRA loaded"):
        convrot_diffusers.merge_lora(pipe)


def test_merging_beside_flux_fusions_leaves_them_in_place(seed):
    model, inputs = build("flux", seed)
    quantized = quantized_copy(model)
    unquantized_error = rel(run(quantized, inputs), run(model, inputs))
    state = peft_lora(model, 4, torch.Generator().manual_seed(seed), STRENGTH)
    pipe = pipeline("flux", quantized)
    pipe.load_lora_weights({key: value for key, value in state.items() if ".attn." in key}, adapter_name="style")
    convrot_diffusers.fuse_activations(quantized)  # the feed-forwards fuse, the LoRA'd attention steps aside
    fused_ff = quantized.transformer_blocks[0].ff.net[2]
    assert fused_ff.gelu_from == 0
    with_lora = run(quantized, inputs)
    report = convrot_diffusers.merge_lora(pipe)
    assert report.layers and all(".attn." in name for name in report.layers)
    assert quantized.transformer_blocks[0].ff.net[2] is fused_ff and fused_ff.gelu_from == 0
    assert rel(run(quantized, inputs), with_lora) <= 1.2 * unquantized_error
