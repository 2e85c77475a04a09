"""A quantized transformer's state dict answers weight lookups by name (diffusers' Flux.1 LoRA loader needs
them) without listing them: saving, loading and iterating see only the tensors the model holds."""

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from lora_dits import build, load, peft_lora, quantized_copy, run

import convrot
import convrot_diffusers
from convrot_diffusers.comfy_quant import load_comfy, save_comfy


def _quantized_layers(transformer) -> dict:
    return {name: m for name, m in transformer.named_modules() if isinstance(m, convrot.ConvLinear)}


def _held(transformer) -> set:
    """The names of the tensors the transformer holds (parameters and buffers)."""
    return {name for name, _ in transformer.named_parameters()} | {name for name, _ in transformer.named_buffers()}


def test_the_state_dict_answers_quantized_layers_weights_without_listing_them(seed):
    model, _ = build("flux", seed)
    quantized = quantized_copy(model)
    state = quantized.state_dict()
    layers = _quantized_layers(quantized)
    assert layers and set(state) <= _held(quantized)
    for name, layer in layers.items():
        key = f"{name}.weight"
        assert key in state and key not in list(state) and key not in state.keys()
        weight = state[key]
        assert isinstance(weight, convrot.WeightStandIn) and isinstance(state.get(key), convrot.WeightStandIn)
        assert weight.shape == (layer.out_features, layer.in_features) and weight.dtype == torch.bfloat16
    float_linear = quantized.x_embedder  # kept in bf16 by the presets: its weight is listed, as before
    assert not isinstance(float_linear, convrot.ConvLinear) and "x_embedder.weight" in list(state)
    for missing in ("x_embedder.nothing", "transformer_blocks.0.attn.nothing.weight", "nowhere", 3):
        assert missing not in state and state.get(missing, "default") == "default"
        with pytest.raises(KeyError):
            state[missing]  # noqa: B018


def test_under_a_lora_the_base_layers_weight_is_answered_and_no_lora_layers_weight_is_invented(seed):
    pytest.importorskip("peft")
    model, _ = build("flux", seed)
    quantized = quantized_copy(model)
    name = "transformer_blocks.0.attn.to_q"
    load("flux", quantized, peft_lora(model, 4, torch.Generator().manual_seed(seed)), "style")
    state = quantized.state_dict()
    assert f"{name}.lora_A.style.weight" in list(state)  # PEFT's tensors are listed as it holds them
    for key in (f"{name}.base_layer.weight", f"{name}.weight"):
        # Not PEFT's layer's own weight (the base layer's qweight, a ConvLinear having one): the float shape.
        assert key in state and isinstance(state[key], convrot.WeightStandIn)
        assert state[key].shape == model.get_submodule(name).weight.shape
    assert f"{name}.lora_A.weight" not in state


def test_the_state_dict_saves_and_loads_as_the_tensors_it_lists(seed):
    model, inputs = build("flux", seed)
    quantized = quantized_copy(model)
    state = quantized.state_dict()
    plain = OrderedDict(state)
    plain._metadata = state._metadata
    assert pickle.dumps(state) == pickle.dumps(plain)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert type(loaded) is OrderedDict and list(loaded) == list(state)
    fresh = quantized_copy(build("flux", seed + 1)[0])
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(run(fresh, inputs), run(quantized, inputs))
    copied = state.copy()
    assert list(copied) == list(state) and "x_embedder.weight" in copied


def test_transformers_convrot_loads_answer_the_lookup_too(tmp_path, seed):
    import diffusers

    model, _ = build("flux", seed)
    quantized = quantized_copy(model)
    name = next(iter(_quantized_layers(quantized)))
    quantized.save_pretrained(tmp_path / "save")
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "save")
    save_comfy(quantized, tmp_path / "comfy.safetensors", progress=False)
    from_comfy = load_comfy(tmp_path / "comfy.safetensors", model.config)
    for transformer in (reloaded, from_comfy, copy.deepcopy(quantized)):
        assert isinstance(transformer.state_dict()[f"{name}.weight"], convrot.WeightStandIn)
        assert f"{name}.weight" not in list(transformer.state_dict())
    hooks = len(quantized._state_dict_hooks)
    convrot_diffusers.diffusers_integration.attach_quantizer(quantized, convrot_diffusers.ConvRotConfig())
    assert len(quantized._state_dict_hooks) == hooks  # binding again installs nothing twice


def test_a_transformer_inside_another_module_leaves_the_outer_state_dict_plain(seed):
    quantized = quantized_copy(build("flux", seed)[0])
    outer = torch.nn.ModuleDict({"denoiser": quantized}).state_dict()
    assert type(outer) is OrderedDict and set(outer) == {f"denoiser.{key}" for key in quantized.state_dict()}
