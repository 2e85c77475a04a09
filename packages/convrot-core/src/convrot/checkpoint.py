"""Quantized checkpoints: one safetensors file holding the whole model.

Tensors: the model's state dict, in which each ConvLinear contributes
``<name>.qweight``, ``<name>.weight_scale`` and ``<name>.bias``, and every
other module (skipped Linear layers, norms, embeddings) its usual tensors.
Header metadata (all strings, safetensors' rule):
  format          "convrot"
  format_version  "1"
  layers          JSON {module name: {kind, in_features, out_features, bias, group_size, rotation}}
  checksums       JSON {tensor name: CRC-32 of its bytes}, which catches corrupted data
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .hadamard import ROTATIONS, resolve_group_size
from .linear import ConvLinear, ConvLinear4bit, ConvLinear8bit
from .model import is_convertible_linear

FORMAT_NAME = "convrot"
FORMAT_VERSION = 1
KIND_CLASSES = {"w4a4": ConvLinear4bit, "w8a8": ConvLinear8bit}
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the model is left unchanged."""


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


def _layer_spec(layer: ConvLinear) -> dict:
    return {
        "kind": "w4a4" if layer.bits == 4 else "w8a8",
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "group_size": layer.group_size,
        "rotation": layer.rotation,
    }


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the model (quantized layers and everything else) to one safetensors file.

    Written to a temporary file beside ``path`` and renamed, so an
    interrupted save never leaves a truncated checkpoint under ``path``.
    """
    layers = {
        name: _layer_spec(module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, ConvLinear)
    }
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
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers),
        "checksums": json.dumps({key: _crc32(tensor) for key, tensor in tensors.items()}),
    }
    path = os.fspath(path)
    partial = f"{path}.partial"
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _check_layer_spec(name: str, spec) -> None:
    fields = {"kind": str, "in_features": int, "out_features": int, "bias": bool, "group_size": int, "rotation": str}
    if not isinstance(spec, dict) or set(spec) != set(fields):
        raise CheckpointError(f"layer {name!r}: metadata must have exactly the fields {sorted(fields)}, got {spec!r}")
    for field, kind in fields.items():
        if type(spec[field]) is not kind:
            raise CheckpointError(
                f"layer {name!r}: metadata field {field!r} must be {kind.__name__}, got {spec[field]!r}"
            )
    if spec["kind"] not in KIND_CLASSES:
        raise CheckpointError(f"layer {name!r}: unknown kind {spec['kind']!r}, expected one of {sorted(KIND_CLASSES)}")
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
    for name, spec in layers.items():
        _check_layer_spec(name, spec)
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
        if spec["kind"] == "w4a4":
            expected[prefix + "qweight"] = ((n, k // 2), torch.uint8)
        else:
            expected[prefix + "qweight"] = ((n, k), torch.int8)
        expected[prefix + "weight_scale"] = ((n,), torch.float32)
        if spec["bias"]:
            expected[prefix + "bias"] = ((n,), None)
    return expected


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
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            layers, checksums = _read_header(handle, path)
            expected = _expected_tensors(model, layers)
            found = set(handle.keys())
            if missing := expected.keys() - found:
                raise CheckpointError(f"{path}: missing tensor(s) {_listing(missing)} that the model needs")
            if extra := found - expected.keys():
                raise CheckpointError(f"{path}: tensor(s) {_listing(extra)} match nothing in the model")
            for key, (shape, dtype) in expected.items():
                stored = handle.get_slice(key)
                stored_shape, stored_dtype = tuple(stored.get_shape()), _SAFETENSORS_DTYPES.get(stored.get_dtype())
                if stored_shape != shape:
                    raise CheckpointError(f"{path}: tensor {key!r} has shape {stored_shape}, the model needs {shape}")
                if dtype is not None and stored_dtype != dtype:
                    raise CheckpointError(f"{path}: tensor {key!r} is {stored.get_dtype()}, expected {dtype}")
            tensors = {}
            for key in expected:
                tensor = handle.get_tensor(key)
                if checksums.get(key) != _crc32(tensor):
                    raise CheckpointError(f"{path}: tensor {key!r} is corrupted (checksum mismatch)")
                tensors[key] = tensor
    except SafetensorError as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None

    for name, spec in layers.items():  # saves from before ConvLinear kept an fp32 bias hold it in bf16
        if spec["bias"]:
            bias = f"{name}.bias" if name else "bias"
            tensors[bias] = tensors[bias].float()
    device = torch.device(device) if device is not None else _default_device(model)
    with torch.no_grad():
        install_skeletons(model, layers)
        model.load_state_dict({key: tensor.to(device) for key, tensor in tensors.items()}, strict=True, assign=True)
    return model


def read_layer_specs(path: str | os.PathLike) -> dict[str, dict]:
    """The layer list of a save_quantized file: name -> {kind, in_features,
    out_features, bias, group_size, rotation}, checked (format, version, each
    spec) without reading any tensor. Raises CheckpointError."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as handle:
            layers, _ = _read_header(handle, path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None
    return layers


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
            corrupted = [key for key in sorted(keys) if checksums[key] != _crc32(handle.get_tensor(key))]
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
            replacements[id(module)] = KIND_CLASSES[spec["kind"]](
                spec["in_features"],
                spec["out_features"],
                bias=spec["bias"],
                group_size=spec["group_size"],
                rotation=spec["rotation"],
                device="meta",
            )
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(module)])
