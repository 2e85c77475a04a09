"""Host time of one eager ConvLinear forward and of its pieces, on the GPU.

    python packages/convrot-core/benchmarks/bench_linear_host.py

Each row is the time to issue a call (2000 calls after 50 warm-up calls, divided),
then the same including the drain of the GPU queue. M = 16 and K = N = 3072, so the
kernels are short and the host side is what is measured. bf16 ``F.linear`` is the
anchor; ``linear_forward`` is what ``ConvLinear.forward`` runs eagerly, the custom op
what it runs under torch.compile. Last: a cProfile of ``linear_forward``.
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import convrot_kernels as ck
from convrot.ops import linear_forward, quantized_linear
from convrot_kernels import _C


def host_us(fn, calls: int = 2000) -> str:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    drained = (time.perf_counter() - start) / calls * 1e6
    return f"host {issued:6.1f} us/call, incl. drain {drained:6.1f}"


def main() -> None:
    dev = "cuda"
    x = torch.randn(16, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device=dev, dtype=torch.bfloat16)
    b = torch.randn(3072, device=dev, dtype=torch.bfloat16)
    qw, sw = ck.rht_quantize(w, 256, 4)
    qa, sa = ck.rht_quantize(x, 256, 4)
    out = torch.empty(16, 3072, device=dev, dtype=torch.bfloat16)
    b32 = b.float()
    q, s = torch.empty(16, 1536, dtype=torch.uint8, device=dev), torch.empty(16, device=dev)
    rows = {
        "F.linear": lambda: F.linear(x, w, b),
        "current_stream": lambda: torch.cuda.current_stream(x.device).cuda_stream,
        "__dlpack__": lambda: x.__dlpack__(),
        "torch.empty": lambda: torch.empty(16, 3072, device=dev, dtype=torch.bfloat16),
        "bias.float()": lambda: b.float(),
        "_C.rht_quantize": lambda: _C.rht_quantize(x, q, s, 256, 4, 0),
        "_C.gemm": lambda: _C.gemm(qa, sa, qw, sw, b32, out, 4, 0),
        "gemm_into": lambda: ck.gemm_into(out, qa, sa, qw, sw, b32, bits=4),
        "ck.gemm public": lambda: ck.gemm(qa, sa, qw, sw, b, bits=4),
        "linear_forward": lambda: linear_forward(x, qw, sw, b, 4, 256, "regular"),
        "linear_fwd f32b": lambda: linear_forward(x, qw, sw, b32, 4, 256, "regular"),
        "custom op": lambda: quantized_linear(x, qw, sw, b, 4, 256, "regular"),
    }
    for name, fn in rows.items():
        print(f"{name:16s} {host_us(fn)}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        linear_forward(x, qw, sw, b, 4, 256, "regular")
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
