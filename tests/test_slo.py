"""SLO rewards and per-request metrics, checked against numbers worked out by hand from helios/slo.py's docstrings.

    python -m pytest -q tests/test_slo.py
"""

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import numpy as np

from helios.slo import METRICS, RequestTargets, SLOConfigError, request_metrics, slo_from_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "slo"
REFERENCE = {"throughput_tok_s": 100.0, "latency_p95_s": 2.0, "energy_j_per_tok": 0.5, "accuracy": 0.4,
             "goodput_rps": 2.0, "attainment": 0.95, "ttft_p95_s": 0.5, "tpot_p95_s": 0.05}
OLD_METRICS = ("throughput_tok_s", "latency_p95_s", "energy_j_per_tok", "accuracy")


def test_equal_to_reference_scores_zero() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "balanced.yaml"))
    reward = slo.evaluate(REFERENCE, REFERENCE)
    assert reward.total == 0.0
    assert reward.scores == dict.fromkeys(OLD_METRICS, 1.0)
    assert set(reward.penalties.values()) == {0.0}


def test_balanced_by_hand() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "balanced.yaml"))
    values = {"throughput_tok_s": 200.0, "latency_p95_s": 1.0, "energy_j_per_tok": 0.5, "accuracy": 0.3}
    reward = slo.evaluate(values, REFERENCE)
    # Four weights of 1 -> 0.25 each. Throughput 2x -> 0.25; latency halved -> 0.25; energy equal -> 0;
    # accuracy (0.3 + 0.001) / (0.4 + 0.001) = 0.301 / 0.401 -> 0.25 * log2(0.75062...) = -0.10346.
    assert reward.terms["throughput_tok_s"] == pytest.approx(0.25)
    assert reward.terms["latency_p95_s"] == pytest.approx(0.25)
    assert reward.terms["energy_j_per_tok"] == pytest.approx(0.0)
    assert reward.terms["accuracy"] == pytest.approx(0.25 * math.log2(0.301 / 0.401))
    assert reward.terms["accuracy"] == pytest.approx(-0.1034597, abs=1e-6)
    # accuracy >= 0.9 x 0.4 = 0.36: short by 0.06, relative 0.06 / 0.36 = 1/6 -> penalty 4 x (1 + 1/6) = 14/3.
    # p95 <= 2 x 2.0 s = 4 s: satisfied.
    assert reward.penalties == {"accuracy>=0.9xref": pytest.approx(14 / 3), "latency_p95_s<=2xref": 0.0}
    assert reward.objective == pytest.approx(0.5 - 0.1034597, abs=1e-6)
    assert reward.total == pytest.approx(0.5 - 0.1034597 - 14 / 3, abs=1e-6)


def test_weights_are_normalised_and_lower_is_better_inverts() -> None:
    slo = slo_from_config({"weights": {"throughput_tok_s": 3.0, "energy_j_per_tok": 1.0, "accuracy": 0.0}})
    values = {**REFERENCE, "throughput_tok_s": 400.0, "energy_j_per_tok": 1.0}
    reward = slo.evaluate(values, REFERENCE)
    # 3/4 x log2(4) + 1/4 x log2(0.5 / 1.0) = 1.5 - 0.25; a zero weight contributes no term at all.
    assert reward.terms == {"throughput_tok_s": pytest.approx(1.5), "energy_j_per_tok": pytest.approx(-0.25)}
    assert reward.total == pytest.approx(1.25)


def test_scores_are_clipped() -> None:
    slo = slo_from_config({"weights": {"throughput_tok_s": 1.0}, "ratio_clip": 8.0})
    assert slo.evaluate({**REFERENCE, "throughput_tok_s": 1e6}, REFERENCE).total == pytest.approx(3.0)  # log2(8)
    assert slo.evaluate({**REFERENCE, "throughput_tok_s": 0.0}, REFERENCE).total == pytest.approx(-3.0)
    latency = slo_from_config({"weights": {"latency_p95_s": 1.0}})
    assert latency.evaluate({**REFERENCE, "latency_p95_s": 0.0}, REFERENCE).total == pytest.approx(4.0)  # log2(16)


