"""The generic role-based policy on the DiTs without a preset of their own (tiny configs built in code).

Each tested architecture quantizes with the default preset, runs, and its output's SQNR against the
unquantized model is at most 3 dB below that of the same quantized model in float64 simulation
(convrot.set_simulation): the kernels lose no more than rounding to bf16 does. The SQNRs measured
are in docs/diffusers.md.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny_dits import BUILDERS, DTYPE, REAL, build, run, sqnr_pair
from torch import nn

import convrot
from convrot_diffusers import ConvRotConfig, load_quantized, quantize_pipeline, quantize_transformer
from convrot_diffusers.detect import GENERIC_TESTED, UnsupportedModelError
from convrot_diffusers.presets import check_layers, layer_kind, policy_for


def test_every_tested_architecture_has_a_builder():
    assert set(BUILDERS) == set(GENERIC_TESTED)


@pytest.mark.parametrize("class_name", list(BUILDERS))
def test_quantized_output_is_finite_and_near_the_float64_simulation(class_name, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tested architecture quantizes without the untested warning
        found_db, simulated_db, found = sqnr_pair(class_name, seed)
    assert torch.isfinite(found).all()
    assert math.isfinite(found_db) and found_db > 3, f"{class_name}: {found_db:.2f} dB"
    assert found_db >= simulated_db - 3, f"{class_name}: {found_db:.2f} dB vs simulation {simulated_db:.2f} dB"


@pytest.mark.parametrize("class_name", list(BUILDERS))
def test_real_width_models_quantize_every_block_layer_in_groups_of_256(class_name):
    """What test_generic_gpu.py builds at the released widths, on the meta device (no weights): every layer
    the presets quantize can be, and each rotates in groups of 256, none falling back to a smaller group."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**REAL[class_name])
    for preset in ("mix", "w4a4"):
        policy = policy_for(model, preset)
        check_layers(model, policy, 256)
        quantized = [
            m for name, m in model.named_modules() if isinstance(m, nn.Linear) and layer_kind(policy, name) != "skip"
        ]
        assert len(quantized) >= 10
        assert {convrot.resolve_group_size(m.in_features, 256) for m in quantized} == {256}


