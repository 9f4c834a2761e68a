"""Engine against independent references: HF `generate`, HF forward with the exit dynamics imposed by hooks."""

import pytest
import torch

from helios.engine import EarlyExitEngine, ExitConfig
from tests.conftest import load_cached, reference_logits_with_exits

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away"]


def _hf_greedy(loaded, prompts: list[str], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize(
    "name,max_new_tokens",
    [("tiny-llama", 24), ("tiny-gemma3", 24), pytest.param("smollm2-135m", 20, marks=pytest.mark.slow)],
)
def test_full_depth_matches_hf_generate(name: str, max_new_tokens: int) -> None:
    loaded = load_cached(name)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    result = engine.generate(PROMPTS, max_new_tokens)
    expected = _hf_greedy(loaded, PROMPTS, max_new_tokens, engine.pad_id)
    for got, want in zip(result.tokens, expected):
        assert got == want[: len(got)]
        assert len(got) == max_new_tokens or got[-1] in engine.eos_ids
    assert all(layer == loaded.depth for row in result.exit_layers for layer in row)


@pytest.mark.parametrize("name,depth", [("tiny-llama", 4), ("tiny-gemma3", 3)])
def test_truncated_engine_matches_hf_generate_of_truncated_model(name: str, depth: int) -> None:
    loaded = load_cached(name, depth)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    result = engine.generate(PROMPTS, 16)
    expected = _hf_greedy(loaded, PROMPTS, 16, engine.pad_id)
    assert [want[: len(got)] for got, want in zip(result.tokens, expected)] == result.tokens


def _reference_with_exits(loaded, prompt_ids: list[int], tokens: list[int], exit_layers: list[int]) -> list[int]:
    """Greedy tokens implied by CALM state propagation, computed with the model's own forward pass: the hidden
    state of a position that exited after e layers is frozen (fed unchanged into every layer >= e), so deeper
    layers' K/V at that position come from it (tests/conftest.py imposes exactly that with forward hooks)."""
    return [int(logits.argmax()) for logits in reference_logits_with_exits(loaded, prompt_ids, tokens, exit_layers)]


@pytest.mark.parametrize(
    "name,exit_config",
    [
        ("tiny-llama", ExitConfig("max_prob", 0.05, (2, 4))),
        ("tiny-llama", ExitConfig("cosine", 0.5, (1, 3, 5))),
        ("tiny-gemma3", ExitConfig("margin", 0.02, (2, 4))),
        pytest.param("smollm2-135m", ExitConfig("max_prob", 0.4, (12, 20, 26)), marks=pytest.mark.slow),
    ],
)
def test_exited_tokens_propagate_kv_exactly(name: str, exit_config: ExitConfig) -> None:
    """Every token of a batched, compacted early-exit run equals the HF-forward reference with frozen states:
    exited positions don't corrupt later tokens, and rows of a batch don't leak into each other."""
    loaded = load_cached(name)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    prompt_ids = engine.encode(PROMPTS)
    result = engine.generate(prompt_ids, 20, exit_config, compact=True)
    depths = {layer for row in result.exit_layers for layer in row}
    assert len(depths) > 1, "the setting must produce both early exits and full-depth tokens to test anything"
    for ids, tokens, exits in zip(prompt_ids, result.tokens, result.exit_layers):
        assert tokens == _reference_with_exits(loaded, ids, tokens, exits)


@pytest.mark.parametrize(
    "name,exit_config",
    [
        ("tiny-llama", ExitConfig("max_prob", 0.05, (2, 4))),
        ("tiny-gemma3", ExitConfig("cosine", 0.6, (1, 2, 3, 4, 5))),
        pytest.param("smollm2-135m", ExitConfig("margin", 0.2, (10, 20)), marks=pytest.mark.slow),
    ],
)
def test_compacted_and_uncompacted_batches_agree(name: str, exit_config: ExitConfig) -> None:
    engine = EarlyExitEngine(load_cached(name), load_tuned_heads=False)
    compacted = engine.generate(PROMPTS, 20, exit_config, compact=True)
    masked = engine.generate(PROMPTS, 20, exit_config, compact=False)
    assert compacted.tokens == masked.tokens
    assert compacted.exit_layers == masked.exit_layers
    assert compacted.layer_evals < masked.layer_evals  # only compaction saves compute


def test_batch_rows_equal_single_runs() -> None:
    engine = EarlyExitEngine(load_cached("tiny-gemma3"), load_tuned_heads=False)
    config = ExitConfig("max_prob", 0.05, (2, 4))
    batched = engine.generate(PROMPTS, 16, config)
    for i, prompt in enumerate(PROMPTS):
        single = engine.generate([prompt], 16, config)
        assert single.tokens[0] == batched.tokens[i] and single.exit_layers[0] == batched.exit_layers[i]


def test_telemetry_is_consistent() -> None:
    engine = EarlyExitEngine(load_cached("tiny-llama", 4), load_tuned_heads=False)
    result = engine.generate(PROMPTS, 12, ExitConfig("max_prob", 0.05, (2,)), stop_at_eos=False)
    assert [len(t) for t in result.tokens] == [12, 12, 12] == [len(e) for e in result.exit_layers]
    assert result.prompt_tokens == [len(ids) for ids in engine.encode(PROMPTS)]
    assert 0 < result.ttft_s == result.prefill_s and result.decode_s > 0
    assert all(result.ttft_s <= e2e <= result.prefill_s + result.decode_s + 1e-9 for e2e in result.e2e_s)
    assert result.weight_bytes == engine.loaded.weight_bytes
    # K/V: 4 layers x 3 rows x 2 kv-heads x (longest prompt + 12) positions x head_dim 16 x fp32, keys and values.
    longest = max(result.prompt_tokens)
    assert result.kv_cache_bytes == 2 * 4 * 3 * 2 * (longest + 12) * 16 * 4
    early = sum(1 for row in result.exit_layers for e in row if e == 2)
    # Each decode token costs `depth` row-layers, minus the 2 skipped by every token that exited at layer 2.
    assert result.layer_evals == 3 * 11 * 4 - early * 2 == result.layer_evals_full - early * 2


def test_bad_input_is_rejected_with_valid_values() -> None:
    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate(["hello", ""], 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate([], 4)
    for threshold in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            engine.generate(["hi"], 4, ExitConfig("max_prob", threshold, (2,)))
    with pytest.raises(ValueError, match="1..5"):
        engine.generate(["hi"], 4, ExitConfig("max_prob", 0.5, (6,)))
    with pytest.raises(ValueError, match="max_prob"):
        engine.generate(["hi"], 4, ExitConfig("entropy", 0.5, (2,)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        engine.generate(["hi"], 0)
    with pytest.raises(ValueError, match="context window of 2048"):
        engine.generate(["hi"], 2100)
