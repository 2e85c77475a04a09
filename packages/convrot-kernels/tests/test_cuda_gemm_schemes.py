"""W4A8 and group-scaled 4-bit weights (docs/format.md) through every CUDA GEMM path, bit for
bit against the format's GEMM computed here and against the CPU backend.

As test_cuda_gemm_paths.py: each kernel forced (convrot_kernels.forced_gemm_kernel; the portable
kernel runs anywhere; small_m and sm90_persistent need Hopper here), outputs poisoned with two byte patterns
(every element must be written), fresh random inputs per case, Flux's shapes and small M.
"""

from __future__ import annotations

import pytest
import torch

import convrot_kernels as ck
from convrot_kernels import _C
from convrot_kernels._validation import FLOAT_CODES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FLUX_KN = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]  # (K, N)
# (weight_bits, act_bits, group-scaled): the schemes beyond W4A4 and W8A8.
SCHEMES = [(4, 8, False), (4, 4, True), (4, 8, True)]
SCHEME_IDS = ["w4a8", "w4a4g64", "w4a8g64"]


def hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def operands(m, n, k, scheme, lowest=False):
    """Kernel operands on the GPU and the decoded codes as float64 (exact for these sums)."""
    weight_bits, act_bits, grouped = scheme

    def codes(rows, bits):
        low = -(2 ** (bits - 1))
        if lowest:
            return torch.full((rows, k), low, dtype=torch.int8, device="cuda")
        return torch.randint(low, -low, (rows, k), dtype=torch.int8, device="cuda")

    ca, cw = codes(m, act_bits), codes(n, weight_bits)
    qa = ck.pack_int4(ca.cpu()).cuda() if act_bits == 4 else ca
    qw = ck.pack_int4(cw.cpu()).cuda() if weight_bits == 4 else cw
    group_scale = None
    decoded = cw.double()
    if grouped:
        if lowest:
            group_scale = torch.full((n, k // 64), 16, dtype=torch.uint8, device="cuda")
        else:
            group_scale = torch.randint(1, 17, (n, k // 64), dtype=torch.uint8, device="cuda")
        decoded = decoded * group_scale.double().repeat_interleave(64, dim=1)
    return qa, ca.double(), qw, decoded, group_scale


def expected_output(ca, sa, w, sw, bias, out_dtype) -> torch.Tensor:
    """docs/format.md's GEMM, each fp32 operation separately rounded."""
    y = (ca @ w.T).float() * sa[:, None]
    y = y * sw[None, :]
    if bias is not None:
        y = y + bias[None, :]
    return y.to(out_dtype)


def run_gemm(qa, sa, qw, sw, bias, scheme, group_scale, out_dtype) -> torch.Tensor:
    weight_bits, act_bits, _ = scheme
    m, n = qa.shape[0], qw.shape[0]
    k = qa.shape[1] * (2 if act_bits == 4 else 1)
    stream = torch.cuda.current_stream().cuda_stream
    pointers = (qa.data_ptr(), sa.data_ptr(), qw.data_ptr(), sw.data_ptr(), 0 if bias is None else bias.data_ptr())
    scales = 0 if group_scale is None else group_scale.data_ptr()
    results = []
    for byte in (0x55, 0xAA):
        y = torch.empty((m, n), dtype=out_dtype, device="cuda")
        y.view(torch.uint8).fill_(byte)
        shape = (FLOAT_CODES[out_dtype], m, n, k, weight_bits, act_bits, scales)
        _C.gemm(*pointers, y.data_ptr(), *shape, y.device.index, stream)
        results.append(y)
    torch.cuda.synchronize()
    assert torch.equal(results[0].view(torch.uint8), results[1].view(torch.uint8)), "elements left unwritten"
    return results[0]


def check(m, n, k, scheme, out_dtype, with_bias, kernel):
    """kernel: forced by name, or None for the dispatcher's choice."""
    if kernel not in ("simt", None) and not hopper():
        pytest.skip("the Hopper GEMM paths need compute capability 9.0")
    qa, ca, qw, w, group_scale = operands(m, n, k, scheme)
    sa = torch.rand(m, device="cuda") * 0.01 + 1e-4
    sw = torch.rand(n, device="cuda") * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda") if with_bias else None
    if kernel is None:
        y = run_gemm(qa, sa, qw, sw, bias, scheme, group_scale, out_dtype)
    else:
        with ck.forced_gemm_kernel(kernel):
            y = run_gemm(qa, sa, qw, sw, bias, scheme, group_scale, out_dtype)
    expected = expected_output(ca, sa, w, sw, bias, out_dtype)
    mismatch = (y.view(torch.uint8) != expected.view(torch.uint8)).view(m, n, -1).any(-1)
    first = mismatch.nonzero()[:1].tolist()
    assert not mismatch.any(), f"{int(mismatch.sum())} of {m * n} outputs differ, first at {first}"
    if m * n * k > 5e8:  # the CPU backend would take seconds; the bytes are pinned above anyway
        return
    # The CPU backend computes the same format: the same bytes.
    weight_bits, act_bits, _ = scheme
    cpu = ck.gemm(
        qa.cpu(),
        sa.cpu(),
        qw.cpu(),
        sw.cpu(),
        None if bias is None else bias.cpu(),
        weight_bits=weight_bits,
        act_bits=act_bits,
        group_scale=None if group_scale is None else group_scale.cpu(),
        out_dtype=out_dtype,
    )
    assert torch.equal(cpu.view(torch.uint8), y.cpu().view(torch.uint8))


SMALL_M_SHAPES = [  # (M, N, K): M <= 64
    (1, 3072, 12288),
    (1, 12288, 3072),
    (16, 3072, 12288),
    (16, 12288, 3072),
    (1, 3072, 15360),
    (5, 1152, 1152),
    (17, 300, 2432),
    (33, 257, 192),  # K not a multiple of the 128-code slice
    (64, 3072, 3072),
    (63, 7, 320),
    (2, 1, 64),
]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("m,n,k", SMALL_M_SHAPES)
def test_small_m_kernel_is_exact(m, n, k, scheme, out_dtype):
    check(m, n, k, scheme, out_dtype, (m + n) % 2 == 1, "small_m")


PERSISTENT_SHAPES = [  # (M, N, K); 16-bit outputs with N % 8 == 0 take the staged (TMA-store) epilogue
    *[(4608, n, k) for k, n in FLUX_KN],
    (4609, 3072, 3072),  # one row past a 256-row tile
    (65, 3072, 1152),  # the tile's second warpgroup has no rows
    (300, 145, 2432),  # a column past a 144-wide tile
    (300, 152, 2432),  # eight columns past a 144-wide tile, staged
    (1, 12288, 3072),
    (200, 1, 64),
    (513, 301, 192),  # K not a multiple of the 128-code slice: half a slice of multipliers
    (1024, 4608, 1152),
]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("m,n,k", PERSISTENT_SHAPES)
def test_persistent_kernel_is_exact(m, n, k, scheme, out_dtype):
    check(m, n, k, scheme, out_dtype, (m + n) % 2 == 0, "sm90_persistent")


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(300, 152, 2464), (513, 301, 96), (4608, 3072, 3104)])
def test_persistent_w4a8_ends_in_half_a_slice(m, n, k, out_dtype):
    # The persistent kernel walks W4A8's K in 64-code slices: K = 64 j + 32 leaves the last one
    # half past the end of both operands (TMA fills it with zeros).
    check(m, n, k, (4, 8, False), out_dtype, (m + n) % 2 == 0, "sm90_persistent")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", [(4, 8, False), (4, 8, True)], ids=["w4a8", "w4a8g64"])
@pytest.mark.parametrize("k", [64, 128, 192, 320, 3136])
def test_persistent_w4a8_slices_taken_in_turn(k, scheme, out_dtype):
    # The persistent kernel's W4A8 expansion warps take the K-slices of a CTA's walk in turn
    # (slice s by warp s % 3), across tile boundaries: 4608 x 3200 is 414 tiles, so on 132 SMs
    # some CTAs walk four; K of 1, 2, 3, 5 and 49 slices moves each warp's slices (and their
    # group multipliers) through the tiles differently; bf16 output takes the staged layout's
    # rings, fp32 the unstaged one's.
    check(4608, 3200, k, scheme, out_dtype, True, "sm90_persistent")


@pytest.mark.parametrize("kernel", ["small_m", "sm90_persistent"])
@pytest.mark.parametrize("act_bits", [4, 8])
def test_group_scales_at_an_odd_address(kernel, act_bits):
    # The small-M kernel copies a block's multipliers by 16-byte pieces where group_scale is
    # 16-byte aligned and byte by byte where not: a view one byte into its storage takes the latter.
    if not hopper():
        pytest.skip("the Hopper GEMM paths need compute capability 9.0")
    m, n, k = (16, 12288 + 8, 3072) if kernel == "small_m" else (300, 152, 2432)
    scheme = (4, act_bits, True)
    qa, ca, qw, w, group_scale = operands(m, n, k, scheme)
    storage = torch.empty(group_scale.numel() + 1, dtype=torch.uint8, device="cuda")
    odd = storage[1:].view(group_scale.shape)
    odd.copy_(group_scale)
    assert odd.data_ptr() % 2 == 1
    sa = torch.rand(m, device="cuda") * 0.01 + 1e-4
    sw = torch.rand(n, device="cuda") * 0.01 + 1e-4
    with ck.forced_gemm_kernel(kernel):
        y = run_gemm(qa, sa, qw, sw, None, scheme, odd, torch.bfloat16)
    expected = expected_output(ca, sa, w, sw, None, torch.bfloat16)
    assert torch.equal(y.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("kernel", ["simt", None])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 3072, 3072), (16, 12288, 3072), (300, 145, 2432), (4608, 3072, 3072)])