def test_accuracy_zero_over_zero_is_neutral() -> None:
    slo = slo_from_config({"weights": {"accuracy": 1.0}})
    reference = {**REFERENCE, "accuracy": 0.0}
    assert slo.evaluate({**REFERENCE, "accuracy": 0.0}, reference).total == 0.0
    # (0.1 + 0.001) / 0.001 = 101 -> clipped to 16 -> log2 = 4
    assert slo.evaluate({**REFERENCE, "accuracy": 0.1}, reference).total == pytest.approx(4.0)


def test_absolute_constraints_by_hand() -> None:
    slo = slo_from_config({
        "weights": {"throughput_tok_s": 1.0},
        "constraints": [
            {"metric": "latency_p95_s", "max": 2.0, "penalty": 2.0},
            {"metric": "energy_j_per_tok", "max": 0.0, "penalty": 1.0},
            {"metric": "accuracy", "min": 0.2},
        ],
    })
    values = {**REFERENCE, "latency_p95_s": 3.0, "energy_j_per_tok": 0.25, "accuracy": 0.5}
    reward = slo.evaluate(values, REFERENCE)
    # latency 3 s > 2 s: relative 0.5 -> 2 x 1.5 = 3; energy bound 0: absolute gap 0.25 -> 1 x 1.25; accuracy ok.
    assert reward.penalties == {"latency_p95_s<=2": 3.0, "energy_j_per_tok<=0": 1.25, "accuracy>=0.2": 0.0}
    assert reward.total == pytest.approx(0.0 - 4.25)


@pytest.mark.parametrize("name", ["throughput", "latency", "energy", "accuracy", "balanced", "goodput", "attainment",
                                  "accuracy_under_latency"])
def test_shipped_slos_load(name: str) -> None:
    slo = slo_from_config(OmegaConf.load(CONF / f"{name}.yaml"))
    assert slo.name == name
    assert slo.evaluate(REFERENCE, REFERENCE).total == 0.0


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"weights": {"throughput_tok_s": -1.0, "accuracy": 1.0}}, "must be >= 0"),
        ({"weights": {"throughput_tok_s": 0.0, "accuracy": 0}}, "all zero"),
        ({"weights": {}}, "needs `weights`"),
        ({"weights": {"speed": 1.0}}, "unknown metric"),
        ({"weights": {"accuracy": float("nan")}}, "finite"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "speed", "max": 1}]}, "unknown metric 'speed'"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "accuracy"}]}, "exactly one of"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "accuracy", "min": 0.1, "max": 0.9}]}, "exactly one"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "accuracy", "min_ratio": 0.0}]}, "must be > 0"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "accuracy", "min": 0.1, "penalty": -1}]}, "penalty"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "accuracy", "min": 0.1, "slack": 1}]}, "unknown key"),
        ({"weights": {"accuracy": 1.0}, "ratio_clip": 1.0}, "ratio_clip"),
        ({"weights": {"accuracy": 1.0}, "target": 3}, "unknown key"),
        ({"weights": {"goodput_rps": 1.0}}, r"uses \['goodput_rps'\].*give both ttft_target_s and tpot_target_s"),
        ({"weights": {"accuracy": 1.0}, "constraints": [{"metric": "attainment", "min": 0.9}], "ttft_target_s": 1.0},
         r"uses \['attainment'\].*tpot_target_s=None"),
        ({"weights": {"accuracy": 1.0}, "ttft_target_s": 0.0}, "ttft_target_s must be a finite number of seconds > 0"),
        ({"weights": {"accuracy": 1.0}, "tpot_target_s": "fast"}, "tpot_target_s must be a finite number"),
    ],
)
def test_bad_config_is_a_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(SLOConfigError, match=match):
        slo_from_config(cfg)


# ----------------------------------------------------------------------------------------------- new SLOs


