"""The sensitivity measurement behind the mix preset runs end to end (CPU, shrunken Flux), and its
derivation takes the upgrades that buy the most output SQNR per byte, within the budget."""

import json

from conftest import load_benchmark


def load_script():
    return load_benchmark("measure_sensitivity")


def role(name, w8a8_db, skip_db, w8a8_bytes, skip_bytes):
    return {
        "role": name,
        "output_sqnr_w8a8_db": w8a8_db,
        "output_sqnr_skip_db": skip_db,
        "extra_bytes_w8a8": w8a8_bytes,
        "extra_bytes_skip": skip_bytes,
    }


def test_derivation_takes_the_most_noise_removed_per_byte_within_budget():
    script = load_script()
    rows = [
        role("cheap", 21.0, 21.1, 10, 30),  # +1 dB for 10 bytes
        role("big", 22.0, 22.0, 100, 300),  # +2 dB for 100 bytes
        role("noise", 20.05, 20.05, 1, 3),  # below the least gain: never taken
    ]
    assert script.derive_mix(rows, 20.0, 10, 0.2) == {"cheap": "w8a8"}
    assert script.derive_mix(rows, 20.0, 110, 0.2) == {"cheap": "w8a8", "big": "w8a8"}
    assert script.derive_mix(rows, 20.0, 130, 0.2) == {"cheap": "skip", "big": "w8a8"}
    assert script.derive_mix(rows, 20.0, 5, 0.2) == {}
    counts = script.block_counts(["blocks.0.a", "blocks.1.a", "blocks.2.b", "embed"], ["blocks"])
    assert counts == {"blocks": 3}
    assert [script.role_of(n, counts) for n in ("blocks.0.a", "blocks.2.b", "embed")] == [
        "blocks.*.a",
        "blocks.<last>.b",
        "embed",
    ]


def test_measurement_smoke_run_writes_its_report(tmp_path, capsys):
    script = load_script()
    args = ["--tiny", "--device", "cpu", "--models", "flux", "--flux-blocks", "1", "2", "--timesteps", "0.5"]
    assert script.main([*args, "--rows-per-layer", "16", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sensitivity_flux_tiny.json").read_text())
    roles = {row["role"] for row in result["roles"]}
    assert "transformer_blocks.<last>.attn.to_out.0" in roles and "single_transformer_blocks.*.proj_out" in roles
    assert result["derived_mix"]["bytes_ratio"] <= result["current_mix"]["bytes_ratio"] + 1e-9
    assert {v["rule"] for v in result["current_rules"]} >= {"transformer_blocks.*.attn.to_out.0"}
    assert "derived mix" in capsys.readouterr().out
