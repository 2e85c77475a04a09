import math

import numpy as np
import pytest
import torch

import convrot_kernels as ck
from convrot_kernels import _C

import reference as ref

E4M3 = torch.float8_e4m3fn


def key_of(k: np.ndarray) -> np.ndarray:
    """The key stored at position k of a 32-key group of vt8 (docs/format.md)."""
    return 16 * (k // 16) + 8 * ((k % 4) // 2) + 2 * ((k % 16) // 4) + (k % 2)


def e4m3_codes(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.uint8)
    _C.e4m3_codes(x.contiguous(), out)
    return out


def e4m3_torch(x: torch.Tensor) -> torch.Tensor:
    """torch's fp32 -> e4m3 cast (round to nearest even) with saturation: torch itself gives NaN from
    464 on, so magnitudes are clamped to 448 first."""
    finite = torch.where(x.isnan(), x, x.clamp(-448.0, 448.0))
    return finite.to(E4M3).view(torch.uint8)


def operands(g, b, nq, nkv, h, d, dtype, outliers=False):
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (nq, nkv, nkv))
    # Rows with their own offset and spread, as the projections' outputs have.
    q = q * (torch.rand(b, nq, h, 1, generator=g) * 3 + 0.5) + torch.randn(b, 1, h, d, generator=g)
    k = k * (torch.rand(b, nkv, h, 1, generator=g) * 3 + 0.5) + torch.randn(b, 1, h, d, generator=g)
    if outliers:  # a few large channels, the case the rotation is for
        ch = torch.randint(0, d, (3,), generator=g)
        q[..., ch] *= 25
        k[..., ch] *= 25
        v[..., ch[:1]] *= 40
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---- the fp32 -> e4m3 converter ----


def test_e4m3_converter_matches_torch_on_every_rounding_case():
    # Every fp32 of magnitude 2^-12 .. 2^9 whose low 8 bits are 0 (exact ties included), 1 (just
    # above a tie) or 0xff (just below one), both signs: every e4m3 code, its ties and their
    # neighbours, subnormals included; then zeros, tiny values, saturation and NaN.
    hi = torch.arange((127 - 12) << 15, (127 + 9) << 15, dtype=torch.int64)
    bits = torch.cat([(hi << 8) | lo for lo in (0x00, 0x01, 0xFF)])
    bits = torch.cat([bits, bits | (1 << 31)])
    x = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)
    tiny = [0.0, -0.0, 2.0**-10, -(2.0**-10), 2.0**-10 * 1.0001, 2.0**-11, 1e-30]
    special = torch.tensor([*tiny, 448.0, 464.0, 479.9, 1e9, math.inf, -math.inf, -464.0])
    x = torch.cat([x, special])
    got, expected = e4m3_codes(x), e4m3_torch(x)
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.numel()} mismatches, first at {x[mismatch[0]].item()!r}"
    nan = e4m3_codes(torch.tensor([math.nan, -math.nan]))
    assert (nan & 0x7F == 0x7F).all()


# ---- the pre-pass against a float64 re-implementation ----


def expected_int8(rotated: np.ndarray, scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.rint(rotated / scale.astype(np.float64)[..., None]), -127, 127)
    return np.where(scale[..., None] == 0, 0, codes).astype(np.int64)


