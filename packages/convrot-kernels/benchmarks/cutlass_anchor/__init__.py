"""CUTLASS's Hopper int8 GEMM (W8A8 with row and column scales and a bias, bf16 output), loaded
from the library that build.sh makes, as an anchor for convrot_kernels.gemm.

Each configuration (tile, cluster, schedule) is one entry; `functions` gives them as callables
on a benchmark's input set, each checked once against gemm(bits=8) on the same codes before it
is timed, so that no fast wrong kernel becomes the anchor.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

import convrot_kernels as ck

DEFAULT_LIBRARY = Path(__file__).with_name("libint8_scaled_gemm.so")


class CutlassInt8:
    def __init__(self, path: str | Path = DEFAULT_LIBRARY):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build it with {Path(__file__).with_name('build.sh')}")
        self._lib = ctypes.CDLL(str(path))
        self.names: list[str] = []
        self._gemm = []
        self._workspace = []
        i = 0
        while hasattr(self._lib, f"convrot_anchor_name_{i}"):  # the configurations build.sh compiled
            name = getattr(self._lib, f"convrot_anchor_name_{i}")
            name.restype = ctypes.c_char_p
            self.names.append(name().decode())
            gemm = getattr(self._lib, f"convrot_anchor_gemm_{i}")
            gemm.restype = ctypes.c_int
            gemm.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
            self._gemm.append(gemm)
            workspace = getattr(self._lib, f"convrot_anchor_workspace_{i}")
            workspace.restype = ctypes.c_size_t
            workspace.argtypes = [ctypes.c_int] * 3
            self._workspace.append(workspace)
            i += 1

    def gemm(self, config: int, qa8, sa, qw8, sw, bias, workspace=None) -> torch.Tensor:
        """bf16 [M, N] = (int8 qa8 [M, K] . int8 qw8 [N, K]^T) * sa[:, None] * sw + bias."""
        m, k = qa8.shape
        n = qw8.shape[0]
        out = torch.empty(m, n, device=qa8.device, dtype=torch.bfloat16)
        status = self._gemm[config](
            qa8.data_ptr(), qw8.data_ptr(), sa.data_ptr(), sw.data_ptr(), bias.data_ptr(), out.data_ptr(),
            m, n, k, None if workspace is None else workspace.data_ptr(), torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"CUTLASS int8 {self.names[config]}: status {status} at M={m} N={n} K={k}")
        return out

    def functions(self, m: int, n: int, k: int, check_set: dict) -> dict[str, Callable]:
        """{name: fn(set)} for the configurations that run this shape and agree with gemm(bits=8)
        on check_set (keys qa8, sa8, qw8, sw8, bias, as in bench_gemm_sm90.make_set)."""
        s = check_set
        reference = ck.gemm(s["qa8"], s["sa8"], s["qw8"], s["sw8"], s["bias"], bits=8).float()
        functions = {}
        for config, name in enumerate(self.names):
            size = self._workspace[config](m, n, k)
            workspace = torch.empty(size, device="cuda", dtype=torch.uint8) if size else None
            try:
                out = self.gemm(config, s["qa8"], s["sa8"], s["qw8"], s["sw8"], s["bias"], workspace).float()
            except RuntimeError as error:
                print(error, flush=True)
                continue
            # bf16 outputs of the same sums: they differ by the last bit where CUTLASS fuses the
            # bias add into an FMA, never by more than bf16's rounding of the largest output.
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            if not error < 2.0**-7:
                print(f"CUTLASS int8 {name}: max error {error:.2e} of the largest output; left out", flush=True)
                continue

            def run(s, config=config, workspace=workspace):
                return self.gemm(config, s["qa8"], s["sa8"], s["qw8"], s["sw8"], s["bias"], workspace)

            functions[f"cutlass {name}"] = run
        return functions
