"""Shared helpers: the demo pipelines (tiny, random weights, built offline) at test settings."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convrot_diffusers.demo import DEMOS, demo_pipeline

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/{name}.py imported as the module `name`, afresh (registered in sys.modules, where the
    dataclasses of a module look their module up)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(scope="module")
def room_for_compiled_cases():
    """Compiled blocks of one class share their code across a module's models (the graph takes parameters
    as inputs); each case's shapes (batch sizes) and fused classes add entries, more than dynamo keeps by
    default (8: a module compiling more cases fails with "recompile limit exceeded" under fullgraph)."""
    config = torch._dynamo.config
    saved = config.cache_size_limit, config.accumulated_cache_size_limit
    config.cache_size_limit, config.accumulated_cache_size_limit = 256, 1024
    yield
    config.cache_size_limit, config.accumulated_cache_size_limit = saved


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
