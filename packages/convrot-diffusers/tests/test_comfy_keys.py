import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from convrot_diffusers.comfy_keys import (
    KeyMapError,
    Rows,
    diffusers_rows,
    format_for_class,
    format_for_keys,
    original_rows,
    strip_model_prefix,
)


def flux(width=256, head_dim=64, double=2, single=2):
    with torch.device("meta"):
        return FluxTransformer2DModel(
            in_channels=64,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=head_dim,
            num_attention_heads=width // head_dim,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56) if head_dim == 128 else (16, 24, 24),
        )


def sd3(qk_norm="rms_norm", dual=(0,)):
    with torch.device("meta"):
        return SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=256,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
            dual_attention_layers=dual,
            qk_norm=qk_norm,
        )


def shapes(model):
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    "model", [flux(), flux(3072, 128, 1, 1), sd3(), sd3(None, ())], ids=["flux", "flux-3072", "sd3", "sd3-medium"]
)
def test_layout_and_diffusers_converter_agree_and_invert(model):
    original = format_for_class(type(model).__name__)
    rows, inverse = original_rows(original, model.config, shapes(model))
    forward = diffusers_rows(original, rows)
    assert forward.keys() == model.state_dict().keys()
    # Every diffusers row comes from exactly one original row and back.
    for name, pieces in inverse.items():
        covered = sorted((run.start, run.stop) for _, _, run in pieces)
        assert covered[0][0] == 0 and covered[-1][1] == rows[name]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    for key, runs in forward.items():
        assert sum(run.stop - run.start for run in runs) == (shapes(model)[key][0] if shapes(model)[key] else 1)


def test_flux_fused_tensors_split_along_rows_at_any_width():
    """diffusers' converter hard-codes Flux.1's width (3072) for linear1; the tags are run at that width."""
    model = flux(width=256)
    rows, _ = original_rows(format_for_class("FluxTransformer2DModel"), model.config, shapes(model))
    forward = diffusers_rows(format_for_class("FluxTransformer2DModel"), rows)
    linear1 = "single_blocks.1.linear1.weight"
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    got = [forward[f"single_transformer_blocks.1.{part}.weight"] for part in parts]
    assert got == [
        [Rows(linear1, 0, 256)],
        [Rows(linear1, 256, 512)],
        [Rows(linear1, 512, 768)],
        [Rows(linear1, 768, 1792)],
    ]
    # BFL's final AdaLN is (shift, scale), diffusers' (scale, shift).
    adaln = "final_layer.adaLN_modulation.1.weight"
    assert forward["norm_out.linear.weight"] == [Rows(adaln, 256, 512), Rows(adaln, 0, 256)]


def test_sd3_row_map_moves_tensors_as_diffusers_converter_does():
    model = sd3()
    original = format_for_class("SD3Transformer2DModel")
    rows, _ = original_rows(original, model.config, shapes(model))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(n, 3, generator=generator) for name, n in rows.items()}
    tensors["pos_embed"] = torch.randn(1, 3, generator=generator)
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))
    for key, runs in diffusers_rows(original, rows).items():
        assert torch.equal(torch.cat([tensors[run.key][run.start : run.stop] for run in runs]), expected[key]), key


def meta(class_name, **config):
    import diffusers
    from tiny_dits import TINY

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**(TINY[class_name] | config))


