"""Which supported architecture a diffusers transformer (or pipeline) is.

The architecture is read from the class name of the denoising transformer, so
that a model is recognised from its ``model_index.json`` or ``config.json``
before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A supported family of diffusion transformers."""

    name: str
    transformer_class: str
    pipelines: tuple[str, ...]
    # Config key holding the number of blocks in each block list of the
    # transformer, used to resolve the ``<last>`` index in presets.
    block_counts: tuple[tuple[str, str], ...]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="flux",
        transformer_class="FluxTransformer2DModel",
        pipelines=("FluxPipeline",),
        block_counts=(("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
    ),
    Architecture(
        name="pixart",
        transformer_class="PixArtTransformer2DModel",
        pipelines=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
        block_counts=(("transformer_blocks", "num_layers"),),
    ),
    Architecture(
        name="sd3",
        transformer_class="SD3Transformer2DModel",
        pipelines=("StableDiffusion3Pipeline",),
        block_counts=(("transformer_blocks", "num_layers"),),
    ),
)


class UnsupportedModelError(ValueError):
    """The model is not one of the supported architectures."""


def supported_summary() -> str:
    return "; ".join(f"{a.transformer_class} ({', '.join(a.pipelines)})" for a in ARCHITECTURES)


def architecture_for_class(class_name: str) -> Architecture:
    """The architecture whose transformer class is ``class_name``."""
    for arch in ARCHITECTURES:
        if arch.transformer_class == class_name:
            return arch
    raise UnsupportedModelError(f"unsupported transformer {class_name}; supported: {supported_summary()}")


def architecture_of(transformer) -> Architecture:
    """The architecture of a diffusers transformer module."""
    return architecture_for_class(type(transformer).__name__)


def transformer_of(pipe_or_transformer):
    """The denoising transformer of a pipeline, or the argument itself if it is a transformer."""
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is None:
        if hasattr(pipe_or_transformer, "unet"):
            raise UnsupportedModelError(
                f"{type(pipe_or_transformer).__name__} denoises with a UNet; supported: {supported_summary()}"
            )
        transformer = pipe_or_transformer
    architecture_of(transformer)
    return transformer
