"""One-off kernel questions, one registered case each; one GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_kernels.py CASE [CASE ...]
    python packages/convrot-kernels/benchmarks/bench_kernels.py --list

Every case prints a Markdown table. Timing is bench_primitives.time_per_call (CUDA-graph replays of
calls on distinct inputs, cycled past twice the L2; median), except "eager-calls", which times single
eager calls between CUDA events, Python included. Inputs are random bf16 on Flux.1 shapes. A GEMM kernel
is forced only through ``forced_gemm_kernel``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from bench_primitives import copies_for, time_per_call
from torch.nn import functional as F

import convrot_kernels as ck

WIDTH, TEXT, IMAGE = 3072, 512, 4096  # Flux.1's hidden size and 1024x1024 token counts
HEADS, HEAD_DIM = 24, 128


@contextlib.contextmanager
def forced_gemm_kernel(kernel: str | None = None, tile_n: int | None = None):
    """Runs the body with gemm's kernel forced (None: the dispatcher's choice)."""
    if kernel is None:
        yield
        return
    with ck.forced_gemm_kernel(kernel, sm90_tile_n=tile_n or 256):
        yield


def bf16(*shape) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def table(header: str, aligns: str) -> None:
    print(header)
    print("| " + " | ".join("---" if a == "l" else "---:" for a in aligns) + " |")


# -- fused inputs: rht_quantize(x, x2=, gelu_from=) -------------------------------------------------------


def materialised(x: torch.Tensor, x2: torch.Tensor | None, gelu_from: int) -> torch.Tensor:
    row = x if x2 is None else torch.cat([x, x2], dim=1)
    return torch.cat([row[:, :gelu_from], F.gelu(row[:, gelu_from:], approximate="tanh")], dim=1)


def fused_inputs() -> None:
    """rht_quantize(x, x2=, gelu_from=) against rht_quantize of the row torch's GELU (and cat) materialises,
    and a bf16 clone of the row; last column: the fraction of code bytes equal to the materialised row's."""
    shapes = (  # (what, M, width of x, width of x2, gelu_from)
        ("Flux single-block proj_out", 4608, 3072, 12288, 3072),
        ("Flux feed-forward out, image", 4096, 12288, 0, 0),
        ("Flux feed-forward out, text", 512, 12288, 0, 0),
        ("Flux single-block proj_out, batch 4", 4 * 4608, 3072, 12288, 3072),
    )
    table(
        "| shape | M | row width | fused (us) | plain (us) | torch + plain (us) | clone (us) | fused / plain |"
        " code bytes equal |",
        "lrrrrrrrr",
    )
    for what, m, k1, k2, gelu_from in shapes:
        k = k1 + k2
        sets = [(bf16(m, k1), bf16(m, k2) if k2 else None, bf16(m, k)) for _ in range(copies_for(m * k * 2))]

        def fused(x, x2, row, gelu_from=gelu_from):
            ck.rht_quantize(x, 256, 4, x2=x2, gelu_from=gelu_from)

        def plain(x, x2, row):
            ck.rht_quantize(row, 256, 4)

        def torch_then_plain(x, x2, row, gelu_from=gelu_from):
            ck.rht_quantize(materialised(x, x2, gelu_from), 256, 4)

        def clone(x, x2, row):
            row.clone()

        us = {fn.__name__: time_per_call(fn, sets) for fn in (fused, plain, torch_then_plain, clone)}
        x, x2, _ = sets[0]
        expected, _ = ck.rht_quantize(materialised(x, x2, gelu_from), 256, 4)
        got, _ = ck.rht_quantize(x, 256, 4, x2=x2, gelu_from=gelu_from)
        equal = (got == expected).float().mean().item()
        print(
            f"| {what} | {m} | {k} | {us['fused']:.1f} | {us['plain']:.1f} | {us['torch_then_plain']:.1f} | "
            f"{us['clone']:.1f} | {us['fused'] / us['plain']:.2f} | {equal:.6f} |"
        )


# -- rms_norm_rope ------------------------------------------------------------------------------------------


