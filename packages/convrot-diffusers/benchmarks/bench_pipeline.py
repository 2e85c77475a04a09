"""Time whole Flux.1 generations: one FluxPipeline call of 28 steps at 1024x1024, bf16 against ConvRot and torchao.

Each variant gets a fresh pipeline: the whole Flux.1 transformer (19 double + 38 single blocks, built
from config with random weights as bench_transformer_step.py builds it, the same seed for every
variant), Flux.1's VAE (AutoencoderKL from its config, random weights, bf16) and its scheduler.
The text encoders are left out: every call gets random prompt_embeds [batch, 512, 4096] and
pooled_prompt_embeds [batch, 768] (what T5 and CLIP would hand over), so the call is the denoising
loop plus the VAE decode. The image comes back as a tensor (output_type="pt"): no PIL conversion.

Reported per variant, over --calls timed calls after one warm-up call: the wall time of a call
(CUDA-synchronized), the median ms per denoising step (the transformer and the scheduler's step,
CUDA events at each step's end; a call's first step also holds the call's own set-up and is left
out), the decode time (from the last step's end to the call's end: unpacking, VAE decode and
postprocessing), and the peak GPU memory of a call (weights included). A variant that cannot run
here (torchao or mslk missing, no sm_90 GPU) is reported as skipped with the reason; one that fails
is reported with its error, and the others still run.

Variants are bench_transformer_step.py's schemes and modes ("w4a4-fused-normrope-compiled-graph"...).
The transformer is prepared as there; "graph" captures the transformer's forward in one CUDA graph on
the pipeline's first call, and every step then copies its inputs into the graph's and replays it, while
the scheduler's step and the VAE stay eager ("compiled-graph": compiled blocks inside that graph). The
scheduler loop itself is not captured: its step index and sigmas live on the host.

    python packages/convrot-diffusers/benchmarks/bench_pipeline.py --out-dir $OUT

On a machine without CUDA, --tiny runs a shrunken pipeline on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

sys.path.insert(0, str(Path(__file__).parent))
import bench_transformer_step as step_bench  # noqa: E402
from transformer_configs import build  # noqa: E402

# The issue-31 comparison: bf16 and torchao against ours, each of ours with stock and 8-bit attention.
GPU_VARIANTS = (
    "bf16-compiled-graph",
    "torchao-fp8-compiled",
    "torchao-fp8-int4-compiled",
    "w4a4-fused-normrope-compiled-graph",
    "w4a4-fused-attn8-compiled-graph",
    "w4a8-fused-normrope-compiled-graph",
    "w4a8-fused-attn8-compiled-graph",
)
CPU_VARIANTS = ("bf16-eager", "w4a4-fused-normrope-eager", "w4a8-fused-normrope-eager")
ANCHOR = "bf16-compiled-graph"
TEXT_ENCODERS_NOTE = (
    "text encoders skipped: random prompt_embeds [batch, {tokens}, {width}] and pooled_prompt_embeds "
    "[batch, {pooled}] stand in for T5's and CLIP's outputs"
)


def is_variant(variant: str) -> bool:
    return any(variant == f"{s}-{m}" for s in step_bench.SCHEMES for m in step_bench.MODES)


def flux_vae(tiny: bool, device, dtype=torch.bfloat16, seed: int = 1) -> AutoencoderKL:
    """Flux.1's VAE (16 latent channels, 8x down-sampling) with random weights; --tiny: 2x, 16 wide."""
    torch.manual_seed(seed)
    levels = 2 if tiny else 4
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=(16, 16) if tiny else (128, 256, 512, 512),
                layers_per_block=1 if tiny else 2,
                norm_num_groups=8 if tiny else 32,
                latent_channels=16,
                sample_size=32 if tiny else 1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
    finally:
        torch.set_default_dtype(previous)
    return vae.eval().requires_grad_(False)


def flux_pipeline(transformer: torch.nn.Module, vae: AutoencoderKL) -> FluxPipeline:
    # Flux.1-dev's scheduler settings: the shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(transformer: torch.nn.Module, batch: int, tiny: bool, device) -> dict:
    cfg = transformer.config
    generator = torch.Generator(device).manual_seed(2)
    text_tokens = 16 if tiny else 512
    shapes = {
        "prompt_embeds": (batch, text_tokens, cfg.joint_attention_dim),
        "pooled_prompt_embeds": (batch, cfg.pooled_projection_dim),
    }
    return {
        name: torch.randn(shape, generator=generator, device=device).to(torch.bfloat16)
        for name, shape in shapes.items()
    }