def test_goodput_slo_by_hand() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "goodput.yaml"))
    assert slo.targets == RequestTargets(ttft_s=2.5, tpot_s=0.3)  # the CPU targets (conf/slo/goodput.yaml)
    assert slo.metrics_used == ("accuracy", "goodput_rps")
    # goodput 4 vs 2 requests/s -> log2(2) = 1; accuracy 0.4 = 1 x ref, floor 0.9 x ref holds.
    reward = slo.evaluate({**REFERENCE, "goodput_rps": 4.0}, REFERENCE)
    assert reward.terms == {"goodput_rps": pytest.approx(1.0)} and reward.total == pytest.approx(1.0)
    # No goodput at all: 0 / 2 is clipped to 1/16 -> log2 = -4.
    assert slo.evaluate({**REFERENCE, "goodput_rps": 0.0}, REFERENCE).total == pytest.approx(-4.0)


def test_attainment_slo_by_hand() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "attainment.yaml"))
    values = {**REFERENCE, "throughput_tok_s": 200.0, "attainment": 0.81}
    reward = slo.evaluate(values, REFERENCE)
    # throughput 2x -> +1; attainment 0.81 < 0.9: relative shortfall 0.09 / 0.9 = 0.1 -> penalty 4 x 1.1 = 4.4.
    assert reward.penalties == {"attainment>=0.9": pytest.approx(4.4), "accuracy>=0.9xref": 0.0}
    assert reward.total == pytest.approx(1.0 - 4.4)
    assert slo.evaluate({**values, "attainment": 0.9}, REFERENCE).total == pytest.approx(1.0)  # the floor is inclusive


def test_accuracy_under_latency_needs_no_reference_attainment() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "accuracy_under_latency.yaml"))
    assert slo.metrics_used == ("accuracy", "attainment")
    reference = {"accuracy": 0.4}  # an absolute bound reads no reference value: a reference run without attainment
    # accuracy (0.2 + 0.001) / (0.4 + 0.001) -> log2 = -0.99640; attainment 0.95 >= 0.9: no penalty.
    reward = slo.evaluate({"accuracy": 0.2, "attainment": 0.95}, reference)
    assert reward.total == pytest.approx(math.log2(0.201 / 0.401)) and reward.penalties == {"attainment>=0.9": 0.0}
    # attainment 0.45: shortfall 0.45 / 0.9 = 0.5 -> penalty 4 x 1.5 = 6, more than the best accuracy term can earn.
    reward = slo.evaluate({"accuracy": 0.4, "attainment": 0.45}, reference)
    assert reward.penalties == {"attainment>=0.9": pytest.approx(6.0)} and reward.total == pytest.approx(-6.0)


def test_attainment_as_objective_takes_the_bounded_epsilon() -> None:
    slo = slo_from_config({"weights": {"attainment": 1.0, "ttft_p95_s": 1.0}, "ttft_target_s": 1, "tpot_target_s": 1})
    # attainment 0 vs 0 -> (0 + 0.001) / (0 + 0.001) = 1 -> 0; TTFT p95 1 s vs 0.5 s -> 0.5 x log2(0.5) = -0.5.
    values = {"attainment": 0.0, "ttft_p95_s": 1.0}
    reward = slo.evaluate(values, {"attainment": 0.0, "ttft_p95_s": 0.5})
    assert reward.terms == {"attainment": 0.0, "ttft_p95_s": pytest.approx(-0.5)}
    assert METRICS["tpot_p95_s"] is False and METRICS["goodput_rps"] is True


# ----------------------------------------------------------------------------------------------- request metrics

TARGETS = RequestTargets(ttft_s=1.0, tpot_s=0.1)


def _record(arrival_s, ttft_s=None, tpot_s=None, e2e_s=None, output_tokens=None) -> dict:
    return {"arrival_s": arrival_s, "ttft_s": ttft_s, "tpot_s": tpot_s, "e2e_s": e2e_s, "output_tokens": output_tokens}


