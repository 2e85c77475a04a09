import json
import math

import pytest
import torch
from test_diffusers_integration import forward, inputs

import convrot
from convrot_diffusers import load_quantized, quantize_transformer
from convrot_diffusers.cli import main
from convrot_diffusers.demo import flux_transformer
from convrot_diffusers.scan import bf16_bytes, layer_bytes, policy_under_budget
from convrot_diffusers.sensitivity import LayerSensitivity


def row(name, k, n, w4a4, w4a8, w4a8g64, w8a8):
    return LayerSensitivity(name, k, n, 256, "scan", w4a4, w8a8, w4a8, w4a8g64)


ROWS = [
    row("robust", 1024, 1024, 20.0, 24.0, 27.0, 40.0),
    row("fragile", 1024, 1024, 8.0, 10.0, 12.0, 30.0),
    row("odd", 96, 64, 15.0, 18.0, math.nan, 35.0),  # in_features not a multiple of 64
]


def test_tight_budget_takes_the_cheapest_best_scheme():
    policy, total = policy_under_budget(ROWS, sum(layer_bytes(r, "w4a4") for r in ROWS))
    # W4A8 costs what W4A4 does and measures better: every layer takes it.
    assert policy == {"robust": "w4a8", "fragile": "w4a8", "odd": "w4a8", "*": "skip"}
    assert total == sum(layer_bytes(r, "w4a8") for r in ROWS)


def test_more_budget_goes_to_the_noisiest_layer_first():
    base = sum(layer_bytes(r, "w4a8") for r in ROWS)
    extra = layer_bytes(ROWS[1], "w8a8") - layer_bytes(ROWS[1], "w4a8")
    policy, total = policy_under_budget(ROWS, base + extra)
    # The fragile layer's group scales remove the most noise per byte, then its W8A8.
    assert policy["fragile"] == "w4a8g64" and total <= base + extra
    assert policy_under_budget(ROWS, base + extra + 1e6)[0]["fragile"] in ("w8a8", "skip")
    everything, _ = policy_under_budget(ROWS, bf16_bytes(ROWS))
    assert {k for name, k in everything.items() if name != "*"} == {"skip"}


def test_budget_below_the_smallest_is_a_clear_error():
    with pytest.raises(ValueError, match="below the smallest"):
        policy_under_budget(ROWS, 1000)


def test_scan_policy_quantize_save_load_round_trip_on_the_demo(tmp_path, capsys, seed):
    out = tmp_path / "policy.json"
    args = ["scan", "--prompt", "a lighthouse", "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--max-ratio", "0.3", "--rows-per-layer", "64", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "0.3" in said and f"convrot quantize --policy {out} --out DIR" in said
    policy = json.loads(out.read_text())
    assert list(policy)[-1] == "*" and set(policy.values()) <= set(convrot.KINDS)
    assert main([*args, "--out", str(out), "--overwrite"]) == 2  # no budget given: refused before any work
    assert "give one budget" in capsys.readouterr().err

    saved = tmp_path / "saved"
    assert main(["quantize", "--policy", str(out), "--out", str(saved)]) == 0
    assert f"policy {out}" in capsys.readouterr().out
    loaded = load_quantized(saved)
    kinds = {name: layer.kind for name, layer in convrot.quantized_layers(loaded).items()}
    assert kinds == {name: kind for name, kind in list(policy.items())[:-1] if kind != "skip"}
    assert len(set(kinds.values())) >= 2  # the budget buys some layers more than the cheapest scheme
    in_memory = quantize_transformer(flux_transformer().to(torch.bfloat16), policy=out, progress=False)
    x = inputs(in_memory, torch.Generator().manual_seed(seed))
    assert torch.equal(forward(in_memory, x), forward(loaded, x))
    assert main(["info", str(saved)]) == 0 and f"{len(policy)} patterns" in capsys.readouterr().out
