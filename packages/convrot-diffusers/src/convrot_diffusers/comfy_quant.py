"""ComfyUI's ``comfy_quant`` single files: ConvRot checkpoints as ComfyUI and comfy-kitchen write them.

A file holds one transformer under its original tensor names (BFL's for Flux.1
and Flux.2, MMDiT's for SD3, Wan's for Wan 2.x; Qwen-Image's originals are
diffusers' own names), optionally prefixed ``model.diffusion_model.``. A quantized
Linear ``L`` is three tensors (docs/interop.md has the layout side by side
with ours):

  L.weight        int8 [N, K/2] (convrot_w4a4: two codes a byte, even column in the low nibble)
                  or int8 [N, K] (int8_tensorwise with "convrot": true)
  L.weight_scale  fp32 [N] (w4a4) or [N, 1] / [] (int8): per output row, or one for the tensor
  L.comfy_quant   uint8 bytes of JSON: {"format": "convrot_w4a4", "convrot_groupsize": 256}
                  or {"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}

the codes being those of W rotated group-wise along K (W·Hᵀ per group, H the
normalized regular Hadamard matrix, which is symmetric: our W R). The same
per-layer JSON may sit instead in the header's ``_quantization_metadata``
({"layers": {name: {...}}}). Scaled fp8 layers (``float8_e4m3fn`` /
``float8_e5m2``) are read too, dequantized to the model's dtype: the kernels
have no fp8 GEMM. Everything else is float and loads as it is.

``load_comfy`` builds the matching diffusers transformer with ConvLinear4bit /
ConvLinear8bit layers holding the file's codes and scales as they are (no
float copy of a quantized weight is made); ``save_comfy`` writes a
ConvRot-quantized transformer back in this format, under the original names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

import convrot
from convrot.hadamard import MAX_GROUP_SIZE, MIN_GROUP_SIZE, is_power_of_4

from .comfy_keys import (
    KeyMapError,
    OriginalFormat,
    Rows,
    diffusers_rows,
    format_for_class,
    format_for_keys,
    original_rows,
    strip_model_prefix,
)
from .weight_lookup import install_weight_lookup

W4A4_FORMAT = "convrot_w4a4"
INT8_FORMAT = "int8_tensorwise"
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}  # format -> its safetensors dtype
SUPPORTED_FORMATS = (W4A4_FORMAT, f'{INT8_FORMAT} with "convrot": true', *FP8_FORMATS)
DEFAULT_GROUP_SIZE = 256  # ComfyUI's value when a layer's JSON has no convrot_groupsize
QUANT_METADATA_KEY = "_quantization_metadata"

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_SCALE_DTYPES = ("F32", "F16", "BF16")


class ComfyQuantError(ValueError):
    """A ComfyUI file that cannot be loaded (or a model that cannot be written); nothing is changed."""


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer of a file: its format, and for ConvRot layers the rotation group size."""

    format: str  # W4A4_FORMAT, INT8_FORMAT or an FP8_FORMATS key
    group_size: int | None = None

    @property
    def kind(self) -> str | None:
        """The ConvLinear kind it loads as: "w4a4", "w8a8", or None (dequantized to float)."""
        return {W4A4_FORMAT: "w4a4", INT8_FORMAT: "w8a8"}.get(self.format)

    def to_json(self) -> dict:
        if self.format == W4A4_FORMAT:
            return {"format": W4A4_FORMAT, "convrot_groupsize": self.group_size}
        if self.format == INT8_FORMAT:
            return {"format": INT8_FORMAT, "convrot": True, "convrot_groupsize": self.group_size}
        return {"format": self.format}


