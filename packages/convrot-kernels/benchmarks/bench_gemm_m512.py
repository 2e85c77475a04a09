"""gemm(bits=4) at the text stream's M (512, and 1024 for comparison) against bf16 F.linear.

    python packages/convrot-kernels/benchmarks/bench_gemm_m512.py

Runs itself three times: with the dispatcher's choice, and with the 128 x 128 and
128 x 256 sm90 kernels forced (CONVROT_GEMM_KERNEL=sm90, CONVROT_SM90_TILE_N).
Shapes: Flux's text-stream projections (K, N) = (3072, 9216), (3072, 3072),
(3072, 12288), (12288, 3072). Bias, bf16 output; bench_primitives.time_per_call
over 8 distinct input sets (a CUDA graph of 8 calls), median of 50 replays.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from bench_primitives import time_per_call

import convrot_kernels as ck

SETS = 8
SHAPES = ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072))
KERNELS = ({}, {"CONVROT_GEMM_KERNEL": "sm90", "CONVROT_SM90_TILE_N": "128"}, {"CONVROT_GEMM_KERNEL": "sm90"})


def measure() -> None:
    for m in (512, 1024):
        for k, n in SHAPES:
            x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
            w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(SETS)]
            bias = torch.randn(n, device="cuda")
            ours_sets = [
                (
                    torch.empty(m, n, device="cuda", dtype=torch.bfloat16),
                    *ck.rht_quantize(a, 256, 4),
                    *ck.rht_quantize(b, 256, 4),
                )
                for a, b in zip(x, w, strict=True)
            ]
            bf16_sets = [(a, b, bias.bfloat16()) for a, b in zip(x, w, strict=True)]

            def ours_call(out, qa, sa, qw, sw, bias=bias):
                ck.gemm_into(out, qa, sa, qw, sw, bias, bits=4)

            ours = time_per_call(ours_call, ours_sets, replays=50)
            bf16 = time_per_call(F.linear, bf16_sets, replays=50)
            print(
                f"  M={m} K={k:5d} N={n:5d} gemm4 {ours:6.1f} us  bf16 {bf16:6.1f} us  x{bf16 / ours:.2f}", flush=True
            )


def main() -> None:
    if sys.argv[1:] == ["--measure"]:
        measure()
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for kernel in KERNELS:
        print(kernel or "auto", flush=True)
        subprocess.run([sys.executable, __file__, "--measure"], env={**os.environ, **kernel}, check=True)


if __name__ == "__main__":
    main()
