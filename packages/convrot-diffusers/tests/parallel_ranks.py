"""What each rank of a two-process group does for test_parallel.py (gloo, CPU) and test_parallel_gpu.py
(NCCL, cuda:RANK); the spawned processes import it by name.

One group does every two-rank check, so that a run pays for starting the processes once:
- data parallel: each rank loads the 4-bit checkpoint, makes its share of the prompts, rank 0 gathers;
  rank 0 then makes every image alone, in this process, as the one-process reference;
- the same through ``convrot generate``, which finds the group's environment (as under torchrun);
- context parallel: a ConvRot Flux transformer with every fusion, fused before and after
  enable_parallelism, against the same transformer in this process alone; Ulysses 2 with diffusers'
  native attention (on the CPU through gloo's all_to_all), and on GPUs ring 2 with "_native_flash"
  (ring needs the attention's log-sum-exp, which no CPU backend of diffusers returns); and the tiny
  Flux.2, Qwen-Image and Wan transformers of tiny_dits.py, quantized through the generic policy,
  under Ulysses 2.
Rank 0 writes what it found to ``out_dir`` (torch.save); a failure on any rank is raised there.
"""

from __future__ import annotations

import os
import socket

import torch

PROMPTS = ("a red fox", "a lighthouse at dusk", "a bowl of pears")
# What `convrot generate --steps 2 --height 32 --width 32` runs on the demo (its max_sequence_length and guidance).
CALL = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 64, "guidance_scale": 3.5}
CLI_OPTIONS = ["--steps", "2", "--height", "32", "--width", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flux_inputs(config, seed: int, side: int = 4, text: int = 6) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = side * side
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(side).repeat_interleave(side)
    ids[:, 2] = torch.arange(side).repeat(side)
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator).bfloat16(),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator).bfloat16(),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator).bfloat16(),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(text, 3),
    }


def _forward(transformer, inputs) -> torch.Tensor:
    device = next(transformer.parameters()).device
    with torch.no_grad():
        return transformer(**{k: v.to(device) for k, v in inputs.items()}, return_dict=False)[0].float().cpu()


def _fuse_all(transformer) -> None:
    import convrot_diffusers

    assert convrot_diffusers.fuse_qkv_projections(transformer) > 0
    assert convrot_diffusers.fuse_activations(transformer) > 0
    assert convrot_diffusers.fuse_qk_norm_rope(transformer) > 0


def _context_parallel(saved: str, seed: int, device, mode: str, fuse_first: bool) -> tuple[torch.Tensor, ...]:
    """(output in this process alone, output under ``mode`` of degree 2) of the saved transformer with
    every fusion, fused before enable_parallelism or after it."""
    from convrot_diffusers import load_quantized, parallel

    backend = {"ulysses": "native", "ring": "_native_flash"}[mode]
    alone = load_quantized(saved, device=device)
    alone.set_attention_backend(backend)
    inputs = flux_inputs(alone.config, seed)
    _fuse_all(alone)
    sharded = load_quantized(saved, device=device)
    sharded.set_attention_backend(backend)
    if fuse_first:
        _fuse_all(sharded)
    parallel.enable_context_parallel(sharded, **{f"{mode}_degree": 2})
    if not fuse_first:
        _fuse_all(sharded)
    return _forward(alone, inputs), _forward(sharded, inputs)


# LTX-2 is left out: with these inputs diffusers 0.42.1's LTX-2 plan fails under Ulysses 2 unquantized too
# (a broadcast of [1, 1, 32, 8] against [1, 2, 32, 8] in its attention).
GENERIC = ("Flux2Transformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel")


def _generic_context_parallel(class_name: str, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in this process alone, output under Ulysses 2) of a tiny DiT quantized through the generic policy."""
    import tiny_dits

    from convrot_diffusers import parallel, quantize_transformer

    models = []
    for _ in range(2):
        model, make_inputs = tiny_dits.build(class_name, seed, device=str(device))
        models.append(quantize_transformer(model, "w4a4", progress=False))
    parallel.enable_context_parallel(models[1], ulysses_degree=2)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    if class_name == "Flux2Transformer2DModel":  # the pipeline's [batch, tokens, 4] ids, which diffusers' plan splits
        inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][None], inputs["txt_ids"][None]
    return tiny_dits.run(models[0], inputs), tiny_dits.run(models[1], inputs)


def main(rank: int, world_size: int, port: int, saved: str, out_dir: str, seed: int, device_type: str = "cpu") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    if device_type == "cpu":
        # diffusers 0.42's enable_parallelism places each rank on accelerator (rank % device count), which
        # is a division by zero on a machine without one; one "device" stands for the CPU here.
        torch.accelerator.device_count = lambda: 1

    import numpy as np
    import torch.distributed as dist

    from convrot_diffusers import parallel
    from convrot_diffusers.sources import load_saved_pipeline

    me = parallel.init_process_group(device_type)
    found = {"rank": me.rank, "world_size": me.world_size, "device": str(me.device)}
    pipe = load_saved_pipeline(saved, device=str(me.device)).pipe
    images = parallel.generate_data_parallel(pipe, PROMPTS, seed=seed, **CALL)
    if me.is_main:
        found["data_parallel"] = [np.asarray(image) for image in images]
        found["one_process"] = [
            np.asarray(pipe(p, generator=torch.Generator("cpu").manual_seed(seed + i), **CALL).images[0])
            for i, p in enumerate(PROMPTS)
        ]
    else:
        found["data_parallel"] = images
    for mode in ("ulysses", "ring") if device_type == "cuda" else ("ulysses",):
        for fuse_first in (True, False):
            found[f"{mode}_fused_{'first' if fuse_first else 'after'}"] = _context_parallel(
                saved, seed, me.device, mode, fuse_first
            )
    for class_name in GENERIC:
        found[f"ulysses_{class_name}"] = _generic_context_parallel(class_name, seed, me.device)
    if me.is_main:
        torch.save(found, os.path.join(out_dir, "rank0.pt"))
    # the command, which sees the launcher's environment set above: rank 0 writes cli-000.png, ...
    from convrot_diffusers.cli import main as convrot

    prompts = [word for prompt in PROMPTS for word in ("--prompt", prompt)]
    out = os.path.join(out_dir, "cli.png")
    device = ["--device", "cuda"] if device_type == "cuda" else []
    assert convrot(["generate", saved, *prompts, "--seed", str(seed), "--out", out, *device, *CLI_OPTIONS]) == 0
    dist.barrier()
    dist.destroy_process_group()
