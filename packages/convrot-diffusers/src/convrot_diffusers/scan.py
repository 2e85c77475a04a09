"""A quantization policy for the user's own model and prompt, under a size budget.

``convrot scan`` records every Linear's inputs during one bf16 generation, measures each layer's
output SQNR under each scheme (sensitivity.py), and picks per layer the scheme that keeps the
transformer's Linear weights within the budget with the least total output noise: the sum over
layers of 10^(-SQNR/10), each layer's noise power relative to its output's. A greedy
exchange starts every layer at its cheapest scheme and repeatedly takes the upgrade that removes
the most noise per extra byte while the budget allows (bf16, kind "skip", has no noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .sensitivity import LayerSensitivity

# Bytes per weight of each kind (docs/format.md): packed 4-bit codes, plus one uint8 multiplier
# per 64 codes for group-scaled ones; int8; bf16. Quantized layers add an fp32 scale per output.
WEIGHT_BYTES = {"w4a4": 0.5, "w4a8": 0.5, "w4a8g64": 0.5 + 1 / 64, "w8a8": 1.0, "skip": 2.0}
# The SQNR column of LayerSensitivity each kind is judged by.
SQNR_FIELDS = {"w4a4": "sqnr_w4a4_db", "w4a8": "sqnr_w4a8_db", "w4a8g64": "sqnr_w4a8g64_db", "w8a8": "sqnr_w8a8_db"}


@dataclass(frozen=True)
class Choice:
    kind: str
    bytes: float
    noise: float  # relative output noise power, 10^(-SQNR/10); 0 for bf16


def layer_bytes(row: LayerSensitivity, kind: str) -> float:
    weights = row.in_features * row.out_features * WEIGHT_BYTES[kind]
    return weights + (0 if kind == "skip" else 4 * row.out_features)


def choices(row: LayerSensitivity) -> list[Choice]:
    """The layer's measured options (a scheme whose SQNR is NaN, e.g. groups that do not divide
    in_features, is left out), cheapest first."""
    options = [Choice("skip", layer_bytes(row, "skip"), 0.0)]
    for kind, field in SQNR_FIELDS.items():
        sqnr = getattr(row, field)
        if not math.isnan(sqnr):
            options.append(Choice(kind, layer_bytes(row, kind), 10 ** (-sqnr / 10)))
    return sorted(options, key=lambda c: (c.bytes, c.noise))


def bf16_bytes(rows: Sequence[LayerSensitivity]) -> float:
    return sum(layer_bytes(row, "skip") for row in rows)


def policy_under_budget(rows: Sequence[LayerSensitivity], max_bytes: float) -> tuple[dict[str, str], float]:
    """(policy {layer name: kind} ending with "*": "skip", bytes of the layers' weights) with the
    least total noise the greedy exchange finds within ``max_bytes``; ValueError when even the
    cheapest scheme of every layer exceeds it."""
    options = [choices(row) for row in rows]
    picked = [opts[0] for opts in options]
    total = sum(c.bytes for c in picked)
    if total > max_bytes:
        raise ValueError(
            f"the budget of {max_bytes / 2**20:.1f} MiB is below the smallest the schemes allow "
            f"({total / 2**20:.1f} MiB for the scanned layers' weights)"
        )
    while True:
        best = None
        for i, opts in enumerate(options):
            current = picked[i]
            for option in opts:
                extra = option.bytes - current.bytes
                gain = current.noise - option.noise
                if gain <= 0 or total + extra > max_bytes:
                    continue
                rate = gain / extra if extra > 0 else math.inf
                if best is None or rate > best[0]:
                    best = (rate, i, option)
        if best is None:
            break
        _, i, option = best
        total += option.bytes - picked[i].bytes
        picked[i] = option
    policy = {row.layer: choice.kind for row, choice in zip(rows, picked, strict=True)}
    policy["*"] = "skip"  # layers the scan did not see stay as they are
    return policy, total
