"""The CLI's side of ComfyUI files: ``convrot convert``, and ComfyUI files in ``info`` and ``generate``."""

from __future__ import annotations

import os

import torch

import convrot

from .comfy_quant import ComfyQuantError, describe_comfy, is_comfy_file, load_comfy, read_config, save_comfy


def _config_for(config: str | None):
    try:
        return None if config is None else read_config(config)
    except (OSError, ValueError) as error:
        raise ComfyQuantError(f"--config {config}: {error}") from None


def convert(source: str, destination: str, config: str | None = None, progress: bool = True) -> str:
    """Converts between a ComfyUI file and a convrot-diffusers directory, whichever ``source`` is; returns a summary."""
    from .checkpoint import describe, is_quantized_save, load_quantized, save_quantized
    from .diffusers_integration import ConvRotConfig, attach_quantizer

    if is_comfy_file(source):
        if os.path.isfile(destination):
            raise ComfyQuantError(f"{destination} is a file: a ComfyUI file converts to a directory")
        transformer = load_comfy(source, _config_for(config), progress=progress)
        layers = [m for m in transformer.modules() if isinstance(m, convrot.ConvLinear)]
        kinds = {layer.bits for layer in layers}
        groups = sorted({layer.group_size for layer in layers})
        # The file's own layer list is what loads; the preset and group size are recorded for information.
        recorded = ConvRotConfig(
            preset="w4a4" if kinds == {4} else "mix", group_size=groups[-1] if groups else 256, base_model=None
        )
        attach_quantizer(transformer, recorded)  # save_pretrained then writes the ConvRot format
        save_quantized(transformer, destination)
        summary = describe(destination)
        return (
            f"wrote {summary.config['_class_name']} to {destination}: "
            f"{summary.file_bytes / 2**20:.1f} MiB, {summary.ratio:.2f}x smaller than bf16"
        )
    if os.path.isdir(source) and is_quantized_save(source):
        if config is not None:
            raise ComfyQuantError("--config is for a ComfyUI source; a convrot-diffusers directory holds its config")
        if not destination.endswith(".safetensors"):
            raise ComfyQuantError(f"{destination}: a ComfyUI file is one .safetensors file")
        transformer = load_quantized(source, dtype=torch.bfloat16)
        save_comfy(transformer, destination, progress=progress)
        summary = describe_comfy(destination)
        return (
            f"wrote {summary.transformer_class} to {destination} (ComfyUI comfy_quant, original names): "
            f"{summary.file_bytes / 2**20:.1f} MiB, {summary.ratio:.2f}x smaller than bf16"
        )
    raise ComfyQuantError(
        f"{source} is neither a ComfyUI ConvRot file (.safetensors with comfy_quant entries) "
        "nor a convrot-diffusers directory (convrot quantize --out)"
    )


def info_lines(path: str) -> list[str]:
    summary = describe_comfy(path)
    formats = ", ".join(f"{n} {fmt}" for fmt, n in sorted(summary.formats.items()))
    groups = ", ".join(f"{size} ({n} layers)" for size, n in sorted(summary.group_sizes.items()))
    weights = ", ".join(f"{kind} {n / 1e6:.1f}M" for kind, n in summary.parameters.items())
    return [
        f"transformer:   {summary.transformer_class} (ComfyUI file, original tensor names"
        + (f", prefix {summary.prefix!r})" if summary.prefix else ")"),
        f"layers:        {formats or 'none quantized'}",
        f"group sizes:   {groups or '-'}",
        f"weights:       {weights}",
        f"size:          {summary.file_bytes / 2**20:.1f} MiB ({summary.ratio:.2f}x smaller than bf16)",
    ]


def load_pipeline(path: str, base_model: str | None, device: str, dtype=torch.bfloat16):
    """A pipeline around the transformer of a ComfyUI file; VAE, text encoders and config from ``base_model``."""
    from .demo import DEMOS, demo_name, demo_pipeline, is_demo
    from .sources import LoadedPipeline, SourceError, _check_local_or_hub, _load_guard

    if not base_model:
        raise SourceError(
            f"{path} is a ComfyUI file: pass --base-model, the pipeline that supplies VAE and text encoders"
        )
    if is_demo(base_model):
        name = demo_name(base_model)
        config = dict(demo_pipeline(name).transformer.config)
    else:
        _check_local_or_hub(base_model)
        config = _config_for(base_model)
    with _load_guard(path, device):
        transformer = load_comfy(path, config, device=device, dtype=dtype)
    if is_demo(base_model):
        pipe = demo_pipeline(name, transformer=transformer, dtype=dtype).to(device)
        return LoadedPipeline(pipe, f"{path} (on {base_model})", True, dict(DEMOS[name].call_kwargs))
    from diffusers import DiffusionPipeline

    with _load_guard(base_model, device):
        pipe = DiffusionPipeline.from_pretrained(base_model, transformer=transformer, torch_dtype=dtype).to(device)
    return LoadedPipeline(pipe, f"{path} (on {base_model})", False)


__all__ = ["convert", "info_lines", "is_comfy_file", "load_pipeline"]
