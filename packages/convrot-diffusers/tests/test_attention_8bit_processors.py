"""attention="int8" on Wan and Flux.2: each 8-bit processor computes diffusers' processor it replaces (the same
values given the same attention), and on tiny models the op computes the quantization it states."""

import pytest
import torch
from diffusers.models.transformers import transformer_flux2, transformer_wan
from diffusers.models.transformers.transformer_flux2 import Flux2Attention, Flux2ParallelSelfAttention
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTransformer3DModel
from test_qk_norm_rope import relative_error, simulated_attention_8bit
from tiny_dits import TINY, _flux2_inputs, _wan_inputs

import convrot_kernels
from convrot_diffusers import attention_8bit_processors, fuse_qk_norm_rope, unfuse_qk_norm_rope
from convrot_diffusers.attention_8bit_processors import (
    Attention8bitProcessor,
    Flux2Attention8bitProcessor,
    Flux2ParallelSelfAttention8bitProcessor,
    WanAttention8bitProcessor,
)


def tiny_wan(**overrides) -> WanTransformer3DModel:
    torch.manual_seed(0)
    config = {**TINY["WanTransformer3DModel"], "attention_head_dim": 64, **overrides}  # a head dim the op takes
    return WanTransformer3DModel(**config).to(torch.bfloat16).eval()


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, WanAttention)]


def sdpa(query, key, value, **_):
    """Attention on diffusers' [B, N, H, D] layout, for both processors alike."""
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)))
    return out.transpose(1, 2)


@pytest.mark.parametrize("cross, image_context", [(False, False), (True, False), (True, True)])
def test_processor_computes_diffusers_wan_attention(cross, image_context, seed, monkeypatch):
    torch.manual_seed(seed)
    # An image-to-video model's context: the image's tokens (projected to the model width) before the 512 text ones.
    attn = WanAttention(dim=128, heads=2, dim_head=64, added_kv_proj_dim=128 if image_context else None)
    attn = attn.to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 20, 128, generator=g).bfloat16()
    context = rope = None
    if cross:
        text = attention_8bit_processors.TEXT_CONTEXT if image_context else 9
        context = torch.randn(1, (7 if image_context else 0) + text, 128, generator=g).bfloat16()
    else:
        angles = torch.rand(1, 20, 1, 32, generator=g).repeat_interleave(2, dim=-1)
        rope = (angles.cos(), angles.sin())
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", sdpa)
    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", sdpa)
    with torch.no_grad():
        expected = WanAttnProcessor()(attn, hidden, context, None, rope)
        got = WanAttention8bitProcessor()(attn, hidden, context, None, rope)
    assert torch.equal(got, expected)


def test_int8_attention_on_a_tiny_wan_is_the_simulated_quantization_and_unfuse_undoes_it(seed, monkeypatch):
    model = tiny_wan()
    inputs = _wan_inputs(model.config, torch.Generator().manual_seed(seed), tokens_side=9, text=20)  # 162 tokens
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0].float()

    stock = run()
    assert fuse_qk_norm_rope(model, attention="int8") == 4  # self- and cross-attention of 2 blocks
    modules = attention_modules(model)
    assert all(type(m.processor) is WanAttention8bitProcessor for m in modules)
    assert "attention='int8'" in repr(modules[0].processor)
    calls = []

    def recording(query, key, value, **kwargs):
        calls.append((query, key, value))
        return convrot_kernels.attention_8bit(query, key, value, **kwargs)

    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", recording)
    got = run()
    assert len(calls) == 4
    for q, k, v in calls:  # as in test_qk_norm_rope: the op is its simulation on the model's own tensors
        simulated = simulated_attention_8bit(q, k, v).float()
        op = convrot_kernels.attention_8bit(q, k, v).float()
        assert relative_error(op, simulated) <= 0.25 * relative_error(sdpa(q.float(), k.float(), v.float()), simulated)
    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", simulated_attention_8bit)
    quantization, found = relative_error(run(), stock), relative_error(got, stock)
    assert 0.5 * quantization <= found <= 1.5 * quantization, (found, quantization)

    assert fuse_qk_norm_rope(model, attention="int8") == 0
    assert unfuse_qk_norm_rope(model) == 4
    assert all(type(m.processor) is WanAttnProcessor for m in modules)
    assert torch.equal(run(), stock)


def test_fusing_wan_without_int8_attention_restores_the_stock_processors():
    model = tiny_wan()
    assert fuse_qk_norm_rope(model) == 0  # Wan's norms span all heads: nothing for the norm kernel
    assert fuse_qk_norm_rope(model, attention="int8") == 4
    assert fuse_qk_norm_rope(model) == 4
    assert all(type(m.processor) is WanAttnProcessor for m in attention_modules(model))


