"""rht_quantize with fused inputs (x2=, gelu_from=) against what it replaces, on Flux's shapes. One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_fused_inputs.py

bf16 activations, 4 bits, group 256. Per shape, median microseconds per call
(bench_primitives.time_per_call: CUDA-graph replays, inputs cycled past twice
the L2) of:
- fused: rht_quantize_into(x, ..., x2=, gelu_from=), the row built on load;
- plain: rht_quantize_into of an already materialised row of the same width;
- torch + plain: the unfused model's eager path, torch GELU (and cat), then plain;
- clone: a bf16 clone of a row-width tensor (the bandwidth floor).
Last column: the fraction of code bytes equal to those of the row that torch's
GELU materialises (a code may differ where torch's and the kernel's fp32 GELU
round a value differently).
"""

from __future__ import annotations

import torch
from bench_primitives import copies_for, time_per_call
from torch.nn import functional as F

import convrot_kernels as ck

# (what, M, width of x, width of x2, gelu_from)
SHAPES = (
    ("Flux single-block proj_out", 4608, 3072, 12288, 3072),
    ("Flux feed-forward out, image", 4096, 12288, 0, 0),
    ("Flux feed-forward out, text", 512, 12288, 0, 0),
    ("Flux single-block proj_out, batch 4", 4 * 4608, 3072, 12288, 3072),
)


def materialised(x: torch.Tensor, x2: torch.Tensor | None, gelu_from: int) -> torch.Tensor:
    row = x if x2 is None else torch.cat([x, x2], dim=1)
    return torch.cat([row[:, :gelu_from], F.gelu(row[:, gelu_from:], approximate="tanh")], dim=1)


def bench(what: str, m: int, k1: int, k2: int, gelu_from: int) -> None:
    k = k1 + k2

    def new(cols: int) -> torch.Tensor:
        return torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)

    sets = []
    for _ in range(copies_for(m * k * 2)):
        q = torch.empty(m, k // 2, dtype=torch.uint8, device="cuda")
        sets.append((new(k1), new(k2) if k2 else None, new(k), q, torch.empty(m, device="cuda")))

    def fused(x, x2, row, q, scale):
        ck.rht_quantize_into(x, q, scale, 256, 4, x2=x2, gelu_from=gelu_from)

    def plain(x, x2, row, q, scale):
        ck.rht_quantize_into(row, q, scale, 256, 4)

    def torch_then_plain(x, x2, row, q, scale):
        ck.rht_quantize_into(materialised(x, x2, gelu_from), q, scale, 256, 4)

    def clone(x, x2, row, q, scale):
        row.clone()

    us = {fn.__name__: time_per_call(fn, sets) for fn in (fused, plain, torch_then_plain, clone)}
    x, x2 = sets[0][0], sets[0][1]
    expected, _ = ck.rht_quantize(materialised(x, x2, gelu_from), 256, 4)
    got, _ = ck.rht_quantize(x, 256, 4, x2=x2, gelu_from=gelu_from)
    equal = (got == expected).float().mean().item()
    print(
        f"| {what} | {m} | {k} | {us['fused']:.1f} | {us['plain']:.1f} | {us['torch_then_plain']:.1f} | "
        f"{us['clone']:.1f} | {us['fused'] / us['plain']:.2f} | {equal:.6f} |"
    )


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "| shape | M | row width | fused (us) | plain (us) | torch + plain (us) | clone (us) | fused / plain |"
        " code bytes equal |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in SHAPES:
        bench(*shape)


if __name__ == "__main__":
    main()
