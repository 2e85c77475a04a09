"""diffusers integration: ``ConvRotConfig`` (a ``QuantizationConfigMixin``) and ``ConvRotQuantizer`` (a
``DiffusersQuantizer``), so that diffusers' own ``from_pretrained`` and ``save_pretrained`` load and save
ConvRot transformers and the pipelines holding them.

- quantize on load: ``FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer",
  quantization_config=ConvRotConfig(preset="mix"))`` converts each Linear as soon as its weight (and bias)
  are read, so the full bf16 transformer never sits in memory;
- save: ``transformer.save_pretrained(directory)`` (or ``pipe.save_pretrained``) of a transformer quantized
  either way writes config.json with ``quantization_config`` and safetensors files in convrot-core's format
  (docs/format.md): the layer list and CRC-32 checksums in the header, q/k/v projections fused by
  ``fuse_qkv_projections`` saved as the separate layers a fresh transformer has, and the dtypes of the
  buffers the state dict leaves out (``buffer_dtypes``);
- load of a save: ``<Transformer>.from_pretrained(directory)`` (or ``DiffusionPipeline.from_pretrained``)
  finds ``quantization_config`` in config.json, checks every file's header against the transformer (another
  architecture is refused, naming the file), builds the ConvLinear layers on the meta device, checks each
  tensor's checksum as diffusers hands it over, and keeps the saved dtypes unless ``torch_dtype=`` is given
  (scales and quantized layers' biases stay fp32 either way).

diffusers has no public registration for outside quantizers: ``register()`` (run when convrot_diffusers is
imported) adds one entry to each of diffusers' auto-quantizer mappings, the way its own quantizers are listed
there. The interface it relies on is diffusers >= 0.39's (versions.py).
"""

from __future__ import annotations

import copy
import json
import weakref
from collections import Counter
from enum import Enum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

import torch
from accelerate.utils import set_module_tensor_to_device
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from diffusers.utils import get_module_from_name

import convrot

from .versions import MIN_DIFFUSERS, RANGE_TEXT, diffusers_in_range, installed_diffusers
from .weight_lookup import install_weight_lookup

QUANT_METHOD = "convrot"
BUFFER_DTYPES_KEY = "buffer_dtypes"  # header metadata: JSON {buffer name: dtype} of non-persistent buffers


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


