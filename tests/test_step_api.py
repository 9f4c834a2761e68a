"""The engine's step API (continuous batching) against HF: a sequence's tokens do not depend on who shares its batch.

    python -m pytest -q tests/test_step_api.py

Each sequence runs through a staggered schedule (some join a running batch mid-way, some leave while others go on,
the cache grows while sequences are running) and must equal HF `generate` on its prompt alone, at batch 1 with no
padding; with exits, the HF-forward reference with frozen exited states (tests/test_engine.py).
"""

import pytest
import torch

from helios.engine import DecodeBatch, EarlyExitEngine, ExitConfig
from tests.conftest import load_cached
from tests.test_engine import _reference_with_exits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a land far away, there lived a",
    "Q: What is two plus two?\nA:",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
]
# (step at which the sequence joins, tokens it generates): 0 and 1 start together; 2 joins after 3 steps; 0 leaves
# early at 5 tokens; 3 joins after 0 left; 4 (the longest prompt, longer than any before it) grows the cache.
SCHEDULE = [(0, 5), (0, 18), (3, 12), (6, 10), (8, 9)]


def _hf_alone(loaded, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=0)
    return out[0, len(ids):].tolist()


def _run_staggered(engine: EarlyExitEngine, batch: DecodeBatch, prompt_ids: list[list[int]]):
    tokens: dict[int, list[int]] = {}
    exits: dict[int, list[int]] = {}
    concurrency = []
    step = 0
    while len(tokens) < len(SCHEDULE) or len(batch):
        joining = [i for i, (at, _) in enumerate(SCHEDULE) if at == step]
        if joining:
            first = batch.add(joining, [prompt_ids[i] for i in joining], [SCHEDULE[i][1] for i in joining])
            for i, token, layer in zip(first.seq_ids, first.tokens, first.exit_layers):
                tokens[i], exits[i] = [token], [layer]
        else:
            out = batch.step()
            for i, token, layer in zip(out.seq_ids, out.tokens, out.exit_layers):
                tokens[i].append(token)
                exits[i].append(layer)
        concurrency.append(len(batch))
        batch.remove([i for i in batch.seq_ids if len(tokens[i]) == SCHEDULE[i][1]])
        step += 1
    return tokens, exits, concurrency


@pytest.mark.parametrize("name,depth", [("tiny-llama", None), ("tiny-gemma3", None), ("tiny-llama", 4),
                                        pytest.param("smollm2-135m", None, marks=pytest.mark.slow)])
def test_joining_and_leaving_sequences_equal_hf_alone(name: str, depth: int | None) -> None:
    loaded = load_cached(name, depth)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    prompt_ids = engine.encode(PROMPTS)
    tokens, _, concurrency = _run_staggered(engine, engine.batch(), prompt_ids)
    assert max(concurrency) >= 3 and 0 not in concurrency[:-1]  # sequences really overlapped
    for i, ids in enumerate(prompt_ids):
        assert tokens[i] == _hf_alone(loaded, ids, SCHEDULE[i][1]), f"sequence {i}"


def test_sliding_window_is_exceeded_while_batched() -> None:
    loaded = load_cached("tiny-gemma3")
    window = loaded.model.config.get_text_config().sliding_window
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    assert max(len(ids) + n for ids, (_, n) in zip(engine.encode(PROMPTS), SCHEDULE)) > 2 * window


@pytest.mark.parametrize(
    "name,exit_config,compact",
    [
        ("tiny-llama", ExitConfig("max_prob", 0.05, (2, 4)), True),
        ("tiny-llama", ExitConfig("cosine", 0.5, (1, 3, 5)), False),
        ("tiny-gemma3", ExitConfig("margin", 0.02, (2, 4)), True),
    ],
)
def test_staggered_exits_propagate_kv_exactly(name: str, exit_config: ExitConfig, compact: bool) -> None:
    loaded = load_cached(name)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    prompt_ids = engine.encode(PROMPTS)
    tokens, exits, _ = _run_staggered(engine, engine.batch(exit_config, compact=compact), prompt_ids)
    assert len({e for row in exits.values() for e in row}) > 1, "needs both early exits and full-depth tokens"
    for i, ids in enumerate(prompt_ids):
        assert tokens[i] == _reference_with_exits(loaded, ids, tokens[i], exits[i]), f"sequence {i}"


def test_step_api_rejects_bad_membership() -> None:
    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    batch = engine.batch()
    batch.add(["a"], [[1, 2, 3]], 4)
    with pytest.raises(ValueError, match="unique"):
        batch.add(["a"], [[4, 5]], 4)
    with pytest.raises(ValueError, match="unknown sequence"):
        batch.remove(["b"])
    with pytest.raises(ValueError, match="context window of 2048"):
        batch.add(["c"], [[1]], 2100)
    with pytest.raises(ValueError, match="empty prompt"):
        batch.add(["d"], [[]], 4)
    batch.remove(["a"])
    assert len(batch) == 0 and batch.step().tokens == []


def test_cache_growth_keeps_physical_kv_near_what_is_needed() -> None:
    """Sequences join one at a time, each longer than the last: the dense cache must hold every one of them, and a
    dimension that grows grows by EngineKVCache.GROWTH (1.25), not by doubling. By hand: slots go 1, 2, 3, 4, 5, 7, 9,
    12, 15, 19, 24 (ceil(1.25 x) or the need, whichever is larger) for 20 sequences, so 24 slots (doubling: 32);
    positions go to 8 + 3 = 11 for the first, then ceil(1.25 x 11) = 14, ... each time the need exceeds capacity."""
    from helios.engine import EngineKVCache
    from helios.models import load_candidate

    engine = EarlyExitEngine(load_candidate("tiny-llama"))
    batch = engine.batch(ExitConfig())
    need_len = 0
    for i in range(20):
        prompt = [5 + (j % 50) for j in range(8 + i)]
        batch.add([i], [prompt], 3)
        need_len = max(need_len, len(prompt) + 3)
        assert batch.cache.batch_size >= i + 1 and batch.cache.max_len >= need_len  # everything fits
    assert EngineKVCache.GROWTH == 1.25
    assert batch.cache.batch_size == 24
    assert need_len == 30 and 30 <= batch.cache.max_len < 1.25 * 30 + 1
    layers, kv_heads, head_dim = engine.depth, engine.config.num_key_value_heads, engine.config.hidden_size // engine.config.num_attention_heads
    assert batch.cache.nbytes == 2 * layers * 24 * kv_heads * batch.cache.max_len * head_dim * 4  # fp32 K and V
