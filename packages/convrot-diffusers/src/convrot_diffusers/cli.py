"""The ``convrot`` command: quantize, generate, compare, scan, info, convert.

MODEL is a local diffusers pipeline directory or a hub id (``generate`` also takes a
quantized directory or a ComfyUI ConvRot file); without MODEL the commands use the
embedded demo (a small Flux pipeline with RANDOM weights,
built offline), and ``demo:pixart-sigma``, ``demo:pixart-alpha``, ``demo:sd3``
pick the other demos (``demo:wan``: a text-to-video one).

A video pipeline (one whose ``__call__`` takes ``num_frames``: Wan, LTX, ...) writes its frames
(animated WebP or GIF, or MP4 with imageio-ffmpeg), and ``compare`` scores it frame by frame.

Each subcommand has a check (cli_checks.py: every argument, before any model is
loaded; a problem is one line and exit status 2) and a run (exit status 1 for a
failure during the work). Nothing heavy is imported before the check needs it,
so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from .cli_checks import (
    USAGE_EXIT,
    UsageError,
    check_device,
    check_group_size,
    check_model,
    check_output_directory,
    check_output_file,
    check_steps_for,
    check_video_options,
    image_extensions,
    integer,
    real,
)
from .presets import DEFAULT_PRESET, PRESET_NAMES
from .third_party_notices import silence_known_notices

EXIT_ERROR = 1
DEFAULT_GROUP_SIZE = 256
SAVE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
COMPARE_FILES = ("bf16.png", "quantized.png", "side_by_side.png", "layer_sqnr.csv", "layer_sqnr.png", "summary.json")
# A video pipeline's compare: the three videos as animated WebP (Pillow; no ffmpeg needed), the rest as for images.
VIDEO_COMPARE_FILES = tuple(name.replace(".png", ".webp") if i < 3 else name for i, name in enumerate(COMPARE_FILES))
# A preset rule's kind, as the report words it ("skip" keeps the layer in bf16).
PRECISION_WORDS = {"w4a4": "W4A4", "w8a8": "W8A8", "skip": "bf16"}


def _say(message: str) -> None:
    print(f"convrot: {message}", file=sys.stderr)


def _say_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        _say(f"running on {device} ({torch.cuda.get_device_name(device)}), convrot-kernels' CUDA backend")
        return
    why = ""
    if torch.cuda.is_available():
        why = "; a GPU is visible but convrot-kernels has no CUDA backend (reinstall it with CONVROT_CUDA=ON)"
    _say(f"running on the CPU ({torch.get_num_threads()} threads), convrot-kernels' CPU backend{why}")


def _announce(loaded) -> None:
    from .demo import DEMO_NOTICE

    if loaded.demo:
        _say(f"{loaded.description}: {DEMO_NOTICE}")


def _call_kwargs(loaded, args) -> dict:
    import inspect

    import torch

    kwargs = dict(loaded.call_kwargs)
    options = (("steps", "num_inference_steps"), ("height", "height"), ("width", "width"), ("frames", "num_frames"))
    for option, key in options:
        if getattr(args, option, None) is not None:
            kwargs[key] = getattr(args, option)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.video:
        kwargs["output_type"] = "pil"
        takes_rate = "frame_rate" in inspect.signature(loaded.pipe.__call__).parameters
        if getattr(args, "fps", None) is not None and takes_rate:
            kwargs["frame_rate"] = args.fps  # LTX conditions on it
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    return kwargs


def _generate(loaded, prompt: str, args):
    """The pipeline's image, or for a video pipeline its frames (a list of images)."""
    output = loaded.pipe(prompt, **_call_kwargs(loaded, args))
    if not args.video:
        return output.images[0]
    if getattr(output, "audio", None) is not None and not getattr(args, "_said_audio", False):
        args._said_audio = True
        _say("the pipeline also made an audio track; only the frames are written")
    return list(output.frames[0])


def _is_inside(path: Path, directory: str) -> bool:
    directory = Path(directory).expanduser().resolve()
    return path.resolve() == directory or directory in path.resolve().parents


# --- quantize -------------------------------------------------------------------------------------


