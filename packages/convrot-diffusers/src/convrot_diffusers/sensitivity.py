"""Per-layer sensitivity: SQNR of each Linear's output under each scheme (W4A4, W8A8, W4A8 and
W4A8 with group-scaled weights) against its bf16 output.

The inputs are activations captured from a real denoising run, kept as a
uniform random sample (reservoir) of at most ``rows_per_layer`` token rows per
layer, so the memory stays bounded on full-size models.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

import convrot

from .metrics import sqnr


@dataclass
class LayerSensitivity:
    layer: str
    in_features: int
    out_features: int
    group_size: int
    precision: str  # what the preset being compared runs the layer in: "w4a4", "w8a8" or "bf16"
    sqnr_w4a4_db: float
    sqnr_w8a8_db: float
    sqnr_w4a8_db: float
    sqnr_w4a8g64_db: float  # NaN where in_features is not a multiple of 64


class ActivationRecorder:
    """Context manager recording a random sample of the input rows of every Linear of ``model``."""

    def __init__(self, model: nn.Module, rows_per_layer: int = 256, seed: int = 0):
        self.model = model
        self.rows_per_layer = rows_per_layer
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}
        self._handles = []

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and not isinstance(module, convrot.ConvLinear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu")
            self._add(name, rows)

        return record

    def _add(self, name: str, rows: torch.Tensor) -> None:
        # Vectorised reservoir sampling (Algorithm R): row i of the stream replaces
        # slot j ~ U[0, i] when j < capacity.
        seen = self.seen.get(name, 0)
        sample = self.samples.get(name)
        if sample is None or sample.shape[0] < self.rows_per_layer:
            free = self.rows_per_layer - (0 if sample is None else sample.shape[0])
            head, rows = rows[:free], rows[free:]
            sample = head.clone() if sample is None else torch.cat([sample, head])
            seen += head.shape[0]
        if rows.shape[0]:
            stream_index = torch.arange(seen, seen + rows.shape[0], dtype=torch.float64)
            uniform = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64)
            slots = torch.floor(uniform * (stream_index + 1))
            keep = slots < self.rows_per_layer
            sample[slots[keep].long()] = rows[keep]
            seen += rows.shape[0]
        self.samples[name] = sample
        self.seen[name] = seen


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    samples: dict[str, torch.Tensor],
    policy_precision,
    group_size: int = 256,
    progress: bool = False,
) -> list[LayerSensitivity]:
    """SQNR of every recorded Linear of ``model`` quantized alone, on its recorded inputs.

    ``policy_precision(name)`` gives the precision the preset assigns (for the report's column).
    """
    from tqdm.auto import tqdm

    results = []
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in samples]
    for name in tqdm(names, desc="per-layer SQNR", disable=not progress, unit="layer"):
        linear = model.get_submodule(name)
        x = samples[name].to(device=linear.weight.device, dtype=linear.weight.dtype)
        reference = linear(x)
        w4 = convrot.ConvLinear4bit.from_linear(linear, group_size=group_size)
        w8 = convrot.ConvLinear8bit.from_linear(linear, group_size=group_size)
        w4a8 = convrot.ConvLinear4bit.from_linear(linear, group_size=group_size, act_bits=8)
        grouped = math.nan
        if linear.in_features % 64 == 0:
            w4a8g = convrot.ConvLinear4bit.from_linear(linear, group_size=group_size, act_bits=8, weight_group_size=64)
            grouped = sqnr(reference, w4a8g(x))
        results.append(
            LayerSensitivity(
                layer=name,
                in_features=linear.in_features,
                out_features=linear.out_features,
                group_size=int(getattr(w4, "group_size", group_size)),
                precision=policy_precision(name),
                sqnr_w4a4_db=sqnr(reference, w4(x)),
                sqnr_w8a8_db=sqnr(reference, w8(x)),
                sqnr_w4a8_db=sqnr(reference, w4a8(x)),
                sqnr_w4a8g64_db=grouped,
            )
        )
    return results


def write_csv(results: list[LayerSensitivity], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(LayerSensitivity)])
        writer.writeheader()
        for row in results:
            values = asdict(row)
            for field in fields(LayerSensitivity):
                if field.name.startswith("sqnr_"):
                    values[field.name] = round(getattr(row, field.name), 3)
            writer.writerow(values)


_COLORS = {"w4a4": "tab:blue", "w8a8": "tab:orange", "bf16": "tab:gray"}


def plot(results: list[LayerSensitivity], path: Path, title: str, lowest: int = 6) -> None:
    """SQNR per layer in module order; dots coloured by the preset's precision, the lowest W4A4 layers named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 0.06 * len(results) + 4), 4.8), constrained_layout=True)
    x = range(len(results))
    ax.plot(x, [r.sqnr_w8a8_db for r in results], color="0.75", lw=1, label="W8A8 (any layer)")
    for precision, color in _COLORS.items():
        points = [(i, r.sqnr_w4a4_db) for i, r in enumerate(results) if r.precision == precision]
        if points:
            label = f"W4A4 SQNR; the preset runs it in {precision.upper() if precision != 'bf16' else precision}"
            ax.scatter(*zip(*points, strict=True), s=14, color=color, label=label, zorder=3)
    finite = [r for r in results if math.isfinite(r.sqnr_w4a4_db)]
    for r in sorted(finite, key=lambda r: r.sqnr_w4a4_db)[:lowest]:
        i = results.index(r)
        ax.annotate(r.layer, (i, r.sqnr_w4a4_db), fontsize=6, rotation=20, xytext=(3, -10), textcoords="offset points")
    ax.set_xlabel("Linear layer (module order)")
    ax.set_ylabel("SQNR vs bf16 output (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=4, bbox_to_anchor=(0.5, -0.12))
    fig.savefig(path, dpi=120)
    plt.close(fig)
