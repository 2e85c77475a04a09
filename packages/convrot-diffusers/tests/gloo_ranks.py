"""What each rank of test_parallel.py's two-process group does (spawned processes import it by name).

One group does every two-rank check, so that the suite pays for starting the processes once:
- data parallel: each rank loads the 4-bit checkpoint, makes its share of the prompts, rank 0 gathers;
  rank 0 then makes every image alone, in this process, as the one-process reference;
- the same through ``convrot generate``, which finds the group's environment (as under torchrun);
- context parallel (Ulysses 2, diffusers' native attention, gloo's all_to_all): a ConvRot Flux
  transformer with every fusion, fused before and after enable_parallelism, against its own output
  before parallelism was enabled.
Rank 0 writes what it found to ``out_dir`` (torch.save); a failure on any rank is raised there.
"""

from __future__ import annotations

import os

import torch

PROMPTS = ("a red fox", "a lighthouse at dusk", "a bowl of pears")
# What `convrot generate --steps 2 --height 32 --width 32` runs on the demo (its max_sequence_length and guidance).
CALL = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 64, "guidance_scale": 3.5}
CLI_OPTIONS = ["--steps", "2", "--height", "32", "--width", "32"]


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
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0].float()


def _fuse_all(transformer) -> None:
    import convrot_diffusers

    assert convrot_diffusers.fuse_qkv_projections(transformer) > 0
    assert convrot_diffusers.fuse_activations(transformer) > 0
    assert convrot_diffusers.fuse_qk_norm_rope(transformer) > 0


def _context_parallel(saved: str, seed: int, fuse_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in this process alone, output under Ulysses 2) of the saved transformer with every fusion,
    fused before enable_parallelism or after it."""
    from convrot_diffusers import load_quantized, parallel

    alone = load_quantized(saved)
    inputs = flux_inputs(alone.config, seed)
    _fuse_all(alone)
    sharded = load_quantized(saved)
    if fuse_first:
        _fuse_all(sharded)
    parallel.enable_context_parallel(sharded, ulysses_degree=2)
    if not fuse_first:
        _fuse_all(sharded)
    return _forward(alone, inputs), _forward(sharded, inputs)


def main(rank: int, world_size: int, port: int, saved: str, out_dir: str, seed: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    # diffusers 0.42's enable_parallelism places each rank on accelerator (rank % device count), which is
    # a division by zero on a machine without one; one "device" stands for the CPU here.
    torch.accelerator.device_count = lambda: 1

    import numpy as np
    import torch.distributed as dist

    from convrot_diffusers import parallel
    from convrot_diffusers.sources import load_saved_pipeline

    me = parallel.init_process_group("cpu")
    found = {"rank": me.rank, "world_size": me.world_size}
    pipe = load_saved_pipeline(saved).pipe
    images = parallel.generate_data_parallel(pipe, PROMPTS, seed=seed, **CALL)
    if me.is_main:
        found["data_parallel"] = [np.asarray(image) for image in images]
        found["one_process"] = [
            np.asarray(pipe(p, generator=torch.Generator("cpu").manual_seed(seed + i), **CALL).images[0])
            for i, p in enumerate(PROMPTS)
        ]
    else:
        found["data_parallel"] = images
    found["ulysses_fused_first"] = _context_parallel(saved, seed, fuse_first=True)
    found["ulysses_fused_after"] = _context_parallel(saved, seed, fuse_first=False)
    if me.is_main:
        torch.save(found, os.path.join(out_dir, "rank0.pt"))
    # the command, which sees the launcher's environment set above: rank 0 writes cli-000.png, ...
    from convrot_diffusers.cli import main as convrot

    prompts = [word for prompt in PROMPTS for word in ("--prompt", prompt)]
    out = os.path.join(out_dir, "cli.png")
    assert convrot(["generate", saved, *prompts, "--seed", str(seed), "--out", out, *CLI_OPTIONS]) == 0
    dist.barrier()
    dist.destroy_process_group()
