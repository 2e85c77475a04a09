"""Checks of the ``convrot`` command's arguments, all made before any model is loaded.

Numbers are checked while parsing (the argparse ``type=`` callables ``integer`` and ``real``);
what depends on the file system, the machine or another argument is checked after parsing
by the ``check_*`` functions. Each failure is a UsageError naming the argument, which the
command prints as one line before it exits with status 2. A new subcommand composes the
same pieces for its own arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

USAGE_EXIT = 2


class UsageError(Exception):
    """An argument the command cannot work with; the message is one line that names it."""

    def __init__(self, argument: str | None, problem: str):
        super().__init__(problem if argument is None else f"argument {argument}: {problem}")
        self.argument = argument
        self.problem = problem


def _bounds(low, high, multiple: int = 1) -> str:
    words = f"at least {low}" if high is None else f"between {low} and {high}"
    return words + (f" and a multiple of {multiple}" if multiple > 1 else "")


def integer(low: int, high: int | None = None, multiple: int = 1):
    """argparse ``type=``: an int in [low, high] (no upper bound for None) divisible by ``multiple``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high) or value % multiple:
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high, multiple)}, got {value}")
        return value

    return parse


def real(low: float, high: float | None = None):
    """argparse ``type=``: a finite float in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, got {text}")
        return value

    return parse


# --- output paths -------------------------------------------------------------------------------


def _cannot_write_in(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (an existing directory), or None.

    A real probe, not os.access: it also sees read-only file systems and holds for root."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".convrot-write-check-"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def check_can_create(argument: str, directory: Path) -> None:
    """Files can be written in ``directory``, which exists or can be made (its nearest existing
    ancestor is a writable directory)."""
    base = directory.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(argument, f"{base} is a file, not a directory")
    if problem := _cannot_write_in(base):
        raise UsageError(argument, f"cannot write in {base}: {problem}")


def image_extensions() -> list[str]:
    """The file extensions Pillow can write, lower case."""
    from PIL import Image

    Image.init()
    return sorted(ext.lower() for ext, name in Image.registered_extensions().items() if name in Image.SAVE)


def check_output_file(argument: str, value: str, extensions: Iterable[str], overwrite: bool, what: str) -> Path:
    """A file to write (``what``: "image", ...) with a known extension, replaced only with --overwrite."""
    extensions = list(extensions)
    common = [ext for ext in (".png", ".jpg", ".webp", ".gif", ".mp4") if ext in extensions] or extensions[:3]
    path = Path(value).expanduser()
    if path.is_dir():
        raise UsageError(argument, f"{value} is a directory; name the {what} to write, e.g. {path / 'out'}{common[0]}")
    if path.suffix.lower() not in extensions:
        found = f"unknown {what} extension {path.suffix!r}" if path.suffix else f"no {what} extension"
        choices = f"{', '.join(common[:-1])} or {common[-1]}" if len(common) > 1 else common[0]
        others = f" (or another of the {len(extensions)} Pillow writes)" if len(common) < len(extensions) else ""
        raise UsageError(argument, f"{value}: {found}; use {choices}{others}")
    if path.exists() and not overwrite:
        raise UsageError(argument, f"{value} exists; pass --overwrite to replace it")
    check_can_create(argument, path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(argument, f"{value} exists and is read-only")
    return path


def check_output_directory(argument: str, value: str, outputs: Iterable[str], overwrite: bool) -> Path:
    """A directory the command writes the files ``outputs`` into; those already there are replaced
    only with --overwrite."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(argument, f"{value} is a file, not a directory")
    present = [name for name in outputs if (path / name).exists()]
    if present and not overwrite:
        raise UsageError(argument, f"{value} already holds {', '.join(present)}; pass --overwrite to replace them")
    check_can_create(argument, path)
    return path


# --- the machine ----------------------------------------------------------------------------------


