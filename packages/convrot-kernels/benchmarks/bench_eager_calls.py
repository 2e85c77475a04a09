"""Wall time of single eager calls, Python included: `gemm(bits=4)` through the dispatcher and
with the persistent kernel forced, against bf16 `F.linear`, at M = 128 and 256.

Each call is timed alone between CUDA events, so at these sizes the figures are bounded
by the host-side cost of a call (argument checks, custom-op dispatch, launch), not by the
kernels: bench_primitives.py times kernels over CUDA-graph replays instead.

    python packages/convrot-kernels/benchmarks/bench_eager_calls.py
"""

import os
from functools import partial

import torch

import convrot_kernels as ck


def median_us(call, n=50):
    for _ in range(5):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    for m in (128, 256):
        for k, n in ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = ck.rht_quantize(x)
            qw, sw = ck.rht_quantize(w)
            auto = median_us(partial(ck.gemm, qa, sa, qw, sw))
            os.environ["CONVROT_GEMM_KERNEL"] = "sm90_persistent"
            persistent = median_us(partial(ck.gemm, qa, sa, qw, sw))
            del os.environ["CONVROT_GEMM_KERNEL"]
            bf16 = median_us(partial(torch.nn.functional.linear, x, w))
            print(f"M={m} K={k} N={n}: auto {auto:.1f} us, persistent {persistent:.1f} us, bf16 linear {bf16:.1f} us")


if __name__ == "__main__":
    main()
