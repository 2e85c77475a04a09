import warnings

import pytest
from torch import nn

import convrot
from convrot_diffusers.demo import flux_transformer, pixart_transformer, sd3_transformer
from convrot_diffusers.detect import ARCHITECTURES
from convrot_diffusers.presets import PRESET_NAMES, PRESETS, layer_kind, policy_for, preset_rules

BUILDERS = {"flux": flux_transformer, "pixart": pixart_transformer, "sd3": sd3_transformer}
EMBEDDERS = ("x_embedder", "context_embedder", "caption_projection", "time_text_embed", "adaln_single", "proj_out")


def linear_kinds(transformer, preset):
    policy = policy_for(transformer, preset)
    return {
        name: layer_kind(policy, name) for name, module in transformer.named_modules() if isinstance(module, nn.Linear)
    }


@pytest.mark.parametrize("arch", ["flux", "pixart", "sd3"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_embedders_and_final_layers_stay_bf16(arch, preset):
    kinds = linear_kinds(BUILDERS[arch](), preset)
    for name, kind in kinds.items():
        if name.startswith(EMBEDDERS) or name.startswith("norm_out"):
            assert kind == "skip", name
    assert {kinds[n] for n in kinds if "blocks." in n} <= {"w4a4", "w8a8", "skip", preset}


@pytest.mark.parametrize("arch", ["flux", "pixart", "sd3"])
@pytest.mark.parametrize("preset", ["w4a4", "w4a8", "w4a8g64", "w4a4g64"])
def test_all_4bit_weight_presets_quantize_every_block_linear(arch, preset):
    kinds = linear_kinds(BUILDERS[arch](), preset)
    assert all(kind == preset for name, kind in kinds.items() if "blocks." in name)
    w4a4_kinds = linear_kinds(BUILDERS[arch](), "w4a4")
    assert {n for n, k in kinds.items() if k == "skip"} == {n for n, k in w4a4_kinds.items() if k == "skip"}


@pytest.mark.parametrize("preset", ["w4a8", "w4a8g64"])
def test_w4a8_presets_quantize_a_transformer(preset):
    transformer = flux_transformer()
    convrot.quantize_model(transformer, policy=policy_for(transformer, preset), progress=False)
    layers = [m for m in transformer.modules() if isinstance(m, convrot.ConvLinear)]
    assert layers and all(layer.kind == preset and layer.act_bits == 8 for layer in layers)


def test_flux_mix_is_the_papers_table_8():
    transformer = flux_transformer()  # 2 double blocks, 4 single blocks
    kinds = linear_kinds(transformer, "mix")
    bf16 = {n for n, k in kinds.items() if k == "skip" and "blocks." in n}
    assert bf16 == {
        "single_transformer_blocks.3.proj_out",
        "transformer_blocks.1.ff.net.2",
        "transformer_blocks.1.ff_context.net.2",
    }
    w8a8 = {n for n, k in kinds.items() if k == "w8a8"}
    expected = {f"transformer_blocks.{i}.attn.to_out.0" for i in range(2)}
    expected |= {f"single_transformer_blocks.{i}.attn.to_v" for i in range(4)}
    assert w8a8 == expected
    assert kinds["transformer_blocks.0.ff.net.2"] == "w4a4"
    assert kinds["single_transformer_blocks.2.proj_out"] == "w4a4"


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_mix_keeps_adaln_modulation_at_w4a4(arch):
    # The AdaLN Linears are 27% (Flux) to 33% (SD3) of the weights: at W8A8 they would
    # put mix over its budget of 0.35x the bf16 bytes (docs/diffusers.md).
    kinds = linear_kinds(BUILDERS[arch](), "mix")
    adaln = [n for n in kinds if n.endswith((".norm1.linear", ".norm1_context.linear", ".norm.linear"))]
    assert len(adaln) == {"flux": 2 * 2 + 4, "sd3": 4 * 2}[arch]  # 2 double + 4 single blocks; 4 blocks
    assert all(kinds[n] == "w4a4" for n in adaln), {n: kinds[n] for n in adaln}


def test_last_resolves_from_the_config():
    rules = preset_rules(ARCHITECTURES[0], "mix", {"num_layers": 19, "num_single_layers": 38})
    patterns = [rule.pattern for rule in rules]
    assert "single_transformer_blocks.37.proj_out" in patterns
    assert "transformer_blocks.18.ff.net.2" in patterns


def test_every_rule_has_a_kind_and_a_reason():
    for presets in PRESETS.values():
        assert set(presets) == set(PRESET_NAMES)
        for rules in presets.values():
            assert rules[-1].pattern == "*" and rules[-1].kind == "skip"
            for rule in rules:
                assert rule.kind in convrot.KINDS
                assert len(rule.reason) > 20


def test_rules_that_match_nothing_are_dropped():
    from diffusers import SD3Transformer2DModel

    # SD3-medium style: no dual attention, so the attn2 rule decides nothing.
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
    )
    policy = policy_for(transformer, "mix")
    assert not any("attn2" in pattern for pattern in policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convrot.quantize_model(transformer, policy=policy, progress=False)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'w2a2'"):
        policy_for(flux_transformer(), "w2a2")
