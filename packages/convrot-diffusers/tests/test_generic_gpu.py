"""The generic policy's tested architectures at their released widths (a few blocks) on the GPU.

Run on a CUDA machine: ``python -m pytest packages/convrot-diffusers/tests/test_generic_gpu.py``.
Each model's transformer-output SQNR against its bf16 self, through the CUDA kernels, is at
least that of the same quantized layers in float64 simulation minus 3 dB.
"""

from __future__ import annotations

import pytest
import torch
from tiny_dits import BUILDERS, sqnr_pair

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["mix", "w4a4"])
@pytest.mark.parametrize("class_name", list(BUILDERS))
def test_real_width_model_against_the_float64_simulation(class_name, preset, seed):
    found_db, simulated_db, found = sqnr_pair(class_name, seed, preset, real=True, device="cuda", tokens_side=16)
    assert torch.isfinite(found).all()
    print(f"{class_name} {preset}: kernels {found_db:.2f} dB, float64 simulation {simulated_db:.2f} dB")
    assert found_db >= simulated_db - 3, f"{class_name} {preset}: {found_db:.2f} vs {simulated_db:.2f} dB"
