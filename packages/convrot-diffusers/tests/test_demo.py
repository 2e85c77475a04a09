import torch

from convrot_diffusers.demo import DEMOS, demo_name, demo_pipeline
from convrot_diffusers.demo_tokenizers import clip_like_tokenizer, t5_like_tokenizer


def test_tokenizers_are_built_offline_with_the_expected_special_tokens():
    clip, t5 = clip_like_tokenizer(), t5_like_tokenizer()
    ids = clip("Ünïcode prompt!", padding="max_length", max_length=32, truncation=True).input_ids
    assert ids[0] == clip.bos_token_id == 0 and clip.eos_token_id == 1 and ids[-1] == clip.pad_token_id
    assert len(ids) == 32 and clip.model_max_length == 77
    ids = t5("a cat").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert t5.decode(ids, skip_special_tokens=True) == "a cat"


def test_demo_weights_are_the_same_on_every_build():
    first = demo_pipeline("sd3").transformer.state_dict()
    torch.manual_seed(12345)  # the global RNG state must not matter
    second = demo_pipeline("sd3").transformer.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_demo_names():
    assert demo_name(None) == "flux"
    assert demo_name("demo:pixart-alpha") == "pixart-alpha"
    assert len(DEMOS) == 5
    assert [name for name, demo in DEMOS.items() if demo.video] == ["wan"]
    try:
        demo_name("demo:sdxl")
    except ValueError as error:
        assert "demo:flux" in str(error)
    else:
        raise AssertionError("unknown demo accepted")


def test_the_video_demo_keeps_its_vae_in_float32():
    pipe = demo_pipeline("wan")
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
