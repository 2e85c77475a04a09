"""Quantization presets per architecture: which Linear gets W4A4, W8A8, W4A8 or stays in bf16.

``w4a4`` quantizes every Linear of the blocks to W4A4; ``w4a8`` the same layers with 8-bit
activations (the weights, and so the file, as w4a4's); ``w4a8g64`` and ``w4a4g64`` with
group-scaled 4-bit weights (a multiplier per 64 codes: 1/64 byte more per weight,
docs/format.md); ``mix`` mixes W4A4, W8A8 and bf16 within at most 0.35x the bf16 weight bytes: Flux's
is derived from a per-role sensitivity measurement (benchmarks/measure_sensitivity.py), PixArt's and
SD3's follow the ConvRot paper's Flux table (Table 8) by analogy.

A preset is an ordered list of rules (glob pattern on the module name, kind,
reason); the first matching rule decides, as in a convrot-core policy.
``<last>`` in a pattern stands for the index of the last block of that block
list, resolved from the transformer's config. Every preset ends with a
catch-all "skip": the embedders (x_embedder, context_embedder /
caption_projection, time/text embedders, PixArt's adaln_single) and the final
norm_out/proj_out stay in bf16.

Any other diffusers transformer gets the generic preset of the same name (``generic_rules``),
derived from the roles every DiT's modules have rather than from names: the blocks are the
transformer's ``nn.ModuleList`` children holding Linear layers; everything outside them
(patch/text/time embedders, a global AdaLN modulation as Flux.2's or Wan's, the final
norm_out/proj_out) stays in bf16 for the catch-all's reason; inside them every Linear (per-block
AdaLN included) is W4A4, and mix adds what the three presets' mix tables share: attention output
projections at W8A8 and the last block's feed-forward down-projections out of W4A4 (in bf16, as
PixArt's and SD3's have them; Flux's measured mix has them at W8A8).

The measurements quoted in the reasons come from random-weight models (the tiny demos, and Flux at
real width in benchmarks/results/sensitivity_flux_h100.json) and from the one trained transformer
available offline, all-MiniLM-L6-v2 (results/sensitivity_minilm.json); docs/diffusers.md has the
tables and how to reproduce them. Random weights show structural sensitivity (a layer's width,
its inputs, its place in the stack), not the outliers that drive it in trained checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .detect import GENERIC_TESTED, Architecture, UnsupportedModelError, architecture_of, is_preset_class

# torch and convrot are imported where they are used: the `convrot` command reads the preset
# names for its --help before anything heavy is loaded.

PRESET_NAMES = ("mix", "w4a4", "w4a8", "w4a8g64", "w4a4g64")
DEFAULT_PRESET = "mix"


@dataclass(frozen=True)
class Rule:
    pattern: str
    kind: str  # a kind of convrot.KINDS: "w4a4", "w8a8", "w4a8", "w4a8g64", "w4a4g64" or "skip"
    reason: str


_KEEP_REST = Rule(
    "*",
    "skip",
    "outside the blocks: embedders and the final norm_out/proj_out are <1% of the weights and set the scale of "
    "every token; quantizing them too drops the demo's transformer-output SQNR from 32 dB to 13 dB (Flux)",
)

_ADALN_W4A4 = (
    "AdaLN modulation (shift/scale/gate for every token) included, as in the paper's Table 8 for Flux: mix is held "
    "to at most 0.35x the bf16 weight bytes, and AdaLN is 27% of Flux's weights and 32-33% of SD3's; W8A8 there "
    "would cost 0.07 (Flux) / 0.08 (SD3) of the bf16 bytes for +1.5 / +1.3 dB demo transformer-output SQNR"
)

# benchmarks/measure_sensitivity.py: per-role sensitivity on the one trained transformer available offline,
# all-MiniLM-L6-v2 (a BERT encoder: results/sensitivity_minilm.json) and on random-weight Flux, at real width
# (3 double + 6 single blocks at width 3072, H100: results/sensitivity_flux_h100.json) and tiny
# (sensitivity_flux_tiny.json). "Gain" is the model output's SQNR with that role alone moved out of all-W4A4
# blocks, against all-W4A4 (Flux 29.98 dB, MiniLM 4.23 dB); per GB / MB: of the extra weight bytes it costs.
_MEASURED_ATTENTION = (
    "measured on trained weights (all-MiniLM-L6-v2): the attention output projection has the lowest per-layer "
    "W4A4 SQNR (13.4 dB; values 14.2 dB, the other roles 15.4-21.2 dB), and W8A8 on it and on the values are "
    "among the first upgrades a derivation by output SQNR per byte takes"
)
_MEASURED_LAST_FF = (
    "kept in bf16 as the paper has it, though no measurement here shows bf16 buying more than W8A8 there "
    "(output SQNR gain W8A8 / bf16: MiniLM's last FFN down-projection +0.16 / +0.16 dB, the real-width random "
    "Flux's last image FFN down-projection +0.20 / +0.20 dB, the tiny one's +0.29 / +0.28 dB)"
)
_FLUX_H100 = "real-width random Flux (sensitivity_flux_h100.json)"
_FLUX_DERIVED = (
    "taken by the derivation (the upgrades removing the most output noise per extra byte, each worth >= 0.2 dB, "
    "within the Table 8 mix's bytes), whose mix measured 32.16 dB at 0.302x bf16 block bytes against the Table 8 "
    "mix's 30.39 dB at 0.311x"
)
_BF16_NO_BETTER = "bf16 buys no more than W8A8 in every measurement, for twice the extra bytes"

_FLUX_MIX = (
    # W8A8 where the measurement finds the most output SQNR per byte ...
    Rule(
        "transformer_blocks.*.ff.net.2",
        "w8a8",
        f"image FFN down-projection (GELU-skewed inputs: the lowest per-layer W4A4 SQNR of the double blocks, "
        f"12.6 dB); {_FLUX_H100}: W8A8 gain +0.36 dB (9.6 dB/GB) in blocks before the last, +0.20 dB (10.6 dB/GB) "
        f"in the last, {_FLUX_DERIVED}; trained MiniLM agrees: its FFN down-projection gains +1.69 dB (1.14 dB/MB); "
        f"the paper's Table 8 keeps the last block's in bf16, but {_BF16_NO_BETTER} (W8A8 / bf16 gain: Flux's last "
        "+0.20 / +0.20 dB, MiniLM's last +0.16 / +0.16 dB): the measurement is followed",
    ),
    Rule(
        "transformer_blocks.*.ff.net.0.proj",
        "w8a8",
        f"image FFN up-projection; {_FLUX_H100}: W8A8 gain +0.34 dB (9.1 dB/GB) in blocks before the last, "
        f"{_FLUX_DERIVED}; the last block's (+0.15 dB, 8.1 dB/GB, under the 0.2 dB a one-layer role rarely "
        "reaches) goes with them; trained MiniLM agrees: its FFN up-projection gains +1.35 dB (0.92 dB/MB)",
    ),
    Rule(
        "single_transformer_blocks.*.norm.linear",
        "w8a8",
        f"single-block AdaLN modulation (one conditioning row sets the shift/scale/gate of every token); "
        f"{_FLUX_H100}: W8A8 gain +0.75 dB (10.6 dB/GB) before the last block, +0.14 dB (9.7 dB/GB) in the last, "
        f"the best per byte of all roles, {_FLUX_DERIVED}; MiniLM (BERT) has no AdaLN, the paper's Table 8 keeps "
        "it at W4A4: the measurement is followed, its 9% of Flux.1-dev's weights at W8A8 costing 0.023 of the "
        "bf16 bytes",
    ),
    Rule(
        "transformer_blocks.<last>.norm1.linear",
        "w8a8",
        f"the last double block's image AdaLN modulation; {_FLUX_H100}: W8A8 gain +0.20 dB (7.2 dB/GB), "
        f"{_FLUX_DERIVED}; the earlier double blocks' (+0.34 dB, 5.9 dB/GB) fell outside that budget, "
        "norm1_context.linear (text stream) gains +0.01 dB",
    ),
    # ... and the paper's W8A8 attention output, where the trained model outweighs the random one.
    Rule(
        "transformer_blocks.*.attn.to_out.0",
        "w8a8",
        f"paper Table 8: image attention output projection; {_FLUX_H100}: W8A8 gain only +0.03 dB (3.1 dB/GB), "
        "not taken by the derivation; kept because the trained model disagrees: MiniLM's attention output has "
        "its lowest per-layer W4A4 SQNR (13.4 dB) and gains +0.65 dB (1.77 dB/MB, more per byte than its FFN "
        "layers), and random weights lack the trained outliers that make it fragile; 1.5% of Flux.1-dev's "
        "weights, 0.004 of the bf16 bytes",
    ),
    Rule(
        "transformer_blocks.*",
        "w4a4",
        f"the rest of the double-stream blocks: attention q/k/v (W8A8 gain <= +0.01 dB each on the {_FLUX_H100}), "
        "the text stream (ff_context, add_*_proj, to_add_out, norm1_context: <= +0.01 dB; Table 8's bf16 "
        f"ff_context.net.2 in the last block gains -0.00 / +0.00 dB at W8A8 / bf16, so the measurement is "
        "followed) and the earlier blocks' norm1.linear (outside the budget)",
    ),
    Rule(
        "single_transformer_blocks.*",
        "w4a4",
        f"the rest of the single-stream blocks; {_FLUX_H100}: q/k/v gain <= +0.004 dB at W8A8 (the last block's "
        "to_v -0.01 dB), so Table 8's W8A8 to_v is not followed (trained MiniLM's values gain +0.30 dB, "
        "0.81 dB/MB, less per byte than its FFN layers; its last layer's +0.27 dB is its best, but Flux's last "
        "to_v measures -0.01 dB), and q, k, v keep one kind (fusable, and one ComfyUI linear1); proj_out "
        "(+0.96 dB, 8.1 dB/GB) and proj_mlp (+0.72 dB, 7.6 dB/GB) came next, but proj_out at W8A8 would put "
        "Flux.1-dev's mix at 0.350x bf16, over the budget, and proj_mlp (0.343x) past the derivation's; "
        "Table 8's bf16 proj_out in the last "
        f"block gains +0.16 / +0.16 dB at W8A8 / bf16 ({_BF16_NO_BETTER}), under the derivation's 0.2 dB",
    ),
    _KEEP_REST,
)

# PixArt and SD3 have no real-width measurement: their mix follows Table 8 by analogy, as before.
_NOT_CARRIED_OVER = (
    "kept: the finding that bf16 buys no more than W8A8 on this role (W8A8 / bf16 output SQNR gain: Flux at "
    "real width +0.20 / +0.20 dB, MiniLM +0.16 / +0.16 dB), on which Flux's mix puts it at W8A8, is not "
    "measured on this architecture"
)

PRESETS: dict[str, dict[str, tuple[Rule, ...]]] = {
    "flux": {
        "w4a4": (
            Rule("transformer_blocks.*", "w4a4", "every Linear of the double-stream blocks, AdaLN included"),
            Rule("single_transformer_blocks.*", "w4a4", "every Linear of the single-stream blocks, AdaLN included"),
            _KEEP_REST,
        ),
        "mix": _FLUX_MIX,
    },
    "pixart": {
        "w4a4": (
            Rule("transformer_blocks.*", "w4a4", "every Linear of the blocks (PixArt's AdaLN is global, outside them)"),
            _KEEP_REST,
        ),
        "mix": (
            Rule(
                "transformer_blocks.<last>.ff.net.2",
                "skip",
                "as Flux's bf16 set: the last block's FFN down-projection, the lowest per-layer SQNR class "
                "(demo 14.1-14.4 dB, every other class 14.9-17.6 dB) and the last write into the residual stream; "
                + _NOT_CARRIED_OVER,
            ),
            Rule(
                "transformer_blocks.*.attn2.to_out.0",
                "w8a8",
                "as Flux's W8A8 attention outputs: cross-attention output, the most sensitive class when each "
                "class alone is W4A4 (demo transformer-output SQNR 47.1 dB vs >= 52.6 dB for all but attn2.to_v)",
            ),
            Rule(
                "transformer_blocks.*.attn2.to_v",
                "w8a8",
                "as Flux's W8A8 value projection: cross-attention values carry the text conditioning, the second "
                "most sensitive class (47.9 dB)",
            ),
            Rule("transformer_blocks.*", "w4a4", "the rest of the blocks"),
            _KEEP_REST,
        ),
    },
    "sd3": {
        "w4a4": (
            Rule("transformer_blocks.*", "w4a4", "every Linear of the blocks, AdaLN included"),
            _KEEP_REST,
        ),
        "mix": (
            Rule(
                "transformer_blocks.<last>.ff.net.2",
                "skip",
                "as Flux's bf16 set: the last block's FFN down-projection, the lowest per-layer SQNR class "
                "(demo 13.8-14.0 dB, most others 14.0-16.7 dB); the last block has no text FFN (context_pre_only); "
                + _NOT_CARRIED_OVER,
            ),
            Rule(
                "transformer_blocks.*.attn.to_out.0",
                "w8a8",
                "as Flux's mix: image attention output projection (class ablation: 41.7 dB, 4th most sensitive of 18)",
            ),
            Rule(
                "transformer_blocks.*.attn2.to_out.0",
                "w8a8",
                "SD3.5's second (image-only) attention: its output projection, as attn.to_out.0",
            ),
            Rule(
                "transformer_blocks.*",
                "w4a4",
                "the rest of the blocks, " + _ADALN_W4A4 + "; Flux's measured W8A8 image FFN layers are not carried "
                "over: no real-width SD3 measurement, and what fits SD3's budget depends on its own layer shares",
            ),
            _KEEP_REST,
        ),
    },
}


# Why each all-4-bit-weights preset exists (all-MiniLM-L6-v2, every Linear quantized, mean
# embedding cosine to the unquantized model: convrot-core's tests/test_linear_fidelity.py).
_SCHEME_REASONS = {
    "w4a8": "W4A8: w4a4's weights with 8-bit activations, for models W4A4 loses too much on (MiniLM embedding "
    "cosine 0.931 vs W4A4's 0.890); the same file size, the int8 GEMM main loop on Hopper",
    "w4a8g64": "W4A8 with group-scaled weights (a multiplier per 64 codes): MiniLM embedding cosine 0.954, "
    "1/64 byte more per weight than w4a8",
    "w4a4g64": "W4A4 with group-scaled weights (a multiplier per 64 codes): MiniLM embedding cosine 0.912 vs "
    "W4A4's 0.890",
}


def _all_4bit_weights(rules: tuple[Rule, ...], kind: str) -> tuple[Rule, ...]:
    """The w4a4 preset's rules with its W4A4 layers given ``kind`` instead."""
    return tuple(
        Rule(rule.pattern, kind, f"{rule.reason}; {_SCHEME_REASONS[kind]}") if rule.kind == "w4a4" else rule
        for rule in rules
    )