def check_device(argument: str, value: str | None) -> str:
    """``value`` ("cpu", "cuda", "cuda:N") where it can run, or for None the best one here."""
    import torch

    import convrot_kernels

    has_cuda_backend = convrot_kernels.build_info()["cuda"]
    if value is None:
        return "cuda" if has_cuda_backend and torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", value)
    if match is None:
        raise UsageError(argument, f"unknown device {value!r}; use cpu, cuda or cuda:N")
    if match[1] == "cuda":
        if not torch.cuda.is_available():
            build = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device"
            raise UsageError(argument, f"{value}: no CUDA device is available (torch {torch.__version__} {build})")
        if int(match[2] or 0) >= torch.cuda.device_count():
            raise UsageError(argument, f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if not has_cuda_backend:
            reinstall = "reinstall it with CONVROT_CUDA=ON"
            raise UsageError(argument, f"{value}: convrot-kernels was built without its CUDA backend; {reinstall}")
    return value


def check_group_size(argument: str, value: int) -> int:
    import convrot

    try:
        convrot.resolve_group_size(value, value)
    except ValueError as error:
        raise UsageError(argument, str(error)) from None
    return value


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names, found out without loading any weight."""

    text: str | None  # as given (None: the default demo)
    kind: str  # "demo", "quantized" (a convrot-diffusers save), "comfy" (a ComfyUI ConvRot file) or "pipeline"
    # detect.ARCHITECTURES' name ("flux", "pixart", "sd3"), or "generic" for another diffusers transformer
    architecture: str
    scheduler: str | None = None  # the pipeline's scheduler class, where its model_index.json says
    saved_config: dict | None = None  # for "quantized": its config.json
    # For a pipeline that makes videos (its __call__ takes num_frames): the default frames a second, and
    # the factor its VAE compresses time by where its config says (it makes frame_step * k + 1 frames).
    video: bool = False
    fps: float | None = None
    frame_step: int | None = None

    @property
    def saved_quantization(self) -> dict:
        return (self.saved_config or {}).get("quantization_config", {})


# The frames a second of a video pipeline whose __call__ has no frame_rate argument (Wan 2.x's rate).
DEFAULT_FPS = 16.0
# VAE config keys holding the factor a video VAE compresses time by (Wan's; LTX's, HunyuanVideo's...).
TEMPORAL_FACTOR_KEYS = ("scale_factor_temporal", "temporal_compression_ratio")


def _architecture_name(class_name: str) -> str:
    """A transformer class's architecture: a preset one's name, or "generic" for any other diffusers
    transformer (which quantize_transformer and the ComfyUI files handle through the generic rules)."""
    from .detect import architecture_for_class, check_diffusers_transformer_class, is_preset_class

    if is_preset_class(class_name):
        return architecture_for_class(class_name).name
    check_diffusers_transformer_class(class_name)
    return "generic"


def _video_fields(model: str, index: dict) -> dict:
    """ModelSource's video fields for a pipeline, from its class's __call__ and its VAE's config.json."""
    import inspect

    import diffusers

    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    try:
        parameters = inspect.signature(pipeline_class.__call__).parameters if pipeline_class else {}
    except (TypeError, ValueError):
        parameters = {}
    if "num_frames" not in parameters:
        return {}
    frame_rate = parameters.get("frame_rate")
    fps = frame_rate.default if frame_rate is not None and isinstance(frame_rate.default, (int, float)) else None
    frame_step = None
    vae_class = getattr(diffusers, str((index.get("vae") or [None, None])[1]), None)
    if hasattr(vae_class, "load_config"):
        try:
            vae_config = vae_class.load_config(os.path.expanduser(model), subfolder="vae")
        except (OSError, ValueError):
            vae_config = {}
        # A key the file leaves out takes the class's default, as diffusers' loading does (Wan's older configs).
        defaults = inspect.signature(vae_class.__init__).parameters
        for key in TEMPORAL_FACTOR_KEYS:
            value = vae_config.get(key, defaults[key].default if key in defaults else None)
            if isinstance(value, int) and value > 0:
                frame_step = value
                break
    return {"video": True, "fps": float(fps or DEFAULT_FPS), "frame_step": frame_step}


def check_model(argument: str, value: str | None) -> ModelSource:
    """A demo name, a quantized save, a ComfyUI ConvRot file, or a pipeline (local, or a hub id whose
    model_index.json is fetched) with a diffusers transformer."""
    from .checkpoint import is_quantized_save, read_config
    from .demo import DEMOS, demo_name, is_demo
    from .detect import ARCHITECTURES, UnsupportedModelError
    from .sources import SourceError, pipeline_index, transformer_class_of

    try:
        if is_demo(value):
            demo = DEMOS[demo_name(value)]
            # A demo's name starts with its architecture's (flux, pixart-sigma, pixart-alpha, sd3), else generic (wan).
            architecture = demo.name.split("-")[0]
            architecture = architecture if any(a.name == architecture for a in ARCHITECTURES) else "generic"
            video = {"video": True, "fps": demo.fps, "frame_step": demo.frame_step} if demo.video else {}
            return ModelSource(value, "demo", architecture, **video)
        local = os.path.expanduser(value)
        if local.endswith(".safetensors"):
            from .comfy_quant import ComfyQuantError, describe_comfy, is_comfy_file

            if not os.path.isfile(local):
                raise UsageError(argument, f"{value}: no such file")
            if not is_comfy_file(local):
                raise UsageError(argument, f"{value}: a .safetensors file without ComfyUI quantization metadata")
            try:
                transformer_class = describe_comfy(local).transformer_class
            except ComfyQuantError as error:
                raise UsageError(argument, str(error)) from None
            return ModelSource(value, "comfy", _architecture_name(transformer_class))
        if os.path.isdir(local) and is_quantized_save(local):
            config = read_config(local)
            return ModelSource(value, "quantized", _architecture_name(config["_class_name"]), saved_config=config)
        architecture = _architecture_name(transformer_class_of(value))
        index = pipeline_index(value)
        scheduler = (index.get("scheduler") or [None, None])[1]
    except (ValueError, SourceError, UnsupportedModelError) as error:
        raise UsageError(argument, str(error)) from None
    return ModelSource(value, "pipeline", architecture, scheduler, **_video_fields(value, index))


# Schedulers whose step returns (previous sample, denoised sample), which diffusers' PixArt
# pipelines index for a one-step run.
ONE_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")


def check_steps_for(argument: str, steps: int | None, source: ModelSource) -> None:
    """PixArt's pipelines run a single step only with a scheduler made for it (the demos, and
    PixArt's own checkpoints, use DPM-Solver, whose single step fails inside diffusers)."""
    if steps == 1 and source.architecture == "pixart" and source.scheduler not in ONE_STEP_SCHEDULERS:
        scheduler = source.scheduler or "its multistep scheduler"
        raise UsageError(argument, f"1: a PixArt pipeline with {scheduler} needs at least 2 steps")


def check_video_options(args, source: ModelSource) -> None:
    """--frames (and --fps, where the command has it) against what ``source``'s pipeline makes; sets
    ``args.video`` and, for a video, ``args.fps`` (the pipeline's rate unless given)."""
    args.video = source.video
    what = source.text or "the demo"
    fps = getattr(args, "fps", None)
    if not source.video:
        for option, value in (("--frames", args.frames), ("--fps", fps)):
            if value is not None:
                raise UsageError(option, f"{what} makes images, not videos; omit {option}")
        return
    step = source.frame_step
    if args.frames is not None and step and (args.frames - 1) % step:
        below = (args.frames - 1) // step * step + 1
        raise UsageError(
            "--frames",
            f"{args.frames}: {what}'s VAE compresses time {step}x, so its videos have {step}k+1 frames; "
            f"use {below} or {below + step}",
        )
    if hasattr(args, "fps"):
        args.fps = fps if fps is not None else source.fps