def test_request_metrics_by_hand() -> None:
    # The span is [10, 20) s; targets TTFT <= 1 s, TPOT <= 0.1 s.
    records = [
        _record(10.0, 0.5, 0.05, 2.0),   # A finished at 12, on time                        -> met
        _record(11.0, 0.8, 0.20, 5.0),   # B first token on time, TPOT 0.2 > 0.1            -> missed
        _record(12.0, 1.5, 0.05, 3.0),   # C first token late, deadline 13 in the span      -> missed
        _record(8.0, 2.5, 0.05, 4.0),    # D first token late, deadline 9: judged last span -> not counted
        _record(15.0),                   # E queued, waited 5 s > 1 s, deadline 16          -> missed (unfinished)
        _record(19.5),                   # F queued, waited 0.5 s                           -> not judged yet
        _record(17.0, 0.3),              # G running, first token on time                   -> not judged yet
        _record(5.0),                    # H queued since 5 s: missed at its deadline 6 s   -> not counted again
        _record(14.0, 0.9, None, 0.9, 1),   # I one token, no TPOT                          -> met
        _record(13.0, 0.2, None, 2.2, 21),  # J TPOT (2.2 - 0.2) / 20 = 0.1, the target     -> met
        _record(1.0, 0.2, 0.05, 3.0),    # K finished at 4 s, before the span               -> ignored
    ]
    metrics = request_metrics(records, 10.0, TARGETS, span_start_s=10.0)
    assert metrics["met_requests"] == 3 and metrics["missed_requests"] == 3
    assert metrics["missed_unfinished_requests"] == 1
    assert metrics["goodput_rps"] == pytest.approx(0.3)  # 3 met / 10 s
    assert metrics["attainment"] == pytest.approx(0.5)  # 3 / (3 + 3)
    # TTFTs: A .5 B .8 C 1.5 D 2.5 (its first token at 10.5 s, in the span) I .9 J .2 G .3, and waits so far E 5,
    # F .5, H 15. Sorted: .2 .3 .5 .5 .8 .9 1.5 2.5 5 15; p95 at index 0.95 x 9 = 8.55 -> 5 + 0.55 x 10 = 10.5.
    assert metrics["ttft_p95_s"] == pytest.approx(10.5)
    # TPOTs of finished requests: A .05 B .2 C .05 D .05 J .1 (I has none). p95 at index 3.8 -> .1 + .8 x .1 = .18.
    assert metrics["tpot_p95_s"] == pytest.approx(0.18)


def test_backlog_counts_against_attainment() -> None:
    # Overload: 2 requests finish on time; 8 have queued past their 1-s TTFT deadline inside the span [0, 10).
    # DistServe's completed-only count would give attainment 2 / 2 = 1; charging the backlog gives 2 / 10.
    records = [_record(0.0, 0.5, 0.05, 1.0), _record(0.5, 0.5, 0.05, 1.0)] + [_record(1.0 + k) for k in range(8)]
    metrics = request_metrics(records, 10.0, TARGETS)
    assert metrics["attainment"] == pytest.approx(0.2) and metrics["goodput_rps"] == pytest.approx(0.2)
    assert metrics["missed_unfinished_requests"] == 8


def test_an_idle_span_attains_everything() -> None:
    assert request_metrics([], 5.0, TARGETS) == {
        "goodput_rps": 0.0, "attainment": 1.0, "ttft_p95_s": 0.0, "tpot_p95_s": 0.0,
        "met_requests": 0, "missed_requests": 0, "missed_unfinished_requests": 0,
    }


def test_without_targets_only_the_percentiles() -> None:
    records = [_record(0.0, 0.4, 0.05, 1.4), _record(1.0, 0.2, 0.3, 6.2), _record(8.0)]
    # TTFTs .4, .2 and the 2-s wait of the queued request: p95 at index 1.9 -> .4 + .9 x 1.6 = 1.84.
    # TPOTs .05, .3: p95 at index .95 -> .05 + .95 x .25 = .2875.
    assert request_metrics(records, 10.0, None) == {"ttft_p95_s": pytest.approx(1.84), "tpot_p95_s": pytest.approx(0.2875)}
    assert slo_from_config(OmegaConf.load(CONF / "latency.yaml")).targets is None
    with pytest.raises(TypeError, match="targets must be RequestTargets"):
        request_metrics(records, 10.0, {"ttft_s": 1.0})  # type: ignore[arg-type]


