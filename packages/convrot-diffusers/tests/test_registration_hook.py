"""``import convrot_diffusers`` registers ConvRot with diffusers whichever is imported first, and
imports neither itself."""

import subprocess
import sys

import pytest

REGISTERED = "from diffusers.quantizers import auto\nprint('convrot' in auto.AUTO_QUANTIZER_MAPPING)"


@pytest.mark.parametrize(
    "imports",
    [
        "import convrot_diffusers\nfrom diffusers.models import FluxTransformer2DModel",  # diffusers via a submodule
        "import diffusers\nimport convrot_diffusers",
        "from convrot_diffusers import quantize_pipeline",  # diffusers first imported by the package's own module
    ],
)
def test_registered_in_either_order(imports):
    result = subprocess.run([sys.executable, "-c", f"{imports}\n{REGISTERED}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]


def test_a_saved_transformer_loads_with_from_pretrained_after_a_bare_import(tmp_path):
    script = f"""
import convrot_diffusers
from diffusers import SD3Transformer2DModel
from convrot_diffusers.demo import sd3_transformer
from convrot_diffusers.pipeline import quantize_transformer
from convrot_diffusers.checkpoint import save_quantized
save_quantized(quantize_transformer(sd3_transformer(), "w4a4", progress=False), {str(tmp_path)!r})
loaded = SD3Transformer2DModel.from_pretrained({str(tmp_path)!r})
print(type(loaded.transformer_blocks[0].attn.to_q).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "ConvLinear4bit"
