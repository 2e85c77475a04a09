"""diffusers integration: ``ConvRotConfig`` as ``quantization_config=`` of ``<Transformer>.from_pretrained``.

Two routes, as with diffusers' own quantizers:
- quantize on load: ``FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer",
  quantization_config=ConvRotConfig(preset="mix"))`` converts each Linear as soon as its
  weight (and bias) are read, so the full bf16 transformer never sits in memory;
- load of a pre-quantized save (convrot_diffusers.save_quantized): ``from_pretrained(directory)``
  finds ``quantization_config`` in config.json, builds the ConvLinear layers the checkpoint's
  header lists on the meta device and loads their codes.

diffusers has no public registration hook for outside quantizers, so ``register()``
adds ConvRot to its auto-quantizer mappings. This module is the only place that touches
diffusers internals; ``register()`` checks the version and that the mappings exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

import diffusers
import torch
from packaging.version import Version

import convrot

QUANT_METHOD = "convrot"
MIN_DIFFUSERS = Version("0.32.0")
# Newest diffusers release this integration was tested against.
TESTED_DIFFUSERS = Version("0.42.1")


class ConvRotMethod(str, Enum):
    """diffusers reads ``quantization_config.quant_method.value``: it needs an enum, as its own methods are."""

    CONVROT = QUANT_METHOD


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("convrot-diffusers", "convrot-core", "convrot-kernels", "diffusers", "transformers"):
        try:
            versions[name] = installed_version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class ConvRotConfig:
    """ConvRot W4A4 quantization of a diffusers transformer (Flux, PixArt, SD3).

    Args:
        preset: "mix" (default: mixed W4A4/W8A8/bf16), "w4a4", "w4a8", "w4a8g64" or "w4a4g64"; see
            convrot_diffusers.presets.
        group_size: rotation/quantization group (256; falls back per layer to the largest power of 4
            dividing in_features).
        rotation: "regular" (the ConvRot Hadamard) or another rotation convrot-core knows.
        base_model: where the other pipeline components come from (hub id, path, or "demo:NAME");
            informational, recorded by save_quantized.
        versions: package versions that made the checkpoint (filled in when quantizing).
    """

    preset: str = "mix"
    group_size: int = 256
    rotation: str = "regular"
    base_model: str | None = None
    versions: dict[str, str] = field(default_factory=_versions)
    quant_method: ConvRotMethod = ConvRotMethod.CONVROT

    def __post_init__(self):
        from .presets import check_preset

        check_preset(self.preset)
        self.quant_method = ConvRotMethod(self.quant_method)
        convrot.resolve_group_size(self.group_size, self.group_size)
        if self.rotation not in convrot.ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; choose one of {convrot.ROTATIONS}")

    # The QuantizationConfigMixin interface diffusers calls.
    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**{k: v for k, v in config_dict.items() if k in cls.__dataclass_fields__})
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for k, v in kwargs.items():
            if hasattr(config, k):
                setattr(config, k, v)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method.value,
            "preset": self.preset,
            "group_size": self.group_size,
            "rotation": self.rotation,
            "base_model": self.base_model,
            "versions": dict(self.versions),
        }

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def update(self, **kwargs) -> dict:
        unused = {k: v for k, v in kwargs.items() if not hasattr(self, k)}
        for k, v in kwargs.items():
            if hasattr(self, k):
                setattr(self, k, v)
        return unused

    def __iter__(self):
        yield from self.to_dict().items()


def _quantizer_class():
    """Defined lazily: the diffusers base class lives in a module we only touch once registering."""
    from accelerate.utils import set_module_tensor_to_device
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.utils import get_module_from_name

    from .presets import policy_for

    class ConvRotQuantizer(DiffusersQuantizer):
        requires_calibration = False
        required_packages = ["convrot", "accelerate"]
        use_keep_in_fp32_modules = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.header_layers: dict[str, dict] | None = None
            self.pending: dict[str, str] = {}  # Linear name -> kind, still to convert (quantize on load)

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if (
                isinstance(device_map, dict)
                and {"disk", "cpu"} & set(map(str, device_map.values()))
                and len(set(map(str, device_map.values()))) > 1
            ):
                raise ValueError("ConvRot does not support offloading part of the model to CPU or disk")

        def update_torch_dtype(self, torch_dtype):
            return torch.bfloat16 if torch_dtype is None else torch_dtype

        def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
            if self.pre_quantized:
                self.header_layers = {}
                for path in checkpoint_files:
                    try:
                        self.header_layers.update(convrot.read_layer_specs(path))
                    except convrot.CheckpointError as error:
                        raise ValueError(
                            f"{path} has a ConvRot quantization_config but is not a readable ConvRot checkpoint "
                            f"(write it with convrot_diffusers.save_quantized): {error}"
                        ) from None
            return loaded_keys

        def _process_model_before_weight_loading(self, model, **kwargs):
            if self.pre_quantized:
                convrot.install_skeletons(model, self.header_layers)
            else:
                policy = policy_for(model, self.quantization_config.preset)
                for name, module in model.named_modules():
                    if isinstance(module, torch.nn.Linear):
                        kind = convrot.policy.layer_kind(name, policy)[0]
                        if kind != "skip":
                            self.pending[name] = kind
            model.config.quantization_config = self.quantization_config

        def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs):
            module, tensor_name = get_module_from_name(model, param_name)
            if self.pre_quantized:
                # Only the scales and biases need care: diffusers would cast them to torch_dtype, the kernels
                # want fp32.
                return isinstance(module, convrot.ConvLinear) and tensor_name in ("weight_scale", "bias")
            return param_name.rpartition(".")[0] in self.pending and tensor_name in ("weight", "bias")

        def create_quantized_param(
            self, model, param_value, param_name, target_device, state_dict, unexpected_keys, **kwargs
        ):
            if self.pre_quantized:  # fp32 (saves before biases were kept in fp32 hold them in bf16)
                set_module_tensor_to_device(model, param_name, target_device, value=state_dict[param_name].float())
                return
            set_module_tensor_to_device(model, param_name, target_device, value=param_value)
            name = param_name.rpartition(".")[0]
            linear = model.get_submodule(name)
            if linear.weight.is_meta or (linear.bias is not None and linear.bias.is_meta):
                return  # convert once both weight and bias are in
            layer = convrot.linear.layer_from_linear(
                self.pending.pop(name),
                linear,
                group_size=self.quantization_config.group_size,
                rotation=self.quantization_config.rotation,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)

        def _process_model_after_weight_loading(self, model, **kwargs):
            if self.pending:
                missing = sorted(self.pending)
                raise ValueError(
                    f"the checkpoint lacks the weights of {len(missing)} layer(s) to quantize: {missing[:5]}"
                )
            return model

        @property
        def is_serializable(self):
            # model.save_pretrained cannot write convrot-core's checkpoint header;
            # convrot_diffusers.save_quantized(model, directory) writes a loadable save.
            return False

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self):
            return True

    return ConvRotQuantizer


def register() -> None:
    """Adds ConvRot to diffusers' auto-quantizer mappings (idempotent)."""
    import warnings

    from diffusers.quantizers import auto

    found = Version(diffusers.__version__)
    if found < MIN_DIFFUSERS:
        raise ImportError(f"convrot-diffusers needs diffusers >= {MIN_DIFFUSERS}, found {found}")
    if not (hasattr(auto, "AUTO_QUANTIZER_MAPPING") and hasattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING")):
        raise ImportError(f"diffusers {found} has no auto-quantizer mappings: ConvRotConfig cannot be registered")
    if found.release[:2] > TESTED_DIFFUSERS.release[:2]:
        warnings.warn(
            f"convrot-diffusers was tested with diffusers up to {TESTED_DIFFUSERS}, found {found}; "
            "if ConvRotConfig fails in from_pretrained, use convrot_diffusers.load_quantized",
            stacklevel=2,
        )
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = _quantizer_class()
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ConvRotConfig
