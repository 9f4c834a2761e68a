"""The env's default accuracy, judge_score (envs/judge.py): per-request values against an independent computation
(plain transformers, log-probs gathered by hand), in replay and live; the epoch accuracy as their mean; the live judge
off the serving clock; the on-disk cache; empty outputs.

    python -m pytest -q tests/test_judge.py

The candidates are the tiny random-init models. The judge is tiny-llama (same byte vocabulary as the candidates) and,
where its checkpoint is available, SmolLM2-135M (the default judge: another vocabulary, so the re-tokenisation is
exercised); a few seconds each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch

import envs
from envs.judge import Judge
from helios.workloads import Request, workload_from_config

WORKLOAD = {
    "seed": 0, "episode_epochs": 2, "arrival": {"kind": "closed", "batch_size": 3},
    "phases": [{"epochs": 1, "mixture": {"qa": 1.0}}, {"epochs": 1, "mixture": {"prose": 1.0}}],
    "source_options": {"prose": {"prompt_chars": 120, "reference_chars": 60}},
}
PER_SOURCE, NEW_TOKENS = 2, 4
COMMON = {
    "candidates": [{"name": "tiny-llama", "depths": [2, 6]}, {"name": "tiny-gemma3", "depths": [3, 6]}],
    "workload": WORKLOAD, "memory_budget_mib": 64, "context_tokens": 512, "new_tokens": NEW_TOKENS,
    "exits": [{"criterion": "none"}], "accuracy_metric": "judge_score",
}
ARMS = (0, 2)  # tiny-llama@2, then tiny-gemma3@3: both candidates' outputs (arm 1 is tiny-llama@6, 3 tiny-gemma3@6)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _judges() -> list[Any]:
    """tiny-llama always; smollm2-135m when its checkpoint can be resolved offline (package or converted cache)."""
    from helios.models import resolve_checkpoint

    params: list[Any] = ["tiny-llama"]
    try:
        resolve_checkpoint("smollm2-135m", progress=False)
        params.append("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 (a missing package or checkpoint: skip, saying why)
        params.append(pytest.param("smollm2-135m", marks=pytest.mark.skip(reason=f"smollm2-135m unavailable: {exc}")))
    return params


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory, one_torch_thread) -> Path:
    from helios.profiling import ensure_trace

    out = tmp_path_factory.mktemp("judge_traces")
    for name, depths in (("tiny-llama", [2, 6]), ("tiny-gemma3", [3, 6])):
        ensure_trace(name, WORKLOAD, depths=depths, per_source=PER_SOURCE, new_tokens=NEW_TOKENS, out_dir=out,
                     progress=False, calibration_runs=4)
    return out


@pytest.fixture
def judge_cache(tmp_path, monkeypatch) -> Path:
    """The judge's disk cache in a fresh directory (so no test reads a score an earlier run wrote); checkpoints stay
    where they are (helios.models binds its own cache_dir at import)."""
    import helios.paths

    root = tmp_path / "cache"
    monkeypatch.setattr(helios.paths, "cache_dir", lambda: root)
    return root / "judge"


def replay_env(trace_dir: Path, **overrides: Any) -> gymnasium.Env:
    return gymnasium.make(envs.ENV_IDS["replay"], **{**COMMON, "per_source": PER_SOURCE, "variants": 1,
                                                     "trace_dir": str(trace_dir), "build_traces": False, **overrides})


# ----------------------------------------------------------------------------------------------- the reference


class ReferenceJudge:
    """judge_score computed without helios: transformers' AutoModelForCausalLM on the checkpoint directory the
    candidate registry resolves, one forward on prompt + output ids, log_softmax, the output tokens' log-probs
    gathered by hand, exp(-mean)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from helios.models import resolve_checkpoint

        checkpoint = resolve_checkpoint(name, progress=False)
        self.name = name
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def __call__(self, prompt: str, candidate: str, output_ids: Sequence[int]) -> float:
        from transformers import AutoTokenizer

        from helios.models import resolve_checkpoint

        text = AutoTokenizer.from_pretrained(resolve_checkpoint(candidate, progress=False)).decode(
            list(output_ids), skip_special_tokens=True)
        prompt_ids = self.tokenizer(prompt)["input_ids"]  # plain-text requests: the tokenizer's own special tokens
        if candidate == self.name:  # the judge's own vocabulary: the generated ids, special tokens dropped
            out = [t for t in output_ids if t not in set(self.tokenizer.all_special_ids)]
        else:
            out = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not out:
            return 0.0
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt_ids + out])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = [-float(logprobs[len(prompt_ids) - 1 + j, token]) for j, token in enumerate(out)]
        return math.exp(-sum(nll) / len(nll))


