import pytest
import torch
from torch import nn

import convrot


def tiny_model(device="cpu", dtype=torch.float32):
    """Two ConvLinear layers with a ReLU (exact in eager and compiled code) between: W4A4, then W8A8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to(device=device, dtype=dtype)
    return convrot.quantize_model(model, policy={"2": "w8a8"}, group_size=64, progress=False)


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


def test_fake_tensors_trace_a_layer():
    layer = convrot.ConvLinear4bit.from_linear(nn.Linear(64, 16), group_size=16)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 3, 64, dtype=torch.float16))
        with torch.compiler.set_stance("default"):
            y = torch.ops.convrot_kernels.linear(x, layer.qweight, layer.weight_scale, None, None, 4, 4, 16)
        assert y.shape == (2, 3, 16) and y.dtype == torch.float16


@pytest.mark.parametrize("rotation", convrot.ROTATIONS)
def test_torch_compile_fullgraph_of_each_rotation_matches_eager(rotation):
    layer = convrot.ConvLinear4bit.from_linear(nn.Linear(64, 16), group_size=16, rotation=rotation)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_torch_compile_fullgraph_of_a_residual_normed_input_matches_eager():
    layers = [convrot.ConvLinear4bit.from_linear(nn.Linear(64, n), group_size=16) for n in (32, 16)]
    x, branch = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    shift, scale, gate = torch.randn(2, 3 * 64).chunk(3, dim=1)

    def residual(a, b, g, sc, sh):
        return convrot.ConvLinear.forward_shared_residual_normed(layers, a, b, g, sc, sh)

    (total, outputs), (eager_total, eager_outputs) = (
        torch.compile(residual, fullgraph=True)(x, branch, gate, scale, shift),
        residual(x, branch, gate, scale, shift),
    )
    assert torch.equal(total, eager_total)
    for got, expected in zip(outputs, eager_outputs, strict=True):
        assert torch.equal(got, expected)


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
