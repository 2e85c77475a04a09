import numpy as np
import pytest
import torch
from conftest import build
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.quantizers import auto

import convrot_diffusers
from convrot_diffusers.demo import flux_transformer, pixart_transformer, sd3_transformer
from convrot_diffusers.diffusers_integration import QUANT_METHOD, ConvRotConfig, register

TRANSFORMERS = [
    (flux_transformer, FluxTransformer2DModel),
    (pixart_transformer, PixArtTransformer2DModel),
    (sd3_transformer, SD3Transformer2DModel),
]


def inputs(transformer, generator):
    """Random inputs for one forward of each transformer, in its own argument names."""
    config = transformer.config
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(torch.bfloat16)  # noqa: E731
    timestep = torch.rand(1, generator=generator) * 1000
    if isinstance(transformer, FluxTransformer2DModel):
        return dict(
            hidden_states=randn(1, 64, config.in_channels),
            encoder_hidden_states=randn(1, 8, config.joint_attention_dim),
            pooled_projections=randn(1, config.pooled_projection_dim),
            timestep=timestep / 1000,
            img_ids=torch.zeros(64, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.full((1,), 3.5),
        )
    if isinstance(transformer, PixArtTransformer2DModel):
        return dict(
            hidden_states=randn(1, config.in_channels, 16, 16),
            encoder_hidden_states=randn(1, 8, config.caption_channels),
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    return dict(
        hidden_states=randn(1, config.in_channels, 16, 16),
        encoder_hidden_states=randn(1, 8, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=timestep,
    )


@torch.no_grad()
def forward(transformer, kwargs):
    return transformer(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("build_transformer, cls", TRANSFORMERS)
def test_quantize_on_load_matches_quantizing_in_memory(build_transformer, cls, seed, tmp_path):
    transformer = build_transformer().to(torch.bfloat16)
    transformer.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, quantization_config=ConvRotConfig(preset="mix"), torch_dtype=torch.bfloat16)
    convrot_diffusers.quantize_transformer(transformer, "mix", progress=False)

    expected, found = transformer.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys()
    for key in expected:
        assert expected[key].dtype == found[key].dtype, key
        assert torch.equal(expected[key], found[key]), key
    kwargs = inputs(transformer, torch.Generator().manual_seed(seed))
    assert torch.equal(forward(transformer, kwargs), forward(loaded, kwargs))


@pytest.mark.parametrize("build_transformer, cls", TRANSFORMERS)
def test_from_pretrained_loads_a_quantized_save(build_transformer, cls, seed, tmp_path):
    transformer = build_transformer().to(torch.bfloat16)
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    convrot_diffusers.save_quantized(transformer, tmp_path)

    native = cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    ours = convrot_diffusers.load_quantized(tmp_path)
    assert native.transformer_blocks[0].ff.net[2].weight_scale.dtype == torch.float32
    for key, tensor in ours.state_dict().items():
        assert torch.equal(native.state_dict()[key], tensor), key
    kwargs = inputs(transformer, torch.Generator().manual_seed(seed))
    # PixArt's position table is a buffer diffusers keeps in fp32 while load_quantized casts it to bf16.
    torch.testing.assert_close(forward(native, kwargs), forward(ours, kwargs), rtol=0.05, atol=0.05)


def test_from_pretrained_refuses_a_checkpoint_without_convrot_header(tmp_path):
    transformer = sd3_transformer().to(torch.bfloat16)
    convrot_diffusers.quantize_transformer(transformer, progress=False)
    transformer.save_pretrained(tmp_path)  # plain diffusers save: no convrot header
    with pytest.raises(ValueError, match="not a ConvRot checkpoint"):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_config_round_trip_and_validation():
    config = ConvRotConfig(preset="w4a4", group_size=64, base_model="org/model")
    again = ConvRotConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.quant_method.value == QUANT_METHOD
    with pytest.raises(ValueError, match="unknown preset"):
        ConvRotConfig(preset="w3a3")
    with pytest.raises(ValueError):
        ConvRotConfig(group_size=100)


def test_registration_is_idempotent():
    quantizer = auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    register()
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is quantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is ConvRotConfig


def test_pipeline_assembled_from_a_native_load(tmp_path, seed):
    from conftest import generate

    pipe = build("flux")
    convrot_diffusers.quantize_pipeline(pipe, progress=False)
    convrot_diffusers.save_quantized(pipe, tmp_path)
    expected = generate(pipe, "flux", seed)
    native = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    found = generate(build("flux", transformer=native), "flux", seed)
    assert np.array_equal(np.asarray(expected), np.asarray(found))
