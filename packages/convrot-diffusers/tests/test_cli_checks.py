"""Every class of bad argument, on every subcommand: one line naming the argument, exit status 2,
and no model loaded (the loaders are replaced by ones that fail the test)."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch

import convrot_diffusers.cli_checks as cli_checks
from convrot_diffusers import demo, sources
from convrot_diffusers.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized save of the SD3 demo (w4a4, group 256), made once for the module."""
    directory = tmp_path_factory.mktemp("saves") / "sd3-w4a4"
    assert main(["quantize", "demo:sd3", "--out", str(directory), "--preset", "w4a4"]) == 0
    return directory


def _video_pipeline_directory(path, pipeline, transformer, vae, vae_config=None):
    """A video pipeline's model_index.json and VAE config.json, without weights (the checks read no more)."""
    path.mkdir()
    index = {"_class_name": pipeline, "transformer": ["diffusers", transformer], "vae": ["diffusers", vae]}
    (path / "model_index.json").write_text(json.dumps(index))
    (path / "vae").mkdir()
    (path / "vae" / "config.json").write_text(json.dumps({"_class_name": vae, **(vae_config or {})}))
    return path


@pytest.fixture
def place(tmp_path, saved, monkeypatch):
    """Paths the table refers to by name, made in a fresh directory (the working directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "exists.png").write_bytes(b"an earlier image")
    (tmp_path / "x-001.png").write_bytes(b"an earlier second image")
    (tmp_path / "blank.txt").write_text("\n   \n")
    (tmp_path / "exists.webp").write_bytes(b"an earlier video")
    (tmp_path / "old-compare").mkdir()
    (tmp_path / "old-compare" / "bf16.png").write_bytes(b"an earlier result")
    (tmp_path / "old-video-compare").mkdir()
    (tmp_path / "old-video-compare" / "side_by_side.webp").write_bytes(b"an earlier result")
    _video_pipeline_directory(tmp_path / "wan-dir", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan")
    (tmp_path / "other-config").mkdir()
    (tmp_path / "other-config" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    names = {"SAVE": str(saved), "SAVE_COPY": str(tmp_path / "save-copy"), "SAVE_LOST_BASE": str(tmp_path / "lost")}
    shutil.copytree(saved, names["SAVE_COPY"])
    shutil.copytree(saved, names["SAVE_LOST_BASE"])
    config_path = tmp_path / "lost" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["base_model"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(config))
    return names


@pytest.fixture
def no_model_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in (
        (sources, "load_pipeline"),
        (sources, "load_saved_pipeline"),
        (sources, "load_transformer_quantized"),
        (demo, "demo_pipeline"),
    ):
        monkeypatch.setattr(module, name, fail)


G = ["generate", "--prompt", "x"]  # the demo, with the one required option
C = ["compare", "--prompt", "x"]
W = ["generate", "demo:wan", "--prompt", "x"]  # the video demo
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")

CASES = {
    # quantize: the model, the output directory, the numbers, the device
    "quantize unknown demo": (["quantize", "demo:sdxl", "--out", "q"], "MODEL", "unknown demo 'sdxl'"),
    "quantize missing model": (["quantize", "./no/such", "--out", "q"], "MODEL", "no such directory"),
    "quantize not a hub id": (["quantize", "not a model id", "--out", "q"], "MODEL", "not a hub id"),
    "quantize unsupported": (["quantize", "sdxl", "--out", "q"], "MODEL", "has no transformer"),
    "quantize a save": (["quantize", "SAVE", "--out", "q"], "MODEL", "is already quantized"),
    "quantize out is a file": (["quantize", "--out", "a-file"], "--out", "a-file is a file, not a directory"),
    "quantize out under a file": (["quantize", "--out", "a-file/q"], "--out", "is a file, not a directory"),
    "quantize clobber": (["quantize", "--out", "SAVE_COPY"], "--out", "already holds config.json"),
    "quantize not a save": (
        ["quantize", "--out", "other-config", "--overwrite"],
        "--out",
        "not a ConvRot save",
    ),
    "quantize group size": (["quantize", "--out", "q", "--group-size", "100"], "--group-size", "a power of 4"),
    "quantize group size text": (["quantize", "--out", "q", "--group-size", "x"], "--group-size", "invalid int"),
    "quantize preset": (["quantize", "--out", "q", "--preset", "w2a2"], "--preset", "invalid choice: 'w2a2'"),
    "quantize device": (["quantize", "--out", "q", "--device", "gpu"], "--device", "unknown device 'gpu'"),
    "quantize no cuda": pytest.param(
        ["quantize", "--out", "q", "--device", "cuda"], "--device", "no CUDA device", marks=NO_CUDA
    ),
    "quantize no out": (["quantize"], "--out", "required"),
    # generate: the image file, the numbers, presets against the kind of MODEL
    "generate steps 0": ([*G, "--out", "x.png", "--steps", "0"], "--steps", "between 1 and 1000, got 0"),
    "generate steps negative": ([*G, "--out", "x.png", "--steps", "-3"], "--steps", "got -3"),
    "generate steps text": ([*G, "--out", "x.png", "--steps", "many"], "--steps", "expected an integer"),
    "generate height": ([*G, "--out", "x.png", "--height", "100"], "--height", "a multiple of 16, got 100"),
    "generate width": ([*G, "--out", "x.png", "--width", "0"], "--width", "got 0"),
    "generate guidance": ([*G, "--out", "x.png", "--guidance", "-1"], "--guidance", "at least 0"),
    "generate guidance nan": ([*G, "--out", "x.png", "--guidance", "nan"], "--guidance", "at least 0"),
    "generate seed": ([*G, "--out", "x.png", "--seed", "-1"], "--seed", "between 0 and"),
    "generate clobber": ([*G, "--out", "exists.png"], "--out", "exists.png exists; pass --overwrite"),
    "generate out is a directory": ([*G, "--out", "empty"], "--out", "empty is a directory"),
    "generate no extension": ([*G, "--out", "picture"], "--out", "no image extension"),
    "generate unknown extension": ([*G, "--out", "x.pgn"], "--out", "unknown image extension '.pgn'"),
    "generate out under a file": ([*G, "--out", "a-file/x.png"], "--out", "is a file, not a directory"),
    "generate prompt file missing": (
        ["generate", "--prompt-file", "no-such.txt", "--out", "x.png"],
        "--prompt-file",
        "no-such.txt: no such file",
    ),
    "generate blank prompt file": (
        ["generate", "--prompt-file", "blank.txt", "--out", "x.png"],
        "--prompt-file",
        "holds no prompt",
    ),
    "generate numbered clobber": (
        [*G, "--prompt", "y", "--out", "x.png"],
        "--out",
        "x-001.png exist; pass --overwrite",
    ),
    "generate seeds past 2**64": ([*G, "--prompt", "y", "--seed", str(2**64 - 1), "--out", "y.png"], "--seed", "2**64"),
    "generate preset of a save": (
        ["generate", "SAVE", "--prompt", "x", "--out", "x.png", "--preset", "mix"],
        "--preset",
        "is a quantized save (preset w4a4)",
    ),
    "generate bf16 of a save": (
        ["generate", "SAVE", "--prompt", "x", "--out", "x.png", "--preset", "bf16"],
        "--preset",
        "runs as saved",
    ),
    "generate group size of a save": (
        ["generate", "SAVE", "--prompt", "x", "--out", "x.png", "--group-size", "64"],
        "--group-size",
        "(group_size 256)",
    ),
    "generate base model of a demo": (
        [*G, "--out", "x.png", "--base-model", "demo:flux"],
        "--base-model",
        "only for a quantized directory",
    ),
    "generate unknown base model": (
        ["generate", "SAVE", "--prompt", "x", "--out", "x.png", "--base-model", "demo:sdxl"],
        "--base-model",
        "unknown demo",
    ),
    "generate base model is a save": (
        ["generate", "SAVE", "--prompt", "x", "--out", "x.png", "--base-model", "SAVE_COPY"],
        "--base-model",
        "is a quantized save",
    ),
    "generate group size of bf16": (
        [*G, "--out", "x.png", "--preset", "bf16", "--group-size", "64"],
        "--group-size",
        "no effect with --preset bf16",
    ),
    "generate lost base model": (
        ["generate", "SAVE_LOST_BASE", "--prompt", "x", "--out", "x.png"],
        "--base-model",
        "moved-away (and it is not a hub id",
    ),
    "generate one pixart step": (
        ["generate", "demo:pixart-sigma", "--prompt", "x", "--out", "x.png", "--steps", "1"],
        "--steps",
        "needs at least 2 steps",
    ),
    "generate missing model": (["generate", "./no/such", "--prompt", "x", "--out", "x.png"], "MODEL", "no such"),
    "generate device": ([*G, "--out", "x.png", "--device", "cuda:x"], "--device", "unknown device"),
    # generate, video: the frames and rate against what the pipeline makes, the video file
    "generate frames of images": ([*G, "--out", "x.png", "--frames", "9"], "--frames", "makes images, not videos"),
    "generate fps of images": ([*G, "--out", "x.png", "--fps", "8"], "--fps", "makes images, not videos"),
    "generate frames 0": ([*W, "--out", "x.webp", "--frames", "0"], "--frames", "between 1 and 1000, got 0"),
    "generate frames text": ([*W, "--out", "x.webp", "--num-frames", "ten"], "--frames", "expected an integer"),
    "generate frames 4k+1": ([*W, "--out", "x.webp", "--frames", "8"], "--frames", "4k+1 frames; use 5 or 9"),
    "generate fps 0": ([*W, "--out", "x.webp", "--fps", "0"], "--fps", "between 1 and 240, got 0"),
    "generate fps nan": ([*W, "--out", "x.webp", "--fps", "nan"], "--fps", "between 1 and 240"),
    "generate video as png": ([*W, "--out", "x.png"], "--out", "unknown video extension '.png'; use .webp"),
    "generate video no extension": ([*W, "--out", "clip"], "--out", "no video extension"),
    "generate video clobber": ([*W, "--out", "exists.webp"], "--out", "exists.webp exists; pass --overwrite"),
    "generate pipeline frames": (
        ["generate", "wan-dir", "--prompt", "x", "--out", "x.webp", "--frames", "10"],
        "--frames",
        "wan-dir's VAE compresses time 4x, so its videos have 4k+1 frames; use 9 or 13",
    ),
    "generate pipeline video as jpg": (
        ["generate", "wan-dir", "--prompt", "x", "--out", "x.jpg"],
        "--out",
        "unknown video extension '.jpg'",
    ),
    "generate no prompt": (["generate", "--out", "x.png"], "--prompt", "required"),
    # compare: the output directory, the sampling, the bf16 model it needs
    "compare rows 0": ([*C, "--rows-per-layer", "0"], "--rows-per-layer", "at least 1, got 0"),
    "compare clobber": ([*C, "--out-dir", "old-compare"], "--out-dir", "already holds bf16.png"),
    "compare out is a file": ([*C, "--out-dir", "a-file"], "--out-dir", "is a file, not a directory"),
    "compare a save": (["compare", "SAVE", "--prompt", "x"], "MODEL", "compare starts from the bf16 pipeline"),
    "compare steps": ([*C, "--steps", "0"], "--steps", "got 0"),
    "compare height": ([*C, "--height", "17"], "--height", "a multiple of 16"),
    "compare group size": ([*C, "--group-size", "3"], "--group-size", "a power of 4"),
    "compare bf16": ([*C, "--preset", "bf16"], "--preset", "invalid choice"),
    "compare device": ([*C, "--device", "tpu"], "--device", "unknown device"),
    "compare frames of images": ([*C, "--frames", "5"], "--frames", "makes images, not videos"),
    "compare frames 4k+1": (["compare", "demo:wan", "--prompt", "x", "--frames", "3"], "--frames", "use 1 or 5"),
    "compare video clobber": (
        ["compare", "demo:wan", "--prompt", "x", "--out-dir", "old-video-compare"],
        "--out-dir",
        "already holds side_by_side.webp",
    ),
    # scan: the frames too (it runs the pipeline), no frame rate (it writes no video)
    "scan frames 4k+1": (
        ["scan", "demo:wan", "--prompt", "x", "--max-ratio", "0.5", "--frames", "6"],
        "--frames",
        "use 5 or 9",
    ),
    "scan fps": (["scan", "demo:wan", "--prompt", "x", "--max-ratio", "0.5", "--fps", "8"], "--fps", "unrecognized"),
    # info: the directory
    "info missing": (["info", "no-such"], "PATH", "no such directory"),
    "info a file": (["info", "a-file"], "PATH", "not a directory"),
    "info not a save": (["info", "empty"], "PATH", "no config.json"),
    "info not convrot": (["info", "other-config"], "PATH", "has no ConvRot quantization_config"),
    "info bad json": (["info", "bad-json"], "PATH", "not a JSON file"),
    # the command itself
    "unknown command": (["frobnicate"], "COMMAND", "invalid choice: 'frobnicate'"),
}


@pytest.mark.parametrize("argv, argument, message", list(CASES.values()), ids=list(CASES))
def test_bad_arguments_are_one_line_naming_the_argument(argv, argument, message, place, no_model_loads, capsys):
    argv = [place.get(word, word) for word in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("convrot: error:") and argument in err and message in err, err


@pytest.mark.parametrize("command", ["quantize", "compare", "scan", "info", "convert"])
def test_only_generate_runs_under_a_launcher(command, monkeypatch, no_model_loads, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"info": ["info", "x"], "convert": ["convert", "a", "b"], "quantize": ["quantize", "--out", "q"]}
    assert main(argv.get(command, [command, "--prompt", "x"])) == 2
    err = capsys.readouterr().err.strip()
    assert f"{command} runs in one process" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "--out", "q"],
        ["generate", "--prompt", "x", "--out", "x.png"],
        ["compare", "--prompt", "x", "--out-dir", "results"],
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(
    argv, tmp_path, monkeypatch, no_model_loads, capsys
):
    # A read-only file system refuses root too, which chmod cannot show: the probe fails as it would there.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_checks.tempfile, "TemporaryFile", read_only)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write in" in err and "Read-only file system" in err and len(err.splitlines()) == 1


def test_an_output_in_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            pytest.skip("this user writes in read-only directories (root)")
        except PermissionError:
            pass
        assert main(["generate", "--prompt", "x", "--out", str(locked / "x.png")]) == 2
        assert "Permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-10] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, message",
    [("truncated", r"truncated: \d+ of \d+ bytes"), ("flipped", r"tensors corrupted \(checksum mismatch\)")],
)
def test_info_says_what_is_wrong_with_a_damaged_save(saved, tmp_path, how, message, capsys):
    import re

    copy = tmp_path / "save"
    shutil.copytree(saved, copy)
    _damage(copy / "diffusion_pytorch_model.safetensors", how)
    assert main(["info", str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_info_verifies_a_sound_save(saved, capsys):
    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "every tensor matches its CRC-32" in out and "group size:    256" in out


def test_info_shows_the_group_sizes_the_layers_use(tmp_path, capsys):
    save = tmp_path / "pixart"
    assert main(["quantize", "demo:pixart-sigma", "--out", str(save), "--preset", "w4a4"]) == 0
    assert main(["info", str(save)]) == 0
    out = capsys.readouterr().out
    assert "64 in 36 layers, 256 in 4 layers (256 requested" in out  # the demo's 192-wide layers use 64


HEAVY = ("torch", "diffusers", "transformers")


def _heavy_modules_after(code: str) -> set[str]:
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    report = f"print('imported:', *sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{report}"], capture_output=True, text=True)
    return set(result.stdout.splitlines()[-1].split()[1:])


def test_help_and_number_errors_import_nothing_heavy():
    assert _heavy_modules_after("import convrot_diffusers") == set()
    cli = "from convrot_diffusers.cli import main\n"
    assert _heavy_modules_after(cli + "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass") == set()
    assert _heavy_modules_after(cli + "main(['generate', '--prompt', 'x', '--steps', '0', '--out', 'x.png'])") == set()


def test_a_run_shows_no_third_party_notices(tmp_path):
    argv = ["generate", "demo:pixart-alpha", "--prompt", "x", "--preset", "bf16", "--steps", "2"]
    argv += ["--height", "32", "--width", "32", "--out", str(tmp_path / "x.png")]
    result = subprocess.run([sys.executable, "-m", "convrot_diffusers.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # What remains on stderr: convrot's own lines and the denoising progress bar.
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("convrot: ") or "it/s" in line or "s/it" in line or "?it" in line for line in lines), (
        lines
    )


@pytest.mark.parametrize(
    "parse, text, value",
    [
        (cli_checks.integer(1, 10), "10", 10),
        (cli_checks.integer(16, None, multiple=16), "4096", 4096),
        (cli_checks.real(0), "7.5", 7.5),
    ],
)
def test_number_types_accept_what_is_in_range(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("command", ["quantize", "generate", "compare", "scan", "info"])
def test_help_describes_every_argument(command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if command == "info":
        assert "PATH a directory written by `convrot quantize`, or a ComfyUI file" in text
    elif command == "scan":
        assert "--max-bytes" in text and "--max-ratio" in text and "cpu, cuda or cuda:N" in text
    else:
        assert "W8A8" in text and "bf16" in text  # what mix keeps at higher precision
        assert "cpu, cuda or cuda:N" in text


def test_mp4_without_imageio_ffmpeg_says_how_to_install_it(tmp_path, monkeypatch, no_model_loads, capsys):
    import convrot_diffusers.video as video

    monkeypatch.setattr(video, "mp4_available", lambda: False)
    assert main([*W, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "pip install 'convrot-diffusers[mp4]'" in err, err


@pytest.mark.parametrize(
    "pipeline, transformer, vae, vae_config, fps, frame_step",
    [
        ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", {"scale_factor_temporal": 4}, 16.0, 4),
        ("LTX2Pipeline", "LTX2VideoTransformer3DModel", "AutoencoderKLLTX2Video", {}, 24.0, None),  # its frame_rate
        (
            "LTX2Pipeline",
            "LTX2VideoTransformer3DModel",
            "AutoencoderKLLTX2Video",
            {"temporal_compression_ratio": 8},
            24.0,
            8,
        ),
    ],
)
def test_a_video_pipeline_is_known_from_its_index_and_vae_config(
    tmp_path, pipeline, transformer, vae, vae_config, fps, frame_step
):
    directory = _video_pipeline_directory(tmp_path / "pipe", pipeline, transformer, vae, vae_config)
    source = cli_checks.check_model("MODEL", str(directory))
    assert (source.kind, source.architecture, source.video) == ("pipeline", "generic", True)
    assert (source.fps, source.frame_step) == (fps, frame_step)


def test_an_image_pipeline_is_not_a_video_one(tmp_path):
    directory = tmp_path / "flux"
    directory.mkdir()
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (directory / "model_index.json").write_text(json.dumps(index))
    source = cli_checks.check_model("MODEL", str(directory))
    assert (source.architecture, source.video, source.fps, source.frame_step) == ("flux", False, None, None)
    wan = cli_checks.check_model("MODEL", "demo:wan")
    assert (wan.kind, wan.architecture, wan.video, wan.fps, wan.frame_step) == ("demo", "generic", True, 16, 4)
