import json
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_dit import make_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import convrot
from convrot import CheckpointError, ConvLinear4bit, ConvLinear8bit

POLICY = {"proj_out": "skip", "blocks.0.ff.*": "w8a8"}


@pytest.fixture
def saved(tmp_path):
    """(quantized model, path of its checkpoint)."""
    model = convrot.quantize_model(make_model(seed=0), policy=POLICY, progress=False)
    path = tmp_path / "model.safetensors"
    convrot.save_quantized(model, path)
    return model, path


def meta_skeleton():
    with torch.device("meta"):
        return make_model()


def module_types(model):
    return {name: type(module) for name, module in model.named_modules()}


def test_file_layout(saved):
    model, path = saved
    assert not list(path.parent.glob("*.partial"))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert (metadata["format"], metadata["format_version"]) == ("convrot", "1")
    layers = json.loads(metadata["layers"])
    assert layers["blocks.0.ff.0"] == {
        "kind": "w8a8",
        "in_features": 64,
        "out_features": 256,
        "bias": True,
        "group_size": 64,
        "rotation": "regular",
        "weight_bits": 8,
        "act_bits": 8,
        "weight_group_size": 0,
    }
    assert layers["blocks.1.attn.to_out"]["kind"] == "w4a4" and not layers["blocks.1.attn.to_out"]["bias"]
    assert "proj_out" not in layers
    assert keys == set(model.state_dict())
    assert {"embed.qweight", "embed.weight_scale", "embed.bias", "proj_out.weight", "blocks.0.norm.weight"} <= keys


@pytest.mark.parametrize("skeleton", ["real", "meta", "quantized"])
def test_file_round_trip_is_bit_identical(saved, skeleton):
    model, path = saved
    if skeleton == "meta":
        target = meta_skeleton()
    elif skeleton == "real":
        target = make_model(seed=1)
    else:
        target = convrot.quantize_model(make_model(seed=1), policy=POLICY, progress=False)
    assert convrot.load_quantized(target, path) is target
    assert module_types(target) == module_types(model)
    x = torch.randn(2, 9, 64)
    assert torch.equal(target(x), model(x))
    for key, tensor in model.state_dict().items():
        loaded = target.state_dict()[key]
        assert loaded.dtype == tensor.dtype and loaded.device.type == "cpu" and torch.equal(loaded, tensor)


