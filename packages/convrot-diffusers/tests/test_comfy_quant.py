import json

import pytest
import torch
from comfy_files import (
    KitchenLinear,
    StepsLinear,
    TensorCoreConvRotW4A4Layout,
    ck,
    comfy_dequantize,
    convrot_w4a4_in_steps,
    hadamard64,
    is_block_linear,
    original_state_dict,
    replace_convlinears,
    run_on_kitchen,
    tiny_dit,
    tiny_sd3,
    write_comfy_file,
)
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_dits import tiny_flux

import convrot
import convrot_diffusers
from convrot.quantizer.dequantize import dequantize_weight
from convrot_diffusers.comfy_keys import diffusers_rows, format_for_class
from convrot_diffusers.comfy_quant import ComfyQuantError, describe_comfy, is_comfy_file, load_comfy, save_comfy
from convrot_kernels import gemm, rht_quantize, unpack_int4

MODELS = {
    "flux": tiny_flux,
    "sd3": tiny_sd3,
    "flux2": tiny_dit("Flux2Transformer2DModel"),
    "qwen-image": tiny_dit("QwenImageTransformer2DModel"),
    "wan": tiny_dit("WanTransformer3DModel"),
}


def inputs(model, seed: int, tokens: int = 16, text: int = 8):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(torch.bfloat16)  # noqa: E731
    config = model.config
    if isinstance(model, FluxTransformer2DModel):
        return dict(
            hidden_states=randn(1, tokens, config.in_channels),
            encoder_hidden_states=randn(1, text, config.joint_attention_dim),
            pooled_projections=randn(1, config.pooled_projection_dim),
            timestep=torch.full((1,), 0.5),
            img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1),
            txt_ids=torch.zeros(text, 3),
            guidance=torch.full((1,), 3.5),
        )
    if isinstance(model, SD3Transformer2DModel):
        return dict(
            hidden_states=randn(1, config.in_channels, 8, 8),
            encoder_hidden_states=randn(1, text, config.joint_attention_dim),
            pooled_projections=randn(1, config.pooled_projection_dim),
            timestep=torch.full((1,), 500.0),
        )
    import tiny_dits

    sample = tiny_dits.INPUTS[type(model).__name__](config, generator, text=text)
    return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sample.items()}


def take_buffers(model, loaded):
    """Gives ``model`` the non-persistent buffers of ``loaded`` (Wan's rotary tables). They are not in the file:
    a loaded model builds them in fp32, as from_pretrained does, where a model cast whole has them in bf16."""
    persistent = loaded.state_dict().keys()
    for name, buffer in loaded.named_buffers():
        if name not in persistent:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module).register_buffer(attr, buffer.clone(), persistent=False)
    return model


@torch.no_grad()
def forward(model, kwargs):
    return model(**kwargs, return_dict=False)[0].float()


def rows_of_layers(model, header_rows):
    """diffusers layer -> (file layer, its rows in order) through diffusers' converter. In these architectures
    every diffusers layer comes from one file layer: rows in one run, or two swapped halves (AdaLN shift/scale)."""
    sources = diffusers_rows(format_for_class(type(model).__name__), header_rows)
    layers = {}
    for key, runs in sources.items():
        if key.endswith(".weight"):
            (source,) = {run.key for run in runs}
            rows = torch.cat([torch.arange(run.start, run.stop) for run in runs])
            layers[key[: -len(".weight")]] = (source[: -len(".weight")], rows)
    return layers


