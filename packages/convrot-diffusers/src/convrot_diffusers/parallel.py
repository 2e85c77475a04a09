"""Generation over several processes: data parallelism for batches of prompts, context parallelism for one image.

Data parallelism. Start one process per GPU with ``torchrun --nproc-per-node N`` (or
``accelerate launch``, which sets the same environment); each process joins the group
(``init_process_group``), loads the pipeline once onto its own device, and
``generate_data_parallel`` runs its share of the prompts. Image ``i`` is always made with the
generator ``torch.Generator("cpu").manual_seed(seed + i)``, whichever rank runs it, so the
images equal a one-process run's bit for bit (on the same kind of device); rank 0 receives
them all, in prompt order::

    import torch
    from convrot_diffusers import load_quantized, parallel
    from diffusers import FluxPipeline

    rank = parallel.init_process_group()  # cuda:LOCAL_RANK under torchrun, or the CPU with gloo
    transformer = load_quantized("flux-convrot", device=rank.device)
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer,
                                        torch_dtype=torch.bfloat16).to(rank.device)
    images = parallel.generate_data_parallel(pipe, prompts, seed=0, num_inference_steps=28)
    if rank.is_main:
        for i, image in enumerate(images):
            image.save(f"image-{i:03d}.png")

``convrot generate`` does the same under torchrun (``--prompt`` repeated or ``--prompt-file``).

Context parallelism is diffusers' own (``ContextParallelConfig``,
``transformer.enable_parallelism``): every rank runs the same prompt and seed, each on a part
of the tokens. ConvRot layers quantize each token's activations on their own, so a sharded
token sequence quantizes as the whole one does; the Flux fusions (convrot_diffusers.fusion,
activation_fusion, qk_norm_rope) work per token too, and their attention goes through
diffusers' dispatcher with the model's parallel config. ``enable_context_parallel`` checks
that every attention processor takes that config before it enables it (a processor that does
not would attend to its own rank's tokens only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def init_process_group(device_type: str | None = None) -> Rank:
    """Joins the process group the launcher described in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    ``device_type`` "cuda" (the default where a GPU is visible) gives each process ``cuda:LOCAL_RANK`` and the
    group NCCL for CUDA tensors and gloo for CPU ones; "cpu" gives every process the CPU and gloo. A group that
    already exists is joined as it is.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    local_rank = launched_local_rank()
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most that "
                "many processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, device)


def current_rank() -> Rank:
    """The group this process is in, or a group of one (rank 0 on the CPU) when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Rank(0, 1, 0, torch.device("cpu"))
    local_rank = launched_local_rank()
    has_cuda = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    return Rank(
        dist.get_rank(),
        dist.get_world_size(),
        local_rank,
        torch.device("cuda", local_rank) if has_cuda else torch.device("cpu"),
    )


def share(count: int, rank: int, world_size: int) -> range:
    """The indices of ``count`` images that ``rank`` of ``world_size`` makes: every world_size-th from its rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return range(rank, count, world_size)


def _first_result(output):
    """A pipeline output's image, or a video pipeline's (whose output has ``frames``) video as a list of frames."""
    images = getattr(output, "images", None)
    return images[0] if images is not None else list(output.frames[0])


def generate_data_parallel(pipe, prompts: Sequence[str | Mapping], seed: int = 0, progress: bool = True, **call_kwargs):
    """Images for ``prompts``, the group's ranks sharing them: a list in prompt order on rank 0, None elsewhere.
    For a video pipeline (WanPipeline, LTX2Pipeline...) each item is a video, the list of its frames.

    Image ``i`` is ``pipe(prompts[i], generator=torch.Generator("cpu").manual_seed(seed + i), **call_kwargs)``
    whichever rank makes it; a prompt may also be a dict of the pipeline's per-image arguments (e.g.
    ``{"prompt_embeds": ..., "pooled_prompt_embeds": ...}``), passed as keywords. Without a process group,
    this process makes them all. The pipeline's progress bar shows on rank 0 only (``progress=False``:
    nowhere). Every rank must call it with the same arguments.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if not all(isinstance(prompt, (str, Mapping)) for prompt in prompts):
        raise TypeError("each prompt must be a string or a dict of the pipeline's per-image arguments")
    if "generator" in call_kwargs or "prompt" in call_kwargs:
        raise TypeError("pass the prompts as prompts and the base seed as seed (each image gets seed + its index)")
    if not 0 <= seed <= 2**64 - len(prompts):
        raise ValueError(f"seed must be between 0 and 2**64 - {len(prompts)} (image i uses seed + i), got {seed}")
    me = current_rank()
    pipe.set_progress_bar_config(disable=not (progress and me.is_main))
    made = {}
    for i in share(len(prompts), me.rank, me.world_size):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        per_image = {"prompt": prompts[i]} if isinstance(prompts[i], str) else dict(prompts[i])
        made[i] = _first_result(pipe(**per_image, generator=generator, **call_kwargs))
    if me.world_size == 1:
        return [made[i] for i in range(len(prompts))]
    gathered = [None] * me.world_size if me.is_main else None
    dist.gather_object(made, gathered, dst=0)
    if not me.is_main:
        return None
    images = {i: image for part in gathered for i, image in part.items()}
    return [images[i] for i in range(len(prompts))]


def check_context_parallel(pipe_or_transformer) -> None:
    """Raises ValueError naming the first attention module whose processor cannot run under context parallelism.

    diffusers hands its parallel config to every processor with a ``_parallel_config`` attribute and passes
    the others over: those would attend to their own rank's tokens only, and the image would be wrong
    without any error.
    """
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    from .detect import denoiser_of

    transformer = denoiser_of(pipe_or_transformer)
    for name, module in transformer.named_modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)) or module.processor is None:
            continue
        if not hasattr(module.processor, "_parallel_config"):
            raise ValueError(
                f"{name}: its attention processor {type(module.processor).__name__} takes no parallel config, so under "
                "context parallelism it would attend to its own rank's tokens only"
                + (
                    " (convrot_diffusers.unfuse_qkv_projections gives it the unfused one back)"
                    if hasattr(module, "_convrot_fused")
                    else ""
                )
            )


def enable_context_parallel(pipe_or_transformer, ulysses_degree: int = 1, ring_degree: int = 1, **config):
    """``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=, ring_degree=, **config))``
    after ``check_context_parallel``; returns the transformer. Call it on every rank, after
    ``init_process_group`` and after any fusion; every rank then runs the pipeline with the same prompt and
    seed, and each gets the whole image.

    Ring attention needs an attention backend that returns the log-sum-exp (diffusers' "_native_flash",
    "_native_cudnn", "flash", "sage"; ``transformer.set_attention_backend`` before this call): diffusers'
    default "native" backend runs Ulysses only.
    """
    from diffusers import ContextParallelConfig

    from .detect import denoiser_of

    transformer = denoiser_of(pipe_or_transformer)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no process group: call convrot_diffusers.parallel.init_process_group() first")
    if getattr(type(transformer), "_cp_plan", None) is None and "cp_plan" not in config:
        raise ValueError(f"{type(transformer).__name__} has no context-parallel plan in diffusers (_cp_plan)")
    if torch.accelerator.device_count() == 0:
        # diffusers 0.42 places each rank on accelerator (rank % device count) whatever the process group.
        raise RuntimeError("diffusers' enable_parallelism needs an accelerator (a GPU); this machine has none")
    check_context_parallel(transformer)
    cp_plan = config.pop("cp_plan", None)
    parallel = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, **config)
    transformer.enable_parallelism(config=parallel, cp_plan=cp_plan)
    return transformer