def test_state_dict_round_trip_is_bit_identical(saved):
    model, _ = saved
    target = convrot.quantize_model(make_model(seed=1), policy=POLICY, progress=False)
    target.load_state_dict(model.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(target(x), model(x))


class FloatAllocations(TorchDispatchMode):
    """Records the shapes of the floating-point tensors that ops produce off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.is_meta:
                self.shapes.add(tuple(tensor.shape))
        return out


def test_meta_skeleton_never_materialises_full_precision_weights(tmp_path):
    model = convrot.quantize_model(make_model(), progress=False)  # every Linear quantized
    path = tmp_path / "all.safetensors"
    convrot.save_quantized(model, path)
    target = meta_skeleton()
    with FloatAllocations() as allocations:
        convrot.load_quantized(target, path)
    weight_shapes = {(64, 64), (256, 64), (64, 256), (8, 64)}
    assert not allocations.shapes & weight_shapes
    assert not any(tensor.is_meta for tensor in target.state_dict().values())


def test_tied_layers_round_trip(tmp_path):
    model = make_model()
    model.alias = model.embed
    convrot.quantize_model(model, progress=False)
    path = tmp_path / "tied.safetensors"
    convrot.save_quantized(model, path)
    target = make_model(seed=3)
    target.alias = target.embed
    convrot.load_quantized(target, path)
    assert target.alias is target.embed
    x = torch.randn(3, 64)
    assert torch.equal(target(x), model(x))


def rewrite(path, change_tensors=None, change_metadata=None):
    """Re-saves a checkpoint after editing its tensors and/or metadata."""
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        change_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def set_layer_field(name, field, value):
    def change(metadata):
        layers = json.loads(metadata["layers"])
        layers[name][field] = value
        metadata["layers"] = json.dumps(layers)

    return change


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))


def header_text_replace(path, old, new):
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def plain_safetensors(path):
    save_file({"embed.weight": torch.zeros(64, 64)}, path)


BAD_FILES = {
    "truncated data": (lambda p: truncate(p, -100), "unreadable safetensors file, truncated or corrupted"),
    "truncated header": (lambda p: truncate(p, 30), "unreadable safetensors file, truncated or corrupted"),
    "corrupted data": (flip_last_byte, r"is corrupted \(checksum mismatch\)"),
    "corrupted header": (lambda p: header_text_replace(p, b'"layers"', b'"layerz"'), "damaged metadata header"),
    "wrong version": (
        lambda p: rewrite(p, change_metadata=lambda m: m.update(format_version="2")),
        "format version '2'; this convrot reads version 1",
    ),
    "not convrot": (plain_safetensors, "not a ConvRot checkpoint"),
    "extra layer": (
        lambda p: rewrite(
            p,
            change_tensors=lambda t: t.update({"ghost.qweight": torch.zeros(4, 32, dtype=torch.uint8)}),
            change_metadata=lambda m: m.update(
                layers=json.dumps(json.loads(m["layers"]) | {"ghost": json.loads(m["layers"])["embed"]})
            ),
        ),
        "quantized layer 'ghost', which the model lacks",
    ),
    "extra tensor": (
        lambda p: rewrite(p, change_tensors=lambda t: t.update({"stray": torch.zeros(3)})),
        r"tensor\(s\) 'stray' match nothing in the model",
    ),
    "missing tensor": (
        lambda p: rewrite(p, change_tensors=lambda t: t.pop("blocks.1.norm.bias")),
        r"missing tensor\(s\) 'blocks.1.norm.bias'",
    ),
    "wrong code dtype": (
        lambda p: rewrite(p, change_tensors=lambda t: t.update({"embed.qweight": t["embed.qweight"].view(torch.int8)})),
        "tensor 'embed.qweight' is I8, expected torch.uint8",
    ),
    "bad group size": (
        lambda p: rewrite(p, change_metadata=set_layer_field("embed", "group_size", 256)),
        "group_size 256 is not valid for in_features 64",
    ),
    "bad kind": (lambda p: rewrite(p, change_metadata=set_layer_field("embed", "kind", "w2a2")), "unknown kind 'w2a2'"),
    "bad field type": (
        lambda p: rewrite(p, change_metadata=set_layer_field("embed", "out_features", "64")),
        "'out_features' must be int",
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_FILES))
@pytest.mark.parametrize("skeleton", ["real", "meta"])
def test_bad_file_raises_and_leaves_the_model_unchanged(saved, problem, skeleton):
    _, path = saved
    damage, message = BAD_FILES[problem]
    damage(path)
    target = make_model(seed=1) if skeleton == "real" else meta_skeleton()
    types, state = module_types(target), {key: tensor.clone() for key, tensor in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        convrot.load_quantized(target, path)
    assert module_types(target) == types
    for key, tensor in target.state_dict().items():
        assert tensor.is_meta == state[key].is_meta
        assert tensor.is_meta or torch.equal(tensor, state[key])


def test_mismatching_models(saved):
    _, path = saved
    with pytest.raises(
        CheckpointError, match=r"the model's Linear has .* = \(128, 128, True\), the checkpoint \(64, 64"
    ):
        convrot.load_quantized(make_model(width=128), path)
    extra = make_model()
    extra.extra = nn.Linear(64, 64)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'extra.bias', 'extra.weight'"):
        convrot.load_quantized(extra, path)
    narrow_norm = make_model()
    narrow_norm.blocks[0].norm = nn.LayerNorm(32)
    with pytest.raises(CheckpointError, match=r"'blocks.0.norm.weight' has shape \(64,\), the model needs \(32,\)"):
        convrot.load_quantized(narrow_norm, path)
    not_linear = make_model()
    not_linear.embed = nn.Identity()
    with pytest.raises(CheckpointError, match="layer 'embed' is a Identity in the model, not an nn.Linear"):
        convrot.load_quantized(not_linear, path)
    other_rotation = convrot.quantize_model(make_model(), policy=POLICY, rotation="sylvester", progress=False)
    with pytest.raises(CheckpointError, match="layer 'embed' is already a ConvLinear with .*'sylvester'"):
        convrot.load_quantized(other_rotation, path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        convrot.load_quantized(make_model(), tmp_path / "absent.safetensors")


def test_cannot_save_meta_tensors(tmp_path):
    with pytest.raises(ValueError, match="meta device"):
        convrot.save_quantized(meta_skeleton(), tmp_path / "meta.safetensors")


@pytest.mark.gpu
def test_gpu_load_from_meta_skeleton(saved):
    model, path = saved
    target = convrot.load_quantized(meta_skeleton(), path, device="cuda")
    assert all(tensor.is_cuda for tensor in target.state_dict().values())
    assert isinstance(target.embed, ConvLinear4bit) and isinstance(target.blocks[0].ff[0], ConvLinear8bit)
    x = torch.randn(2, 9, 64, device="cuda")
    assert torch.equal(target(x), model.cuda()(x))


def test_layer_specs_and_skeletons_without_tensors(saved):
    model, path = saved
    specs = convrot.read_layer_specs(path)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, convrot.ConvLinear)}
    assert set(specs) == set(quantized)
    for name, spec in specs.items():
        layer = quantized[name]
        assert spec["kind"] == ("w4a4" if layer.bits == 4 else "w8a8")
        assert (spec["in_features"], spec["out_features"]) == (layer.in_features, layer.out_features)
    skeleton = meta_skeleton()
    convrot.install_skeletons(skeleton, specs)
    assert module_types(skeleton) == module_types(model)
    assert all(m.qweight.is_meta for m in skeleton.modules() if isinstance(m, convrot.ConvLinear))


def test_layer_specs_of_a_damaged_file(tmp_path):
    path = tmp_path / "not_convrot.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a ConvRot checkpoint"):
        convrot.read_layer_specs(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="unreadable"):
        convrot.read_layer_specs(path)


def test_a_bf16_bias_of_an_older_save_loads_as_fp32(tmp_path):
    model = convrot.quantize_model(make_model(seed=0), policy=POLICY, progress=False)
    layer = model.blocks[0].ff[0]
    layer.bias = layer.bias.bfloat16()  # as saves written before biases were kept in fp32
    path = tmp_path / "old.safetensors"
    convrot.save_quantized(model, path)
    loaded = convrot.load_quantized(meta_skeleton(), path)
    assert loaded.blocks[0].ff[0].bias.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].ff[0].bias, layer.bias.float())
    x = torch.randn(2, 5, 64)
    assert torch.equal(loaded(x), model(x))


# ---- W4A8 and group-scaled 4-bit weights ----

SCHEME_POLICY = {"proj_out": "skip", "blocks.0.ff.*": "w4a8", "blocks.1.*": "w4a8g64", "embed": "w4a4g64"}


@pytest.fixture
def saved_schemes(tmp_path):
    model = convrot.quantize_model(make_model(seed=0), policy=SCHEME_POLICY, progress=False)
    path = tmp_path / "schemes.safetensors"
    convrot.save_quantized(model, path)
    return model, path


def test_schemes_are_recorded_and_round_trip_bit_identically(saved_schemes):
    model, path = saved_schemes
    layers = convrot.read_layer_specs(path)
    assert layers["blocks.0.ff.0"]["kind"] == "w4a8"
    assert (layers["blocks.0.ff.0"]["weight_bits"], layers["blocks.0.ff.0"]["act_bits"]) == (4, 8)
    assert layers["blocks.1.attn.to_q"]["weight_group_size"] == 64 and layers["embed"]["kind"] == "w4a4g64"
    with safe_open(path, framework="pt") as handle:
        assert "embed.weight_group_scale" in set(handle.keys())
    for skeleton in (meta_skeleton(), make_model(seed=1)):
        convrot.load_quantized(skeleton, path)
        assert module_types(skeleton) == module_types(model)
        assert skeleton.blocks[1].attn["to_q"].kind == "w4a8g64" and skeleton.blocks[0].ff[0].act_bits == 8
        x = torch.randn(2, 9, 64)
        assert torch.equal(skeleton(x), model(x))


def test_a_save_from_before_the_scheme_fields_loads(saved):
    model, path = saved

    def drop_scheme_fields(metadata):
        layers = json.loads(metadata["layers"])
        for spec in layers.values():
            for field in ("weight_bits", "act_bits", "weight_group_size"):
                del spec[field]
        metadata["layers"] = json.dumps(layers)

    rewrite(path, change_metadata=drop_scheme_fields)
    target = convrot.load_quantized(meta_skeleton(), path)
    assert convrot.read_layer_specs(path)["blocks.0.ff.0"]["act_bits"] == 8
    x = torch.randn(2, 9, 64)
    assert torch.equal(target(x), model(x))


def zero_multipliers(path):
    """Multipliers of 0, with the checksum of the new bytes (so that only their range is wrong)."""
    zeros = {}

    def change_tensors(tensors):
        zeros["tensor"] = tensors["embed.weight_group_scale"] = torch.zeros_like(tensors["embed.weight_group_scale"])

    def change_metadata(metadata):
        checksums = json.loads(metadata["checksums"])
        checksums["embed.weight_group_scale"] = zlib.crc32(zeros["tensor"].numpy())
        metadata["checksums"] = json.dumps(checksums)

    rewrite(path, change_tensors, change_metadata)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: rewrite(p, change_metadata=set_layer_field("embed", "act_bits", 8)), "does not match"),
        (zero_multipliers, r"multipliers outside \[1, 16\]"),
        (
            lambda p: rewrite(p, change_tensors=lambda t: t.pop("embed.weight_group_scale")),
            "missing tensor.*embed.weight_group_scale",
        ),
    ],
)
def test_bad_scheme_data_raises_and_leaves_the_model_unchanged(saved_schemes, change, message):
    _, path = saved_schemes
    change(path)
    target = make_model(seed=1)
    before = {key: tensor.clone() for key, tensor in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        convrot.load_quantized(target, path)
    assert all(torch.equal(target.state_dict()[key], tensor) for key, tensor in before.items())


# Damage that the file shows on its own (the rest of BAD_FILES is a mismatch with a model).
DAMAGE_WITHOUT_A_MODEL = {
    "truncated data": (lambda p: truncate(p, -100), r"truncated: \d+ of \d+ bytes \(100 missing\)"),
    "truncated header": (lambda p: truncate(p, 30), r"truncated: 30 bytes, its header alone claims \d+"),
    "truncated to nothing": (lambda p: truncate(p, 3), "truncated: 3 bytes, shorter than a safetensors header"),
    "corrupted data": (flip_last_byte, r"1 of \d+ tensors corrupted \(checksum mismatch\): '"),
    "corrupted header": (lambda p: header_text_replace(p, b'"layers"', b'"layerz"'), "damaged metadata header"),
    "wrong version": BAD_FILES["wrong version"],
    "not convrot": BAD_FILES["not convrot"],
    "bad kind": BAD_FILES["bad kind"],
    "tensor without checksum": (
        lambda p: rewrite(p, change_tensors=lambda t: t.update({"stray": torch.zeros(3)})),
        r"tensor\(s\) 'stray' have no checksum",
    ),
    "checksum without tensor": (
        lambda p: rewrite(p, change_tensors=lambda t: t.pop("blocks.1.norm.bias")),
        r"tensor\(s\) 'blocks.1.norm.bias' have a checksum but are not in the file",
    ),
}


def test_verify_checkpoint_of_a_sound_file(saved):
    model, path = saved
    specs = convrot.verify_checkpoint(path)
    assert specs == convrot.read_layer_specs(path)
    assert set(specs) == {name for name, m in model.named_modules() if isinstance(m, convrot.ConvLinear)}


@pytest.mark.parametrize("problem", sorted(DAMAGE_WITHOUT_A_MODEL))
def test_verify_checkpoint_says_what_is_wrong(saved, problem):
    _, path = saved
    damage, message = DAMAGE_WITHOUT_A_MODEL[problem]
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        convrot.verify_checkpoint(path)


def test_verify_checkpoint_names_every_corrupted_tensor(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:header_end])
    for key in ("embed.qweight", "proj_out.weight"):  # one bit of each tensor's first byte
        data[header_end + header[key]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"2 of \d+ tensors corrupted .*'embed.qweight', 'proj_out.weight'"):
        convrot.verify_checkpoint(path)
