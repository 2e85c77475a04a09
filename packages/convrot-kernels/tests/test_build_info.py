import os
import shutil

import pytest
import torch

import convrot_kernels as ck


def test_build_info_reports_the_backends():
    info = ck.build_info()
    assert info["version"] == ck.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["cuda"] == bool(info["cuda_archs"])


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("CONVROT_CUDA") == "OFF",
    reason="no nvcc, or CONVROT_CUDA=OFF: the CUDA backend is not expected",
)
def test_cuda_backend_is_compiled_where_nvcc_is_present():
    info = ck.build_info()
    assert info["cuda"], "nvcc is on PATH but the CUDA backend was not compiled in"
    assert any(arch.startswith("90a") for arch in info["cuda_archs"])


def test_primitives_are_torch_custom_ops():
    # The primitives are torch.library ops, so graphs capture them without a break.
    assert hasattr(torch.ops.convrot_kernels, "rht_quantize")
    f = torch.compile(lambda x: ck.rht(x, 64) * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(f(x), ck.rht(x, 64) * 2)