def test_int8_attention_refuses_wan_head_dims_the_op_does_not_take():
    model = tiny_wan(attention_head_dim=32)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1 has head dimension 32"):
        fuse_qk_norm_rope(model, attention="int8")
    assert all(type(m.processor) is WanAttnProcessor for m in attention_modules(model))


def test_int8_attention_refuses_a_mask(seed):
    attn = WanAttention(dim=128, heads=2, dim_head=64).to(torch.bfloat16)
    hidden = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(seed)).bfloat16()
    with torch.no_grad(), pytest.raises(ValueError, match="takes no attention mask"):
        WanAttention8bitProcessor()(attn, hidden, None, torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_int8_wan_attention_compiles_in_one_graph(seed):
    attn = WanAttention(dim=128, heads=2, dim_head=64).to(torch.bfloat16)
    attn.set_processor(WanAttention8bitProcessor())
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 9, 128, generator=g).bfloat16()
    angles = torch.rand(1, 9, 1, 32, generator=g).repeat_interleave(2, dim=-1)
    rope = (angles.cos(), angles.sin())
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(hidden, None, None, rope), attn(hidden, None, None, rope))


def tiny_flux2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = {**TINY["Flux2Transformer2DModel"], "attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16)}
    return transformer_flux2.Flux2Transformer2DModel(**config).to(torch.bfloat16).eval()


def rope_angles(generator, tokens: int, head_dim: int):
    angles = torch.rand(tokens, head_dim // 2, generator=generator).repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("joint", [False, True])
def test_flux2_processors_compute_diffusers_flux2_attention(joint, seed, monkeypatch):
    model = tiny_flux2()
    attn = (model.transformer_blocks[0] if joint else model.single_transformer_blocks[0]).attn
    g = torch.Generator().manual_seed(seed)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    hidden = torch.randn(1, 12, width, generator=g).bfloat16()
    context = torch.randn(1, 5, width, generator=g).bfloat16() if joint else None
    rope = rope_angles(g, 12 + (5 if joint else 0), attn.head_dim)
    stock_processor = attn.processor
    ours = Flux2Attention8bitProcessor() if joint else Flux2ParallelSelfAttention8bitProcessor()
    monkeypatch.setattr(transformer_flux2, "dispatch_attention_fn", sdpa)
    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", sdpa)
    args = (hidden, context, None, rope) if joint else (hidden, None, rope)
    with torch.no_grad():
        expected, got = stock_processor(attn, *args), ours(attn, *args)
    expected, got = (expected, got) if joint else ((expected,), (got,))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_int8_attention_on_a_tiny_flux2_is_the_simulated_quantization_and_unfuse_undoes_it(seed, monkeypatch):
    model = tiny_flux2()
    inputs = _flux2_inputs(model.config, torch.Generator().manual_seed(seed), tokens_side=12, text=20)  # 164 tokens
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0].float()

    stock = run()
    assert fuse_qk_norm_rope(model, attention="int8") == 4  # 2 double and 2 single blocks
    modules = [m for m in model.modules() if isinstance(m, (Flux2Attention, Flux2ParallelSelfAttention))]
    assert all(isinstance(m.processor, Attention8bitProcessor) for m in modules)
    calls = []

    def recording(query, key, value, **kwargs):
        calls.append((query, key, value))
        return convrot_kernels.attention_8bit(query, key, value, **kwargs)

    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", recording)
    got = run()
    assert len(calls) == 4
    for q, k, v in calls:
        simulated = simulated_attention_8bit(q, k, v).float()
        op = convrot_kernels.attention_8bit(q, k, v).float()
        assert relative_error(op, simulated) <= 0.25 * relative_error(sdpa(q.float(), k.float(), v.float()), simulated)
    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", simulated_attention_8bit)
    quantization, found = relative_error(run(), stock), relative_error(got, stock)
    assert 0.5 * quantization <= found <= 1.5 * quantization, (found, quantization)

    assert unfuse_qk_norm_rope(model) == 4
    assert [type(m.processor).__name__ for m in modules] == ["Flux2AttnProcessor"] * 2 + [
        "Flux2ParallelSelfAttnProcessor"
    ] * 2
    assert torch.equal(run(), stock)


def test_int8_flux2_attention_compiles_in_one_graph(seed):
    model = tiny_flux2()
    fuse_qk_norm_rope(model, attention="int8")
    attn = model.single_transformer_blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 9, attn.query_dim, generator=g).bfloat16()
    rope = rope_angles(g, 9, attn.head_dim)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(hidden, image_rotary_emb=rope), attn(hidden, image_rotary_emb=rope))
