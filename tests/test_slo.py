"""SLO rewards, checked against numbers worked out by hand from the formula in helios/slo.py's docstring."""

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helios.slo import METRICS, SLOConfigError, slo_from_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "slo"
REFERENCE = {"throughput_tok_s": 100.0, "latency_p95_s": 2.0, "energy_j_per_tok": 0.5, "accuracy": 0.4}


def test_equal_to_reference_scores_zero() -> None:
    slo = slo_from_config(OmegaConf.load(CONF / "balanced.yaml"))
    reward = slo.evaluate(REFERENCE, REFERENCE)
    assert reward.total == 0.0
    assert reward.scores == dict.fromkeys(METRICS, 1.0)
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


@pytest.mark.parametrize("name", ["throughput", "latency", "energy", "accuracy", "balanced"])
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
    ],
)
def test_bad_config_is_a_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(SLOConfigError, match=match):
        slo_from_config(cfg)