def check_quantize(args) -> None:
    from .checkpoint import is_quantized_save

    args.out = check_output_directory("--out", args.out, SAVE_FILES, args.overwrite)
    if args.overwrite and any((args.out / name).exists() for name in SAVE_FILES) and not is_quantized_save(args.out):
        raise UsageError("--out", f"{args.out} holds a {SAVE_FILES[0]} that is not a ConvRot save's; choose another")
    check_group_size("--group-size", args.group_size)
    args.device = check_device("--device", args.device)
    args.source = check_model("MODEL", args.model)
    if args.source.kind in ("quantized", "comfy"):
        raise UsageError("MODEL", f"{args.model} is already quantized (`convrot info {args.model}` describes it)")
    if args.source.kind == "pipeline" and Path(args.model).expanduser().is_dir() and _is_inside(args.out, args.model):
        raise UsageError("--out", f"{args.out} is inside the model directory {args.model}; choose another")
    if args.policy is None:
        args.preset = args.preset or DEFAULT_PRESET
    else:
        check_policy_option(args)


def check_policy_option(args) -> None:
    """--policy FILE: a policy file whose every pattern decides a layer of MODEL's transformer, each
    layer able to take its scheme; read against the transformer built on the meta device."""
    from .policy_file import PolicyError, check_policy_layers, linear_names, meta_transformer, read_policy
    from .presets import check_layers
    from .sources import SourceError

    if args.preset is not None:
        raise UsageError("--policy", f"give --preset or --policy, not both (--preset {args.preset})")
    try:
        args.policy_rules = read_policy(args.policy)
        transformer = meta_transformer(args.model)
        check_policy_layers(args.policy_rules, linear_names(transformer), type(transformer).__name__, args.policy)
        check_layers(transformer, args.policy_rules, args.group_size)
    except (PolicyError, SourceError, ValueError, OSError) as error:
        raise UsageError("--policy", str(error).strip().splitlines()[0]) from None


def cmd_quantize(args) -> None:
    from .checkpoint import describe, save_quantized
    from .sources import load_transformer_quantized

    _say_device(args.device)
    policy = getattr(args, "policy_rules", None)
    transformer, base = load_transformer_quantized(args.model, args.preset, args.group_size, args.device, policy=policy)
    transformer.config.quantization_config.base_model = base
    save_quantized(transformer, args.out)
    summary = describe(args.out)
    how = args.preset if policy is None else f"policy {args.policy}"
    print(
        f"saved {summary.config['_class_name']} ({how}, group {args.group_size}) to {args.out}: "
        f"{summary.file_bytes / 2**20:.1f} MiB, {summary.ratio:.2f}x smaller than bf16"
    )