class ConvRotConfig(QuantizationConfigMixin):
    """ConvRot W4A4 quantization of a diffusers transformer (Flux.1, PixArt and SD3 through their presets,
    any other through the generic role-based rules of convrot_diffusers.presets).

    Args:
        preset: "mix" (default: mixed W4A4/W8A8/bf16), "w4a4", "w4a8", "w4a8g64" or "w4a4g64"; see
            convrot_diffusers.presets. None with ``policy``.
        policy: instead of a preset, a convrot-core policy {layer glob pattern: kind} (first match wins;
            a layer no pattern matches is W4A4), e.g. the file ``convrot scan`` writes
            (convrot_diffusers.policy_file.read_policy); recorded in the save's config.json.
        group_size: rotation/quantization group (256; falls back per layer to the largest power of 4
            dividing in_features).
        rotation: "regular" (the ConvRot Hadamard) or another rotation convrot-core knows.
        base_model: where the other pipeline components come from (hub id, path, or "demo:NAME");
            informational, recorded in the save.
        versions: package versions that made the checkpoint (filled in when quantizing).
    """

    FIELDS = ("preset", "group_size", "rotation", "base_model", "versions", "policy")

    def __init__(
        self,
        preset: str | None = None,
        group_size: int = 256,
        rotation: str = "regular",
        base_model: str | None = None,
        versions: dict[str, str] | None = None,
        quant_method: str = QUANT_METHOD,
        policy: dict[str, str] | None = None,
    ):
        from .policy_file import check_policy
        from .presets import DEFAULT_PRESET, check_preset

        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if policy is None:
            preset = DEFAULT_PRESET if preset is None else preset
            check_preset(preset)
        elif preset is not None:
            raise ValueError(f"give a preset or a policy, not both (preset {preset!r})")
        else:
            policy = check_policy(_policy_pairs(policy) if isinstance(policy, list) else policy)
        if type(group_size) is not int:
            raise TypeError(f"group_size must be an int, got {group_size!r}")
        convrot.resolve_group_size(group_size, group_size)
        if rotation not in convrot.ROTATIONS:
            raise ValueError(f"unknown rotation {rotation!r}; choose one of {convrot.ROTATIONS}")
        if base_model is not None and not isinstance(base_model, str):
            raise TypeError(f"base_model must be a string or None, got {base_model!r}")
        if versions is not None and not (
            isinstance(versions, dict) and all(isinstance(v, str) for v in (*versions, *versions.values()))
        ):
            raise TypeError(f"versions must map package names to version strings, got {versions!r}")
        self.quant_method = ConvRotMethod.CONVROT
        self.preset = preset
        self.group_size = group_size
        self.rotation = rotation
        self.base_model = base_model
        self.versions = dict(versions) if versions is not None else _versions()
        self.policy = policy

    def policy_for(self, transformer) -> dict[str, str]:
        """The convrot-core policy this config quantizes ``transformer`` with: its own, or its preset's."""
        from .presets import policy_for

        return dict(self.policy) if self.policy is not None else policy_for(transformer, self.preset)

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """The config a transformer's config.json holds; a damaged one raises ValueError saying so."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"config.json: quantization_config must be a JSON object, got {config_dict!r}")
        unknown = sorted(set(config_dict) - {*cls.FIELDS, "quant_method"})
        if unknown:
            raise ValueError(
                f"config.json: ConvRot quantization_config has unknown field(s) {unknown} "
                "(written by a newer convrot-diffusers?)"
            )
        try:
            config = cls(**config_dict)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.json: damaged ConvRot quantization_config: {error}") from None
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        # A preset's config has no "policy" key, so that it reads as before in older convrot-diffusers; a
        # policy is written as [pattern, kind] pairs, as config.json's keys are sorted and its first match wins.
        config = {"quant_method": QUANT_METHOD}
        config.update({name: copy.deepcopy(getattr(self, name)) for name in self.FIELDS if name != "policy"})
        if self.policy is not None:
            config["policy"] = [[pattern, kind] for pattern, kind in self.policy.items()]
        return config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _policy_pairs(pairs: list) -> dict:
    """A policy as config.json holds it, [[pattern, kind], ...] in order, as a dict."""
    if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in pairs):
        raise ValueError(f"policy must be [pattern, kind] pairs, got {pairs!r}")
    policy = dict(pairs)
    if len(policy) != len(pairs):
        raise ValueError("policy names a pattern twice")
    return policy


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_named(name: str, source: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise convrot.CheckpointError(f"{source}: damaged metadata header (unknown dtype {name!r} in buffer_dtypes)")
    return dtype


def _non_persistent_buffers(model) -> dict[str, torch.Tensor]:
    """Floating-point buffers the state dict leaves out (PixArt's and SD3's position tables, rotary tables)."""
    saved = set(model.state_dict())
    return {name: b for name, b in model.named_buffers() if name not in saved and b.is_floating_point()}


def _set_tensor(model, name: str, tensor: torch.Tensor) -> None:
    module, leaf = get_module_from_name(model, name)
    setattr(module, leaf, tensor)  # a registered buffer stays registered (and non-persistent)


class ConvRotQuantizer(DiffusersQuantizer):
    """What diffusers' from_pretrained and save_pretrained call for a ConvRot transformer."""

    requires_calibration = False
    required_packages = ["convrot", "accelerate"]
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        self.pending: dict[str, str] = {}  # Linear name -> kind, still to convert (quantize on load)
        # Pre-quantized load: what the files' headers say, and which tensors have arrived.
        self.layers: dict[str, dict] = {}
        self.checksums: dict[str, int] = {}
        self.stored: dict[str, tuple] = {}  # tensor name -> (shape, dtype)
        self.files: dict[str, str] = {}  # tensor name -> the file holding it
        self.buffer_dtypes: dict[str, torch.dtype] | None = None
        self.loaded: set[str] = set()
        self._model = None  # weakref to the transformer, for save_pretrained

    # -- binding to the model --------------------------------------------------------------------------------

    def bind(self, model) -> None:
        """Makes this the quantizer of ``model``: save_pretrained then writes a ConvRot checkpoint, and its
        state dict answers diffusers' Flux.1 LoRA loader's weight lookups (weight_lookup.py)."""
        self._model = weakref.ref(model)
        install_weight_lookup(model)
        model.hf_quantizer = self
        model.is_quantized = True
        model.quantization_method = self.quantization_config.quant_method
        model.register_to_config(quantization_config=self.quantization_config)

    def __deepcopy__(self, memo):
        # A deep copy of the transformer copies its quantizer: bind the copy to the copied transformer.
        model = self._model() if self._model is not None else None
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in vars(self).items():
            if name != "_model":
                setattr(clone, name, copy.deepcopy(value, memo))
        if model is not None:
            clone._model = weakref.ref(memo.get(id(model), model))
        return clone

    # -- from_pretrained -------------------------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if (
            isinstance(device_map, dict)
            and {"disk", "cpu"} & set(map(str, device_map.values()))
            and len(set(map(str, device_map.values()))) > 1
        ):
            raise ValueError("ConvRot does not support offloading part of the model to CPU or disk")

    def update_torch_dtype(self, torch_dtype):
        self.torch_dtype = torch_dtype
        if self.pre_quantized:
            return torch_dtype  # None: each tensor keeps its saved dtype (create_quantized_param)
        return torch.bfloat16 if torch_dtype is None else torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            for path in checkpoint_files:
                try:
                    header = convrot.read_header(path)
                except (convrot.CheckpointError, FileNotFoundError) as error:
                    raise convrot.CheckpointError(
                        f"{error} (config.json's ConvRot quantization_config needs ConvRot checkpoint files)"
                    ) from None
                if self.files and header.layers != self.layers:
                    first = next(iter(self.files.values()))
                    raise convrot.CheckpointError(f"{path}: its layer list differs from {first}'s")
                self.layers = header.layers
                self.checksums.update(header.checksums)
                self.stored.update(header.tensors)
                self.files.update(dict.fromkeys(header.tensors, str(path)))
                if BUFFER_DTYPES_KEY in header.metadata:
                    try:
                        names = json.loads(header.metadata[BUFFER_DTYPES_KEY])
                    except json.JSONDecodeError:
                        names = None
                    if not isinstance(names, dict):
                        raise convrot.CheckpointError(f"{path}: damaged metadata header ({BUFFER_DTYPES_KEY})")
                    self.buffer_dtypes = {name: _dtype_named(dtype, str(path)) for name, dtype in names.items()}
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            sources = ", ".join(sorted(set(self.files.values())))
            convrot.check_layout(model, self.layers, self.stored, sources)
            convrot.install_skeletons(model, self.layers)
        else:
            from .policy_file import check_policy_layers, linear_names
            from .presets import check_layers

            policy = self.quantization_config.policy_for(model)
            if self.quantization_config.policy is not None:
                check_policy_layers(policy, linear_names(model), type(model).__name__)
            check_layers(model, policy, self.quantization_config.group_size)
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and not isinstance(module, convrot.ConvLinear):
                    kind = convrot.policy.layer_kind(name, policy)[0]
                    if kind != "skip":
                        self.pending[name] = kind
        model.config.quantization_config = self.quantization_config

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs):
        if self.pre_quantized:
            return True  # every tensor: its checksum is checked and its dtype chosen in create_quantized_param
        return param_name.rpartition(".")[0] in self.pending and param_name.rpartition(".")[2] in ("weight", "bias")

    def _kept_fp32(self, name: str) -> bool:
        """Whether a tensor is a quantized layer's scale or bias, which the kernels read in fp32."""
        layer, _, leaf = name.rpartition(".")
        return layer in self.layers and leaf in ("weight_scale", "bias")

    def create_quantized_param(
        self, model, param_value, param_name, target_device, state_dict, unexpected_keys, **kwargs
    ):
        if self.pre_quantized:
            stored = state_dict[param_name]
            if convrot.tensor_checksum(stored.cpu()) != self.checksums.get(param_name):
                raise convrot.CheckpointError(
                    f"{self.files.get(param_name, 'the checkpoint')}: tensor {param_name!r} is corrupted "
                    "(checksum mismatch)"
                )
            dtype = stored.dtype
            if self._kept_fp32(param_name):
                dtype = torch.float32  # saves from before biases were kept in fp32 hold them in bf16
            elif self.torch_dtype is not None and stored.is_floating_point():
                dtype = self.torch_dtype
            if dtype == stored.dtype and stored.device.type == "cpu" and torch.device(target_device).type == "cpu":
                # The file's tensors lie in one buffer, some only 8-byte aligned, and CPU BLAS rounds fp32 GEMMs
                # of unaligned operands differently: a copy of its own keeps outputs those of the saved model.
                stored = stored.clone()
            set_module_tensor_to_device(model, param_name, target_device, value=stored, dtype=dtype)
            self.loaded.add(param_name)
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

    def _buffer_dtype(self, name: str) -> torch.dtype:
        if self.torch_dtype is not None:
            return self.torch_dtype
        if self.buffer_dtypes is not None and name in self.buffer_dtypes:
            return self.buffer_dtypes[name]
        # Saves from before buffer dtypes were recorded: the dtype most of the saved unquantized tensors have.
        dtypes = Counter(
            dtype
            for key, (_, dtype) in self.stored.items()
            if dtype is not None and dtype.is_floating_point and not self._kept_fp32(key)
        )
        return dtypes.most_common(1)[0][0] if dtypes else torch.float32

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            if missing := set(self.stored) - self.loaded:
                sources = ", ".join(sorted(set(self.files.values())))
                raise convrot.CheckpointError(f"{sources}: tensor(s) {sorted(missing)[:5]} were not loaded")
            for name, buffer in _non_persistent_buffers(model).items():
                _set_tensor(model, name, buffer.to(self._buffer_dtype(name)))
            # The skeletons were built in the default dtype: the LoRA layers PEFT adds take the model's.
            float_dtype = self._buffer_dtype("")
            for module in model.modules():
                if isinstance(module, convrot.ConvLinear):
                    module.float_dtype = float_dtype
        elif self.pending:
            missing = sorted(self.pending)
            raise ValueError(f"the checkpoint lacks the weights of {len(missing)} layer(s) to quantize: {missing[:5]}")
        self.bind(model)
        return model

    # -- save_pretrained -------------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        if not safe_serialization:
            raise ValueError("a ConvRot transformer is saved as safetensors: save_pretrained(safe_serialization=True)")
        model = self._model() if self._model is not None else None
        if model is None:
            raise ValueError("this ConvRotQuantizer is bound to no transformer (quantize_transformer binds one)")
        _refuse_loaded_adapters(model)
        from .fusion import separate_layers_state

        state, layers = separate_layers_state(model, state_dict)
        tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
        metadata = convrot.checkpoint_metadata(layers, tensors)
        buffers = _non_persistent_buffers(model)
        metadata[BUFFER_DTYPES_KEY] = json.dumps({name: _dtype_name(b.dtype) for name, b in buffers.items()})
        return tensors, metadata

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def _refuse_loaded_adapters(model) -> None:
    """A ConvRot save holds the quantized base layers only: with LoRA adapters loaded, PEFT's wrappers would
    rename them (``to_q.base_layer.qweight``) and the adapters' weights would go in with them, a directory
    that loads into nothing."""
    wrapped = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "base_layer", None), convrot.ConvLinear)
    ]
    if wrapped:
        raise ValueError(
            f"the transformer has LoRA adapters loaded ({len(wrapped)} layers, e.g. {wrapped[0]}): call "
            "unload_lora_weights() (or transformer.unload_lora()) before saving it; save the adapters with "
            "save_lora_adapter"
        )


