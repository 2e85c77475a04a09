"""The state dict of a quantized transformer answers ``state[f"{layer}.weight"]`` for its ConvLinear layers.

diffusers' Flux.1 LoRA loader (``FluxLoraLoaderMixin.load_lora_weights``, Flux.1 pipelines and Chroma)
looks up ``transformer.state_dict()[f"{layer}.weight"]`` for every layer a LoRA targets (``.base_layer.weight``
when that name is ``in`` the state dict, once PEFT wrapped the layer), for its shape only (Control-LoRA
widening). A ConvLinear stores ``qweight``: it has no ``weight`` entry, and the lookup raised KeyError
(bitsandbytes, GGUF and torchao keep their data under ``weight``). Nor may the lookup fall through to PEFT's
layer: its ``weight`` is the base layer's ``qweight`` when it has one (GPTQ's convention), the packed codes.

The state dict of a transformer given ``install_weight_lookup`` (every transformer convrot_diffusers
quantizes or loads) answers those names (``[]``, ``in``, ``get``) with the layer's ``weight``, its
WeightStandIn (shape, dtype, device, no values), without listing them: iterating it, saving it
(``save_pretrained``, ``torch.save``, safetensors) and ``load_state_dict`` see exactly the tensors the model
holds, as before. diffusers offers quantizers no hook on that loader, so the answer comes from the state dict.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import convrot


class StateDictWithWeightLookup(OrderedDict):
    """A transformer's state dict that also answers ``state[f"{layer}.weight"]`` (``in``, ``get``) for its
    quantized layers, and ``f"{layer}.base_layer.weight"`` under PEFT's LoRA layer, with the layer's
    ``weight``, a WeightStandIn, without listing it: iteration, ``keys()`` and ``len`` see only the tensors
    the model holds. It pickles and saves as the plain OrderedDict it holds; a copy (``copy``, ``|``)
    answers as a plain dict does."""

    def __init__(self, state=(), model=None):
        super().__init__(state)
        if hasattr(state, "_metadata"):
            self._metadata = state._metadata
        self._model = None if model is None else weakref.ref(model)

    def _module(self, key: str):
        """The module whose ``weight`` the key names, or None."""
        model = None if self._model is None else self._model()
        name, _, leaf = key.rpartition(".") if isinstance(key, str) else ("", "", None)
        if model is None or leaf != "weight":
            return None
        try:
            return model.get_submodule(name)
        except AttributeError:
            return None

    def _quantized_layer(self, key: str):
        """The ConvLinear whose weight the key names (itself, or the base layer of PEFT's LoRA layer), or None."""
        module = self._module(key)
        layer = getattr(module, "base_layer", module)
        return layer if isinstance(layer, convrot.ConvLinear) else None

    def __missing__(self, key):
        if (layer := self._quantized_layer(key)) is not None:
            return layer.weight  # a layer with a GELU inside refuses it, naming unfuse_activations
        from .fusion import FusedAwayProjection

        if isinstance(module := self._module(key), FusedAwayProjection):
            raise ValueError(module.message())
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or self._quantized_layer(key) is not None

    def get(self, key, default=None):
        return self[key] if key in self else default

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
