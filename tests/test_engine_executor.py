"""The scheduler on a real engine (helios.engine_executor): continuous batching on a measured virtual clock.

    python -m pytest -q tests/test_engine_executor.py

References: HF `generate` on each prompt alone (tokens), the memory budget computed by hand from the model config,
and request conservation across an arm switch under load.
"""

import math

import pytest

from helios.engine import EarlyExitEngine, ExitConfig
from helios.engine_executor import EngineExecutor, EnginePayload
from helios.scheduler import MemoryBudget, Scheduler, SequenceRequest, VirtualClock
from tests.conftest import load_cached
from tests.test_step_api import PROMPTS, _hf_alone

MAX_TOKENS = [6, 14, 9, 11, 7]
ARRIVALS_S = [0.0, 0.0, 0.05, 0.08, 0.3]


def _kv_bytes_per_token(loaded) -> int:
    config = loaded.model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * loaded.depth * config.num_key_value_heads * head_dim * 4  # K and V, fp32, every loaded layer


def _requests(engine: EarlyExitEngine, collected: dict) -> list[SequenceRequest]:
    requests = []
    for i, ids in enumerate(engine.encode(PROMPTS)):
        collected[i] = []
        hook = (lambda token, logprob, i=i: collected[i].append(token) or False)
        requests.append(SequenceRequest(i, ARRIVALS_S[i], len(ids), MAX_TOKENS[i], EnginePayload(ids, hook)))
    return requests


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_scheduled_requests_equal_hf_alone_under_a_budget(name: str) -> None:
    loaded = load_cached(name)
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    kv = _kv_bytes_per_token(loaded)
    prompt_lens = [len(ids) for ids in engine.encode(PROMPTS)]
    # Room for the two largest reservations at once, never three: admission must hold sequences back.
    largest = sorted(((n + m) * kv for n, m in zip(prompt_lens, MAX_TOKENS)), reverse=True)
    budget = MemoryBudget(loaded.weight_bytes + largest[0] + largest[1], loaded.weight_bytes, kv)
    executor = EngineExecutor(lambda arm: (engine, ExitConfig()), arm="full")
    scheduler = Scheduler(executor, budget, VirtualClock(), arm="full")
    collected: dict[int, list[int]] = {}
    assert all(r is None for r in scheduler.submit_many(_requests(engine, collected)))
    records = scheduler.run_until(math.inf)
    assert sorted(r.request_id for r in records) == list(range(len(PROMPTS)))
    assert scheduler.span.max_resident_bytes <= budget.memory_budget_bytes
    assert 2 <= scheduler.span.max_running < len(PROMPTS)
    for i, ids in enumerate(engine.encode(PROMPTS)):
        want = _hf_alone(loaded, ids, MAX_TOKENS[i])
        got = collected[i]
        assert got == want[: len(got)] and (len(got) == MAX_TOKENS[i] or got[-1] in engine.eos_ids), f"request {i}"
    for r in records:  # the measured clock: every latency is made of real compute seconds
        assert r.arrival_s <= r.admitted_s <= r.first_token_s <= r.finished_s
        assert r.ttft_s > 0 and r.output_tokens == len(collected[r.request_id])


@pytest.mark.parametrize("policy", ["drain", "recompute"])
def test_switch_under_load_loses_no_request(policy: str) -> None:
    engines = {depth: EarlyExitEngine(load_cached("tiny-llama", depth), load_tuned_heads=False) for depth in (6, 3)}
    loaders = {depth: (engines[depth], ExitConfig()) for depth in engines}
    budgets = {d: MemoryBudget(10**9, e.loaded.weight_bytes, _kv_bytes_per_token(e.loaded)) for d, e in engines.items()}
    executor = EngineExecutor(lambda depth: loaders[depth], arm=6)
    scheduler = Scheduler(executor, budgets[6], VirtualClock(), arm=6)
    collected: dict[int, list[int]] = {}
    scheduler.submit_many(_requests(engines[6], collected))
    first = scheduler.run_until(1e-9)  # a few iterations: some sequences are running, none has finished
    assert scheduler.running > 0 and not first
    scheduler.switch_arm(3, budgets[3], policy=policy)
    records = first + scheduler.run_until(math.inf)
    assert sorted(r.request_id for r in records) == list(range(len(PROMPTS)))
    assert executor.engine is engines[3] and scheduler.span.switches == 1 and scheduler.span.switch_s > 0
    for r in records:
        assert r.output_tokens == len(collected[r.request_id]) == len(r.exit_layers)
        assert r.output_tokens == MAX_TOKENS[r.request_id] or collected[r.request_id][-1] in engines[3].eos_ids
    if policy == "recompute":
        assert any(r.recomputes for r in records)


def test_keep_needs_the_same_weights() -> None:
    engines = {depth: EarlyExitEngine(load_cached("tiny-llama", depth), load_tuned_heads=False) for depth in (6, 3)}
    executor = EngineExecutor(lambda depth: (engines[depth], ExitConfig()), arm=6)
    executor.batch.add(["a"], [[1, 2, 3]], 4)
    with pytest.raises(ValueError, match="drain"):
        executor.switch(3, [])


def test_seeded_sampling_does_not_depend_on_batch_neighbours() -> None:
    """A seeded sampled request gives the same tokens alone and among others joining and leaving around it."""
    from helios.sampling import SamplingParams

    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    ids = engine.encode(PROMPTS)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, logprobs=2)

    def serve(indices: list[int]) -> dict[int, list[tuple[int, float]]]:
        got: dict[int, list[tuple[int, float]]] = {i: [] for i in indices}
        executor = EngineExecutor(lambda arm: (engine, ExitConfig()), arm="a")
        scheduler = Scheduler(executor, MemoryBudget(10**9, 1, 1), VirtualClock(), arm="a")
        for i in indices:
            if i == 1:
                payload = EnginePayload(ids[i], lambda token, lp: got[1].append((token, lp.logprob)) or False, params)
            else:
                payload = EnginePayload(ids[i], None, SamplingParams(temperature=1.0, seed=100 + i))
            scheduler.submit(SequenceRequest(i, ARRIVALS_S[i], len(ids[i]), MAX_TOKENS[i], payload))
        scheduler.run_until(math.inf)
        return got

    alone, crowded = serve([1])[1], serve([0, 1, 2, 3, 4])[1]
    assert [t for t, _ in alone] == [t for t, _ in crowded] and len(alone) == MAX_TOKENS[1]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(alone, crowded))
    greedy = _hf_alone(engine.loaded, ids[1], MAX_TOKENS[1])
    assert [t for t, _ in alone] != greedy  # it really sampled


def test_static_batching_on_the_engine_equals_hf_alone() -> None:
    """mode="static": a batch runs until its longest member ends; members that finish early leave the engine's batch
    (release comes at the batch end) and the others' tokens are unaffected."""
    loaded = load_cached("tiny-llama")
    engine = EarlyExitEngine(loaded, load_tuned_heads=False)
    executor = EngineExecutor(lambda arm: (engine, ExitConfig()), arm="full")
    scheduler = Scheduler(executor, MemoryBudget(10**9, 1, 1), VirtualClock(), arm="full", mode="static")
    collected: dict[int, list[int]] = {}
    scheduler.submit_many(_requests(engine, collected))
    records = scheduler.run_until(math.inf)
    assert sorted(r.request_id for r in records) == list(range(len(PROMPTS))) and len(executor.batch) == 0
    for i, ids in enumerate(engine.encode(PROMPTS)):
        want = _hf_alone(loaded, ids, MAX_TOKENS[i])
        assert collected[i] == want[: len(collected[i])], f"request {i}"