def test_records_may_be_objects() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Record:  # the scheduler's per-request record carries these fields, and more
        arrival_s: float
        queueing_delay_s: float
        ttft_s: float | None
        tpot_s: float | None
        e2e_s: float | None
        output_tokens: int

    metrics = request_metrics([Record(0.0, 0.1, 0.4, 0.05, 1.4, 21), Record(1.0, 0.0, 0.2, 0.3, 6.2, 18)], 10.0, TARGETS)
    assert (metrics["met_requests"], metrics["missed_requests"]) == (1, 1)


def test_every_request_is_judged_once_across_spans() -> None:
    # A timeline of 200 requests; each span passes "finished in the span + still in the system at its end", as the
    # scheduler will. Summed over spans, met + missed must count each request whose outcome is known exactly once.
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0.0, 50.0, 200))
    ttfts = rng.exponential(1.0, 200)
    tpots = rng.uniform(0.02, 0.2, 200)
    tokens = rng.integers(1, 40, 200)
    e2es = ttfts + tpots * (tokens - 1)
    span_s, end_s = 2.5, 80.0
    met = missed = 0
    for start in np.arange(0.0, end_s, span_s):
        end = start + span_s
        records = []
        for a, ttft, tpot, e2e, n in zip(arrivals, ttfts, tpots, e2es, tokens):
            if a >= end or a + e2e < start:
                continue  # not yet arrived, or finished before the span
            if a + e2e < end:
                records.append(_record(a, ttft, tpot if n > 1 else None, e2e, int(n)))
            else:
                records.append(_record(a, ttft if a + ttft < end else None))
        metrics = request_metrics(records, span_s, TARGETS, span_start_s=float(start))
        met, missed = met + metrics["met_requests"], missed + metrics["missed_requests"]
    good = (ttfts <= 1.0) & ((tokens == 1) | (tpots <= 0.1))
    assert met == int(good.sum()) and met + missed == 200


def test_bad_request_records_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="needs arrival_s"):
        request_metrics([{"ttft_s": 1.0}], 1.0, TARGETS)
    with pytest.raises(ValueError, match="needs ttft_s"):
        request_metrics([_record(0.0, None, 0.1, 2.0)], 10.0, TARGETS)
    with pytest.raises(ValueError, match="needs tpot_s or output_tokens"):
        request_metrics([_record(0.0, 0.5, None, 2.0)], 10.0, TARGETS)
    with pytest.raises(ValueError, match="span_s must be a finite number of seconds > 0"):
        request_metrics([], 0.0, TARGETS)
    with pytest.raises(SLOConfigError, match="tpot_s must be a finite number of seconds > 0"):
        RequestTargets(ttft_s=1.0, tpot_s=-1.0)


def test_a_single_token_record_with_nan_tpot_meets_the_tpot_target() -> None:
    """helios.scheduler.RequestRecord writes tpot_s = NaN for a one-token output: no TPOT, so only TTFT judges it."""
    nan_record = {"arrival_s": 0.0, "ttft_s": 0.5, "e2e_s": 0.5, "tpot_s": float("nan"), "output_tokens": 1}
    late_record = {"arrival_s": 0.0, "ttft_s": 0.5, "e2e_s": 2.5, "tpot_s": 0.2, "output_tokens": 11}
    metrics = request_metrics([nan_record, late_record], 10.0, RequestTargets(1.0, 0.1))
    assert (metrics["met_requests"], metrics["missed_requests"]) == (1, 1)
    assert metrics["goodput_rps"] == pytest.approx(0.1) and metrics["attainment"] == pytest.approx(0.5)
    assert metrics["tpot_p95_s"] == pytest.approx(0.2)  # the NaN is not a TPOT sample
