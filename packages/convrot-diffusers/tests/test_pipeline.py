import pytest
import torch
from conftest import build, generate, is_finite_image
from torch import nn

import convrot
import convrot_diffusers
from convrot_diffusers.demo import DEMOS, pixart_transformer
from convrot_diffusers.metrics import frame_scores, psnr
from convrot_diffusers.presets import layer_kind, policy_for

# PSNR of the quantized pipeline's image against the bf16 pipeline's, same seed.
# Measured on these random-weight demos at 64x64, 4 steps (seeds 0-9): Flux mix 46.1-46.8 dB (the paper's
# Table 8 mix, before issue 28: 45.7-46.2), w4a4 45.4-46.0; PixArt mix 44.6-45.6, w4a4 39.4-40.7; SD3 mix
# 38.4-39.3, w4a4 37.8-38.3.
# Quantizing the embedders and proj_out as well drops them to 24-31 dB, another transformer 15-19 dB.
PSNR_FLOOR_DB = {
    ("flux", "mix"): 40.0,
    ("flux", "w4a4"): 40.0,
    ("pixart-sigma", "mix"): 40.0,
    ("pixart-sigma", "w4a4"): 33.0,
    ("pixart-alpha", "mix"): 40.0,
    ("pixart-alpha", "w4a4"): 33.0,
    ("sd3", "mix"): 35.0,
    ("sd3", "w4a4"): 34.0,
}
CLASSES = {"w4a4": convrot.ConvLinear4bit, "w8a8": convrot.ConvLinear8bit, "skip": nn.Linear}


@pytest.mark.parametrize("name, preset", sorted(PSNR_FLOOR_DB))
def test_quantized_pipeline_runs_end_to_end_close_to_bf16(name, preset, seed):
    pipe = build(name)
    reference = generate(pipe, name, seed)
    policy = policy_for(pipe.transformer, preset)
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)]

    assert convrot_diffusers.quantize_pipeline(pipe, preset=preset, progress=False) is pipe
    for layer_name in names:
        assert type(pipe.transformer.get_submodule(layer_name)) is CLASSES[layer_kind(policy, layer_name)]
    quantized = generate(pipe, name, seed)
    assert is_finite_image(quantized)
    assert psnr(reference, quantized) > PSNR_FLOOR_DB[(name, preset)], f"seed {seed}"


def test_group_size_follows_the_core_rule():
    transformer = pixart_transformer()  # 192 wide: 192 = 3 * 64, so group 64 as PixArt's 1152
    convrot_diffusers.quantize_transformer(transformer, "w4a4", group_size=256, progress=False)
    assert transformer.transformer_blocks[0].attn1.to_q.group_size == 64
    assert transformer.transformer_blocks[0].ff.net[2].group_size == 256  # in_features 768 = 3 * 256
    assert transformer.config.quantization_config.preset == "w4a4"


