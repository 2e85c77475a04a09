"""The state dict of a quantized transformer answers ``state[f"{layer}.weight"]`` for its ConvLinear layers.

diffusers' Flux.1 LoRA loader (``FluxLoraLoaderMixin.load_lora_weights``, Flux.1 pipelines and Chroma)
looks up ``transformer.state_dict()[f"{layer}.weight"]`` (or ``.base_layer.weight`` once PEFT wrapped the
layer) for every layer a LoRA targets, for its shape only (Control-LoRA widening). A ConvLinear stores
``qweight``: it has no ``weight`` entry, and the lookup raised KeyError. bitsandbytes, GGUF and torchao pass
because they keep their data under ``weight``.

The state dict of a transformer given ``install_weight_lookup`` (every transformer convrot_diffusers
quantizes or loads) answers such a lookup with the layer's ``weight`` (its WeightStandIn: shape, dtype,
device, no values) without listing it: iterating, ``in``, ``len``, saving (``save_pretrained``,
``torch.save``, safetensors) and ``load_state_dict`` see exactly the tensors the model holds, as before.
diffusers offers quantizers no hook on that loader, so the answer comes from the state dict itself.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import convrot


class StateDictWithWeightLookup(OrderedDict):
    """A transformer's state dict that also answers ``state[f"{layer}.weight"]`` for its quantized layers
    (and ``f"{layer}.base_layer.weight"`` under PEFT's LoRA layer) with the layer's ``weight``, a
    WeightStandIn, which it does not list. ``get`` and ``in`` see only what it lists. It pickles, copies and
    saves as the plain OrderedDict it holds."""

    def __init__(self, state: OrderedDict, model):
        super().__init__(state)
        if hasattr(state, "_metadata"):
            self._metadata = state._metadata
        self._model = weakref.ref(model)

    def __missing__(self, key):
        model = self._model()
        name, _, leaf = key.rpartition(".")
        if model is None or leaf != "weight":
            raise KeyError(key)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(key) from None
        layer = getattr(module, "base_layer", module)  # PEFT's LoRA layer wraps the ConvLinear
        if isinstance(layer, convrot.ConvLinear):
            return layer.weight  # a layer with a GELU inside refuses it, naming unfuse_activations
        from .fusion import FusedAwayProjection

        if isinstance(module, FusedAwayProjection):
            raise ValueError(module.message())
        raise KeyError(key)

    def __reduce__(self):
        # As a plain OrderedDict: torch.load(weights_only=True) takes it, and a copy holds no model reference.
        state = {"_metadata": self._metadata} if hasattr(self, "_metadata") else None
        return OrderedDict, (), state, None, iter(self.items())


def _with_weight_lookup(module, state_dict, prefix, local_metadata):
    # Only the root module's returned dict is kept (torch's state_dict); a transformer inside another
    # module leaves the outer state dict as it is.
    return StateDictWithWeightLookup(state_dict, module) if prefix == "" else None


def install_weight_lookup(transformer) -> None:
    """Makes ``transformer.state_dict()`` a StateDictWithWeightLookup (idempotent; deep copies keep it)."""
    # torch's public register_state_dict_post_hook only edits the dict in place; the returned dict of
    # _register_state_dict_hook (which diffusers' own AttnProcsLayers uses) is kept for the root module.
    if _with_weight_lookup not in transformer._state_dict_hooks.values():
        transformer._register_state_dict_hook(_with_weight_lookup)
