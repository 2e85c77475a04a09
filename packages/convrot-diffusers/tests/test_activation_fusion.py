import copy

import diffusers
import numpy as np
import pytest
import torch
from conftest import build, generate
from diffusers import FirstBlockCacheConfig
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.activations import GELU
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

import convrot
import convrot_diffusers
import convrot_kernels
from convrot_diffusers import activation_fusion, fuse_activations, unfuse_activations
from convrot_diffusers.demo import flux_transformer, pixart_transformer
from convrot_diffusers.versions import UnsupportedDiffusersError


def expected_fusions(transformer) -> int:
    feed_forwards = [m for m in transformer.modules() if type(m).__name__ == "FeedForward"]
    flux_blocks = len(getattr(transformer, "single_transformer_blocks", []))
    if type(transformer).__name__ == "FluxTransformer2DModel":
        flux_blocks += len(transformer.transformer_blocks)
    return len(feed_forwards) + flux_blocks


@pytest.mark.parametrize("name", ["flux", "pixart-sigma", "sd3"])
def test_simulated_outputs_are_bit_identical_and_unfuse_restores_the_model(name, seed):
    pipe = build(name)
    convrot_diffusers.quantize_pipeline(pipe, preset="w4a4", progress=False)
    transformer = pipe.transformer
    convrot.set_simulation(transformer, torch.float64)
    reference = np.asarray(generate(pipe, name, seed))
    before = {key: tensor.clone() for key, tensor in transformer.state_dict().items()}

    fused = fuse_activations(pipe)
    assert fused == expected_fusions(transformer) > 0
    assert fuse_activations(pipe) == 0  # already fused
    assert np.array_equal(np.asarray(generate(pipe, name, seed)), reference), f"seed {seed}"
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)

    assert unfuse_activations(pipe) == fused
    assert all(layer.gelu_from is None for layer in transformer.modules() if isinstance(layer, convrot.ConvLinear))
    assert np.array_equal(np.asarray(generate(pipe, name, seed)), reference), f"seed {seed}"


@pytest.mark.parametrize("name", ["flux", "pixart-sigma", "sd3"])
def test_kernel_outputs_match_the_unfused_model(name, seed):
    """The kernels' GELU may round a value the other way now and then, and Flux single blocks' norm sums its
    mean and variance in another order than torch (docs/format.md): close, not equal."""
    pipe = build(name)
    convrot_diffusers.quantize_pipeline(pipe, preset="w4a4", progress=False)
    reference = np.asarray(generate(pipe, name, seed), dtype=np.float64)
    fuse_activations(pipe)
    fused = np.asarray(generate(pipe, name, seed), dtype=np.float64)
    unfuse_activations(pipe)
    assert np.array_equal(np.asarray(generate(pipe, name, seed)), reference)
    # A last-bit difference of a norm moves a 4-bit code now and then, and the denoising steps carry it on:
    # about 0.7 of 255 on average over the Flux demo's pixels (0 for PixArt and SD3, which keep torch's norms).
    assert np.abs(fused - reference).mean() <= 1.5, f"seed {seed}"


def test_unquantized_and_erf_gelu_modules_are_left_alone():
    transformer = flux_transformer()
    assert fuse_activations(transformer) == 0  # bf16 layers: nothing to fuse into
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    block = transformer.transformer_blocks[0]
    block.ff.net[0].approximate = "none"  # an erf GELU: the kernels apply the tanh approximation only
    assert fuse_activations(transformer) == expected_fusions(transformer) - 1
    assert block.ff.net[2].gelu_from is None and type(block.ff.net[0]) is GELU


def single_block_inputs(g: torch.Generator, dim: int, text: int = 5, image: int = 7, batch: int = 2):
    hidden = torch.randn(batch, image, dim, generator=g) * 3 + 1
    encoder = torch.randn(batch, text, dim, generator=g) * 2
    return hidden, encoder, torch.randn(batch, dim, generator=g)


def modulation(block, temb):
    return block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)  # shift, scale, gate


