"""merge_lora on a CUDA model: the requantized codes agree with a CPU merge, and the merged model through the
kernels stays as close to the unmerged one with its LoRA as quantizing moved the model.

Run on a CUDA machine: ``python -m pytest packages/convrot-diffusers/tests/test_lora_merge_gpu.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_dits import STRENGTH, build, peft_lora, pipeline, quantized_copy, rel, run

import convrot
import convrot_diffusers

pytestmark = pytest.mark.gpu
pytest.importorskip("peft")


def test_gpu_merge_matches_a_cpu_merge_and_the_lora_output(seed):
    model, inputs = build("flux", seed, device="cuda", width=512, blocks=2, side=8)
    quantized = quantized_copy(model)
    unquantized_error = rel(run(quantized, inputs), run(model, inputs))
    on_cpu = copy.deepcopy(quantized).to("cpu")
    lora = peft_lora(model, 4, torch.Generator().manual_seed(seed + 1), STRENGTH)
    pipe = pipeline("flux", quantized)
    pipe.load_lora_weights(dict(lora), adapter_name="style")
    with_lora = run(quantized, inputs)
    report = convrot_diffusers.merge_lora(pipe)
    cpu_pipe = pipeline("flux", on_cpu)
    cpu_pipe.load_lora_weights(dict(lora), adapter_name="style")
    cpu_report = convrot_diffusers.merge_lora(cpu_pipe)
    print(f"merged weights' error {report.error:.4f} (CPU {cpu_report.error:.4f})")
    cpu_layers = dict(on_cpu.named_modules())
    for name, layer in quantized.named_modules():
        if isinstance(layer, convrot.ConvLinear):
            # Float64 B A in another summation order can only flip codes at rounding ties.
            differ = (layer.qweight.cpu() != cpu_layers[name].qweight).float().mean().item()
            assert differ < 1e-4, f"{name}: {differ:.2e} of its code bytes differ from the CPU merge"
    error = rel(run(quantized, inputs), with_lora)
    print(f"merged vs unmerged with the LoRA {error:.4f}, quantized vs bf16 {unquantized_error:.4f}")
    assert error <= 1.2 * unquantized_error
