"""A short CPU demonstration of the ConvRot kernels on DiT-like activations.

Activations of diffusion transformers carry per-token offsets (from AdaLN) and a
few outlier channels. This builds such a tensor, quantizes a linear layer's input
and weight to 4 bits with and without the regular Hadamard rotation, and prints
how close the int4 GEMM lands to the float result.
"""

import torch

import convrot_kernels as ck


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(signal.pow(2).sum() / (signal - approx).pow(2).sum()))


def _backend() -> str:
    """The device the demo runs on (CUDA where this build holds it and a GPU is visible), printed with why."""
    info = ck.build_info()
    if info["cuda"] and torch.cuda.is_available():
        print(f"convrot_kernels {ck.__version__}: CUDA backend, on {torch.cuda.get_device_name()}")
        return "cuda"
    if info["cuda"]:
        held = f"holds the CUDA backend ({', '.join(info['cuda_archs'])}) but no GPU is visible"
    else:
        held = "has no CUDA backend: CONVROT_CUDA=ON builds it"
    print(f"convrot_kernels {ck.__version__}: CPU backend, {torch.get_num_threads()} threads; this build {held}")
    return "cpu"


def main() -> None:
    device = _backend()
    g = torch.Generator().manual_seed(0)
    tokens, width, out_features = 256, 1024, 512
    x = torch.randn(tokens, width, generator=g)
    x += 4 * torch.randn(tokens, 1, generator=g)  # per-token offset, constant across channels
    x[:, torch.randperm(width, generator=g)[:8]] *= 30  # a few large outlier channels
    w = torch.randn(out_features, width, generator=g) / width**0.5
    bias = torch.randn(out_features, generator=g)
    x, w, bias = x.to(device), w.to(device), bias.to(device)
    exact = x @ w.T + bias

    print(f"x: {tokens} tokens x {width} channels, W: {out_features} x {width}, W4A4")
    qa, sa = ck.quantize(x, 4)
    qw, sw = ck.quantize(w, 4)
    plain = ck.gemm(qa, sa, qw, sw, bias, out_dtype=torch.float32)
    print(f"  no rotation:                      SQNR {sqnr_db(exact, plain):5.1f} dB")
    for group in (64, 256, 1024):
        qa, sa = ck.rht_quantize(x, group, 4)
        qw, sw = ck.rht_quantize(w, group, 4)
        rotated = ck.gemm(qa, sa, qw, sw, bias, out_dtype=torch.float32)
        print(f"  regular Hadamard, group {group:4d}:    SQNR {sqnr_db(exact, rotated):5.1f} dB")
    print(f"4-bit weight bytes: {qw.numel() + 4 * sw.numel()} vs bf16 {2 * w.numel()}")


if __name__ == "__main__":
    main()