for _presets in PRESETS.values():
    for _kind in _SCHEME_REASONS:
        _presets[_kind] = _all_4bit_weights(_presets["w4a4"], _kind)


def check_preset(preset: str) -> None:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")


def preset_rules(architecture: Architecture, preset: str, config) -> list[Rule]:
    """The preset's rules with ``<last>`` resolved from the transformer config (a dict or a diffusers config)."""
    check_preset(preset)
    counts = {blocks: int(config[key]) for blocks, key in architecture.block_counts}
    rules = []
    for rule in PRESETS[architecture.name][preset]:
        pattern = rule.pattern
        if "<last>" in pattern:
            blocks = pattern.split(".<last>")[0]
            if counts[blocks] == 0:  # a model without this block list has no such layer
                continue
            pattern = pattern.replace("<last>", str(counts[blocks] - 1))
        rules.append(Rule(pattern, rule.kind, rule.reason))
    return rules


def block_lists(transformer) -> list[str]:
    """The names of the transformer's block lists: its ``nn.ModuleList`` children holding Linear layers."""
    from torch import nn

    return [
        name
        for name, child in transformer.named_children()
        if isinstance(child, nn.ModuleList) and any(isinstance(m, nn.Linear) for m in child.modules())
    ]


def _attention_outputs(block) -> list[str]:
    """Names (in the block) of its attention modules' output projections: ``to_out.0`` or a Linear ``to_out``."""
    from torch import nn

    found = []
    for name, module in block.named_modules():
        to_out = getattr(module, "to_out", None)
        if isinstance(to_out, nn.Linear):
            found.append(f"{name}.to_out")
        elif isinstance(to_out, (nn.ModuleList, nn.Sequential)) and len(to_out) and isinstance(to_out[0], nn.Linear):
            found.append(f"{name}.to_out.0")
    return found


