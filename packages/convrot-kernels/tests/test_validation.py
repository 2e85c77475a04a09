"""Every public op checks each argument and names the one at fault (convrot_kernels/_validation.py).

One table: for each op, a valid call built from fresh random tensors, then that call with one
argument broken (dtype, rank, shape, K not a multiple of the group, a group size that is not a
power of 4, mismatched scales, tensors on two devices, no rows), and the error it must raise.
The valid call itself must succeed, so a case cannot pass by breaking something else.
"""

from __future__ import annotations

import pytest
import torch

import convrot_kernels as ck


def codes(rows: int, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ck.rht_quantize(torch.randn(rows, k), 64, bits)


def gemm_args(bits=4, m=3, n=5, k=128):
    qa, sa = codes(m, k, bits)
    qw, sw = codes(n, k, bits)
    return {"qa": qa, "sa": sa, "qw": qw, "sw": sw, "bias": torch.randn(n), "bits": bits}


def linear_args(bits=4):
    qw, sw = codes(6, 128, bits)
    return {
        "x": torch.randn(2, 3, 128),
        "qweight": qw,
        "weight_scale": sw,
        "bias": torch.randn(6),
        "bits": bits,
        "group_size": 64,
    }


def norm_args():
    shift, scale, gate = torch.randn(2, 3 * 64).chunk(3, dim=1)
    return {"x": torch.randn(2, 4, 64), "scale": scale, "shift": shift}


def fused_norm_args(**extra):
    return {**norm_args(), "group_size": 64, **extra}


def rope_args():
    return {"x": torch.randn(1, 4, 2, 8), "weight": torch.ones(8), "cos": torch.ones(4, 8), "sin": torch.zeros(4, 8)}


META = "meta"


def on_meta(t: torch.Tensor) -> torch.Tensor:
    return t.to(META)


# (op, valid keyword arguments factory, argument name, replacement, exception, message)
CASES = [
    # rht
    (
        ck.rht,
        lambda: {"x": torch.randn(4, 64), "group_size": 64},
        "x",
        torch.zeros(4, 64, dtype=torch.int32),
        TypeError,
        "x must have dtype",
    ),
    (ck.rht, lambda: {"x": torch.randn(4, 64), "group_size": 64}, "x", torch.tensor(1.0), ValueError, "x must have"),
    (
        ck.rht,
        lambda: {"x": torch.randn(4, 64), "group_size": 64},
        "x",
        torch.randn(4, 80),
        ValueError,
        "multiple of group_size",
    ),
    (
        ck.rht,
        lambda: {"x": torch.randn(4, 64), "group_size": 64},
        "group_size",
        32,
        ValueError,
        "group_size must be a power of 4",
    ),
    (
        ck.rht,
        lambda: {"x": torch.randn(4, 64), "group_size": 64},
        "x",
        torch.zeros(0, 64),
        ValueError,
        r"x has no rows \(M = 0\)",
    ),
    (
        ck.rht,
        lambda: {"x": torch.randn(4, 64), "group_size": 64},
        "x",
        torch.zeros(4, 64, device=META),
        ValueError,
        "x is on meta",
    ),
    # rht_quantize / quantize
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "x",
        torch.randn(4, 128).double(),
        TypeError,
        "x must have dtype",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "x",
        torch.randn(2, 4, 128),
        ValueError,
        "x must be 2-D",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "x",
        torch.randn(4, 160),
        ValueError,
        "multiple of group_size",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "group_size",
        128,
        ValueError,
        "group_size must be a power of 4",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "bits",
        3,
        ValueError,
        "bits must be 4 or 8",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64},
        "x",
        torch.zeros(0, 128),
        ValueError,
        r"x has no rows \(M = 0\)",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64, "x2": torch.randn(4, 64)},
        "x2",
        torch.randn(4, 64, device=META),
        ValueError,
        "all tensors must be on one device; got x on cpu, x2 on meta",
    ),
    (
        ck.rht_quantize,
        lambda: {"x": torch.randn(4, 128), "group_size": 64, "x2": torch.randn(4, 64)},
        "x2",
        torch.randn(5, 64),
        ValueError,
        "x2 must be 2-D",
    ),
    (ck.quantize, lambda: {"x": torch.randn(4, 6)}, "x", torch.randn(4, 5), ValueError, "must be even"),
    (ck.quantize, lambda: {"x": torch.randn(4, 6)}, "x", "not a tensor", TypeError, "x must be a torch.Tensor"),
    # gemm
    (ck.gemm, gemm_args, "qa", torch.zeros(3, 64, dtype=torch.int8), TypeError, "qa must have dtype uint8"),
    (
        ck.gemm,
        lambda: gemm_args(bits=8),
        "qw",
        torch.zeros(5, 128, dtype=torch.uint8),
        TypeError,
        "qw must have dtype int8",
    ),
    (ck.gemm, gemm_args, "qa", torch.zeros(1, 3, 64, dtype=torch.uint8), ValueError, "qa must be 2-D"),
    (ck.gemm, gemm_args, "qw", torch.zeros(5, 32, dtype=torch.uint8), ValueError, "same number of columns"),
    (ck.gemm, gemm_args, "sa", torch.ones(4), ValueError, r"sa must be float32 \[M\] = \[3\]"),
    (ck.gemm, gemm_args, "sw", torch.ones(5).half(), TypeError, "sw must have dtype float32"),
    (ck.gemm, gemm_args, "sw", torch.ones(6), ValueError, r"sw must be float32 \[N\] = \[5\]"),
    (ck.gemm, gemm_args, "bias", torch.ones(4), ValueError, r"bias must be \[N\] = \[5\]"),
    (ck.gemm, gemm_args, "bias", torch.ones(5, dtype=torch.int32), TypeError, "bias must have dtype"),
    (ck.gemm, gemm_args, "bits", 2, ValueError, "bits must be 4 or 8"),
    (ck.gemm, gemm_args, "out_dtype", torch.int32, TypeError, "out_dtype"),
    (ck.gemm, gemm_args, "qa", torch.zeros(0, 64, dtype=torch.uint8), ValueError, r"qa has no rows \(M = 0\)"),
    (ck.gemm, gemm_args, "sw", torch.ones(5, device=META), ValueError, "sw on meta"),
    (
        ck.gemm,
        lambda: gemm_args(bits=8),
        "qw",
        torch.zeros(5, 1 << 17, dtype=torch.int8),
        ValueError,
        "too large for exact int32",
    ),
    # linear
    (ck.linear, linear_args, "x", torch.randn(2, 3, 128, dtype=torch.float64), TypeError, "x must have dtype"),
    (ck.linear, linear_args, "x", torch.randn(2, 3, 96), ValueError, r"x must be \[..., K\] for K = 128"),
    (ck.linear, linear_args, "x", torch.tensor(2.0), ValueError, "x must have at least one dimension"),
    (
        ck.linear,
        linear_args,
        "qweight",
        torch.zeros(6, 64, dtype=torch.int8),
        TypeError,
        "qweight must have dtype uint8",
    ),
    (ck.linear, linear_args, "qweight", torch.zeros(6, 64, 1, dtype=torch.uint8), ValueError, "qweight must be 2-D"),
    (ck.linear, linear_args, "weight_scale", torch.ones(7), ValueError, r"weight_scale must be float32 \[N\] = \[6\]"),
    (ck.linear, linear_args, "bias", torch.ones(5), ValueError, r"bias must be \[N\] = \[6\]"),
    (ck.linear, linear_args, "group_size", 32, ValueError, "group_size must be a power of 4"),
    (ck.linear, linear_args, "group_size", 256, ValueError, "multiple of group_size"),
    (ck.linear, linear_args, "x", torch.zeros(0, 128), ValueError, r"x has no rows \(M = 0\)"),
    (ck.linear, linear_args, "bias", torch.ones(6, device=META), ValueError, "bias on meta"),
    (ck.linear, linear_args, "gelu_from", 8, ValueError, "gelu_from must be a multiple of 16"),
    (ck.linear, linear_args, "x2", torch.randn(2, 4, 16), ValueError, "x2 must share x's leading dimensions"),
    # pack_int4 / unpack_int4
    (
        ck.pack_int4,
        lambda: {"q": torch.randint(-8, 8, (3, 8), dtype=torch.int8)},
        "q",
        torch.zeros(3, 8),
        TypeError,
        "q must have dtype int8",
    ),
    (
        ck.pack_int4,
        lambda: {"q": torch.randint(-8, 8, (3, 8), dtype=torch.int8)},
        "q",
        torch.zeros(3, 7, dtype=torch.int8),
        ValueError,
        "must be even",
    ),
    (
        ck.pack_int4,
        lambda: {"q": torch.randint(-8, 8, (3, 8), dtype=torch.int8)},
        "q",
        torch.full((3, 8), 8, dtype=torch.int8),
        ValueError,
        "outside",
    ),
    (
        ck.unpack_int4,
        lambda: {"p": torch.zeros(3, 4, dtype=torch.uint8)},
        "p",
        torch.zeros(3, 4, dtype=torch.int8),
        TypeError,
        "p must have dtype uint8",
    ),
    (
        ck.unpack_int4,
        lambda: {"p": torch.zeros(3, 4, dtype=torch.uint8)},
        "p",
        torch.zeros(3, 4, dtype=torch.uint8, device=META),
        ValueError,
        "p is on meta",
    ),
    # layer_norm_modulate and the fused forms
    (ck.layer_norm_modulate, norm_args, "x", torch.randn(4, 64), ValueError, "x must be 3-D"),
    (ck.layer_norm_modulate, norm_args, "x", torch.randn(2, 4, 64).double(), TypeError, "x must have dtype"),
    (ck.layer_norm_modulate, norm_args, "scale", torch.randn(1, 64), ValueError, r"scale must be \[batch, K\]"),
    (ck.layer_norm_modulate, norm_args, "shift", torch.randn(2, 64, device=META), ValueError, "shift on meta"),
    (ck.layer_norm_modulate, norm_args, "x", torch.zeros(2, 0, 64), ValueError, r"x has no rows \(M = 0\)"),
    (ck.layer_norm_modulate, norm_args, "eps", -1.0, ValueError, "eps must be a non-negative number"),
    (
        ck.layer_norm_modulate_rht_quantize,
        fused_norm_args,
        "group_size",
        32,
        ValueError,
        "group_size must be a power of 4",
    ),
    (
        ck.layer_norm_modulate_rht_quantize,
        lambda: fused_norm_args(
            x=torch.randn(2, 4, 80), scale=torch.randn(2, 80), shift=torch.randn(2, 80), group_size=16
        ),
        "group_size",
        64,
        ValueError,
        "multiple of group_size",
    ),
    (ck.layer_norm_modulate_rht_quantize, fused_norm_args, "bits", 5, ValueError, "bits must be 4 or 8"),
    (
        ck.layer_norm_modulate_rht_quantize,
        fused_norm_args,
        "x",
        torch.zeros(2, 0, 64),
        ValueError,
        r"x has no rows \(M = 0\)",
    ),
    (
        ck.residual_layer_norm_modulate_rht_quantize,
        lambda: fused_norm_args(branch=torch.randn(2, 4, 64), gate=torch.randn(2, 64)),
        "gate",
        torch.randn(2, 32),
        ValueError,
        "gate must be",
    ),
    (
        ck.residual_layer_norm_modulate_rht_quantize,
        lambda: fused_norm_args(branch=torch.randn(2, 4, 64), gate=torch.randn(2, 64)),
        "branch",
        torch.randn(2, 4, 64, device=META),
        ValueError,
        "branch must be",
    ),
    # rms_norm_rope
    (ck.rms_norm_rope, rope_args, "x", torch.randn(4, 2, 8), ValueError, "x must be 4-D"),
    (ck.rms_norm_rope, rope_args, "x", torch.randn(1, 4, 2, 8).double(), TypeError, "x must have dtype"),
    (ck.rms_norm_rope, rope_args, "weight", torch.ones(4), ValueError, r"weight must be \[8\]"),
    (ck.rms_norm_rope, rope_args, "cos", torch.ones(3, 8), ValueError, r"cos must be float32 \[tokens, head_dim\]"),
    (ck.rms_norm_rope, rope_args, "sin", torch.zeros(4, 8, device=META), ValueError, "sin on meta"),
    (ck.rms_norm_rope, rope_args, "x", torch.zeros(1, 0, 2, 8), ValueError, r"cos must be float32"),
    (
        ck.rms_norm_rope,
        lambda: {"x": torch.randn(1, 4, 2, 8)},
        "x",
        torch.zeros(0, 4, 2, 8),
        ValueError,
        r"x has no rows \(M = 0\)",
    ),
]


def case_id(case) -> str:
    op, _, name, _, _, message = case
    return f"{op.__name__}-{name}-{message[:24]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_each_bad_argument_is_named(case):
    op, make_args, name, bad, error, message = case
    args = make_args()
    op(**args)  # the valid call works
    with pytest.raises(error, match=message):
        op(**{**args, name: bad})


def test_forcing_an_unknown_gemm_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel must be one of small_m, sm90_persistent, sm90, simt; got 'fastest'"):
        with ck.forced_gemm_kernel("fastest"):
            pass
    with pytest.raises(ValueError, match="sm90_tile_n must be 128 or 256"):
        with ck.forced_gemm_kernel("sm90", sm90_tile_n=64):
            pass