def test_single_blocks_norm_the_joint_sequence_with_the_kernel():
    unfused, transformer = flux_transformer(), flux_transformer()  # the same seeded weights
    for model in (unfused, transformer):
        convrot_diffusers.quantize_transformer(model, "w4a4", progress=False)
    fuse_activations(transformer)
    block = transformer.single_transformer_blocks[0]
    hidden, encoder, temb = single_block_inputs(torch.Generator().manual_seed(0), block.proj_mlp.in_features)
    shift, scale, _ = modulation(block, temb)
    assert activation_fusion._kernel_norm(block, encoder, hidden, shift)
    norm = activation_fusion._joint_norm(block, encoder, hidden, shift, scale, True)
    stock_norm, _ = block.norm(torch.cat([encoder, hidden], dim=1), emb=temb)
    assert torch.equal(norm, convrot_kernels.layer_norm_modulate(hidden, scale, shift, eps=1e-6, prefix=encoder))
    torch.testing.assert_close(norm, stock_norm, rtol=1e-5, atol=1e-5)  # the mean and variance's summation order
    # A last-bit difference of the norm could move a 4-bit code by one step: close, not equal.
    reference = unfused.single_transformer_blocks[0](hidden, encoder, temb)
    for got, expected in zip(block(hidden, encoder, temb), reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_single_blocks_keep_a_norm_the_kernel_does_not_compute():
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    fuse_activations(transformer)
    block = transformer.single_transformer_blocks[0]
    dim = block.proj_mlp.in_features
    block.norm.norm = torch.nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6)  # an affine norm: not covered
    hidden, encoder, temb = single_block_inputs(torch.Generator().manual_seed(1), dim)
    shift, scale, _ = modulation(block, temb)
    assert not activation_fusion._kernel_norm(block, encoder, hidden, shift)
    norm = activation_fusion._joint_norm(block, encoder, hidden, shift, scale, False)
    stock_norm, _ = block.norm(torch.cat([encoder, hidden], dim=1), emb=temb)
    assert torch.equal(norm, stock_norm)


def count_calls(monkeypatch, name: str) -> list[int]:
    """Patches ConvLinear.<name> to record how many layers each call is given."""
    calls, method = [], getattr(convrot.ConvLinear, name)

    def counted(layers, *args, **kwargs):
        calls.append(len(layers))
        return method(layers, *args, **kwargs)

    monkeypatch.setattr(convrot.ConvLinear, name, counted)
    return calls


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_single_blocks_norm_and_quantize_the_input_of_proj_mlp_and_attention_once(fuse_qkv, monkeypatch):
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    if fuse_qkv:
        convrot_diffusers.fuse_qkv_projections(transformer)
    fuse_activations(transformer)
    block = transformer.single_transformer_blocks[0]
    normed_calls = count_calls(monkeypatch, "forward_shared_normed")
    shared_calls = count_calls(monkeypatch, "forward_shared")
    g = torch.Generator().manual_seed(2)
    hidden, encoder, temb = single_block_inputs(g, block.proj_mlp.in_features)
    joint = torch.cat([encoder, hidden], dim=1)
    theta = torch.rand(12, block.attn.head_dim, generator=g) * 6
    rope = (theta.cos(), theta.sin())
    shift, scale, _ = modulation(block, temb)
    norm = activation_fusion._joint_norm(block, encoder, hidden, shift, scale, True)

    def mlp_and_attention():
        return activation_fusion._mlp_and_attention(block, encoder, hidden, joint, shift, scale, rope, None)

    unshared = mlp_and_attention()  # diffusers' processor: no sharing
    assert normed_calls == shared_calls == []
    convrot_diffusers.fuse_qk_norm_rope(transformer)
    expected = (block.proj_mlp(norm), block.attn(hidden_states=norm, image_rotary_emb=rope))
    got = mlp_and_attention()
    assert normed_calls == [2 if fuse_qkv else 4] and shared_calls == []
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # the same codes, GEMMs and kernels as each layer on its own
    torch.testing.assert_close(unshared[1], expected[1], rtol=1e-4, atol=1e-4)  # stock vs fused q/k norms

    block.norm.norm = torch.nn.LayerNorm(block.proj_mlp.in_features, eps=1e-6)  # affine: the torch norm, shared
    normed_calls.clear()
    mlp_and_attention()
    assert normed_calls == [] and shared_calls == [2 if fuse_qkv else 4]

    block.attn.norm_q = torch.nn.LayerNorm(block.attn.head_dim)  # a norm the processor does not fuse
    shared_calls.clear()
    mlp_and_attention()
    assert normed_calls == shared_calls == []