def test_portable_and_dispatched_kernels_are_exact(m, n, k, scheme, kernel):
    check(m, n, k, scheme, torch.bfloat16, True, kernel)


@pytest.mark.parametrize("kernel", ["small_m", "sm90_persistent", "simt"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_extreme_codes_accumulate_exactly(kernel, scheme):
    # Every code at its lowest, every multiplier 16: the largest sums of the scheme, still exact.
    if kernel != "simt" and not hopper():
        pytest.skip("the Hopper GEMM paths need compute capability 9.0")
    m, n, k = (16, 288, 15360) if kernel == "small_m" else (512, 288, 15360)
    qa, ca, qw, w, group_scale = operands(m, n, k, scheme, lowest=True)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    with ck.forced_gemm_kernel(kernel):
        y = run_gemm(qa, ones_m, qw, ones_n, None, scheme, group_scale, torch.float32)
    assert (y == float(ca[0, 0] * w[0, 0] * k)).all()


def test_w4a8_layer_on_the_gpu_equals_the_cpu_layer():
    # The whole ConvLinear path (rotation, 8-bit quantization, W4A8 GEMM): CPU and CUDA agree
    # bit for bit except where the fp32 rotation's rounding moves a code across a tie.
    pytest.importorskip("convrot")
    import convrot

    linear = torch.nn.Linear(3072, 3072)
    for kind in ("w4a8", "w4a8g64", "w4a4g64"):
        layer = convrot.linear.layer_from_linear(kind, linear)
        x = torch.randn(77, 3072).bfloat16()
        y_cpu = layer(x)
        y_gpu = layer.cuda()(x.cuda()).cpu()
        layer.cpu()
        assert (y_cpu == y_gpu).float().mean() > 0.999, kind
