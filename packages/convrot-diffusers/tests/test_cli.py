import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convrot_diffusers.cli import main
from convrot_diffusers.lpips_metric import lpips_unavailable

FAST = ["--steps", "3", "--height", "64", "--width", "64"]


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
    (model / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "HunyuanDiT2DModel"]}))
    assert main(["quantize", str(model), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "unsupported transformer HunyuanDiT2DModel" in err and "FluxTransformer2DModel" in err
