import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from convrot_diffusers.cli import main
from convrot_diffusers.lpips_metric import lpips_unavailable

FAST = ["--steps", "3", "--height", "64", "--width", "64"]
VIDEO = ["demo:wan", "--prompt", "a fox running", "--steps", "2", "--height", "32", "--width", "48", "--frames", "5"]


def _frames(path) -> tuple[list[np.ndarray], list[int]]:
    image = Image.open(path)
    frames, durations = [], []
    for index in range(image.n_frames):
        image.seek(index)
        image.load()
        frames.append(np.asarray(image.convert("RGB")))
        durations.append(image.info["duration"])
    return frames, durations


def test_compare_on_the_demo(tmp_path, capsys, seed):
    out = tmp_path / "compare"
    assert main(["compare", "--prompt", "a lighthouse", "--seed", str(seed), "--out-dir", str(out), *FAST]) == 0
    stdout, stderr = capsys.readouterr()
    assert "RANDOM weights" in stderr and "PSNR" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_demo_weights"] is True and summary["psnr_db"] > 35 and 0.9 < summary["ssim"] <= 1
    if (lpips_absent := lpips_unavailable()) is None:
        assert 0 <= summary["lpips"] < 1 and "LPIPS" in stdout
    else:  # said once, before the runs, and recorded; never a number
        assert stderr.count(f"LPIPS will not be reported (PSNR and SSIM will): {lpips_absent}") == 1
        assert summary["lpips"] is None and summary["lpips_unavailable"] == lpips_absent
    side = Image.open(out / "side_by_side.png")
    assert side.width >= 2 * Image.open(out / "bf16.png").width
    with open(out / "layer_sqnr.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 62  # every Linear of the demo Flux transformer
    assert {r["precision"] for r in rows} == {"w4a4", "w8a8", "bf16"}
    assert all(float(r["sqnr_w8a8_db"]) > float(r["sqnr_w4a4_db"]) for r in rows)
    assert (out / "layer_sqnr.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_quantize_generate_on_the_video_demo(tmp_path, capsys, seed):
    from convrot_diffusers.demo import wan_transformer
    from convrot_diffusers.video import mp4_available

    out = tmp_path / "compare"
    assert main(["compare", *VIDEO, "--seed", str(seed), "--out-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "over 5 frames" in stdout and "bf16.webp" in stdout
    summary = json.loads((out / "summary.json").read_text())
    per_frame = summary["psnr_db_per_frame"]
    assert summary["frames"] == 5 and summary["fps"] == 16 and len(per_frame) == len(summary["ssim_per_frame"]) == 5
    assert summary["psnr_db"] == pytest.approx(sum(per_frame) / 5) and summary["psnr_db_min"] == min(per_frame)
    assert summary["ssim_min"] == min(summary["ssim_per_frame"]) <= summary["ssim"]
    assert 30 < summary["psnr_db_min"] < 80 and 0.9 < summary["ssim_min"] < 1  # quantized, and close
    assert summary["lpips"] is None and "not computed for videos" in summary["lpips_unavailable"]
    for name in ("bf16.webp", "quantized.webp"):
        frames, durations = _frames(out / name)
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3) and set(durations) == {62}  # 1000 / 16 ms
    assert not np.array_equal(_frames(out / "bf16.webp")[0], _frames(out / "quantized.webp")[0])
    side, _ = _frames(out / "side_by_side.webp")
    assert len(side) == 5 and side[0].shape[1] >= 2 * 48
    with open(out / "layer_sqnr.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(isinstance(m, torch.nn.Linear) for m in wan_transformer().modules())

    # The same quantized model through a save, written at another rate: the frames compare made.
    saved = tmp_path / "wan-mix"
    assert main(["quantize", "demo:wan", "--out", str(saved)]) == 0
    video = tmp_path / "clip.webp"
    args = ["generate", str(saved), *VIDEO[1:], "--seed", str(seed), "--fps", "8"]
    assert main([*args, "--out", str(video)]) == 0
    assert "5 frames, 48x32, 8 fps" in capsys.readouterr().out
    frames, durations = _frames(video)
    assert set(durations) == {125}
    assert all(np.array_equal(a, b) for a, b in zip(frames, _frames(out / "quantized.webp")[0], strict=True))
    # Several prompts: numbered videos, video i made with seed + i (so the first is the one above).
    assert main([*args, "--prompt", "a cat", "--out", str(tmp_path / "many.webp")]) == 0
    assert "2 videos" in capsys.readouterr().out
    first, second = (_frames(tmp_path / f"many-00{i}.webp")[0] for i in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, frames, strict=True))
    assert len(second) == 5 and not np.array_equal(second[0], first[0])
    if mp4_available():
        import imageio_ffmpeg

        assert main([*args, "--out", str(tmp_path / "clip.mp4")]) == 0
        reader = imageio_ffmpeg.read_frames(str(tmp_path / "clip.mp4"))
        meta = next(reader)
        assert meta["size"] == (48, 32) and meta["fps"] == 8 and sum(1 for _ in reader) == 5


def test_quantize_info_generate(tmp_path, capsys, seed):
    saved = tmp_path / "sd3-w4a4"
    assert main(["quantize", "demo:sd3", "--out", str(saved), "--preset", "w4a4"]) == 0
    assert "smaller than bf16" in capsys.readouterr().out

    assert main(["info", str(saved)]) == 0
    info = capsys.readouterr().out
    assert "SD3Transformer2DModel" in info and "w4a4" in info and "demo:sd3" in info

    image = tmp_path / "from-save.png"
    image.write_bytes(b"an older image")  # replaced with --overwrite
    args = ["generate", str(saved), "--prompt", "a boat", "--seed", str(seed), "--out", str(image), *FAST]
    assert main([*args, "--overwrite"]) == 0
    on_the_fly = tmp_path / "on-the-fly.png"
    args = ["generate", "demo:sd3", "--preset", "w4a4", "--prompt", "a boat", "--seed", str(seed), *FAST]
    assert main([*args, "--out", str(on_the_fly)]) == 0
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(on_the_fly)))
    assert Image.open(image).size == (64, 64)


def test_console_script_is_installed(tmp_path):
    script = shutil.which("convrot") or pytest.skip("the convrot script is not on PATH")
    result = subprocess.run([script, "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("convrot: error:") and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "convrot_diffusers.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compare" in result.stdout


def test_unsupported_pipeline_lists_the_supported_ones(tmp_path, capsys):
    model = tmp_path / "sdxl"
    model.mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (model / "model_index.json").write_text(json.dumps(index))
    assert main(["generate", str(model), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "has no transformer" in err and "Flux" in err and len(err.strip().splitlines()) == 1
    (model / "model_index.json").write_text(json.dumps({**index, "transformer": ["my_package", "MyTransformer"]}))
    assert main(["quantize", str(model), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "'MyTransformer' is not a diffusers model class" in err and "FluxTransformer2DModel" in err
