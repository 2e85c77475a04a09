"""convrot_diffusers.parallel: data-parallel generation and diffusers' context parallelism with ConvRot layers.

The two-process checks run in one gloo group on the CPU (parallel_ranks.py, started once for the module);
the two-GPU ones are in test_parallel_gpu.py.
"""

from __future__ import annotations

import numpy as np
import parallel_ranks
import pytest
import torch
import torch.multiprocessing as mp
from conftest import build
from PIL import Image

import convrot_diffusers
from convrot_diffusers import parallel, quantize_pipeline, save_quantized


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What rank 0 of a two-process gloo group found (parallel_ranks.main), with the seed it used."""
    import random

    seed = random.randrange(2**31)
    root = tmp_path_factory.mktemp("two-ranks")
    pipe = quantize_pipeline(build("flux"), "w4a4", progress=False)
    saved = save_quantized(pipe, root / "flux-w4a4")
    mp.spawn(
        parallel_ranks.main,
        args=(2, parallel_ranks.free_port(), str(saved), str(root), seed, "cpu"),
        nprocs=2,
        join=True,
    )
    found = torch.load(root / "rank0.pt", weights_only=False)
    return {**found, "out_dir": root}, seed


def test_data_parallel_images_equal_one_process_bit_for_bit(two_ranks):
    found, seed = two_ranks
    assert found["world_size"] == 2
    assert len(found["data_parallel"]) == len(parallel_ranks.PROMPTS)
    for i, (shared, alone) in enumerate(zip(found["data_parallel"], found["one_process"], strict=True)):
        assert np.array_equal(shared, alone), f"image {i} (seed {seed + i}) differs from the one-process run"
    # the images are the prompts' own, not one image repeated
    assert not np.array_equal(found["data_parallel"][0], found["data_parallel"][1])


def test_convrot_generate_under_a_launcher_writes_every_image_on_rank_0(two_ranks):
    found, seed = two_ranks
    root = found["out_dir"]
    written = sorted(path.name for path in root.glob("cli*"))
    assert written == [f"cli-{i:03d}.png" for i in range(len(parallel_ranks.PROMPTS))]
    for i, alone in enumerate(found["one_process"]):
        assert np.array_equal(np.asarray(Image.open(root / written[i])), alone), f"image {i} (seed {seed + i})"


@pytest.mark.parametrize("order", ["ulysses_fused_first", "ulysses_fused_after"])
def test_ulysses_with_every_fusion_matches_one_process(two_ranks, order):
    (alone, sharded), seed = two_ranks[0][order], two_ranks[1]
    assert sharded.shape == alone.shape and torch.isfinite(sharded).all()
    # diffusers' own context-parallel tests accept 1e-2 in bf16
    torch.testing.assert_close(sharded, alone, atol=1e-2, rtol=1e-2, msg=lambda m: f"seed {seed}: {m}")


def test_share_gives_every_index_once():
    for count in range(0, 12):
        for world in range(1, 5):
            parts = [list(parallel.share(count, rank, world)) for rank in range(world)]
            assert sorted(i for part in parts for i in part) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="outside"):
        parallel.share(4, 2, 2)


def test_one_process_generates_every_prompt_with_its_own_seed(seed):
    pipe = build("flux")
    call = parallel_ranks.CALL
    images = parallel.generate_data_parallel(pipe, ["a", "b"], seed=seed, **call)
    again = pipe("b", generator=torch.Generator("cpu").manual_seed(seed + 1), **call).images[0]
    assert len(images) == 2 and np.array_equal(np.asarray(images[1]), np.asarray(again))


@pytest.mark.parametrize(
    "prompts, kwargs, error",
    [
        ("one string", {}, TypeError),
        ([], {}, ValueError),
        (["a"], {"generator": None}, TypeError),
        (["a", "b"], {"seed": 2**64 - 1}, ValueError),
        (["a"], {"seed": -1}, ValueError),
    ],
)
def test_bad_arguments_are_refused_before_any_image(prompts, kwargs, error):
    class NoPipeline:
        def set_progress_bar_config(self, **_):
            raise AssertionError("reached the pipeline")

    with pytest.raises(error):
        parallel.generate_data_parallel(NoPipeline(), prompts, **kwargs)


def test_fused_processor_keeps_the_parallel_config():
    transformer = build("flux").transformer
    marker = object()
    for module in transformer.modules():
        if hasattr(module, "processor"):
            module.processor._parallel_config = marker
    assert convrot_diffusers.fuse_qk_norm_rope(transformer) > 0
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._parallel_config is marker for p in processors)
    assert convrot_diffusers.unfuse_qk_norm_rope(transformer) > 0
    assert all(m.processor._parallel_config is marker for m in transformer.modules() if hasattr(m, "processor"))


def test_a_processor_without_parallel_config_is_refused():
    parallel.check_context_parallel(build("flux"))  # diffusers' and ours take it
    with pytest.raises(ValueError, match="AttnProcessor2_0.*own rank's tokens"):
        parallel.check_context_parallel(build("pixart-sigma"))


def test_context_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.enable_context_parallel(build("flux"), ulysses_degree=2)


@pytest.mark.parametrize("class_name", parallel_ranks.GENERIC)
def test_ulysses_on_a_dit_of_the_generic_policy_matches_one_process(two_ranks, class_name):
    (alone, sharded), seed = two_ranks[0][f"ulysses_{class_name}"], two_ranks[1]
    assert sharded.shape == alone.shape and torch.isfinite(sharded).all()
    torch.testing.assert_close(sharded, alone, atol=1e-2, rtol=1e-2, msg=lambda m: f"seed {seed}: {m}")