def test_quantizing_twice_is_refused():
    pipe = build("sd3")
    convrot_diffusers.quantize_pipeline(pipe, "w4a4", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        convrot_diffusers.quantize_pipeline(pipe, "w4a4", progress=False)


def test_bad_arguments_leave_the_pipeline_unchanged():
    pipe = build("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match="unknown preset"):
        convrot_diffusers.quantize_pipeline(pipe, preset="int3")
    with pytest.raises(ValueError):
        convrot_diffusers.quantize_pipeline(pipe, group_size=3)
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError, match="quantize_transformer"):
        convrot_diffusers.quantize_pipeline(pipe.transformer)


def test_records_the_base_model():
    pipe = build("pixart-alpha")
    convrot_diffusers.quantize_pipeline(pipe, progress=False)
    assert pipe.transformer.config.quantization_config.base_model == "demo:pixart-alpha"
    assert set(DEMOS) >= {"flux", "pixart-sigma", "pixart-alpha", "sd3"}


def test_both_experts_of_a_two_expert_pipeline_are_quantized(tmp_path, seed):
    """Wan 2.2 A14B's pipelines denoise with transformer (high noise) then transformer_2 (low noise)."""
    import numpy as np
    from diffusers import WanPipeline

    from convrot_diffusers.demo import wan_transformer
    from convrot_diffusers.sources import load_pipeline, load_saved_pipeline

    torch.manual_seed(seed)  # a second expert unlike the first
    second = wan_transformer()
    for parameter in second.parameters():
        parameter.data.normal_(0, 0.05)
    pipe = build("wan")
    pipe = WanPipeline(**{**pipe.components, "transformer_2": second.to(torch.bfloat16)}, boundary_ratio=0.5)
    directory = tmp_path / "wan22"
    pipe.save_pretrained(directory)
    call = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 4, "output_type": "np"}

    def frames(p):
        p.set_progress_bar_config(disable=True)
        return p("a fox", generator=torch.Generator().manual_seed(seed), **call).frames[0]

    on_load = load_pipeline(str(directory), "mix", progress=False).pipe  # quantized as it loads
    in_memory = load_pipeline(str(directory), None).pipe
    assert convrot_diffusers.quantize_pipeline(in_memory, "mix", progress=False) is in_memory
    for model in (on_load.transformer, on_load.transformer_2, in_memory.transformer, in_memory.transformer_2):
        assert model.config.quantization_config.preset == "mix"
        assert type(model.blocks[0].attn1.to_q) is convrot.ConvLinear4bit
    found = frames(on_load)
    assert found.shape == (5, 32, 32, 3) and np.isfinite(found).all()
    # The same quantized layers either way; the bf16 load keeps Wan's float32 modules (time embedder, modulation
    # table) in float32, the on-load quantization casts them to bf16: about 49 dB apart (one seed measured).
    scores = frame_scores(list(found), list(frames(in_memory)))
    assert scores["psnr_db_min"] > 40, scores
    with pytest.raises(ValueError, match="already quantized"):
        convrot_diffusers.quantize_pipeline(in_memory, "mix", progress=False)

    # A save holds one transformer: on this base, its transformer_2 runs in bf16, which a warning says.
    save = tmp_path / "save"
    convrot_diffusers.save_quantized(on_load.transformer, save)
    with pytest.warns(UserWarning, match="transformer_2.*runs in bf16"):
        on_save = load_saved_pipeline(str(save), str(directory)).pipe
    assert type(on_save.transformer.blocks[0].attn1.to_q) is convrot.ConvLinear4bit  # the save's, not the base's
    assert type(on_save.transformer_2.blocks[0].attn1.to_q) is nn.Linear


def test_a_policy_quantizes_the_first_expert_and_the_default_preset_the_second():
    """A policy names one transformer's layers: quantize_pipeline applies it to transformer, "mix" to transformer_2."""
    from diffusers import WanPipeline

    from convrot_diffusers.demo import wan_transformer

    def two_experts():
        pipe = build("wan")
        second = wan_transformer().to(torch.bfloat16)
        return WanPipeline(**{**pipe.components, "transformer_2": second}, boundary_ratio=0.5)

    pipe = two_experts()
    convrot_diffusers.quantize_pipeline(pipe, policy={"*": "w8a8"}, progress=False)
    first, second = pipe.transformer, pipe.transformer_2
    assert first.config.quantization_config.policy == {"*": "w8a8"}
    assert type(first.blocks[0].attn1.to_q) is convrot.ConvLinear8bit
    assert second.config.quantization_config.preset == "mix"
    assert type(second.blocks[0].attn1.to_q) is convrot.ConvLinear4bit

    pipe = two_experts()
    with pytest.raises(ValueError, match="not both"):
        convrot_diffusers.quantize_pipeline(pipe, "w4a4", policy={"*": "w8a8"}, progress=False)
    with pytest.raises(ValueError, match="no_such_layer"):  # checked before either expert is converted
        convrot_diffusers.quantize_pipeline(pipe, policy={"no_such_layer": "w8a8", "*": "w4a4"}, progress=False)
    for model in (pipe.transformer, pipe.transformer_2):
        assert getattr(model.config, "quantization_config", None) is None
        assert type(model.blocks[0].attn1.to_q) is nn.Linear
