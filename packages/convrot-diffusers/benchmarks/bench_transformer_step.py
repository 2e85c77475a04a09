"""Time one denoising step of a whole diffusion transformer: bf16 against ConvRot and torchao.

For each model and batch size, every variant gets a fresh model with the same
random weights (real widths, 1024x1024 inputs) and reports the median ms per
step (CUDA events, after warm-up), the peak GPU memory of a step, and the bytes
of the transformer's weights. A profile of one step splits bf16 and W4A4 time
into GEMMs, rotate-quantize, attention and everything else (for compiled
variants, a compiled step without the graph capture: the same kernels).

Schemes: "bf16"; "w4a4" / "mix" / "w4a8" / "w4a8g64": convrot_diffusers.quantize_transformer with
that preset; "-fused": then fuse_qkv_projections (one GEMM for q, k and v;
for bf16, diffusers' own) and, for ConvRot, fuse_activations (GELUs and Flux
single blocks' concatenation applied inside the next layer); "-normrope": then
fuse_qk_norm_rope (Flux's q/k RMSNorm and rotary embedding in one kernel, no
quantization involved); "-attn8": fuse_qk_norm_rope(..., attention="int8") (those kernels and
8-bit attention, convrot_kernels.attention_8bit: needs an sm_90a GPU); torchao's float8 / int8 dynamic,
and "torchao-fp8-int4" (Float8DynamicActivationInt4WeightConfig: fp8 activations, int4 weights in
groups of 128, the mslk package's sm_90 kernels; reported as skipped where those are missing).

    python packages/convrot-diffusers/benchmarks/bench_transformer_step.py \
        --models flux --flux-blocks 4,8 --batches 1 --out-dir $OUT

Without --flux-blocks, Flux is the whole Flux.1 transformer (19 double + 38 single blocks).

With --rounds R above 1, a model and batch's variants stay in memory after their first
measurement and are timed again in turn, R rounds of --iters steps in all; each figure is then
over every round's steps, so that the GPU's clock or power drifting during the run does not
favour whichever variant ran first. Peak memory is each variant's own (memory held by the
variants kept alive is left out).

On a machine without CUDA, --tiny runs shrunken models on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
from transformer_configs import MODELS, build  # noqa: E402

import convrot_diffusers  # noqa: E402

SCHEMES = (
    "bf16",
    "bf16-fused",
    "bf16-normrope",
    "w4a4",
    "w4a4-fused",
    "w4a4-fused-normrope",
    "bf16-attn8",
    "w4a4-fused-attn8",
    "mix",
    "mix-fused",
    "w4a8",
    "w4a8-fused",
    "w4a8-fused-normrope",
    "w4a8-fused-attn8",
    "w4a8g64-fused",
    "torchao-fp8",
    "torchao-fp8-int4",
    "torchao-int8",
)
# eager; graph: the step captured in one CUDA graph; compiled: regional torch.compile;
# compiled-graph: compiled, then captured (inductor's fusions without launch overhead).
MODES = ("eager", "graph", "compiled", "compiled-graph")
VARIANTS = (
    "bf16-eager",
    "bf16-graph",
    "bf16-compiled",
    "bf16-compiled-graph",
    "bf16-fused-compiled",
    "bf16-fused-compiled-graph",
    "bf16-normrope-eager",
    "w4a4-eager",
    "w4a4-graph",
    "w4a4-compiled",
    "w4a4-compiled-graph",
    "w4a4-fused-eager",
    "w4a4-fused-graph",
    "w4a4-fused-compiled-graph",
    "w4a4-fused-normrope-eager",
    "w4a4-fused-normrope-compiled-graph",
    "bf16-attn8-eager",
    "bf16-attn8-compiled-graph",
    "w4a4-fused-attn8-eager",
    "w4a4-fused-attn8-compiled-graph",
    "mix-eager",
    "mix-graph",
    "mix-compiled-graph",
    "mix-fused-compiled-graph",
    "w4a8-eager",
    "w4a8-compiled-graph",
    "w4a8-fused-compiled-graph",
    "w4a8-fused-normrope-compiled-graph",
    "w4a8-fused-attn8-compiled-graph",
    "w4a8g64-fused-eager",
    "w4a8g64-fused-compiled-graph",
    "torchao-fp8-compiled",
    "torchao-fp8-int4-compiled",
    "torchao-int8-compiled",
)
PROFILED_SCHEMES = ("bf16", "w4a4", "w4a4-fused", "w4a4-fused-normrope", "w4a4-fused-attn8")
TOP_KERNELS = 25  # kept in the JSON report
# Kernel names to profile categories; the first pattern that matches wins.
CATEGORIES = (
    # Inductor's kernels name the ops they fuse, e.g. "triton_poi_fused_cat_gelu_quantized_linear":
    # elementwise and norm work around a GEMM or attention call, not the call itself.
    ("other", re.compile(r"^triton_")),
    ("rotate-quantize", re.compile(r"rht|quantiz|row_rotation", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    # CUDA kernel names (cuBLAS, CUTLASS, ours); on the CPU, the aten ops.
    ("gemm", re.compile(r"gemm|gemv|xmma|cutlass|nvjet|wgmma|igmma|matmul|aten::(addmm|mm|linear)\b", re.I)),
)


def tensor_bytes(tensor: torch.Tensor) -> int:
    # A tensor subclass (torchao's quantized weights) is the sum of the tensors it holds, not its
    # nominal dtype's bytes.
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def split_variant(variant: str) -> tuple[str, str]:
    """'w4a4-compiled-graph' -> ('w4a4', 'compiled-graph')."""
    scheme = next(s for s in sorted(SCHEMES, key=len, reverse=True) if variant.startswith(s + "-"))
    return scheme, variant[len(scheme) + 1 :]


class Skipped(Exception):
    """A variant this machine cannot run (a missing package or GPU feature); the message says why."""


def torchao_config(scheme: str):
    """torchao's config for a "torchao-*" scheme; raises Skipped where this machine cannot run it."""
    try:  # an installed but broken mslk (torchao imports it) fails with other errors than ImportError
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
    except Exception as error:
        raise Skipped(f"torchao does not import: {error}") from error
    if scheme == "torchao-fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if scheme == "torchao-int8":
        return Int8DynamicActivationInt8WeightConfig()
    try:
        from torchao.quantization import Float8DynamicActivationInt4WeightConfig
    except ImportError as error:
        raise Skipped(f"this torchao has no Float8DynamicActivationInt4WeightConfig ({error})") from error
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise Skipped("Float8DynamicActivationInt4WeightConfig runs mslk's sm_90 kernels: needs a Hopper GPU or later")
    if importlib.util.find_spec("mslk") is None:
        raise Skipped("Float8DynamicActivationInt4WeightConfig needs the mslk package (mslk-cuda), not installed")
    return Float8DynamicActivationInt4WeightConfig()


