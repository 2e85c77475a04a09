import gc
import math
import weakref

import pytest
import torch
from tiny_dit import make_model
from torch import nn

import convrot
from convrot import ConvLinear4bit, ConvLinear8bit


def linear_names(model, cls):
    return sorted(name for name, module in model.named_modules() if type(module) is cls)


def test_default_policy_quantizes_every_linear_to_w4a4():
    model = make_model()
    x = torch.randn(2, 10, 64)
    reference = model(x)
    names = linear_names(model, nn.Linear)
    assert convrot.quantize_model(model, progress=False) is model
    assert linear_names(model, ConvLinear4bit) == names and not linear_names(model, nn.Linear)
    error = (model(x) - reference).square().mean() / reference.square().mean()
    assert 10 * math.log10(1 / error.item()) > 10


def test_policy_kinds_first_match_wins_and_defaults():
    model = make_model()
    policy = {"proj_out": "skip", "blocks.0.ff.*": "w8a8", "blocks.*.ff.*": "skip", "embed": "w4a4"}
    convrot.quantize_model(model, policy=policy, group_size=16, rotation="sylvester", progress=False)
    assert linear_names(model, nn.Linear) == ["blocks.1.ff.0", "blocks.1.ff.2", "proj_out"]
    assert linear_names(model, ConvLinear8bit) == ["blocks.0.ff.0", "blocks.0.ff.2"]
    assert linear_names(model, ConvLinear4bit) == [
        "blocks.0.attn.to_out",
        "blocks.0.attn.to_q",
        "blocks.1.attn.to_out",
        "blocks.1.attn.to_q",
        "embed",
    ]
    layer = model.blocks[0].ff[2]
    assert (layer.group_size, layer.rotation) == (16, "sylvester")
    assert model.blocks[0].ff[0].group_size == 16


def test_group_size_falls_back_per_layer():
    model = nn.Sequential(nn.Linear(1152, 2432), nn.Linear(2432, 3072), nn.Linear(3072, 8))
    convrot.quantize_model(model, progress=False)
    assert [layer.group_size for layer in model] == [64, 64, 256]


def assert_unchanged(model, state):
    assert not linear_names(model, ConvLinear4bit) and not linear_names(model, ConvLinear8bit)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0, equal_nan=True)


def test_bad_layer_raises_before_anything_is_converted():
    model = make_model()
    model.odd = nn.Linear(6, 4)
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'odd': in_features=6 is not a multiple of 4"):
        convrot.quantize_model(model, progress=False)
    assert_unchanged(model, state)
    convrot.quantize_model(model, policy={"odd": "skip"}, progress=False)
    assert type(model.odd) is nn.Linear and type(model.embed) is ConvLinear4bit


def test_non_finite_weight_raises_before_anything_is_converted():
    model = make_model()
    with torch.no_grad():
        model.proj_out.weight[2, 3] = math.nan
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'proj_out': the weight holds NaN or Inf"):
        convrot.quantize_model(model, progress=False)
    assert_unchanged(model, state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rotation must be one of"):
        convrot.quantize_model(make_model(), rotation="random", progress=False)
    with pytest.raises(ValueError, match="group_size must be a power of 4"):
        convrot.quantize_model(make_model(), group_size=128, progress=False)
    with pytest.raises(TypeError, match="mapping"):
        convrot.quantize_model(make_model(), policy=["*"], progress=False)
    with pytest.raises(TypeError, match="the model itself is an nn.Linear"):
        convrot.quantize_model(nn.Linear(64, 8), progress=False)
    with torch.device("meta"):
        meta_model = make_model()
    with pytest.raises(ValueError, match="meta device"):
        convrot.quantize_model(meta_model, progress=False)


def test_unused_policy_pattern_warns():
    with pytest.warns(UserWarning, match=r"\['transformer\.\*'\] matched no Linear layer"):
        convrot.quantize_model(make_model(), policy={"transformer.*": "skip", "embed": "w8a8"}, progress=False)


def test_shared_linear_is_converted_once():
    model = make_model()
    model.alias = model.embed
    convrot.quantize_model(model, progress=False)
    assert model.alias is model.embed and type(model.embed) is ConvLinear4bit


def test_multihead_attention_out_proj_is_left_alone():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(64, 4, batch_first=True), "head": nn.Linear(64, 8)})
    convrot.quantize_model(model, progress=False)
    assert type(model["head"]) is ConvLinear4bit
    x = torch.randn(2, 5, 64)
    assert model["mha"](x, x, x)[0].shape == (2, 5, 64)


def test_progress_bar(capsys):
    convrot.quantize_model(make_model(), progress=True)
    assert "convrot: quantizing" in capsys.readouterr().err
    convrot.quantize_model(make_model(), progress=False)
    assert capsys.readouterr().err == ""


def test_original_weights_are_freed_as_the_conversion_goes(monkeypatch):
    model = make_model(depth=3)
    weights = {name: weakref.ref(module.weight) for name, module in model.named_modules() if type(module) is nn.Linear}
    alive_at_each_step = []
    original = ConvLinear4bit.from_linear.__func__

    def recording_from_linear(cls, linear, **kwargs):
        gc.collect()
        alive_at_each_step.append(sum(ref() is not None for ref in weights.values()))
        return original(cls, linear, **kwargs)

    monkeypatch.setattr(ConvLinear4bit, "from_linear", classmethod(recording_from_linear))
    convrot.quantize_model(model, progress=False)
    gc.collect()
    # At the i-th conversion exactly the i layers already converted are gone.
    assert alive_at_each_step == list(range(len(weights), 0, -1))
    assert all(ref() is None for ref in weights.values())


def test_set_simulation():
    model = convrot.quantize_model(make_model(), progress=False)
    x = torch.randn(3, 64)
    kernel_output = model(x)
    convrot.set_simulation(model, torch.float64)
    assert all(m.simulation_dtype == torch.float64 for m in model.modules() if isinstance(m, convrot.ConvLinear))
    torch.testing.assert_close(model(x), kernel_output, atol=0.05, rtol=0.05)
    convrot.set_simulation(model, None)
    assert torch.equal(model(x), kernel_output)
    with pytest.raises(TypeError, match="floating-point"):
        convrot.set_simulation(model, torch.int8)


@pytest.mark.gpu
def test_gpu_peak_memory_stays_near_the_larger_model():
    # 1024 bf16 layers of 1024 x 1024 (2 GiB) quantize to 0.5 GiB of codes. Were
    # the originals kept until the end, the peak would exceed the start by
    # those 0.5 GiB; freed as the conversion goes, the excess is one layer's
    # float64 working set (a few times 8 MiB).
    torch.cuda.empty_cache()
    model = nn.Sequential(*(nn.Linear(1024, 1024, dtype=torch.bfloat16, device="cuda") for _ in range(1024)))
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    convrot.quantize_model(model, progress=False)
    excess = torch.cuda.max_memory_allocated() - before
    quantized = torch.cuda.memory_allocated()
    assert quantized < before / 3
    assert excess < 128 * 2**20, f"peak exceeded the starting memory by {excess / 2**20:.0f} MiB"
    assert type(model[0]) is ConvLinear4bit and model[0].qweight.is_cuda
