"""Quantized checkpoints: one safetensors file holding the whole model.

Tensors: the model's state dict, in which each ConvLinear contributes
``<name>.qweight``, ``<name>.weight_scale``, ``<name>.bias`` and, for group-scaled
weights, ``<name>.weight_group_scale``, and every other module (skipped Linear
layers, norms, embeddings) its usual tensors.
Header metadata (all strings, safetensors' rule):
  format          "convrot"
  format_version  "1"
  layers          JSON {module name: {kind, in_features, out_features, bias, group_size, rotation,
                  weight_bits, act_bits, weight_group_size}}: kind names the scheme (w4a4, w8a8, w4a8,
                  w4a4g64, w4a8g64), the last three fields spell it out (files written before W4A8
                  lack them; their kind alone, w4a4 or w8a8, says it, and they load as before)
  checksums       JSON {tensor name: CRC-32 of its bytes}, which catches corrupted data
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .hadamard import ROTATIONS, resolve_group_size
from .linear import SCHEMES, ConvLinear, layer_for_kind
from .model import is_convertible_linear
from .quantizer.weight import MAX_MULTIPLIER

FORMAT_NAME = "convrot"
FORMAT_VERSION = 1
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the model is left unchanged."""


def tensor_checksum(tensor: torch.Tensor) -> int:
    """The CRC-32 of a CPU tensor's bytes, as the header's ``checksums`` holds it."""
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


def _layer_spec(layer: ConvLinear) -> dict:
    return {
        "kind": layer.kind,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "group_size": layer.group_size,
        "rotation": layer.rotation,
        **_scheme_fields(layer.kind),
    }


def quantized_layers(model: nn.Module) -> dict[str, ConvLinear]:
    """Every ConvLinear of the model by name (a layer shared under two names appears under both)."""
    return {
        name: module for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, ConvLinear)
    }


