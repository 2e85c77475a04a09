"""ConvRot W4A4 quantization for diffusers pipelines: Flux, PixArt-Σ/α, SD3/3.5 through their presets,
any other diffusers DiT (Flux.2, Qwen-Image, Wan, LTX-2 tested) through the generic role-based policy.

    import convrot_diffusers
    pipe = convrot_diffusers.quantize_pipeline(pipe, preset="mix")
    convrot_diffusers.fuse_qkv_projections(pipe)  # optional: one GEMM for q, k and v
    convrot_diffusers.fuse_activations(pipe)  # optional: GELUs applied inside the next layer
    convrot_diffusers.fuse_qk_norm_rope(pipe)  # optional: Flux's q/k RMSNorm + RoPE in one kernel
    convrot_diffusers.save_quantized(pipe, "flux-convrot")
    transformer = convrot_diffusers.load_quantized("flux-convrot", device="cuda")

Importing the package registers ``ConvRotConfig`` with diffusers (when diffusers is imported,
before or after), so that ``<Transformer>.from_pretrained(..., quantization_config=ConvRotConfig())``
and ``<Transformer>.from_pretrained(saved_directory)`` work.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from .registration_hook import register_when_diffusers_is_imported

# Public name -> the submodule defining it, imported on first use: importing the package (and
# so the `convrot` command) loads neither torch nor diffusers until something needs them.
_EXPORTS = {
    "ARCHITECTURES": "detect",
    "PRESETS": "presets",
    "PRESET_NAMES": "presets",
    "ConvRotConfig": "diffusers_integration",
    "GENERIC_TESTED": "detect",
    "UnsupportedModelError": "detect",
    "architecture_of": "detect",
    "fuse_activations": "activation_fusion",
    "fuse_qk_norm_rope": "qk_norm_rope",
    "fuse_qkv_projections": "fusion",
    "generic_rules": "presets",
    "load_quantized": "checkpoint",
    "merge_lora": "lora_merge",
    "policy_for": "presets",
    "quantize_pipeline": "pipeline",
    "quantize_transformer": "pipeline",
    "register": "diffusers_integration",
    "save_quantized": "checkpoint",
    "unfuse_activations": "activation_fusion",
    "unfuse_qk_norm_rope": "qk_norm_rope",
    "unfuse_qkv_projections": "fusion",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


register_when_diffusers_is_imported()

try:
    __version__ = version("convrot-diffusers")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ARCHITECTURES",
    "GENERIC_TESTED",
    "PRESETS",
    "PRESET_NAMES",
    "ConvRotConfig",
    "UnsupportedModelError",
    "architecture_of",
    "fuse_activations",
    "fuse_qk_norm_rope",
    "fuse_qkv_projections",
    "generic_rules",
    "load_quantized",
    "merge_lora",
    "policy_for",
    "quantize_pipeline",
    "quantize_transformer",
    "save_quantized",
    "unfuse_activations",
    "unfuse_qk_norm_rope",
    "unfuse_qkv_projections",
]
