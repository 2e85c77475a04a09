"""The transformer-step benchmark runs end to end (CPU, shrunken widths), so it cannot rot between GPU runs."""

import json

import pytest
import torch
from conftest import load_benchmark

import convrot_diffusers
from convrot_diffusers.demo import flux_transformer


def load_bench():
    return load_benchmark("bench_transformer_step")


def test_benchmark_smoke_run_writes_its_report(tmp_path):
    bench = load_bench()
    bench.main(
        [
            "--tiny",
            "--models",
            "pixart",
            "--batches",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--variants",
            "bf16-eager,w4a4-eager,w4a4-fused-eager",
            "--out-dir",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "transformer_step.json").read_text())
    variants = {r["variant"]: r for r in report["results"]}
    assert set(variants) == {"bf16-eager", "w4a4-eager", "w4a4-fused-eager"}
    # 4-bit weights: the quantized transformer holds well under half of the bf16 bytes.
    assert variants["w4a4-eager"]["weight_gib"] < 0.5 * variants["bf16-eager"]["weight_gib"]
    assert variants["w4a4-eager"]["breakdown_ms"]["gemm"] > 0
    assert variants["w4a4-fused-eager"]["weight_gib"] == variants["w4a4-eager"]["weight_gib"]
    assert variants["w4a4-eager"]["top_kernels"]
    assert "| pixart | 1 | w4a4-eager |" in (tmp_path / "transformer_step.md").read_text()
    assert (tmp_path / "transformer_step.png").stat().st_size > 0


def test_normrope_variants_install_the_fused_attention_processor(tmp_path):
    bench = load_bench()
    args = ["--tiny", "--models", "flux", "--batches", "1", "--iters", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
    bench.main([*args, "--variants", "bf16-normrope-eager,w4a4-fused-normrope-eager"])
    report = json.loads((tmp_path / "transformer_step.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"bf16-normrope-eager", "w4a4-fused-normrope-eager"}
    model = bench.prepare(bench.build("flux", None, True, "cpu"), "bf16-normrope-eager")
    assert convrot_diffusers.fuse_qk_norm_rope(model) == 0  # prepare gave every module the fused processor
    assert convrot_diffusers.unfuse_qk_norm_rope(model) > 0


def test_attn8_variants_fuse_with_8_bit_attention():
    # The benchmark's tiny Flux has head dim 32, which 8-bit attention does not take: the demo's has 64.
    bench = load_bench()
    for variant in ("bf16-attn8-eager", "w4a4-fused-attn8-eager"):
        model = bench.prepare(flux_transformer().to(torch.bfloat16), variant)
        processors = [m.processor for m in model.modules() if type(m).__name__ == "FluxAttention"]
        assert processors and all(p.attention == "int8" for p in processors), variant
    assert bench.split_variant("w4a4-fused-attn8-compiled-graph") == ("w4a4-fused-attn8", "compiled-graph")


def test_rounds_time_every_variant_again(tmp_path):
    bench = load_bench()
    args = ["--tiny", "--models", "pixart", "--batches", "1", "--iters", "2", "--warmup", "0", "--rounds", "3"]
    bench.main([*args, "--variants", "bf16-eager,w4a4-eager", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "transformer_step.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"bf16-eager", "w4a4-eager"}
    for r in report["results"]:
        assert len(r["steps_ms"]) == 6  # three rounds of two steps
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]


def test_rounds_below_one_are_refused(tmp_path):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--rounds", "0", "--out-dir", str(tmp_path)])


def test_weight_bytes_count_what_a_tensor_subclass_holds():
    from torch.testing._internal.two_tensor import TwoTensor

    bench = load_bench()
    layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    plain = bench.weight_bytes(layer)
    assert plain == (64 * 32 + 32) * 2
    # A weight held as torchao holds one, in inner tensors: two int8 [32, 64] tensors, not one tensor's nominal bytes.
    codes = [torch.randint(-8, 8, (32, 64), dtype=torch.int8) for _ in range(2)]
    layer.weight = torch.nn.Parameter(TwoTensor(*codes), requires_grad=False)
    assert bench.weight_bytes(layer) == 2 * 32 * 64 + 32 * 2
