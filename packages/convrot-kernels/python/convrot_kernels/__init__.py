"""ConvRot kernel primitives: regular Hadamard rotation, 4/8-bit quantization and
int4/int8 GEMM (alone or as one quantized layer, ``linear``), on CPU and CUDA tensors, the
attention heads' RMSNorm with the rotary embedding, DiT blocks' LayerNorm with AdaLN
modulation (alone or fused into the quantization), and softmax attention with 8-bit operands.
Every function checks its arguments and raises TypeError or ValueError naming the one at fault;
CUDA work runs on the operands' device, on PyTorch's current stream there. The numeric contract is docs/format.md."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _C
from .attention_8bit import AttentionCodes, attention_8bit, attention_8bit_prepass
from .gemm import gemm
from .gemm_kernel_choice import forced_gemm_kernel
from .int4_packing import pack_int4, unpack_int4
from .layer_norm_modulate import layer_norm_modulate
from .layer_norm_modulate_rht_quantize import (
    layer_norm_modulate_rht_quantize,
    residual_layer_norm_modulate_rht_quantize,
)
from .linear import linear
from .quantize import quantize, rht_quantize
from .rht import rht
from .rms_norm_rope import rms_norm_rope, rms_norm_rope_into

try:
    __version__ = version("convrot-kernels")
except PackageNotFoundError:  # imported from a source tree
    __version__ = "unknown"


def build_info() -> dict:
    """How this build was made: ``version``, ``cuda`` (CUDA backend compiled in),
    ``cuda_archs`` (the CMAKE_CUDA_ARCHITECTURES entries it holds code for)."""
    return {"version": __version__, **_C.build_info()}


__all__ = [
    "AttentionCodes",
    "attention_8bit",
    "attention_8bit_prepass",
    "build_info",
    "gemm",
    "forced_gemm_kernel",
    "layer_norm_modulate",
    "layer_norm_modulate_rht_quantize",
    "linear",
    "pack_int4",
    "quantize",
    "residual_layer_norm_modulate_rht_quantize",
    "rht",
    "rht_quantize",
    "rms_norm_rope",
    "rms_norm_rope_into",
    "unpack_int4",
]