def spy_on_accuracy(backend: Any, prompt_of: Callable[[Hashable], str]) -> list[dict[str, Any]]:
    """Wrap backend._accuracy: every per-request score with what produced it."""
    seen: list[dict[str, Any]] = []
    inner = backend._accuracy

    def spy(request_id: Hashable, arm: Any, token_ids: Sequence[int]) -> float | None:
        prompt = prompt_of(request_id)  # before the call: live forgets the request once scored
        value = inner(request_id, arm, token_ids)
        seen.append({"prompt": prompt, "candidate": arm.candidate, "depth": int(arm.depth), "request_id": request_id,
                     "tokens": list(token_ids), "value": value})
        return value

    backend._accuracy = spy
    return seen


def check_epochs(env: gymnasium.Env, seen: list[dict[str, Any]], reference: ReferenceJudge,
                 written: Callable[[dict[str, Any]], Sequence[int]] = lambda entry: entry["tokens"]) -> int:
    """Serve ARMS, one epoch each; every request's score equals the reference's on what `written(entry)` says the
    arm wrote, the epoch's accuracy their mean."""
    checked = 0
    for arm in ARMS:
        seen.clear()
        _, _, _, _, info = env.step(arm)
        assert len(seen) == info["requests"] == WORKLOAD["arrival"]["batch_size"]
        for entry in seen:
            want = reference(entry["prompt"], entry["candidate"], written(entry))
            assert entry["value"] == pytest.approx(want, rel=1e-4, abs=1e-7), entry
            checked += 1
        assert info["metrics"]["accuracy"] == pytest.approx(float(np.mean([e["value"] for e in seen])), rel=1e-12)
    return checked


@pytest.mark.parametrize("judge", _judges())
def test_replay_judge_score_matches_an_independent_computation(trace_dir, judge_cache, judge: str) -> None:
    """Replay serves the trace's teacher-forced tokens (they set each request's length) and scores what the truncated
    arm writes free-running: Hugging Face generate (greedy) on the truncated model from the trace's prompt, stopped
    at EOS, cut to the served length. Requests without a reference are scored too."""
    from tests.conftest import load_cached

    env = replay_env(trace_dir, judge=judge)
    backend = env.unwrapped.backend
    pool = workload_from_config(WORKLOAD).pool(PER_SOURCE)
    assert [r.request_id for r in pool] == backend.replayers["tiny-llama"].trace.meta["request_names"]
    env.reset(seed=0)
    seen = spy_on_accuracy(backend, lambda request_id: pool[int(request_id[-1])].prompt)

    def free_running(entry: dict[str, Any]) -> list[int]:
        meta = backend.replayers[entry["candidate"]].trace.meta
        loaded = load_cached(entry["candidate"], entry["depth"])
        ids = torch.tensor([meta["prompts"][int(entry["request_id"][-1])]])
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(meta["new_tokens"]),
                                        do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id,
                                        eos_token_id=list(meta["eos_ids"]))
        return out[0, ids.shape[1]:].tolist()[: len(entry["tokens"])]

    assert check_epochs(env, seen, ReferenceJudge(judge), free_running) == 2 * 3
    assert backend.judge.name == judge and backend.judge.forwards > 0
    env.close()


@pytest.mark.parametrize("judge", _judges())
def test_live_judge_score_matches_an_independent_computation(judge: str) -> None:
    """Live scores the free-running output it served."""
    env = gymnasium.make(envs.ENV_IDS["live"], **COMMON, judge=judge)
    backend = env.unwrapped.backend
    env.reset(seed=0)
    seen = spy_on_accuracy(backend, lambda request_id: backend._requests_by_id[request_id].prompt)
    assert check_epochs(env, seen, ReferenceJudge(judge)) == 2 * 3
    env.close()


def test_live_judge_scores_its_own_full_depth_arm_from_the_served_logprobs(judge_cache) -> None:
    """Served by the judge's own model at full depth, exits off (tiny-llama@6, arm 1), a request's score comes from
    the log-probabilities the engine computed while serving it, with no judge forward, and equals the independent
    forward's (batched, KV-cached decoding vs one plain forward: float rounding apart). A truncated arm of the same
    model (tiny-llama@2) is judged by a forward."""
    env = gymnasium.make(envs.ENV_IDS["live"], **COMMON, judge="tiny-llama")
    backend = env.unwrapped.backend
    env.reset(seed=0)
    seen = spy_on_accuracy(backend, lambda request_id: backend._requests_by_id[request_id].prompt)
    reference = ReferenceJudge("tiny-llama")
    for arm, served, forwards in ((1, 3, 0), (0, 3, 3)):
        seen.clear()
        *_, info = env.step(arm)
        assert len(seen) == info["requests"] == 3
        assert (backend.judge.served, backend.judge.forwards) == (served, forwards)
        for entry in seen:
            assert entry["value"] == pytest.approx(reference(entry["prompt"], entry["candidate"], entry["tokens"]),
                                                   rel=1e-4, abs=1e-7), entry
    env.close()


