"""rms_norm_rope against the torch code it replaces, on Flux's q/k shapes. One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_rms_norm_rope.py

bf16, 24 heads of 128, q a strided view of a fused qkv projection's output, as
Flux attention sees it. Per shape, median microseconds per call
(bench_primitives.time_per_call: CUDA-graph replays, inputs cycled past twice
the L2) of:
- ours: rms_norm_rope_into(q, out, weight, cos, sin);
- eager: torch.nn.functional.rms_norm, then diffusers' apply_rotary_emb formula
  (what an eager Flux step runs for each of q and k);
- compiled: the same function through torch.compile (inductor's fused kernel);
- clone: a contiguous copy of q (the same bytes read and written: the floor).
Last column: the fraction of output elements equal to eager's.
"""

from __future__ import annotations

import torch
from bench_primitives import copies_for, time_per_call
from torch.nn import functional as F

import convrot_kernels as ck

HEADS, HEAD_DIM = 24, 128
# (what, batch, tokens)
SHAPES = (
    ("Flux image q, batch 1", 1, 4096),
    ("Flux joint q (single block), batch 1", 1, 4608),
    ("Flux joint q (single block), batch 4", 4, 4608),
)


def eager(q, weight, cos, sin):
    """torch.nn.RMSNorm, then diffusers' apply_rotary_emb (use_real_unbind_dim=-1), as eager Flux runs them."""
    h = F.rms_norm(q, (q.shape[-1],), weight, 1e-6)
    real, imag = h.reshape(*h.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (h.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(h.dtype)


compiled = torch.compile(eager, fullgraph=True, dynamic=False)


def bench(what: str, batch: int, tokens: int) -> None:
    width = HEADS * HEAD_DIM
    weight = (torch.randn(HEAD_DIM, device="cuda") * 0.5 + 1).bfloat16()
    angles = torch.rand(tokens, HEAD_DIM // 2, device="cuda") * tokens
    cos = angles.cos().repeat_interleave(2, dim=1)
    sin = angles.sin().repeat_interleave(2, dim=1)
    sets = []
    for _ in range(copies_for(batch * tokens * width * 2 * 2)):
        qkv = torch.randn(batch, tokens, 3 * width, device="cuda", dtype=torch.bfloat16)
        q = qkv.chunk(3, dim=-1)[0].unflatten(-1, (HEADS, HEAD_DIM))
        sets.append((q, torch.empty(batch, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)))

    def ours(q, out):
        ck.rms_norm_rope_into(q, out, weight, cos, sin)

    def torch_eager(q, out):
        eager(q, weight, cos, sin)

    def torch_compiled(q, out):
        compiled(q, weight, cos, sin)

    def clone(q, out):
        out.copy_(q)

    us = {fn.__name__: time_per_call(fn, sets) for fn in (ours, torch_eager, torch_compiled, clone)}
    q = sets[0][0]
    equal = (ck.rms_norm_rope(q, weight, cos, sin) == eager(q, weight, cos, sin)).float().mean().item()
    print(
        f"| {what} | {us['ours']:.1f} | {us['torch_eager']:.1f} | {us['torch_compiled']:.1f} | {us['clone']:.1f} | "
        f"{us['torch_eager'] / us['ours']:.2f} | {us['torch_compiled'] / us['ours']:.2f} | {equal:.6f} |"
    )


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "| q of | ours (us) | eager (us) | compiled (us) | clone (us) | eager / ours | compiled / ours |"
        " elements equal to eager |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in SHAPES:
        bench(*shape)


if __name__ == "__main__":
    main()