@dataclass
class ComfyHeader:
    """What a file's safetensors header says, checked; no tensor data read."""

    path: str
    prefix: str  # "model.diffusion_model." or ""
    dtypes: dict[str, str]  # tensor name (without prefix) -> safetensors dtype
    shapes: dict[str, tuple[int, ...]]
    layers: dict[str, LayerQuant]  # layer name (without prefix) -> its quantization
    original: OriginalFormat = field(repr=False)

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """The float model's shapes: a packed int4 weight [N, K/2] counts as [N, K]; no scales or JSON."""
        shapes = {}
        for name, shape in self.shapes.items():
            layer = name.rpartition(".")[0]
            if layer in self.layers and name != f"{layer}.weight" and name != f"{layer}.bias":
                continue
            if layer in self.layers and name == f"{layer}.weight" and self.layers[layer].format == W4A4_FORMAT:
                shape = (shape[0], 2 * shape[1])
            shapes[name] = shape
        return shapes


def _field(conf: Mapping, name: str, default):
    params = conf.get("params")
    return conf.get(name, params.get(name, default) if isinstance(params, Mapping) else default)


def _layer_quant(name: str, conf) -> LayerQuant:
    """A layer's JSON as ComfyUI's loader reads it (fields at the top or under "params"), checked."""
    if not isinstance(conf, Mapping) or not isinstance(conf.get("format"), str):
        raise ComfyQuantError(f"layer {name!r}: comfy_quant must be a JSON object with a 'format', got {conf!r}")
    fmt = conf["format"]
    if fmt in FP8_FORMATS:
        return LayerQuant(fmt)
    rotated = fmt == W4A4_FORMAT or (fmt == INT8_FORMAT and _field(conf, "convrot", False) is True)
    if not rotated:
        what = f'{fmt!r} without "convrot": true (unrotated int8)' if fmt == INT8_FORMAT else repr(fmt)
        raise ComfyQuantError(
            f"layer {name!r}: comfy_quant field 'format' is {what}, which this loader cannot run; "
            f"supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    group = _field(conf, "convrot_groupsize", DEFAULT_GROUP_SIZE)
    if not (isinstance(group, int) and not isinstance(group, bool) and is_power_of_4(group)):
        raise ComfyQuantError(
            f"layer {name!r}: comfy_quant field 'convrot_groupsize' is {group!r}, not a power of 4 "
            "(the regular Hadamard rotation exists only for 4, 16, 64, 256, 1024, ...)"
        )
    if not MIN_GROUP_SIZE <= group <= MAX_GROUP_SIZE:
        raise ComfyQuantError(
            f"layer {name!r}: comfy_quant field 'convrot_groupsize' is {group}; the kernels rotate groups of "
            f"{MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}"
        )
    linear_dtype = _field(conf, "linear_dtype", "int4")
    if fmt == W4A4_FORMAT and linear_dtype not in ("int4", "int8"):
        # "int8" only tells ComfyUI to run the same int4 codes through an int8 GEMM: same numbers.
        raise ComfyQuantError(f"layer {name!r}: comfy_quant field 'linear_dtype' is {linear_dtype!r}, not int4/int8")
    return LayerQuant(fmt, group)


def _decode_json(name: str, raw) -> object:
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise ComfyQuantError(f"{name}: not valid JSON ({error})") from None


def read_header(path: str | os.PathLike) -> ComfyHeader:
    """Reads and checks a ComfyUI file's header and per-layer JSON (no weights). Raises ComfyQuantError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return _read_header(handle, path)
    except SafetensorError as error:
        raise ComfyQuantError(f"{path}: unreadable safetensors file, truncated or corrupted ({error})") from None


def _read_header(handle, path: str) -> ComfyHeader:
    try:
        prefix, names = strip_model_prefix(handle.keys())
    except KeyMapError as error:
        raise ComfyQuantError(f"{path}: {error}") from None
    dtypes, shapes = {}, {}
    for name in names:
        stored = handle.get_slice(prefix + name)
        dtypes[name], shapes[name] = stored.get_dtype(), tuple(stored.get_shape())
    configs: dict[str, object] = {}
    metadata = handle.metadata() or {}
    if QUANT_METADATA_KEY in metadata:
        parsed = _decode_json(f"{path}: header field {QUANT_METADATA_KEY!r}", metadata[QUANT_METADATA_KEY].encode())
        if not isinstance(parsed, dict) or not isinstance(parsed.get("layers"), dict):
            raise ComfyQuantError(f"{path}: header field {QUANT_METADATA_KEY!r} has no 'layers' object")
        for layer, conf in parsed["layers"].items():
            configs[layer[len(prefix) :] if prefix and layer.startswith(prefix) else layer] = conf
    for name in names:
        if name.endswith(".comfy_quant"):
            layer = name[: -len(".comfy_quant")]
            if dtypes[name] != "U8" or len(shapes[name]) != 1:
                raise ComfyQuantError(f"{path}: tensor {name!r} must be uint8 bytes of JSON")
            conf = _decode_json(f"{path}: tensor {name!r}", handle.get_tensor(prefix + name).tolist())
            if layer in configs and configs[layer] != conf:
                raise ComfyQuantError(
                    f"{path}: layer {layer!r}: its comfy_quant tensor and {QUANT_METADATA_KEY!r} disagree "
                    f"({conf!r} vs {configs[layer]!r})"
                )
            configs[layer] = conf
    layers = {layer: _layer_quant(layer, conf) for layer, conf in configs.items()}
    try:
        original = format_for_keys(names)
    except KeyMapError as error:
        raise ComfyQuantError(f"{path}: {error}") from None
    header = ComfyHeader(path, prefix, dtypes, shapes, layers, original)
    _check_layer_tensors(header)
    return header


def _check_layer_tensors(header: ComfyHeader) -> None:
    """Each quantized layer's tensors are there, with the dtypes and shapes of its format."""
    dtypes, shapes, where = header.dtypes, header.shapes, header.path
    for layer, quant in header.layers.items():
        weight, scale = f"{layer}.weight", f"{layer}.weight_scale"
        for name in (weight, scale):
            if name not in shapes:
                raise ComfyQuantError(f"{where}: layer {layer!r} ({quant.format}) has no tensor {name!r}")
        w_shape, s_shape = shapes[weight], shapes[scale]
        if quant.format in FP8_FORMATS:
            expected_dtype = FP8_FORMATS[quant.format]
            if dtypes[weight] != expected_dtype or len(w_shape) != 2:
                raise ComfyQuantError(f"{where}: tensor {weight!r} must be a 2-D {expected_dtype} for {quant.format}")
        elif dtypes[weight] not in ("I8", "U8") or len(w_shape) != 2:
            raise ComfyQuantError(
                f"{where}: tensor {weight!r} is {dtypes[weight]} {list(w_shape)}; {quant.format} stores 2-D int8 codes"
            )
        if dtypes[scale] not in _SCALE_DTYPES:
            raise ComfyQuantError(f"{where}: tensor {scale!r} is {dtypes[scale]}, expected a float scale")
        rows = w_shape[0]
        per_row = s_shape in ((rows,), (rows, 1))
        per_tensor = math.prod(s_shape) == 1
        if not (per_row or (per_tensor and quant.format != W4A4_FORMAT)):
            allowed = f"[{rows}]" if quant.format == W4A4_FORMAT else f"[{rows}], [{rows}, 1] or one value"
            raise ComfyQuantError(
                f"{where}: tensor {scale!r} has shape {list(s_shape)}; {weight!r} has {rows} rows, "
                f"so it must be {allowed}"
            )
        if quant.group_size is not None:
            k = w_shape[1] * (2 if quant.format == W4A4_FORMAT else 1)
            if k % quant.group_size:
                raise ComfyQuantError(
                    f"{where}: layer {layer!r}: in_features {k} is not a multiple of "
                    f"convrot_groupsize {quant.group_size}"
                )
    for name in header.shapes:
        layer, _, tensor = name.rpartition(".")
        if tensor in ("weight_scale", "comfy_quant") and layer not in header.layers:
            raise ComfyQuantError(f"{where}: tensor {name!r} belongs to no quantized layer")
        if layer in header.layers and tensor not in ("weight", "weight_scale", "comfy_quant", "bias", "input_scale"):
            raise ComfyQuantError(f"{where}: tensor {name!r} is not part of a {header.layers[layer].format} layer")
        if layer in header.layers and tensor == "input_scale" and header.layers[layer].format not in FP8_FORMATS:
            raise ComfyQuantError(f"{where}: tensor {name!r}: {header.layers[layer].format} layers have no input scale")
        if layer not in header.layers and header.dtypes[name] not in _FLOAT_DTYPES:
            raise ComfyQuantError(
                f"{where}: tensor {name!r} is {header.dtypes[name]} but no comfy_quant entry says how to read it"
            )


def is_comfy_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with ComfyUI quantization (comfy_quant tensors or header)."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            return QUANT_METADATA_KEY in (handle.metadata() or {}) or any(
                k.endswith(".comfy_quant") for k in handle.keys()
            )
    except (SafetensorError, OSError):
        return False


