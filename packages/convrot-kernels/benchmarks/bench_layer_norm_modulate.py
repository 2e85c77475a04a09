"""layer_norm_modulate against the torch code it replaces, on Flux single blocks' input norm. One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_layer_norm_modulate.py

bf16, width 3072, the joint sequence of 512 text and 4096 image tokens, the modulation
vectors chunks of one AdaLN embedding (as diffusers passes them). Per shape, median
microseconds per call (bench_primitives.time_per_call: CUDA-graph replays, inputs cycled
past twice the L2) of:
- ours: layer_norm_modulate(image, scale, shift, prefix=text);
- eager: torch.cat, then AdaLayerNormZeroSingle's norm and modulation in torch ops;
- compiled: the same through torch.compile (inductor's fused kernel, what a compiled step runs);
- clone: a contiguous copy of the joint sequence (its bytes read and written: the floor).
Last column: the fraction of output elements equal to eager's.
"""

from __future__ import annotations

import torch
from bench_primitives import copies_for, time_per_call
from torch.nn import functional as F

import convrot_kernels as ck

WIDTH, TEXT, IMAGE = 3072, 512, 4096
BATCHES = (1, 4)


def eager(text, image, scale, shift):
    """What diffusers' Flux single block runs: the concatenation, then AdaLayerNormZeroSingle's formula."""
    joint = torch.cat([text, image], dim=1)
    return F.layer_norm(joint, (joint.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


compiled = torch.compile(eager, fullgraph=True, dynamic=False)


def bench(batch: int) -> None:
    sets = []
    for _ in range(copies_for(batch * (TEXT + IMAGE) * WIDTH * 2 * 2)):
        text = torch.randn(batch, TEXT, WIDTH, device="cuda", dtype=torch.bfloat16)
        image = torch.randn(batch, IMAGE, WIDTH, device="cuda", dtype=torch.bfloat16) * 3 + 1
        shift, scale, _ = (torch.randn(batch, 3 * WIDTH, device="cuda") * 0.5).bfloat16().chunk(3, dim=1)
        sets.append((text, image, scale, shift, torch.empty(batch, TEXT + IMAGE, WIDTH, device="cuda").bfloat16()))

    def ours(text, image, scale, shift, out):
        ck.layer_norm_modulate(image, scale, shift, prefix=text)

    def torch_eager(text, image, scale, shift, out):
        eager(text, image, scale, shift)

    def torch_compiled(text, image, scale, shift, out):
        compiled(text, image, scale, shift)

    def clone(text, image, scale, shift, out):
        torch.cat([text, image], dim=1, out=out)

    us = {fn.__name__: time_per_call(fn, sets) for fn in (ours, torch_eager, torch_compiled, clone)}
    text, image, scale, shift, _ = sets[0]
    ours_out = ck.layer_norm_modulate(image, scale, shift, prefix=text)
    equal = (ours_out == eager(text, image, scale, shift)).float().mean().item()
    print(
        f"| {batch} x {TEXT + IMAGE} x {WIDTH} | {us['ours']:.1f} | {us['torch_eager']:.1f} | "
        f"{us['torch_compiled']:.1f} | {us['clone']:.1f} | {us['torch_eager'] / us['ours']:.2f} | "
        f"{us['torch_compiled'] / us['ours']:.2f} | {equal:.6f} |"
    )


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "| joint rows | ours (us) | eager (us) | compiled (us) | clone (us) | eager / ours | compiled / ours |"
        " elements equal to eager |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for batch in BATCHES:
            bench(batch)


if __name__ == "__main__":
    main()