@pytest.mark.parametrize("class_name", list(BUILDERS))
def test_generic_policy_keeps_embedders_and_global_modulation_bf16(class_name):
    model, _ = build(class_name, 0)
    policy = policy_for(model, "mix")
    kinds = {name: layer_kind(policy, name) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    lists = {name for name, child in model.named_children() if isinstance(child, nn.ModuleList)}
    outside = {n: k for n, k in kinds.items() if n.split(".")[0] not in lists}
    inside = {n: k for n, k in kinds.items() if n.split(".")[0] in lists}
    assert outside and set(outside.values()) == {"skip"}
    assert set(inside.values()) <= {"w4a4", "w8a8", "skip"}
    for name, kind in inside.items():
        if name.endswith(("to_q", "to_k", "add_q_proj", "add_k_proj")):
            assert kind == "w4a4", name
        if name.endswith(".to_out.0"):
            assert kind == "w8a8", name
    # The last block's feed-forward down-projections stay bf16, the first block's are W4A4.
    down = [n for n in inside if n.endswith(("ff.net.2", "ffn.net.2", "mlp.net.2", "ff.linear_out"))]
    assert down
    for name in down:
        index = int(name.split(".")[1])
        last = len(getattr(model, name.split(".")[0])) - 1
        assert kinds[name] == ("skip" if index == last else "w4a4"), name


@pytest.mark.parametrize("preset", ["w4a4", "w4a8g64"])
def test_all_4bit_weight_presets_quantize_every_block_linear(preset):
    model, _ = build("WanTransformer3DModel", 0)
    policy = policy_for(model, preset)
    kinds = {name: layer_kind(policy, name) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(kind == preset for name, kind in kinds.items() if name.startswith("blocks."))
    assert all(kind == "skip" for name, kind in kinds.items() if not name.startswith("blocks."))


def test_save_and_load_round_trip(tmp_path, seed):  # save_pretrained, then from_pretrained and load_quantized
    from diffusers import WanTransformer3DModel

    model, make_inputs = build("WanTransformer3DModel", seed)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    quantized = quantize_transformer(model, progress=False)
    expected = run(quantized, inputs)
    quantized.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert isinstance(loaded.config.quantization_config, ConvRotConfig)
    assert sum(isinstance(m, convrot.ConvLinear) for m in loaded.modules()) == sum(
        isinstance(m, convrot.ConvLinear) for m in quantized.modules()
    )
    assert torch.equal(run(loaded, inputs), expected)
    assert torch.equal(run(load_quantized(tmp_path), inputs), expected)


def test_quantize_on_load_matches_quantize_in_memory(tmp_path, seed):
    from diffusers import QwenImageTransformer2DModel

    model, make_inputs = build("QwenImageTransformer2DModel", seed)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    model.save_pretrained(tmp_path)
    loaded = QwenImageTransformer2DModel.from_pretrained(
        tmp_path, quantization_config=ConvRotConfig(), torch_dtype=DTYPE
    )
    in_memory = quantize_transformer(model, progress=False)
    assert torch.equal(run(loaded, inputs), run(in_memory, inputs))


def test_quantize_pipeline_accepts_a_video_pipeline():
    model, _ = build("WanTransformer3DModel", 0)

    class WanPipeline:  # quantize_pipeline reads only .transformer and .name_or_path
        name_or_path = "tiny-wan"
        transformer = model

    pipe = quantize_pipeline(WanPipeline(), progress=False)
    assert pipe.transformer.config.quantization_config.base_model == "tiny-wan"
    assert isinstance(pipe.transformer.blocks[0].attn1.to_q, convrot.ConvLinear)


class _UntestedBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.mlp(x)


def _untested_model(hidden: int):
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class UntestedTransformer(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 64, hidden: int = 128):
            super().__init__()
            self.embed = nn.Linear(width, width)
            self.blocks = nn.ModuleList([_UntestedBlock(width, hidden) for _ in range(2)])

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return x

    return UntestedTransformer(hidden=hidden)


def test_an_untested_architecture_quantizes_with_a_warning():
    model = _untested_model(hidden=128)
    with pytest.warns(UserWarning, match="UntestedTransformer is untested"):
        quantize_transformer(model, progress=False)
    assert isinstance(model.blocks[1].mlp[0], convrot.ConvLinear)
    assert isinstance(model.blocks[0].mlp[2], convrot.ConvLinear)
    assert isinstance(model.embed, nn.Linear) and not isinstance(model.embed, convrot.ConvLinear)
    assert not isinstance(model.blocks[1].mlp[2], convrot.ConvLinear)  # the last block's down-projection
    assert torch.isfinite(model(torch.randn(1, 4, 64))).all()


def test_a_layer_that_cannot_be_quantized_is_named_before_any_is_converted():
    model = _untested_model(hidden=130)  # blocks.*.mlp.2 has in_features 130: no multiple of 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"layer 'blocks.0.mlp.2' cannot be quantized"):
            quantize_transformer(model, preset="w4a4", progress=False)
    assert not any(isinstance(m, convrot.ConvLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None


def test_quantize_on_load_names_a_layer_that_cannot_be_quantized_before_reading_weights(tmp_path, monkeypatch):
    import convrot_diffusers.diffusers_integration as integration

    model = _untested_model(hidden=130)
    model.save_pretrained(tmp_path)
    read = []
    original = integration.ConvRotQuantizer.create_quantized_param
    monkeypatch.setattr(
        integration.ConvRotQuantizer,
        "create_quantized_param",
        lambda self, *a, **k: read.append(1) or original(self, *a, **k),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"layer 'blocks.0.mlp.2' cannot be quantized"):
            type(model).from_pretrained(tmp_path, quantization_config=ConvRotConfig(preset="w4a4"))
    assert not read


def test_a_model_without_block_lists_is_refused():
    from diffusers import ModelMixin

    class Flat(ModelMixin):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)

    with pytest.raises(UnsupportedModelError, match="Flat has no block list"):
        policy_for(Flat())


def test_a_module_that_is_not_a_diffusers_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="Sequential is not a diffusers model"):
        quantize_transformer(nn.Sequential(nn.Linear(64, 64)), progress=False)
