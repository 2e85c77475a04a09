"""The whole-pipeline benchmark runs end to end (CPU, shrunken widths), so it cannot rot between GPU runs."""

import json

import pytest
import torch
from conftest import load_benchmark


def load_bench():
    return load_benchmark("bench_pipeline")


def test_smoke_run_times_steps_and_decode_and_writes_its_report(tmp_path):
    bench = load_bench()
    steps, calls = 3, 2
    variants = "bf16-eager,w4a4-fused-normrope-eager,w4a8-fused-eager,w4a4-fused-attn8-compiled-graph"
    bench.main(
        ["--tiny", "--flux-blocks", "1,1", "--steps", str(steps), "--calls", str(calls), "--variants", variants]
        + ["--out-dir", str(tmp_path)]
    )
    report = json.loads((tmp_path / "pipeline.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"bf16-eager", "w4a4-fused-normrope-eager", "w4a8-fused-eager"}
    for r in results.values():
        assert len(r["calls"]) == calls
        for call in r["calls"]:
            assert len(call["steps_ms"]) == steps - 1  # the first step holds the call's set-up
            assert call["decode_ms"] > 0
            assert call["image_finite"]
            assert 1e3 * call["wall_s"] >= sum(call["steps_ms"]) + call["first_step_ms"] + call["decode_ms"] - 1
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["vae_weight_gib"] > 0
    # 4-bit weights: well under half of the bf16 transformer's bytes; the VAE is the same in every variant.
    bf16, w4a4 = results["bf16-eager"], results["w4a4-fused-normrope-eager"]
    assert w4a4["transformer_weight_gib"] < 0.5 * bf16["transformer_weight_gib"]
    assert w4a4["vae_weight_gib"] == bf16["vae_weight_gib"]
    assert [s["variant"] for s in report["skipped"]] == ["w4a4-fused-attn8-compiled-graph"]
    assert "text encoders skipped" in report["text_encoders"]
    markdown = (tmp_path / "pipeline.md").read_text()
    assert "| 1 | w4a8-fused-eager |" in markdown
    assert "| 1 | w4a4-fused-attn8-compiled-graph | skipped: needs CUDA" in markdown


def test_the_pipeline_gets_prompt_embeds_of_the_transformer_s_widths():
    bench = load_bench()
    transformer = bench.build("flux", (1, 1), True, "cpu")
    embeds = bench.prompt_embeds(transformer, 2, True, "cpu")
    assert embeds["prompt_embeds"].shape == (2, 16, transformer.config.joint_attention_dim)
    assert embeds["pooled_prompt_embeds"].shape == (2, transformer.config.pooled_projection_dim)
    # The VAE's 16 latent channels are what the pipeline packs into the transformer's in_channels.
    assert bench.flux_vae(True, "cpu").config.latent_channels * 4 == transformer.config.in_channels


@pytest.mark.parametrize("argv", [["--variants", "bf16-fast"], ["--steps", "1"], ["--calls", "0"]])
def test_bad_arguments_are_refused(tmp_path, argv):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--tiny", *argv, "--out-dir", str(tmp_path)])
    assert not (tmp_path / "pipeline.json").exists()


def test_torchao_fp8_int4_is_a_variant_that_skips_where_it_cannot_run():
    bench = load_bench()
    assert bench.step_bench.split_variant("torchao-fp8-int4-compiled") == ("torchao-fp8-int4", "compiled")
    assert bench.is_variant("torchao-fp8-int4-compiled") and not bench.is_variant("torchao-fp8-int4")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("a Hopper GPU may run it")
    with pytest.raises(bench.step_bench.Skipped):
        bench.step_bench.torchao_config("torchao-fp8-int4")


class ReplayedCall:
    """A CUDA graph's semantics on the CPU: replay reruns the captured call on the captured input tensors and
    writes into the captured output, so stale inputs or a fresh output tensor would show."""

    def __init__(self, call):
        self.call = call

    def replay(self):
        for kept, new in zip(self.output, self.call(), strict=True):
            kept.copy_(new)


def fake_capture_graph(call):
    graph = ReplayedCall(call)
    graph.output = call()
    return graph, graph.output


def graphed_and_eager_images(bench, device, **call):
    images = []
    for graphed in (False, True):
        transformer = bench.build("flux", (1, 2), True, device)
        if graphed:
            bench.graph_forward(transformer)
        pipe = bench.flux_pipeline(transformer, bench.flux_vae(True, device))
        embeds = bench.prompt_embeds(transformer, 1, True, device)
        generator = torch.Generator(device).manual_seed(0)
        with torch.inference_mode():
            image = pipe(**embeds, generator=generator, output_type="pt", return_dict=False, **call)[0]
        images.append(image.float())
    return images


def test_graphed_transformer_copies_each_step_s_inputs_into_the_captured_ones(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.step_bench, "capture_graph", fake_capture_graph)
    eager, graphed = graphed_and_eager_images(bench, "cpu", height=32, width=32, num_inference_steps=3)
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)


def test_graphed_transformer_refuses_a_call_unlike_the_captured_one(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.step_bench, "capture_graph", fake_capture_graph)
    transformer = bench.build("flux", (1, 1), True, "cpu")
    bench.graph_forward(transformer)
    pipe = bench.flux_pipeline(transformer, bench.flux_vae(True, "cpu"))
    embeds = bench.prompt_embeds(transformer, 1, True, "cpu")
    with torch.inference_mode():
        pipe(**embeds, height=32, width=32, num_inference_steps=2, output_type="pt")
        with pytest.raises(ValueError, match="hidden_states"):
            pipe(**embeds, height=64, width=32, num_inference_steps=2, output_type="pt")
        with pytest.raises(TypeError, match="keyword"):
            transformer(torch.zeros(1))


@pytest.mark.gpu
def test_graphed_transformer_replays_the_eager_pipeline():
    bench = load_bench()
    eager, graphed = graphed_and_eager_images(bench, torch.device("cuda"), height=32, width=32, num_inference_steps=4)
    # The same kernels in a CUDA graph: each step's new inputs reach it, so the images agree.
    torch.testing.assert_close(graphed, eager, atol=1e-2, rtol=0)


def test_a_failing_variant_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    bench = load_bench()
    prepare = bench.step_bench.prepare

    def failing_prepare(model, variant):
        if variant == "w4a4-fused-eager":
            raise RuntimeError("a kernel that does not launch")
        return prepare(model, variant)

    monkeypatch.setattr(bench.step_bench, "prepare", failing_prepare)
    argv = ["--tiny", "--flux-blocks", "1,1", "--steps", "2", "--calls", "1", "--out-dir", str(tmp_path)]
    bench.main([*argv, "--variants", "w4a4-fused-eager,bf16-eager"])
    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["bf16-eager"]
    assert [f["variant"] for f in report["failed"]] == ["w4a4-fused-eager"]
    assert "a kernel that does not launch" in report["failed"][0]["error"]
    assert "| 1 | w4a4-fused-eager | failed:" in (tmp_path / "pipeline.md").read_text()
