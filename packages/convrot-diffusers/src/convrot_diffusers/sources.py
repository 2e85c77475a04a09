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


def pipeline_from_pretrained(model: str, dtype, **components):
    """The pipeline ``model`` with ``components`` (e.g. a quantized transformer) in place of its own.

    Through the pipeline's own class, not DiffusionPipeline: diffusers (0.42) reads which components
    are optional from the class it is called on, so DiffusionPipeline.from_pretrained ignores a passed
    component that the pipeline declares optional (Wan's transformer and transformer_2) and loads the
    bf16 one from disk. A component still not in place is an error, never a silent bf16 run."""
    import diffusers

    name = pipeline_index(model).get("_class_name")
    pipeline_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, diffusers.DiffusionPipeline)):
        pipeline_class = diffusers.DiffusionPipeline
    pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype, **components)
    for key, component in components.items():
        if getattr(pipe, key, None) is not component:
            raise SourceError(f"diffusers did not take the given {key} into {model}'s {type(pipe).__name__}")
    return pipe


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

    class_name = transformer_class_of(model)
    # A two-expert pipeline (Wan 2.2 A14B) has a second transformer, quantized the same way.
    second = (pipeline_index(model).get("transformer_2") or [None, None])[1]
    with _load_guard(model, device):
        components = {}
        if preset is not None:
            import diffusers

            for subfolder, name in (("transformer", class_name), ("transformer_2", second)):
                if name is None:
                    continue
                check_diffusers_transformer_class(name)
                components[subfolder] = getattr(diffusers, name).from_pretrained(
                    model,
                    subfolder=subfolder,
                    quantization_config=ConvRotConfig(preset, group_size, base_model=base_model_id(model)),
                    torch_dtype=dtype,
                    **({"device_map": device} if device != "cpu" else {}),
                )
        pipe = pipeline_from_pretrained(model, dtype, **components).to(device)
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

    if not Path(os.path.expanduser(base)).exists():
        _check_local_or_hub(base)
    if (pipeline_index(base).get("transformer_2") or [None])[0] is not None:
        import warnings

        warnings.warn(
            f"{directory} holds one transformer; the second expert (transformer_2) of {base} runs in bf16 "
            f"(`convrot generate {base} --preset ...` quantizes both as they load)",
            stacklevel=2,
        )
    with _load_guard(base, device):
        pipe = pipeline_from_pretrained(base, dtype, transformer=transformer).to(device)
    return LoadedPipeline(pipe, f"{directory} (on {base})", False)


def base_model_id(model: str) -> str:
    """What a save records as its base model: absolute for a local directory, else the hub id."""
    expanded = os.path.expanduser(model)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else model


def load_transformer_quantized(
    model: str | None, preset: str | None, group_size: int, device: str, progress: bool = True, policy=None
):
    """(quantized transformer, base model string) for ``convrot quantize``: with ``preset``, or with
    ``policy`` (a checked {pattern: kind} dict; ``preset`` None)."""
    if is_demo(model):
        pipe = demo_pipeline(demo_name(model))
        quantize_pipeline(pipe, preset, group_size, progress, policy=policy)
        return pipe.transformer.to(device), f"{DEMO_PREFIX}{demo_name(model)}"
    if os.path.isdir(model) and is_quantized_save(model):
        raise SourceError(f"{model} is already quantized")
    import diffusers

    class_name = transformer_class_of(model)
    with _load_guard(model, device):
        transformer = getattr(diffusers, class_name).from_pretrained(
            model,
            subfolder="transformer",
            quantization_config=ConvRotConfig(preset, group_size, base_model=base_model_id(model), policy=policy),
            torch_dtype=torch.bfloat16,
            **({"device_map": device} if device != "cpu" else {}),
        )
    return transformer, base_model_id(model)
