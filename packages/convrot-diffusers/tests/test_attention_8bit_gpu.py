"""8-bit attention in the real-width Flux.1 step (issue 31's fidelity criterion): on an sm_90a GPU, a few
blocks at Flux.1's widths (24 heads x 128) with random weights (benchmarks/transformer_configs.py), 1024x1024
inputs (4096 image + 512 text tokens), the W4A4 model with every fusion, with diffusers' attention and with
fuse_qk_norm_rope(..., attention="int8"): the 8-bit attention costs at most 1 dB of the output's SQNR
against the bf16 model, eager and compiled (regional, fullgraph, as the benchmark compiles). Each case prints
its SQNRs (run with -s to see them). The same bound is checked at the released widths of Wan 2.1-14B (40 heads
x 128, two blocks, 2 x 32 x 32 = 2048 video tokens and 512 text tokens) and FLUX.2-dev (48 heads x 128, one
double and two single blocks, 1024 image and 512 text tokens), W4A4 (tests/tiny_dits.py).

Run with ``python -m pytest -m gpu -s packages/convrot-diffusers/tests/test_attention_8bit_gpu.py``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import load_benchmark
from tiny_dits import build as build_dit
from tiny_dits import run as run_dit

import convrot_diffusers
from convrot_diffusers.metrics import sqnr

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("room_for_compiled_cases")]

BLOCKS = (2, 4)  # double, single
MAX_LOSS_DB = 1.0


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@functools.cache
def transformer_configs():
    return load_benchmark("transformer_configs")


@functools.cache
def bf16_model():
    return transformer_configs().build("flux", BLOCKS, tiny=False, device="cuda", seed=0)


@functools.cache
def inputs(batch: int) -> dict:
    torch.manual_seed(2000 + batch)
    return transformer_configs().MODELS["flux"].inputs(bf16_model(), batch, False, "cuda")


@torch.no_grad()
def run(model, batch: int, mode: str) -> torch.Tensor:
    if mode == "compiled":
        model = copy.deepcopy(model)
        model.compile_repeated_blocks(fullgraph=True)
    return model(**inputs(batch))[0].float()


def fused_w4a4(attention):
    model = copy.deepcopy(bf16_model())
    convrot_diffusers.quantize_transformer(model, "w4a4", progress=False)
    convrot_diffusers.fuse_qkv_projections(model)
    convrot_diffusers.fuse_activations(model)
    assert convrot_diffusers.fuse_qk_norm_rope(model, attention=attention) == sum(BLOCKS)
    return model


@pytest.mark.skipif(not _hopper(), reason="8-bit attention's CUDA kernel needs an sm_90a (Hopper) GPU")
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("batch", [1, 2])
def test_8bit_attention_costs_the_w4a4_flux_step_at_most_1_db(batch, mode):
    reference = run(bf16_model(), batch, "eager")
    stock = sqnr(reference, run(fused_w4a4(None), batch, mode))
    eight_bit = sqnr(reference, run(fused_w4a4("int8"), batch, mode))
    bf16_attn8 = copy.deepcopy(bf16_model())
    convrot_diffusers.fuse_qk_norm_rope(bf16_attn8, attention="int8")
    attention_alone = sqnr(reference, run(bf16_attn8, batch, mode))
    print(
        f"\nFlux.1 {BLOCKS[0]}+{BLOCKS[1]} blocks, b{batch} {mode}: SQNR against bf16: W4A4 fused {stock:.2f} dB, "
        f"with 8-bit attention {eight_bit:.2f} dB (loss {stock - eight_bit:.2f} dB); bf16 with 8-bit attention "
        f"alone {attention_alone:.2f} dB"
    )
    assert stock - eight_bit <= MAX_LOSS_DB, f"b{batch} {mode}: {stock:.2f} -> {eight_bit:.2f} dB"


@pytest.mark.skipif(not _hopper(), reason="8-bit attention's CUDA kernel needs an sm_90a (Hopper) GPU")
@pytest.mark.parametrize("class_name", ["WanTransformer3DModel", "Flux2Transformer2DModel"])
def test_8bit_attention_costs_other_w4a4_dits_at_most_1_db(class_name, seed):
    model, make_inputs = build_dit(class_name, seed, real=True, device="cuda", tokens_side=32, text=512)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    reference = run_dit(model, inputs)
    convrot_diffusers.quantize_transformer(model, "w4a4", progress=False)
    stock = sqnr(reference, run_dit(model, inputs))
    assert convrot_diffusers.fuse_qk_norm_rope(model, attention="int8") > 0
    eight_bit = sqnr(reference, run_dit(model, inputs))
    print(f"\n{class_name} at its released widths: W4A4 {stock:.2f} dB, with 8-bit attention {eight_bit:.2f} dB")
    assert stock - eight_bit <= MAX_LOSS_DB, f"{class_name}: {stock:.2f} -> {eight_bit:.2f} dB"