def read_config(path_or_id: str | os.PathLike) -> dict:
    """A diffusers transformer config: a config.json, a directory holding one (or a pipeline directory's
    transformer/config.json), or a hub id (its transformer/config.json)."""
    path = os.path.expanduser(os.fspath(path_or_id))
    candidates = [path] if path.endswith(".json") else [os.path.join(path, "config.json")]
    candidates.append(os.path.join(path, "transformer", "config.json"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate) as handle:
                return json.load(handle)
    if not os.path.exists(path) and len(str(path_or_id).split("/")) == 2:  # a hub id: its transformer's config
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(str(path_or_id), "config.json", subfolder="transformer")) as handle:
            return json.load(handle)
    raise FileNotFoundError(f"no diffusers transformer config at {path_or_id} (looked for config.json)")


@dataclass
class _Plan:
    """Which file rows make each tensor of the diffusers model, checked against the model."""

    sources: dict[str, list[Rows]]  # diffusers tensor -> runs of file rows
    layers: dict[str, LayerQuant]  # diffusers Linear -> the quantization of its file rows


def _plan(header: ComfyHeader, model: torch.nn.Module) -> _Plan:
    logical = header.logical_shapes()
    rows = {name: (shape[0] if shape else 1) for name, shape in logical.items()}
    try:
        sources = diffusers_rows(header.original, rows)
    except KeyMapError as error:
        raise ComfyQuantError(f"{header.path}: {error}") from None
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if missing := sorted(expected.keys() - sources.keys()):
        raise ComfyQuantError(f"{header.path}: no tensor of the file gives {missing[:5]} of the model")
    if extra := sorted(sources.keys() - expected.keys()):
        raise ComfyQuantError(f"{header.path}: diffusers names {extra[:5]} from the file match nothing in the model")
    modules = dict(model.named_modules())
    layers: dict[str, LayerQuant] = {}
    for key, runs in sources.items():
        file_layers = {run.key.rpartition(".")[0] for run in runs}
        quants = {header.layers.get(layer) for layer in file_layers} if key.endswith(".weight") else {None}
        file_names = ", ".join(sorted({run.key for run in runs}))
        if len(quants) > 1:
            raise ComfyQuantError(f"{header.path}: the model's {key!r} is made of {file_names}, stored differently")
        quant = quants.pop()
        module_name = key.rpartition(".")[0]
        trailing = {logical[run.key][1:] for run in runs}
        shape = (sum(run.stop - run.start for run in runs), *trailing.pop()) if len(trailing) == 1 else None
        if shape != expected[key] and not (expected[key] == () and shape == (1,)):
            raise ComfyQuantError(
                f"{header.path}: tensor(s) {file_names} give {key!r} the shape {list(shape or ())}; "
                f"the {type(model).__name__} of this config needs {list(expected[key])}"
            )
        if quant is not None and quant.kind is not None:
            if not isinstance(modules.get(module_name), torch.nn.Linear):
                raise ComfyQuantError(f"{header.path}: quantized {file_names} feeds {key!r}, which is not a Linear")
            layers[module_name] = quant
        elif quant is not None:  # fp8: dequantized, so a float tensor of the model
            layers[module_name] = quant
    return _Plan(sources, layers)