def eager_rms_norm_rope(q, weight, cos, sin):
    """torch.nn.RMSNorm, then diffusers' apply_rotary_emb (use_real_unbind_dim=-1), as eager Flux runs them."""
    h = F.rms_norm(q, (q.shape[-1],), weight, 1e-6)
    real, imag = h.reshape(*h.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (h.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(h.dtype)


def rms_norm_rope() -> None:
    """rms_norm_rope against the eager and compiled torch code it replaces and a clone of q (a strided view
    of a fused qkv projection's output, 24 heads of 128); last column: elements equal to eager's."""
    compiled = torch.compile(eager_rms_norm_rope, fullgraph=True, dynamic=False)
    shapes = (  # (what, batch, tokens)
        ("Flux image q, batch 1", 1, 4096),
        ("Flux joint q (single block), batch 1", 1, 4608),
        ("Flux joint q (single block), batch 4", 4, 4608),
    )
    table(
        "| q of | ours (us) | eager (us) | compiled (us) | clone (us) | eager / ours | compiled / ours |"
        " elements equal to eager |",
        "lrrrrrrr",
    )
    for what, batch, tokens in shapes:
        width = HEADS * HEAD_DIM
        weight = (torch.randn(HEAD_DIM, device="cuda") * 0.5 + 1).bfloat16()
        angles = torch.rand(tokens, HEAD_DIM // 2, device="cuda") * tokens
        cos, sin = angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)
        sets = []
        for _ in range(copies_for(batch * tokens * width * 2 * 2)):
            q = bf16(batch, tokens, 3 * width).chunk(3, dim=-1)[0].unflatten(-1, (HEADS, HEAD_DIM))
            sets.append((q, torch.empty(batch, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)))

        def ours(q, out, weight=weight, cos=cos, sin=sin):
            ck.rms_norm_rope(q, weight, cos, sin)

        def torch_eager(q, out, weight=weight, cos=cos, sin=sin):
            eager_rms_norm_rope(q, weight, cos, sin)

        def torch_compiled(q, out, weight=weight, cos=cos, sin=sin):
            compiled(q, weight, cos, sin)

        def clone(q, out):
            out.copy_(q)

        us = {fn.__name__: time_per_call(fn, sets) for fn in (ours, torch_eager, torch_compiled, clone)}
        q = sets[0][0]
        equal = (ck.rms_norm_rope(q, weight, cos, sin) == eager_rms_norm_rope(q, weight, cos, sin)).float().mean()
        print(
            f"| {what} | {us['ours']:.1f} | {us['torch_eager']:.1f} | {us['torch_compiled']:.1f} | "
            f"{us['clone']:.1f} | {us['torch_eager'] / us['ours']:.2f} | {us['torch_compiled'] / us['ours']:.2f} | "
            f"{equal.item():.6f} |"
        )


# -- the Flux blocks' norms ---------------------------------------------------------------------------------


def modulation_sets(batch: int):
    """(text, image, scale, shift, joint) input sets of a Flux single block's input norm."""
    sets = []
    for _ in range(copies_for(batch * (TEXT + IMAGE) * WIDTH * 2 * 2)):
        text, image = bf16(batch, TEXT, WIDTH), bf16(batch, IMAGE, WIDTH) * 3 + 1
        shift, scale, _ = (torch.randn(batch, 3 * WIDTH, device="cuda") * 0.5).bfloat16().chunk(3, dim=1)
        sets.append((text, image, scale, shift, torch.cat([text, image], dim=1)))
    return sets


def eager_joint_norm(text, image, scale, shift):
    """What diffusers' Flux single block runs: the concatenation, then AdaLayerNormZeroSingle's formula."""
    joint = torch.cat([text, image], dim=1)
    return F.layer_norm(joint, (joint.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


@torch.inference_mode()
def layer_norm_modulate() -> None:
    """layer_norm_modulate of a single block's text and image parts against the eager and compiled torch
    norm of their concatenation and the concatenation alone; last column: elements equal to eager's."""
    compiled = torch.compile(eager_joint_norm, fullgraph=True, dynamic=False)
    table(
        "| joint rows | ours (us) | eager (us) | compiled (us) | cat (us) | eager / ours | compiled / ours |"
        " elements equal to eager |",
        "lrrrrrrr",
    )
    for batch in (1, 4):
        sets = modulation_sets(batch)

        def ours(text, image, scale, shift, out):
            ck.layer_norm_modulate(image, scale, shift, prefix=text)

        def torch_eager(text, image, scale, shift, out):
            eager_joint_norm(text, image, scale, shift)

        def torch_compiled(text, image, scale, shift, out):
            compiled(text, image, scale, shift)

        def cat(text, image, scale, shift, out):
            torch.cat([text, image], dim=1, out=out)

        us = {fn.__name__: time_per_call(fn, sets) for fn in (ours, torch_eager, torch_compiled, cat)}
        text, image, scale, shift, _ = sets[0]
        got = ck.layer_norm_modulate(image, scale, shift, prefix=text)
        equal = (got == eager_joint_norm(text, image, scale, shift)).float().mean().item()
        print(
            f"| {batch} x {TEXT + IMAGE} x {WIDTH} | {us['ours']:.1f} | {us['torch_eager']:.1f} | "
            f"{us['torch_compiled']:.1f} | {us['cat']:.1f} | {us['torch_eager'] / us['ours']:.2f} | "
            f"{us['torch_compiled'] / us['ours']:.2f} | {equal:.6f} |"
        )


@torch.inference_mode()
def normed_quantize() -> None:
    """layer_norm_modulate_rht_quantize against the norm and rht_quantize as two calls (codes equal?), and
    residual_layer_norm_modulate_rht_quantize against the residual sum, then the fused norm."""
    table(
        "| joint rows | fused (us) | two calls (us) | rht_quantize alone (us) | two calls / fused | codes equal |",
        "lrrrrl",
    )
    for batch in (1, 4):
        sets = modulation_sets(batch)

        def fused(text, image, scale, shift, out):
            ck.layer_norm_modulate_rht_quantize(image, scale, shift, prefix=text)

        def two_calls(text, image, scale, shift, out):
            ck.rht_quantize(ck.layer_norm_modulate(image, scale, shift, prefix=text).flatten(0, 1))

        def rht_quantize(text, image, scale, shift, joint):
            ck.rht_quantize(joint.flatten(0, 1))

        us = {fn.__name__: time_per_call(fn, sets) for fn in (fused, two_calls, rht_quantize)}
        text, image, scale, shift, _ = sets[0]
        got = ck.layer_norm_modulate_rht_quantize(image, scale, shift, prefix=text)
        expected = ck.rht_quantize(ck.layer_norm_modulate(image, scale, shift, prefix=text).flatten(0, 1))
        equal = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        print(
            f"| {batch} x {TEXT + IMAGE} x {WIDTH} | {us['fused']:.1f} | {us['two_calls']:.1f} | "
            f"{us['rht_quantize']:.1f} | {us['two_calls'] / us['fused']:.2f} | {equal} |"
        )
    table("| image rows | residual fused (us) | sum, then fused norm (us) | ratio | outputs equal |", "lrrrl")
    for batch in (1, 4):
        sets = []
        for _ in range(copies_for(batch * IMAGE * WIDTH * 2 * 3)):
            chunks = (torch.randn(batch, 6 * WIDTH, device="cuda") * 0.5).bfloat16().chunk(6, dim=1)
            x, branch = bf16(batch, IMAGE, WIDTH) * 3 + 1, bf16(batch, IMAGE, WIDTH)
            sets.append((x, branch, chunks[2], chunks[4], chunks[3]))

        def residual_fused(x, branch, gate, scale, shift):
            ck.residual_layer_norm_modulate_rht_quantize(x, branch, gate, scale, shift)

        def sum_then_fused(x, branch, gate, scale, shift):
            ck.layer_norm_modulate_rht_quantize(x + gate[:, None] * branch, scale, shift)

        us = {fn.__name__: time_per_call(fn, sets) for fn in (residual_fused, sum_then_fused)}
        x, branch, gate, scale, shift = sets[0]
        got = ck.residual_layer_norm_modulate_rht_quantize(x, branch, gate, scale, shift)
        total = x + gate[:, None] * branch
        expected = (total, *ck.layer_norm_modulate_rht_quantize(total, scale, shift))
        equal = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        ratio = us["sum_then_fused"] / us["residual_fused"]
        print(
            f"| {batch} x {IMAGE} x {WIDTH} | {us['residual_fused']:.1f} | {us['sum_then_fused']:.1f} | "
            f"{ratio:.2f} | {equal} |"
        )


# -- GEMM ---------------------------------------------------------------------------------------------------


def operand(rows: int, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random codes [rows, K] of a GEMM operand and its per-row scales."""
    width, dtype = (k // 2, torch.uint8) if bits == 4 else (k, torch.int8)
    return torch.randint(-128, 128, (rows, width), device="cuda").to(dtype), torch.rand(rows, device="cuda")


def gemm_call(qa, sa, qw, sw, bias, bits=4):
    ck.gemm(qa, sa, qw, sw, bias, bits=bits)


def gemm_k_sweep() -> None:
    """gemm(bits=4/8) at M = 4608 over K (the dispatcher's kernel, uniform random codes, bias): us, TOPS and
    the time per wave of 256 x 144 tiles, whose line against K / 128 gives the main loop's cost per K-slice
    (slope) and the fixed cost per tile (intercept)."""
    m, sms = 4608, torch.cuda.get_device_properties(0).multi_processor_count
    table("| bits | K | N | us | TOPS | us per tile wave |", "rrrrrr")
    for bits in (4, 8):
        for n, k in ((3072, 768), (3072, 1536), (3072, 3072), (3072, 6144), (3072, 12288), (12288, 3072)):
            per_set = m * k * bits // 8 + n * k * bits // 8 + m * n * 2
            sets = [
                (*operand(m, k, bits), *operand(n, k, bits), torch.rand(n, device="cuda"))
                for _ in range(copies_for(per_set))
            ]
            us = time_per_call(partial(gemm_call, bits=bits), sets)
            waves = (m // 256) * -(-n // 144) / sms
            print(f"| {bits} | {k} | {n} | {us:.1f} | {2 * m * n * k / us / 1e6:.0f} | {us / waves:.2f} |")


def gemm_text_stream() -> None:
    """gemm(bits=4) at the text stream's M (512; 1024 for comparison) against bf16 F.linear, with the
    dispatcher's kernel and the sm90 kernel forced at both tile widths; Flux's text-stream shapes."""
    shapes = ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072))  # (K, N)
    kernels = {"auto": (None, None), "sm90 n128": ("sm90", 128), "sm90 n256": ("sm90", None)}
    table("| kernel | M | K | N | gemm4 (us) | bf16 (us) | x bf16 |", "lrrrrrr")
    for label, (kernel, tile_n) in kernels.items():
        for m in (512, 1024):
            for k, n in shapes:
                x = [bf16(m, k) for _ in range(8)]
                w = [bf16(n, k) / k**0.5 for _ in range(8)]
                bias = torch.randn(n, device="cuda")
                ours_sets = [
                    (*ck.rht_quantize(a, 256, 4), *ck.rht_quantize(b, 256, 4), bias) for a, b in zip(x, w, strict=True)
                ]
                with forced_gemm_kernel(kernel, tile_n):
                    ours = time_per_call(gemm_call, ours_sets, replays=50)
                linear_sets = [(a, b, bias.bfloat16()) for a, b in zip(x, w, strict=True)]
                linear = time_per_call(F.linear, linear_sets, replays=50)
                print(f"| {label} | {m} | {k} | {n} | {ours:.1f} | {linear:.1f} | {linear / ours:.2f} |")


def median_eager_us(call, n: int = 50) -> float:
    for _ in range(5):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[n // 2]


def eager_calls() -> None:
    """Single eager calls, Python included, at M = 128 and 256: gemm(bits=4) through the dispatcher and with
    the persistent kernel forced, against bf16 F.linear. At these sizes the host cost of a call bounds them."""
    torch.manual_seed(0)
    table("| M | K | N | auto (us) | persistent (us) | bf16 linear (us) |", "rrrrrr")
    for m in (128, 256):
        for k, n in ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)):
            x, w = bf16(m, k), bf16(n, k)
            call = partial(ck.gemm, *ck.rht_quantize(x), *ck.rht_quantize(w))
            auto = median_eager_us(call)
            with forced_gemm_kernel("sm90_persistent"):
                persistent = median_eager_us(call)
            linear = median_eager_us(partial(F.linear, x, w))
            print(f"| {m} | {k} | {n} | {auto:.1f} | {persistent:.1f} | {linear:.1f} |")


def gemm_operands(m: int, k: int, n: int, bits: int) -> tuple:
    """gemm's operands for random bf16 activations and weights, with a bias."""
    activations = ck.rht_quantize(bf16(m, k), 256, bits)
    return (*activations, *ck.rht_quantize(bf16(n, k), 256, bits), torch.randn(n, device="cuda"))


def speed_check() -> None:
    """The dispatcher's gemm(bits=4 / 8) on Flux.1's shapes at M = 4608, 16 and 1, and rht_quantize(bits=4) of
    4608 rows at Flux's widths: public calls only, so that one run times two builds (before and after a change
    of the op layer) with the same code. Writes speed_check.json to $OUT where that is set."""
    results = {}
    table("| case | M | K | N | us |", "lrrrr")
    for m in (4608, 16, 1):
        for k, n in ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)):
            for bits in (4, 8):
                one = gemm_operands(m, k, n, bits)
                per_set = sum(t.numel() * t.element_size() for t in one)
                sets = [one] + [gemm_operands(m, k, n, bits) for _ in range(copies_for(per_set) - 1)]
                us = time_per_call(partial(gemm_call, bits=bits), sets)
                results[f"gemm{bits} M={m} K={k} N={n}"] = us
                print(f"| gemm{bits} | {m} | {k} | {n} | {us:.2f} |")
    for k in (3072, 12288, 15360):
        sets = [(bf16(4608, k),) for _ in range(copies_for(4608 * k * 2))]
        us = time_per_call(lambda x: ck.rht_quantize(x, 256, 4), sets)
        results[f"rht_quantize M=4608 K={k}"] = us
        print(f"| rht_quantize | 4608 | {k} | | {us:.2f} |")
    if out := os.environ.get("OUT"):
        with open(os.path.join(out, f"speed_check_{os.environ.get('SPEED_CHECK_LABEL', 'run')}.json"), "w") as f:
            json.dump(results, f, indent=1)


# -- attention_8bit ----------------------------------------------------------------------------------------


def attention_8bit() -> None:
    """attention_8bit (pre-pass + sm_90a kernel) against torch's bf16 scaled_dot_product_attention with the
    flash and the cuDNN backends, on Flux.1's joint attention (24 heads of 128, 4096 + 512 tokens, batch 1
    and 4) and Wan 2.1 14B's self-attention at 480p, 81 frames (40 heads of 128, 32760 tokens), q/k/v
    [B, N, H, D] as diffusers holds them (SDPA reads the [B, H, N, D] transposed views); TFLOP/s count
    4 B H N^2 D; last column: max |ours - flash| / max |flash|."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table(
        "| shape | batch | ours (us) | pre-pass alone (us) | flash bf16 (us) | cuDNN bf16 (us) | ours TFLOP/s |"
        " flash / ours | cuDNN / ours | rel. max diff |",
        "lrrrrrrrrr",
    )
    for name, batch, tokens, heads in (
        ("Flux.1", 1, TEXT + IMAGE, HEADS),
        ("Flux.1", 4, TEXT + IMAGE, HEADS),
        ("Wan 2.1 480p", 1, 32760, 40),
    ):
        shape = (batch, tokens, heads, HEAD_DIM)
        sets = [
            tuple(bf16(*shape) for _ in range(3)) for _ in range(copies_for(3 * 2 * batch * tokens * heads * HEAD_DIM))
        ]

        def ours(q, k, v):
            ck.attention_8bit(q, k, v)

        def prepass(q, k, v):
            ck.attention_8bit_prepass(q, k, v)

        def sdpa(backend, q, k, v):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        flash = partial(sdpa, SDPBackend.FLASH_ATTENTION)
        cudnn = partial(sdpa, SDPBackend.CUDNN_ATTENTION)
        us = {name: time_per_call(fn, sets) for name, fn in (("ours", ours), ("prepass", prepass), ("flash", flash))}
        try:
            us["cudnn"] = time_per_call(cudnn, sets)
        except RuntimeError:  # no cuDNN attention in this torch build or on this GPU
            us["cudnn"] = float("nan")
        q, k, v = sets[0]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        expected = expected.transpose(1, 2).float()
        diff = (ck.attention_8bit(q, k, v).float() - expected).abs().max() / expected.abs().max()
        tflops = 4 * batch * heads * tokens**2 * HEAD_DIM / (us["ours"] * 1e-6) / 1e12
        print(
            f"| {name} | {batch} | {us['ours']:.1f} | {us['prepass']:.1f} | {us['flash']:.1f} | {us['cudnn']:.1f} | "
            f"{tflops:.0f} | {us['flash'] / us['ours']:.2f} | {us['cudnn'] / us['ours']:.2f} | {diff.item():.4f} |"
        )


@dataclass(frozen=True)
class Case:
    run: Callable[[], None]

    @property
    def question(self) -> str:
        return " ".join((self.run.__doc__ or "").split())


CASES = {
    "fused-inputs": Case(fused_inputs),
    "rms-norm-rope": Case(rms_norm_rope),
    "layer-norm-modulate": Case(layer_norm_modulate),
    "normed-quantize": Case(normed_quantize),
    "gemm-k-sweep": Case(gemm_k_sweep),
    "gemm-text-stream": Case(gemm_text_stream),
    "eager-calls": Case(eager_calls),
    "speed-check": Case(speed_check),
    "attention-8bit": Case(attention_8bit),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"one or more of: {', '.join(CASES)}")
    parser.add_argument("--list", action="store_true", help="print each case and the question it answers")
    args = parser.parse_args(argv)
    if args.list or not args.cases:
        for name, case in CASES.items():
            print(f"{name}: {case.question}")
        return
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if not torch.cuda.is_available():
        parser.error("these cases time CUDA kernels: no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for name in args.cases:
        print(f"\n## {name}\n")
        CASES[name].run()


if __name__ == "__main__":
    main()
