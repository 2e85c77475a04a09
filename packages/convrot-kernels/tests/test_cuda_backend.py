"""The CUDA backend against the CPU backend and a float64 reference written here
(the rows of fused inputs come from reference.py).

Every check draws fresh random inputs. Outputs are written into buffers poisoned
with two different patterns (by calling the destination-passing ``_C`` functions
directly): an element the kernel failed to write would differ between the two
runs, so "both runs identical and correct" proves every element was written.
"""

from __future__ import annotations

import math

import numpy as np
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

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POISONS = (0x55, 0xAA)


# ---------------------------------------------------------------- float64 reference


def hadamard64(n: int) -> np.ndarray:
    """R_n = (H4 ⊗ ... ⊗ H4) / sqrt(n), in float64."""
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(h4, h)
    return h / math.sqrt(n)


def rotate64(x: torch.Tensor, group: int) -> np.ndarray:
    v = x.detach().cpu().double().numpy()
    g = v.reshape(*v.shape[:-1], v.shape[-1] // group, group) @ hadamard64(group)
    return g.reshape(v.shape)


def quantize64(v: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, fp32 scales, and each value's distance to a rounding tie (in code units)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(v).max(axis=1) / qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = v / scale.astype(np.float64)[:, None]
        codes = np.clip(np.rint(ratio), -qmax - 1, qmax)
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5)
    codes[scale == 0] = 0
    return np.nan_to_num(codes).astype(np.int64), scale, tie


def codes_of(q: torch.Tensor, bits: int) -> np.ndarray:
    q = q.cpu()
    if bits == 8:
        return q.numpy().astype(np.int64)
    p = q.numpy()
    low = (p & 0x0F).astype(np.int64)
    high = (p >> 4).astype(np.int64)
    low = np.where(low > 7, low - 16, low)
    high = np.where(high > 7, high - 16, high)
    return np.stack([low, high], axis=-1).reshape(p.shape[0], -1)


def gemm64(ca: np.ndarray, sa: torch.Tensor, cw: np.ndarray, sw: torch.Tensor, bias) -> np.ndarray:
    acc = ca.astype(np.int64) @ cw.astype(np.int64).T
    y = acc.astype(np.float64) * sa.double().cpu().numpy()[:, None] * sw.double().cpu().numpy()[None, :]
    if bias is not None:
        y = y + bias.double().cpu().numpy()[None, :]
    return y


def rounding_floor(exact: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """|round_to(dtype, exact) - exact|: the error of the same math in that precision."""
    return np.abs(torch.from_numpy(exact).to(dtype).double().numpy() - exact)


# ---------------------------------------------------------------- poisoned calls


def poisoned_runs(make_outputs, call):
    """Runs `call(*outputs)` into outputs filled with each poison byte; returns both results."""
    results = []
    for byte in POISONS:
        outs = make_outputs()
        for t in outs:
            t.view(torch.uint8).fill_(byte)
        call(*outs)
        results.append([t.clone() for t in outs])
    torch.cuda.synchronize()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "some output elements were never written"
    return results[0]


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def device() -> int:
    return torch.cuda.current_device()


def cuda_rht(x: torch.Tensor, group: int) -> torch.Tensor:
    x = x.contiguous()
    (out,) = poisoned_runs(
        lambda: [torch.empty_like(x)], lambda out: _C.rht(x, out, FLOAT_CODES[x.dtype], group, stream())
    )
    return out


def cuda_rht_quantize(
    x: torch.Tensor, group: int, bits: int, x2: torch.Tensor | None = None, gelu_from: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape[0], x.shape[1] + (0 if x2 is None else x2.shape[1])

    def outputs():
        q = torch.empty(
            (m, k // 2 if bits == 4 else k), dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device
        )
        return [q, torch.empty(m, dtype=torch.float32, device=x.device)]

    x = x.contiguous()
    x2 = None if x2 is None else x2.contiguous()

    def call(q, s):
        _C.rht_quantize(
            x.data_ptr(),
            FLOAT_CODES[x.dtype],
            m,
            x.shape[1],
            0 if x2 is None else x2.data_ptr(),
            k,
            gelu_from,
            group,
            bits,
            q.data_ptr(),
            s.data_ptr(),
            device(),
            stream(),
        )

    q, scale = poisoned_runs(outputs, call)
    return q, scale


def gemm_into(y, qa, sa, qw, sw, bias, bits):
    """The compiled module's GEMM entry, writing into y (every operand contiguous, bias float32)."""
    m, n = y.shape
    k = qa.shape[1] * (2 if bits == 4 else 1)
    bias_ptr = 0 if bias is None else bias.data_ptr()
    pointers = (qa.data_ptr(), sa.data_ptr(), qw.data_ptr(), sw.data_ptr(), bias_ptr, y.data_ptr())
    _C.gemm(*pointers, FLOAT_CODES[y.dtype], m, n, k, bits, bits, 0, device(), stream())


def cuda_gemm(qa, sa, qw, sw, bias, bits, out_dtype):
    m, n = qa.shape[0], qw.shape[0]
    (y,) = poisoned_runs(
        lambda: [torch.empty((m, n), dtype=out_dtype, device=qa.device)],
        lambda y: gemm_into(y, qa, sa, qw, sw, bias, bits),
    )
    return y


# ---------------------------------------------------------------- rotation


RHT_SHAPES = [  # (rows, K, group)
    ((1, 64), 64),
    ((3, 1152), 64),
    ((7, 3072), 256),
    ((5, 15360), 256),
    ((2, 4096), 1024),
    ((2, 16384), 256),  # the widest row of the fast path
    ((2, 20480), 1024),  # longer than one staged segment
    ((9, 48), 16),
    ((3, 12), 4),
    ((2, 3, 256), 256),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", RHT_SHAPES)
def test_rht_matches_cpu_backend_and_float64(shape, group, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    got = cuda_rht(x.cuda(), group).cpu()
    assert torch.equal(got, ck.rht(x, group)), "CUDA and CPU rotations differ"
    exact = rotate64(x, group)
    err = np.abs(got.double().numpy() - exact)
    # One rounding to dtype plus fp32 butterfly error.
    assert (err <= 2 * rounding_floor(exact, dtype) + 1e-5 * (np.abs(exact) + 1)).all()


# ---------------------------------------------------------------- quantization


def assert_codes(q, scale, values64, bits, cpu_q, cpu_scale, same_input=True):
    """same_input=False: the backends' fp32 GELUs (a few ulps apart) built the fp32 rows, so the
    CUDA and CPU scales may differ by as much."""
    codes, ref_scale, tie = quantize64(values64, bits)
    got = codes_of(q, bits)
    scale = scale.cpu()
    if same_input:
        assert torch.equal(scale, cpu_scale), "CUDA and CPU scales differ"
    else:
        torch.testing.assert_close(scale, cpu_scale, rtol=1e-6, atol=0)
    np.testing.assert_allclose(scale.numpy(), ref_scale, rtol=1e-5, atol=0)
    near_tie = tie < 1e-3
    assert not ((got != codes) & ~near_tie).any(), "codes differ from float64 away from rounding ties"
    assert not ((got != codes_of(cpu_q, bits)) & ~near_tie).any(), "codes differ from the CPU backend away from ties"
    assert (np.abs(got - codes) <= 1).all()


RQ_SHAPES = [  # (M, K, group)
    (1, 3072, 256),
    (7, 3072, 256),
    (4101, 3072, 256),  # more rows than resident blocks: each block walks several, some one fewer
    (33, 1152, 64),
    (5, 15360, 256),
    (3, 12288, 256),
    (2, 4096, 1024),
    (2, 16384, 256),  # the widest row of the fast path
    (3, 20480, 256),  # two staged segments: rotated twice
    (11, 48, 16),
    (4, 20, 4),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,group", RQ_SHAPES)
def test_rht_quantize_matches_cpu_backend_and_float64(m, k, group, dtype, bits):
    x = (torch.randn(m, k) * 2 + torch.randn(m, 1)).to(dtype)  # a per-row offset, as AdaLN gives
    q, scale = cuda_rht_quantize(x.cuda(), group, bits)
    cpu_q, cpu_scale = ck.rht_quantize(x, group, bits)
    assert_codes(q, scale, rotate64(x, group), bits, cpu_q, cpu_scale)


def test_rht_quantize_of_a_wider_row_after_a_narrower_one():
    # 15360 and 12288 share one fast-path kernel, each above 48 KB of shared memory: the
    # shared-memory limit set for the narrower row must not stand for the wider one.
    for k in (15360, 12288, 15360):
        x = torch.randn(3, k, dtype=torch.bfloat16)
        q, scale = cuda_rht_quantize(x.cuda(), 256, 4)
        cpu_q, cpu_scale = ck.rht_quantize(x, 256, 4)
        assert_codes(q, scale, rotate64(x, 256), 4, cpu_q, cpu_scale)


FUSED_SHAPES = [  # (M, width of x, width of x2, gelu_from, group)
    (5, 3072, 12288, 3072, 256),  # Flux's single-block proj_out: cat([attn, gelu(mlp)])
    (3, 12288, 0, 0, 256),  # Flux's feed-forward output layer: gelu(h)
    (4, 0, 12288, 0, 256),  # the same, given as x2
    (7, 4608, 0, 0, 64),  # PixArt's feed-forward output layer
    (3, 1152, 4608, 2304, 64),  # GELU from inside x2
    (2, 4096, 16384, 4096, 256),  # two staged segments
    (3, 48, 20, 16, 4),  # chunks of 4
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k1,k2,gelu_from,group", FUSED_SHAPES)
def test_fused_inputs_match_cpu_backend_and_float64(m, k1, k2, gelu_from, group, dtype, bits):
    x = ref.gelu_steady((torch.randn(m, k1 + k2) * 2 + torch.randn(m, 1)).to(dtype))
    x1, x2 = x[:, :k1].contiguous(), (x[:, k1:].contiguous() if k2 else None)
    q, scale = cuda_rht_quantize(x1.cuda(), group, bits, None if x2 is None else x2.cuda(), gelu_from)
    cpu_q, cpu_scale = ck.rht_quantize(x1, group, bits, x2=x2, gelu_from=gelu_from)
    values = rotate64(ref.fused_rows(x1, x2, gelu_from), group)
    assert_codes(q, scale, values, bits, cpu_q, cpu_scale, same_input=dtype != torch.float32)


def test_misaligned_fused_input_takes_the_scalar_path():
    x1 = torch.randn(3, 256, device="cuda").to(torch.bfloat16)
    storage = torch.empty(3 * 1024 + 1, device="cuda", dtype=torch.bfloat16)
    x2 = storage[1:].view(3, 1024)  # 2 bytes into its storage: no 16-byte vector loads
    x2.copy_(ref.gelu_steady(torch.randn(3, 1024).to(torch.bfloat16)))
    assert x2.data_ptr() % 16
    q, scale = cuda_rht_quantize(x1, 256, 4, x2, 256)
    cpu_q, cpu_scale = ck.rht_quantize(x1.cpu(), 256, 4, x2=x2.cpu(), gelu_from=256)
    assert_codes(q, scale, rotate64(ref.fused_rows(x1.cpu(), x2.cpu(), 256), 256), 4, cpu_q, cpu_scale)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 2), (5, 6), (3, 34), (2, 3072), (4, 17000), (3, 37)])
def test_quantize_matches_cpu_backend_and_float64(m, k, dtype, bits):
    if bits == 4 and k % 2:
        k += 1
    x = (torch.randn(m, k) * 10).to(dtype)
    q, scale = cuda_rht_quantize(x.cuda(), 0, bits)
    cpu_q, cpu_scale = ck.quantize(x, bits)
    assert_codes(q, scale, x.double().numpy(), bits, cpu_q, cpu_scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_and_non_finite_rows_stay_in_their_row(bits):
    x = torch.randn(5, 3072, device="cuda")
    x[1] = 0
    x[2, 5] = math.nan
    x[3, 7] = math.inf
    x[4, 9] = -math.inf
    q, scale = cuda_rht_quantize(x, 256, bits)
    codes, scale = codes_of(q, bits), scale.cpu()
    assert scale[1].item() == 0 and not codes[1].any()
    for row in (2, 3, 4):
        assert math.isnan(scale[row].item()) and not codes[row].any()
    good_q, good_scale = cuda_rht_quantize(x[:1].contiguous(), 256, bits)
    assert scale[0].item() == good_scale.item() and (codes[0] == codes_of(good_q, bits)[0]).all()


def test_misaligned_input_takes_the_scalar_path():
    # A contiguous view 2 bytes into its storage: no 16-byte vector loads possible.
    m, k = 3, 1024
    base = torch.randn(m * k + 1, device="cuda").to(torch.bfloat16)
    x = base[1:].view(m, k)
    assert x.data_ptr() % 16
    q, scale = cuda_rht_quantize(x, 256, 4)
    cpu_q, cpu_scale = ck.rht_quantize(x.cpu(), 256, 4)
    assert_codes(q, scale, rotate64(x, 256), 4, cpu_q, cpu_scale)
    assert torch.equal(cuda_rht(x, 256).cpu(), ck.rht(x.cpu(), 256))


def test_public_api_runs_on_the_current_stream():
    s = torch.cuda.Stream()
    x = torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 3072, device="cuda", dtype=torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.stream(s):
        qa, sa = ck.rht_quantize(x, 256, 4)
        qw, sw = ck.rht_quantize(w, 256, 4)
        y = ck.gemm(qa, sa, qw, sw, bits=4)
    s.synchronize()
    cpu_y = ck.gemm(qa.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), bits=4)
    torch.testing.assert_close(y.cpu(), cpu_y, rtol=2**-7, atol=1e-6)


# ---------------------------------------------------------------- GEMM


def random_operands(rows, k, bits):
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (rows, k), dtype=torch.int8)
    q = ck.pack_int4(codes) if bits == 4 else codes
    return q, codes.numpy()


GEMM_SHAPES = [  # (M, N, K)
    (1, 256, 3072),
    (2, 3072, 128),
    (17, 384, 1152),
    (129, 300, 2432),
    (33, 256, 15360),
    (256, 640, 3072),
    (5, 7, 18),  # K not a multiple of 32: the portable kernel
    (3, 129, 96),
    (1, 1, 32),
]


# "auto": the kernel cuda::gemm picks; "sm90_n256" / "sm90_n128": the TMA + wgmma kernel of
# gemm_sm90.cu forced (convrot_kernels.forced_gemm_kernel), at both tile widths.
GEMM_KERNELS = {"auto": None, "sm90_n256": ("sm90", 256), "sm90_n128": ("sm90", 128)}


@pytest.fixture(params=list(GEMM_KERNELS))
def gemm_kernel(request):
    choice = GEMM_KERNELS[request.param]
    if choice is None:
        yield request.param
        return
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 kernel needs compute capability 9.0")
    with ck.forced_gemm_kernel(choice[0], sm90_tile_n=choice[1]):
        yield request.param


def forced_kernel_refuses(gemm_kernel: str, k: int, bits: int) -> bool:
    """Whether the forced sm90 kernel cannot take rows of k codes (it loads whole 16-byte pieces)."""
    return gemm_kernel != "auto" and (k * bits // 8) % 16 != 0


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_matches_cpu_backend_and_float64(m, n, k, bits, out_dtype, gemm_kernel):
    qa, ca = random_operands(m, k, bits)
    qw, cw = random_operands(n, k, bits)
    sa = torch.rand(m) * 0.1 + 1e-3
    sw = torch.rand(n) * 0.1 + 1e-3
    bias = torch.randn(n) if (m + n) % 2 else None
    dev = [t.cuda() if t is not None else None for t in (qa, sa, qw, sw, bias)]
    if forced_kernel_refuses(gemm_kernel, k, bits):
        with pytest.raises(ValueError, match="the forced GEMM kernel 'sm90' cannot run this call"):
            ck.gemm(*dev, bits=bits, out_dtype=out_dtype)
        return
    y = cuda_gemm(*dev, bits, out_dtype).cpu()
    exact = gemm64(ca, sa, cw, sw, bias)
    err = np.abs(y.double().numpy() - exact)
    assert (err <= 2 * rounding_floor(exact, out_dtype) + 1e-6 * (np.abs(exact) + 1)).all()
    cpu_y = ck.gemm(qa, sa, qw, sw, bias, bits=bits, out_dtype=out_dtype)
    # Same int32 sum, same fp32 epilogue: at most one rounding step apart.
    torch.testing.assert_close(y, cpu_y, rtol=torch.finfo(out_dtype).eps, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [4096, 15360])
def test_gemm_accumulates_exactly(k, bits, gemm_kernel):
    qa, ca = random_operands(130, k, bits)
    qw, cw = random_operands(260, k, bits)
    ones_m, ones_n = torch.ones(130, device="cuda"), torch.ones(260, device="cuda")
    y = cuda_gemm(qa.cuda(), ones_m, qw.cuda(), ones_n, None, bits, torch.float32).cpu().numpy()
    exact = ca.astype(np.int64) @ cw.astype(np.int64).T
    assert (np.abs(exact) < 2**24).all()
    assert (y == exact).all()


def test_gemm_4bit_beyond_the_fast_kernels_k():
    # K >= 2^17 leaves the Hopper kernel's 256x-scaled accumulator range.
    k = 1 << 17
    qa, ca = random_operands(2, k, 4)
    qw, cw = random_operands(3, k, 4)
    y = cuda_gemm(
        qa.cuda(), torch.ones(2, device="cuda"), qw.cuda(), torch.ones(3, device="cuda"), None, 4, torch.float32
    )
    exact = ca.astype(np.int64) @ cw.astype(np.int64).T
    assert (y.cpu().numpy() == exact.astype(np.float32)).all()


def test_chain_approximates_bf16_linear():
    x = torch.randn(300, 3072, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(512, 3072, device="cuda") / 3072**0.5).to(torch.bfloat16)
    bias = torch.randn(512, device="cuda")
    qa, sa = ck.rht_quantize(x, 256, 4)
    qw, sw = ck.rht_quantize(w, 256, 4)
    y = ck.gemm(qa, sa, qw, sw, bias, bits=4).float()
    ref = torch.nn.functional.linear(x.float(), w.float(), bias)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.2, rel


# ---------------------------------------------------------------- RMSNorm + rotary embedding


def norm_rope_operands(shape, dtype, weighted=True, rotated=True):
    b, s, h, d = shape
    x = torch.randn(shape) * torch.rand(b, s, h, 1) * 8 + torch.randn(b, s, h, 1)
    weight = (torch.randn(d) * 0.5 + 1).to(dtype) if weighted else None
    angles = torch.rand(s, d // 2).double() * s
    cos = angles.cos().repeat_interleave(2, dim=1).float() if rotated else None
    sin = angles.sin().repeat_interleave(2, dim=1).float() if rotated else None
    return x.to(dtype), weight, cos, sin


def cuda_rms_norm_rope(x, weight, cos, sin, eps=1e-6):
    """On the GPU into poisoned outputs, through the pointer entry the public functions use."""
    dev = [None if t is None else t.cuda() for t in (x, weight, cos, sin)]
    (out,) = poisoned_runs(
        lambda: [torch.empty(x.shape, dtype=x.dtype, device="cuda")],
        lambda out: ck.rms_norm_rope_into(dev[0], out, *dev[1:], eps=eps),
    )
    return out.cpu()


NORM_ROPE_SHAPES = [  # (batch, tokens, heads, head_dim)
    (1, 1, 1, 2),
    (1, 4608, 24, 128),  # Flux, one image and its text
    (2, 333, 3, 128),
    (1, 7, 9, 64),  # more heads than one block's 8 warps
    (3, 5, 2, 96),  # lanes left without pairs
    (1, 3, 2, 6),
    (2, 4, 2, 256),
    (1, 2, 1, 1024),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_ROPE_SHAPES)
@pytest.mark.parametrize("weighted,rotated", [(True, True), (False, True), (True, False)])
def test_rms_norm_rope_matches_cpu_backend(shape, dtype, weighted, rotated):
    x, weight, cos, sin = norm_rope_operands(shape, dtype, weighted, rotated)
    got = cuda_rms_norm_rope(x, weight, cos, sin)
    # The same operations in the same order on both backends: equal bit for bit.
    assert torch.equal(got, ck.rms_norm_rope(x, weight, cos, sin))
    expected = ref.rms_norm_rope(x, weight, cos, sin, 1e-6)
    torch_err = np.abs(ref.rms_norm_rope_torch(x, weight, cos, sin, 1e-6).double().numpy() - expected).max()
    assert np.abs(got.double().numpy() - expected).max() <= 2 * torch_err + 1e-6 * (np.abs(expected).max() + 1)


def test_rms_norm_rope_strided_rows_into_a_slice_and_in_place():
    b, s, h, d, text = 2, 300, 24, 128, 17
    qkv = torch.randn(b, s, 3 * h * d, device="cuda").to(torch.bfloat16)
    k = qkv.chunk(3, dim=-1)[1].unflatten(-1, (h, d))
    _, weight, cos, sin = norm_rope_operands((b, s, h, d), torch.bfloat16)
    weight, cos, sin = weight.cuda(), cos.cuda(), sin.cuda()
    joint = torch.full((b, text + s, h, d), 7.0, dtype=torch.bfloat16, device="cuda")
    ck.rms_norm_rope_into(k, joint[:, text:], weight, cos, sin)
    expected = ck.rms_norm_rope(k.cpu().contiguous(), weight.cpu(), cos.cpu(), sin.cpu())
    assert torch.equal(joint[:, text:].cpu(), expected)
    assert (joint[:, :text] == 7.0).all()
    assert torch.equal(ck.rms_norm_rope(k, weight, cos, sin).cpu(), expected)  # the torch.library op
    before = qkv.clone()
    ck.rms_norm_rope_into(k, k, weight, cos, sin)
    assert torch.equal(k.cpu(), expected)
    for part in (0, 2):  # q and v, beside k in each row, are untouched
        assert torch.equal(qkv.chunk(3, dim=-1)[part], before.chunk(3, dim=-1)[part])


# ---------------------------------------------------------------- LayerNorm + AdaLN modulation


def cuda_layer_norm_modulate(x, scale, shift, prefix=None, eps=1e-6):
    """On the GPU into poisoned outputs, through the pointer entry the public function uses."""
    dx, dscale, dshift = x.cuda(), scale.cuda(), shift.cuda()
    dprefix = None if prefix is None else prefix.cuda()
    b, s, k = x.shape
    s0 = 0 if prefix is None else prefix.shape[1]
    (out,) = poisoned_runs(
        lambda: [torch.empty((b, s0 + s, k), dtype=x.dtype, device="cuda")],
        lambda out: _C.layer_norm_modulate(
            dx.data_ptr(),
            out.data_ptr(),
            FLOAT_CODES[x.dtype],
            b,
            s0 + s,
            s0,
            k,
            dx.stride(0),
            0 if dprefix is None else dprefix.data_ptr(),
            0 if dprefix is None else dprefix.stride(0),
            dscale.data_ptr(),
            dshift.data_ptr(),
            dscale.stride(0),
            eps,
            device(),
            stream(),
        ),
    )
    return out.cpu()


NORM_MODULATE_SHAPES = [  # (batch, prefix tokens, tokens, K)
    (1, 0, 1, 1),
    (4, 512, 4096, 3072),  # a Flux single block at batch 4
    (2, 0, 333, 3072),
    (1, 3, 5, 1152),  # PixArt-Sigma
    (2, 0, 7, 2432),  # SD3.5-large
    (1, 2, 3, 100),  # K % 8 != 0: scalar accesses
    (1, 0, 9, 4096),
    (2, 1, 4, 4104),  # two chunks a thread
    (1, 0, 3, 20000),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_MODULATE_SHAPES)
def test_layer_norm_modulate_matches_cpu_backend(shape, dtype):
    b, s0, s, k = shape
    g = torch.Generator().manual_seed(k + s)
    x = (torch.randn(b, s, k, generator=g) * torch.rand(b, s, 1, generator=g) * 8 + 3).to(dtype)
    prefix = (torch.randn(b, s0, k, generator=g) * 2 - 1).to(dtype) if s0 else None
    shift, scale, _ = (torch.randn(b, 3 * k, generator=g) * 0.5).to(dtype).chunk(3, dim=1)
    got = cuda_layer_norm_modulate(x, scale, shift, prefix)
    # The same operations in the same order on both backends: equal bit for bit.
    assert torch.equal(got, ck.layer_norm_modulate(x, scale, shift, prefix=prefix))


@pytest.mark.parametrize(("k", "split"), [(3072, 8), (100, 3)])  # 16-byte aligned slices, and scalar accesses
def test_layer_norm_modulate_op_on_cuda_reads_views_in_place(k, split):
    joint = torch.randn(2, 9, k, device="cuda").bfloat16()
    prefix, x = joint[:, :split], joint[:, split:]  # rows contiguous, batches 9 rows apart
    shift, scale, _ = torch.randn(2, 3 * k, device="cuda").bfloat16().chunk(3, dim=1)
    got = ck.layer_norm_modulate(x, scale, shift, prefix=prefix)
    expected = ck.layer_norm_modulate(joint.cpu(), scale.cpu(), shift.cpu())
    assert torch.equal(got.cpu(), expected)


# ---------------------------------------------------------------- the norm fused into rht_quantize


def cuda_layer_norm_modulate_rht_quantize(x, scale, shift, prefix, group, bits, eps=1e-6):
    """On the GPU into poisoned outputs, through the pointer entry the public function uses."""
    dx, dscale, dshift = x.cuda(), scale.cuda(), shift.cuda()
    dprefix = None if prefix is None else prefix.cuda()
    b, s, k = x.shape
    s0 = 0 if prefix is None else prefix.shape[1]
    rows = b * (s0 + s)
    q, q_scale = poisoned_runs(
        lambda: [
            torch.empty(
                (rows, k // 2 if bits == 4 else k), dtype=torch.uint8 if bits == 4 else torch.int8, device="cuda"
            ),
            torch.empty(rows, dtype=torch.float32, device="cuda"),
        ],
        lambda q, q_scale: _C.layer_norm_modulate_rht_quantize(
            dx.data_ptr(),
            FLOAT_CODES[x.dtype],
            b,
            s0 + s,
            s0,
            k,
            dx.stride(0),
            0 if dprefix is None else dprefix.data_ptr(),
            0 if dprefix is None else dprefix.stride(0),
            dscale.data_ptr(),
            dshift.data_ptr(),
            dscale.stride(0),
            eps,
            group,
            bits,
            q.data_ptr(),
            q_scale.data_ptr(),
            device(),
            stream(),
        ),
    )
    return q.cpu(), q_scale.cpu()


NORMED_QUANTIZE_CASES = [  # (batch, prefix tokens, tokens, K, group, bits)
    (4, 512, 4096, 3072, 256, 4),  # a Flux single block at batch 4
    (2, 0, 333, 3072, 256, 8),
    (1, 3, 5, 1152, 64, 4),  # PixArt-Sigma: one chunk a thread
    (2, 0, 7, 2432, 64, 4),  # SD3.5-large
    (1, 2, 9, 4096, 16, 4),
    (2, 1, 4, 15360, 256, 4),  # three chunks a thread
    (1, 0, 6, 3072, 0, 4),  # quantization without rotation
    (1, 2, 3, 100, 4, 8),  # K % 16 != 0: through memory
    (1, 0, 3, 20000, 16, 4),  # wider than the fast path: through memory
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORMED_QUANTIZE_CASES)
def test_layer_norm_modulate_rht_quantize_matches_cpu_backend(case, dtype):
    b, s0, s, k, group, bits = case
    g = torch.Generator().manual_seed(k + s + bits)
    x = (torch.randn(b, s, k, generator=g) * torch.rand(b, s, 1, generator=g) * 8 + 3).to(dtype)
    prefix = (torch.randn(b, s0, k, generator=g) * 2 - 1).to(dtype) if s0 else None
    shift, scale, _ = (torch.randn(b, 3 * k, generator=g) * 0.5).to(dtype).chunk(3, dim=1)
    q, q_scale = cuda_layer_norm_modulate_rht_quantize(x, scale, shift, prefix, group, bits)
    # The norm's and the row engine's operations in their orders: equal to the composition bit for bit.
    normed = ck.layer_norm_modulate(x, scale, shift, prefix=prefix).flatten(0, 1)
    expected = ck.rht_quantize(normed, group, bits) if group else ck.quantize(normed, bits)
    assert torch.equal(q_scale, expected[1])
    assert torch.equal(q, expected[0])


RESIDUAL_NORMED_CASES = [  # (batch, tokens, K, group, bits)
    (4, 4096, 3072, 256, 4),  # a Flux double block's image stream at batch 4
    (4, 512, 3072, 256, 4),  # its text stream
    (2, 9, 2432, 64, 8),
    (1, 5, 15360, 256, 4),
    (1, 3, 100, 4, 4),  # K % 16 != 0: through memory
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RESIDUAL_NORMED_CASES)
def test_residual_layer_norm_modulate_rht_quantize_matches_cpu_backend(case, dtype):
    b, s, k, group, bits = case
    g = torch.Generator().manual_seed(k + s + bits + 1)
    x = (torch.randn(b, s, k, generator=g) * 4 + 1).to(dtype)
    branch = (torch.randn(b, s, k, generator=g) * 2).to(dtype)
    chunks = (torch.randn(b, 6 * k, generator=g) * 0.5).to(dtype).chunk(6, dim=1)
    shift, scale, gate = chunks[3], chunks[4], chunks[2]  # views of one embedding, as diffusers passes them
    expected = ck.residual_layer_norm_modulate_rht_quantize(x, branch, gate, scale, shift, group_size=group, bits=bits)
    got = ck.residual_layer_norm_modulate_rht_quantize(
        x.cuda(), branch.cuda(), gate.cuda(), scale.cuda(), shift.cuda(), group_size=group, bits=bits
    )
    for a, e in zip(got, expected, strict=True):  # the sum, the codes and the scales, bit for bit
        assert torch.equal(a.cpu(), e)


@pytest.mark.parametrize("split", [8, 3])  # text parts of two lengths
def test_layer_norm_modulate_rht_quantize_op_on_cuda_reads_views_in_place(split):
    k = 3072
    joint = torch.randn(2, 9, k, device="cuda").bfloat16()
    prefix, x = joint[:, :split], joint[:, split:]  # rows contiguous, batches 9 rows apart
    shift, scale, _ = torch.randn(2, 3 * k, device="cuda").bfloat16().chunk(3, dim=1)
    q, q_scale = ck.layer_norm_modulate_rht_quantize(x, scale, shift, prefix=prefix)
    expected = ck.rht_quantize(ck.layer_norm_modulate(joint.cpu(), scale.cpu(), shift.cpu()).flatten(0, 1))
    assert torch.equal(q.cpu(), expected[0]) and torch.equal(q_scale.cpu(), expected[1])


def test_layer_norm_modulate_rht_quantize_misaligned_rows_go_through_memory():
    k = 272  # a width the fast path takes, but rows one element (2 bytes) off 16-byte alignment
    flat = torch.randn(2 * 5 * k + 1, device="cuda").bfloat16()
    x = flat[1:].view(2, 5, k)
    shift, scale, _ = torch.randn(2, 3 * k, device="cuda").bfloat16().chunk(3, dim=1)
    q, q_scale = ck.layer_norm_modulate_rht_quantize(x, scale, shift, group_size=16)
    expected = ck.rht_quantize(ck.layer_norm_modulate(x.cpu(), scale.cpu(), shift.cpu()).flatten(0, 1), 16)
    assert torch.equal(q.cpu(), expected[0]) and torch.equal(q_scale.cpu(), expected[1])


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (7, 3072), (2, 5, 64), (4097, 32)])
def test_pack_and_unpack_match_cpu_backend(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    n_bytes = codes.numel() // 2
    (packed,) = poisoned_runs(
        lambda: [torch.empty((*shape[:-1], shape[-1] // 2), dtype=torch.uint8, device="cuda")],
        lambda p: _C.pack_int4(codes.cuda(), p, stream()),
    )
    assert torch.equal(packed.cpu(), ck.pack_int4(codes))
    (unpacked,) = poisoned_runs(
        lambda: [torch.empty(shape, dtype=torch.int8, device="cuda")],
        lambda q: _C.unpack_int4(packed, q, stream()),
    )
    assert torch.equal(unpacked.cpu(), codes)
    assert packed.numel() == n_bytes


# ---------------------------------------------------------------- the operands' device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_operands_on_a_device_other_than_the_current_one():
    # A model moved to cuda:1 in a process whose current device is cuda:0: every op runs on
    # cuda:1 (on its current stream), gives the CPU backend's results, and leaves cuda:0 current.
    other = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(40, 3072, generator=g).bfloat16()
    w = torch.randn(256, 3072, generator=g).bfloat16()
    bias = torch.randn(256, generator=g)
    shift, scale, gate = (torch.randn(2, 3 * 3072, generator=g) * 0.3).bfloat16().chunk(3, dim=1)
    h = torch.randn(2, 20, 3072, generator=g).bfloat16()
    with torch.cuda.device(0):
        qw, sw = ck.rht_quantize(w.to(other), 256, 4)
        results = {
            "rht": ck.rht(x.to(other), 256),
            "rht_quantize": ck.rht_quantize(x.to(other), 256, 4),
            "gemm": ck.gemm(*ck.rht_quantize(x.to(other), 256, 4), qw, sw, bias.to(other)),
            "linear": ck.linear(x.to(other), qw, sw, bias.to(other), group_size=256),
            "layer_norm_modulate": ck.layer_norm_modulate(h.to(other), scale.to(other), shift.to(other)),
            "residual": ck.residual_layer_norm_modulate_rht_quantize(
                h.to(other), h.to(other), gate.to(other), scale.to(other), shift.to(other)
            ),
        }
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(other)
    cpu_qw, cpu_sw = ck.rht_quantize(w, 256, 4)
    expected = {
        "rht": ck.rht(x, 256),
        "rht_quantize": ck.rht_quantize(x, 256, 4),
        "gemm": ck.gemm(*ck.rht_quantize(x, 256, 4), cpu_qw, cpu_sw, bias),
        "linear": ck.linear(x, cpu_qw, cpu_sw, bias, group_size=256),
        "layer_norm_modulate": ck.layer_norm_modulate(h, scale, shift),
        "residual": ck.residual_layer_norm_modulate_rht_quantize(h, h, gate, scale, shift),
    }
    for name, got in results.items():
        got = got if isinstance(got, tuple) else (got,)
        want = expected[name] if isinstance(expected[name], tuple) else (expected[name],)
        for a, b in zip(got, want, strict=True):
            assert a.device == other, name
            if a.is_floating_point() and name in ("gemm", "linear"):
                # Same int32 sums, same fp32 epilogue: at most one rounding step apart.
                torch.testing.assert_close(a.cpu(), b, rtol=2**-7, atol=1e-6)
            else:
                assert torch.equal(a.cpu(), b), name


def test_linear_is_the_gemm_of_the_quantized_rows_on_cuda():
    # The one-call layer equals its two kernels, bit for bit, with and without a fused input.
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(3, 70, 3072, generator=g).bfloat16().cuda()
    qw, sw = ck.rht_quantize(torch.randn(512, 3072, generator=g).bfloat16().cuda(), 256, 4)
    bias = torch.randn(512, device="cuda")
    y = ck.linear(x, qw, sw, bias, group_size=256)
    expected = ck.gemm(*ck.rht_quantize(x.flatten(0, 1), 256, 4), qw, sw, bias).view(3, 70, 512)
    assert torch.equal(y, expected)
    y = ck.linear(x[..., :1024], qw, sw, bias, group_size=256, x2=x[..., 1024:], gelu_from=1024)
    rows = x.flatten(0, 1).contiguous()
    codes = ck.rht_quantize(rows[:, :1024].contiguous(), 256, 4, x2=rows[:, 1024:].contiguous(), gelu_from=1024)
    assert torch.equal(y, ck.gemm(*codes, qw, sw, bias).view(3, 70, 512))
