import pytest
from torch import nn

from convrot_diffusers.demo import flux_transformer, pixart_transformer, sd3_transformer
from convrot_diffusers.detect import (
    UnsupportedModelError,
    architecture_for_class,
    architecture_of,
    transformer_of,
)


@pytest.mark.parametrize(
    "build, name", [(flux_transformer, "flux"), (pixart_transformer, "pixart"), (sd3_transformer, "sd3")]
)
def test_architecture_from_transformer_class(build, name):
    assert architecture_of(build()).name == name


def test_unsupported_transformer_lists_what_is_supported():
    with pytest.raises(UnsupportedModelError) as error:
        architecture_of(nn.Linear(4, 4))
    message = str(error.value)
    assert "Linear" in message
    for supported in ("FluxTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel"):
        assert supported in message
    assert "\n" not in message


def test_unet_pipeline_is_refused():
    class UNetPipeline:
        unet = nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="UNet"):
        transformer_of(UNetPipeline())


def test_transformer_of_accepts_a_pipeline_or_a_transformer():
    transformer = pixart_transformer()

    class Pipe:
        pass

    pipe = Pipe()
    pipe.transformer = transformer
    assert transformer_of(pipe) is transformer
    assert transformer_of(transformer) is transformer


def test_unknown_class_name():
    with pytest.raises(UnsupportedModelError, match="HunyuanDiT2DModel"):
        architecture_for_class("HunyuanDiT2DModel")
