"""The Hopper GEMM paths (small-M weight streaming, persistent TMA + wgmma) on
the shapes they take, bit for bit against docs/format.md.

Each kernel is forced (convrot_kernels.forced_gemm_kernel; a call it cannot run
raises) and compared with the exact result computed
here: the int32 sum in float64 (exact for these codes), then the fp32 epilogue
fp32(acc) * sa[m] * sw[n] + bias[n] one rounded operation at a time, then one
rounding to the output dtype. The contract leaves no freedom there, so every
element must match exactly. Outputs are poisoned with two byte patterns and both
runs must agree, which proves every element was written. Fresh random inputs
per case.
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


@pytest.fixture(autouse=True)
def needs_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper GEMM paths need compute capability 9.0")


def random_codes(rows: int, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel operand on the GPU, the int codes as float64 on the GPU)."""
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (rows, k), dtype=torch.int8, device="cuda")
    operand = ck.pack_int4(codes.cpu()).cuda() if bits == 4 else codes
    return operand, codes.double()


def expected_output(ca, sa, cw, sw, bias, out_dtype) -> torch.Tensor:
    """docs/format.md's GEMM, each fp32 operation separately rounded (eager torch does not fuse)."""
    acc = (ca @ cw.T).float()  # float64 sum of integer products: exact; then one rounding to fp32
    y = acc * sa[:, None]
    y = y * sw[None, :]
    if bias is not None:
        y = y + bias[None, :]
    return y.to(out_dtype)


def gemm_into(y, qa, sa, qw, sw, bias, bits) -> None:
    """The compiled module's GEMM entry, writing into y (every operand contiguous, bias float32)."""
    m, n = y.shape
    k = qa.shape[1] * (2 if bits == 4 else 1)
    pointers = (qa.data_ptr(), sa.data_ptr(), qw.data_ptr(), sw.data_ptr(), 0 if bias is None else bias.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    _C.gemm(*pointers, y.data_ptr(), FLOAT_CODES[y.dtype], m, n, k, bits, bits, 0, y.device.index, stream)


def run_gemm(qa, sa, qw, sw, bias, bits, out_dtype) -> torch.Tensor:
    m, n = qa.shape[0], qw.shape[0]
    results = []
    for byte in (0x55, 0xAA):
        y = torch.empty((m, n), dtype=out_dtype, device="cuda")
        y.view(torch.uint8).fill_(byte)
        gemm_into(y, qa, sa, qw, sw, bias, bits)
        results.append(y)
    torch.cuda.synchronize()
    assert torch.equal(results[0].view(torch.uint8), results[1].view(torch.uint8)), "elements left unwritten"
    return results[0]


def check_gemm(m, n, k, bits, out_dtype, with_bias, kernel):
    with ck.forced_gemm_kernel(kernel):
        check_exact(m, n, k, bits, out_dtype, with_bias)


def check_exact(m, n, k, bits, out_dtype, with_bias):
    qa, ca = random_codes(m, k, bits)
    qw, cw = random_codes(n, k, bits)
    sa = torch.rand(m, device="cuda") * 0.01 + 1e-4
    sw = torch.rand(n, device="cuda") * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda") if with_bias else None
    y = run_gemm(qa, sa, qw, sw, bias, bits, out_dtype)
    expected = expected_output(ca, sa, cw, sw, bias, out_dtype)
    mismatch = (y.view(torch.uint8) != expected.view(torch.uint8)).view(m, n, -1).any(-1)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {m * n} outputs differ, first at {mismatch.nonzero()[0].tolist()}"
    )


SMALL_M_SHAPES = [  # (M, N, K): M <= 64
    (1, 3072, 12288),
    (1, 12288, 3072),
    (16, 3072, 12288),
    (16, 12288, 3072),
    (1, 3072, 15360),
    (5, 1152, 1152),
    (17, 300, 2432),
    (33, 257, 96),  # K not a multiple of the 128-code slice
    (64, 3072, 3072),
    (63, 7, 160),
    (2, 1, 32),
]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k", SMALL_M_SHAPES)
def test_small_m_kernel_is_exact(m, n, k, bits, out_dtype):
    check_gemm(m, n, k, bits, out_dtype, (m + n) % 2 == 1, "small_m")


PERSISTENT_SHAPES = [  # (M, N, K); 16-bit outputs with N % 8 == 0 take the staged (TMA-store) epilogue
    *[(4608, n, k) for k, n in FLUX_KN],
    (4609, 3072, 3072),  # one row past a 256-row tile
    (65, 3072, 1152),  # the tile's second warpgroup has no rows
    (300, 145, 2432),  # a column past a 144-wide tile
    (300, 152, 2432),  # eight columns past a 144-wide tile, staged
    (1, 12288, 3072),
    (200, 1, 32),
    (513, 301, 96),  # K not a multiple of the 128-code slice
    (1024, 4608, 1152),
]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k", PERSISTENT_SHAPES)
def test_persistent_kernel_is_exact(m, n, k, bits, out_dtype):
    check_gemm(m, n, k, bits, out_dtype, (m + n) % 2 == 0, "sm90_persistent")