# --- generate -------------------------------------------------------------------------------------


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        path = Path(args.prompt_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UsageError("--prompt-file", f"{args.prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError("--prompt-file", f"{args.prompt_file}: cannot read it ({error})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError("--prompt-file", f"{args.prompt_file} holds no prompt (one a line)")
        prompts += from_file
    if not prompts:
        raise UsageError("--prompt", "is required (repeat it for several images, or pass --prompt-file)")
    if args.seed + len(prompts) - 1 > 2**64 - 1:
        raise UsageError("--seed", f"{args.seed}: image i uses seed + i, and {len(prompts)} images pass 2**64 - 1")
    return prompts


def _numbered_outputs(out: Path, count: int, overwrite: bool) -> list[Path]:
    """--out itself for one image, else OUT-000.png, OUT-001.png... beside it."""
    if count == 1:
        return [out]
    digits = max(3, len(str(count - 1)))
    paths = [out.with_name(f"{out.stem}-{i:0{digits}d}{out.suffix}") for i in range(count)]
    present = [path for path in paths if path.exists()]
    if present and not overwrite:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise UsageError("--out", f"{present[0]}{more} exist; pass --overwrite to replace them")
    return paths


def _check_ranks(args) -> None:
    """Under torchrun (or accelerate launch), each process gets cuda:LOCAL_RANK, or the CPU."""
    from .parallel import launched_local_rank, launched_world_size

    args.world_size = launched_world_size()
    if args.world_size == 1:
        return
    if args.device.startswith("cuda:"):
        raise UsageError(
            "--device",
            f"{args.device}: under torchrun each of the {args.world_size} processes runs on cuda:LOCAL_RANK; "
            "pass --device cuda (or leave it out)",
        )
    if args.device == "cuda":
        import torch

        local_rank = launched_local_rank()
        if local_rank >= torch.cuda.device_count():
            raise UsageError("--device", f"local rank {local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}); start at most that many processes per node")  # fmt: skip
        args.device = f"cuda:{local_rank}"


def _check_generate_out(args, pipeline_source) -> None:
    """--out, and the video options, once MODEL says whether the pipeline makes images or videos."""
    from .video import MP4, MP4_INSTALL, video_extensions

    check_video_options(args, pipeline_source)
    if not args.video:
        args.out = check_output_file("--out", args.out, image_extensions(), args.overwrite, "image")
        args.outs = _numbered_outputs(args.out, len(args.prompts), args.overwrite)
        return
    if Path(args.out).suffix.lower() == MP4 and MP4 not in video_extensions():
        raise UsageError("--out", f"{args.out}: writing MP4 needs imageio-ffmpeg ({MP4_INSTALL}); or use .webp or .gif")
    args.out = check_output_file("--out", args.out, video_extensions(), args.overwrite, "video")
    args.outs = _numbered_outputs(args.out, len(args.prompts), args.overwrite)


def check_generate(args) -> None:
    args.prompts = _read_prompts(args)
    if args.group_size is not None:
        check_group_size("--group-size", args.group_size)
    args.device = check_device("--device", args.device)
    _check_ranks(args)
    args.source = check_model("MODEL", args.model)
    if args.source.kind == "comfy":
        for option, value in (("--preset", args.preset), ("--group-size", args.group_size)):
            if value is not None:
                raise UsageError(option, f"MODEL {args.model} is a ComfyUI file and runs as stored; omit {option}")
        if args.base_model is None:
            raise UsageError("--base-model", f"MODEL {args.model} is a ComfyUI file: pass --base-model, the pipeline "
                             "that supplies VAE and text encoders")  # fmt: skip
        base_source = check_model("--base-model", args.base_model)
        if base_source.kind in ("quantized", "comfy"):
            raise UsageError("--base-model", f"{args.base_model} is quantized, not a pipeline")
        check_steps_for("--steps", args.steps, base_source)
        _check_generate_out(args, base_source)
        return
    if args.source.kind == "quantized":
        saved = args.source.saved_quantization
        given = (("--preset", args.preset, "preset"), ("--group-size", args.group_size, "group_size"))
        for option, value, key in given:
            if value is not None and value != saved.get(key):
                raise UsageError(
                    option,
                    f"{value}: MODEL {args.model} is a quantized save ({key} {saved.get(key)}) and runs as saved; "
                    f"omit {option}, or quantize its base model again",
                )
        if args.base_model is None and not saved.get("base_model"):
            raise UsageError("--base-model", f"MODEL {args.model} records no base model: pass its pipeline")
        base = args.base_model or saved["base_model"]
        try:
            base_source = check_model("--base-model", base)
        except UsageError as error:
            if args.base_model is not None:
                raise
            problem = f"the base model that MODEL records: {error.problem}; pass --base-model"
            raise UsageError("--base-model", problem) from None
        if base_source.kind == "quantized":
            raise UsageError("--base-model", f"{base} is a quantized save, not a pipeline")
        check_steps_for("--steps", args.steps, base_source)
        _check_generate_out(args, base_source)
        return
    if args.base_model is not None:
        model = args.model or "the demo"
        raise UsageError("--base-model", f"only for a quantized directory or ComfyUI file as MODEL; {model} is neither")
    check_steps_for("--steps", args.steps, args.source)
    args.preset = args.preset or DEFAULT_PRESET
    if args.preset == "bf16" and args.group_size is not None:
        raise UsageError("--group-size", "has no effect with --preset bf16 (nothing is quantized)")
    args.group_size = args.group_size or DEFAULT_GROUP_SIZE
    _check_generate_out(args, args.source)


def cmd_generate(args) -> None:
    from . import parallel
    from .sources import load_pipeline, load_saved_pipeline

    main_rank, joined = True, False
    if args.world_size > 1:
        import torch.distributed as dist

        joined = not dist.is_initialized()  # a caller's own group is left to it
        rank = parallel.init_process_group("cuda" if args.device.startswith("cuda") else "cpu")
        main_rank = rank.is_main
    try:
        if main_rank:
            _say_device(args.device)
            if args.world_size > 1:
                what = "videos" if args.video else "images"
                _say(f"{args.world_size} processes share {len(args.prompts)} {what} (each loads the model once)")
        if args.source.kind == "comfy":
            from . import comfy_cli

            loaded = comfy_cli.load_pipeline(args.model, args.base_model, args.device)
        elif args.source.kind == "quantized":
            loaded = load_saved_pipeline(args.model, args.base_model, args.device)
        else:
            preset = None if args.preset == "bf16" else args.preset
            loaded = load_pipeline(args.model, preset, args.group_size, args.device, progress=main_rank)
        if main_rank:
            _announce(loaded)
            if args.video and getattr(loaded.pipe, "audio_vae", None) is not None:  # LTX-2
                _say("the pipeline also makes an audio track; only the frames are written")
        kwargs = _call_kwargs(loaded, args)
        del kwargs["generator"]  # image i is made with seed + i, on whichever rank
        # An image, or for a video pipeline a list of frames, per prompt.
        results = parallel.generate_data_parallel(loaded.pipe, args.prompts, seed=args.seed, **kwargs)
        if not main_rank:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for result, path in zip(results, args.outs, strict=True):
            if args.video:
                from .video import write_video

                write_video(result, path, args.fps)
            else:
                result.save(path)
        what = "videos" if args.video else "images"
        several = f"{len(results)} {what}, {args.outs[0]} to {args.outs[-1].name}"
        written = str(args.out) if len(results) == 1 else several
        details = loaded.description
        if args.video:
            width, height = results[0][0].size
            details += f"; {len(results[0])} frames, {width}x{height}, {args.fps:g} fps"
        print(f"wrote {written} ({details})")
    finally:
        if joined:
            dist.destroy_process_group()


# --- compare --------------------------------------------------------------------------------------


def check_compare(args) -> None:
    check_output_directory("--out-dir", args.out_dir, COMPARE_FILES[3:], args.overwrite)  # written either way
    check_group_size("--group-size", args.group_size)
    args.device = check_device("--device", args.device)
    args.source = check_model("MODEL", args.model)
    if args.source.kind == "comfy":
        raise UsageError("MODEL", f"{args.model} is a ComfyUI file; compare starts from the bf16 pipeline")
    if args.source.kind == "quantized":
        base = args.source.saved_quantization.get("base_model")
        raise UsageError(
            "MODEL",
            f"{args.model} is a quantized save; compare starts from the bf16 pipeline"
            + (f" (this one was made from {base})" if base else ""),
        )
    check_steps_for("--steps", args.steps, args.source)
    check_video_options(args, args.source)
    outputs = VIDEO_COMPARE_FILES if args.video else COMPARE_FILES
    args.out_dir = check_output_directory("--out-dir", args.out_dir, outputs, args.overwrite)


def cmd_compare(args) -> None:
    from . import sensitivity
    from .lpips_metric import LPIPS_NET, lpips, lpips_unavailable
    from .metrics import psnr, ssim
    from .pipeline import quantize_pipeline
    from .presets import layer_kind, policy_for
    from .side_by_side import side_by_side
    from .sources import load_pipeline

    out = args.out_dir
    _say_device(args.device)
    if args.video:  # LPIPS scores images; a video's frames get PSNR and SSIM each
        lpips_absent = "not computed for videos (each frame is scored by PSNR and SSIM)"
    else:
        lpips_absent = lpips_unavailable(LPIPS_NET)
        if lpips_absent is not None:
            _say(f"LPIPS will not be reported (PSNR and SSIM will): {lpips_absent}")
    loaded = load_pipeline(args.model, None, device=args.device)
    _announce(loaded)
    transformer = loaded.pipe.transformer
    policy = policy_for(transformer, args.preset)

    _say("bf16 run (recording each Linear's inputs)")
    with sensitivity.ActivationRecorder(transformer, rows_per_layer=args.rows_per_layer) as recorder:
        reference = _generate(loaded, args.prompt, args)
    layers = sensitivity.layer_sensitivity(
        transformer,
        recorder.samples,
        lambda name: PRECISION_WORDS[layer_kind(policy, name)].lower(),
        args.group_size,
        progress=True,
    )
    del recorder

    quantize_pipeline(loaded.pipe, args.preset, args.group_size)
    _say(f"ConvRot {args.preset} run")
    quantized = _generate(loaded, args.prompt, args)

    out.mkdir(parents=True, exist_ok=True)
    caption = f"{loaded.description}{' (random weights)' if loaded.demo else ''}"
    label = f"ConvRot {args.preset}"
    if args.video:
        scores = _write_video_comparison(reference, quantized, out, label, caption, args.fps)
    else:
        scores = {"psnr_db": psnr(reference, quantized), "ssim": ssim(reference, quantized)}
        if lpips_absent is None:
            scores["lpips"] = lpips(reference, quantized, LPIPS_NET)
        reference.save(out / "bf16.png")
        quantized.save(out / "quantized.png")
        side_by_side(reference, quantized, label, scores, caption).save(out / "side_by_side.png")
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
        "lpips_net": LPIPS_NET,
        **({} if lpips_absent is None else {"lpips": None, "lpips_unavailable": lpips_absent}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    if args.video:
        print(
            f"PSNR {scores['psnr_db']:.2f} dB (lowest frame {scores['psnr_db_min']:.2f}), SSIM {scores['ssim']:.4f} "
            f"(lowest frame {scores['ssim_min']:.4f}), mean over {scores['frames']} frames "
            f"(bf16 vs {args.preset}, seed {args.seed})"
        )
    else:
        lpips_text = "" if lpips_absent is not None else f", LPIPS ({LPIPS_NET}) {scores['lpips']:.4f}"
        which = f"bf16 vs {args.preset}, seed {args.seed}"
        print(f"PSNR {scores['psnr_db']:.2f} dB, SSIM {scores['ssim']:.4f}{lpips_text} ({which})")
    print(f"lowest W4A4 SQNR layers (each layer alone in W4A4 / W8A8; what the {args.preset} preset runs it in):")
    for row in sorted(layers, key=lambda r: r.sqnr_w4a4_db)[:5]:
        sqnrs = f"{row.sqnr_w4a4_db:6.2f} dB (W8A8 {row.sqnr_w8a8_db:6.2f} dB)"
        print(f"  {row.layer:50s} {sqnrs}, {args.preset}: {row.precision}")
    print(f"wrote {out}/{', '.join(VIDEO_COMPARE_FILES if args.video else COMPARE_FILES)}")


def _write_video_comparison(reference: list, quantized: list, out: Path, label: str, caption: str, fps: float):
    """bf16.webp, quantized.webp and side_by_side.webp (each frame with its own scores); returns the scores
    (metrics.frame_scores: mean and lowest over the frames, and each frame's)."""
    from .metrics import frame_scores
    from .side_by_side import side_by_side
    from .video import write_video

    scores = {"frames": len(reference), "fps": fps, **frame_scores(reference, quantized)}
    write_video(reference, out / "bf16.webp", fps)
    write_video(quantized, out / "quantized.webp", fps)
    mean = f"mean PSNR {scores['psnr_db']:.2f} dB, SSIM {scores['ssim']:.4f}"
    per_frame = zip(reference, quantized, scores["psnr_db_per_frame"], scores["ssim_per_frame"], strict=True)
    panels = [
        side_by_side(a, b, label, {"psnr_db": p, "ssim": q}, f"frame {i + 1}/{len(reference)} ({mean}); {caption}")
        for i, (a, b, p, q) in enumerate(per_frame)
    ]
    write_video(panels, out / "side_by_side.webp", fps)
    return scores


# --- info -----------------------------------------------------------------------------------------


def check_info(args) -> None:
    from .checkpoint import NotAQuantizedSaveError, read_config

    if args.directory.endswith(".safetensors"):
        check_model("PATH", args.directory)  # a ComfyUI ConvRot file, or a one-line error
        return
    directory = Path(args.directory).expanduser()
    if not directory.is_dir():
        problem = "not a directory" if directory.exists() else "no such directory"
        raise UsageError("PATH", f"{args.directory}: {problem}")
    try:
        read_config(directory)
    except NotAQuantizedSaveError as error:
        raise UsageError("PATH", str(error)) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError("PATH", f"{args.directory}: its config.json is not valid JSON") from None


def _group_sizes(layers: dict, requested: int) -> str:
    """The group sizes the layers use: the requested one, or less where it does not divide a layer's width."""
    sizes = Counter(spec["group_size"] for spec in layers.values())
    if set(sizes) <= {requested}:
        return str(requested)
    found = ", ".join(f"{size} in {n} layers" for size, n in sorted(sizes.items()))
    why = "a layer whose width it does not divide uses the largest power of 4 that does"
    return f"{found} ({requested} requested; {why})"


def cmd_info(args) -> None:
    import convrot

    from .checkpoint import WEIGHTS_NAME, describe

    if args.directory.endswith(".safetensors"):
        from . import comfy_cli

        print("\n".join(comfy_cli.info_lines(args.directory)))
        return

    layers = convrot.verify_checkpoint(Path(args.directory) / WEIGHTS_NAME)
    summary = describe(args.directory)
    quantization = summary.config["quantization_config"]
    print(f"transformer:   {summary.config['_class_name']}")
    if quantization.get("policy") is not None:
        print(f"policy:        {len(quantization['policy'])} patterns ({quantization['rotation']} rotation)")
    else:
        print(f"preset:        {quantization['preset']} ({quantization['rotation']} rotation)")
    print(f"group size:    {_group_sizes(layers, quantization['group_size'])}")
    print(f"base model:    {quantization.get('base_model') or 'not recorded'}")
    counts = ", ".join(f"{n} {kind.upper()}" for kind, n in sorted(summary.layers.items()))
    print(f"layers:        {counts}")
    weights = ", ".join(f"{kind.upper()} {n / 1e6:.1f}M" for kind, n in summary.parameters.items())
    print(f"weights:       {weights}")
    print(f"size:          {summary.file_bytes / 2**20:.1f} MiB ({summary.ratio:.2f}x smaller than bf16)")
    print("checksums:     every tensor matches its CRC-32")
    versions = ", ".join(f"{name} {v}" for name, v in sorted(quantization.get("versions", {}).items()))
    print(f"made with:     {versions}")


# --- scan -----------------------------------------------------------------------------------------


def check_scan(args) -> None:
    if (args.max_bytes is None) == (args.max_ratio is None):
        raise UsageError("--max-bytes", "give one budget: --max-bytes or --max-ratio")
    args.out = check_output_file("--out", args.out, (".json",), args.overwrite, "policy")
    check_group_size("--group-size", args.group_size)
    args.device = check_device("--device", args.device)
    args.source = check_model("MODEL", args.model)
    if args.source.kind in ("quantized", "comfy"):
        raise UsageError("MODEL", f"{args.model} is quantized already; scan measures a bf16 pipeline")
    check_steps_for("--steps", args.steps, args.source)
    check_video_options(args, args.source)


def cmd_scan(args) -> None:
    from . import scan, sensitivity
    from .sources import load_pipeline

    _say_device(args.device)
    loaded = load_pipeline(args.model, None, device=args.device)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(policy, indent=1) + "\n")
    counts = Counter(list(policy.values())[:-1])
    spread = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(
        f"wrote {args.out}: {len(layers)} Linear layers ({spread}), {total / 2**20:.1f} MiB of weights, "
        f"{total / full:.3f}x their bf16 bytes (budget {budget / full:.3f}x); use it with "
        f"`convrot quantize {args.model + ' ' if args.model else ''}--policy {args.out} --out DIR`"
    )


# --- convert --------------------------------------------------------------------------------------


def check_convert(args) -> None:
    source = check_model("IN", args.source)
    if source.kind == "comfy":
        if args.destination.endswith(".safetensors"):
            raise UsageError("OUT", f"{args.destination}: a ComfyUI file converts to a directory, not to a file")
        args.destination = str(check_output_directory("OUT", args.destination, SAVE_FILES, args.overwrite))
        return
    if source.kind != "quantized":
        raise UsageError("IN", f"{args.source}: neither a ComfyUI ConvRot file nor a quantized directory")
    if args.config is not None:
        raise UsageError("--config", "is for a ComfyUI IN; a quantized directory holds its config")
    args.destination = str(check_output_file("OUT", args.destination, (".safetensors",), args.overwrite, "ComfyUI"))


def cmd_convert(args) -> None:
    from .comfy_cli import convert

    print(convert(args.source, args.destination, args.config))


# --- the parser -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, missing or malformed value) as one-line UsageErrors."""

    def error(self, message: str):
        raise UsageError(None, f"{message} (see `{self.prog} --help`)")


PRESET_HELP = (
    "mix (default): W4A4 except the image attention output projections in W8A8 (PixArt: the cross-attention's "
    "output and values) and the last block's FFN down-projection in bf16; Flux's, derived from a per-layer "
    "measurement, has no bf16 layer in the blocks and puts the double blocks' image FFN layers, the single "
    "blocks' AdaLN modulation and the last double block's image AdaLN in W8A8; w4a4: every Linear of the "
    "blocks in W4A4. Both keep the embedders and the final layers in bf16"
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convrot",
        description="ConvRot W4A4 for diffusers pipelines (Flux, PixArt, SD3 presets; any other diffusers "
        "transformer, e.g. Flux.2, Qwen-Image, Wan, LTX-2, through the generic policy). Without MODEL, commands run "
        "an embedded demo pipeline with RANDOM weights (demo:flux; also demo:pixart-sigma, demo:pixart-alpha, "
        "demo:sd3, and demo:wan for video).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_argument(p, help_text="local pipeline directory or hub id (default: the random-weight demo)"):
        p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=help_text)

    def group_size_option(p, default):
        p.add_argument(
            "--group-size",
            type=int,
            default=default,
            help="rotation group: 4, 16, 64, 256 or 1024 (default 256); a layer whose width it does not divide "
            "uses the largest of these that does",
        )

    def device_option(p, what):
        p.add_argument("--device", help=f"{what}: cpu, cuda or cuda:N (default: cuda when available)")

    def overwrite_option(p, what):
        p.add_argument("--overwrite", action="store_true", help=f"replace {what}")

    def sampling_options(p, several_prompts=False, fps=True):
        if several_prompts:
            p.add_argument(
                "--prompt",
                action="append",
                help="repeat it for several images or videos (output i uses seed + i; under torchrun the processes "
                "share them)",
            )
            p.add_argument("--prompt-file", help="a text file of prompts, one a line, after any --prompt")
        else:
            p.add_argument("--prompt", required=True)
        p.add_argument("--steps", type=integer(1, 1000), help="denoising steps, 1-1000 (default: the pipeline's)")
        p.add_argument("--seed", type=integer(0, 2**64 - 1), default=0, help="default: %(default)s")
        size = integer(16, 8192, multiple=16)
        p.add_argument("--height", type=size, help="pixels, a multiple of 16 (default: the pipeline's)")
        p.add_argument("--width", type=size, help="pixels, a multiple of 16 (default: the pipeline's)")
        p.add_argument("--guidance", type=real(0), help="guidance scale, >= 0 (default: the pipeline's)")
        p.add_argument(
            "--frames",
            "--num-frames",
            type=integer(1, 1000),
            help="video pipelines: frames to make, 1-1000; a Wan or LTX VAE needs 4k+1 or 8k+1 (default: the "
            "pipeline's)",
        )
        if fps:
            p.add_argument(
                "--fps",
                type=real(1, 240),
                help="video pipelines: frames a second, 1-240 (default: the pipeline's frame_rate, else 16)",
            )

    p = commands.add_parser("quantize", help="quantize a pipeline's transformer and save it")
    model_argument(p)
    p.add_argument("--out", required=True, help="directory to write the quantized transformer to")
    p.add_argument("--preset", choices=PRESET_NAMES, help=f"{PRESET_HELP}. Default: {DEFAULT_PRESET}")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="instead of --preset, a policy JSON {layer glob pattern: scheme} (first match wins), e.g. the one "
        "`convrot scan` writes; checked against MODEL's layers before any weight is read",
    )
    group_size_option(p, DEFAULT_GROUP_SIZE)
    device_option(p, "where to quantize")
    overwrite_option(p, "a save already in --out")
    p.set_defaults(check=check_quantize, run=cmd_quantize)

    p = commands.add_parser("generate", help="generate an image, or a video")
    model_argument(
        p, "a quantized directory, a ComfyUI ConvRot file, a pipeline directory or hub id (default: the demo)"
    )
    sampling_options(p, several_prompts=True)
    p.add_argument(
        "--out",
        required=True,
        help="image file to write (.png, .jpg, ...); for a video pipeline .webp or .gif (animated), or .mp4 "
        "with imageio-ffmpeg installed; for several prompts OUT-000.png, OUT-001.png, ...",
    )
    p.add_argument(
        "--preset",
        choices=(*PRESET_NAMES, "bf16"),
        help=f"how to quantize MODEL on the fly, or bf16 for none (not for a quantized directory, which runs as "
        f"saved). {PRESET_HELP}",
    )
    group_size_option(p, None)
    p.add_argument(
        "--base-model",
        "--base",
        help="for a quantized directory or a ComfyUI file: the pipeline its other components come from (a quantized "
        "directory's default: the one it records)",
    )
    device_option(p, "where to run")
    overwrite_option(p, "an existing --out")
    p.set_defaults(check=check_generate, run=cmd_generate)

    p = commands.add_parser(
        "compare",
        help="bf16 vs quantized: images (or videos), PSNR/SSIM (per frame for a video), LPIPS (images), per-layer SQNR",
    )
    model_argument(p, "a pipeline directory or hub id, in bf16 (default: the random-weight demo)")
    sampling_options(p)
    p.add_argument("--preset", choices=PRESET_NAMES, default=DEFAULT_PRESET, help=PRESET_HELP)
    group_size_option(p, DEFAULT_GROUP_SIZE)
    device_option(p, "where to run")
    p.add_argument("--out-dir", default="convrot-compare", help="where the results go (default: %(default)s)")
    overwrite_option(p, "the results of an earlier compare in --out-dir")
    p.add_argument(
        "--rows-per-layer", type=integer(1), default=256, help="activation rows sampled per layer (default: 256)"
    )
    p.set_defaults(check=check_compare, run=cmd_compare)

    p = commands.add_parser("scan", help="a per-layer policy for this model and prompt under a size budget")
    model_argument(p, "a pipeline directory or hub id, in bf16 (default: the random-weight demo)")
    sampling_options(p, fps=False)
    group_size_option(p, DEFAULT_GROUP_SIZE)
    p.add_argument("--max-bytes", type=real(0), help="budget for the transformer's Linear weights, in bytes")
    p.add_argument("--max-ratio", type=real(0), help="budget as a fraction of those weights' bf16 bytes")
    p.add_argument(
        "--rows-per-layer", type=integer(1), default=256, help="activation rows sampled per layer (default: 256)"
    )
    p.add_argument("--out", default="convrot-policy.json", help="policy JSON to write (default: %(default)s)")
    device_option(p, "where to run")
    overwrite_option(p, "an existing --out")
    p.set_defaults(check=check_scan, run=cmd_scan)

    p = commands.add_parser("info", help="describe a quantized directory or a ComfyUI ConvRot file, verifying it")
    p.add_argument("directory", metavar="PATH", help="a directory written by `convrot quantize`, or a ComfyUI file")
    p.set_defaults(check=check_info, run=cmd_info)

    p = commands.add_parser("convert", help="convert between a quantized directory and a ComfyUI ConvRot file")
    p.add_argument("source", metavar="IN", help="a ComfyUI .safetensors file or a quantized directory")
    p.add_argument("destination", metavar="OUT", help="a directory (from a ComfyUI file) or a .safetensors file")
    p.add_argument("--config", help="for a ComfyUI IN: its diffusers transformer config (directory or hub id)")
    overwrite_option(p, "an existing OUT")
    p.set_defaults(check=check_convert, run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_known_notices()
    try:
        args = _parser().parse_args(argv)
        if args.command != "generate" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(None, f"{args.command} runs in one process; under torchrun only generate shares its work")
        args.check(args)
    except UsageError as error:
        _say(f"error: {error}")
        return USAGE_EXIT
    except KeyboardInterrupt:
        _say("interrupted")
        return 130

    from safetensors import SafetensorError

    from .checkpoint import NotAQuantizedSaveError
    from .detect import UnsupportedModelError
    from .sources import SourceError

    try:
        args.run(args)
    except (SourceError, UnsupportedModelError, NotAQuantizedSaveError) as error:
        _say(f"error: {error}")
        return EXIT_ERROR
    except FileNotFoundError as error:
        _say(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "))
        return EXIT_ERROR
    except (ValueError, OSError, SafetensorError) as error:
        _say(f"error: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
