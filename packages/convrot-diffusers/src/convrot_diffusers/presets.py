"""Quantization presets per architecture: which Linear gets W4A4, W8A8, W4A8 or stays in bf16.

``w4a4`` quantizes every Linear of the blocks to W4A4; ``w4a8`` the same layers with 8-bit
activations (the weights, and so the file, as w4a4's); ``w4a8g64`` and ``w4a4g64`` with
group-scaled 4-bit weights (a multiplier per 64 codes: 1/64 byte more per weight,
docs/format.md); ``mix`` is the paper's mixed W4A4/W8A8/bf16 table.

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
projections at W8A8 and the last block's feed-forward down-projections in bf16.

The measurements quoted in the reasons come from the tiny random-weight demo
models (docs/diffusers.md has the tables and how to reproduce them); they are
weak evidence for trained checkpoints, where outliers drive sensitivity.
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

# benchmarks/measure_sensitivity.py (results/sensitivity_minilm.json, sensitivity_flux_tiny.json): per-role
# sensitivity on the one trained transformer available offline, all-MiniLM-L6-v2 (a BERT encoder), and on a
# tiny random-weight Flux. The mix rules stay the paper's; the measurement's verdict on each is in its reason.
_MEASURED_ATTENTION = (
    "measured on trained weights (all-MiniLM-L6-v2): the attention output projection has the lowest per-layer "
    "W4A4 SQNR (13.4 dB; values 14.2 dB, the other roles 15.4-21.2 dB), and W8A8 on it and on the values are "
    "among the first upgrades a derivation by output SQNR per byte takes"
)
_MEASURED_LAST_FF = (
    "kept in bf16 as the paper has it, though no measurement here shows bf16 buying more than W8A8 there "
    "(output SQNR gain W8A8 / bf16: MiniLM's last FFN down-projection +0.16 / +0.16 dB, the tiny random Flux's "
    "+0.29 / +0.28 dB)"
)

PRESETS: dict[str, dict[str, tuple[Rule, ...]]] = {
    "flux": {
        "w4a4": (
            Rule("transformer_blocks.*", "w4a4", "every Linear of the double-stream blocks, AdaLN included"),
            Rule("single_transformer_blocks.*", "w4a4", "every Linear of the single-stream blocks, AdaLN included"),
            _KEEP_REST,
        ),
        "mix": (
            # ConvRot paper, Table 8 (Flux.1-dev mixed precision): the most sensitive layers stay bf16 ...
            Rule(
                "single_transformer_blocks.<last>.proj_out",
                "skip",
                "paper Table 8: last block's output projection (attention out + MLP down) feeds norm_out directly; "
                + _MEASURED_LAST_FF,
            ),
            Rule(
                "transformer_blocks.<last>.ff.net.2",
                "skip",
                "paper Table 8: last double block's image FFN down-projection (GELU inputs: lowest per-layer SQNR); "
                + _MEASURED_LAST_FF,
            ),
            Rule(
                "transformer_blocks.<last>.ff_context.net.2",
                "skip",
                "paper Table 8: last double block's text FFN down-projection",
            ),
            # ... and the attention output path goes W8A8; everything else in the blocks is W4A4.
            Rule(
                "transformer_blocks.*.attn.to_out.0",
                "w8a8",
                "paper Table 8: image attention output projection; " + _MEASURED_ATTENTION,
            ),
            Rule(
                "single_transformer_blocks.*.attn.to_v",
                "w8a8",
                "paper Table 8: single-stream value projection; " + _MEASURED_ATTENTION,
            ),
            Rule("transformer_blocks.*", "w4a4", "the rest of the double-stream blocks, " + _ADALN_W4A4),
            Rule("single_transformer_blocks.*", "w4a4", "the rest of the single-stream blocks, " + _ADALN_W4A4),
            _KEEP_REST,
        ),
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
                "(demo 14.1-14.4 dB, every other class 14.9-17.6 dB) and the last write into the residual stream",
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
                "(demo 13.8-14.0 dB, most others 14.0-16.7 dB); the last block has no text FFN (context_pre_only)",
            ),
            Rule(
                "transformer_blocks.*.attn.to_out.0",
                "w8a8",
                "as Flux: image attention output projection (class ablation: 41.7 dB, 4th most sensitive of 18)",
            ),
            Rule(
                "transformer_blocks.*.attn2.to_out.0",
                "w8a8",
                "SD3.5's second (image-only) attention: its output projection, as attn.to_out.0",
            ),
            Rule("transformer_blocks.*", "w4a4", "the rest of the blocks, " + _ADALN_W4A4),
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
    "as the bf16 set of the Flux, PixArt and SD3 mix tables: the last block's feed-forward down-projection, "
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
