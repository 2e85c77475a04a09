import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
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


def test_flux_mix_is_the_measured_derivation():
    transformer = flux_transformer()  # 2 double blocks, 4 single blocks
    kinds = linear_kinds(transformer, "mix")
    assert not {n for n, k in kinds.items() if k == "skip" and "blocks." in n}  # bf16 buys no more than W8A8
    w8a8 = {n for n, k in kinds.items() if k == "w8a8"}
    expected = {f"transformer_blocks.{i}.{role}" for i in range(2) for role in ("ff.net.2", "ff.net.0.proj")}
    expected |= {f"transformer_blocks.{i}.attn.to_out.0" for i in range(2)}
    expected |= {f"single_transformer_blocks.{i}.norm.linear" for i in range(4)}
    expected |= {"transformer_blocks.1.norm1.linear"}
    assert w8a8 == expected
    # Table 8's W8A8 single-block values are W4A4 again: q, k and v share one kind in every block.
    for block in ("transformer_blocks.0.attn", "single_transformer_blocks.3.attn"):
        assert {kinds[f"{block}.to_{p}"] for p in "qkv"} == {"w4a4"}
    assert kinds["transformer_blocks.0.norm1.linear"] == kinds["transformer_blocks.1.norm1_context.linear"] == "w4a4"


def test_sd3_mix_keeps_adaln_modulation_at_w4a4():
    # The AdaLN Linears are 32-33% of SD3's weights: at W8A8 they would put mix over its budget of
    # 0.35x the bf16 bytes (docs/diffusers.md).
    kinds = linear_kinds(sd3_transformer(), "mix")
    adaln = [n for n in kinds if n.endswith((".norm1.linear", ".norm1_context.linear"))]
    assert len(adaln) == 4 * 2  # 4 blocks
    assert all(kinds[n] == "w4a4" for n in adaln), {n: kinds[n] for n in adaln}


# Real configs (Flux.1-dev, PixArt-Sigma XL, SD3.5-large: benchmarks/transformer_configs.py), built on
# the meta device: no weights.
REAL_CONFIGS = {
    "flux": (
        FluxTransformer2DModel,
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "pixart": (
        PixArtTransformer2DModel,
        dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            sample_size=128,
            patch_size=2,
            caption_channels=4096,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        ),
    ),
    "sd3": (
        SD3Transformer2DModel,
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
    ),
}


def stored_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch", ["flux", "pixart", "sd3"])
def test_mix_stays_within_its_byte_budget_on_the_real_config(arch):
    cls, config = REAL_CONFIGS[arch]
    with torch.device("meta"):
        model = cls(**config).to(torch.bfloat16)
    bf16 = stored_bytes(model)
    policy = policy_for(model, "mix")
    specs = {
        name: dict(
            kind=layer_kind(policy, name),
            in_features=m.in_features,
            out_features=m.out_features,
            bias=m.bias is not None,
            group_size=256,
            rotation="regular",
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and layer_kind(policy, name) != "skip"
    }
    assert {spec["kind"] for spec in specs.values()} == {"w4a4", "w8a8"}
    convrot.install_skeletons(model, specs)
    for layer in model.modules():
        if isinstance(layer, convrot.ConvLinear) and layer.bias is not None:
            layer.bias.data = layer.bias.data.to(torch.bfloat16)
    # w4a4 is about 0.25x; the mix's W8A8 and bf16 layers may take it to 0.35x at most.
    assert 0.26 < stored_bytes(model) / bf16 <= 0.35


def test_last_resolves_from_the_config():
    rules = preset_rules(ARCHITECTURES[0], "mix", {"num_layers": 19, "num_single_layers": 38})
    patterns = [rule.pattern for rule in rules]
    assert "transformer_blocks.18.norm1.linear" in patterns
    assert not any("<last>" in pattern for pattern in patterns)
    rules = preset_rules(ARCHITECTURES[0], "mix", {"num_layers": 0, "num_single_layers": 38})
    assert not any(rule.pattern.startswith("transformer_blocks.") and "*" not in rule.pattern for rule in rules)


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
