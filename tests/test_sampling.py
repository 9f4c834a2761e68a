"""Sampling and logprobs of the engine (helios/sampling.py) against independent references: Hugging Face's own
`generate` and forward pass, and scipy's chi-square test.

    python -m pytest tests/test_sampling.py -q

Empirical distributions come from one batched `generate` call of N identical prompts with seeds 0..N-1 (each row has
its own generator, so rows are independent draws); the seeds are fixed, so every test is deterministic, and a
correct sampler fails a chi-square test at alpha = 1e-3 with that probability only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from helios.engine import EarlyExitEngine, ExitConfig
from helios.sampling import SamplingParams
from helios.speculative import generate_speculative
from tests.conftest import load_cached, reference_logits_with_exits

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away"]
SAMPLES = 4000
ALPHA = 1e-3


def engine_for(name: str) -> EarlyExitEngine:
    return EarlyExitEngine(load_cached(name), load_tuned_heads=False)


def hf_logits(loaded, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of HF's own forward pass (final norm, head and any softcap included)."""
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[0].double()


def hf_exit_logits(loaded, ids: list[int], layers: int) -> torch.Tensor:
    """Logits of the shared head on HF's hidden state after `layers` layers (LayerSkip's exit, no tuned head)."""
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layers][0]
        decoder = loaded.model.get_decoder()
        return loaded.model.get_output_embeddings()(decoder.norm(hidden)).double()


def chi_square(samples: list[int], probs: np.ndarray) -> float:
    """p-value of scipy's chi-square goodness of fit, bins with expected count < 5 merged into one."""
    counts = Counter(samples)
    expected = probs * len(samples)
    observed = np.array([counts.get(v, 0) for v in range(len(probs))], dtype=float)
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert len(exp) >= 5, "too few bins for a meaningful test"
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   slack: float = 0.0) -> np.ndarray:
    """The distribution a correct sampler draws from, computed here in float64 numpy from HF logits: softmax of
    logits / T, restricted to the top-k logits (ties kept), then to the smallest most-likely prefix whose mass
    reaches top_p, renormalised. `slack` widens the nucleus for membership checks (float32 vs float64 sums)."""
    z = logits.numpy() / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k > 0:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p + slack]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def sample_first_tokens(engine: EarlyExitEngine, prompt_ids: list[int], params: dict, n: int = SAMPLES) -> list[int]:
    result = engine.generate([prompt_ids] * n, 1, sampling=[SamplingParams(seed=i, **params) for i in range(n)])
    return [row[0] for row in result.tokens]


# ------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_temperature_zero_equals_hf_greedy_even_beside_sampled_rows(name: str) -> None:
    """Greedy rows stay exactly HF's greedy output when the batch also holds sampled rows and logprobs are on (the
    sampler's non-trivial path), at full depth."""
    loaded = load_cached(name)
    engine = engine_for(name)
    batch = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = loaded.model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=engine.pad_id)
    expected = out[:, batch["input_ids"].shape[1]:].tolist()
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.3, seed=3, top_p=0.9),
              SamplingParams(temperature=0.0, seed=11)]
    result = engine.generate(PROMPTS, 16, sampling=params)
    for row in (0, 2):
        assert result.tokens[row] == expected[row][: len(result.tokens[row])]
    assert result.tokens[1] != expected[1][: len(result.tokens[1])]  # the sampled row did sample


# ------------------------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("name,temperature", [("tiny-llama", 0.7), ("tiny-llama", 1.0), ("tiny-gemma3", 1.4)])
def test_frequencies_match_softmax_of_hf_logits_over_temperature(name: str, temperature: float) -> None:
    loaded = load_cached(name)
    engine = engine_for(name)
    ids = engine.encode([PROMPTS[0]])[0]
    samples = sample_first_tokens(engine, ids, {"temperature": temperature})
    logits = hf_logits(loaded, ids)[-1]
    assert chi_square(samples, filtered_probs(logits, temperature)) > ALPHA
    # The test has power: the same samples reject a neighbouring temperature.
    assert chi_square(samples, filtered_probs(logits, temperature * 1.5)) < 1e-6


