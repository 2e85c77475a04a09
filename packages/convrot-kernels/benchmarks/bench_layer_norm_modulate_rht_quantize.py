"""layer_norm_modulate_rht_quantize against the two calls it fuses, on Flux single blocks' input. One GPU, one run.

    python packages/convrot-kernels/benchmarks/bench_layer_norm_modulate_rht_quantize.py

bf16, width 3072, the joint sequence of 512 text and 4096 image tokens, the modulation vectors
chunks of one AdaLN embedding (as diffusers passes them), group 256, 4-bit. Per shape, median
microseconds per call (bench_primitives.time_per_call: CUDA-graph replays, inputs cycled past
twice the L2) of:
- fused: layer_norm_modulate_rht_quantize(image, scale, shift, prefix=text);
- two calls: layer_norm_modulate(image, scale, shift, prefix=text), then rht_quantize of its rows;
- rht_quantize: of a contiguous joint sequence alone (the row engine without the norm);
- clone: a contiguous copy of the joint sequence (its bytes read and written).
Last column: whether the fused codes and scales equal the two calls' (they must).

A second table times residual_layer_norm_modulate_rht_quantize on a Flux double block's image
stream (4096 tokens; the gated residual x + gate * branch, its norm, rotation and quantization)
against torch's x + gate[:, None] * branch followed by layer_norm_modulate_rht_quantize.
"""

from __future__ import annotations

import torch
from bench_primitives import copies_for, time_per_call

import convrot_kernels as ck

WIDTH, TEXT, IMAGE = 3072, 512, 4096
BATCHES = (1, 4)


def bench(batch: int) -> None:
    sets = []
    for _ in range(copies_for(batch * (TEXT + IMAGE) * WIDTH * 2 * 2)):
        text = torch.randn(batch, TEXT, WIDTH, device="cuda", dtype=torch.bfloat16)
        image = torch.randn(batch, IMAGE, WIDTH, device="cuda", dtype=torch.bfloat16) * 3 + 1
        shift, scale, _ = (torch.randn(batch, 3 * WIDTH, device="cuda") * 0.5).bfloat16().chunk(3, dim=1)
        joint = torch.cat([text, image], dim=1)
        sets.append((text, image, scale, shift, joint, torch.empty_like(joint)))

    def fused(text, image, scale, shift, joint, out):
        ck.layer_norm_modulate_rht_quantize(image, scale, shift, prefix=text)

    def two_calls(text, image, scale, shift, joint, out):
        ck.rht_quantize(ck.layer_norm_modulate(image, scale, shift, prefix=text).flatten(0, 1))

    def rht_quantize(text, image, scale, shift, joint, out):
        ck.rht_quantize(joint.flatten(0, 1))

    def clone(text, image, scale, shift, joint, out):
        out.copy_(joint)

    us = {fn.__name__: time_per_call(fn, sets) for fn in (fused, two_calls, rht_quantize, clone)}
    text, image, scale, shift, _, _ = sets[0]
    got = ck.layer_norm_modulate_rht_quantize(image, scale, shift, prefix=text)
    expected = ck.rht_quantize(ck.layer_norm_modulate(image, scale, shift, prefix=text).flatten(0, 1))
    equal = torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    print(
        f"| {batch} x {TEXT + IMAGE} x {WIDTH} | {us['fused']:.1f} | {us['two_calls']:.1f} | "
        f"{us['rht_quantize']:.1f} | {us['clone']:.1f} | {us['two_calls'] / us['fused']:.2f} | {equal} |"
    )


def bench_residual(batch: int) -> None:
    sets = []
    for _ in range(copies_for(batch * IMAGE * WIDTH * 2 * 3)):
        x = torch.randn(batch, IMAGE, WIDTH, device="cuda", dtype=torch.bfloat16) * 3 + 1
        branch = torch.randn(batch, IMAGE, WIDTH, device="cuda", dtype=torch.bfloat16)
        chunks = (torch.randn(batch, 6 * WIDTH, device="cuda") * 0.5).bfloat16().chunk(6, dim=1)
        sets.append((x, branch, chunks[2], chunks[4], chunks[3]))

    def fused(x, branch, gate, scale, shift):
        ck.residual_layer_norm_modulate_rht_quantize(x, branch, gate, scale, shift)

    def two_calls(x, branch, gate, scale, shift):
        ck.layer_norm_modulate_rht_quantize(x + gate[:, None] * branch, scale, shift)

    us = {fn.__name__: time_per_call(fn, sets) for fn in (fused, two_calls)}
    x, branch, gate, scale, shift = sets[0]
    got = ck.residual_layer_norm_modulate_rht_quantize(x, branch, gate, scale, shift)
    total = x + gate[:, None] * branch
    expected = (total, *ck.layer_norm_modulate_rht_quantize(total, scale, shift))
    equal = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    print(
        f"| {batch} x {IMAGE} x {WIDTH} | {us['fused']:.1f} | {us['two_calls']:.1f} | "
        f"{us['two_calls'] / us['fused']:.2f} | {equal} |"
    )


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "| joint rows | fused (us) | two calls (us) | rht_quantize alone (us) | clone (us) | two calls / fused |"
        " codes equal |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    with torch.inference_mode():
        for batch in BATCHES:
            bench(batch)
        print("| image rows | residual fused (us) | sum, then fused norm (us) | ratio | outputs equal |")
        print("| --- | ---: | ---: | ---: | --- |")
        for batch in BATCHES:
            bench_residual(batch)


if __name__ == "__main__":
    main()
