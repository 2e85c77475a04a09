"""Times each CUDA primitive against its anchors on Flux.1 shapes; one GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_primitives.py [--quick] [--json PATH]

Each measurement captures R calls into a CUDA graph (so host launch overhead
stays out), cycling through enough input copies to exceed twice the L2 cache,
replays the graph after a warm-up and reports the median time per call over the
replays, from CUDA events. A primitive and its anchors are measured in
alternating rounds and each reported figure is the median over the rounds, so
that clock drift between measurements hits both sides alike. Inputs are random,
never zeros. Printed last: one
table of medians (microseconds) and ratios (anchor time / our time, so > 1
means we are faster).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

import convrot_kernels as ck

FLUX_KN = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]  # (in_features K, out_features N)
M_LARGE = 4608
M_SMALL = [1, 16, 256]
GROUP = 256
ROUNDS = 3  # alternating rounds of a primitive and its anchor


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size


def copies_for(bytes_per_set: int) -> int:
    """Input sets to cycle through so that one round of them exceeds twice the L2."""
    return max(2, min(32, math.ceil(2 * l2_bytes() / max(bytes_per_set, 1)) + 1))


def time_per_call(fn, sets, replays: int = 15, calls: int = 0) -> float:
    """Median microseconds per call of fn(*set) over CUDA-graph replays of `calls` calls."""
    if calls == 0:
        calls = max(len(sets), 8)
    for s in sets:  # warm-up outside the graph: module load, tensor maps, allocator
        fn(*s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            for i in range(calls):
                fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def hadamard(n: int, device, dtype) -> torch.Tensor:
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h4, h)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def dense_rotate_then_quantize(x: torch.Tensor, h: torch.Tensor):
    """The original ConvRot data path: rotation as a dense matmul, then torch quantization and packing."""
    m, k = x.shape
    xr = (x.view(m, k // h.shape[0], h.shape[0]) @ h).view(m, k)
    scale = xr.abs().amax(dim=1, keepdim=True).float() / 7
    q = torch.clamp(torch.round(xr.float() / scale), -8, 7).to(torch.int8)
    return ((q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)).view(torch.uint8), scale


# GEMM kernels timed: what cuda::gemm picks by itself, and gemm_sm90.cu's kernel
# forced at both tile widths.
GEMM_KERNELS = {"auto": None, "sm90 n256": 256, "sm90 n128": 128}


def with_kernel(name: str, fn):
    def run(*args):
        if GEMM_KERNELS[name] is None:
            return fn(*args)
        with ck.forced_gemm_kernel("sm90", sm90_tile_n=GEMM_KERNELS[name]):
            return fn(*args)

    return run


def bench_linear_shape(k: int, n: int, ms: list[int], record) -> None:
    """gemm(bits=4 / 8) against bf16 F.linear and torch._int_mm, and the whole
    rotate-quantize-GEMM chain against F.linear, for one (K, N) at each M."""
    dev = torch.device("cuda")
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
    bias = torch.randn(n, device=dev)
    bias_bf16 = bias.to(torch.bfloat16)
    qw4, sw4 = ck.rht_quantize(w, GROUP, 4)
    qw8, sw8 = ck.rht_quantize(w, GROUP, 8)
    # int8 weights [N, K] as a linear layer stores them, passed transposed: the
    # layout cuBLAS's int8 GEMM takes without a copy (a row-major [K, N] is slower).
    w_int8 = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)

    def linear(x, *_):
        return F.linear(x, w, bias_bf16)

    def int_mm(*s):
        return torch._int_mm(s[5], w_int8.t())

    def gemm4(x, qa4, sa4, *_):
        return ck.gemm(qa4, sa4, qw4, sw4, bias, bits=4)

    def gemm8(x, qa4, sa4, qa8, sa8, *_):
        return ck.gemm(qa8, sa8, qw8, sw8, bias, bits=8)

    def chain(x, *_):
        qa, sa = ck.rht_quantize(x, GROUP, 4)
        return ck.gemm(qa, sa, qw4, sw4, bias, bits=4)

    for m in ms:
        ops = 2.0 * m * n * k
        sets = []
        for _ in range(copies_for(m * k * 2 + n * k * 2)):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            qa4, sa4 = ck.rht_quantize(x, GROUP, 4)
            qa8, sa8 = ck.rht_quantize(x, GROUP, 8)
            sets.append((x, qa4, sa4, qa8, sa8, torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8)))
        try:
            int_mm_us = time_per_call(int_mm, sets)
        except RuntimeError:  # _int_mm rejects small M
            int_mm_us = None
        timings: dict[str, list[float]] = {}
        for _ in range(ROUNDS):  # the kernels and bf16 F.linear alternate over rounds
            timings.setdefault("linear", []).append(time_per_call(linear, sets))
            for name in GEMM_KERNELS:
                timings.setdefault(f"gemm4 {name}", []).append(time_per_call(with_kernel(name, gemm4), sets))
                timings.setdefault(f"gemm8 {name}", []).append(time_per_call(with_kernel(name, gemm8), sets))
                timings.setdefault(f"chain4 {name}", []).append(time_per_call(with_kernel(name, chain), sets))
        med = {key: statistics.median(values) for key, values in timings.items()}
        anchors = {"bf16 linear": med["linear"], "_int_mm": int_mm_us}
        for name in GEMM_KERNELS:
            record(f"gemm4 {name}", m, k, n, med[f"gemm4 {name}"], anchors, ops)
            record(f"gemm8 {name}", m, k, n, med[f"gemm8 {name}"], anchors, ops)
            record(f"chain4 {name}", m, k, n, med[f"chain4 {name}"], {"bf16 linear": med["linear"]}, ops)
        with_kernel("auto", lambda: None)()
        x = sets[0][0]
        y = chain(x).float()
        ref = F.linear(x.float(), w.float(), bias)
        print(f"   chain relative error vs fp32 linear: {((y - ref).norm() / ref.norm()).item():.4f}", flush=True)
        del sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="M=4608 only, fewer replays")
    parser.add_argument("--json", help="also write every row to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; convrot_kernels {ck.build_info()}",
        flush=True,
    )
    rows: list[dict] = []

    def record(kind, m, k, n, ours_us, anchors: dict[str, float | None], ops: float | None = None):
        row = {"kind": kind, "M": m, "K": k, "N": n, "ours_us": ours_us, "anchors_us": anchors}
        if ops:
            row["ours_tops"] = ops / ours_us / 1e6
        rows.append(row)
        ratios = "  ".join(
            f"{name} {t:9.1f}us x{t / ours_us:5.2f}" if t else f"{name} n/a" for name, t in anchors.items()
        )
        print(f"{kind:17s} M={m:5d} K={k:5d} N={n:5d}  ours {ours_us:9.1f}us  {ratios}", flush=True)

    h = hadamard(GROUP, dev, torch.bfloat16)
    ms = [M_LARGE] if args.quick else [M_LARGE, *M_SMALL]

    # ---- rht_quantize against a bf16 clone and the dense-matmul path
    for k in sorted({k for k, _ in FLUX_KN}):
        for m in ms:
            sets = [(torch.randn(m, k, device=dev, dtype=torch.bfloat16),) for _ in range(copies_for(m * k * 2))]
            # Ours and the clone alternate over rounds (clock drift hits both alike);
            # the heavy dense path runs last.
            ours_t, clone_t = [], []
            for _ in range(ROUNDS):
                ours_t.append(time_per_call(lambda x: ck.rht_quantize(x, GROUP, 4), sets))
                clone_t.append(time_per_call(lambda x: x.clone(), sets))
            dense = time_per_call(lambda x: dense_rotate_then_quantize(x, h), sets)
            ours, clone = statistics.median(ours_t), statistics.median(clone_t)
            record("rht_quantize", m, k, 0, ours, {"bf16 clone": clone, "dense+torch": dense})
            del sets

    for k, n in FLUX_KN:
        bench_linear_shape(k, n, ms, record)

    print("\n| primitive | M | K | N | ours (us) | anchor (us) | anchor / ours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        for name, t in r["anchors_us"].items():
            cell = f"{t:.1f} | {t / r['ours_us']:.2f}" if t else "n/a | n/a"
            tops = f" ({r['ours_tops']:.0f} TOPS)" if "ours_tops" in r else ""
            print(
                f"| {r['kind']} vs {name} | {r['M']} | {r['K']} | {r['N'] or ''} | {r['ours_us']:.1f}{tops} | {cell} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
