"""Quantizing the denoising transformer of a diffusers pipeline in place."""

from __future__ import annotations

import convrot

from .detect import denoiser_of
from .diffusers_integration import ConvRotConfig, attach_quantizer
from .presets import DEFAULT_PRESET, check_layers, check_preset, policy_for


def quantize_transformer(
    transformer, preset: str = DEFAULT_PRESET, group_size: int = 256, progress: bool = True, base_model=None
):
    """Quantizes a diffusers transformer in place with ``preset``; returns it.

    Flux.1, PixArt and SD3 use their own presets; any other transformer the generic role-based
    rules of the same name (presets.generic_rules; a warning says when its architecture is untested).
    A layer that cannot be quantized is named in a ValueError before any is converted.

    The preset and group size are recorded in ``transformer.config.quantization_config``
    (a ConvRotConfig), and the transformer gets its ConvRotQuantizer, so that
    ``transformer.save_pretrained(directory)`` writes a ConvRot checkpoint.
    """
    check_preset(preset)
    transformer = denoiser_of(transformer)
    if getattr(transformer.config, "quantization_config", None) is not None:
        raise ValueError("the transformer is already quantized")
    policy = policy_for(transformer, preset)
    check_layers(transformer, policy, group_size)
    convrot.quantize_model(transformer, policy=policy, group_size=group_size, progress=progress)
    attach_quantizer(transformer, ConvRotConfig(preset=preset, group_size=group_size, base_model=base_model))
    return transformer


def second_denoiser(pipe):
    """The second expert of a two-expert pipeline (Wan 2.2 A14B's low-noise ``transformer_2``), or None."""
    from diffusers import ModelMixin

    transformer_2 = getattr(pipe, "transformer_2", None)
    return transformer_2 if isinstance(transformer_2, ModelMixin) else None


def quantize_pipeline(pipe, preset: str = DEFAULT_PRESET, group_size: int = 256, progress: bool = True):
    """Quantizes ``pipe.transformer`` in place (W4A4 / W8A8 per ``preset``) and returns the pipeline.

    Any pipeline with a diffusers ``transformer``: FluxPipeline, PixArtSigma/AlphaPipeline and
    StableDiffusion3Pipeline through their presets; Flux2Pipeline, QwenImagePipeline, WanPipeline,
    LTX2Pipeline (tested) and others through the generic rules. A pipeline with two experts (Wan 2.2
    A14B's ``transformer_2``) has both quantized; every layer of both is checked before either is converted.
    ``group_size`` falls back, per layer, to the largest power of 4 that divides
    its in_features (e.g. 64 for PixArt's 1152 and SD3.5-large's 2432).
    """
    transformer = denoiser_of(pipe)
    if transformer is pipe:
        raise TypeError("quantize_pipeline expects a pipeline; use quantize_transformer for a bare transformer")
    denoisers = [transformer] + ([second_denoiser(pipe)] if second_denoiser(pipe) is not None else [])
    check_preset(preset)
    for denoiser in denoisers[1:]:
        if getattr(denoiser.config, "quantization_config", None) is not None:
            raise ValueError("the pipeline's transformer_2 is already quantized")
        check_layers(denoiser, policy_for(denoiser, preset), group_size)
    for denoiser in denoisers:
        quantize_transformer(denoiser, preset, group_size, progress, base_model=pipe.name_or_path or None)
    return pipe
