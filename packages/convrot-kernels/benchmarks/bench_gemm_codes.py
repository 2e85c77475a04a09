"""Does gemm(bits=4)'s time depend on the codes it multiplies? One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_gemm_codes.py

M = 4608, K = 3072, N = 3072 and 12288, no bias, bf16 output. For each pair of code
distributions (activations, weights): uniform random bytes, codes of quantized
Gaussian data, all zero, all +1, alternating +1/-1. A CUDA graph of 6 calls on
distinct inputs (more than the L2), replayed for 1.5 s; printed: the median time
per call, and the median SM clock and board power that `nvidia-smi -lms 50`
sampled meanwhile.
"""

from __future__ import annotations

import statistics
import subprocess
import time

import torch

import convrot_kernels as ck

M, K = 4608, 3072
SETS = 6
PAIRS = (
    ("uniform", "uniform"),
    ("gauss", "gauss"),
    ("gauss", "uniform"),
    ("uniform", "gauss"),
    ("zero", "zero"),
    ("plusone", "plusone"),
    ("alternating", "alternating"),
)


def codes(kind: str, rows: int, cols: int) -> torch.Tensor:
    """Packed int4 codes [rows, cols / 2] of one distribution."""
    shape = (rows, cols // 2)
    if kind == "uniform":
        return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    if kind == "gauss":
        return ck.rht_quantize(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16), 256, 4)[0]
    fill = {"zero": 0x00, "plusone": 0x11, "alternating": 0xF1}[kind]  # 0xF1: +1 then -1
    return torch.full(shape, fill, dtype=torch.uint8, device="cuda")


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for n in (3072, 12288):
        for kind_a, kind_w in PAIRS:
            qa = [codes(kind_a, M, K) for _ in range(SETS)]
            qw = [codes(kind_w, n, K) for _ in range(SETS)]
            sa = [torch.rand(M, device="cuda") for _ in range(SETS)]
            sw = [torch.rand(n, device="cuda") for _ in range(SETS)]
            out = [torch.empty(M, n, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]

            def calls(qa=qa, qw=qw, sa=sa, sw=sw, out=out):
                for i in range(SETS):
                    ck.gemm_into(out[i], qa[i], sa[i], qw[i], sw[i], None, bits=4)

            calls()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                calls()
            for _ in range(20):
                graph.replay()
            smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE,
                text=True,
            )
            times = []
            end = time.time() + 1.5
            while time.time() < end:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) * 1e3 / SETS)
            smi.terminate()
            samples = [line.split(",") for line in smi.communicate()[0].splitlines() if line.strip()]
            clock = statistics.median(float(s[0]) for s in samples)
            power = statistics.median(float(s[1]) for s in samples)
            print(
                f"N={n:5d} a={kind_a:11s} w={kind_w:11s} {statistics.median(times):7.1f} us  "
                f"sm clock {clock:.0f} MHz  power {power:.0f} W",
                flush=True,
            )


if __name__ == "__main__":
    main()
