"""gemm(bits=4) at the text stream's M (512, and 1024 for comparison) against bf16 F.linear.

    python packages/convrot-kernels/benchmarks/bench_gemm_m512.py

Runs itself three times: with the dispatcher's choice, and with the 128 x 128 and
128 x 256 sm90 kernels forced (CONVROT_GEMM_KERNEL=sm90, CONVROT_SM90_TILE_N).
Shapes: Flux's text-stream projections (K, N) = (3072, 9216), (3072, 3072),
(3072, 12288), (12288, 3072). Bias, bf16 output; a CUDA graph of 8 calls on
distinct inputs, median of 50 replays.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import convrot_kernels as ck

SETS = 8
SHAPES = ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072))
KERNELS = ({}, {"CONVROT_GEMM_KERNEL": "sm90", "CONVROT_SM90_TILE_N": "128"}, {"CONVROT_GEMM_KERNEL": "sm90"})


def per_call_us(calls) -> float:
    calls()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    times = []
    for _ in range(50):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / SETS)
    return statistics.median(times)


def measure() -> None:
    for m in (512, 1024):
        for k, n in SHAPES:
            x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
            w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(SETS)]
            bias = torch.randn(n, device="cuda")
            qa = [ck.rht_quantize(t, 256, 4) for t in x]
            qw = [ck.rht_quantize(t, 256, 4) for t in w]
            out = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
            bias16 = bias.bfloat16()

            def ours_calls(out=out, qa=qa, qw=qw, bias=bias):
                for i in range(SETS):
                    ck.gemm_into(out[i], *qa[i], *qw[i], bias, bits=4)

            def bf16_calls(x=x, w=w, bias16=bias16):
                for i in range(SETS):
                    F.linear(x[i], w[i], bias16)

            ours, bf16 = per_call_us(ours_calls), per_call_us(bf16_calls)
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
