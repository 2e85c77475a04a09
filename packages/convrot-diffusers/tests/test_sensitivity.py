import csv

import pytest
import torch
from torch import nn

from convrot_diffusers.sensitivity import ActivationRecorder, layer_sensitivity, plot, write_csv


def model():
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16)


def test_recorder_keeps_a_bounded_uniform_sample(seed):
    net = model()
    generator = torch.Generator().manual_seed(seed)
    with ActivationRecorder(net, rows_per_layer=100, seed=seed) as recorder:
        for step in range(10):
            # Rows of call `step` carry the value `step`, so the sample's mix shows its uniformity.
            net(torch.full((50, 256), float(step), dtype=torch.bfloat16))
    assert set(recorder.samples) == {"0", "2"}
    sample = recorder.samples["0"]
    assert sample.shape == (100, 256) and recorder.seen["0"] == 500
    counts = torch.bincount(sample[:, 0].float().long(), minlength=10)
    assert counts.max() < 30, counts  # uniform: 10 expected per call
    assert torch.randn(1, generator=generator) is not None
    net(torch.ones(3, 256, dtype=torch.bfloat16))  # hooks are gone
    assert recorder.seen["0"] == 500


def test_layer_sensitivity_report(tmp_path):
    net = model()
    with ActivationRecorder(net, rows_per_layer=64) as recorder:
        net(torch.randn(4, 32, 256).to(torch.bfloat16))
    rows = layer_sensitivity(net, recorder.samples, lambda name: "w4a4", group_size=256)
    assert [r.layer for r in rows] == ["0", "2"]
    for row in rows:
        assert 8 < row.sqnr_w4a4_db < 25 and row.sqnr_w8a8_db > row.sqnr_w4a4_db + 15
        # 8-bit activations and group-scaled weights each recover part of W4A4's loss.
        assert row.sqnr_w4a4_db < row.sqnr_w4a8_db < row.sqnr_w4a8g64_db < row.sqnr_w8a8_db
    assert rows[1].group_size == 256
    write_csv(rows, tmp_path / "layers.csv")
    with open(tmp_path / "layers.csv") as f:
        read = list(csv.DictReader(f))
    assert read[0]["layer"] == "0" and float(read[1]["sqnr_w4a4_db"]) == pytest.approx(rows[1].sqnr_w4a4_db, abs=1e-3)
    plot(rows, tmp_path / "layers.png", "test")
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
