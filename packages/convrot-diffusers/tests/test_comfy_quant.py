import json

import pytest
import torch
from comfy_files import (
    ck,
    comfy_dequantize,
    is_block_linear,
    original_state_dict,
    run_on_kitchen,
    tiny_flux,
    tiny_sd3,
    write_comfy_file,
)
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convrot
import convrot_diffusers
from convrot.quantizer.dequantize import dequantize_weight
from convrot_diffusers.comfy_keys import diffusers_rows, format_for_class
from convrot_diffusers.comfy_quant import ComfyQuantError, describe_comfy, is_comfy_file, load_comfy, save_comfy
from convrot_kernels import gemm, rht_quantize

MODELS = {"flux": tiny_flux, "sd3": tiny_sd3}


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
    return dict(
        hidden_states=randn(1, config.in_channels, 8, 8),
        encoder_hidden_states=randn(1, text, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=torch.full((1,), 500.0),
    )


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
            float_tensors[f"{source}.bias"][rows].float(),
            bits=layer.bits,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(layer(x), expected), layer_name


def _fp32(kwargs):
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


@pytest.mark.parametrize(
    "name, build",
    [
        ("flux", tiny_flux),
        ("sd3", tiny_sd3),
        # Real width: Flux.1's 3072 (24 heads of 128), one block of each kind (about a minute, 3.5 GB).
        ("flux-3072", lambda seed: tiny_flux(width=3072, head_dim=128, seed=seed)),
    ],
)
def test_model_output_matches_comfy_kitchens_eager_path(name, build, seed, tmp_path):
    """The file's codes run by our kernels and by comfy-kitchen's eager ConvRot linears, activations in fp32:
    the outputs differ by at most a quarter of the quantized model's error against the bf16 model (its
    weights, evaluated in fp32). Measured: 1e-5 of it on the tiny models, 0.002 at width 3072."""
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


@pytest.mark.parametrize("name", MODELS)
def test_in_bf16_our_error_is_no_larger_than_comfy_kitchens(name, seed, tmp_path):
    """In bf16 comfy-kitchen's eager path rounds the rotation, the scale, the quotient and the GEMM's epilogue
    to bf16, ours keeps them in fp32; on these random models bf16 alone moves the output 0.4-2.5x as far as
    quantization does, so the two paths differ by about half the quantization error (0.5x measured) while
    their errors against the bf16 model are within 1% of each other."""
    model = MODELS[name](seed=seed % 1000)
    write_comfy_file(model, tmp_path / "model.safetensors")
    kwargs = inputs(model, seed)
    reference = forward(model, kwargs)
    ours = load_comfy(tmp_path / "model.safetensors", model.config)
    y_ours = forward(ours, kwargs)
    run_on_kitchen(ours)
    y_kitchen = forward(ours, kwargs)
    assert 0 < (y_ours - reference).norm() <= 1.05 * (y_kitchen - reference).norm()


@pytest.mark.parametrize("name, preset", [("flux", "w4a4"), ("sd3", "mix"), ("sd3", "w4a4")])
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
    assert torch.equal(forward(loaded, kwargs), forward(model, kwargs))


def test_flux_mix_preset_cannot_be_written_as_one_linear1(tmp_path):
    model = tiny_flux()
    convrot_diffusers.quantize_transformer(model, "mix", progress=False)
    with pytest.raises(ComfyQuantError, match=r"single_blocks\.0\.linear1\.weight .*attn\.to_v \(ConvLinear8bit"):
        save_comfy(model, tmp_path / "mix.safetensors", progress=False)
    assert not (tmp_path / "mix.safetensors").exists()


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
