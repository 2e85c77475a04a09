"""Two GPUs: data-parallel images equal a one-GPU run's bit for bit; Ulysses-2 and ring-2 outputs of a ConvRot
Flux with every fusion equal one GPU's within diffusers' own bf16 tolerance for its context-parallel tests.

One NCCL group of two processes (cuda:0 and cuda:1) runs every check (parallel_ranks.py); skipped with
fewer than two GPUs.
"""

from __future__ import annotations

import random

import numpy as np
import parallel_ranks
import pytest
import torch
import torch.multiprocessing as mp
from conftest import build
from PIL import Image

from convrot_diffusers import quantize_pipeline, save_quantized

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    seed = random.randrange(2**31)
    root = tmp_path_factory.mktemp("two-gpus")
    saved = save_quantized(quantize_pipeline(build("flux"), "w4a4", progress=False), root / "flux-w4a4")
    mp.spawn(
        parallel_ranks.main,
        args=(2, parallel_ranks.free_port(), str(saved), str(root), seed, "cuda"),
        nprocs=2,
        join=True,
    )
    return {**torch.load(root / "rank0.pt", weights_only=False), "out_dir": root}, seed


def test_data_parallel_images_equal_one_gpu_bit_for_bit(two_gpus):
    found, seed = two_gpus
    assert found["device"] == "cuda:0" and found["world_size"] == 2
    for i, (shared, alone) in enumerate(zip(found["data_parallel"], found["one_process"], strict=True)):
        # odd images were made on cuda:1, the reference on cuda:0
        assert np.array_equal(shared, alone), f"image {i} (seed {seed + i}) differs from the one-GPU run"
    for i, alone in enumerate(found["one_process"]):
        written = np.asarray(Image.open(found["out_dir"] / f"cli-{i:03d}.png"))
        assert np.array_equal(written, alone), f"convrot generate's image {i} (seed {seed + i})"


@pytest.mark.parametrize("case", ["ulysses_fused_first", "ulysses_fused_after", "ring_fused_first", "ring_fused_after"])
def test_context_parallel_matches_one_gpu(two_gpus, case):
    (alone, sharded), seed = two_gpus[0][case], two_gpus[1]
    assert torch.isfinite(sharded).all()
    torch.testing.assert_close(sharded, alone, atol=1e-2, rtol=1e-2, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("class_name", parallel_ranks.GENERIC)
def test_ulysses_on_a_dit_of_the_generic_policy_matches_one_gpu(two_gpus, class_name):
    (alone, sharded), seed = two_gpus[0][f"ulysses_{class_name}"], two_gpus[1]
    assert sharded.shape == alone.shape and torch.isfinite(sharded).all()
    torch.testing.assert_close(sharded, alone, atol=1e-2, rtol=1e-2, msg=lambda m: f"seed {seed}: {m}")
