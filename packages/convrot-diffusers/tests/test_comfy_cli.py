import numpy as np
import pytest
import torch
from comfy_files import tiny_dit, tiny_sd3, write_comfy_file
from PIL import Image

import convrot
from convrot_diffusers.checkpoint import load_quantized
from convrot_diffusers.cli import main
from convrot_diffusers.comfy_quant import is_comfy_file, load_comfy

FAST = ["--steps", "3", "--height", "64", "--width", "64"]


def test_convert_both_ways_and_info(tmp_path, capsys):
    model = tiny_sd3()
    model.save_config(tmp_path / "config")
    comfy = tmp_path / "kitchen.safetensors"
    write_comfy_file(model, comfy)

    assert main(["info", str(comfy)]) == 0
    info = capsys.readouterr().out
    assert "SD3Transformer2DModel (ComfyUI file" in info and "17 convrot_w4a4, 2 int8_tensorwise" in info

    ours = tmp_path / "ours"
    assert main(["convert", str(comfy), str(ours), "--config", str(tmp_path / "config")]) == 0
    assert "smaller than bf16" in capsys.readouterr().out
    assert main(["info", str(ours)]) == 0
    assert "SD3Transformer2DModel" in capsys.readouterr().out
    from_dir = load_quantized(ours).state_dict()
    from_file = load_comfy(comfy, model.config).state_dict()
    assert from_dir.keys() == from_file.keys()
    assert all(torch.equal(from_dir[key], from_file[key]) for key in from_dir)

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(ours), str(back)]) == 0
    assert "ComfyUI comfy_quant, original names" in capsys.readouterr().out
    assert is_comfy_file(back)
    again = load_comfy(back, model.config).state_dict()
    assert all(torch.equal(again[key], from_file[key]) for key in from_file)


@pytest.mark.parametrize(
    "class_name", ["Flux2Transformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel"]
)
def test_convert_flux2_qwen_image_and_wan_files_both_ways(class_name, tmp_path, capsys):
    model = tiny_dit(class_name)()
    model.save_config(tmp_path / "config")  # 32-wide heads: the file alone does not say the rotary axes
    comfy = tmp_path / "kitchen.safetensors"
    write_comfy_file(model, comfy)
    assert main(["info", str(comfy)]) == 0
    assert f"{class_name} (ComfyUI file" in capsys.readouterr().out
    ours = tmp_path / "ours"
    assert main(["convert", str(comfy), str(ours), "--config", str(tmp_path / "config")]) == 0
    from_dir = load_quantized(ours).state_dict()
    from_file = load_comfy(comfy, model.config).state_dict()
    assert from_dir.keys() == from_file.keys()
    assert all(torch.equal(from_dir[key], from_file[key]) for key in from_dir)
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(ours), str(back)]) == 0
    again = load_comfy(back, model.config).state_dict()
    assert all(torch.equal(again[key], from_file[key]) for key in from_file)


def test_generate_from_a_comfy_file_matches_the_directory(tmp_path, seed):
    quantized = tmp_path / "sd3"
    assert main(["quantize", "demo:sd3", "--out", str(quantized), "--preset", "w4a4"]) == 0
    comfy = tmp_path / "sd3.safetensors"
    assert main(["convert", str(quantized), str(comfy)]) == 0
    images = []
    for source, extra in ((quantized, []), (comfy, ["--base", "demo:sd3"])):
        out = tmp_path / f"{len(images)}.png"
        assert (
            main(["generate", str(source), *extra, "--prompt", "a boat", "--seed", str(seed), "--out", str(out), *FAST])
            == 0
        )
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(images[0], images[1])


def test_convert_refuses_what_it_cannot_do(tmp_path, capsys):
    comfy = tmp_path / "kitchen.safetensors"
    write_comfy_file(tiny_sd3(), comfy)
    # SD3 configs are inferred; a Flux with 64-wide heads would need --config.
    # Argument mistakes are refused before any work: one line naming the argument, exit status 2.
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "argument IN" in capsys.readouterr().err
    assert main(["convert", str(comfy), str(tmp_path / "out"), "--config", str(tmp_path / "missing")]) == 1
    assert "--config" in capsys.readouterr().err
    assert main(["generate", str(comfy), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "pass --base-model" in capsys.readouterr().err
    assert main(["convert", str(comfy), str(tmp_path / "out.safetensors")]) == 2
    assert "argument OUT" in capsys.readouterr().err
    assert main(["convert", str(comfy), str(tmp_path / "inferred")]) == 0
    layers = [m for m in load_quantized(tmp_path / "inferred").modules() if isinstance(m, convrot.ConvLinear)]
    assert len(layers) == 29  # q, k and v apart in diffusers


@pytest.mark.parametrize("command", [["convert", "--help"], ["info", "--help"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 0
    assert "ComfyUI" in capsys.readouterr().out
