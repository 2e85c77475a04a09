"""Scaling over GPUs of a ConvRot Flux.1 (full width, random weights, 1024x1024): data and context parallelism.

    python packages/convrot-diffusers/benchmarks/bench_parallel.py --gpus 2 --out-dir $OUT

runs four torchrun jobs of this file (``--worker``), one after the other, and writes
``parallel.json`` and a table:
- data parallel: throughput (images/s) of ``convrot_diffusers.parallel.generate_data_parallel``
  making --images 1024x1024 images of --steps steps, on 1 GPU and on --gpus GPUs (one process each,
  the images shared); the text encoders are left out (every image gets random T5 and CLIP
  embeddings), the VAE decodes;
- context parallel: the median ms of one transformer step (4096 image + 512 text tokens) on 1 GPU
  and under ``enable_context_parallel`` with Ulysses (``--cp ulysses``, diffusers' native attention)
  or ring (``--cp ring``, attention backend "_native_flash") of degree --gpus.
The transformer is quantized with --preset and given every fusion (fuse_qkv_projections,
fuse_activations, fuse_qk_norm_rope), eager. The weights are random: the times do not depend on them.

--tiny shrinks every width and runs on the CPU with gloo, as a smoke test of the code path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from transformer_configs import MODELS, build  # noqa: E402

import convrot_diffusers  # noqa: E402
from convrot_diffusers import parallel  # noqa: E402


def _quantized_flux(args, device):
    blocks = tuple(int(n) for n in args.flux_blocks.split(",")) if args.flux_blocks else None
    transformer = build("flux", blocks, args.tiny, device)
    convrot_diffusers.quantize_transformer(transformer, preset=args.preset, progress=False)
    convrot_diffusers.fuse_qkv_projections(transformer)
    convrot_diffusers.fuse_activations(transformer)
    convrot_diffusers.fuse_qk_norm_rope(transformer)
    return transformer


def _flux_pipeline(transformer, tiny: bool, device):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(1)
    widths = (32, 32, 32, 32) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).to(device, torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler, vae, None, None, None, None, transformer)


def worker_data_parallel(args) -> dict:
    me = parallel.init_process_group("cpu" if args.tiny else "cuda")
    pipe = _flux_pipeline(_quantized_flux(args, me.device), args.tiny, me.device)
    config = pipe.transformer.config
    text_tokens, side = (16, 64) if args.tiny else (512, 1024)
    generator = torch.Generator().manual_seed(2)
    prompts = [
        {
            "prompt_embeds": torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator).to(
                me.device, torch.bfloat16
            ),
            "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, generator=generator).to(
                me.device, torch.bfloat16
            ),
        }
        for _ in range(args.images)
    ]
    call = {"height": side, "width": side, "num_inference_steps": args.steps, "guidance_scale": 3.5}
    # one image per rank first, untimed: kernels chosen, memory allocated
    parallel.generate_data_parallel(pipe, prompts[: me.world_size], progress=False, **call)
    _synchronize(me)
    start = time.perf_counter()
    images = parallel.generate_data_parallel(pipe, prompts, progress=False, **call)
    _synchronize(me)
    seconds = time.perf_counter() - start
    assert not me.is_main or len(images) == args.images
    return {
        "world_size": me.world_size,
        "images": args.images,
        "steps": args.steps,
        "seconds": seconds,
        "images_per_s": args.images / seconds,
    }


def worker_context_parallel(args) -> dict:
    if args.tiny:
        # diffusers 0.42's enable_parallelism places each rank on accelerator (rank % device count), a
        # division by zero without one; one "device" stands for the CPU in the smoke test.
        torch.accelerator.device_count = lambda: 1
    me = parallel.init_process_group("cpu" if args.tiny else "cuda")
    transformer = _quantized_flux(args, me.device)
    if args.cp == "ring":
        transformer.set_attention_backend("_native_flash")
    if me.world_size > 1:
        degrees = {"ulysses_degree" if args.cp == "ulysses" else "ring_degree": me.world_size}
        parallel.enable_context_parallel(transformer, **degrees)
    inputs = MODELS["flux"].inputs(transformer, 1, args.tiny, me.device)
    torch.manual_seed(3)  # every rank the same inputs, as the pipeline would give them
    inputs = {
        k: (torch.randn_like(v) if k.endswith("hidden_states") or k == "pooled_projections" else v)
        for k, v in inputs.items()
    }
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            _synchronize(me)
            start = time.perf_counter()
            transformer(**inputs)
            _synchronize(me)
            if i >= args.warmup:
                times.append(1e3 * (time.perf_counter() - start))
    return {
        "world_size": me.world_size,
        "cp": args.cp if me.world_size > 1 else None,
        "ms_per_step": statistics.median(times),
        "ms_all": times,
    }


def _synchronize(me) -> None:
    if me.device.type == "cuda":
        torch.cuda.synchronize(me.device)
    if me.world_size > 1:
        torch.distributed.barrier()


def _run_worker(args, kind: str, processes: int) -> dict:
    out = args.out_dir / f"parallel_{kind}_{processes}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        __file__,
        "--worker",
        kind,
        "--worker-out",
        str(out),
        *args.passed,
    ]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes of the parallel runs (default 2)")
    parser.add_argument("--images", type=int, default=8, help="images of the data-parallel runs (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    parser.add_argument("--iters", type=int, default=10, help="timed transformer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed transformer steps first (default 3)")
    parser.add_argument("--cp", choices=("ulysses", "ring"), default="ulysses")
    parser.add_argument("--preset", default="w4a4", help="convrot preset (default w4a4)")
    parser.add_argument("--tiny", action="store_true", help="shrunken widths on the CPU (smoke test)")
    parser.add_argument("--flux-blocks", help="DOUBLE,SINGLE blocks instead of Flux.1's 19,38 (smoke tests)")
    parser.add_argument("--only", choices=("data", "context"), help="run one of the two measurements")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--worker", choices=("data", "context"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        found = (worker_data_parallel if args.worker == "data" else worker_context_parallel)(args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.worker_out.write_text(json.dumps(found, indent=1) + "\n")
        torch.distributed.destroy_process_group()
        return

    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.passed = [
        f"--images={args.images}",
        f"--steps={args.steps}",
        f"--iters={args.iters}",
        f"--warmup={args.warmup}",
        f"--cp={args.cp}",
        f"--preset={args.preset}",
        *(["--tiny"] if args.tiny else []),
        *([f"--flux-blocks={args.flux_blocks}"] if args.flux_blocks else []),
    ]
    device = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name(0)
    report = {"device": device, "gpus": args.gpus, "preset": args.preset, "command": " ".join(sys.argv)}
    lines = [f"{device}, Flux.1 {'tiny' if args.tiny else 'full width'}, {args.preset} + every fusion, eager"]
    if args.only in (None, "data"):
        one, many = (_run_worker(args, "data", n) for n in (1, args.gpus))
        report["data_parallel"] = {"one": one, "many": many, "speedup": many["images_per_s"] / one["images_per_s"]}
        lines.append(
            f"data parallel, {args.images} images x {args.steps} steps: {one['images_per_s']:.3f} images/s "
            f"on 1, {many['images_per_s']:.3f} on {args.gpus} ({report['data_parallel']['speedup']:.2f}x)"
        )
    if args.only in (None, "context"):
        one, many = (_run_worker(args, "context", n) for n in (1, args.gpus))
        report["context_parallel"] = {"one": one, "many": many, "speedup": one["ms_per_step"] / many["ms_per_step"]}
        lines.append(
            f"{args.cp}-{args.gpus}, one step at 1024x1024: {one['ms_per_step']:.1f} ms on 1, "
            f"{many['ms_per_step']:.1f} ms on {args.gpus} ({report['context_parallel']['speedup']:.2f}x)"
        )
    (args.out_dir / "parallel.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