def checkpoint_metadata(layers: Mapping[str, ConvLinear], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The header metadata of a checkpoint holding ``tensors`` (CPU, contiguous), whose quantized layers are
    ``layers`` (by name): format, version, layer list and checksums."""
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps({name: _layer_spec(layer) for name, layer in layers.items()}),
        "checksums": json.dumps({key: tensor_checksum(tensor) for key, tensor in tensors.items()}),
    }


def _scheme_fields(kind: str) -> dict:
    """The fields that spell out a scheme: weight and activation bits, weight group size (0: none)."""
    cls, act_bits, weight_group_size = SCHEMES[kind]
    return {"weight_bits": cls.bits, "act_bits": act_bits, "weight_group_size": weight_group_size or 0}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the model (quantized layers and everything else) to one safetensors file.

    Written to a temporary file beside ``path`` and renamed, so an
    interrupted save never leaves a truncated checkpoint under ``path``.
    """
    tensors = {}
    storages = set()
    for key, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # safetensors refuses tensors sharing memory (tied weights)
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    write_safetensors(tensors, path, checkpoint_metadata(quantized_layers(model), tensors))


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Writes a safetensors file beside ``path`` and renames it into place, so that an interrupted
    write never leaves a file that looks complete."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


_SPEC_FIELDS = {"kind": str, "in_features": int, "out_features": int, "bias": bool, "group_size": int, "rotation": str}
_SCHEME_FIELDS = {"weight_bits": int, "act_bits": int, "weight_group_size": int}


def _check_layer_spec(name: str, spec) -> dict:
    """The spec, checked, with the scheme fields filled in for a file written before they existed."""
    fields = {**_SPEC_FIELDS, **_SCHEME_FIELDS}
    if isinstance(spec, dict) and set(spec) == set(_SPEC_FIELDS) and spec.get("kind") in ("w4a4", "w8a8"):
        spec = {**spec, **_scheme_fields(spec["kind"])}
    if not isinstance(spec, dict) or set(spec) != set(fields):
        raise CheckpointError(f"layer {name!r}: metadata must have exactly the fields {sorted(fields)}, got {spec!r}")
    for field, kind in fields.items():
        if type(spec[field]) is not kind:
            raise CheckpointError(
                f"layer {name!r}: metadata field {field!r} must be {kind.__name__}, got {spec[field]!r}"
            )
    if spec["kind"] not in SCHEMES:
        raise CheckpointError(f"layer {name!r}: unknown kind {spec['kind']!r}, expected one of {sorted(SCHEMES)}")
    scheme = {field: spec[field] for field in _SCHEME_FIELDS}
    if scheme != _scheme_fields(spec["kind"]):
        raise CheckpointError(f"layer {name!r}: kind {spec['kind']!r} does not match {scheme}")
    if spec["weight_group_size"] and spec["in_features"] % spec["weight_group_size"]:
        raise CheckpointError(
            f"layer {name!r}: in_features {spec['in_features']} is not a multiple of the weight group size"
        )
    if spec["rotation"] not in ROTATIONS:
        raise CheckpointError(f"layer {name!r}: unknown rotation {spec['rotation']!r}")
    try:
        valid = resolve_group_size(spec["in_features"], spec["group_size"]) == spec["group_size"]
    except ValueError:
        valid = False
    if not valid:
        raise CheckpointError(
            f"layer {name!r}: group_size {spec['group_size']} is not valid for in_features {spec['in_features']}"
        )
    return spec


def _read_header(handle, path: str) -> tuple[dict[str, dict], dict[str, int]]:
    metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a ConvRot checkpoint (metadata 'format' is {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {metadata.get('format_version')!r}; "
            f"this convrot reads version {FORMAT_VERSION}"
        )
    try:
        layers = json.loads(metadata["layers"])
        checksums = json.loads(metadata["checksums"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: damaged metadata header ({type(error).__name__}: {error})") from None
    if not isinstance(layers, dict) or not isinstance(checksums, dict):
        raise CheckpointError(f"{path}: damaged metadata header ('layers' and 'checksums' must be JSON objects)")
    layers = {name: _check_layer_spec(name, spec) for name, spec in layers.items()}
    return layers, checksums


def _expected_tensors(model: nn.Module, layers: Mapping[str, dict]) -> dict[str, tuple[tuple, torch.dtype | None]]:
    """Tensor name -> (shape, dtype or None for any float) of the model once converted."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, spec in layers.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"the checkpoint has quantized layer {name!r}, which the model lacks")
        if name == "" and not isinstance(module, ConvLinear):
            raise CheckpointError(
                "the checkpoint is a single layer: load it into a ConvLinear4bit/8bit, "
                "which cannot replace the model's root module in place"
            )
        if isinstance(module, ConvLinear):
            if _layer_spec(module) != spec:
                raise CheckpointError(
                    f"layer {name!r} is already a ConvLinear with {_layer_spec(module)}, the checkpoint has {spec}"
                )
        elif is_convertible_linear(module):
            found = (module.in_features, module.out_features, module.bias is not None)
            if found != (spec["in_features"], spec["out_features"], spec["bias"]):
                raise CheckpointError(
                    f"layer {name!r}: the model's Linear has (in_features, out_features, bias) = {found}, "
                    f"the checkpoint {(spec['in_features'], spec['out_features'], spec['bias'])}"
                )
        else:
            raise CheckpointError(f"layer {name!r} is a {type(module).__name__} in the model, not an nn.Linear")
    expected = {}
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in layers:
            expected[key] = (tuple(tensor.shape), None)
    for name, spec in layers.items():
        prefix = f"{name}." if name else ""
        n, k = spec["out_features"], spec["in_features"]
        if spec["weight_bits"] == 4:
            expected[prefix + "qweight"] = ((n, k // 2), torch.uint8)
        else:
            expected[prefix + "qweight"] = ((n, k), torch.int8)
        expected[prefix + "weight_scale"] = ((n,), torch.float32)
        if spec["weight_group_size"]:
            expected[prefix + "weight_group_scale"] = ((n, k // spec["weight_group_size"]), torch.uint8)
        if spec["bias"]:
            expected[prefix + "bias"] = ((n,), None)
    return expected


def check_layout(
    model: nn.Module, layers: Mapping[str, dict], stored: Mapping[str, tuple[tuple, torch.dtype | None]], source: str
) -> list[str]:
    """Checks that tensors of these names, shapes and dtypes (``stored``) and this layer list load into the
    model (a skeleton is enough); returns the tensor names the model needs. Raises CheckpointError naming
    ``source`` (the file or files) and the first problem: a layer the model lacks, a missing or extra tensor,
    a shape or dtype mismatch."""
    try:
        expected = _expected_tensors(model, layers)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if missing := expected.keys() - stored.keys():
        raise CheckpointError(f"{source}: missing tensor(s) {_listing(missing)} that the model needs")
    if extra := stored.keys() - expected.keys():
        raise CheckpointError(f"{source}: tensor(s) {_listing(extra)} match nothing in the model")
    for key, (shape, dtype) in expected.items():
        stored_shape, stored_dtype = stored[key]
        if stored_shape != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {stored_shape}, the model needs {shape}")
        if dtype is not None and stored_dtype != dtype:
            stored_name = _SAFETENSORS_NAMES.get(stored_dtype, stored_dtype)
            raise CheckpointError(f"{source}: tensor {key!r} is {stored_name}, expected {dtype}")
    return list(expected)


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _default_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def load_quantized(model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Loads a save_quantized file into a model skeleton in place; returns the model.

    The Linear layers the file lists become ConvLinear layers built directly
    from the stored codes (a skeleton on the meta device works, and no bf16
    weight is materialised); every other tensor of the model is replaced by
    the file's (``load_state_dict(assign=True)``: the file's dtypes win).
    ``device``: where the tensors go (default: the skeleton's device, CPU for
    a meta skeleton). The whole file is checked (format, version, layer
    list, tensor names and shapes, checksums) before the model is touched;
    any problem raises CheckpointError naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    header = read_header(path)
    names = check_layout(model, header.layers, header.tensors, path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensors = {}
            for key in names:
                tensor = handle.get_tensor(key)
                if header.checksums.get(key) != tensor_checksum(tensor):
                    raise CheckpointError(f"{path}: tensor {key!r} is corrupted (checksum mismatch)")
                if (
                    key.rpartition(".")[0] in header.layers
                    and key.endswith("weight_group_scale")
                    and not (1 <= int(tensor.min()) and int(tensor.max()) <= MAX_MULTIPLIER)
                ):
                    raise CheckpointError(f"{path}: tensor {key!r} holds multipliers outside [1, {MAX_MULTIPLIER}]")
                tensors[key] = tensor
    except SafetensorError as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None
    layers = header.layers

    for name, spec in layers.items():  # saves from before ConvLinear kept an fp32 bias hold it in bf16
        if spec["bias"]:
            bias = f"{name}.bias" if name else "bias"
            tensors[bias] = tensors[bias].float()
    device = torch.device(device) if device is not None else _default_device(model)
    with torch.no_grad():
        install_skeletons(model, layers)
        model.load_state_dict({key: tensor.to(device) for key, tensor in tensors.items()}, strict=True, assign=True)
    return model


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint file's header says, read without any tensor data."""

    layers: dict[str, dict]  # quantized layer name -> spec (kind, in_features, out_features, bias, ...)
    checksums: dict[str, int]  # tensor name -> CRC-32
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None]]  # tensor name -> stored (shape, dtype)
    metadata: dict[str, str]  # every metadata entry, the ones above included


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """The header of a save_quantized file, checked (format, version, each layer spec) without reading any
    tensor. Raises FileNotFoundError or CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            layers, checksums = _read_header(handle, path)
            tensors = {}
            for key in handle.keys():
                stored = handle.get_slice(key)
                tensors[key] = (tuple(stored.get_shape()), _SAFETENSORS_DTYPES.get(stored.get_dtype()))
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None
    return CheckpointHeader(layers, checksums, tensors, metadata)


def read_layer_specs(path: str | os.PathLike) -> dict[str, dict]:
    """The layer list of a save_quantized file: name -> {kind, in_features,
    out_features, bias, group_size, rotation, weight_bits, act_bits, weight_group_size},
    checked (format, version, each spec) without reading any tensor. Raises CheckpointError."""
    try:
        return read_header(path).layers
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None


def _check_file_length(path: str) -> None:
    """A file shorter than its safetensors header says (8-byte little-endian header length, JSON
    header, then the tensors' bytes at the header's data_offsets) is reported as truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, shorter than a safetensors header")
        header_length = int.from_bytes(prefix, "little")
        if 8 + header_length > size:
            raise CheckpointError(f"{path}: truncated: {size} bytes, its header alone claims {8 + header_length}")
        try:
            header = json.loads(f.read(header_length))
            tensors = [entry for key, entry in header.items() if key != "__metadata__"]
            data_end = max((entry["data_offsets"][1] for entry in tensors), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{path}: damaged safetensors header (not the JSON table of tensors)") from None
    expected = 8 + header_length + data_end
    if size < expected:
        raise CheckpointError(f"{path}: truncated: {size} of {expected} bytes ({expected - size} missing)")


def verify_checkpoint(path: str | os.PathLike) -> dict[str, dict]:
    """Checks a save_quantized file without a model: its length against its safetensors header,
    the format, version and layer list, and every tensor's CRC-32 (each tensor is read once).
    Returns the layer list (as read_layer_specs); raises CheckpointError saying what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    _check_file_length(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            layers, checksums = _read_header(handle, path)
            keys = set(handle.keys())
            if unlisted := keys - checksums.keys():
                raise CheckpointError(f"{path}: tensor(s) {_listing(unlisted)} have no checksum in the header")
            if absent := checksums.keys() - keys:
                raise CheckpointError(f"{path}: tensor(s) {_listing(absent)} have a checksum but are not in the file")
            corrupted = [key for key in sorted(keys) if checksums[key] != tensor_checksum(handle.get_tensor(key))]
    except SafetensorError as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None
    if corrupted:
        raise CheckpointError(
            f"{path}: {len(corrupted)} of {len(keys)} tensors corrupted (checksum mismatch): {_listing(corrupted)}"
        )
    return layers


def install_skeletons(model: nn.Module, layers: Mapping[str, dict]) -> None:
    """Replaces each listed layer of the model (by name) with an empty ConvLinear on
    the meta device, built from its spec (as read_layer_specs returns); layers that
    are ConvLinear already stay, and a layer shared under two names stays shared."""
    modules = dict(model.named_modules(remove_duplicate=False))
    replacements: dict[int, ConvLinear] = {}
    for name, spec in layers.items():
        module = modules[name]
        if isinstance(module, ConvLinear):
            continue
        if id(module) not in replacements:
            replacements[id(module)] = layer_for_kind(
                spec["kind"],
                spec["in_features"],
                spec["out_features"],
                bias=spec["bias"],
                group_size=spec["group_size"],
                rotation=spec["rotation"],
                device="meta",
            )
            if isinstance(module, nn.Linear):  # the model's float dtype, for what reads the layer's weight
                replacements[id(module)].float_dtype = module.weight.dtype
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(module)])
