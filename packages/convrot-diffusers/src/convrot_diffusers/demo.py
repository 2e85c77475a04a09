"""Small pipelines with RANDOM weights, built from config in code, for offline demos and tests.

Each demo has the components of its real pipeline (transformer, VAE, CLIP
and/or T5 text encoders, tokenizers, scheduler) at test size, initialised from
fixed seeds so that every machine builds the same weights. The images they make
are structured noise, not pictures: they show that the whole path (quantize,
save, load, generate, compare) runs, not what a trained model draws.

The transformer widths are chosen to exercise the group-size rule as the real
models do: Flux, SD3 and Wan demos are 256 wide (group 256, like Flux's 3072,
SD3-medium's 1536 and Wan's 5120), the PixArt demos 192 (group 64, like PixArt's
1152 and SD3.5-large's 2432).

``demo:wan`` is a text-to-video pipeline (Wan 2.1's components: UMT5 text encoder,
Wan VAE compressing 8x in space and 4x in time, UniPC flow scheduler): it makes frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .demo_tokenizers import VOCAB_SIZE, clip_like_tokenizer, t5_like_tokenizer

DEMO_PREFIX = "demo:"
DEMO_NOTICE = "demo pipeline with RANDOM weights (built offline from config): its images are noise, not pictures"

IMAGE_SIZE = 128
T5_WIDTH = 256
TEXT_LENGTH = 64


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def _clip(seed: int, width: int, with_projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: model_class(config))


def _t5(seed: int, config_class: type = T5Config, model_class: type = T5EncoderModel) -> torch.nn.Module:
    config = config_class(
        vocab_size=VOCAB_SIZE,
        d_model=T5_WIDTH,
        d_kv=32,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=8,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: model_class(config))


def _vae(seed: int, latent_channels: int, shift_factor: float | None, scaling_factor: float) -> AutoencoderKL:
    # Three resolution levels: 4x spatial compression (the real VAEs have 8x).
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=32,
            sample_size=IMAGE_SIZE,
            shift_factor=shift_factor,
            scaling_factor=scaling_factor,
            use_quant_conv=latent_channels == 4,
            use_post_quant_conv=latent_channels == 4,
        ),
    )


def flux_transformer() -> FluxTransformer2DModel:
    return _seeded(
        1,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=128,
            guidance_embeds=True,
            axes_dims_rope=(16, 24, 24),
        ),
    )


def _flux(transformer: torch.nn.Module | None) -> FluxPipeline:
    return FluxPipeline(
        transformer=transformer if transformer is not None else flux_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
        ),
        vae=_vae(2, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(3, width=128, with_projection=False),
        tokenizer=clip_like_tokenizer(),
        text_encoder_2=_t5(4),
        tokenizer_2=t5_like_tokenizer(),
    )


def pixart_transformer() -> PixArtTransformer2DModel:
    return _seeded(
        1,
        lambda: PixArtTransformer2DModel(
            num_attention_heads=3,
            attention_head_dim=64,
            in_channels=4,
            out_channels=8,
            num_layers=4,
            patch_size=2,
            sample_size=IMAGE_SIZE // 4,
            cross_attention_dim=192,
            caption_channels=T5_WIDTH,
            activation_fn="gelu-approximate",
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            attention_bias=True,
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        ),
    )


def _pixart(pipeline_class: type, transformer: torch.nn.Module | None):
    return pipeline_class(
        transformer=transformer if transformer is not None else pixart_transformer(),
        scheduler=DPMSolverMultistepScheduler(),
        vae=_vae(2, latent_channels=4, shift_factor=None, scaling_factor=0.13025),
        text_encoder=_t5(4),
        tokenizer=t5_like_tokenizer(),
    )


def sd3_transformer() -> SD3Transformer2DModel:
    return _seeded(
        1,
        lambda: SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 4,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=256,
            pooled_projection_dim=64 + 128,
            pos_embed_max_size=32,
            # SD3.5-medium's dual attention (an extra image self-attention) in the first block.
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    )


def _sd3(transformer: torch.nn.Module | None) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(2, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip(3, width=64, with_projection=True),
        tokenizer=clip_like_tokenizer(),
        text_encoder_2=_clip(5, width=128, with_projection=True),
        tokenizer_2=clip_like_tokenizer(),
        text_encoder_3=_t5(4),
        tokenizer_3=t5_like_tokenizer(),
    )


def wan_transformer() -> WanTransformer3DModel:
    return _seeded(
        1,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=T5_WIDTH,
            freq_dim=256,
            ffn_dim=512,
            num_layers=2,
        ),
    )


def _wan(transformer: torch.nn.Module | None) -> WanPipeline:
    return WanPipeline(
        transformer=transformer if transformer is not None else wan_transformer(),
        # Wan 2.1's own scheduler settings (flow matching through UniPC), with its 480p shift.
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        vae=_seeded(
            2,
            lambda: AutoencoderKLWan(
                base_dim=16, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
            ),
        ),
        text_encoder=_t5(4, UMT5Config, UMT5EncoderModel),
        tokenizer=t5_like_tokenizer(),
    )


@dataclass(frozen=True)
class Demo:
    name: str
    build: Callable[[torch.nn.Module | None], Any]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    # For a video pipeline: the frames a second of its videos, and the factor its VAE compresses time by
    # (it makes frame_step * k + 1 frames).
    fps: float | None = None
    frame_step: int | None = None
    float32: tuple[str, ...] = ()  # components kept in float32 whatever the pipeline's dtype

    @property
    def video(self) -> bool:
        return self.fps is not None


_COMMON = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 8, "max_sequence_length": TEXT_LENGTH}

DEMOS: dict[str, Demo] = {
    "flux": Demo("flux", _flux, {**_COMMON, "guidance_scale": 3.5}),
    "pixart-sigma": Demo(
        "pixart-sigma",
        lambda t: _pixart(PixArtSigmaPipeline, t),
        {**_COMMON, "guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False},
    ),
    "pixart-alpha": Demo(
        "pixart-alpha",
        lambda t: _pixart(PixArtAlphaPipeline, t),
        {**_COMMON, "guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False},
    ),
    "sd3": Demo("sd3", _sd3, {**_COMMON, "guidance_scale": 5.0}),
    "wan": Demo(
        "wan",
        _wan,
        {
            "height": 96,
            "width": 160,
            "num_frames": 9,
            "num_inference_steps": 8,
            "guidance_scale": 5.0,
            "max_sequence_length": TEXT_LENGTH,
        },
        fps=16,  # Wan 2.1's
        frame_step=4,
        float32=("vae",),  # as Wan's model cards load it
    ),
}


def is_demo(model: str | None) -> bool:
    return model is None or model.startswith(DEMO_PREFIX)


def demo_name(model: str | None) -> str:
    """``None`` or ``"demo:NAME"`` -> ``NAME``; the default demo is Flux."""
    name = "flux" if model is None else model[len(DEMO_PREFIX) :]
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose from: {', '.join(DEMO_PREFIX + n for n in DEMOS)}")
    return name


def demo_transformer(name: str) -> torch.nn.Module:
    """The random-weight transformer of the demo ``name`` alone (under ``torch.device("meta")``: its layout)."""
    builders = {
        "flux": flux_transformer,
        "pixart-sigma": pixart_transformer,
        "pixart-alpha": pixart_transformer,
        "sd3": sd3_transformer,
    }
    if name not in builders:
        raise ValueError(f"the demo {name!r} has no transformer builder in convrot_diffusers.demo")
    return builders[name]()


def demo_pipeline(name: str = "flux", transformer: torch.nn.Module | None = None, dtype=torch.bfloat16):
    """The demo pipeline ``name`` in ``dtype``; ``transformer`` replaces its random one (e.g. a quantized load)."""
    pipe = DEMOS[name].build(transformer)
    for key, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and (transformer is None or component is not transformer):
            # torch's own .to: diffusers' override warns about float32 modules even when there are none.
            torch.nn.Module.to(component, torch.float32 if key in DEMOS[name].float32 else dtype)
    pipe.register_to_config(_name_or_path=DEMO_PREFIX + name)
    return pipe
