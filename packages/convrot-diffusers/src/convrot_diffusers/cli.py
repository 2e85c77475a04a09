"""The ``convrot`` command: quantize, generate, compare, scan, info.

MODEL is a local diffusers pipeline directory or a hub id; without MODEL the
commands use the embedded demo (a small Flux pipeline with RANDOM weights,
built offline), and ``demo:pixart-sigma``, ``demo:pixart-alpha``, ``demo:sd3``
pick the other demos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_ERROR = 1


class CliError(Exception):
    """An error shown to the user as one line."""


def _device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CliError(f"--device {requested}: no CUDA device is available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _say(message: str) -> None:
    print(f"convrot: {message}", file=sys.stderr)


def _announce(loaded) -> None:
    from .demo import DEMO_NOTICE

    if loaded.demo:
        _say(f"{loaded.description}: {DEMO_NOTICE}")


def _call_kwargs(loaded, args) -> dict:
    import torch

    kwargs = dict(loaded.call_kwargs)
    for option, key in (("steps", "num_inference_steps"), ("height", "height"), ("width", "width")):
        if getattr(args, option) is not None:
            kwargs[key] = getattr(args, option)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    return kwargs


def _generate(loaded, prompt: str, args):
    return loaded.pipe(prompt, **_call_kwargs(loaded, args)).images[0]


def cmd_quantize(args) -> None:
    from .checkpoint import describe, save_quantized
    from .sources import load_transformer_quantized

    transformer, base = load_transformer_quantized(args.model, args.preset, args.group_size, _device(args.device))
    transformer.config.quantization_config.base_model = base
    save_quantized(transformer, args.out)
    summary = describe(args.out)
    print(
        f"saved {summary.config['_class_name']} ({args.preset}, group {args.group_size}) to {args.out}: "
        f"{summary.file_bytes / 2**20:.1f} MiB, {summary.ratio:.2f}x smaller than bf16"
    )


def cmd_generate(args) -> None:
    from . import comfy_cli
    from .checkpoint import is_quantized_save
    from .sources import load_pipeline, load_saved_pipeline

    device = _device(args.device)
    preset = None if args.preset == "bf16" else args.preset
    if args.model and comfy_cli.is_comfy_file(args.model):
        loaded = comfy_cli.load_pipeline(args.model, args.base_model, device)
    elif args.model and os.path.isdir(args.model) and is_quantized_save(args.model):
        loaded = load_saved_pipeline(args.model, args.base_model, device)
    else:
        loaded = load_pipeline(args.model, preset, args.group_size, device)
    _announce(loaded)
    image = _generate(loaded, args.prompt, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({loaded.description})")


def cmd_compare(args) -> None:
    from . import sensitivity
    from .metrics import psnr, ssim
    from .pipeline import quantize_pipeline
    from .presets import layer_kind, policy_for
    from .side_by_side import side_by_side
    from .sources import load_pipeline

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_pipeline(args.model, None, device=_device(args.device))
    _announce(loaded)
    transformer = loaded.pipe.transformer
    policy = policy_for(transformer, args.preset)

    _say("bf16 run (recording each Linear's inputs)")
    with sensitivity.ActivationRecorder(transformer, rows_per_layer=args.rows_per_layer) as recorder:
        reference = _generate(loaded, args.prompt, args)
    layers = sensitivity.layer_sensitivity(
        transformer, recorder.samples, lambda name: layer_kind(policy, name), args.group_size, progress=True
    )
    del recorder

    quantize_pipeline(loaded.pipe, args.preset, args.group_size)
    _say(f"ConvRot {args.preset} run")
    quantized = _generate(loaded, args.prompt, args)

    scores = {"psnr_db": psnr(reference, quantized), "ssim": ssim(reference, quantized)}
    reference.save(out / "bf16.png")
    quantized.save(out / "quantized.png")
    caption = f"{loaded.description}{' (random weights)' if loaded.demo else ''}"
    side_by_side(reference, quantized, f"ConvRot {args.preset}", scores, caption).save(out / "side_by_side.png")
    sensitivity.write_csv(layers, out / "layer_sqnr.csv")
    sensitivity.plot(layers, out / "layer_sqnr.png", f"{caption}: per-layer SQNR of W4A4 / W8A8 vs bf16")
    summary = {
        "model": loaded.description,
        "random_demo_weights": loaded.demo,
        "prompt": args.prompt,
        "seed": args.seed,
        "preset": args.preset,
        "group_size": args.group_size,
        **scores,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"PSNR {scores['psnr_db']:.2f} dB, SSIM {scores['ssim']:.4f} (bf16 vs {args.preset}, seed {args.seed})")
    print("lowest W4A4 SQNR layers:")
    for row in sorted(layers, key=lambda r: r.sqnr_w4a4_db)[:5]:
        sqnrs = f"{row.sqnr_w4a4_db:6.2f} dB (W8A8 {row.sqnr_w8a8_db:6.2f} dB)"
        print(f"  {row.layer:50s} {sqnrs}, preset: {row.precision}")
    print(f"wrote {out}/side_by_side.png, bf16.png, quantized.png, layer_sqnr.csv, layer_sqnr.png, summary.json")


def cmd_scan(args) -> None:
    from . import scan, sensitivity
    from .sources import load_pipeline

    if (args.max_bytes is None) == (args.max_ratio is None):
        raise CliError("give one budget: --max-bytes or --max-ratio")
    loaded = load_pipeline(args.model, None, device=_device(args.device))
    _announce(loaded)
    transformer = loaded.pipe.transformer
    _say("bf16 run (recording each Linear's inputs)")
    with sensitivity.ActivationRecorder(transformer, rows_per_layer=args.rows_per_layer) as recorder:
        _generate(loaded, args.prompt, args)
    layers = sensitivity.layer_sensitivity(transformer, recorder.samples, lambda name: "scan", args.group_size, True)
    del recorder
    full = scan.bf16_bytes(layers)
    budget = args.max_bytes if args.max_bytes is not None else args.max_ratio * full
    policy, total = scan.policy_under_budget(layers, budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(policy, indent=1) + "\n")
    counts = {}
    for kind in list(policy.values())[:-1]:
        counts[kind] = counts.get(kind, 0) + 1
    spread = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(
        f"wrote {args.out}: {len(layers)} Linear layers ({spread}), {total / 2**20:.1f} MiB of weights, "
        f"{total / full:.3f}x their bf16 bytes (budget {budget / full:.3f}x); use it with "
        "convrot.quantize_model(transformer, policy=json.load(open(FILE)))"
    )


def cmd_info(args) -> None:
    from . import comfy_cli
    from .checkpoint import describe

    if comfy_cli.is_comfy_file(args.directory):
        print("\n".join(comfy_cli.info_lines(args.directory)))
        return
    summary = describe(args.directory)
    quantization = summary.config["quantization_config"]
    print(f"transformer:   {summary.config['_class_name']}")
    group = f"group size {quantization['group_size']}, {quantization['rotation']} rotation"
    print(f"preset:        {quantization['preset']} ({group})")
    print(f"base model:    {quantization.get('base_model') or 'not recorded'}")
    counts = ", ".join(f"{n} {kind.upper()}" for kind, n in sorted(summary.layers.items()))
    print(f"layers:        {counts}")
    weights = ", ".join(f"{kind.upper()} {n / 1e6:.1f}M" for kind, n in summary.parameters.items())
    print(f"weights:       {weights}")
    print(f"size:          {summary.file_bytes / 2**20:.1f} MiB ({summary.ratio:.2f}x smaller than bf16)")
    versions = ", ".join(f"{name} {v}" for name, v in sorted(quantization.get("versions", {}).items()))
    print(f"made with:     {versions}")


def cmd_convert(args) -> None:
    from .comfy_cli import convert

    print(convert(args.source, args.destination, args.config))


def _parser() -> argparse.ArgumentParser:
    from .presets import DEFAULT_PRESET, PRESET_NAMES

    parser = argparse.ArgumentParser(
        prog="convrot",
        description="ConvRot W4A4 for diffusers pipelines (Flux, PixArt, SD3). Without MODEL, commands run an "
        "embedded demo pipeline with RANDOM weights (demo:flux; also demo:pixart-sigma, demo:pixart-alpha, demo:sd3).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def model_argument(p, help_text="local pipeline directory or hub id (default: the random-weight demo)"):
        p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=help_text)

    def quant_options(p, presets=PRESET_NAMES):
        p.add_argument("--preset", choices=presets, default=DEFAULT_PRESET, help="default: %(default)s")
        p.add_argument("--group-size", type=int, default=256, help="default: %(default)s")

    def sampling_options(p):
        p.add_argument("--prompt", required=True)
        p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
        p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
        p.add_argument("--height", type=int)
        p.add_argument("--width", type=int)
        p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
        p.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    p = commands.add_parser("quantize", help="quantize a pipeline's transformer and save it")
    model_argument(p)
    p.add_argument("--out", required=True, help="directory to write")
    quant_options(p)
    p.add_argument("--device", help="where to quantize: cuda or cpu (default: cuda when available)")
    p.set_defaults(run=cmd_quantize)

    p = commands.add_parser("generate", help="generate an image")
    model_argument(p, "a quantized directory, a pipeline directory or hub id (default: the random-weight demo)")
    sampling_options(p)
    p.add_argument("--out", required=True, help="PNG to write")
    quant_options(p, (*PRESET_NAMES, "bf16"))
    p.add_argument(
        "--base-model", "--base", help="for a quantized directory or ComfyUI file: where the other components are"
    )
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("compare", help="bf16 vs quantized: images, PSNR/SSIM, per-layer SQNR")
    model_argument(p)
    sampling_options(p)
    quant_options(p)
    p.add_argument("--out-dir", default="convrot-compare", help="default: %(default)s")
    p.add_argument("--rows-per-layer", type=int, default=256, help="activation rows sampled per layer")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("scan", help="a per-layer policy for this model and prompt under a size budget")
    model_argument(p)
    sampling_options(p)
    p.add_argument("--group-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--max-bytes", type=float, help="budget for the transformer's Linear weights, in bytes")
    p.add_argument("--max-ratio", type=float, help="budget as a fraction of those weights' bf16 bytes")
    p.add_argument("--rows-per-layer", type=int, default=256, help="activation rows sampled per layer")
    p.add_argument("--out", default="convrot-policy.json", help="policy JSON to write (default: %(default)s)")
    p.set_defaults(run=cmd_scan)

    p = commands.add_parser("info", help="describe a quantized directory or a ComfyUI ConvRot file")
    p.add_argument("directory", metavar="PATH", help="a quantized directory or a ComfyUI .safetensors file")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("convert", help="convert between a quantized directory and a ComfyUI ConvRot file")
    p.add_argument("source", metavar="IN", help="a ComfyUI .safetensors file or a quantized directory")
    p.add_argument("destination", metavar="OUT", help="a directory (from a ComfyUI file) or a .safetensors file")
    p.add_argument("--config", help="for a ComfyUI IN: its diffusers transformer config (directory or hub id)")
    p.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before diffusers/transformers are imported: their import-time notices are noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = _parser().parse_args(argv)

    from .checkpoint import NotAQuantizedSaveError
    from .detect import UnsupportedModelError
    from .sources import SourceError

    try:
        args.run(args)
    except (CliError, SourceError, UnsupportedModelError, NotAQuantizedSaveError) as error:
        _say(f"error: {error}")
        return EXIT_ERROR
    except FileNotFoundError as error:
        _say(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "))
        return EXIT_ERROR
    except (ValueError, OSError) as error:
        _say(f"error: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