def _feed_forward_outputs(block) -> list[str]:
    """Names (in the block) of its feed-forward down-projections: the last Linear of each child that holds
    two or more Linear layers and no attention (``ff.net.2``, Flux.2's ``ff.linear_out``, Wan's ``ffn.net.2``)."""
    from torch import nn

    found = []
    for child_name, child in block.named_children():
        linears = [name for name, m in child.named_modules() if isinstance(m, nn.Linear)]
        has_attention = any(hasattr(m, "to_out") for m in child.modules())
        if len(linears) >= 2 and not has_attention:
            found.append(f"{child_name}.{linears[-1]}")
    return found


_GENERIC_BLOCKS = "every Linear of the blocks, per-block AdaLN modulation included (" + _ADALN_W4A4 + ")"
_GENERIC_ATTENTION_OUT = (
    "as the W8A8 attention outputs of the Flux, PixArt and SD3 mix tables: the attention output projection, "
    "the most sensitive class in PixArt's class ablation (47.1 dB) and 4th of 18 in SD3's (41.7 dB); "
    + _MEASURED_ATTENTION
)
_GENERIC_LAST_FF = (
    "as the bf16 set of the PixArt and SD3 mix tables (Flux's measured mix: W8A8): the last block's "
    "feed-forward down-projection, "
    "the lowest per-layer SQNR class and the last write into the residual stream; " + _MEASURED_LAST_FF
)


