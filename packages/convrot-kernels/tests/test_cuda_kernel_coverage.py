"""One small call of every CUDA kernel and launch path, each checked against the CPU backend.

The other CUDA tests cover the paths at real widths and many shapes; this file is what
``nox -s gpu`` runs under compute-sanitizer's memcheck and racecheck, whose slowdown the full
suite would not fit: each case is small, and together they reach every kernel (the row
engine's fast and staged paths for plain, fused-input, normed and residual rows, the four
GEMMs with both epilogues of the persistent one, each for W4A4 and W8A8 and the Hopper ones for
W4A8 and group-scaled weights, packing, the norms).
"""

from __future__ import annotations

import pytest
import torch

import convrot_kernels as ck

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def randn(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def both(fn, *tensors):
    """fn on the tensors on the GPU and on the CPU, the outputs as CPU tuples."""
    gpu = fn(*(None if t is None else t.cuda() for t in tensors))
    cpu = fn(*tensors)
    as_tuple = lambda r: tuple(t.cpu() for t in (r if isinstance(r, tuple) else (r,)))  # noqa: E731
    return as_tuple(gpu), as_tuple(cpu)


def assert_equal(fn, *tensors):
    gpu, cpu = both(fn, *tensors)
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [3072, 100, 20000])  # fast path; chunks of 4; staged rows
def test_rht(k):
    k = k - k % 4
    assert_equal(lambda x: ck.rht(x, 4 if k % 16 else 16), randn(3, k))


@pytest.mark.parametrize(("k", "group"), [(3072, 256), (1152, 64), (96, 16), (20480, 256)])
@pytest.mark.parametrize("bits", [4, 8])
def test_rht_quantize(k, group, bits):
    assert_equal(lambda x: ck.rht_quantize(x, group, bits), randn(5, k))


@pytest.mark.parametrize("bits", [4, 8])
def test_rht_quantize_of_an_input_in_parts(bits):
    assert_equal(lambda a, b: ck.rht_quantize(a, 256, bits, x2=b, gelu_from=512), randn(4, 256), randn(4, 768))


