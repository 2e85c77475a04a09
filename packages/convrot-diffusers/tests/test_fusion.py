import numpy as np
import pytest
import torch
from conftest import build, generate
from diffusers.models.attention import AttentionModuleMixin

import convrot
import convrot_diffusers
from convrot_diffusers import fuse_qkv_projections, unfuse_qkv_projections
from convrot_diffusers.demo import flux_transformer, sd3_transformer
from convrot_diffusers.fusion import FusedAwayProjection
from convrot_diffusers.presets import policy_for


def unfused_attention(transformer) -> list[str]:
    return [
        name
        for name, module in transformer.named_modules()
        if hasattr(module, "to_k") and not isinstance(module.to_k, FusedAwayProjection)
    ]


def state(transformer) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in transformer.state_dict().items()}


@pytest.mark.parametrize("name", ["flux", "pixart-sigma"])
def test_fused_pipeline_is_bit_identical_and_unfuses_to_the_same_state(name, seed):
    pipe = build(name)
    convrot_diffusers.quantize_pipeline(pipe, preset="w4a4", progress=False)
    transformer = pipe.transformer
    before = state(transformer)
    bytes_before = sum(t.numel() * t.element_size() for t in before.values())
    reference = np.asarray(generate(pipe, name, seed))

    attention = unfused_attention(transformer)
    fused = fuse_qkv_projections(pipe)
    assert fused == len(attention) > 0
    assert unfused_attention(transformer) == []
    fused_state = transformer.state_dict()
    assert sum(t.numel() * t.element_size() for t in fused_state.values()) == bytes_before
    assert np.array_equal(np.asarray(generate(pipe, name, seed)), reference), f"seed {seed}"
    assert fuse_qkv_projections(pipe) == 0  # already fused

    assert unfuse_qkv_projections(pipe) == fused
    after = transformer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert np.array_equal(np.asarray(generate(pipe, name, seed)), reference), f"seed {seed}"


def test_flux_fuses_through_the_flag_and_diffusers_unfuse_keeps_the_weights():
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    before = state(transformer)
    fuse_qkv_projections(transformer)
    attn = transformer.transformer_blocks[0].attn
    assert isinstance(attn, AttentionModuleMixin) and attn.fused_projections
    assert attn.to_qkv.out_features == 3 * attn.inner_dim and isinstance(attn.to_added_qkv, convrot.ConvLinear4bit)

    transformer.unfuse_qkv_projections()  # diffusers' own: must not drop the fused weights
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")
    after = transformer.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_mixed_bit_widths_stay_unfused():
    transformer = flux_transformer()
    policy = {"single_transformer_blocks.*.attn.to_v": "w8a8", **policy_for(transformer, "w4a4")}
    convrot_diffusers.quantize_transformer(transformer, policy=policy, progress=False)
    fused = fuse_qkv_projections(transformer)
    single = transformer.single_transformer_blocks[0].attn  # to_v W8A8, to_q/to_k W4A4
    assert not single.fused_projections and isinstance(single.to_v, convrot.ConvLinear8bit)
    assert transformer.transformer_blocks[0].attn.fused_projections
    assert fused == len(transformer.transformer_blocks)


def test_mix_fuses_every_block():
    """The mix preset gives q, k and v one kind in every block (its W8A8 layers are elsewhere)."""
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "mix", progress=False)
    assert any(isinstance(m, convrot.ConvLinear8bit) for m in transformer.modules())
    fused = fuse_qkv_projections(transformer)
    assert fused == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def test_layers_that_differ_in_simulation_stay_unfused():
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    convrot.set_simulation(transformer.transformer_blocks[0].attn.to_k, torch.float64)
    fused = fuse_qkv_projections(transformer)
    assert not transformer.transformer_blocks[0].attn.fused_projections
    assert fused == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks) - 1


def test_sd35_stays_unfused():
    """diffusers' fused joint processor skips SD3.5's q/k RMSNorms, and its image-only attention has none."""
    transformer = sd3_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    assert transformer.transformer_blocks[0].attn.norm_q is not None
    assert fuse_qkv_projections(transformer) == 0


def test_bf16_layers_are_left_to_diffusers():
    transformer = flux_transformer()
    assert fuse_qkv_projections(transformer) == 0
    assert not transformer.transformer_blocks[0].attn.fused_projections


def test_saving_a_fused_transformer_writes_separate_layers_and_keeps_it_fused(tmp_path, seed):
    pipe = build("flux")
    convrot_diffusers.quantize_pipeline(pipe, preset="w4a4", progress=False)
    fuse_qkv_projections(pipe)
    reference = np.asarray(generate(pipe, "flux", seed))
    convrot_diffusers.save_quantized(pipe, tmp_path)
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections

    loaded = convrot_diffusers.load_quantized(tmp_path)
    assert isinstance(loaded.transformer_blocks[0].attn.to_q, convrot.ConvLinear4bit)
    fuse_qkv_projections(loaded)
    assert np.array_equal(np.asarray(generate(build("flux", transformer=loaded), "flux", seed)), reference)