def int4_groups_fit(module: torch.nn.Module, _name: str) -> bool:
    # mslk's int4 kernel takes K and N in whole groups of 128: Flux's x_embedder (K = 64) and
    # proj_out (N = 64) stay bf16, as torchao's fp8 leaves the layers its kernel cannot take.
    return isinstance(module, torch.nn.Linear) and module.in_features % 128 == 0 and module.out_features % 128 == 0


def prepare(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Quantize per the variant's scheme, in place; returns the model. Raises Skipped (or ImportError)
    where this machine cannot run the variant."""
    full_scheme, _ = split_variant(variant)
    scheme = full_scheme.removesuffix("-normrope").removesuffix("-attn8")
    if scheme.removesuffix("-fused") in ("w4a4", "mix", "w4a8", "w4a8g64"):
        convrot_diffusers.quantize_transformer(model, preset=scheme.removesuffix("-fused"), progress=False)
        if scheme.endswith("-fused"):
            convrot_diffusers.fuse_qkv_projections(model)
            convrot_diffusers.fuse_activations(model)
    elif scheme == "bf16-fused":
        model.fuse_qkv_projections()
    elif scheme.startswith("torchao"):
        config = torchao_config(scheme)
        from torchao.quantization import quantize_

        quantize_(model, config, filter_fn=int4_groups_fit if scheme == "torchao-fp8-int4" else None)
    if full_scheme.endswith("-normrope"):
        convrot_diffusers.fuse_qk_norm_rope(model)
    elif full_scheme.endswith("-attn8"):
        convrot_diffusers.fuse_qk_norm_rope(model, attention="int8")
    return model


def compile_model(model: torch.nn.Module) -> None:
    # Regional compilation: each repeated block compiles once, not the whole model.
    if hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=True)
    else:
        model.compile(fullgraph=True)


def capture_graph(call: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """One call captured in a CUDA graph, after three on a side stream (which compile it, if compiled);
    returns the graph and the captured call's output, which every replay overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    return graph, output


def step_function(model, inputs, variant: str, device):
    """A zero-argument callable running one step the variant's way (eager, captured graph or compiled)."""
    _, mode = split_variant(variant)
    if mode.startswith("compiled"):
        compile_model(model)
    if not mode.endswith("graph") or device.type != "cuda":
        return lambda: model(**inputs)
    graph, _ = capture_graph(lambda: model(**inputs))
    return graph.replay


def time_ms(step, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def profile_breakdown(step, device) -> tuple[dict[str, float], list[tuple[str, int, float]]]:
    """ms of device time per category in one step, and the costliest kernels (name, calls, ms)."""
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals = {name: 0.0 for name, _ in CATEGORIES}
    kernels = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        category = next((name for name, pattern in CATEGORIES if pattern.search(event.key)), "other")
        totals[category] += us / 1e3
        kernels.append((event.key[:160], event.count, us / 1e3))
    return totals, sorted(kernels, key=lambda kernel: -kernel[2])[:TOP_KERNELS]


class Live(NamedTuple):
    """What keeps a measured variant runnable: its model, inputs and step callable."""

    model: torch.nn.Module
    inputs: dict
    step: Callable[[], object]


def run_variant(args, name, batch, variant, device) -> tuple[dict, Live] | None:
    """Builds, prepares and times one variant; the caller releases the returned Live."""
    # Memory already held (by variants kept for later rounds) is not this variant's.
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    blocks = args.flux_blocks if name == "flux" else args.blocks
    scheme = split_variant(variant)[0]
    try:
        if scheme.startswith("torchao"):
            torchao_config(scheme)  # skips before the model is built
        model = build(name, blocks, args.tiny, device)
        inputs = MODELS[name].inputs(model, batch, args.tiny, device)
        prepare(model, variant)
    except (ImportError, Skipped) as error:
        print(f"  {variant}: skipped ({error})", flush=True)
        return None
    started = time.perf_counter()
    with torch.inference_mode():
        step = step_function(model, inputs, variant, device)
        step()  # first call: compilation or capture finishes here
        setup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = time_ms(step, device, args.warmup, args.iters)
        peak = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else 0
        breakdown, top_kernels = None, None
        if split_variant(variant)[0] in PROFILED_SCHEMES:
            breakdown, top_kernels = profile_breakdown(functools.partial(model, **inputs), device)
    result = {
        "model": name,
        "batch": batch,
        "variant": variant,
        "steps_ms": times,
        "peak_gib": peak / 2**30,
        "weight_gib": weight_bytes(model) / 2**30,
        "setup_s": setup_s,
        "breakdown_ms": breakdown,
        "top_kernels": top_kernels,
    }
    summarize(result)
    print(
        f"  {variant:22s} {result['ms_median']:9.2f} ms  peak {result['peak_gib']:6.2f} GiB  "
        f"weights {result['weight_gib']:6.2f} GiB  setup {setup_s:5.1f} s",
        flush=True,
    )
    return result, Live(model, inputs, step)


def summarize(result: dict) -> None:
    steps = result["steps_ms"]
    result.update(ms_median=statistics.median(steps), ms_min=min(steps), ms_max=max(steps))


def time_more_rounds(args, live: list[tuple[dict, Live]], device) -> None:
    """Rounds 2.. of --rounds: every kept variant again, in turn, so that a drift of the GPU's clock
    or power state during the run lands on all of them alike."""
    for _ in range(args.rounds - 1):
        for result, keep in live:
            with torch.inference_mode():
                result["steps_ms"] += time_ms(keep.step, device, args.warmup, args.iters)
            summarize(result)


def release(kept: list[tuple[dict, Live]], device) -> None:
    """Frees the kept variants' models, compiled code and graphs (kept must hold the only references),
    so that the next variant's memory is its own."""
    kept.clear()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: list[dict]) -> str:
    """Markdown: one row per variant, ratios against bf16 of the same model and batch."""
    lines = [
        "| model | batch | variant | ms/step | speed-up vs bf16 eager | vs bf16 compiled | peak GiB | weights | "
        "weights vs bf16 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        same = {x["variant"]: x for x in results if (x["model"], x["batch"]) == (r["model"], r["batch"])}

        def ratio(anchor: str, r=r, same=same) -> str:
            return f"{same[anchor]['ms_median'] / r['ms_median']:.2f}x" if anchor in same else "-"

        w = f"{r['weight_gib'] / same['bf16-eager']['weight_gib']:.3f}" if "bf16-eager" in same else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms_median']:.2f} | {ratio('bf16-eager')} | "
            f"{ratio('bf16-compiled')} | {r['peak_gib']:.2f} | {r['weight_gib']:.2f} GiB | {w} |"
        )
    return "\n".join(lines)


def breakdown_table(results: list[dict]) -> str:
    lines = ["| model | batch | variant | gemm ms | rotate-quantize ms | attention ms | other ms |", "| --- " * 7 + "|"]
    for r in results:
        if r["breakdown_ms"]:
            b = r["breakdown_ms"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['variant']} | {b['gemm']:.2f} | {b['rotate-quantize']:.2f} | "
                f"{b['attention']:.2f} | {b['other']:.2f} |"
            )
    return "\n".join(lines)


