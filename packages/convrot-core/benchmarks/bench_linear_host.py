"""Host time of one eager ConvLinear forward and of its pieces, on the GPU.

    python packages/convrot-core/benchmarks/bench_linear_host.py [--json FILE]

Each row is the time to issue a call (2000 calls after 50 warm-up calls, divided), then
the same including the drain of the GPU queue. M = 16 and K = N = 3072, so the kernels are
short and the host side is what is measured. bf16 ``F.linear`` is the anchor; the target is
an eager ``ConvLinear4bit`` call within 1.5x of it. Last: a cProfile of the layer's forward.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch
import torch.nn.functional as F
from torch import nn

import convrot
import convrot_kernels as ck


def host_us(fn, calls: int = 2000) -> tuple[float, float]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    drained = (time.perf_counter() - start) / calls * 1e6
    return issued, drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    dense = nn.Linear(3072, 3072, device=dev, dtype=torch.bfloat16)
    layer = convrot.ConvLinear4bit.from_linear(dense)
    x = torch.randn(16, 3072, device=dev, dtype=torch.bfloat16)
    w, b = dense.weight, dense.bias
    qa, sa = ck.rht_quantize(x, 256, 4)
    rows = {
        "F.linear (anchor)": lambda: F.linear(x, w, b),
        "nn.Linear bf16 call": lambda: dense(x),
        "ConvLinear4bit call": lambda: layer(x),
        "ConvLinear4bit.forward": lambda: layer.forward(x),
        "convrot_kernels.linear": lambda: ck.linear(x, layer.qweight, layer.weight_scale, layer.bias),
        "convrot_kernels.rht_quantize": lambda: ck.rht_quantize(x, 256, 4),
        "convrot_kernels.gemm": lambda: ck.gemm(qa, sa, layer.qweight, layer.weight_scale, layer.bias),
        "torch.empty": lambda: torch.empty(16, 3072, device=dev, dtype=torch.bfloat16),
    }
    results = {}
    for name, fn in rows.items():
        issued, drained = host_us(fn)
        results[name] = {"host_us": round(issued, 2), "with_drain_us": round(drained, 2)}
        print(f"{name:30s} host {issued:6.1f} us/call, incl. drain {drained:6.1f}")
    ratio = results["ConvLinear4bit call"]["host_us"] / results["F.linear (anchor)"]["host_us"]
    print(f"ConvLinear4bit call / F.linear: {ratio:.2f}x")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "m": 16, "k": 3072, "n": 3072}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results, "convrot_over_f_linear": round(ratio, 3)}, f, indent=1)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        layer(x)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
