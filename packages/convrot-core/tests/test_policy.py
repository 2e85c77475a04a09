import pytest

from convrot.policy import check_policy, layer_kind


def test_first_match_wins_and_default_is_w4a4():
    policy = check_policy({"blocks.0.*": "skip", "blocks.*.ff.*": "w8a8", "*.ff.*": "skip"})
    assert layer_kind("blocks.0.ff.net", policy) == ("skip", "blocks.0.*")
    assert layer_kind("blocks.3.ff.net", policy) == ("w8a8", "blocks.*.ff.*")
    assert layer_kind("head.ff.net", policy) == ("skip", "*.ff.*")
    assert layer_kind("blocks.3.attn.to_q", policy) == ("w4a4", None)
    assert layer_kind("anything", check_policy(None)) == ("w4a4", None)


def test_patterns_are_case_sensitive_globs_over_dotted_names():
    policy = check_policy({"proj_?ut": "skip", "blocks.[01].attn": "w8a8"})
    assert layer_kind("proj_out", policy)[0] == "skip"
    assert layer_kind("Proj_out", policy)[0] == "w4a4"
    assert layer_kind("blocks.1.attn", policy)[0] == "w8a8"
    assert layer_kind("blocks.2.attn", policy)[0] == "w4a4"


@pytest.mark.parametrize(
    ("policy", "error", "message"),
    [
        ([("*", "skip")], TypeError, "mapping"),
        ({"*": "w2a8"}, ValueError, r"policy\['\*'\] = 'w2a8'"),
        ({"*": "W4A4"}, ValueError, "kind must be one of"),
        ({"": "skip"}, ValueError, "non-empty strings"),
        ({3: "skip"}, ValueError, "non-empty strings"),
    ],
)
def test_bad_policies(policy, error, message):
    with pytest.raises(error, match=message):
        check_policy(policy)
