import math

import pytest
import torch
from diffusers.models.transformers import transformer_flux
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel
from tiny_dits import build as build_tiny_dit

import convrot_diffusers
import convrot_kernels
from convrot_diffusers import attention_8bit_processors, fuse_qk_norm_rope, qk_norm_rope, unfuse_qk_norm_rope
from convrot_diffusers.demo import T5_WIDTH, flux_transformer
from convrot_diffusers.qk_norm_rope import FluxNormRopeAttnProcessor


def flux_inputs(transformer, seed: int, dtype, batch: int = 2, side: int = 6, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = side * side
    row, col = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(row), row, col], dim=-1).reshape(image, 3).float()
    return {
        "hidden_states": torch.randn(batch, image, transformer.config.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, text, T5_WIDTH, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, transformer.config.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g).to(dtype),
        "guidance": torch.full((batch,), 3.5).to(dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def attention_modules(transformer):
    return [m for m in transformer.modules() if type(m).__name__ == "FluxAttention"]


def run(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0].float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The calls the fused processors make to the kernel (eager path), recorded."""
    calls = []

    def recording(x, out, *args, **kwargs):
        calls.append(tuple(x.shape))
        return qk_norm_rope.rms_norm_rope_into.__wrapped__(x, out, *args, **kwargs)

    recording.__wrapped__ = qk_norm_rope.rms_norm_rope_into
    monkeypatch.setattr(qk_norm_rope, "rms_norm_rope_into", recording)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_processor_matches_diffusers_and_unfuse_restores_it(dtype, seed, kernel_calls):
    transformer = flux_transformer().to(dtype)
    inputs = flux_inputs(transformer, seed, dtype)
    reference = run(transformer, inputs)

    fused = fuse_qk_norm_rope(transformer)
    modules = attention_modules(transformer)
    assert fused == len(modules) == 6
    assert all(type(m.processor) is FluxNormRopeAttnProcessor for m in modules)
    assert fuse_qk_norm_rope(transformer) == 0  # already fused
    # The same roundings; the mean square's summation order may flip a last bit, which the
    # blocks after it carry on.
    assert relative_error(run(transformer, inputs), reference) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # q and k of both streams in the 2 double blocks, of the joint sequence in the 4 single ones.
    assert kernel_calls == [(2, 5, 4, 64), (2, 36, 4, 64)] * 4 + [(2, 41, 4, 64)] * 8

    assert unfuse_qk_norm_rope(transformer) == fused
    assert all(type(m.processor) is FluxAttnProcessor for m in modules)
    assert torch.equal(run(transformer, inputs), reference)


def test_fused_processor_on_a_quantized_transformer_with_fused_projections(seed, kernel_calls):
    transformer = flux_transformer().to(torch.bfloat16)
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    convrot_diffusers.fuse_qkv_projections(transformer)  # q, k, v as strided views of one output
    convrot_diffusers.fuse_activations(transformer)
    inputs = flux_inputs(transformer, seed, torch.bfloat16)
    reference = run(transformer, inputs)
    assert fuse_qk_norm_rope(transformer) == 6
    assert relative_error(run(transformer, inputs), reference) <= 1e-2
    assert len(kernel_calls) == 16


def test_calls_the_kernel_does_not_cover_run_the_stock_processor(seed, kernel_calls):
    transformer = flux_transformer().to(torch.bfloat16)
    attn = transformer.transformer_blocks[0].attn
    attn.norm_added_k.weight.data = attn.norm_added_k.weight.data.float()  # torch promotes; the kernel would not
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 9, attn.query_dim, generator=g).bfloat16()
    context = torch.randn(1, 4, attn.query_dim, generator=g).bfloat16()
    angles = torch.rand(13, attn.head_dim // 2, generator=g).repeat_interleave(2, dim=1)
    rope = (angles.cos(), angles.sin())
    with torch.no_grad():
        stock = FluxAttnProcessor()(attn, hidden, context, None, rope)
        fused = FluxNormRopeAttnProcessor()(attn, hidden, context, None, rope)
        assert all(torch.equal(a, b) for a, b in zip(fused, stock, strict=True))
        assert kernel_calls == []
        rope64 = (rope[0].double(), rope[1].double())  # angles the kernel does not take
        stock = FluxAttnProcessor()(attn, hidden, context, None, rope64)
        fused = FluxNormRopeAttnProcessor()(attn, hidden, context, None, rope64)
        assert all(torch.equal(a, b) for a, b in zip(fused, stock, strict=True))
        assert kernel_calls == []


def test_fused_processor_compiles_in_one_graph(seed):
    transformer = flux_transformer()
    fuse_qk_norm_rope(transformer)
    block = transformer.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 11, block.attn.query_dim, generator=g)
    angles = torch.rand(11, block.attn.head_dim // 2, generator=g).repeat_interleave(2, dim=1)
    rope = (angles.cos(), angles.sin())
    compiled = torch.compile(block.attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, image_rotary_emb=rope), block.attn(hidden, image_rotary_emb=rope))


def test_compiled_joint_attention_equals_eager(seed):
    # Under compile one op writes the text and image parts of the joint q and k; eagerly two
    # calls write into the parts of a buffer: the same kernels, the same values.
    transformer = flux_transformer()
    fuse_qk_norm_rope(transformer)
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, attn.query_dim, generator=g)
    context = torch.randn(2, 4, attn.query_dim, generator=g)
    angles = torch.rand(11, attn.head_dim // 2, generator=g).repeat_interleave(2, dim=1)
    rope = (angles.cos(), angles.sin())
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(hidden, encoder_hidden_states=context, image_rotary_emb=rope)
        expected = attn(hidden, encoder_hidden_states=context, image_rotary_emb=rope)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


# 8-bit attention (attention="int8").


def simulated_attention_8bit(query, key, value, *, scale=None) -> torch.Tensor:
    """convrot_kernels.attention_8bit's quantization (docs/format.md, "attention_8bit") in float64 torch:
    q and k rotated by rht(., 64) and rounded to int8 (per query, per block of 128 keys), v to e4m3 per
    channel, the online softmax over key blocks of 128 with P through e4m3 at the scale 448."""
    batch, q_tokens, heads, dim = query.shape
    kv_tokens = key.shape[1]
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))  # [B, H, N, D]
    q = convrot_kernels.rht(q.float().contiguous(), 64).double()
    k = convrot_kernels.rht(k.float().contiguous(), 64).double()

    def int8(x, amax):
        step = amax / 127
        return torch.where(step > 0, (x / step).round().clamp(-127, 127), 0.0), step

    def e4m3(x):
        return x.to(torch.float8_e4m3fn).double()

    q8, sq = int8(q, q.abs().amax(-1, keepdim=True))
    sv = v.abs().amax(-2, keepdim=True) / 448
    v8 = torch.where(sv > 0, e4m3(v / torch.where(sv > 0, sv, 1)), 0.0)
    c = scale * math.log2(math.e)
    m = torch.full((batch, heads, q_tokens, 1), -math.inf, dtype=torch.float64)
    total = torch.zeros_like(m)
    acc = torch.zeros(batch, heads, q_tokens, dim, dtype=torch.float64)
    for j in range(0, kv_tokens, 128):
        kb = k[:, :, j : j + 128]
        k8, sk = int8(kb, kb.abs().amax((-2, -1), keepdim=True))
        s = (q8 @ k8.transpose(-1, -2)) * (sq * c) * sk.transpose(-1, -2)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, p = torch.exp2(m - m_new), torch.exp2(s - m_new)
        total = total * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + e4m3(448 * p) @ v8[:, :, j : j + 128]
        m = m_new
    return (acc * sv / (448 * total)).transpose(1, 2).to(query.dtype)


def test_simulated_attention_8bit_is_the_op(seed):
    # The simulation the model-level test below leans on, checked against the op itself (two key blocks and
    # a tail, both head dims): fp32 against float64 sums, so equal up to the output's rounding.
    g = torch.Generator().manual_seed(seed)
    for dim in (64, 128):
        q, k, v = (torch.randn(2, n, 3, dim, generator=g).bfloat16() for n in (70, 200, 200))
        got, simulated = convrot_kernels.attention_8bit(q, k, v).float(), simulated_attention_8bit(q, k, v).float()
        stock = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        assert relative_error(got, simulated) <= 0.25 * relative_error(stock.transpose(1, 2).float(), simulated)


def tiny_flux(head_dim: int = 64) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        joint_attention_dim=convrot_diffusers.demo.T5_WIDTH,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).to(torch.bfloat16)


@pytest.mark.parametrize("quantized", [False, True])
def test_int8_attention_is_the_simulated_quantization_and_unfuse_undoes_it(quantized, seed, monkeypatch):
    # fp16 (the op's other dtype): its finer rounding keeps the last-bit differences between the op and its
    # simulation, which the blocks after carry on, well below the quantization's own effect.
    transformer = flux_transformer().to(torch.float16)  # head_dim 64
    if quantized:
        convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
        convrot_diffusers.fuse_qkv_projections(transformer)
        convrot_diffusers.fuse_activations(transformer)
    # 12 x 12 image tokens and 20 text tokens: 164 keys, two key blocks.
    inputs = flux_inputs(transformer, seed, torch.float16, batch=1, side=12, text=20)
    stock = run(transformer, inputs)

    assert fuse_qk_norm_rope(transformer, attention="int8") == 6
    modules = attention_modules(transformer)
    assert all(m.processor.attention == "int8" for m in modules)
    assert "attention='int8'" in repr(modules[0].processor)
    calls = []

    def recording(query, key, value, **kwargs):
        calls.append((query, key, value))
        return convrot_kernels.attention_8bit(query, key, value, **kwargs)

    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", recording)
    got = run(transformer, inputs)
    assert len(calls) == 6
    # Each call on the model's own q, k, v computes the quantization the op states: far closer to its
    # float64 simulation than unquantized attention is (what is left: fp32 against float64 sums, moving some
    # outputs across a rounding boundary of their 16-bit dtype).
    for q, k, v in calls:
        simulated = simulated_attention_8bit(q, k, v).float()
        exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
        op = convrot_kernels.attention_8bit(q, k, v).float()
        assert relative_error(op, simulated) <= 0.25 * relative_error(exact.transpose(1, 2), simulated)
    # And the model's output moves as far from stock attention's as the simulated quantization moves it
    # (the blocks after an attention carry last-bit differences on, so not closer than that).
    monkeypatch.setattr(attention_8bit_processors, "attention_8bit", simulated_attention_8bit)
    simulated = run(transformer, inputs)
    quantization, found = relative_error(simulated, stock), relative_error(got, stock)
    assert 0.5 * quantization <= found <= 1.5 * quantization, (found, quantization)

    assert unfuse_qk_norm_rope(transformer) == 6
    assert all(type(m.processor) is FluxAttnProcessor for m in modules)
    assert torch.equal(run(transformer, inputs), stock)


def test_fusing_again_sets_the_attention_asked_for():
    transformer = tiny_flux()
    assert fuse_qk_norm_rope(transformer) == 3
    assert fuse_qk_norm_rope(transformer, attention="int8") == 3
    assert fuse_qk_norm_rope(transformer, attention="int8") == 0
    assert all(m.processor.attention == "int8" for m in attention_modules(transformer))
    assert fuse_qk_norm_rope(transformer) == 3
    assert all(m.processor.attention is None for m in attention_modules(transformer))


@pytest.mark.parametrize("attention", ["fp8", "INT8", 8, True, ""])
def test_bad_attention_values_raise_before_any_change(attention):
    transformer = tiny_flux()
    with pytest.raises(ValueError, match="attention must be None"):
        fuse_qk_norm_rope(transformer, attention=attention)
    assert all(type(m.processor) is FluxAttnProcessor for m in attention_modules(transformer))
    with pytest.raises(ValueError, match="attention must be None"):
        FluxNormRopeAttnProcessor(attention)


def test_int8_attention_refuses_head_dims_the_op_does_not_take_naming_the_layer():
    transformer = tiny_flux(head_dim=32)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn has head dimension 32"):
        fuse_qk_norm_rope(transformer, attention="int8")
    assert all(type(m.processor) is FluxAttnProcessor for m in attention_modules(transformer))
    assert fuse_qk_norm_rope(transformer) == 3  # the norm fusion alone takes any head dim


@pytest.mark.parametrize("class_name", ["QwenImageTransformer2DModel", "LTX2VideoTransformer3DModel"])
def test_int8_attention_on_another_architecture_says_it_does_not_apply(class_name):
    model, _ = build_tiny_dit(class_name, seed=0)
    with pytest.raises(ValueError, match=class_name):
        fuse_qk_norm_rope(model, attention="int8")


def test_int8_attention_on_an_architecture_without_flux_attention_says_so():
    transformer = convrot_diffusers.demo.sd3_transformer()
    with pytest.raises(ValueError, match="SD3Transformer2DModel has no FluxAttention module"):
        fuse_qk_norm_rope(transformer, attention="int8")


def test_int8_attention_where_no_module_has_the_stock_processor_says_so():
    class OwnProcessor(FluxAttnProcessor):  # a user's own processor: left alone
        pass

    transformer = tiny_flux()
    for module in attention_modules(transformer):
        module.set_processor(OwnProcessor())
    with pytest.raises(ValueError, match="FluxTransformer2DModel has no FluxAttention module with diffusers'"):
        fuse_qk_norm_rope(transformer, attention="int8")
    assert fuse_qk_norm_rope(transformer) == 0


def test_int8_attention_refuses_a_mask_and_float32_at_call_time(seed):
    transformer = tiny_flux()
    fuse_qk_norm_rope(transformer, attention="int8")
    attn = transformer.single_transformer_blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 9, attn.query_dim, generator=g).bfloat16()
    with torch.no_grad():
        attn(hidden)  # no mask, no angles: fine
        with pytest.raises(ValueError, match="takes no attention mask"):
            attn(hidden, attention_mask=torch.ones(1, 1, 9, 9, dtype=torch.bool))
        with pytest.raises(TypeError, match="bf16 or fp16"):
            attn.float()(hidden.float())


def test_int8_attention_without_the_norm_kernel_still_attends_in_8_bits(seed, kernel_calls, monkeypatch):
    # float64 angles: the norm kernel does not take them; torch's norms and rotary embedding run, then the op.
    transformer = tiny_flux()
    fuse_qk_norm_rope(transformer, attention="int8")
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 9, attn.query_dim, generator=g).bfloat16()
    context = torch.randn(1, 4, attn.query_dim, generator=g).bfloat16()
    angles = torch.rand(13, attn.head_dim // 2, generator=g, dtype=torch.float64).repeat_interleave(2, dim=1)
    rope = (angles.cos(), angles.sin())
    with torch.no_grad():
        got = attn(hidden, context, image_rotary_emb=rope)
        assert kernel_calls == []
        # diffusers' processor on the same call (the fused one hands calls it does not cover to it): torch's norms
        # and rotary embedding, then exact attention, or with its attention replaced, the simulated quantization.
        exact = FluxAttnProcessor()(attn, hidden, context, None, rope)
        simulate = lambda q, k, v, **_: simulated_attention_8bit(q, k, v)  # noqa: E731
        monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", simulate)
        simulated = FluxAttnProcessor()(attn, hidden, context, None, rope)
    # The op on torch's q and k is its simulation up to fp32 against float64 sums (mostly equal after the bf16
    # rounding; at most 0.28 of exact attention's distance over 1500 seeds), far from exact attention.
    for a, b, e in zip(got, simulated, exact, strict=True):
        assert relative_error(a.float(), b.float()) <= 0.5 * relative_error(e.float(), b.float())


def test_int8_attention_compiles_in_one_graph(seed):
    transformer = tiny_flux()
    fuse_qk_norm_rope(transformer, attention="int8")
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 7, attn.query_dim, generator=g).bfloat16()
    context = torch.randn(1, 4, attn.query_dim, generator=g).bfloat16()
    angles = torch.rand(11, attn.head_dim // 2, generator=g).repeat_interleave(2, dim=1)
    rope = (angles.cos(), angles.sin())
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(hidden, encoder_hidden_states=context, image_rotary_emb=rope)
        expected = attn(hidden, encoder_hidden_states=context, image_rotary_emb=rope)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