def test_exited_tokens_are_sampled_from_the_exit_heads_distribution() -> None:
    """Every decode token exits at layer 2 (max_prob >= 1e-6 always holds); with the fed token forced, the second
    token's frequencies match softmax(head(norm(h_2)) / T) from HF's hidden state after 2 layers, not the final
    layer's distribution."""
    loaded = load_cached("tiny-llama")
    engine = engine_for("tiny-llama")
    ids = engine.encode([PROMPTS[1]])[0]
    forced = [int(loaded.tokenizer(" x", add_special_tokens=False)["input_ids"][0])]
    temperature = 0.8
    result = engine.generate([ids] * SAMPLES, 2, ExitConfig("max_prob", 1e-6, (2,)), stop_at_eos=False,
                             forced_tokens=[forced] * SAMPLES,
                             sampling=[SamplingParams(temperature=temperature, seed=i) for i in range(SAMPLES)])
    assert all(row[1] == 2 for row in result.exit_layers)
    samples = [row[1] for row in result.tokens]
    exit_probs = filtered_probs(hf_exit_logits(loaded, ids + forced, 2)[-1], temperature)
    assert chi_square(samples, exit_probs) > ALPHA
    final_probs = filtered_probs(hf_logits(loaded, ids + forced)[-1], temperature)
    assert chi_square(samples, final_probs) < 1e-6


@pytest.mark.parametrize("params", [
    {"temperature": 1.0, "top_k": 7},
    {"temperature": 1.2, "top_p": 0.5},
    {"temperature": 0.6, "top_p": 0.8, "top_k": 12},
    {"temperature": 2.0, "top_p": 0.3},
])
def test_top_k_and_top_p_never_leave_their_set(params: dict) -> None:
    """Teacher-forced decoding over 8 steps (known contexts): every emitted token lies in the set computed here from
    HF's logits at that position, and within the set the frequencies of the first token pass a chi-square test."""
    loaded = load_cached("tiny-gemma3")
    engine = engine_for("tiny-gemma3")
    ids = engine.encode([PROMPTS[2]])[0]
    forced = list(loaded.tokenizer(" and then the", add_special_tokens=False)["input_ids"])[:7]
    steps, n = len(forced) + 1, 600
    result = engine.generate([ids] * n, steps, stop_at_eos=False, forced_tokens=[forced] * n,
                             sampling=[SamplingParams(seed=1000 + i, **params) for i in range(n)])
    logits = hf_logits(loaded, ids + forced)[len(ids) - 1:]  # position t predicts generated token t
    filters = {k: v for k, v in params.items() if k in ("top_k", "top_p")}
    for t in range(steps):
        allowed = filtered_probs(logits[t], params["temperature"], slack=1e-6, **filters) > 0
        emitted = {row[t] for row in result.tokens}
        assert allowed.sum() < len(allowed) / 2, "the filter must exclude most of the vocabulary to test anything"
        assert emitted <= set(np.flatnonzero(allowed).tolist()), (t, emitted - set(np.flatnonzero(allowed)))
    first = sample_first_tokens(engine, ids, params)
    assert chi_square(first, filtered_probs(logits[0], params["temperature"], **filters)) > ALPHA


