"""Saving and loading a quantized transformer as a directory.

Layout (also what ``<Transformer>.from_pretrained(directory)`` reads, see diffusers_integration.py):
  config.json                         the transformer's diffusers config, with ``quantization_config``
                                      = ConvRotConfig (preset, group size, rotation, base model, versions)
  diffusion_pytorch_model.safetensors convrot-core's checkpoint: packed codes, fp32 scales and biases, bf16 rest,
                                      and a header listing every quantized layer
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors import safe_open

import convrot

from .detect import architecture_for_class, transformer_of
from .diffusers_integration import QUANT_METHOD, ConvRotConfig
from .fusion import fuse_qkv_projections, unfuse_qkv_projections

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class NotAQuantizedSaveError(ValueError):
    """The directory is not a convrot-diffusers save."""


def save_quantized(pipe_or_transformer, directory: str | os.PathLike) -> Path:
    """Writes the quantized transformer of a pipeline (or the transformer itself) to ``directory``.

    Fused q/k/v projections (fuse_qkv_projections) are saved as separate layers.
    """
    transformer = transformer_of(pipe_or_transformer)
    config = getattr(transformer.config, "quantization_config", None)
    if not isinstance(config, ConvRotConfig):
        raise ValueError("the transformer is not quantized: call quantize_pipeline (or quantize_transformer) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A save holds the separate q/k/v layers, which a fresh transformer of the config has.
    fused = unfuse_qkv_projections(transformer)
    try:
        convrot.save_quantized(transformer, directory / WEIGHTS_NAME)
    finally:
        if fused:
            fuse_qkv_projections(transformer)
    transformer.save_config(directory)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The transformer config of a save (with its ``quantization_config`` as a dict)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise NotAQuantizedSaveError(f"{directory}: no {CONFIG_NAME}, not a convrot-diffusers save")
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != QUANT_METHOD:
        raise NotAQuantizedSaveError(f"{directory}: {CONFIG_NAME} has no ConvRot quantization_config")
    return config


def is_quantized_save(directory: str | os.PathLike) -> bool:
    try:
        read_config(directory)
    except (NotAQuantizedSaveError, json.JSONDecodeError):
        return False
    return True


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.bfloat16):
    """Rebuilds a quantized transformer from a save_quantized directory.

    The transformer is built on the meta device, its Linear layers are replaced
    by ConvLinear layers from the stored codes, and every tensor is read once
    onto ``device``: no bf16 weight of a quantized layer is ever materialised.
    Non-quantized tensors are cast to ``dtype``. Assemble a pipeline with
    ``Pipeline.from_pretrained(base_model, transformer=loaded)``.
    """
    config = read_config(directory)
    transformer_class = getattr(diffusers, config["_class_name"])
    architecture_for_class(config["_class_name"])
    quantization = ConvRotConfig.from_dict(config.pop("quantization_config"))
    # Parameters on the meta device; buffers (rotary tables, position embeddings) are small and
    # some are not in the state dict, so they are built for real, as diffusers does.
    with init_empty_weights(include_buffers=False):
        transformer = transformer_class.from_config(config)
    convrot.load_quantized(transformer, Path(directory) / WEIGHTS_NAME, device=device)
    # torch's own .to: the scales stay fp32 (ConvLinear._apply), codes are integers; diffusers'
    # override would warn about float32 modules even when there are none.
    torch.nn.Module.to(transformer, device=device, dtype=dtype)
    transformer.register_to_config(quantization_config=quantization)
    return transformer.eval()


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
    """Size and layer counts of a save, read from the config and the safetensors header only."""
    config = read_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise NotAQuantizedSaveError(f"{directory}: no {WEIGHTS_NAME}")
    with safe_open(path, framework="pt") as handle:
        layers = json.loads((handle.metadata() or {}).get("layers", "{}"))
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
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
        file_bytes=path.stat().st_size,
        bf16_bytes=2 * sum(parameters.values()),
        layers=counts,
        parameters=parameters,
    )