@pytest.mark.parametrize("name", MODELS)
def test_loaded_layers_hold_comfy_kitchens_codes_and_weights_bit_for_bit(name, seed, tmp_path):
    model = MODELS[name](seed=seed % 1000)
    tensors = write_comfy_file(model, tmp_path / "model.safetensors")
    loaded = load_comfy(tmp_path / "model.safetensors", model.config)

    file_rows = {k: v.shape[0] for k, v in original_state_dict(model).items()}
    checked = 0
    for layer_name, (source, rows) in rows_of_layers(model, file_rows).items():
        layer = loaded.get_submodule(layer_name)
        if f"{source}.comfy_quant" not in tensors:
            assert not isinstance(layer, convrot.ConvLinear)
            continue
        conf = json.loads(bytes(tensors[f"{source}.comfy_quant"].tolist()))
        bits = 4 if conf["format"] == "convrot_w4a4" else 8
        assert isinstance(layer, convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit)
        assert not list(layer.parameters())  # the codes only: no float copy of the weight (.weight stands in)
        assert layer.group_size == conf["convrot_groupsize"]
        codes = tensors[f"{source}.weight"][rows]
        assert torch.equal(layer.qweight.view(torch.int8), codes)
        assert torch.equal(layer.weight_scale, tensors[f"{source}.weight_scale"].reshape(-1)[rows].float())
        full = tensors[f"{source}.weight"]
        shape = (full.shape[0], full.shape[1] * (2 if bits == 4 else 1))
        kitchen = comfy_dequantize(tensors, source, conf, shape)[rows]
        # comfy-kitchen dequantizes in fp32: products code x scale, then a dense rotation. Our fp32
        # dequantization is that computation; and where it is exact, so is theirs: a convrot_w4a4 scale
        # quantized from bf16 weights is a bf16 number (absmax / 7 in bf16), so every product and sum
        # fits fp32 and their result is our exact weight.
        ours = dequantize_weight(layer.qweight, layer.weight_scale, bits, layer.group_size, compute_dtype=torch.float32)
        assert torch.equal(ours, kitchen), layer_name
        if bits == 4:
            assert torch.equal(dequantize_weight(layer.qweight, layer.weight_scale, 4, layer.group_size), kitchen)
        checked += 1
    assert checked == sum(isinstance(m, convrot.ConvLinear) for m in loaded.modules()) > 0
    # The float tensors are the file's, moved: the loaded model's non-quantized state equals the float model's.
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.endswith(("qweight", "weight_scale")) and not isinstance(
            loaded.get_submodule(key.rpartition(".")[0]), convrot.ConvLinear
        ):
            assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("name", MODELS)
