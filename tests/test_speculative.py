"""Self-speculative decoding (helios/speculative.py) against Hugging Face `generate`, and its acceptance logic on a
model built so that every draft must be accepted.

    python -m pytest tests/test_speculative.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

from helios.engine import EarlyExitEngine
from helios.speculative import generate_speculative
from tests.conftest import load_cached

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away"]


def hf_greedy(loaded, prompts: list[str], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    batch = loaded.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize(
    "name,draft_layers,draft_tokens",
    [("tiny-llama", 2, 3), ("tiny-llama", 5, 1), ("tiny-llama", 1, 5), ("tiny-gemma3", 3, 4),
     pytest.param("smollm2-135m", 20, 3, marks=pytest.mark.slow)],
)
def test_output_equals_hf_greedy(name: str, draft_layers: int, draft_tokens: int) -> None:
    """Lossless: the batched (left-padded) speculative output is HF's full-depth greedy output, token for token."""
    loaded = load_cached(name)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    new_tokens = 20
    result = generate_speculative(engine, PROMPTS, new_tokens, draft_layers=draft_layers,
                                  draft_tokens=draft_tokens)
    expected = hf_greedy(loaded, PROMPTS, new_tokens, engine.pad_id)
    for got, want in zip(result.tokens, expected):
        assert got == want[: len(got)]
        assert len(got) == new_tokens or got[-1] in engine.eos_ids
    assert result.cost_features["draft_rounds"] >= 1


def test_every_draft_is_accepted_when_the_deeper_layers_are_identities() -> None:
    """Zeroing the output projections of layers E+1..L makes them identity maps of the residual stream, so the exit
    at E *is* the final layer: every draft is accepted, and 1 + rounds x k tokens come out (k = 4: 1 + 5 x 4 = 21)."""
    loaded = copy.deepcopy(load_cached("tiny-llama"))
    draft_layers, k = 3, 4
    with torch.no_grad():
        for layer in loaded.model.get_decoder().layers[draft_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    result = generate_speculative(engine, PROMPTS, 21, draft_layers=draft_layers, draft_tokens=k, stop_at_eos=False)
    features = result.cost_features
    assert features["draft_rounds"] == 5
    assert features["accepted_drafts"] == features["drafted_tokens"] == 5 * k * len(PROMPTS)
    assert result.tokens == engine.generate(PROMPTS, 21, stop_at_eos=False).tokens


def test_bad_arguments_name_the_valid_range() -> None:
    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    for layers in (0, engine.depth, True):
        with pytest.raises(ValueError, match=rf"1\.\.{engine.depth - 1}"):
            generate_speculative(engine, PROMPTS, 4, draft_layers=layers, draft_tokens=2)
    with pytest.raises(ValueError, match="draft_tokens must be a positive integer"):
        generate_speculative(engine, PROMPTS, 4, draft_layers=2, draft_tokens=0)