def graph_forward(model: torch.nn.Module) -> None:
    """Makes every call of model replay one CUDA graph, captured on its first call (keyword arguments
    only). Later calls copy their tensors into the captured ones and must match the first call's shapes,
    dtypes and other arguments. The output is the graph's own, overwritten by the next call: the
    pipeline's scheduler consumes each step's output before the next step."""
    eager = model.forward
    captured: dict = {}

    def forward(*args, **kwargs):
        if args:
            raise TypeError("the graphed transformer takes keyword arguments only")
        if not captured:
            static = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            graph, output = step_bench.capture_graph(lambda: eager(**static))
            captured.update(graph=graph, static=static, output=output)
        static = captured["static"]
        if kwargs.keys() != static.keys():
            raise ValueError(f"graphed transformer captured with {sorted(static)}, called with {sorted(kwargs)}")
        for name, value in kwargs.items():
            if torch.is_tensor(value):
                if value.shape != static[name].shape or value.dtype != static[name].dtype:
                    raise ValueError(
                        f"{name}: captured {tuple(static[name].shape)} {static[name].dtype}, "
                        f"called with {tuple(value.shape)} {value.dtype}"
                    )
                static[name].copy_(value)
            elif value != static[name]:
                raise ValueError(f"{name}: captured {static[name]!r}, called with {value!r}")
        captured["graph"].replay()
        return captured["output"]

    model.forward = forward


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Stamps each denoising step's end (callback_on_step_end) and the call's start and end."""

    def __init__(self, device):
        self.device = device
        self.stamps: list = []

    def stamp(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.stamp()
        return {}

    def intervals_ms(self) -> list[float]:
        pairs = zip(self.stamps, self.stamps[1:], strict=False)
        if self.device.type == "cuda":
            return [start.elapsed_time(end) for start, end in pairs]
        return [1e3 * (end - start) for start, end in pairs]


def timed_call(pipe, embeds: dict, args, device) -> dict:
    clock = StepClock(device)
    synchronize(device)
    started = time.perf_counter()
    clock.stamp()
    image = pipe(
        **embeds,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=3.5,
        generator=torch.Generator(device).manual_seed(3),
        output_type="pt",
        return_dict=False,
        callback_on_step_end=clock.on_step_end,
    )[0]
    clock.stamp()
    synchronize(device)
    wall_s = time.perf_counter() - started
    intervals = clock.intervals_ms()
    if len(intervals) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps} step callbacks, got {len(intervals) - 1}")
    return {
        "wall_s": wall_s,
        "steps_ms": intervals[1:-1],
        "first_step_ms": intervals[0],
        "decode_ms": intervals[-1],
        # Random weights: the pixels mean nothing, but a non-finite one would point at a broken variant.
        "image_finite": bool(torch.isfinite(image).all()),
    }


def run_variant(args, batch: int, variant: str, device) -> dict:
    """Builds, prepares and times one variant's pipeline; raises Skipped where it cannot run here."""
    scheme, mode = step_bench.split_variant(variant)
    if scheme.startswith("torchao"):
        step_bench.torchao_config(scheme)  # a skip before building the model
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    started = time.perf_counter()
    transformer = build("flux", args.flux_blocks, args.tiny, device)
    try:
        step_bench.prepare(transformer, variant)
    except ImportError as error:
        raise step_bench.Skipped(str(error)) from error
    if mode.startswith("compiled"):
        step_bench.compile_model(transformer)
    if mode.endswith("graph") and device.type == "cuda":
        graph_forward(transformer)
    pipe = flux_pipeline(transformer, flux_vae(args.tiny, device))
    embeds = prompt_embeds(transformer, batch, args.tiny, device)
    with torch.inference_mode():
        timed_call(pipe, embeds, args, device)  # warm-up: compilation and capture happen here
        setup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls = [timed_call(pipe, embeds, args, device) for _ in range(args.calls)]
    peak = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else 0
    steps = [ms for call in calls for ms in call["steps_ms"]]
    result = {
        "batch": batch,
        "variant": variant,
        "calls": calls,
        "wall_s_median": statistics.median(c["wall_s"] for c in calls),
        "step_ms_median": statistics.median(steps),
        "step_ms_min": min(steps),
        "step_ms_max": max(steps),
        "decode_ms_median": statistics.median(c["decode_ms"] for c in calls),
        "peak_gib": peak / 2**30,
        "transformer_weight_gib": step_bench.weight_bytes(transformer) / 2**30,
        "vae_weight_gib": step_bench.weight_bytes(pipe.vae) / 2**30,
        "setup_s": setup_s,
    }
    if not all(c["image_finite"] for c in calls):
        print(f"  {variant}: the image holds non-finite pixels", flush=True)
    print(
        f"  {variant:36s} call {result['wall_s_median']:7.3f} s  step {result['step_ms_median']:8.2f} ms  "
        f"decode {result['decode_ms_median']:7.2f} ms  peak {result['peak_gib']:6.2f} GiB  setup {setup_s:5.1f} s",
        flush=True,
    )
    return result


def not_runnable_here(variant: str, device, tiny: bool) -> str | None:
    if device.type == "cpu" and step_bench.split_variant(variant)[1] != "eager":
        return "needs CUDA (the CPU runs eager variants only)"
    if tiny and "-attn8-" in variant:
        return "the tiny widths' head dim 32 is not one 8-bit attention takes"
    return None


def library_versions() -> dict:
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchao": None}
    try:
        import torchao

        versions["torchao"] = torchao.__version__
    except Exception:  # torchao is optional: its variants then say why they skip
        pass
    return versions