@pytest.mark.parametrize(("k", "prefix_tokens"), [(3072, 2), (100, 0)])
@pytest.mark.parametrize("bits", [4, 8])
def test_layer_norm_modulate_rht_quantize(k, prefix_tokens, bits):
    group = 4 if k % 16 else 256
    shift, scale = randn(2, k), randn(2, k)
    prefix = randn(2, prefix_tokens, k) if prefix_tokens else None
    assert_equal(
        lambda x, sc, sh, p: ck.layer_norm_modulate_rht_quantize(x, sc, sh, prefix=p, group_size=group, bits=bits),
        randn(2, 5, k),
        scale,
        shift,
        prefix,
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_residual_layer_norm_modulate_rht_quantize(bits):
    assert_equal(
        lambda x, b, g, sc, sh: ck.residual_layer_norm_modulate_rht_quantize(x, b, g, sc, sh, bits=bits),
        randn(2, 6, 3072),
        randn(2, 6, 3072),
        randn(2, 3072),
        randn(2, 3072),
        randn(2, 3072),
    )


@pytest.mark.parametrize("k", [3072, 100])
def test_layer_norm_modulate(k):
    assert_equal(
        lambda x, sc, sh, p: ck.layer_norm_modulate(x, sc, sh, prefix=p),
        randn(2, 5, k),
        randn(2, k),
        randn(2, k),
        randn(2, 3, k),
    )


def test_rms_norm_rope():
    assert_equal(
        lambda x, w, c, s: ck.rms_norm_rope(x, w, c, s),
        randn(1, 6, 3, 128),
        randn(128),
        randn(6, 128, dtype=torch.float32),
        randn(6, 128, dtype=torch.float32),
    )


def test_pack_and_unpack():
    codes = torch.randint(-8, 8, (7, 96), dtype=torch.int8)
    assert_equal(ck.pack_int4, codes)
    assert_equal(ck.unpack_int4, ck.pack_int4(codes))


GEMM_CASES = [  # (kernel or None for the automatic choice, tile width, M, N, K, out dtype)
    ("simt", 256, 9, 40, 96, torch.bfloat16),
    ("small_m", 256, 20, 72, 640, torch.bfloat16),
    ("small_m", 256, 3, 300, 2432, torch.float32),
    ("sm90", 128, 130, 272, 1152, torch.bfloat16),
    ("sm90", 256, 130, 272, 1152, torch.float16),
    ("sm90_persistent", 256, 300, 152, 2432, torch.bfloat16),  # staged (TMA store) epilogue
    ("sm90_persistent", 256, 300, 145, 2432, torch.float32),  # registers-to-global epilogue
]


@pytest.mark.parametrize(("kernel", "tile_n", "m", "n", "k", "out_dtype"), GEMM_CASES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm(kernel, tile_n, m, n, k, out_dtype, bits):
    if kernel.startswith("sm90") and not HOPPER:
        pytest.skip("the sm90 kernels need compute capability 9.0")
    qa, sa = ck.rht_quantize(randn(m, k), 16, bits)
    qw, sw = ck.rht_quantize(randn(n, k), 16, bits)
    bias = torch.randn(n)
    with ck.forced_gemm_kernel(kernel, sm90_tile_n=tile_n):
        gpu = ck.gemm(qa.cuda(), sa.cuda(), qw.cuda(), sw.cuda(), bias.cuda(), bits=bits, out_dtype=out_dtype)
    cpu = ck.gemm(qa, sa, qw, sw, bias, bits=bits, out_dtype=out_dtype)
    # Same int32 sums, same fp32 epilogue: at most one rounding step of the output apart.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=torch.finfo(out_dtype).eps, atol=1e-6)


SCHEME_CASES = [  # (kernel, M, N, K, out dtype) for the schemes beyond W4A4 and W8A8
    ("small_m", 3, 300, 2432, torch.bfloat16),
    ("small_m", 3, 4240, 128, torch.bfloat16),  # W4A8: more blocks than fit at once, the compact variant
    ("sm90_persistent", 300, 152, 2432, torch.bfloat16),  # staged (TMA store) epilogue
    ("sm90_persistent", 300, 145, 2464, torch.float32),  # registers-to-global epilogue; W4A8 ends in half a slice
]


@pytest.mark.parametrize(("kernel", "m", "n", "k", "out_dtype"), SCHEME_CASES)
@pytest.mark.parametrize(("act_bits", "grouped"), [(8, False), (4, True), (8, True)], ids=["w4a8", "w4a4g", "w4a8g"])
def test_gemm_schemes(kernel, m, n, k, out_dtype, act_bits, grouped):
    if not HOPPER:
        pytest.skip("the sm90 kernels need compute capability 9.0")
    if grouped and k % 64:
        pytest.skip("group-scaled weights need K a multiple of 64")
    qa, sa = ck.rht_quantize(randn(m, k), 16, act_bits)
    qw, sw = ck.rht_quantize(randn(n, k), 16, 4)
    group_scale = torch.randint(1, 17, (n, k // 64), dtype=torch.uint8) if grouped else None
    bias = torch.randn(n)
    scheme = {"weight_bits": 4, "act_bits": act_bits, "out_dtype": out_dtype}
    with ck.forced_gemm_kernel(kernel):
        gs = None if group_scale is None else group_scale.cuda()
        gpu = ck.gemm(qa.cuda(), sa.cuda(), qw.cuda(), sw.cuda(), bias.cuda(), group_scale=gs, **scheme)
    cpu = ck.gemm(qa, sa, qw, sw, bias, group_scale=group_scale, **scheme)
    assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))  # the schemes agree bit for bit


@pytest.mark.parametrize("bits", [4, 8])
def test_linear(bits):
    qw, sw = ck.rht_quantize(randn(64, 3072).cuda(), 256, bits)
    x = randn(2, 9, 3072).cuda()
    expected = ck.gemm(*ck.rht_quantize(x.view(18, 3072), 256, bits), qw, sw, bits=bits).view(2, 9, 64)
    assert torch.equal(ck.linear(x, qw, sw, bits=bits), expected)


@pytest.mark.parametrize(("nq", "nkv", "d"), [(130, 200, 128), (64, 77, 64)])
def test_attention_8bit_prepass(nq, nkv, d):
    # Every tensor of the codes (q and k tiles and v's amaxes in one grid, then v's codes with sv).
    assert_equal(ck.attention_8bit_prepass, randn(1, nq, 2, d), randn(1, nkv, 2, d), randn(1, nkv, 2, d))


def test_attention_8bit_prepass_of_unaligned_rows():
    # Rows that do not start at 16-byte boundaries: the 2-byte loads.
    full = [randn(1, n, 2, 129) for n in (70, 140, 140)]
    gpu = ck.attention_8bit_prepass(*(t.cuda()[..., 1:] for t in full))
    cpu = ck.attention_8bit_prepass(*(t[..., 1:] for t in full))
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.skipif(not HOPPER, reason="the 8-bit attention kernel is sm_90a code")
@pytest.mark.parametrize(("nq", "nkv", "d"), [(130, 300, 128), (64, 77, 64)])
def test_attention_8bit(nq, nkv, d):
    # The same codes; ex2.approx and the tensor cores' fp8 sums against std::exp2 in fp32 differ far
    # less than a percent of the output's range (the quantization's own error is larger).
    (gpu,), (cpu,) = both(ck.attention_8bit, randn(1, nq, 2, d), randn(1, nkv, 2, d), randn(1, nkv, 2, d))
    assert (gpu.float() - cpu.float()).abs().max() <= 1e-2 * cpu.float().abs().max()