def test_layer_outputs_equal_our_kernels_on_the_file_codes(name, seed, tmp_path):
    model = MODELS[name](seed=seed % 1000)
    tensors = write_comfy_file(model, tmp_path / "model.safetensors")
    loaded = load_comfy(tmp_path / "model.safetensors", model.config)
    float_tensors = original_state_dict(model)
    file_rows = {k: v.shape[0] for k, v in float_tensors.items()}
    generator = torch.Generator().manual_seed(seed)
    for layer_name, (source, rows) in rows_of_layers(model, file_rows).items():
        layer = loaded.get_submodule(layer_name)
        if not isinstance(layer, convrot.ConvLinear):
            continue
        x = torch.randn(5, layer.in_features, generator=generator).to(torch.bfloat16)
        codes = tensors[f"{source}.weight"][rows]
        scale = tensors[f"{source}.weight_scale"].reshape(-1)[rows].float()
        qa, sa = rht_quantize(x, layer.group_size, layer.bits)
        expected = gemm(
            qa,
            sa,
            codes.view(torch.uint8) if layer.bits == 4 else codes,
            scale,
            float_tensors[f"{source}.bias"][rows].float() if f"{source}.bias" in float_tensors else None,
            bits=layer.bits,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(layer(x), expected), layer_name


def _fp32(kwargs):
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


@pytest.mark.parametrize(
    "name, build",
    [
        *MODELS.items(),
        # Real width: Flux.1's 3072 (24 heads of 128), one block of each kind (about a minute, 3.5 GB).
        ("flux-3072", lambda seed: tiny_flux(width=3072, head_dim=128, seed=seed)),
    ],
    ids=[*MODELS, "flux-3072"],
)
def test_model_output_matches_comfy_kitchens_eager_path(name, build, seed, tmp_path):
    """The file's codes run by our kernels and by comfy-kitchen's eager ConvRot linears, activations in fp32:
    the outputs differ by at most a quarter of the quantized model's error against the bf16 model (its
    weights, evaluated in fp32). Measured: 1e-5 of it on the tiny models, 0.002 at width 3072 (Flux.2,
    Qwen-Image and Wan at width 3072: test_comfy_quant_gpu.py)."""
    model = build(seed=seed % 1000)
    write_comfy_file(model, tmp_path / "model.safetensors")
    kwargs = _fp32(inputs(model, seed))
    reference = forward(torch.nn.Module.to(model, torch.float32), kwargs)
    del model
    config = None if name == "flux-3072" else build(seed=0).config  # the 3072 one from the file's shapes
    ours = load_comfy(tmp_path / "model.safetensors", config, dtype=torch.float32)
    y_ours = forward(ours, kwargs)
    run_on_kitchen(ours)
    y_kitchen = forward(ours, kwargs)
    error = (y_kitchen - reference).norm()
    assert 0 < error / reference.norm() < 0.5
    assert (y_ours - y_kitchen).norm() <= 0.25 * error, (
        f"ours vs comfy-kitchen {(y_ours - y_kitchen).norm():.4g}, error {error:.4g}"
    )


def _float64_method(x, codes, weight_scale, bias, group_size):
    """The W4A4 layer of docs/format.md in float64 on the same weight codes: (output, activation codes)."""
    k = x.shape[-1]
    v = (x.double().reshape(-1, k // group_size, group_size) @ hadamard64(group_size)).reshape(-1, k)
    scale = v.abs().amax(-1, keepdim=True) / 7
    q = torch.round(v / scale).clamp(-7, 7)
    return (q @ codes.double().t()) * scale * weight_scale.double() + bias.double(), q


@pytest.mark.parametrize("n, k, group", [(256, 256, 256), (3072, 3072, 256), (128, 64, 64)])
def test_in_bf16_comfy_kitchens_layer_is_the_method_with_four_steps_rounded_to_bf16(n, k, group, seed):
    """With bf16 input comfy-kitchen's eager convrot_w4a4_linear rounds four steps to bf16 (the rotated
    activation, the scale, the quotient before rounding, each product and sum of the epilogue); our kernels
    keep them in fp32. Both are reproduced bit for bit by the method written out step by step, with and
    without those roundings: they are the whole difference. The bf16 quotient, scale and rotation move
    about 0.5% of the activation codes off the float64 method's (measured: 0.53-0.95%), ours none, so
    comfy-kitchen's output is 0.18-0.23 of the layer's quantization error from the float64 method's, ours
    0.008-0.011 (its output's rounding to bf16)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, generator=generator) * 0.01).to(torch.bfloat16)
    x = torch.randn(128, k, generator=generator).to(torch.bfloat16)
    with ck.registry.use_backend("eager"):
        packed, params = TensorCoreConvRotW4A4Layout.quantize(weight, convrot_groupsize=group)
        weight_scale = params.scale
        kitchen = ck.convrot_w4a4_linear(x, packed, weight_scale, bias, convrot_groupsize=group)
    codes = unpack_int4(packed.view(torch.uint8))
    qa, sa = rht_quantize(x, group, 4)
    ours = gemm(qa, sa, packed.view(torch.uint8), weight_scale.float(), bias.float(), bits=4, out_dtype=torch.bfloat16)
    kitchen_steps, kitchen_codes = convrot_w4a4_in_steps(x, codes, weight_scale, bias, group, torch.bfloat16)
    our_steps, our_codes = convrot_w4a4_in_steps(x, codes, weight_scale, bias, group, None)
    assert torch.equal(kitchen_steps, kitchen) and torch.equal(our_steps, ours)
    assert torch.equal(unpack_int4(qa).float(), our_codes)

    exact, exact_codes = _float64_method(x, codes, weight_scale, bias, group)
    error = (exact - (x.double() @ weight.double().t() + bias.double())).norm()  # the layer's quantization error
    assert (our_codes != exact_codes).sum() <= 1e-4 * exact_codes.numel()  # fp32 rounding ties only
    assert 1e-3 < (kitchen_codes != exact_codes).float().mean() < 0.02
    assert (ours.double() - exact).norm() <= 1.5 * (exact.to(torch.bfloat16).double() - exact).norm()
    assert (ours.double() - exact).norm() < 0.05 * error < (kitchen.double() - exact).norm()


@pytest.mark.parametrize("name", MODELS)
def test_in_bf16_our_model_is_the_float64_method_and_comfy_kitchens_its_bf16_rounding(name, seed, tmp_path):
    """The issue's criterion with bf16 activations, stated as measured, over six inputs: against the float64
    simulation of the method on the file's codes our model is at most a quarter of the quantization error
    away, comfy-kitchen's eager model farther; its outputs are exactly the method with its four bf16
    roundings (the layer test above), ours exactly the method without them. Those roundings compound
    through the blocks to about half the quantization error between the two models (0.48-0.65 measured).
    Ours equals the float64 simulation bit for bit on most inputs; where one output lands within fp32
    rounding of a bf16 tie, that one ulp moves later activation codes and the input's gap reaches
    0.1-0.36 (SD3: 6 inputs in 40), hence the six."""
    model = MODELS[name](seed=seed % 1000)
    write_comfy_file(model, tmp_path / "model.safetensors", int8_layers=())  # every layer convrot_w4a4
    loaded = load_comfy(tmp_path / "model.safetensors", model.config)
    take_buffers(model, loaded)
    variants = {}
    for what, wrap in (
        ("kitchen", KitchenLinear),
        ("kitchen steps", lambda layer: StepsLinear(layer, torch.bfloat16)),
        ("our steps", lambda layer: StepsLinear(layer, None)),
        ("float64", lambda layer: convrot.set_simulation(layer, torch.float64)),
    ):
        variants[what] = load_comfy(tmp_path / "model.safetensors", model.config)
        replace_convlinears(variants[what], wrap)
    squares = {"error": 0.0, "ours": 0.0, "kitchen": 0.0}
    for i in range(6):
        kwargs = inputs(model, seed + i)
        reference, exact, ours = forward(model, kwargs), forward(variants["float64"], kwargs), forward(loaded, kwargs)
        kitchen = forward(variants["kitchen"], kwargs)
        if i == 0:
            assert torch.equal(forward(variants["kitchen steps"], kwargs), kitchen)
            assert torch.equal(forward(variants["our steps"], kwargs), ours)
        squares["error"] += (exact - reference).square().sum().item()
        squares["ours"] += (ours - exact).square().sum().item()
        squares["kitchen"] += (kitchen - exact).square().sum().item()
        assert (exact - reference).norm() < 0.5 * reference.norm()
    error, ours, kitchen = (squares[k] ** 0.5 for k in ("error", "ours", "kitchen"))
    assert 0 < error and ours <= 0.25 * error, f"ours {ours / error:.3f} of the quantization error"
    assert ours < kitchen, f"ours {ours / error:.3f}, comfy-kitchen {kitchen / error:.3f} of the error"


@pytest.mark.parametrize(
    "name, preset",
    [
        ("flux", "w4a4"),
        ("flux", "mix"),
        ("sd3", "mix"),
        ("sd3", "w4a4"),
        ("flux2", "w4a4"),
        ("qwen-image", "w4a4"),
        ("wan", "w4a4"),
    ],
)
def test_our_files_dequantize_in_comfy_kitchen_to_our_weights(name, preset, seed, tmp_path):
    model = MODELS[name](seed=seed % 1000)
    convrot_diffusers.quantize_transformer(model, preset, progress=False)
    save_comfy(model, tmp_path / "ours.safetensors", progress=False)
    tensors = load_file(tmp_path / "ours.safetensors")
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as handle:
        header_layers = json.loads(handle.metadata()["_quantization_metadata"])["layers"]
    file_rows = {k: v.shape[0] for k, v in tensors.items() if not k.endswith(("weight_scale", "comfy_quant"))}
    checked = 0
    for layer_name, (source, rows) in rows_of_layers(model, file_rows).items():
        layer = model.get_submodule(layer_name)
        if not isinstance(layer, convrot.ConvLinear):
            assert f"{source}.comfy_quant" not in tensors
            continue
        conf = json.loads(bytes(tensors[f"{source}.comfy_quant"].tolist()))
        assert (
            header_layers[source]
            == conf
            == (
                {"format": "convrot_w4a4", "convrot_groupsize": layer.group_size}
                if layer.bits == 4
                else {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": layer.group_size}
            )
        )
        full = tensors[f"{source}.weight"]
        shape = (full.shape[0], layer.in_features)
        kitchen = comfy_dequantize(tensors, source, conf, shape)[rows]
        # comfy-kitchen dequantizes in fp32 (products, then a dense rotation): our fp32 dequantization is
        # the same computation; both are within rounding of the exact weight.
        ours = dequantize_weight(
            layer.qweight, layer.weight_scale, layer.bits, layer.group_size, compute_dtype=torch.float32
        )
        assert torch.equal(kitchen, ours), layer_name
        exact = dequantize_weight(layer.qweight, layer.weight_scale, layer.bits, layer.group_size)
        top = 7 if layer.bits == 4 else 127  # the largest code: the scale of the fp32 rounding errors
        torch.testing.assert_close(kitchen, exact, rtol=0, atol=top * layer.weight_scale.max().item() * 2**-16)
        checked += 1
    assert checked == sum(isinstance(m, convrot.ConvLinear) for m in model.modules())

    # And back: our load of our file is the model we wrote, bit for bit.
    loaded = load_comfy(tmp_path / "ours.safetensors", model.config)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    kwargs = inputs(model, seed)
    assert torch.equal(forward(loaded, kwargs), forward(take_buffers(model, loaded), kwargs))


def test_layers_of_two_kinds_cannot_be_written_as_one_linear1(tmp_path):
    model = tiny_flux()
    policy = {"single_transformer_blocks.*.attn.to_v": "w8a8", **convrot_diffusers.policy_for(model, "w4a4")}
    convrot_diffusers.quantize_transformer(model, policy=policy, progress=False)
    with pytest.raises(ComfyQuantError, match=r"single_blocks\.0\.linear1\.weight .*attn\.to_v \(ConvLinear8bit"):
        save_comfy(model, tmp_path / "mixed.safetensors", progress=False)
    assert not (tmp_path / "mixed.safetensors").exists()


@pytest.mark.parametrize(
    "prefix, as_header", [("model.diffusion_model.", False), ("", True), ("model.diffusion_model.", True)]
)
def test_prefixed_files_and_header_metadata_load_alike(prefix, as_header, tmp_path):
    model = tiny_sd3()
    write_comfy_file(model, tmp_path / "plain.safetensors")
    write_comfy_file(model, tmp_path / "other.safetensors", prefix=prefix, as_header=as_header)
    assert is_comfy_file(tmp_path / "other.safetensors")
    plain = load_comfy(tmp_path / "plain.safetensors", model.config).state_dict()
    other = load_comfy(tmp_path / "other.safetensors", model.config).state_dict()
    assert plain.keys() == other.keys()
    assert all(torch.equal(plain[key], other[key]) for key in plain)


def test_config_is_inferred_from_a_flux_file_with_128_wide_heads(tmp_path):
    model = tiny_flux(width=256, head_dim=128)
    write_comfy_file(model, tmp_path / "model.safetensors")
    loaded = load_comfy(tmp_path / "model.safetensors")
    for key in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "in_channels"):
        assert loaded.config[key] == model.config[key], key
    assert tuple(loaded.config["axes_dims_rope"]) == (16, 56, 56)


# Released widths but one of each block and few heads: the file's shapes say the rest (128-wide heads).
RELEASED_LIKE = {
    "Flux2Transformer2DModel": dict(
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        joint_attention_dim=96,
        timestep_guidance_channels=64,
        guidance_embeds=False,
    ),
    "QwenImageTransformer2DModel": dict(
        in_channels=64, out_channels=16, num_layers=1, num_attention_heads=2, joint_attention_dim=96
    ),
    "WanTransformer3DModel": dict(
        in_channels=48,
        out_channels=48,
        num_attention_heads=2,
        text_dim=96,
        freq_dim=64,
        ffn_dim=512,
        num_layers=1,
        image_dim=80,
        added_kv_proj_dim=256,
    ),
}


@pytest.mark.parametrize("class_name", RELEASED_LIKE)
def test_config_is_inferred_from_flux2_qwen_image_and_wan_files(class_name, tmp_path):
    import diffusers

    torch.manual_seed(0)
    model = torch.nn.Module.to(getattr(diffusers, class_name)(**RELEASED_LIKE[class_name]), torch.bfloat16)
    write_comfy_file(model, tmp_path / "model.safetensors")
    loaded = load_comfy(tmp_path / "model.safetensors")
    assert type(loaded) is type(model)
    normal = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    differing = {
        key: (normal(loaded.config[key]), normal(value))
        for key, value in model.config.items()
        if not key.startswith("_") and normal(loaded.config[key]) != normal(value)
    }
    # out_channels None means "as in_channels", which the file says explicitly.
    assert differing in ({}, {"out_channels": (model.config.in_channels, None)}), differing
    kwargs = inputs(model, 0)
    # A wrong width, head split or rotary axes would make this an unrelated output.
    y, reference = forward(loaded, kwargs), forward(take_buffers(model, loaded), kwargs)
    assert (y - reference).norm() < 0.5 * reference.norm()


def test_describe_reads_the_header(tmp_path):
    model = tiny_flux()
    write_comfy_file(model, tmp_path / "model.safetensors")
    summary = describe_comfy(tmp_path / "model.safetensors")
    assert summary.transformer_class == "FluxTransformer2DModel"
    assert summary.formats == {"convrot_w4a4": 12, "int8_tensorwise": 1}
    assert summary.group_sizes == {256: 13}
    bf16 = sum(t.numel() for t in model.state_dict().values()) * 2
    assert summary.bf16_bytes == bf16 and summary.ratio > 2


def _rewrite(path, edit):
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _set_conf(tensors, layer, conf):
    tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: _set_conf(t, "single_blocks.0.linear2", {"format": "svdquant_w4a4"}),
            r"layer 'single_blocks\.0\.linear2': comfy_quant field 'format' is 'svdquant_w4a4'",
        ),
        (
            lambda t: _set_conf(t, "single_blocks.0.linear2", {"format": "int8_tensorwise"}),
            r"'single_blocks\.0\.linear2'.*without \"convrot\": true",
        ),
        (
            lambda t: _set_conf(t, "double_blocks.0.img_mlp.2", {"format": "convrot_w4a4", "convrot_groupsize": 128}),
            r"layer 'double_blocks\.0\.img_mlp\.2': comfy_quant field 'convrot_groupsize' is 128, not a power of 4",
        ),
        (
            lambda t: _set_conf(t, "double_blocks.0.img_mlp.2", {"format": "convrot_w4a4", "convrot_groupsize": 4096}),
            r"'convrot_groupsize' is 4096; the kernels rotate groups of 4 to 1024",
        ),
        (
            lambda t: t.update(
                {"double_blocks.0.img_mlp.2.comfy_quant": torch.tensor(list(b"{oops"), dtype=torch.uint8)}
            ),
            r"tensor 'double_blocks\.0\.img_mlp\.2\.comfy_quant': not valid JSON",
        ),
        (
            lambda t: t.pop("double_blocks.0.img_attn.qkv.weight_scale"),
            r"layer 'double_blocks\.0\.img_attn\.qkv' \(convrot_w4a4\) has no tensor "
            r"'double_blocks\.0\.img_attn\.qkv\.weight_scale'",
        ),
        (
            lambda t: t.update({"double_blocks.0.img_attn.qkv.weight_scale": torch.ones(7)}),
            r"tensor 'double_blocks\.0\.img_attn\.qkv\.weight_scale' has shape \[7\]",
        ),
        (
            lambda t: t.update(
                {
                    k: t[k][:512].contiguous()
                    for k in ("double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.0.weight_scale")
                }
            ),
            r"tensor\(s\) double_blocks\.0\.img_mlp\.0\.weight give 'transformer_blocks\.0\.ff\.net\.0\.proj\.weight' "
            r"the shape \[512, 256\]; the FluxTransformer2DModel of this config needs \[1024, 256\]",
        ),
        (
            lambda t: t.update(
                {"double_blocks.0.img_mlp.0.weight": t["double_blocks.0.img_mlp.0.weight"].view(torch.uint8).float()}
            ),
            r"tensor 'double_blocks\.0\.img_mlp\.0\.weight' is F32 \[1024, 128\]; convrot_w4a4 stores 2-D int8 codes",
        ),
        (
            lambda t: t.update({"double_blocks.0.img_attn.extra": torch.ones(3, dtype=torch.bfloat16)}),
            r"tensor\(s\) \['double_blocks\.0\.img_attn\.extra'\] of the file have no place in FluxTransformer2DModel",
        ),
        (
            lambda t: t.pop("single_blocks.0.norm.key_norm.scale"),
            r"cannot read the file's tensor names: KeyError: 'single_blocks\.0\.norm\.key_norm\.scale'",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_tensor_or_field(edit, message, tmp_path):
    model = tiny_flux()
    path = tmp_path / "model.safetensors"
    write_comfy_file(model, path)
    _rewrite(path, edit)
    with pytest.raises(ComfyQuantError, match=message):
        load_comfy(path, model.config)


def test_a_config_that_does_not_fit_the_file_is_refused(tmp_path):
    model = tiny_flux()
    write_comfy_file(model, tmp_path / "model.safetensors")
    wider = dict(model.config, num_attention_heads=8)
    with pytest.raises(
        ComfyQuantError,
        match=r"give .* the shape \[256, 256\]; the FluxTransformer2DModel of this config needs \[512, 256\]",
    ):
        load_comfy(tmp_path / "model.safetensors", wider)
    with pytest.raises(ComfyQuantError, match=r"the file is a FluxTransformer2DModel checkpoint, the config a SD3"):
        load_comfy(tmp_path / "model.safetensors", dict(tiny_sd3().config, _class_name="SD3Transformer2DModel"))


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_refused(keep, tmp_path):
    model = tiny_flux()
    path = tmp_path / "model.safetensors"
    write_comfy_file(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert not is_comfy_file(path)
    with pytest.raises(ComfyQuantError, match=r"unreadable safetensors file, truncated or corrupted"):
        load_comfy(path, model.config)


def test_an_unknown_architecture_is_refused(tmp_path):
    save_file({"blocks.0.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    with pytest.raises(ComfyQuantError, match="match no supported architecture"):
        load_comfy(tmp_path / "x.safetensors")


def test_scaled_fp8_layers_are_dequantized_to_the_model_dtype(tmp_path):
    model = tiny_sd3()
    path = tmp_path / "model.safetensors"
    tensors = write_comfy_file(model, path)
    layer = "joint_blocks.0.x_block.mlp.fc2"
    weight = original_state_dict(model)[f"{layer}.weight"].float()
    scale = weight.abs().max() / 448

    def to_fp8(t):
        for key in (f"{layer}.weight", f"{layer}.weight_scale"):
            t.pop(key)
        t[f"{layer}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        t[f"{layer}.weight_scale"] = scale.reshape(())
        _set_conf(t, layer, {"format": "float8_e4m3fn"})

    _rewrite(path, to_fp8)
    loaded = load_comfy(path, model.config)
    fc2 = loaded.transformer_blocks[0].ff.net[2]
    assert type(fc2) is torch.nn.Linear and fc2.weight.dtype == torch.bfloat16
    expected = ((weight / scale).to(torch.float8_e4m3fn).float() * scale).to(torch.bfloat16)
    assert torch.equal(fc2.weight, expected)
    assert "convrot_w4a4" in json.dumps(describe_comfy(path).formats) and tensors


def test_kitchen_reference_is_importable_without_its_cuda_backend():
    assert ck.list_backends()["eager"]["available"]
    assert all(not is_block_linear(k, v) for k, v in {"x.weight": torch.zeros(2)}.items())


@pytest.mark.parametrize(
    "conf",
    [
        {"format": "convrot_w4a4"},  # ComfyUI's defaults: group 256, int4
        {"format": "convrot_w4a4", "convrot_groupsize": 256, "linear_dtype": "int8"},  # same codes, int8 GEMM
        {"format": "convrot_w4a4", "params": {"convrot_groupsize": 256}},  # fields under "params", as ops.py reads
    ],
)
def test_layer_json_variants_comfyui_reads_load_alike(conf, tmp_path):
    model = tiny_flux()
    write_comfy_file(model, tmp_path / "plain.safetensors")
    write_comfy_file(model, tmp_path / "variant.safetensors")
    _rewrite(tmp_path / "variant.safetensors", lambda t: _set_conf(t, "single_blocks.0.linear1", conf))
    plain = load_comfy(tmp_path / "plain.safetensors", model.config).state_dict()
    variant = load_comfy(tmp_path / "variant.safetensors", model.config).state_dict()
    assert all(torch.equal(plain[key], variant[key]) for key in plain)
