"""Service-level objectives: what one served epoch is worth, given its metrics and a reference run's.

    python -m helios.slo conf/slo/balanced.yaml      # prints the SLO and a worked example

    slo = slo_from_config(OmegaConf.load("conf/slo/balanced.yaml"))      # or a plain dict
    reward = slo.evaluate(values, reference)     # both: {metric: value}, the metrics below in their raw units
    reward.total, reward.terms, reward.penalties

This module knows nothing of models or environments: it maps numbers to a reward.

Metrics (raw units, one epoch):

    name               unit                         better
    throughput_tok_s   generated tokens per second  higher
    latency_p95_s      seconds, p95 end-to-end      lower
    energy_j_per_tok   joules per generated token   lower
    accuracy           task score in [0, 1]         higher

Reward:

    score_m  = value_m / ref_m   (higher-better)      ref_m / value_m   (lower-better)
               accuracy takes an additive epsilon: (acc + eps) / (ref + eps), so 0 / 0 scores 1
               clipped to [1 / ratio_clip, ratio_clip]
    term_m   = w_m / sum(w) * log2(score_m)           (0 = as good as the reference, +1 = twice as good)
    penalty_c = penalty_c * (1 + v_c) if constraint c is violated, else 0
               v_c = relative violation: |value - bound| / |bound| (the absolute gap when bound == 0)
    total    = sum_m term_m - sum_c penalty_c

Log ratios make the reward symmetric (halving throughput costs what doubling it earns) and additive, so a reference
that differs from the served workload by a constant factor shifts every arm's reward alike and leaves their order
unchanged. Weights are normalised, so the objective of any SLO lies in [-log2(ratio_clip), log2(ratio_clip)].

Constraints (hard limits that become penalties): `{metric, min | max | min_ratio | max_ratio, penalty}`; `min`/`max`
bound the raw value, `min_ratio`/`max_ratio` bound it relative to the reference value (`accuracy >= 0.9 x ref`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from helios.config import check_keys, plain

METRICS: dict[str, bool] = {  # name -> higher is better
    "throughput_tok_s": True,
    "latency_p95_s": False,
    "energy_j_per_tok": False,
    "accuracy": True,
}
BOUND_KEYS: tuple[str, ...] = ("min", "max", "min_ratio", "max_ratio")
DEFAULT_RATIO_CLIP = 16.0
DEFAULT_ACCURACY_EPS = 1e-3
_TINY = 1e-12  # a floor for divisions: a zero latency or throughput is clipped, not a ZeroDivisionError


class SLOConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Constraint:
    """`metric` must stay >= (kind "min") or <= (kind "max") `bound`, a raw value or (relative) a ratio to the
    reference value; a violation costs `penalty * (1 + relative violation)`."""

    metric: str
    kind: Literal["min", "max"]
    bound: float
    relative: bool
    penalty: float

    name: str = dataclasses.field(init=False, compare=False)  # e.g. "accuracy>=0.9xref", "latency_p95_s<=2"

    def __post_init__(self) -> None:
        op = ">=" if self.kind == "min" else "<="
        object.__setattr__(self, "name", f"{self.metric}{op}{self.bound:g}{'xref' if self.relative else ''}")

    def violation(self, value: float, reference: float) -> float:
        """Relative violation (0 when satisfied)."""
        bound = self.bound * reference if self.relative else self.bound
        gap = bound - value if self.kind == "min" else value - bound
        if gap <= 0.0:
            return 0.0
        return gap / abs(bound) if bound != 0.0 else gap


@dataclasses.dataclass(frozen=True)
class Reward:
    """One epoch's reward and every component of it (see module docstring)."""

    total: float
    objective: float  # sum of terms
    terms: dict[str, float]  # metric -> normalised weight x log2(score)
    scores: dict[str, float]  # metric -> clipped score (1 = the reference)
    penalties: dict[str, float]  # constraint name -> penalty paid (0 when satisfied)