class KernelLayerNorm(torch.nn.Module):
    """layer_norm_modulate's LayerNorm alone (scale and shift 0 leave the normed rows as they are)."""

    def forward(self, x):
        zeros = x.new_zeros(x.shape[0], x.shape[-1])
        return convrot_kernels.layer_norm_modulate(x, zeros, zeros, eps=1e-6)


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_double_blocks_norm_each_stream_inside_the_quantization_of_its_layers(fuse_qkv, monkeypatch):
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    if fuse_qkv:
        convrot_diffusers.fuse_qkv_projections(transformer)
    fuse_activations(transformer)
    convrot_diffusers.fuse_qk_norm_rope(transformer)
    block = transformer.transformer_blocks[0]
    assert type(block) is activation_fusion.ConvRotFluxTransformerBlock
    normed_calls = count_calls(monkeypatch, "forward_shared_normed")
    residual_calls = count_calls(monkeypatch, "forward_shared_residual_normed")
    g = torch.Generator().manual_seed(3)
    hidden, encoder, temb = single_block_inputs(g, block.attn.inner_dim)
    theta = torch.rand(12, block.attn.head_dim, generator=g) * 6
    rope = (theta.cos(), theta.sin())
    got = block(hidden, encoder, temb, image_rotary_emb=rope)
    assert normed_calls == ([1, 1] if fuse_qkv else [3, 3])  # the image stream's projections, then the text's
    assert residual_calls == [1, 1]  # each stream's feed-forward input
    # diffusers' forward with the kernel's LayerNorm as its four norms computes the same numbers op for op.
    stock = [block.norm1.norm, block.norm1_context.norm, block.norm2, block.norm2_context]
    block.norm1.norm = block.norm1_context.norm = block.norm2 = block.norm2_context = KernelLayerNorm()
    expected = FluxTransformerBlock.forward(block, hidden, encoder, temb, image_rotary_emb=rope)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)

    # Norms the kernel does not compute: AdaLayerNormZero's own formula, diffusers' attention call and ops.
    block.norm1.norm, block.norm1_context.norm, block.norm2, block.norm2_context = stock
    block.norm1.norm = torch.nn.LayerNorm(block.attn.inner_dim, eps=1e-6)  # affine
    block.norm2 = block.norm2_context = torch.nn.LayerNorm(block.attn.inner_dim, eps=1e-6)
    normed_calls.clear()
    residual_calls.clear()
    got = block(hidden, encoder, temb, image_rotary_emb=rope)
    assert normed_calls == residual_calls == []
    expected = FluxTransformerBlock.forward(block, hidden, encoder, temb, image_rotary_emb=rope)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def quantized_flux(simulated: bool = False):
    transformer = flux_transformer()
    convrot_diffusers.quantize_transformer(transformer, "w4a4", progress=False)
    if simulated:
        convrot.set_simulation(transformer, torch.float64)
    return transformer


def block_call(block, g: torch.Generator):
    """Random inputs for a Flux block of either kind, with rotary angles: (args, kwargs)."""
    dim = block.attn.inner_dim
    hidden, encoder, temb = single_block_inputs(g, dim)
    theta = torch.rand(12, block.attn.head_dim, generator=g) * 6
    return (hidden, encoder, temb), {"image_rotary_emb": (theta.cos(), theta.sin())}


def test_fused_modules_are_classes_of_their_own_holding_the_same_submodules():
    transformer = quantized_flux()
    stock_modules = dict(transformer.named_modules())
    fuse_activations(transformer)
    text = repr(transformer)
    for name in ("ConvRotFluxSingleTransformerBlock", "ConvRotFluxTransformerBlock", "DeferredGELU"):
        assert name in text
    single, double = activation_fusion.ConvRotFluxSingleTransformerBlock, activation_fusion.ConvRotFluxTransformerBlock
    assert all(type(b) is single for b in transformer.single_transformer_blocks)
    assert all(type(b) is double for b in transformer.transformer_blocks)
    # The same instances (a subclass of the stock class each): submodules and parameters untouched, no forward
    # bound on an instance.
    assert all(stock_modules[name] is module for name, module in transformer.named_modules())
    assert isinstance(transformer.single_transformer_blocks[0], FluxSingleTransformerBlock)
    assert not any("forward" in vars(module) for module in transformer.modules())
    unfuse_activations(transformer)
    assert "ConvRot" not in repr(transformer) and "DeferredGELU" not in repr(transformer)
    assert {type(b) for b in transformer.single_transformer_blocks} == {FluxSingleTransformerBlock}


