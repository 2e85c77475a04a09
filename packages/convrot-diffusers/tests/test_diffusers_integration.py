import copy
import json

import numpy as np
import pytest
import torch
from conftest import generate
from diffusers import DiffusionPipeline, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.quantizers import DiffusersAutoQuantizer, DiffusersQuantizer, auto
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from safetensors.torch import save_file

import convrot
import convrot_diffusers
from convrot_diffusers.demo import demo_pipeline, flux_transformer, pixart_transformer, sd3_transformer
from convrot_diffusers.diffusers_integration import QUANT_METHOD, ConvRotConfig, ConvRotQuantizer, register

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


def quantized(build_transformer, dtype=torch.bfloat16, preset="w4a4"):
    transformer = build_transformer().to(dtype)
    convrot_diffusers.quantize_transformer(transformer, preset, progress=False)
    return transformer


def assert_same_tensors(expected, found):
    expected, found = dict(expected), dict(found)
    assert expected.keys() == found.keys()
    for key in expected:
        assert expected[key].dtype == found[key].dtype, key
        assert torch.equal(expected[key], found[key]), key


def tensors_and_buffers(model):
    return {**model.state_dict(), **dict(model.named_buffers())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build_transformer, cls", TRANSFORMERS)
def test_save_pretrained_and_from_pretrained_round_trip_exactly(build_transformer, cls, dtype, seed, tmp_path):
    transformer = quantized(build_transformer, dtype, preset="mix")
    transformer.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)  # no torch_dtype: as saved, buffers (PixArt's pos_embed) included
    assert_same_tensors(tensors_and_buffers(transformer), tensors_and_buffers(loaded))
    assert isinstance(loaded.hf_quantizer, ConvRotQuantizer) and loaded.config.quantization_config.preset == "mix"
    kwargs = inputs(transformer, torch.Generator().manual_seed(seed))
    kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    assert torch.equal(forward(transformer, kwargs), forward(loaded, kwargs))
    # The wrapper is the same path.
    assert_same_tensors(tensors_and_buffers(loaded), tensors_and_buffers(convrot_diffusers.load_quantized(tmp_path)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["flux", "pixart-sigma", "sd3"])
def test_pipeline_save_pretrained_round_trip_gives_identical_images(name, dtype, seed, tmp_path):
    pipe = demo_pipeline(name, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    convrot_diffusers.quantize_pipeline(pipe, progress=False)
    expected = np.asarray(generate(pipe, name, seed))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=dtype)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer.hf_quantizer, ConvRotQuantizer)
    assert np.array_equal(np.asarray(generate(loaded, name, seed)), expected), f"seed {seed}"


def test_torch_dtype_sets_the_unquantized_tensors_and_keeps_scales_fp32(tmp_path):
    quantized(pixart_transformer, torch.float32).save_pretrained(tmp_path)
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = loaded.transformer_blocks[0].ff.net[2]
    assert layer.weight_scale.dtype == layer.bias.dtype == torch.float32
    assert loaded.pos_embed.pos_embed.dtype == loaded.caption_projection.linear_1.weight.dtype == torch.bfloat16


def test_fused_projections_are_saved_as_separate_layers(tmp_path, seed):
    transformer = quantized(flux_transformer)
    separate = copy.deepcopy(transformer)
    assert convrot_diffusers.fuse_qkv_projections(transformer) > 0
    convrot_diffusers.fuse_activations(transformer)
    transformer.save_pretrained(tmp_path)
    assert transformer.transformer_blocks[0].attn.fused_projections  # the model stays fused
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert_same_tensors(separate.state_dict(), loaded.state_dict())


def test_deep_copies_save_themselves(tmp_path):
    transformer = quantized(sd3_transformer)
    clone = copy.deepcopy(transformer)
    assert clone.hf_quantizer is not transformer.hf_quantizer and clone.hf_quantizer._model() is clone
    del transformer
    clone.save_pretrained(tmp_path)
    assert_same_tensors(clone.state_dict(), SD3Transformer2DModel.from_pretrained(tmp_path).state_dict())


