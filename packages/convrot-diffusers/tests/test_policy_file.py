import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from test_diffusers_integration import forward, inputs

import convrot
import convrot_diffusers
from convrot_diffusers.cli import main
from convrot_diffusers.demo import flux_transformer
from convrot_diffusers.diffusers_integration import ConvRotConfig
from convrot_diffusers.policy_file import PolicyError, read_policy

# Every kind but skip inside the blocks, each pattern deciding some layer of the demo Flux.
POLICY = {
    "transformer_blocks.0.attn.to_q": "w4a8g64",
    "transformer_blocks.*.ff.net.2": "w8a8",
    "single_transformer_blocks.*.proj_out": "skip",
    "single_transformer_blocks.*": "w4a8",
    "transformer_blocks.*": "w4a4g64",
    "*": "skip",
}


def kinds_of(transformer) -> dict[str, str]:
    return {name: layer.kind for name, layer in convrot.quantized_layers(transformer).items()}


def expected_kinds(transformer, policy) -> dict[str, str]:
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    kinds = {name: convrot.policy.layer_kind(name, policy)[0] for name in names}
    return {name: kind for name, kind in kinds.items() if kind != "skip"}


def test_a_policy_gives_each_layer_its_scheme_and_saves_and_loads_exactly(tmp_path, seed):
    transformer = flux_transformer().to(torch.bfloat16)
    wanted = expected_kinds(transformer, POLICY)
    convrot_diffusers.quantize_transformer(transformer, policy=POLICY, progress=False)
    assert kinds_of(transformer) == wanted and len(set(wanted.values())) == 4
    assert transformer.config.quantization_config.policy == POLICY
    assert transformer.config.quantization_config.preset is None

    transformer.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["policy"] == [list(rule) for rule in POLICY.items()]  # in order: the first match wins
    header = convrot.read_header(tmp_path / "saved" / "diffusion_pytorch_model.safetensors")
    assert {name: spec["kind"] for name, spec in header.layers.items()} == wanted
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    assert kinds_of(loaded) == wanted
    assert list(loaded.config.quantization_config.policy.items()) == list(POLICY.items())
    kwargs = inputs(transformer, torch.Generator().manual_seed(seed))
    assert torch.equal(forward(transformer, kwargs), forward(loaded, kwargs))

    # Quantize on load with the same policy: the same layers and outputs.
    flux_transformer().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    on_load = FluxTransformer2DModel.from_pretrained(
        tmp_path / "bf16", quantization_config=ConvRotConfig(policy=POLICY), torch_dtype=torch.bfloat16
    )
    assert kinds_of(on_load) == wanted
    assert torch.equal(forward(transformer, kwargs), forward(on_load, kwargs))


def test_bad_policies_are_refused_before_any_layer_is_converted(tmp_path):
    transformer = flux_transformer()
    with pytest.raises(ValueError, match="not both"):
        convrot_diffusers.quantize_transformer(transformer, "w4a4", policy=POLICY)
    with pytest.raises(PolicyError, match="did you mean 'transformer_blocks.0.attn.to_q'"):
        convrot_diffusers.quantize_transformer(transformer, policy={"transformer_blocks.0.attn.to_qq": "w4a8"})
    with pytest.raises(PolicyError, match="decides no layer"):
        convrot_diffusers.quantize_transformer(transformer, policy={"*": "w4a4", "transformer_blocks.*": "w8a8"})
    with pytest.raises(PolicyError, match="unknown scheme 'int4'"):
        convrot_diffusers.quantize_transformer(transformer, policy={"transformer_blocks.*": "int4"})
    assert not convrot.quantized_layers(transformer) and transformer.config.get("quantization_config") is None
    with pytest.raises(ValueError, match="not both"):
        ConvRotConfig(preset="mix", policy=POLICY)
    assert "policy" not in ConvRotConfig().to_dict()  # preset saves read as before
    again = ConvRotConfig.from_dict(ConvRotConfig(policy=POLICY).to_dict())
    assert again.policy == POLICY and again.preset is None


BAD_FILES = [
    ('{"transformer_blocks.*": "w4a4",', "not valid JSON (line 1, column"),
    ('["transformer_blocks.*", "w4a4"]', "must be a JSON object"),
    ("{}", "is empty"),
    ('{"transformer_blocks.*": "w4a4", "transformer_blocks.*": "skip"}', "'transformer_blocks.*' appears twice"),
    ('{"transformer_blocks.*": "w2a2"}', "'transformer_blocks.*': unknown scheme 'w2a2'"),
    ('{"transformer_blocks.*": 4}', "unknown scheme 4"),
    ('{"single_transformer_block.0.proj_out": "w8a8"}', "names no Linear layer of FluxTransformer2DModel"),
    (b"\xff\xfe{}", "not a UTF-8 text file"),
]


@pytest.mark.parametrize("content, problem", BAD_FILES)
def test_quantize_refuses_a_bad_policy_file_in_one_line(tmp_path, capsys, content, problem):
    policy = tmp_path / "policy.json"
    policy.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["quantize", "--policy", str(policy), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convrot: error: argument --policy: {policy}: ") and problem in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "q").exists()
    if "Linear layer" not in problem:  # the file alone is bad: the API refuses it too
        with pytest.raises(PolicyError, match="policy.json"):
            read_policy(policy)


def test_quantize_refuses_a_missing_policy_file_or_a_preset_beside_it(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["quantize", "--policy", str(missing), "--out", str(tmp_path / "q")]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    missing.write_text(json.dumps(POLICY))
    assert main(["quantize", "--policy", str(missing), "--preset", "w4a4", "--out", str(tmp_path / "q")]) == 2
    assert "give --preset or --policy, not both" in capsys.readouterr().err
