import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import convrot_diffusers
from convrot_diffusers import fuse_qk_norm_rope, qk_norm_rope, unfuse_qk_norm_rope
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