def assert_int8_codes(got: torch.Tensor, rotated: np.ndarray, scale: np.ndarray):
    codes = expected_int8(rotated, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = rotated / scale.astype(np.float64)[..., None]
    near_tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-3  # the fp32 butterflies may round across a tie
    got = got.numpy().astype(np.int64)
    assert not ((got != codes) & ~near_tie).any()
    assert (np.abs(got - codes) <= 1).all()


@pytest.mark.parametrize(
    "b, nq, nkv, h, d, dtype",
    [
        (1, 1, 1, 1, 64, torch.bfloat16),
        (2, 200, 130, 3, 128, torch.bfloat16),
        (1, 128, 300, 2, 64, torch.float16),
        (1, 77, 256, 2, 128, torch.float16),
    ],
)
def test_prepass_codes_follow_the_spec(b, nq, nkv, h, d, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = operands(g, b, nq, nkv, h, d, dtype, outliers=True)
    c = ck.attention_8bit_prepass(q, k, v)
    bh, nq_pad, nkv_pad = b * h, -(-nq // 128) * 128, -(-nkv // 128) * 128
    assert c.q8.shape == (bh, nq_pad, d) and c.sq.shape == (bh, nq_pad)
    assert c.k8.shape == (bh, nkv_pad, d) and c.sk.shape == (bh, nkv_pad // 128)
    assert c.vt8.shape == (bh, d, nkv_pad) and c.sv.shape == (bh, d)

    def heads(x):  # [B, N, H, D] -> [BH, N, D]
        return x.permute(0, 2, 1, 3).reshape(bh, x.shape[1], d)

    rq, rk = ref.rht(heads(q), 64), ref.rht(heads(k), 64)
    sq = (np.abs(rq).max(-1) / 127).astype(np.float32)
    np.testing.assert_allclose(c.sq[:, :nq].numpy(), sq, rtol=1e-5, atol=0)
    assert (c.sq[:, nq:] == 0).all() and (c.q8[:, nq:] == 0).all()
    assert_int8_codes(c.q8[:, :nq], rq, c.sq[:, :nq].numpy())

    rk_pad = np.zeros((bh, nkv_pad, d))
    rk_pad[:, :nkv] = rk
    blocks = rk_pad.reshape(bh, nkv_pad // 128, 128 * d)
    sk = (np.abs(blocks).max(-1) / 127).astype(np.float32)
    np.testing.assert_allclose(c.sk.numpy(), sk, rtol=1e-5, atol=0)
    block_scale = np.repeat(c.sk.numpy(), 128, axis=1)[:, :nkv]
    assert_int8_codes(c.k8[:, :nkv], rk, block_scale)
    assert (c.k8[:, nkv:] == 0).all()

    vh = heads(v).float()  # [BH, N, D]
    sv = vh.abs().amax(1) / 448
    assert torch.equal(c.sv, sv)
    codes = e4m3_torch(vh / sv[:, None, :]).transpose(1, 2)  # [BH, D, N]
    padded = torch.zeros(bh, d, nkv_pad, dtype=torch.uint8)
    padded[:, :, :nkv] = codes
    stored_key = torch.from_numpy(np.arange(nkv_pad) // 32 * 32 + key_of(np.arange(nkv_pad) % 32))
    assert torch.equal(c.vt8, padded[:, :, stored_key])


def test_prepass_zero_rows_and_channels_have_zero_scales_and_codes():
    q, k, v = (torch.randn(1, 130, 2, 64).bfloat16() for _ in range(3))
    q[0, 5] = 0
    k[0, :] = 0
    v[0, :, 1, 7] = 0
    c = ck.attention_8bit_prepass(q, k, v)
    assert (c.sq[:, 5] == 0).all() and (c.q8[:, 5] == 0).all()
    assert (c.sk == 0).all() and (c.k8 == 0).all()
    assert c.sv[1, 7] == 0 and (c.vt8[1, 7] == 0).all()


# ---- the attention ----


def assert_within_twice_the_simulated_error(out, q, k, v, scale):
    exact = ref.attention(q, k, v, scale)
    err = (out.double() - exact).abs().max().item()
    sim_err = (ref.attention_8bit_simulated(q, k, v, scale) - exact).abs().max().item()
    assert err <= 2 * sim_err + 1e-3 * exact.abs().max().item(), (err, sim_err)


@pytest.mark.parametrize(
    "b, nq, nkv, h, d, dtype, outliers",
    [
        (1, 128, 128, 2, 128, torch.bfloat16, False),
        (2, 300, 300, 2, 128, torch.bfloat16, True),
        (1, 200, 77, 3, 128, torch.float16, False),
        (1, 1, 333, 2, 64, torch.bfloat16, True),
        (1, 130, 5, 2, 64, torch.float16, False),
    ],
)
def test_attention_error_is_at_most_twice_that_of_the_simulated_quantization(b, nq, nkv, h, d, dtype, outliers):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = operands(g, b, nq, nkv, h, d, dtype, outliers)
    scale = 1 / math.sqrt(d)
    out = ck.attention_8bit(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_within_twice_the_simulated_error(out, q, k, v, scale)


def test_attention_reads_strided_views_and_takes_a_scale():
    # q, k, v as slices of a fused qkv projection [B, N, 3, H, D]; a sharper softmax than 1/sqrt(D).
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    qkv = torch.randn(1, 150, 3, 2, 128, generator=g).bfloat16()
    q, k, v = qkv.unbind(2)
    out = ck.attention_8bit(q, k, v, scale=0.3)
    assert torch.equal(out, ck.attention_8bit(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3))
    assert_within_twice_the_simulated_error(out, q, k, v, 0.3)


def test_attention_of_a_non_finite_query_is_nan_and_leaves_the_others_alone():
    q, k, v = (torch.randn(1, 20, 1, 64).bfloat16() for _ in range(3))
    q[0, 3, 0, 5] = math.inf
    out = ck.attention_8bit(q, k, v)
    assert out[0, 3].isnan().all()
    assert out[0, torch.arange(20) != 3].isfinite().all()


def test_attention_is_a_torch_library_op_with_a_fake():
    q, k, v = (torch.randn(1, 40, 2, 64).bfloat16() for _ in range(3))
    torch.library.opcheck(torch.ops.convrot_kernels.attention_8bit.default, (q, k, v, 0.125))
    compiled = torch.compile(lambda q, k, v: ck.attention_8bit(q, k, v) * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), ck.attention_8bit(q, k, v) * 2)


# ---- bad inputs ----


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q.float(), k, v), TypeError, "query must have dtype"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
        (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), ValueError, "head dimension"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "key and value must"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "key and value must"),
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, "no rows"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "no tokens"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
        (lambda q, k, v: (q, k, v.float().numpy()), TypeError, "value must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    q, k, v = (torch.randn(1, 8, 2, 64).bfloat16() for _ in range(3))
    with pytest.raises(error, match=match):
        ck.attention_8bit(*change(q, k, v))


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, math.inf, "1", True])
def test_bad_scale_raises(scale):
    q = torch.randn(1, 8, 2, 64).bfloat16()
    with pytest.raises(ValueError, match="scale must be"):
        ck.attention_8bit(q, q, q, scale=scale)