@pytest.mark.parametrize(
    "model",
    [
        meta("Flux2Transformer2DModel"),
        meta("Flux2Transformer2DModel", guidance_embeds=False),
        meta("QwenImageTransformer2DModel"),
        meta("WanTransformer3DModel"),
        meta("WanTransformer3DModel", image_dim=96, added_kv_proj_dim=64, qk_norm=None),
    ],
    ids=["flux2", "flux2-klein", "qwen-image", "wan", "wan-i2v"],
)
def test_flux2_qwen_image_and_wan_layouts_agree_with_diffusers_converters(model):
    original = format_for_class(type(model).__name__)
    rows, inverse = original_rows(original, model.config, shapes(model))
    assert format_for_keys(rows) is original
    forward = diffusers_rows(original, rows)
    assert forward.keys() == model.state_dict().keys()
    assert all(
        len(pieces) == 1 or name.endswith(("qkv.weight", "adaLN_modulation.1.weight"))
        for name, pieces in inverse.items()
    )
    if type(model).__name__ == "QwenImageTransformer2DModel":  # diffusers' single-file names are its own
        assert all(
            runs == [Rows(key, 0, shapes(model)[key][0] if shapes(model)[key] else 1)] for key, runs in forward.items()
        )
    if type(model).__name__ == "WanTransformer3DModel":  # Wan's cross-attention norm is its norm3
        assert forward["blocks.1.norm2.weight"] == [Rows("blocks.1.norm3.weight", 0, 64)]
        assert forward["blocks.0.attn1.to_out.0.weight"] == [Rows("blocks.0.self_attn.o.weight", 0, 64)]


def test_flux1_and_flux2_files_are_told_apart():
    flux1, flux2 = (format_for_class(c) for c in ("FluxTransformer2DModel", "Flux2Transformer2DModel"))
    rows1, _ = original_rows(flux1, flux().config, shapes(flux()))
    rows2, _ = original_rows(flux2, meta("Flux2Transformer2DModel").config, shapes(meta("Flux2Transformer2DModel")))
    assert "double_blocks.0.img_attn.qkv.weight" in rows1.keys() & rows2.keys()
    assert format_for_keys(rows1) is flux1 and format_for_keys(rows2) is flux2
    with pytest.raises(KeyMapError, match="fit several architectures"):
        format_for_keys({*rows1, *rows2})


def test_config_is_inferred_from_original_shapes():
    for model in (flux(1024, 128, 2, 3), sd3()):
        original = format_for_class(type(model).__name__)
        rows, inverse = original_rows(original, model.config, shapes(model))
        by_name = {}
        for name, pieces in inverse.items():
            trailing = shapes(model)[pieces[0][0]][1:]
            by_name[name] = (rows[name], *trailing)
        by_name["pos_embed"] = shapes(model).get("pos_embed.pos_embed", ())
        config = original.infer_config(by_name)
        for key, value in config.items():
            if key in model.config and key != "sample_size" and model.config[key] is not None:
                expected = model.config[key]
                assert (list(value) if isinstance(value, (list, tuple)) else value) == (
                    list(expected) if isinstance(expected, (list, tuple)) else expected
                ), key


def test_flux_config_is_ambiguous_without_128_wide_heads():
    model = flux(256, 64)
    original = format_for_class("FluxTransformer2DModel")
    _, inverse = original_rows(original, model.config, shapes(model))
    by_name = {name: (0, 0) for name in inverse} | {"double_blocks.0.img_attn.norm.query_norm.scale": (64,)}
    with pytest.raises(KeyMapError, match="64-wide heads: its rotary axes cannot be read from the file"):
        original.infer_config(by_name)


def test_unknown_names_and_widths_are_refused():
    with pytest.raises(KeyMapError, match="match no supported architecture"):
        format_for_keys(["model.layers.0.weight"])
    with pytest.raises(KeyMapError, match="no ComfyUI key mapping for PixArtTransformer2DModel"):
        format_for_class("PixArtTransformer2DModel")
    original = format_for_class("FluxTransformer2DModel")
    model = flux(width=320, head_dim=64)
    with pytest.raises(KeyMapError, match="width 320: diffusers' converter assumes width 3072"):
        original_rows(original, model.config, shapes(model))


def test_model_prefix_is_stripped_and_mixed_files_refused():
    assert strip_model_prefix(["model.diffusion_model.a", "model.diffusion_model.b"]) == (
        "model.diffusion_model.",
        ["a", "b"],
    )
    assert strip_model_prefix(["a"]) == ("", ["a"])
    with pytest.raises(KeyMapError, match="a full checkpoint with VAE or text encoders"):
        strip_model_prefix(["model.diffusion_model.a", "first_stage_model.b"])
