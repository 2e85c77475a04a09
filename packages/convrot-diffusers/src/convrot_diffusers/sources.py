"""Where the CLI's MODEL comes from: the embedded demo, a quantized save, a local pipeline or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import is_quantized_save, load_quantized, read_config
from .demo import DEMO_PREFIX, DEMOS, demo_name, demo_pipeline, is_demo
from .detect import check_diffusers_transformer_class
from .diffusers_integration import ConvRotConfig
from .pipeline import quantize_pipeline


class SourceError(Exception):
    """A model that cannot be loaded; the message is one line for the user."""


@dataclass
class LoadedPipeline:
    pipe: Any
    description: str
    demo: bool
    call_kwargs: dict[str, Any] = field(default_factory=dict)


def _check_local_or_hub(model: str) -> None:
    if os.path.exists(os.path.expanduser(model)):
        return
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise SourceError(f"no such directory: {model} (and it is not a hub id of the form org/name)")


def pipeline_index(model: str) -> dict:
    """The model_index.json of a local pipeline directory or hub id (fetched alone), before any weight."""
    from diffusers import DiffusionPipeline

    _check_local_or_hub(model)
    try:
        return DiffusionPipeline.load_config(os.path.expanduser(model))
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read the pipeline {model}: {_first_line(error)}") from None


def transformer_class_of(model: str) -> str:
    """The transformer class a pipeline declares in its model_index.json, read before any weight."""
    index = pipeline_index(model)
    if "transformer" not in index:
        raise SourceError(
            f"{model} ({index.get('_class_name', 'unknown pipeline')}) has no transformer; "
            "supported: pipelines whose denoiser is a diffusers transformer (Flux, PixArt, SD3, Wan, ...)"
        )
    class_name = index["transformer"][1]
    check_diffusers_transformer_class(class_name)
    return class_name


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _load_guard(model: str, device: str):
    """Turns loading failures into one-line SourceErrors."""

    class Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, traceback):
            if error is None or isinstance(error, SourceError):
                return False
            if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
                raise SourceError(
                    f"out of memory loading {model} on {device}: free memory, use another --device, or run "
                    "`convrot quantize` once and generate from the 4-bit directory"
                ) from None
            if isinstance(error, (OSError, ValueError, EnvironmentError)):
                raise SourceError(f"cannot load {model}: {_first_line(error)}") from None
            return False

    return Guard()


def load_pipeline(
    model: str | None,
    preset: str | None,
    group_size: int = 256,
    device: str = "cpu",
    dtype=torch.bfloat16,
    progress: bool = True,
) -> LoadedPipeline:
    """The pipeline for ``model``: quantized with ``preset`` (None: left in bf16).

    A quantized save is loaded as saved (``preset`` must then be None or its own).
    """
    if is_demo(model):
        name = demo_name(model)
        pipe = demo_pipeline(name, dtype=dtype)
        if preset is not None:
            quantize_pipeline(pipe, preset, group_size, progress)
        return LoadedPipeline(pipe.to(device), f"{DEMO_PREFIX}{name}", True, dict(DEMOS[name].call_kwargs))
    if os.path.isdir(model) and is_quantized_save(model):
        return load_saved_pipeline(model, device=device, dtype=dtype)

    from diffusers import DiffusionPipeline

    class_name = transformer_class_of(model)
    with _load_guard(model, device):
        components = {}
        if preset is not None:
            import diffusers

            components["transformer"] = getattr(diffusers, class_name).from_pretrained(
                model,
                subfolder="transformer",
                quantization_config=ConvRotConfig(preset, group_size, base_model=base_model_id(model)),
                torch_dtype=dtype,
                **({"device_map": device} if device != "cpu" else {}),
            )
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **components).to(device)
    return LoadedPipeline(pipe, model, False)


def load_saved_pipeline(directory: str, base_model: str | None = None, device: str = "cpu", dtype=torch.bfloat16):
    """A pipeline around a saved quantized transformer; the other components come from its base model."""
    config = read_config(directory)
    base = base_model or config["quantization_config"].get("base_model")
    if not base:
        raise SourceError(f"{directory} records no base model: pass --base-model (the pipeline it came from)")
    with _load_guard(directory, device):
        transformer = load_quantized(directory, device=device, dtype=dtype)
    if is_demo(base):
        name = demo_name(base)
        pipe = demo_pipeline(name, transformer=transformer, dtype=dtype).to(device)
        return LoadedPipeline(pipe, f"{directory} (on {base})", True, dict(DEMOS[name].call_kwargs))
    from diffusers import DiffusionPipeline

    if not Path(os.path.expanduser(base)).exists():
        _check_local_or_hub(base)
    with _load_guard(base, device):
        pipe = DiffusionPipeline.from_pretrained(base, transformer=transformer, torch_dtype=dtype).to(device)
    return LoadedPipeline(pipe, f"{directory} (on {base})", False)


def base_model_id(model: str) -> str:
    """What a save records as its base model: absolute for a local directory, else the hub id."""
    expanded = os.path.expanduser(model)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else model


def load_transformer_quantized(model: str | None, preset: str, group_size: int, device: str, progress: bool = True):
    """(quantized transformer, base model string) for ``convrot quantize``."""
    if is_demo(model):
        loaded = load_pipeline(model, preset, group_size, device, progress=progress)
        return loaded.pipe.transformer, loaded.description
    if os.path.isdir(model) and is_quantized_save(model):
        raise SourceError(f"{model} is already quantized")
    import diffusers

    class_name = transformer_class_of(model)
    with _load_guard(model, device):
        transformer = getattr(diffusers, class_name).from_pretrained(
            model,
            subfolder="transformer",
            quantization_config=ConvRotConfig(preset, group_size, base_model=base_model_id(model)),
            torch_dtype=torch.bfloat16,
            **({"device_map": device} if device != "cpu" else {}),
        )
    return transformer, base_model_id(model)
