"""Quantizing the denoising transformer of a diffusers pipeline in place."""

from __future__ import annotations

import os
from collections.abc import Mapping

import convrot

from .detect import denoiser_of
from .diffusers_integration import ConvRotConfig, attach_quantizer
from .policy_file import check_policy, check_policy_layers, linear_names, read_policy
from .presets import DEFAULT_PRESET, check_layers, check_preset, policy_for


def _given_policy(policy: Mapping[str, str] | str | os.PathLike) -> dict[str, str]:
    """A policy dict, or the one in a policy file (what ``convrot scan`` writes), checked."""
    if isinstance(policy, (str, os.PathLike)):
        return read_policy(policy)
    return check_policy(policy)


def quantize_transformer(
    transformer,
    preset: str | None = None,
    group_size: int = 256,
    progress: bool = True,
    base_model=None,
    policy: Mapping[str, str] | str | os.PathLike | None = None,
):
    """Quantizes a diffusers transformer in place with ``preset`` (default "mix") or ``policy``; returns it.

    Flux.1, PixArt and SD3 use their own presets; any other transformer the generic role-based
    rules of the same name (presets.generic_rules; a warning says when its architecture is untested).
    ``policy`` instead gives each layer its scheme: a convrot-core policy {glob pattern: kind} or the
    path of a policy file (``convrot scan`` writes one); every pattern must decide a layer of this
    transformer (policy_file.py). A layer that cannot be quantized is named in a ValueError before any
    is converted.

    The preset or policy and the group size are recorded in ``transformer.config.quantization_config``
    (a ConvRotConfig), and the transformer gets its ConvRotQuantizer, so that
    ``transformer.save_pretrained(directory)`` writes a ConvRot checkpoint (whose header lists each
    layer's scheme, so that it loads back as quantized).
    """
    if policy is not None and preset is not None:
        raise ValueError(f"give a preset or a policy, not both (preset {preset!r})")
    transformer = denoiser_of(transformer)
    if policy is None:
        preset = DEFAULT_PRESET if preset is None else preset
        check_preset(preset)
    else:
        policy = _given_policy(policy)
        check_policy_layers(policy, linear_names(transformer), type(transformer).__name__)
    if getattr(transformer.config, "quantization_config", None) is not None:
        raise ValueError("the transformer is already quantized")
    if policy is None:
        layer_policy = policy_for(transformer, preset)
    else:  # without the catch-all when every Linear is named, as `convrot scan` writes it
        deciding = {convrot.policy.layer_kind(name, policy)[1] for name in linear_names(transformer)}
        layer_policy = {pattern: kind for pattern, kind in policy.items() if pattern in deciding}
    check_layers(transformer, layer_policy, group_size)
    convrot.quantize_model(transformer, policy=layer_policy, group_size=group_size, progress=progress)
    config = ConvRotConfig(preset=preset, group_size=group_size, base_model=base_model, policy=policy)
    attach_quantizer(transformer, config)
    return transformer


def second_denoiser(pipe):
    """The second expert of a two-expert pipeline (Wan 2.2 A14B's low-noise ``transformer_2``), or None."""
    from diffusers import ModelMixin

    transformer_2 = getattr(pipe, "transformer_2", None)
    return transformer_2 if isinstance(transformer_2, ModelMixin) else None


def quantize_pipeline(
    pipe,
    preset: str | None = None,
    group_size: int = 256,
    progress: bool = True,
    policy: Mapping[str, str] | str | os.PathLike | None = None,
):
    """Quantizes ``pipe.transformer`` in place (W4A4 / W8A8 ... per ``preset``, default "mix", or per layer
    as ``policy`` says: see quantize_transformer) and returns the pipeline.

    Any pipeline with a diffusers ``transformer``: FluxPipeline, PixArtSigma/AlphaPipeline and
    StableDiffusion3Pipeline through their presets; Flux2Pipeline, QwenImagePipeline, WanPipeline,
    LTX2Pipeline (tested) and others through the generic rules. A pipeline with two experts (Wan 2.2
    A14B's ``transformer_2``) has both quantized; every layer of both is checked before either is converted.
    A policy applies to ``pipe.transformer`` only (it names that transformer's layers); ``transformer_2``
    then gets the default preset ("mix").
    ``group_size`` falls back, per layer, to the largest power of 4 that divides
    its in_features (e.g. 64 for PixArt's 1152 and SD3.5-large's 2432).
    """
    transformer = denoiser_of(pipe)
    if transformer is pipe:
        raise TypeError("quantize_pipeline expects a pipeline; use quantize_transformer for a bare transformer")
    denoisers = [transformer] + ([second_denoiser(pipe)] if second_denoiser(pipe) is not None else [])
    if policy is not None and preset is not None:
        raise ValueError(f"give a preset or a policy, not both (preset {preset!r})")
    # A policy names the layers of one transformer (`convrot scan` measures pipe.transformer): the second
    # expert gets the default preset.
    second_preset = DEFAULT_PRESET if preset is None else preset
    check_preset(second_preset)
    for denoiser in denoisers[1:]:
        if getattr(denoiser.config, "quantization_config", None) is not None:
            raise ValueError("the pipeline's transformer_2 is already quantized")
        check_layers(denoiser, policy_for(denoiser, second_preset), group_size)
    base_model = pipe.name_or_path or None
    quantize_transformer(transformer, preset, group_size, progress, base_model=base_model, policy=policy)
    for denoiser in denoisers[1:]:
        quantize_transformer(denoiser, second_preset, group_size, progress, base_model=base_model)
    return pipe
