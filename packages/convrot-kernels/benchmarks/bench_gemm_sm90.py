"""The Hopper GEMM paths against bf16 F.linear and torch._int_mm; one GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_gemm_sm90.py [--json PATH] [--quick]

Timing is bench_primitives.time_per_call (CUDA-graph replays, CUDA events,
median). Unlike there, every input set carries its own weights too, so that
weight-streaming shapes read them from HBM, not from L2: one round of sets
exceeds twice the L2. Rows: gemm(bits=4) and gemm(bits=8) through each kernel
(forced with convrot_kernels.forced_gemm_kernel; "auto" is the dispatcher's own choice), the schemes
of docs/format.md beside them (gemm4a8: W4A8; gemm4g / gemm4a8g: W4A4 / W4A8 with
group-scaled weights; not through the 128-wide sm90 kernel, which declines them), the
whole chain rht_quantize + gemm(bits=4), and the anchors. TOPS count 2*M*N*K
operations; the fraction is of the H100's 1979 TOPS dense int8 peak. With --cutlass, the
M = 4608 shapes also time CUTLASS's Hopper int8 GEMM (cutlass_anchor/, built by its build.sh)
in each of its configurations: the same multiply-accumulates and output bytes on the int8
tensor cores, so the fastest of them shows what those deliver on the shape. Every case
of a shape, anchors included, is measured once in each of ROUNDS alternating
rounds and reported as the median over them; beside each row, the SM clock and
board power that NVML read during its measurements (gpu_state.py). Printed
last: a markdown table of medians and ratios (anchor / ours: > 1 means faster).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from bench_primitives import FLUX_KN, GROUP, ROUNDS, copies_for, time_per_call
from cutlass_anchor import DEFAULT_LIBRARY, CutlassInt8
from gpu_state import GpuMonitor, GpuState

import convrot_kernels as ck

INT8_PEAK_TOPS = 1979.0
M_LARGE = 4608
SMALL = [(m, k, n) for m in (1, 16, 64) for k, n in ((3072, 12288), (12288, 3072))]
CROSSOVER = [(m, 3072, 12288) for m in (128, 256, 1024)]


def forced(kernel: str, fn, tile_n: str | None = None):
    def run(*args):
        with ck.forced_gemm_kernel(kernel, sm90_tile_n=int(tile_n or 256)):
            return fn(*args)

    return run


def make_set(m: int, k: int, n: int, with_int8: bool) -> dict:
    """bf16 inputs for the anchors and random codes and scales for the GEMM (its speed does not
    depend on how the codes were made; the chain rows quantize x themselves)."""
    dev = torch.device("cuda")
    s = {
        "x": torch.randn(m, k, device=dev, dtype=torch.bfloat16),
        "w": torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k),
        "bias": torch.randn(n, device=dev),
    }
    s["bias_bf16"] = s["bias"].to(torch.bfloat16)
    for rows, name in ((m, "a"), (n, "w")):
        s[f"q{name}4"] = torch.randint(0, 256, (rows, k // 2), device=dev, dtype=torch.uint8)
        s[f"q{name}8"] = torch.randint(-128, 128, (rows, k), device=dev, dtype=torch.int8)
        for bits in (4, 8):
            s[f"s{name}{bits}"] = torch.rand(rows, device=dev) * 0.01
    s["group_scale"] = torch.randint(1, 17, (n, k // 64), device=dev, dtype=torch.uint8)
    if with_int8:
        s["wi8"] = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)  # [N, K]: cuBLAS's TN layout
    return s


def set_bytes(s: dict) -> int:
    return sum(t.numel() * t.element_size() for t in s.values())


def bench_shape(m: int, k: int, n: int, kernels: list[str], record, monitor: GpuMonitor, cutlass=None) -> None:
    with_int8 = m > 16 and m % 8 == 0
    first = make_set(m, k, n, with_int8)
    sets = [first] + [make_set(m, k, n, with_int8) for _ in range(copies_for(set_bytes(first)) - 1)]
    ops = 2.0 * m * n * k

    def linear(s):
        return F.linear(s["x"], s["w"], s["bias_bf16"])

    def int_mm(s):
        return torch._int_mm(s["qa8"], s["wi8"].t())

    def gemm(bits):
        return lambda s: ck.gemm(s[f"qa{bits}"], s[f"sa{bits}"], s[f"qw{bits}"], s[f"sw{bits}"], s["bias"], bits=bits)

    def scheme_gemm(act_bits, grouped):
        def run(s):
            group_scale = s["group_scale"] if grouped else None
            return ck.gemm(
                s[f"qa{act_bits}"],
                s[f"sa{act_bits}"],
                s["qw4"],
                s["sw4"],
                s["bias"],
                weight_bits=4,
                act_bits=act_bits,
                group_scale=group_scale,
            )

        return run

    schemes = {"gemm4a8": scheme_gemm(8, False), "gemm4g": scheme_gemm(4, True), "gemm4a8g": scheme_gemm(8, True)}

    def chain(s):
        qa, sa = ck.rht_quantize(s["x"], GROUP, 4)
        return ck.gemm(qa, sa, s["qw4"], s["sw4"], s["bias"], bits=4)

    anchor_fns = {"bf16 linear": linear}
    if with_int8:
        anchor_fns["_int_mm"] = int_mm
    if cutlass is not None:
        anchor_fns |= cutlass.functions(m, n, k, first)
    ours = {}
    for kernel in kernels:
        for bits in (4, 8):
            if kernel == "sm90":
                for tile in ("256", "128"):
                    ours[f"gemm{bits} sm90 n{tile}"] = forced(kernel, gemm(bits), tile)
            else:
                ours[f"gemm{bits} {kernel}"] = gemm(bits) if kernel == "auto" else forced(kernel, gemm(bits))
        if kernel != "sm90":
            for name, fn in schemes.items():
                ours[f"{name} {kernel}"] = fn if kernel == "auto" else forced(kernel, fn)
    ours["chain4 auto"] = chain

    # Every case once per round, rounds alternating: a drift of the GPU's clock during the shape
    # then lands on all cases alike instead of on whichever was measured last.
    tuples = [(s,) for s in sets]
    times = {label: [] for label in (*anchor_fns, *ours)}
    samples = {label: [] for label in times}
    for _ in range(ROUNDS):
        for label, fn in (*anchor_fns.items(), *ours.items()):
            if label not in times:  # failed in an earlier round
                continue
            try:
                with monitor.window() as w:
                    us = time_per_call(fn, tuples)
            except (RuntimeError, ValueError) as error:  # report and go on: the other rows stand without it
                print(f"{label} M={m} K={k} N={n}: {error}", flush=True)
                del times[label]
                continue
            times[label].append(us)
            samples[label].extend(w.samples)
    if not all(a in times for a in anchor_fns):
        raise RuntimeError(f"an anchor failed at M={m} K={k} N={n}")
    anchors = {a: statistics.median(times[a]) for a in anchor_fns}
    for label in ours:
        if label in times:
            shown = {"bf16 linear": anchors["bf16 linear"]} if label.startswith("chain") else anchors
            record(label, m, k, n, statistics.median(times[label]), shown, ops, GpuState.of(samples[label]))
    del sets, tuples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument(
        "--cutlass", nargs="?", const=str(DEFAULT_LIBRARY), metavar="LIBRARY",
        help="also time CUTLASS's int8 GEMM at M = 4608 (default library: %(const)s)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="only the dispatcher's choice of each scheme at M = 1, 16 and 4608 on Flux's four shapes",
    )  # fmt: skip
    args = parser.parse_args()
    cutlass = CutlassInt8(args.cutlass) if args.cutlass else None
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; convrot_kernels {ck.build_info()}",
        flush=True,
    )
    monitor = GpuMonitor()
    if not monitor.available:
        print(f"GPU clock and power not sampled ({monitor.reason})", flush=True)
    rows: list[dict] = []

    def record(kind, m, k, n, us, anchors, ops, state: GpuState):
        tops = ops / us / 1e6
        row = {"kind": kind, "M": m, "K": k, "N": n, "ours_us": us, "tops": tops, "anchors_us": anchors}
        rows.append(row | {"sm_mhz": state.sm_mhz, "max_watts": state.max_watts})
        ratios = "  ".join(f"{name} {t:8.1f}us x{t / us:5.2f}" for name, t in anchors.items())
        line = f"{kind:22s} M={m:5d} K={k:5d} N={n:5d} {us:8.1f}us {tops:7.1f} TOPS  {ratios}  {state.cell()}"
        print(line, flush=True)

    if args.quick:
        for m in (M_LARGE, 16, 1):
            for k, n in FLUX_KN:
                bench_shape(m, k, n, ["auto"], record, monitor, cutlass if m == M_LARGE else None)
    else:
        for k, n in FLUX_KN:
            bench_shape(M_LARGE, k, n, ["sm90_persistent", "sm90", "auto"], record, monitor, cutlass)
        for m, k, n in SMALL:
            bench_shape(m, k, n, ["small_m", "sm90_persistent", "auto"], record, monitor)
        for m, k, n in CROSSOVER:
            bench_shape(m, k, n, ["sm90_persistent", "sm90", "auto"], record, monitor)
    monitor.stop()

    print(
        "\n| path | M | K | N | ours (us) | TOPS | % of 1979 | bf16 (us) | x bf16 | _int_mm (us) | x _int_mm "
        "| CUTLASS int8, fastest (us) | x CUTLASS | ours: SM clock (median), power (max) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        lin = r["anchors_us"]["bf16 linear"]
        mm = r["anchors_us"].get("_int_mm")
        mm_cells = f"{mm:.1f} | {mm / r['ours_us']:.2f}" if mm else "n/a | n/a"
        cut = min((t for name, t in r["anchors_us"].items() if name.startswith("cutlass")), default=None)
        cut_cells = f"{cut:.1f} | {cut / r['ours_us']:.2f}" if cut else "n/a | n/a"
        print(
            f"| {r['kind']} | {r['M']} | {r['K']} | {r['N']} | {r['ours_us']:.1f} | {r['tops']:.0f} | "
            f"{100 * r['tops'] / INT8_PEAK_TOPS:.0f}% | {lin:.1f} | {lin / r['ours_us']:.2f} | {mm_cells} "
            f"| {cut_cells} | {GpuState(r['sm_mhz'], r['max_watts']).cell()} |"
        )
    # issue 28's targets: each scheme against W4A4 (>= 0.95 at M = 4608) and bf16, dispatcher's choice.
    print("\n| M | K | N | scheme | x gemm4 auto (time ratio: > 1 faster) | x bf16 |")
    print("| ---: | ---: | ---: | --- | ---: | ---: |")
    by_shape = {(r["M"], r["K"], r["N"], r["kind"]): r for r in rows}
    for (m, k, n, kind), r in by_shape.items():
        base = by_shape.get((m, k, n, "gemm4 auto"))
        if kind.split()[0] in ("gemm4a8", "gemm4g", "gemm4a8g") and kind.endswith("auto") and base:
            lin = r["anchors_us"]["bf16 linear"]
            print(f"| {m} | {k} | {n} | {kind} | {base['ours_us'] / r['ours_us']:.3f} | {lin / r['ours_us']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