def generic_rules(transformer, preset: str = DEFAULT_PRESET) -> list[Rule]:
    """The role-based rules of ``preset`` for a diffusers transformer without a preset of its own."""
    check_preset(preset)
    lists = block_lists(transformer)
    if not lists:
        raise UnsupportedModelError(
            f"{type(transformer).__name__} has no block list (an nn.ModuleList of blocks holding Linear layers): "
            "the generic policy cannot tell its blocks from its embedders; pass a convrot policy to "
            "convrot.quantize_model instead"
        )
    rules = []
    if preset == "mix":
        for list_name in lists:
            blocks = getattr(transformer, list_name)
            last = len(blocks) - 1
            rules += [
                Rule(f"{list_name}.{last}.{name}", "skip", _GENERIC_LAST_FF)
                for name in _feed_forward_outputs(blocks[last])
            ]
        for list_name in lists:
            blocks = getattr(transformer, list_name)
            outputs = dict.fromkeys(name for block in blocks for name in _attention_outputs(block))
            rules += [Rule(f"{list_name}.*.{name}", "w8a8", _GENERIC_ATTENTION_OUT) for name in outputs]
    kind = "w4a4" if preset == "mix" else preset
    reason = _GENERIC_BLOCKS if kind == "w4a4" else f"{_GENERIC_BLOCKS}; {_SCHEME_REASONS[kind]}"
    rules += [Rule(f"{list_name}.*", kind, reason) for list_name in lists]
    rules.append(_KEEP_REST)
    return rules