# ------------------------------------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("exit_config,compact", [
    (ExitConfig(), True),
    (ExitConfig("max_prob", 0.05, (2, 4)), True),
    (ExitConfig("max_prob", 0.05, (2, 4)), False),
])
def test_logprobs_are_log_softmax_of_the_emitting_layers_hf_logits(exit_config: ExitConfig, compact: bool) -> None:
    """Returned logprobs (chosen token and top 5) equal log_softmax of HF's raw logits, before temperature and
    filtering: the final layer's for full-depth tokens, the exit head's for exited ones. Rows mix sampled, greedy
    and no-logprobs settings in one left-padded batch."""
    loaded = load_cached("tiny-llama")
    engine = engine_for("tiny-llama")
    prompt_ids = engine.encode(PROMPTS)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=7, logprobs=5), SamplingParams(logprobs=0),
              SamplingParams(temperature=1.0, seed=8)]
    result = engine.generate(prompt_ids, 14, exit_config, compact=compact, sampling=params)
    assert result.logprobs is not None and result.logprobs[2] == []
    depths = {e for row in result.exit_layers[:2] for e in row}
    assert (len(depths) > 1) == exit_config.enabled
    for row in (0, 1):
        tokens, exits, entries = result.tokens[row], result.exit_layers[row], result.logprobs[row]
        assert [e.token_id for e in entries] == tokens
        references = reference_logits_with_exits(loaded, prompt_ids[row], tokens, exits)
        for entry, logits in zip(entries, references):
            want = torch.log_softmax(logits, dim=-1)
            assert entry.logprob == pytest.approx(float(want[entry.token_id]), abs=1e-4)
            assert len(entry.top) == params[row].logprobs
            if entry.top:
                values, indices = want.topk(len(entry.top))
                assert [i for i, _ in entry.top] == indices.tolist()
                assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------------ determinism, errors


def test_same_seed_same_tokens_whatever_the_batch_exits_and_compaction() -> None:
    """A seeded row's text depends on its seed and prompt only: not on its neighbours (greedy or sampled, other
    prompts and padding), nor on compaction; another seed gives another text."""
    engine = engine_for("tiny-llama")
    config = ExitConfig("max_prob", 0.05, (2, 4))
    mine = SamplingParams(temperature=1.0, top_k=40, seed=1234)
    alone = engine.generate([PROMPTS[0]], 16, config, sampling=mine)
    neighbours = [
        ([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SamplingParams(), mine, SamplingParams(temperature=0.5, seed=1)], True),
        ([PROMPTS[2], PROMPTS[0]], [SamplingParams(temperature=2.0, seed=5), mine], False),
    ]
    for prompts, params, compact in neighbours:
        crowd = engine.generate(prompts, 16, config, compact=compact, sampling=params)
        assert crowd.tokens[1] == alone.tokens[0] and crowd.exit_layers[1] == alone.exit_layers[0]
    other = engine.generate([PROMPTS[0]], 16, config, sampling=SamplingParams(temperature=1.0, top_k=40, seed=1235))
    assert other.tokens[0] != alone.tokens[0]


def test_bad_sampling_params_name_their_valid_range() -> None:
    cases = [({"temperature": -1.0}, r"\[0, 2\]"), ({"temperature": 2.5}, r"\[0, 2\]"),
             ({"temperature": float("nan")}, r"\[0, 2\]"), ({"top_p": 0.0}, r"\(0, 1\]"), ({"top_p": 1.5}, r"\(0, 1\]"),
             ({"top_k": -2}, ">= 1, or 0 / -1"), ({"top_k": 2.5}, ">= 1"), ({"logprobs": 21}, r"0\.\.20"),
             ({"logprobs": -1}, r"0\.\.20"), ({"seed": "x"}, "seed must be an integer"), ({"seed": 2**64}, "seed")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    engine = engine_for("tiny-llama")
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        engine.generate(PROMPTS, 2, sampling=[SamplingParams()])


def test_speculative_decoding_refuses_sampling() -> None:
    engine = engine_for("tiny-llama")
    for params in (SamplingParams(temperature=0.7), SamplingParams(logprobs=1)):
        with pytest.raises(ValueError, match="greedy only.*temperature=0"):
            generate_speculative(engine, PROMPTS, 4, draft_layers=2, draft_tokens=2, sampling=params)
    greedy = generate_speculative(engine, PROMPTS, 6, draft_layers=2, draft_tokens=2, sampling=SamplingParams())
    assert greedy.tokens == engine.generate(PROMPTS, 6).tokens