def bar_chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in results})
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.6 * len(groups)), squeeze=False)
    for ax, (name, batch) in zip(axes[:, 0], groups, strict=True):
        rows = [r for r in results if (r["model"], r["batch"]) == (name, batch)]
        ax.barh([r["variant"] for r in rows], [r["ms_median"] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(f"{name}, batch {batch}: ms per denoising step (lower is better)")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split(",")) if text else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--flux-blocks", type=parse_blocks, default=None, help="double,single blocks (default 19,38)")
    parser.add_argument("--blocks", type=parse_blocks, default=None, help="PixArt/SD3 layers (default: the real count)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of --iters steps: with more than one, a model and batch's variants stay in memory and are "
        "timed again in turn, and each figure is over the steps of every round",
    )
    parser.add_argument("--tiny", action="store_true", help="shrunken widths (CPU smoke test)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: real-width models need a GPU (use --tiny for a CPU smoke run)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if device.type == "cpu":
        variants = [v for v in variants if v.endswith("-eager")]
    if args.tiny and any("-attn8-" in v for v in variants):
        print("the -attn8 variants are left out: the tiny widths' head dim 32 is not one 8-bit attention takes")
        variants = [v for v in variants if "-attn8-" not in v]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {device_name}, torch {torch.__version__}", flush=True)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    header = f"Device: {device_name}; torch {torch.__version__}; command: `{command}`"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"{name}, batch {batch}:", flush=True)
            kept: list[tuple[dict, Live]] = []
            for variant in variants:
                measured = run_variant(args, name, batch, variant, device)
                if measured is None:
                    continue
                results.append(measured[0])
                # Rewritten after every variant: a run cut short still leaves its numbers.
                write_report(args.out_dir, header, device_name, command, results)
                kept.append(measured)
                del measured
                if args.rounds == 1:
                    release(kept, device)
            if kept:
                time_more_rounds(args, kept, device)
                medians = ", ".join(f"{r['variant']} {r['ms_median']:.2f} ms" for r, _ in kept)
                print(f"  after {args.rounds} rounds: {medians}", flush=True)
                write_report(args.out_dir, header, device_name, command, results)
                release(kept, device)
    write_report(args.out_dir, header, device_name, command, results)
    bar_chart(results, args.out_dir / "transformer_step.png")
    print("\n" + (args.out_dir / "transformer_step.md").read_text())


def write_report(out_dir: Path, header: str, device_name: str, command: str, results: list[dict]) -> None:
    report = "\n\n".join([header, table(results), breakdown_table(results)])
    (out_dir / "transformer_step.md").write_text(report + "\n")
    summary = {"device": device_name, "command": command, "results": results}
    (out_dir / "transformer_step.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