def _rules_for(transformer, preset: str) -> list[Rule]:
    class_name = type(transformer).__name__
    if is_preset_class(class_name):
        return preset_rules(architecture_of(transformer), preset, transformer.config)
    rules = generic_rules(transformer, preset)
    if class_name not in GENERIC_TESTED:
        warnings.warn(
            f"{class_name} is untested with ConvRot: it is quantized through the generic role-based policy "
            f"(blocks: {', '.join(block_lists(transformer))}); tested: {', '.join(GENERIC_TESTED)} and the "
            "Flux.1 / PixArt / SD3 presets. Compare its output with the unquantized model's",
            stacklevel=3,
        )
    return rules


def check_layers(transformer, policy: dict[str, str], group_size: int) -> None:
    """Raises a ValueError naming the first Linear the policy quantizes that cannot be (in_features no
    multiple of 4, or of 64 for group-scaled weights), before any weight is read or converted."""
    from torch import nn

    import convrot

    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, convrot.ConvLinear):  # quantized already
            continue
        kind = layer_kind(policy, name)
        if kind == "skip":
            continue
        try:
            convrot.resolve_group_size(module.in_features, group_size)
            cls, act_bits, weight_group_size = convrot.linear.SCHEMES[kind]
            convrot.linear.check_scheme(kind, cls.bits, act_bits, weight_group_size, module.in_features)
        except ValueError as error:
            raise ValueError(f"layer {name!r} cannot be quantized to {kind}: {error}") from None


def policy_for(transformer, preset: str = DEFAULT_PRESET) -> dict[str, str]:
    """The convrot-core policy (pattern -> kind, first match wins) of ``preset`` for this transformer:
    its architecture's preset, or for any other diffusers transformer the generic role-based rules
    (with a warning when the architecture is not one of detect.GENERIC_TESTED).

    Rules that decide no layer of this model (e.g. SD3.5's attn2 on SD3-medium) are left out.
    """
    from torch import nn

    import convrot

    rules = _rules_for(transformer, preset)
    policy = {rule.pattern: rule.kind for rule in rules}
    linears = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, convrot.ConvLinear)
    ]
    deciding = {convrot.policy.layer_kind(name, policy)[1] for name in linears}
    return {pattern: kind for pattern, kind in policy.items() if pattern in deciding}


def layer_kind(policy: dict[str, str], name: str) -> str:
    """The kind the policy gives the module ``name``."""
    import convrot

    return convrot.policy.layer_kind(name, policy)[0]