def attach_quantizer(transformer, config: ConvRotConfig) -> None:
    """Gives a transformer quantized in memory (convrot.quantize_model) the quantizer a from_pretrained load
    would have given it, so that save_pretrained writes a ConvRot checkpoint."""
    ConvRotQuantizer(config, pre_quantized=True).bind(transformer)


def register() -> None:
    """Adds ConvRot to diffusers' auto-quantizer mappings (idempotent)."""
    import warnings

    from diffusers.quantizers import auto

    found = installed_diffusers()
    if found < MIN_DIFFUSERS:
        raise ImportError(f"convrot-diffusers needs diffusers {RANGE_TEXT}, found {found}")
    if not (hasattr(auto, "AUTO_QUANTIZER_MAPPING") and hasattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING")):
        raise ImportError(f"diffusers {found} has no auto-quantizer mappings: ConvRotConfig cannot be registered")
    if not diffusers_in_range(found):
        warnings.warn(
            f"convrot-diffusers is tested with diffusers {RANGE_TEXT}, found {found}: "
            "fusing Flux blocks is refused, and saving or loading may fail",
            stacklevel=2,
        )
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, ConvRotQuantizer)
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, ConvRotConfig)


# When this module is what first imports diffusers, the registration hook leaves the registering to it.
register()
