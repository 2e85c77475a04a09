"""Saving and loading a quantized transformer as a directory: thin wrappers of diffusers' own
``save_pretrained`` / ``from_pretrained`` (the ConvRot quantizer, diffusers_integration.py, does the work).

Layout (what ``transformer.save_pretrained(directory)`` writes and ``<Transformer>.from_pretrained`` reads):
  config.json                         the transformer's diffusers config, with ``quantization_config``
                                      = ConvRotConfig (preset, group size, rotation, base model, versions)
  diffusion_pytorch_model.safetensors convrot-core's checkpoint: packed codes, fp32 scales and biases, the rest
                                      as saved, and a header listing every quantized layer with checksums
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

import convrot

from .detect import check_diffusers_transformer_class, denoiser_of
from .diffusers_integration import QUANT_METHOD, ConvRotQuantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class NotAQuantizedSaveError(ValueError):
    """The directory is not a convrot-diffusers save."""


def save_quantized(pipe_or_transformer, directory: str | os.PathLike) -> Path:
    """Writes the quantized transformer of a pipeline (or the transformer itself) to ``directory``:
    ``transformer.save_pretrained(directory)``. Fused q/k/v projections are saved as separate layers."""
    transformer = denoiser_of(pipe_or_transformer)
    if not isinstance(getattr(transformer, "hf_quantizer", None), ConvRotQuantizer):
        raise ValueError("the transformer is not quantized: call quantize_pipeline (or quantize_transformer) first")
    transformer.save_pretrained(directory)
    return Path(directory)


def read_config(directory: str | os.PathLike) -> dict:
    """The transformer config of a save (with its ``quantization_config`` as a dict)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise NotAQuantizedSaveError(f"{directory}: no {CONFIG_NAME}, not a convrot-diffusers save")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAQuantizedSaveError(f"{path}: not a JSON file ({error})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise NotAQuantizedSaveError(f"{directory}: {CONFIG_NAME} has no ConvRot quantization_config")
    return config


def is_quantized_save(directory: str | os.PathLike) -> bool:
    try:
        read_config(directory)
    except NotAQuantizedSaveError:
        return False
    return True


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a save: one, or the shards its index lists."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise convrot.CheckpointError(f"{index}: damaged shard index ({type(error).__name__}: {error})") from None
        return [directory / name for name in names]
    if not (directory / WEIGHTS_NAME).is_file():
        raise NotAQuantizedSaveError(f"{directory}: no {WEIGHTS_NAME}")
    return [directory / WEIGHTS_NAME]


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``<Transformer>.from_pretrained(directory, torch_dtype=dtype)`` of a save, on ``device``.

    The transformer is built on the meta device, its Linear layers are replaced by ConvLinear layers from the
    stored codes, and every tensor is read once, its checksum checked: no bf16 weight of a quantized layer is
    ever materialised. ``dtype``: of the non-quantized tensors (None: as saved). Each file's header is checked
    first, so a truncated or foreign file is named before anything loads. Assemble a pipeline with
    ``Pipeline.from_pretrained(base_model, transformer=loaded)``.
    """
    config = read_config(directory)
    check_diffusers_transformer_class(config.get("_class_name"))
    for path in weight_files(directory):
        convrot.read_header(path)
    transformer_class = getattr(diffusers, config["_class_name"])
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = str(device)
    return transformer_class.from_pretrained(directory, **kwargs).eval()


@dataclass
class SaveSummary:
    config: dict
    file_bytes: int
    bf16_bytes: int  # the same transformer with every weight in bf16
    layers: dict[str, int]  # kind -> number of quantized Linear layers
    parameters: dict[str, int]  # kind ("w4a4", "w8a8", "w4a8", ..., "bf16") -> number of weights

    @property
    def ratio(self) -> float:
        return self.bf16_bytes / self.file_bytes


def describe(directory: str | os.PathLike) -> SaveSummary:
    """Size and layer counts of a save (one file or shards), read from the config and the headers only."""
    config = read_config(directory)
    paths = weight_files(directory)
    layers, shapes = {}, {}
    for path in paths:
        header = convrot.read_header(path)
        layers.update(header.layers)
        shapes.update({key: shape for key, (shape, _) in header.tensors.items()})
    counts: dict[str, int] = {}
    parameters = {"w4a4": 0, "w8a8": 0, "bf16": 0}
    quantized_tensors = set()
    for name, spec in layers.items():
        counts[spec["kind"]] = counts.get(spec["kind"], 0) + 1
        parameters[spec["kind"]] = parameters.get(spec["kind"], 0) + spec["in_features"] * spec["out_features"]
        quantized_tensors.update({f"{name}.qweight", f"{name}.weight_scale", f"{name}.weight_group_scale"})
    for key, shape in shapes.items():
        if key not in quantized_tensors:
            parameters["bf16"] += math.prod(shape)
    return SaveSummary(
        config=config,
        file_bytes=sum(path.stat().st_size for path in paths),
        bf16_bytes=2 * sum(parameters.values()),
        layers=counts,
        parameters=parameters,
    )