def release(device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: list[dict], skipped: list[dict], failed: list[dict]) -> str:
    lines = [
        f"| batch | variant | s/call | ms/step (min-max) | decode ms | call speed-up vs {ANCHOR} | peak GiB | "
        "transformer weights GiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        anchor = next((x for x in results if x["batch"] == r["batch"] and x["variant"] == ANCHOR), None)
        ratio = f"{anchor['wall_s_median'] / r['wall_s_median']:.2f}x" if anchor else "-"
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['wall_s_median']:.3f} | {r['step_ms_median']:.2f} "
            f"({r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}) | {r['decode_ms_median']:.2f} | {ratio} | "
            f"{r['peak_gib']:.2f} | {r['transformer_weight_gib']:.2f} |"
        )
    lines += [f"| {s['batch']} | {s['variant']} | skipped: {s['reason']} | | | | | |" for s in skipped]
    lines += [f"| {f['batch']} | {f['variant']} | failed: {f['error'][:200]} | | | | | |" for f in failed]
    return "\n".join(lines)


def write_report(out_dir: Path, summary: dict) -> None:
    report = "\n\n".join([summary["header"], table(summary["results"], summary["skipped"], summary["failed"])])
    (out_dir / "pipeline.md").write_text(report + "\n")
    (out_dir / "pipeline.json").write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--flux-blocks", type=step_bench.parse_blocks, default=None, help="double,single blocks (default 19,38)"
    )
    parser.add_argument("--batches", default="1")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--height", type=int, default=None, help="default 1024 (--tiny: 32)")
    parser.add_argument("--width", type=int, default=None, help="default 1024 (--tiny: 32)")
    parser.add_argument("--variants", default=None, help="comma list (default: " + ",".join(GPU_VARIANTS) + ")")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per variant, after one warm-up call")
    parser.add_argument("--tiny", action="store_true", help="shrunken widths (CPU smoke test)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)

    from diffusers.utils import is_transformers_available

    if not is_transformers_available():  # diffusers then hands out a FluxPipeline that raises when built
        parser.error("FluxPipeline needs the transformers package importable (its text encoders' classes)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: the real-size pipeline needs a GPU (use --tiny for a CPU smoke run)")
    if args.calls < 1 or args.steps < 2:
        parser.error("--calls must be at least 1 and --steps at least 2 (a call's first step is not counted)")
    args.height = args.height or (32 if args.tiny else 1024)
    args.width = args.width or (32 if args.tiny else 1024)
    default = CPU_VARIANTS if device.type == "cpu" else GPU_VARIANTS
    variants = [v for v in args.variants.split(",") if v] if args.variants else list(default)
    unknown = [v for v in variants if not is_variant(v)]
    if unknown:
        parser.error(
            f"unknown variants {unknown}: a scheme of {', '.join(step_bench.SCHEMES)} and a mode of "
            f"{', '.join(step_bench.MODES)}"
        )
    skipped = [(v, why) for v in variants if (why := not_runnable_here(v, device, args.tiny))]
    variants = [v for v in variants if v not in dict(skipped)]

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    versions = library_versions()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    probe = build("flux", (1, 1), args.tiny, "meta")
    note = TEXT_ENCODERS_NOTE.format(
        tokens=16 if args.tiny else 512,
        width=probe.config.joint_attention_dim,
        pooled=probe.config.pooled_projection_dim,
    )
    blocks = args.flux_blocks or (19, 38)
    header = (
        f"Device: {device_name}; {'; '.join(f'{k} {v}' for k, v in versions.items())}; command: `{command}`\n\n"
        f"Flux.1 pipeline, {blocks[0]} double + {blocks[1]} single blocks, {args.height}x{args.width}, "
        f"{args.steps} steps, {args.calls} timed calls per variant; {note}; the graph modes replay the "
        "transformer's forward as one CUDA graph per step, the scheduler's step and the VAE (bf16) run eagerly; "
        "output_type='pt'."
    )
    print(header, flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": device_name,
        "versions": versions,
        "command": command,
        "header": header,
        "text_encoders": note,
        "flux_blocks": list(blocks),
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "results": [],
        "skipped": [],
        "failed": [],
    }
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"batch {batch}:", flush=True)
        summary["skipped"] += [{"batch": batch, "variant": v, "reason": why} for v, why in skipped]
        for variant, why in skipped:
            print(f"  {variant}: skipped ({why})", flush=True)
        for variant in variants:
            try:
                summary["results"].append(run_variant(args, batch, variant, device))
            except step_bench.Skipped as error:
                print(f"  {variant}: skipped ({error})", flush=True)
                summary["skipped"].append({"batch": batch, "variant": variant, "reason": str(error)})
            except Exception as error:  # one variant's failure (a kernel, a compile) leaves the others' numbers
                traceback.print_exc()
                summary["failed"].append({"batch": batch, "variant": variant, "error": repr(error)})
            release(device)
            write_report(args.out_dir, summary)  # after every variant: a run cut short keeps its numbers
    write_report(args.out_dir, summary)
    print("\n" + (args.out_dir / "pipeline.md").read_text())


if __name__ == "__main__":
    main()
