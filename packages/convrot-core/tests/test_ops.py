import pytest
import torch
from torch import nn

import convrot
from convrot.ops import normed_input_linear, quantized_linear, residual_normed_input_linear, shared_input_linear


def tiny_model(device="cpu", dtype=torch.float32):
    """Two ConvLinear layers with a ReLU (exact in eager and compiled code) between: W4A4, then W8A8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to(device=device, dtype=dtype)
    return convrot.quantize_model(model, policy={"2": "w8a8"}, group_size=64, progress=False)


@pytest.mark.parametrize("rotation", convrot.ROTATIONS)
@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck(rotation, bits):
    cls = convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit
    layer = cls.from_linear(nn.Linear(64, 16), group_size=16, rotation=rotation)
    for x in (torch.randn(3, 64), torch.randn(2, 5, 64, dtype=torch.bfloat16)):
        for bias in (layer.bias, None):
            args = (x, layer.qweight, layer.weight_scale, bias, bits, 16, rotation)
            torch.library.opcheck(quantized_linear, args)


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_input_in_parts(bits):
    cls = convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit
    layer = cls.from_linear(nn.Linear(64, 16), group_size=16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for x1, x2, gelu_from in ((x[..., :16], x[..., 16:], 32), (x, None, 0), (x[..., :48], x[..., 48:], -1)):
        args = (x1, layer.qweight, layer.weight_scale, layer.bias, bits, 16, "regular", x2, gelu_from)
        torch.library.opcheck(quantized_linear, args)


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_shared_input(bits):
    cls = convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit
    layers = [cls.from_linear(nn.Linear(64, n), group_size=16) for n in (16, 32)]
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for x1, x2, gelu_from in ((x, None, -1), (x[..., :16], x[..., 16:], 32)):
        args = (
            x1,
            [layer.qweight for layer in layers],
            [layer.weight_scale for layer in layers],
            [layers[0].bias, None],
            bits,
            16,
            "regular",
            x2,
            gelu_from,
        )
        torch.library.opcheck(shared_input_linear, args)


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_normed_input(bits):
    cls = convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit
    layers = [cls.from_linear(nn.Linear(64, n), group_size=16) for n in (16, 32)]
    x, prefix = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 3, 64, dtype=torch.bfloat16)
    shift, scale, _ = torch.randn(2, 3 * 64, dtype=torch.bfloat16).chunk(3, dim=1)
    weights = ([layer.qweight for layer in layers], [layer.weight_scale for layer in layers], [layers[0].bias, None])
    for text in (prefix, None):
        torch.library.opcheck(normed_input_linear, (x, scale, shift, 1e-6, text, *weights, bits, 16, "regular"))


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_residual_normed_input(bits):
    cls = convrot.ConvLinear4bit if bits == 4 else convrot.ConvLinear8bit
    layers = [cls.from_linear(nn.Linear(64, n), group_size=16) for n in (16, 32)]
    x, branch = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 5, 64, dtype=torch.bfloat16)
    shift, scale, gate = torch.randn(2, 3 * 64, dtype=torch.bfloat16).chunk(3, dim=1)
    weights = ([layer.qweight for layer in layers], [layer.weight_scale for layer in layers], [layers[0].bias, None])
    args = (x, branch, gate, scale, shift, 1e-6, *weights, bits, 16, "regular")
    torch.library.opcheck(residual_normed_input_linear, args)


def test_torch_compile_fullgraph_of_a_normed_input_matches_eager():
    layers = [convrot.ConvLinear4bit.from_linear(nn.Linear(64, n), group_size=16) for n in (32, 16)]
    x, prefix = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    shift, scale, _ = torch.randn(2, 3 * 64).chunk(3, dim=1)

    def normed(a, t, sc, sh):
        return convrot.ConvLinear.forward_shared_normed(layers, a, sc, sh, prefix=t)

    compiled = torch.compile(normed, fullgraph=True)
    for got, expected in zip(compiled(x, prefix, scale, shift), normed(x, prefix, scale, shift), strict=True):
        assert torch.equal(got, expected)


def test_torch_compile_fullgraph_of_a_shared_input_matches_eager():
    layers = [convrot.ConvLinear4bit.from_linear(nn.Linear(64, n), group_size=16) for n in (32, 16)]
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda a: convrot.ConvLinear.forward_shared(layers, a), fullgraph=True)
    for got, layer in zip(compiled(x), layers, strict=True):
        assert torch.equal(got, layer(x))


def test_torch_compile_fullgraph_of_input_in_parts_matches_eager():
    layer = convrot.ConvLinear4bit.from_linear(nn.Linear(64, 32), group_size=16)
    layer.gelu_from = 16
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda a, b: layer(a, b), fullgraph=True)
    assert torch.equal(compiled(x[:, :16], x[:, 16:]), layer(x[:, :16], x[:, 16:]))


def test_fake_implementation_shapes():
    layer = convrot.ConvLinear4bit.from_linear(nn.Linear(64, 16), group_size=16)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 64, dtype=torch.float16))
        y = torch.ops.convrot.quantized_linear(
            x, mode.from_tensor(layer.qweight), mode.from_tensor(layer.weight_scale), None, 4, 16, "regular"
        )
        assert y.shape == (2, 3, 16) and y.dtype == torch.float16


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_model()
    x = torch.randn(2, 5, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.gpu
def test_cuda_graph_capture_replays_the_eager_result():
    model = tiny_model("cuda", torch.bfloat16)
    static_x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    for _ in range(3):
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_y, model(x))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_torch_compile_fullgraph(mode):
    model = tiny_model("cuda", torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):
        x = torch.randn(3, 7, 64, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(compiled(x), model(x))
