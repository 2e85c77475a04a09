"""ConvRot W4A4 quantization for diffusers pipelines: Flux, PixArt-Σ/α, SD3/3.5 through their presets,
any other diffusers DiT (Flux.2, Qwen-Image, Wan, LTX-2 tested) through the generic role-based policy.

    import convrot_diffusers
    pipe = convrot_diffusers.quantize_pipeline(pipe, preset="mix")
    convrot_diffusers.fuse_qkv_projections(pipe)  # optional: one GEMM for q, k and v
    convrot_diffusers.fuse_activations(pipe)  # optional: GELUs applied inside the next layer
    convrot_diffusers.fuse_qk_norm_rope(pipe)  # optional: Flux's q/k RMSNorm + RoPE in one kernel
    convrot_diffusers.save_quantized(pipe, "flux-convrot")
    transformer = convrot_diffusers.load_quantized("flux-convrot", device="cuda")

Importing the package registers ``ConvRotConfig`` with diffusers, so that
``<Transformer>.from_pretrained(..., quantization_config=ConvRotConfig())`` and
``<Transformer>.from_pretrained(saved_directory)`` work.
"""

from importlib.metadata import PackageNotFoundError, version

from .activation_fusion import fuse_activations, unfuse_activations
from .checkpoint import load_quantized, save_quantized
from .detect import ARCHITECTURES, GENERIC_TESTED, UnsupportedModelError, architecture_of
from .diffusers_integration import ConvRotConfig, register
from .fusion import fuse_qkv_projections, unfuse_qkv_projections
from .pipeline import quantize_pipeline, quantize_transformer
from .presets import PRESET_NAMES, PRESETS, generic_rules, policy_for
from .qk_norm_rope import fuse_qk_norm_rope, unfuse_qk_norm_rope

register()

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
    "policy_for",
    "quantize_pipeline",
    "quantize_transformer",
    "save_quantized",
    "unfuse_activations",
    "unfuse_qk_norm_rope",
    "unfuse_qkv_projections",
]
