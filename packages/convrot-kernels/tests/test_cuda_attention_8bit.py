"""attention_8bit's CUDA backend (sm_90a) against its CPU backend and float64 attention.

The pre-pass must write the CPU's bytes; the attention (ex2.approx, the tensor cores' fp8
accumulation, its own order) is held to the contract of docs/format.md: its error against
float64 softmax attention at most twice that of the same quantization simulated in float64.
Codes and outputs are written into buffers poisoned with two patterns, so that an element the
kernels failed to write shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

import convrot_kernels as ck
from convrot_kernels import _C
from convrot_kernels._validation import FLOAT_CODES

import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the 8-bit attention kernel is sm_90a code")

FLUX = 4096 + 512  # Flux.1's joint tokens at 1024x1024: 4096 image + 512 text
SHAPES = [  # batch, q_tokens, kv_tokens, heads, head_dim
    (1, 128, 128, 2, 128),
    (2, 333, 333, 3, 128),
    (1, 200, 77, 2, 64),
    (1, 1, 300, 2, 64),
    (2, FLUX, FLUX, 24, 128),
]
POISONS = (0x55, 0xAA)


def operands(b, nq, nkv, h, d, dtype, device, outliers=False):
    g = torch.Generator(device=device).manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=device) for n in (nq, nkv, nkv))
    q = q * (torch.rand(b, nq, h, 1, generator=g, device=device) * 3 + 0.5)
    k = k * (torch.rand(b, nkv, h, 1, generator=g, device=device) * 3 + 0.5)
    if outliers:
        ch = torch.randint(0, d, (3,), generator=g, device=device)
        q[..., ch] *= 25
        k[..., ch] *= 25
        v[..., ch[:1]] *= 40
    return q.to(dtype), k.to(dtype), v.to(dtype)


CODE_DTYPES = (torch.int8, torch.float32, torch.int8, torch.float32, torch.uint8, torch.float32)


def poisoned_codes(q, k, poison: int) -> list[torch.Tensor]:
    """Pre-pass buffers (ck.AttentionCodes' order and shapes) filled with `poison` bytes."""
    b, nq, h, d = q.shape
    nq_pad, nkv_pad, bh = -(-nq // 128) * 128, -(-k.shape[1] // 128) * 128, b * h
    shapes = [(bh, nq_pad, d), (bh, nq_pad), (bh, nkv_pad, d), (bh, nkv_pad // 128), (bh, d, nkv_pad), (bh, d)]
    codes = [torch.empty(shape, dtype=dtype, device=q.device) for shape, dtype in zip(shapes, CODE_DTYPES, strict=True)]
    for c in codes:
        c.view(torch.uint8).fill_(poison)
    return codes


def entry_arguments(q, k, v) -> list:
    """The compiled entries' leading arguments: pointers and strides of q, k, v, the dtype and shape."""
    b, nq, h, d = q.shape
    args = []
    for t in (q, k, v):
        args += [t.data_ptr(), *t.stride()[:3]]
    return [*args, FLOAT_CODES[q.dtype], b, h, nq, k.shape[1], d]


def codes_into(q, k, v, poison: int) -> ck.AttentionCodes:
    """The pre-pass through the compiled entry, into poisoned buffers."""
    codes = poisoned_codes(q, k, poison)
    device = q.get_device()
    _C.attention_8bit_prepass(
        *entry_arguments(q, k, v), *(c.data_ptr() for c in codes), device, torch.cuda.current_stream(device).cuda_stream
    )
    return ck.AttentionCodes(*codes)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("b, nq, nkv, h, d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepass_writes_the_cpu_backends_bytes(b, nq, nkv, h, d, dtype):
    q, k, v = operands(b, nq, nkv, h, d, dtype, "cuda", outliers=True)
    runs = [codes_into(q, k, v, poison) for poison in POISONS]
    torch.cuda.synchronize()
    cpu = ck.attention_8bit_prepass(q.cpu(), k.cpu(), v.cpu())
    for name, first, second, expected in zip(ck.AttentionCodes._fields, *runs, cpu, strict=True):
        assert torch.equal(bits(first), bits(second)), f"{name}: elements left unwritten"
        assert torch.equal(bits(first.cpu()), bits(expected)), f"{name} differs from the CPU backend's"


def test_prepass_reads_strided_views_and_non_finite_rows():
    qkv = torch.randn(1, 300, 3, 4, 128, device="cuda").bfloat16()
    q, k, v = qkv.unbind(2)
    q[0, 7, 1, 3] = math.inf
    k[0, 140, 2, 9] = math.nan
    v[0, 5, 3, 11] = -math.inf
    gpu = ck.attention_8bit_prepass(q, k, v)
    cpu = ck.attention_8bit_prepass(q.cpu(), k.cpu(), v.cpu())
    for name, got, expected in zip(ck.AttentionCodes._fields, gpu, cpu, strict=True):
        assert torch.equal(bits(got.cpu()), bits(expected)), name


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepass_reads_unaligned_rows_and_writes_zero_and_non_finite_scales(d, dtype):
    """Rows that do not start at a 16-byte boundary (an element past an aligned allocation) take the
    2-byte loads; an all-zero q row and k block give scale 0, non-finite values NaN scales, in
    several tiles, the tail ones included (N_q 259, N_kv 389)."""
    b, nq, nkv, h = 2, 259, 389, 3
    q, k, v = (
        torch.randn(b, n, h, d + 1, device="cuda").to(dtype)[..., 1:] for n in (nq, nkv, nkv)
    )  # fmt: skip
    assert all(t.data_ptr() % 16 and t.stride(-1) == 1 for t in (q, k, v))
    q[1, 5] = 0  # an all-zero row in each head
    k[0, 128:256] = 0  # an all-zero block of keys
    q[0, 258, 2, 7] = math.inf  # the tail tile
    q[1, 130, 0, d - 1] = math.nan
    k[1, 384, 1, 3] = -math.inf  # the tail block
    k[0, 3, 0, 0] = math.nan
    v[1, 388, 2, d - 2] = math.nan  # the last key
    v[0, 0, 0, 5] = math.inf
    gpu = ck.attention_8bit_prepass(q, k, v)
    cpu = ck.attention_8bit_prepass(q.cpu(), k.cpu(), v.cpu())
    assert cpu.sq.isnan().sum() == 2 and cpu.sk.isnan().sum() == 2 and cpu.sv.isnan().sum() == 2
    assert (cpu.sq == 0).any() and (cpu.sk == 0).any()
    for name, got, expected in zip(ck.AttentionCodes._fields, gpu, cpu, strict=True):
        assert torch.equal(bits(got.cpu()), bits(expected)), name


def simulated_error(q, k, v, scale, exact, heads_per_chunk=4):
    """max |simulated - exact| and the exact output's max, a few heads at a time (float64 scores of
    Flux's shapes take GBs)."""
    err = 0.0
    for h0 in range(0, q.shape[2], heads_per_chunk):
        part = slice(h0, h0 + heads_per_chunk)
        sim = ref.attention_8bit_simulated(q[:, :, part], k[:, :, part], v[:, :, part], scale)
        err = max(err, (sim - exact[:, :, part]).abs().max().item())
    return err


def exact_attention(q, k, v, scale, heads_per_chunk=4):
    return torch.cat(
        [ref.attention(q[:, :, h0 : h0 + heads_per_chunk], k[:, :, h0 : h0 + heads_per_chunk],
                       v[:, :, h0 : h0 + heads_per_chunk], scale) for h0 in range(0, q.shape[2], heads_per_chunk)],
        dim=2,
    )  # fmt: skip


def attention_into(q, k, v, scale, poison: int) -> torch.Tensor:
    """attention_8bit through the compiled entry, into poisoned pre-pass buffers and output."""
    codes = poisoned_codes(q, k, poison)
    out = torch.empty_like(q)
    out.view(torch.uint8).fill_(poison)
    device = q.get_device()
    _C.attention_8bit(
        *entry_arguments(q, k, v), *(c.data_ptr() for c in codes), scale * math.log2(math.e), out.data_ptr(),
        *out.stride()[:3], device, torch.cuda.current_stream(device).cuda_stream,
    )  # fmt: skip
    return out


@needs_hopper
@pytest.mark.parametrize("b, nq, nkv, h, d", SHAPES)
@pytest.mark.parametrize("dtype, outliers", [(torch.bfloat16, False), (torch.float16, True)])
def test_attention_error_is_at_most_twice_that_of_the_simulated_quantization(b, nq, nkv, h, d, dtype, outliers):
    q, k, v = operands(b, nq, nkv, h, d, dtype, "cuda", outliers)
    scale = 1 / math.sqrt(d)
    first, second = (attention_into(q, k, v, scale, poison) for poison in POISONS)
    assert torch.equal(first, second), "elements left unwritten (or a race)"
    out = ck.attention_8bit(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, first)
    exact = exact_attention(q, k, v, scale)
    err = (out.double() - exact).abs().max().item()
    sim_err = simulated_error(q, k, v, scale, exact)
    floor = 1e-3 * exact.abs().max().item()
    assert err <= 2 * sim_err + floor, (err, sim_err)
    if b * h * nq * nkv <= 2**22:  # the CPU reference of the same math, where it takes well under a second
        cpu = ck.attention_8bit(q.cpu(), k.cpu(), v.cpu())
        cpu_err = (cpu.double() - exact.cpu()).abs().max().item()
        assert cpu_err <= 2 * sim_err + floor, (cpu_err, sim_err)
        assert (out.cpu().double() - cpu.double()).abs().max().item() <= sim_err + floor


@needs_hopper
def test_attention_reads_strided_views_and_writes_a_strided_batch():
    qkv = torch.randn(2, 4 * 128 + 3, 3, 24, 128, device="cuda").bfloat16()
    q, k, v = qkv.unbind(2)
    out = ck.attention_8bit(q, k, v, scale=0.1)
    assert torch.equal(out, ck.attention_8bit(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.1))
    exact = exact_attention(q, k, v, 0.1)
    assert (out.double() - exact).abs().max().item() <= 2 * simulated_error(q, k, v, 0.1, exact) + 1e-3


@pytest.mark.skipif(HOPPER, reason="checks the refusal on other GPUs")
def test_attention_refuses_other_gpus_with_a_clear_error():
    q = torch.randn(1, 128, 2, 64, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="sm_90"):
        ck.attention_8bit(q, q, q)