@pytest.mark.parametrize("kind", ["single", "double"])
@pytest.mark.parametrize("processor", ["stock", "normrope"])
@pytest.mark.parametrize("simulated", [True, False])
def test_each_fused_block_matches_the_stock_block(kind, processor, simulated, seed):
    """Against the same quantized block unfused: equal in float simulation (torch's norms, the same GELU
    rounding); with the kernels, the norms' summation order may move a value by an ulp and a 4-bit code by a
    step (docs/format.md): close."""
    stock = quantized_flux(simulated)
    fused = copy.deepcopy(stock)
    fuse_activations(fused)
    if processor == "normrope":
        for model in (stock, fused):
            convrot_diffusers.fuse_qk_norm_rope(model)
    blocks = "single_transformer_blocks" if kind == "single" else "transformer_blocks"
    pairs = zip(getattr(stock, blocks), getattr(fused, blocks), strict=True)
    for index, (stock_block, fused_block) in enumerate(pairs):
        assert isinstance(fused_block, activation_fusion.BLOCK_CLASSES) and type(stock_block) in (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )
        args, kwargs = block_call(stock_block, torch.Generator().manual_seed(seed + index))
        with torch.no_grad():
            expected, got = stock_block(*args, **kwargs), fused_block(*args, **kwargs)
        for a, b in zip(got, expected, strict=True):
            if simulated:
                assert torch.equal(a, b), f"seed {seed}"
            else:
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=f"seed {seed}")


class CountingHook(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_a_diffusers_hook_installed_after_fusion_survives_unfusing(seed):
    transformer = quantized_flux(simulated=True)
    reference = copy.deepcopy(transformer)
    fuse_activations(transformer)
    blocks = (transformer.single_transformer_blocks[0], transformer.transformer_blocks[0])
    hooks = []
    for block in blocks:
        hook = CountingHook()
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "count")
        hooks.append(hook)
    call = block_call(blocks[1], torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for block in blocks:
            block(*call[0], **call[1])
        assert [hook.calls for hook in hooks] == [1, 1]

        assert unfuse_activations(transformer) > 0
        for block, stock, hook in zip(
            blocks, (reference.single_transformer_blocks[0], reference.transformer_blocks[0]), hooks, strict=True
        ):
            assert type(block) in (FluxSingleTransformerBlock, FluxTransformerBlock)
            assert HookRegistry.check_if_exists_or_initialize(block).get_hook("count") is hook
            # The hook still runs, around the stock forward now.
            for a, b in zip(block(*call[0], **call[1]), stock(*call[0], **call[1]), strict=True):
                assert torch.equal(a, b), f"seed {seed}"
        assert [hook.calls for hook in hooks] == [2, 2]

    # Fusing a module that already carries a hook is refused: the hook would keep calling the stock forward.
    with pytest.raises(ValueError, match="already carry diffusers hooks"):
        fuse_activations(transformer)
    assert not any(isinstance(m, activation_fusion.FusedModule) for m in transformer.modules())


def test_diffusers_caching_and_regional_compilation_see_the_fused_blocks(seed):
    transformer = quantized_flux()
    fuse_activations(transformer)
    # FirstBlockCache looks the blocks up by class in diffusers' block registry.
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    kwargs = flux_inputs(transformer, torch.Generator().manual_seed(seed))
    with torch.no_grad(), transformer.cache_context("cond"):
        first = transformer(**kwargs, return_dict=False)[0]
        again = transformer(**kwargs, return_dict=False)[0]  # the same input: the cache answers
    # The cached step adds the stored residual of the skipped blocks back: equal up to that addition's rounding.
    assert torch.isfinite(first).all()
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)
    transformer.disable_cache()

    transformer.compile_repeated_blocks()  # finds blocks by class name; compiles lazily
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    unfuse_activations(transformer)
    assert "_repeated_blocks" not in vars(transformer)


def flux_inputs(transformer, g: torch.Generator) -> dict:
    config = transformer.config
    return dict(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(1, generator=g),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.full((1,), 3.5),
    )


@pytest.mark.parametrize("found", ["0.38.0", "0.43.0", "0.43.0.dev0"])
def test_block_fusion_is_refused_outside_the_tested_diffusers_range(found, monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", found)
    transformer = quantized_flux()
    with pytest.raises(UnsupportedDiffusersError, match=rf"written for diffusers >= 0.39.0, < 0.43 .*found {found}"):
        fuse_activations(transformer)
    assert not any(isinstance(m, activation_fusion.FusedModule) for m in transformer.modules())
    assert all(m.gelu_from is None for m in transformer.modules() if isinstance(m, convrot.ConvLinear))
    # Feed-forwards alone (PixArt, SD3) do not depend on diffusers' block forwards.
    pixart = pixart_transformer()
    convrot_diffusers.quantize_transformer(pixart, "w4a4", progress=False)
    assert fuse_activations(pixart) == len(pixart.transformer_blocks)
