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


def _cuda_backend_expected() -> bool:
    """CONVROT_CUDA=ON asks for it; AUTO (the default) builds it where nvcc and a GPU are present."""
    option = os.environ.get("CONVROT_CUDA", "AUTO")
    return option == "ON" or (option == "AUTO" and shutil.which("nvcc") is not None and torch.cuda.is_available())


@pytest.mark.skipif(not _cuda_backend_expected(), reason="neither CONVROT_CUDA=ON nor nvcc with a GPU")
def test_cuda_backend_is_compiled_where_asked_for():
    info = ck.build_info()
    assert info["cuda"], "CONVROT_CUDA=ON, or nvcc and a GPU are present, but the CUDA backend was not compiled in"
    assert any(arch.startswith("90a") for arch in info["cuda_archs"])


def test_primitives_are_torch_custom_ops():
    # The primitives are torch.library ops, so graphs capture them without a break.
    assert hasattr(torch.ops.convrot_kernels, "rht_quantize")
    f = torch.compile(lambda x: ck.rht(x, 64) * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(f(x), ck.rht(x, 64) * 2)