@dataclasses.dataclass(frozen=True)
class SLO:
    name: str
    weights: dict[str, float]  # metric -> weight >= 0, not all zero (normalised when evaluating)
    constraints: tuple[Constraint, ...] = ()
    ratio_clip: float = DEFAULT_RATIO_CLIP
    accuracy_eps: float = DEFAULT_ACCURACY_EPS
    # (metric, normalised weight) of the weighted metrics: all the hot path (once per environment step) walks.
    _objective: tuple[tuple[str, float], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        if not (math.isfinite(self.ratio_clip) and self.ratio_clip > 1.0):
            raise SLOConfigError(f"ratio_clip must be a finite number > 1; got {self.ratio_clip!r}")
        if not (math.isfinite(self.accuracy_eps) and self.accuracy_eps > 0.0):
            raise SLOConfigError(f"accuracy_eps must be a finite number > 0; got {self.accuracy_eps!r}")
        total = sum(self.weights.values())
        objective = tuple((metric, weight / total) for metric, weight in self.weights.items() if weight > 0)
        object.__setattr__(self, "_objective", objective)  # frozen: set once, here

    def score(self, metric: str, value: float, reference: float) -> float:
        """How much better than the reference `value` is (1 = equal), clipped to [1/ratio_clip, ratio_clip]."""
        if metric == "accuracy":
            ratio = (value + self.accuracy_eps) / (reference + self.accuracy_eps)
        elif METRICS[metric]:
            ratio = value / max(reference, _TINY)
        else:
            ratio = reference / max(value, _TINY)
        return min(max(ratio, 1.0 / self.ratio_clip), self.ratio_clip)

    def evaluate(self, values: Mapping[str, float], reference: Mapping[str, float]) -> Reward:
        """The reward of an epoch with metric `values` against the `reference` run's (both keyed by METRICS)."""
        terms: dict[str, float] = {}
        scores: dict[str, float] = {}
        for metric, weight in self._objective:
            score = self.score(metric, values[metric], reference[metric])
            scores[metric] = score
            terms[metric] = weight * math.log2(score)
        penalties: dict[str, float] = {}
        for constraint in self.constraints:
            violation = constraint.violation(values[constraint.metric], reference[constraint.metric])
            penalties[constraint.name] = constraint.penalty * (1.0 + violation) if violation > 0.0 else 0.0
        objective = sum(terms.values())
        return Reward(objective - sum(penalties.values()), objective, terms, scores, penalties)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_weights(weights: Mapping[str, float]) -> None:
    unknown = sorted(set(weights) - set(METRICS))
    if unknown:
        raise SLOConfigError(f"SLO weights name unknown metric(s) {unknown}; valid: {list(METRICS)}")
    bad = {m: w for m, w in weights.items() if not _is_number(w) or not math.isfinite(w)}
    if bad:
        raise SLOConfigError(f"SLO weights must be finite numbers; got {bad}")
    negative = {m: w for m, w in weights.items() if w < 0}
    if negative:
        raise SLOConfigError(f"SLO weights must be >= 0; got {negative}")
    if not any(w > 0 for w in weights.values()):
        raise SLOConfigError(f"SLO weights are all zero ({dict(weights)}); give at least one metric a weight > 0")


# ----------------------------------------------------------------------------------------------- config

_TOP_KEYS = ("name", "weights", "constraints", "ratio_clip", "accuracy_eps")
_CONSTRAINT_KEYS = ("metric", *BOUND_KEYS, "penalty")


def constraint_from_config(cfg: Mapping[str, Any], where: str = "constraint") -> Constraint:
    if not isinstance(cfg, Mapping):
        raise SLOConfigError(f"{where} must be a mapping with keys {list(_CONSTRAINT_KEYS)}; got {cfg!r}")
    check_keys(where, cfg, _CONSTRAINT_KEYS, SLOConfigError)
    metric = cfg.get("metric")
    if metric not in METRICS:
        raise SLOConfigError(f"{where} names unknown metric {metric!r}; valid: {list(METRICS)}")
    bounds = [key for key in BOUND_KEYS if key in cfg]
    if len(bounds) != 1:
        raise SLOConfigError(f"{where} ({metric}) needs exactly one of {list(BOUND_KEYS)}; got {bounds}")
    key = bounds[0]
    bound = cfg[key]
    if not _is_number(bound) or not math.isfinite(bound):
        raise SLOConfigError(f"{where} ({metric}): {key} must be a finite number; got {bound!r}")
    if key.endswith("_ratio") and bound <= 0:
        raise SLOConfigError(f"{where} ({metric}): {key} is a ratio to the reference and must be > 0; got {bound}")
    penalty = cfg.get("penalty", 1.0)
    if not _is_number(penalty) or not (math.isfinite(penalty) and penalty >= 0):
        raise SLOConfigError(f"{where} ({metric}): penalty must be a finite number >= 0; got {penalty!r}")
    kind = "min" if key.startswith("min") else "max"
    return Constraint(metric, kind, float(bound), relative=key.endswith("_ratio"), penalty=float(penalty))


def slo_from_config(cfg: Any) -> SLO:
    """An SLO from a `conf/slo/*.yaml` node (DictConfig or dict): name, weights, constraints, ratio_clip, accuracy_eps."""
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping):
        raise SLOConfigError(f"an SLO config is a mapping with keys {list(_TOP_KEYS)}; got {type(cfg).__name__}")
    check_keys("SLO config", cfg, _TOP_KEYS, SLOConfigError)
    weights = cfg.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise SLOConfigError(f"SLO config needs `weights`: a mapping of some of {list(METRICS)} to weights >= 0")
    _check_weights(weights)
    constraints_cfg = cfg.get("constraints") or []
    if not isinstance(constraints_cfg, list):
        raise SLOConfigError("SLO `constraints` must be a list of {metric, min|max|min_ratio|max_ratio, penalty}")
    constraints = tuple(constraint_from_config(c, f"constraints[{i}]") for i, c in enumerate(constraints_cfg))
    return SLO(
        name=str(cfg.get("name", "custom")),
        weights={m: float(w) for m, w in weights.items()},
        constraints=constraints,
        ratio_clip=float(cfg.get("ratio_clip", DEFAULT_RATIO_CLIP)),
        accuracy_eps=float(cfg.get("accuracy_eps", DEFAULT_ACCURACY_EPS)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a conf/slo/*.yaml file")
    args = parser.parse_args()
    from omegaconf import OmegaConf

    slo = slo_from_config(OmegaConf.load(args.config))
    print(f"SLO {slo.name!r}: weights {slo.weights}; constraints {[c.name for c in slo.constraints]}")
    reference = {"throughput_tok_s": 100.0, "latency_p95_s": 2.0, "energy_j_per_tok": 0.5, "accuracy": 0.4}
    values = {"throughput_tok_s": 200.0, "latency_p95_s": 1.0, "energy_j_per_tok": 0.5, "accuracy": 0.3}
    reward = slo.evaluate(values, reference)
    print(f"example: {values}\n     vs reference {reference}\n  -> total {reward.total:+.4f}; terms {reward.terms}; "
          f"penalties {reward.penalties}")


if __name__ == "__main__":
    main()
