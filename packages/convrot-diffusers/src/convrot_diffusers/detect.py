"""Which supported architecture a diffusers transformer (or pipeline) is.

The architecture is read from the class name of the denoising transformer, so
that a model is recognised from its ``model_index.json`` or ``config.json``
before any weight is loaded.

Flux.1, PixArt and SD3 have presets of their own (``ARCHITECTURES``); any other diffusers
transformer goes through the generic, role-based policy (presets.generic_rules). The
transformers that policy is tested on are ``GENERIC_TESTED``; any other one quantizes with a
warning that it is untested.
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


# Transformer class -> model family, for the architectures the generic policy is tested on
# (tests/test_generic.py: tiny configs on the CPU, SQNR in docs/diffusers.md).
GENERIC_TESTED: dict[str, str] = {
    "Flux2Transformer2DModel": "Flux.2",
    "QwenImageTransformer2DModel": "Qwen-Image",
    "WanTransformer3DModel": "Wan 2.x",
    "LTX2VideoTransformer3DModel": "LTX-2",
}


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


def _transformer_or_self(pipe_or_transformer):
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is None:
        if hasattr(pipe_or_transformer, "unet"):
            raise UnsupportedModelError(
                f"{type(pipe_or_transformer).__name__} denoises with a UNet; supported: {supported_summary()}"
            )
        transformer = pipe_or_transformer
    return transformer


def transformer_of(pipe_or_transformer):
    """The denoising transformer of a pipeline, or the argument itself if it is a transformer
    of one of ``ARCHITECTURES`` (what the Flux fusions and other per-architecture code accept)."""
    transformer = _transformer_or_self(pipe_or_transformer)
    architecture_of(transformer)
    return transformer


def is_preset_class(class_name: str) -> bool:
    """Whether ``class_name`` is the transformer of an architecture with presets of its own."""
    return any(arch.transformer_class == class_name for arch in ARCHITECTURES)


def check_diffusers_transformer_class(class_name: str) -> None:
    """Raises UnsupportedModelError unless ``class_name`` is a diffusers model class (e.g. from a config.json)."""
    if is_preset_class(class_name):
        return
    import diffusers
    from diffusers import ModelMixin

    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise UnsupportedModelError(
            f"{class_name!r} is not a diffusers model class; quantizable: any diffusers transformer "
            f"(presets of their own: {supported_summary()})"
        )


def denoiser_of(pipe_or_transformer):
    """The denoising transformer of a pipeline, or the argument itself: any diffusers model
    (``ModelMixin``), quantized through its preset or through the generic policy."""
    from diffusers import ModelMixin

    transformer = _transformer_or_self(pipe_or_transformer)
    if not isinstance(transformer, ModelMixin):
        raise UnsupportedModelError(
            f"{type(transformer).__name__} is not a diffusers model; quantizable: any diffusers transformer "
            f"(presets of their own: {supported_summary()})"
        )
    return transformer