@pytest.mark.parametrize("bits", [4, 8])
def test_persistent_kernel_unaligned_output(bits):
    # An output 2 bytes off 16-byte alignment cannot be a TMA store's destination: the
    # registers-to-global epilogue writes it, with the same values.
    m, n, k = 600, 3072, 1152
    qa, _ = random_codes(m, k, bits)
    qw, _ = random_codes(n, k, bits)
    sa, sw, bias = torch.rand(m, device="cuda"), torch.rand(n, device="cuda"), torch.randn(n, device="cuda")
    storage = torch.full((m * n + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    shifted = storage[1:].view(m, n)
    with ck.forced_gemm_kernel("sm90_persistent"):
        aligned = run_gemm(qa, sa, qw, sw, bias, bits, torch.bfloat16)
        gemm_into(shifted, qa, sa, qw, sw, bias, bits)
    torch.cuda.synchronize()
    assert torch.equal(shifted, aligned)
    assert storage[0].isnan()


@pytest.mark.parametrize("kernel", ["small_m", "sm90_persistent"])
@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_codes_accumulate_exactly(kernel, bits):
    # Every code at -2^(bits-1): the largest sums, 2^(2 bits - 2) * K, still exact.
    m, n, k = (16, 288, 15360) if kernel == "small_m" else (512, 288, 15360)
    lowest = -(2 ** (bits - 1))
    codes = torch.full((max(m, n), k), lowest, dtype=torch.int8)
    q = ck.pack_int4(codes) if bits == 4 else codes
    qa, qw = q[:m].cuda(), q[:n].cuda()
    with ck.forced_gemm_kernel(kernel):
        y = run_gemm(qa, torch.ones(m, device="cuda"), qw, torch.ones(n, device="cuda"), None, bits, torch.float32)
    assert (y == float(lowest * lowest * k)).all()


def test_paths_agree_with_the_portable_kernel():
    qa, _ = random_codes(96, 1152, 4)
    qw, _ = random_codes(160, 1152, 4)
    sa, sw = torch.rand(96, device="cuda"), torch.rand(160, device="cuda")
    outputs = {}
    for kernel in ("simt", "sm90_persistent", "sm90"):
        with ck.forced_gemm_kernel(kernel):
            outputs[kernel] = run_gemm(qa, sa, qw, sw, None, 4, torch.bfloat16)
    with ck.forced_gemm_kernel("small_m"):
        outputs["small_m"] = run_gemm(qa[:64].contiguous(), sa[:64].contiguous(), qw, sw, None, 4, torch.bfloat16)
    assert torch.equal(outputs["simt"], outputs["sm90_persistent"])
    assert torch.equal(outputs["simt"], outputs["sm90"])
    assert torch.equal(outputs["simt"][:64], outputs["small_m"])


def test_the_automatic_choice_equals_every_forced_kernel():
    # Small M, medium M and large M each pick a different kernel; all give the same outputs.
    for m in (16, 100, 700):
        qa, _ = random_codes(m, 3072, 4)
        qw, _ = random_codes(512, 3072, 4)
        sa, sw = torch.rand(m, device="cuda"), torch.rand(512, device="cuda")
        automatic = ck.gemm(qa, sa, qw, sw, bits=4)
        with ck.forced_gemm_kernel("simt"):
            assert torch.equal(ck.gemm(qa, sa, qw, sw, bits=4), automatic)


@pytest.mark.parametrize(
    ("kernel", "m", "k"),
    [("small_m", 65, 256), ("small_m", 8, 18), ("sm90_persistent", 128, 18), ("sm90", 128, 18)],
)
def test_forcing_a_kernel_that_cannot_run_the_call_raises(kernel, m, k):
    # 65 rows are beyond the weight-streaming kernel; 18 4-bit codes (9 bytes) a row are not whole 16-byte pieces.
    qa, _ = random_codes(m, k, 4)
    qw, _ = random_codes(32, k, 4)
    sa, sw = torch.ones(m, device="cuda"), torch.ones(32, device="cuda")
    with ck.forced_gemm_kernel(kernel), pytest.raises(ValueError, match=f"the forced GEMM kernel '{kernel}' cannot"):
        ck.gemm(qa, sa, qw, sw, bits=4)
    ck.gemm(qa, sa, qw, sw, bits=4)  # the automatic choice is back, and runs it