def test_live_judge_time_is_not_on_the_serving_clock(monkeypatch) -> None:
    """A judge made slow (0.4 s a score): the clock has stopped when it runs (every score sees the span's end), and
    the epoch's busy seconds stay far below the judge's time (they would include it were it charged)."""
    import envs.judge

    delay_s = 0.4
    env = gymnasium.make(envs.ENV_IDS["live"], **COMMON, judge="tiny-llama")
    backend = env.unwrapped.backend
    clocks: list[float | None] = []
    inner = envs.judge.Judge._judge

    def slow(self: Judge, context: list[int], output: list[int]) -> list[float]:
        sched = backend.episode.scheduler
        clocks.append(None if sched is None else sched.clock.now())
        time.sleep(delay_s)
        return inner(self, context, output)

    monkeypatch.setattr(envs.judge.Judge, "_judge", slow)
    env.reset(seed=0)
    for arm in (0, 3):
        clocks.clear()
        _, _, _, _, info = env.step(arm)
        sched = backend.episode.scheduler
        assert len(clocks) == info["requests"] == 3
        assert clocks == [sched.clock.now()] * 3  # scored after the span: the clock no longer moves
        judged_s = delay_s * len(clocks)
        span_s = info["load"]["span_s"]  # closed loop: the span is the busy time (switch + prefill + decode)
        assert info["engine_s"] < span_s < judged_s / 2, (info["engine_s"], span_s, judged_s)
    env.close()


# ----------------------------------------------------------------------------------------------- caches and edges


def play_arms(env: gymnasium.Env) -> tuple[list[float], Judge]:
    """One episode's ARMS on a fresh `env` (closed after): each epoch's accuracy, and the judge that scored them."""
    env.reset(seed=0)
    accuracies = [env.step(arm)[4]["metrics"]["accuracy"] for arm in ARMS]
    judge = env.unwrapped.backend.judge
    env.close()
    return accuracies, judge


def test_replay_disk_cache_gives_the_same_scores_without_the_model(trace_dir, judge_cache) -> None:
    """A second env on the same traces reads every score from disk: same rewards, no judge forward."""
    first, judge = play_arms(replay_env(trace_dir, judge="tiny-llama"))
    assert judge.forwards > 0 and any(judge_cache.rglob("*.json"))
    second, judge = play_arms(replay_env(trace_dir, judge="tiny-llama"))
    assert second == first and judge.forwards == 0 and judge._model is None  # never loaded


def test_live_repeat_episode_reads_its_judge_scores_from_disk(judge_cache) -> None:
    """Live decodes greedily: a second env serving the same arms on the same draw produces the same outputs token for
    token, so their scores come from the disk cache (no forward) and equal the first run's."""
    first, judge = play_arms(gymnasium.make(envs.ENV_IDS["live"], **COMMON, judge="tiny-llama"))
    assert judge.forwards == 2 * 3 and any(judge_cache.rglob("*.json"))
    second, judge = play_arms(gymnasium.make(envs.ENV_IDS["live"], **COMMON, judge="tiny-llama"))
    assert second == first and judge.forwards == 0


def test_empty_output_scores_zero_and_needs_no_reference() -> None:
    judge = Judge("tiny-llama", prompt_margin=NEW_TOKENS)
    request = Request("r", "prose", "Once upon a time", None, 0.0, 0)
    assert judge.score(request, "") == 0.0 and judge.forwards == 0
    value = judge.score(request, " there was a cat")
    assert 0.0 < value <= 1.0 and judge.forwards == 1


def test_prefixes_of_a_judged_output_are_priced_from_its_forward() -> None:
    """One forward on the full output prices its prefixes (the judge is causal): each prefix's score equals a fresh
    judge's own forward on that prefix alone; an output that is not a prefix gets its own forward."""
    request = Request("r", "prose", "Once upon a time", None, 0.0, 0)
    full = " there was a cat who lived in a small house by the sea"
    shared = Judge("tiny-llama", prompt_margin=NEW_TOKENS)
    ids = shared.output_ids(full)
    prefixes = [shared.tokenizer.decode(ids[:n]) for n in (1, 3, 6, len(ids))]
    prefixes = [p for p in prefixes if shared.output_ids(p) == ids[:len(shared.output_ids(p))]]
    assert len(prefixes) >= 3
    priced = [shared.score(request, p, full_text=full) for p in prefixes]
    assert shared.forwards == 1
    for prefix, value in zip(prefixes, priced):
        alone = Judge("tiny-llama", prompt_margin=NEW_TOKENS)
        assert value == pytest.approx(alone.score(request, prefix), rel=1e-5) and alone.forwards == 1
    shared.score(request, " a dog", full_text=full)  # not a prefix of `full`
    assert shared.forwards == 2


def test_rouge_l_still_skips_requests_without_a_reference(trace_dir) -> None:
    """The text metrics keep their semantics: a request without a reference text is not scored (None)."""
    env = replay_env(trace_dir, accuracy_metric="rouge_l", judge="tiny-llama")
    backend = env.unwrapped.backend
    env.reset(seed=0)
    rid = int(backend.pool_by_source["qa"][0])
    backend.references[rid] = None
    assert backend._score("tiny-llama", rid, [65, 66]) is None
    assert backend._judge is None  # rouge_l never builds the judge
    env.close()