def test_saves_of_the_previous_writer_still_load(tmp_path, seed):
    """Before save_pretrained was the save path, save_quantized wrote convrot-core's file and the config."""
    transformer = quantized(pixart_transformer)
    convrot.save_quantized(transformer, tmp_path / "diffusion_pytorch_model.safetensors")
    transformer.save_config(tmp_path)
    for loaded in (PixArtTransformer2DModel.from_pretrained(tmp_path), convrot_diffusers.load_quantized(tmp_path)):
        assert_same_tensors(tensors_and_buffers(transformer), tensors_and_buffers(loaded))


def flip_bytes(path, offset_from_end=100, count=4):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[-offset_from_end - i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_load_path_refuses_a_corrupted_tensor_naming_the_file(tmp_path):
    quantized(sd3_transformer).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    flip_bytes(weights)
    for load in (SD3Transformer2DModel.from_pretrained, convrot_diffusers.load_quantized):
        with pytest.raises(convrot.CheckpointError, match=rf"{weights}: tensor '.*' is corrupted \(checksum"):
            load(tmp_path)


def test_a_truncated_file_is_named(tmp_path):
    quantized(sd3_transformer).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(convrot.CheckpointError, match=rf"{weights}: unreadable safetensors file, truncated"):
        convrot_diffusers.load_quantized(tmp_path)
    # diffusers reads a single file before asking the quantizer anything: its own error names the file.
    with pytest.raises(OSError, match=str(weights)):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_a_save_of_another_architecture_is_refused_naming_the_file(tmp_path):
    quantized(flux_transformer).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    with pytest.raises(convrot.CheckpointError, match=rf"{weights}: the checkpoint has quantized layer .* model lacks"):
        PixArtTransformer2DModel.from_pretrained(tmp_path)


def test_missing_or_damaged_configs_are_refused(tmp_path):
    quantized(sd3_transformer).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["preset"] = "w3a3"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: damaged ConvRot quantization_config: unknown preset"):
        SD3Transformer2DModel.from_pretrained(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        SD3Transformer2DModel.from_pretrained(tmp_path)
    with pytest.raises(convrot_diffusers.checkpoint.NotAQuantizedSaveError, match="config.json: not a JSON file"):
        convrot_diffusers.load_quantized(tmp_path)
    config_path.unlink()
    with pytest.raises(OSError, match="config.json"):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_from_pretrained_refuses_tensors_without_a_convrot_header(tmp_path):
    transformer = quantized(sd3_transformer)
    transformer.save_config(tmp_path)
    tensors = {key: tensor.contiguous() for key, tensor in transformer.state_dict().items()}
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(convrot.CheckpointError, match="not a ConvRot checkpoint"):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_save_pretrained_refuses_pickles(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        quantized(sd3_transformer).save_pretrained(tmp_path, safe_serialization=False)


def test_config_is_a_diffusers_quantization_config():
    config = ConvRotConfig(preset="w4a4", group_size=64, base_model="org/model")
    assert isinstance(config, QuantizationConfigMixin)
    again = DiffusersAutoQuantizer.from_dict(config.to_dict())
    assert type(again) is ConvRotConfig and again.to_dict() == config.to_dict()
    assert again.quant_method.value == QUANT_METHOD
    assert isinstance(DiffusersAutoQuantizer.from_config(again), ConvRotQuantizer)
    with pytest.raises(ValueError, match="unknown preset"):
        ConvRotConfig(preset="w3a3")
    with pytest.raises(ValueError):
        ConvRotConfig(group_size=100)
    with pytest.raises(ValueError, match="unknown field"):
        ConvRotConfig.from_dict({**config.to_dict(), "bits": 3})


def test_registration_is_idempotent():
    assert issubclass(ConvRotQuantizer, DiffusersQuantizer)
    register()
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is ConvRotQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is ConvRotConfig


def test_sharded_saves_load_and_are_described(tmp_path):
    transformer = quantized(sd3_transformer)
    transformer.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    loaded = convrot_diffusers.load_quantized(tmp_path)
    assert_same_tensors(tensors_and_buffers(transformer), tensors_and_buffers(loaded))
    summary = convrot_diffusers.checkpoint.describe(tmp_path)
    assert summary.file_bytes == sum(path.stat().st_size for path in shards)
    assert sum(summary.layers.values()) == sum(isinstance(m, convrot.ConvLinear) for m in transformer.modules())
    flip_bytes(shards[-1])
    with pytest.raises(convrot.CheckpointError, match=rf"{shards[-1]}: tensor '.*' is corrupted"):
        SD3Transformer2DModel.from_pretrained(tmp_path)
