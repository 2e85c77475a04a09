"""gemm(bits=4) and gemm(bits=8) at M = 4608 over K: the per-tile and per-K-slice costs. One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_gemm_k_sweep.py

N = 3072 with K from 768 to 12288, and N = 12288 at K = 3072; uniform random codes, bias,
bf16 output, the dispatcher's kernel (the persistent one at this M). Timing is
bench_primitives.time_per_call (CUDA-graph replays, inputs cycled past twice the L2).
Printed per row: median us per call, TOPS (2 M N K) and the time per wave of 256 x 144
tiles on 132 SMs; a straight line through the wave times against K-slices (K / 128) gives
the main loop's cost per slice (slope) and the fixed cost per tile (intercept).
"""

from __future__ import annotations

import torch
from bench_primitives import copies_for, time_per_call

import convrot_kernels as ck

M = 4608
SHAPES = ((3072, 768), (3072, 1536), (3072, 3072), (3072, 6144), (3072, 12288), (12288, 3072))  # (N, K)


def operands(m: int, n: int, k: int, bits: int):
    width, dtype = (k // 2, torch.uint8) if bits == 4 else (k, torch.int8)

    def codes(rows: int) -> torch.Tensor:
        return torch.randint(-128, 128, (rows, width), device="cuda").to(dtype)

    def scales(rows: int) -> torch.Tensor:
        return torch.rand(rows, device="cuda")

    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    return out, codes(m), scales(m), codes(n), scales(n), scales(n)


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for bits in (4, 8):
        for n, k in SHAPES:
            per_set = M * k * bits // 8 + n * k * bits // 8 + M * n * 2
            sets = [operands(M, n, k, bits) for _ in range(copies_for(per_set))]

            def call(out, qa, sa, qw, sw, b, bits=bits):
                ck.gemm_into(out, qa, sa, qw, sw, b, bits=bits)

            us = time_per_call(call, sets)
            waves = (M // 256) * -(-n // 144) / sms
            tops = 2 * M * n * k / us / 1e6
            wave = us / waves
            print(f"gemm{bits} M={M} K={k:5d} N={n:5d} {us:7.1f} us {tops:6.0f} TOPS, per tile wave {wave:6.2f} us")


if __name__ == "__main__":
    main()
