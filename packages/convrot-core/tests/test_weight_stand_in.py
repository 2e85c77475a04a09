"""ConvLinear as an nn.Linear: its weight stand-in, and what being an nn.Linear must not change."""

import copy
import pickle

import pytest
import torch
from torch import nn

import convrot
from convrot import ConvLinear, ConvLinear4bit, ConvLinear8bit
from convrot.weight_stand_in import WeightStandIn


def quantized(cls=ConvLinear4bit, k=256, n=48, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return cls.from_linear(nn.Linear(k, n).to(dtype))


@pytest.mark.parametrize("cls", [ConvLinear4bit, ConvLinear8bit])
def test_weight_stand_in_has_the_float_weights_metadata_and_no_storage(cls):
    layer = quantized(cls)
    assert isinstance(layer, nn.Linear)
    weight = layer.weight
    assert isinstance(weight, WeightStandIn) and isinstance(weight.data, WeightStandIn)
    assert weight.shape == (48, 256) and weight.dtype == torch.bfloat16 and weight.device == layer.qweight.device
    assert not weight.requires_grad and "WeightStandIn(shape=[48, 256]" in repr(weight)
    assert set(layer.state_dict()) == {"qweight", "weight_scale", "bias"}
    assert [name for name, _ in layer.named_parameters()] == []


@pytest.mark.parametrize(
    "use",
    [
        lambda w: w.clone(),
        lambda w: w.data.add_(1.0),
        lambda w: w + 1,
        lambda w: torch.isfinite(w).all(),
        lambda w: torch.nn.functional.linear(torch.ones(2, 256), w),
        lambda w: w.to(torch.float32),
    ],
)
def test_any_computation_with_the_stand_in_is_refused(use):
    layer = quantized()
    with pytest.raises(NotImplementedError, match="ConvLinear4bit.weight stands in"):
        use(layer.weight)


def test_merging_into_the_stand_in_as_peft_does_is_refused_and_changes_nothing():
    layer = quantized()
    state = {key: tensor.clone() for key, tensor in layer.state_dict().items()}
    with pytest.raises(NotImplementedError, match="fuse_lora"):
        layer.weight.data += torch.ones(48, 256, dtype=torch.bfloat16)
    assert all(torch.equal(layer.state_dict()[key], state[key]) for key in state)
    with pytest.raises(KeyError):  # nn.Module refuses a parameter under an attribute's name
        layer.weight = nn.Parameter(torch.zeros(48, 256))
    with pytest.raises(TypeError, match="no float parameters"):
        layer.reset_parameters()


def test_float_dtype_follows_dtype_conversions_and_copies():
    layer = quantized(dtype=torch.bfloat16)
    assert copy.deepcopy(layer).float_dtype == torch.bfloat16
    assert pickle.loads(pickle.dumps(layer)).weight.dtype == torch.bfloat16
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.float16 and layer.weight_scale.dtype == torch.float32
    layer.float()
    assert layer.weight.dtype == torch.float32
    assert layer.qweight.dtype == torch.uint8
    (part,) = layer.split([48])
    assert part.float_dtype == torch.float32
    assert ConvLinear4bit(256, 8).weight.dtype == torch.get_default_dtype()


def test_a_layer_with_a_gelu_inside_refuses_its_weight_by_name():
    layer = quantized()
    layer.gelu_from = 0
    with pytest.raises(ValueError, match="unfuse_activations"):
        layer.weight  # noqa: B018


def test_quantize_model_leaves_convlinear_layers_alone(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 32))
    convrot.quantize_model(model, policy={"2": "w8a8"}, progress=False)
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    types = [type(module) for module in model]
    with pytest.warns(UserWarning, match="matched no Linear"):
        convrot.quantize_model(model, policy={"2": "w8a8"}, progress=False)  # nothing left to quantize
    assert [type(module) for module in model] == types
    assert all(torch.equal(model.state_dict()[key], state[key]) for key in state)
    assert all(isinstance(module, ConvLinear) for module in (model[0], model[2]))


@pytest.mark.parametrize("cls", [ConvLinear4bit, ConvLinear8bit])
def test_from_linear_refuses_a_layer_already_quantized(cls):
    with pytest.raises(TypeError, match="already quantized"):
        cls.from_linear(quantized(ConvLinear4bit, seed=torch.seed() % 2**31))