def _gather(handle, prefix: str, runs: list[Rows], transform=None) -> torch.Tensor:
    pieces = []
    for run in runs:
        piece = handle.get_slice(prefix + run.key)[run.start : run.stop]
        pieces.append(transform(run, piece) if transform else piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _scale_rows(handle, prefix: str, run: Rows) -> torch.Tensor:
    """fp32 scales of rows [start, stop) of a layer's weight (a per-tensor scale repeated)."""
    name = f"{run.key.rpartition('.')[0]}.weight_scale"
    stored = handle.get_slice(prefix + name)
    if math.prod(stored.get_shape()) == 1:
        return handle.get_tensor(prefix + name).reshape(()).float().expand(run.stop - run.start).clone()
    return stored[run.start : run.stop].reshape(-1).float()


def load_comfy(
    path: str | os.PathLike,
    config: Mapping | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = False,
):
    """The diffusers transformer of a ComfyUI ConvRot file, its quantized layers as ConvLinear4bit/8bit.

    ``config``: the transformer's diffusers config (a dict, e.g. ``read_config(dir)``); None infers it
    from the file's names and shapes where that is unambiguous. The header, every layer's JSON and every
    shape are checked against the architecture before any weight is read; codes and scales go into the
    layers as stored (int8 nibbles viewed as our uint8 packing), float tensors are cast to ``dtype``
    (None: kept as stored), scaled fp8 weights dequantized to it. Raises ComfyQuantError.
    """
    import diffusers
    from accelerate import init_empty_weights

    header = read_header(path)
    if config is None:
        try:
            config = header.original.infer_config(header.logical_shapes())
        except KeyMapError as error:
            raise ComfyQuantError(f"{header.path}: {error}") from None
        except (KeyError, IndexError, ValueError) as error:
            raise ComfyQuantError(
                f"{header.path}: cannot infer the {header.original.transformer_class} config from the file "
                f"({type(error).__name__}: {error}); pass its diffusers config"
            ) from None
    config = {k: v for k, v in dict(config).items() if k != "quantization_config"}
    class_name = config.get("_class_name", header.original.transformer_class)
    if class_name != header.original.transformer_class:
        raise ComfyQuantError(
            f"{header.path}: the file is a {header.original.transformer_class} checkpoint, the config a {class_name}"
        )
    with init_empty_weights(include_buffers=False):
        transformer = getattr(diffusers, class_name).from_config(config)
    plan = _plan(header, transformer)
    convrot_layers = {name: quant for name, quant in plan.layers.items() if quant.kind is not None}
    modules = dict(transformer.named_modules())
    specs = {}
    for name, quant in convrot_layers.items():
        linear = modules[name]
        try:
            group = convrot.resolve_group_size(linear.in_features, quant.group_size)
        except ValueError as error:
            raise ComfyQuantError(f"{header.path}: layer {name!r}: {error}") from None
        if group != quant.group_size:
            raise ComfyQuantError(
                f"{header.path}: layer {name!r}: convrot_groupsize {quant.group_size} does not divide "
                f"in_features {linear.in_features}"
            )
        specs[name] = {
            "kind": quant.kind,
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bias": linear.bias is not None,
            "group_size": group,
            "rotation": "regular",
        }

    device = torch.device(device)
    shapes = {key: t.shape for key, t in transformer.state_dict().items()}
    tensors = {}
    try:
        with safe_open(header.path, framework="pt", device="cpu") as handle:
            for key, runs in tqdm(plan.sources.items(), desc="convrot: reading", unit="tensor", disable=not progress):
                module_name, _, tensor_name = key.rpartition(".")
                quant = plan.layers.get(module_name)
                if quant is not None and tensor_name == "weight" and quant.kind is not None:
                    codes = _gather(handle, header.prefix, runs)
                    if quant.kind == "w4a4":
                        codes = codes.view(torch.uint8)  # the same bytes: comfy-kitchen keeps them as int8
                    else:
                        codes = codes.view(torch.int8)
                    tensors[f"{module_name}.qweight"] = codes.to(device)
                    scales = [_scale_rows(handle, header.prefix, run) for run in runs]
                    tensors[f"{module_name}.weight_scale"] = torch.cat(scales).to(device)
                    continue
                if quant is not None and tensor_name == "weight":  # scaled fp8, dequantized

                    def dequantize(run, piece):
                        return piece.float() * _scale_rows(handle, header.prefix, run).unsqueeze(-1)

                    value = _gather(handle, header.prefix, runs, dequantize)
                else:
                    value = _gather(handle, header.prefix, runs)
                if module_name in convrot_layers and tensor_name == "bias":
                    value = value.float()  # the GEMM epilogue's operand
                elif dtype is not None:
                    value = value.to(dtype)
                tensors[key] = value.reshape(shapes[key]).to(device)
    except SafetensorError as error:
        raise ComfyQuantError(f"{header.path}: unreadable tensor data, truncated or corrupted ({error})") from None
    with torch.no_grad():
        convrot.install_skeletons(transformer, specs)
        transformer.load_state_dict(tensors, strict=True, assign=True)
    install_weight_lookup(transformer)  # diffusers' Flux.1 LoRA loader looks layers' weights up by name
    return transformer.eval()


def _layer_name(key: str) -> str:
    return key.rpartition(".")[0]


def save_comfy(transformer, path: str | os.PathLike, progress: bool = True) -> None:
    """Writes a ConvRot-quantized diffusers transformer as a ComfyUI file, under the original names.

    ConvLinear4bit layers become ``convrot_w4a4``, ConvLinear8bit ``int8_tensorwise`` with
    ``"convrot": true``; every layer's JSON is written both as its ``comfy_quant`` tensor and in the
    header's ``_quantization_metadata``. An original tensor that fuses several diffusers layers
    (Flux's qkv and linear1) must have them all quantized alike. Written beside ``path`` and renamed.
    """
    from .detect import is_preset_class
    from .fusion import fuse_qkv_projections, unfuse_qkv_projections

    original = format_for_class(type(transformer).__name__)
    # Only the preset architectures have fusions of ours; other DiTs are saved as they are.
    fused = unfuse_qkv_projections(transformer) if is_preset_class(type(transformer).__name__) else 0
    try:
        tensors, layers = _original_tensors(transformer, original, progress)
    finally:
        if fused:
            fuse_qkv_projections(transformer)
    metadata = {QUANT_METADATA_KEY: json.dumps({"format_version": "1.0", "layers": layers})}
    convrot.checkpoint.write_safetensors(tensors, path, metadata)


def _original_tensors(transformer, original: OriginalFormat, progress: bool):
    modules = dict(transformer.named_modules())
    state = transformer.state_dict()
    logical: dict[str, tuple] = {}
    for key, tensor in state.items():
        module = modules.get(_layer_name(key))
        if isinstance(module, convrot.ConvLinear):
            if key.endswith(".qweight"):
                logical[f"{_layer_name(key)}.weight"] = (module.out_features, module.in_features)
            elif key.endswith(".bias"):
                logical[key] = tuple(tensor.shape)
        else:
            logical[key] = tuple(tensor.shape)
    try:
        _, inverse = original_rows(original, transformer.config, logical)
    except KeyMapError as error:
        raise ComfyQuantError(str(error)) from None
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, pieces in tqdm(inverse.items(), desc="convrot: writing", unit="tensor", disable=not progress):
        parts = [modules[_layer_name(key)] for key, _, _ in pieces]
        quantized = [isinstance(part, convrot.ConvLinear) for part in parts]
        if name.endswith(".weight") and any(quantized):
            kinds = {
                _layer_name(key): (
                    type(part).__name__,
                    getattr(part, "group_size", None),
                    getattr(part, "rotation", None),
                )
                for (key, _, _), part in zip(pieces, parts, strict=True)
            }
            if not all(quantized) or len(set(kinds.values())) > 1:
                described = ", ".join(
                    f"{layer} ({kind[0] if kind[1] is None else f'{kind[0]}, group {kind[1]}'})"
                    for layer, kind in kinds.items()
                )
                raise ComfyQuantError(
                    f"{name} is one tensor in ComfyUI's layout made of {described}: they must be quantized alike "
                    "(e.g. preset 'w4a4', or a policy giving them one kind)"
                )
            first = parts[0]
            if first.rotation != "regular":
                raise ComfyQuantError(f"{name}: rotation {first.rotation!r}; ComfyUI's layers use the regular one")
            codes = torch.cat(
                [part.qweight[rows.start : rows.stop] for (_, rows, _), part in zip(pieces, parts, strict=True)]
            )
            scales = torch.cat(
                [part.weight_scale[rows.start : rows.stop] for (_, rows, _), part in zip(pieces, parts, strict=True)]
            )
            layer = _layer_name(name)
            quant = LayerQuant(W4A4_FORMAT if first.bits == 4 else INT8_FORMAT, first.group_size)
            tensors[name] = codes.detach().cpu().contiguous().view(torch.int8)
            scales = scales.detach().float().cpu()
            tensors[f"{layer}.weight_scale"] = (scales if first.bits == 4 else scales.unsqueeze(-1)).contiguous()
            conf = quant.to_json()
            tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
            layers[layer] = conf
            continue
        values = [state[key][rows.start : rows.stop] if state[key].dim() else state[key] for key, rows, _ in pieces]
        value = values[0] if len(values) == 1 else torch.cat(values)
        tensors[name] = value.detach().cpu().clone().contiguous()
    return tensors, layers


@dataclass
class ComfySummary:
    path: str
    transformer_class: str
    prefix: str
    file_bytes: int
    bf16_bytes: int  # the same transformer with every weight in bf16
    formats: dict[str, int]  # format -> number of layers
    group_sizes: dict[int, int]  # group size -> number of ConvRot layers
    parameters: dict[str, int]  # format (or "float") -> number of weights

    @property
    def ratio(self) -> float:
        return self.bf16_bytes / self.file_bytes


def describe_comfy(path: str | os.PathLike) -> ComfySummary:
    """What a ComfyUI file holds, from its header alone (checked as load_comfy checks it)."""
    header = read_header(path)
    formats: dict[str, int] = {}
    groups: dict[int, int] = {}
    parameters: dict[str, int] = {"float": 0}
    for quant in header.layers.values():
        formats[quant.format] = formats.get(quant.format, 0) + 1
        if quant.group_size is not None:
            groups[quant.group_size] = groups.get(quant.group_size, 0) + 1
    for name, shape in header.logical_shapes().items():
        quant = header.layers.get(_layer_name(name)) if name.endswith(".weight") else None
        kind = quant.format if quant is not None else "float"
        parameters[kind] = parameters.get(kind, 0) + math.prod(shape)
    return ComfySummary(
        path=header.path,
        transformer_class=header.original.transformer_class,
        prefix=header.prefix,
        file_bytes=os.path.getsize(header.path),
        bf16_bytes=2 * sum(parameters.values()),
        formats=formats,
        group_sizes=groups,
        parameters=parameters,
    )
