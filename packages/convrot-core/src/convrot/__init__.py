"""ConvRot: W4A4 quantization of Diffusion Transformers with regular Hadamard rotations.

See docs/method.md in the repository for the method and the policy format.
"""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import (
    CheckpointError,
    CheckpointHeader,
    check_layout,
    checkpoint_metadata,
    install_skeletons,
    load_quantized,
    quantized_layers,
    read_header,
    read_layer_specs,
    save_quantized,
    tensor_checksum,
    verify_checkpoint,
)
from .hadamard import ROTATIONS, regular_hadamard, resolve_group_size, rotate_groups, sylvester_hadamard
from .linear import ConvLinear, ConvLinear4bit, ConvLinear8bit
from .model import quantize_model, set_simulation
from .policy import KINDS
from .quantizer.fake_quant import fake_quant, simulated_linear
from .weight_stand_in import WeightStandIn

try:
    __version__ = version("convrot-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "KINDS",
    "ROTATIONS",
    "CheckpointError",
    "CheckpointHeader",
    "ConvLinear",
    "ConvLinear4bit",
    "ConvLinear8bit",
    "WeightStandIn",
    "check_layout",
    "checkpoint_metadata",
    "fake_quant",
    "install_skeletons",
    "load_quantized",
    "quantize_model",
    "quantized_layers",
    "read_header",
    "read_layer_specs",
    "regular_hadamard",
    "resolve_group_size",
    "rotate_groups",
    "save_quantized",
    "set_simulation",
    "simulated_linear",
    "sylvester_hadamard",
    "tensor_checksum",
    "verify_checkpoint",
]
