"""Shared helpers: the demo pipelines (tiny, random weights, built offline) at test settings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from convrot_diffusers.demo import DEMOS, demo_pipeline

# Smaller and shorter than the CLI demo, to keep the suite fast on 2 cores.
TEST_CALL = {"height": 64, "width": 64, "num_inference_steps": 4}


def build(name: str, transformer=None):
    pipe = demo_pipeline(name, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, name: str, seed: int, prompt: str = "a watercolor fox"):
    kwargs = {**DEMOS[name].call_kwargs, **TEST_CALL}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


def is_finite_image(image) -> bool:
    return bool(np.isfinite(np.asarray(image, dtype=np.float32)).all())


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (shown in the test's failure message via the fixture value)."""
    return random.randrange(2**31)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
