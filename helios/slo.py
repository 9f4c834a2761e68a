"""Service-level objectives: what one served epoch is worth, given its metrics and a reference run's.

    python -m helios.slo conf/slo/balanced.yaml      # prints the SLO and a worked example

    slo = slo_from_config(OmegaConf.load("conf/slo/balanced.yaml"))      # or a plain dict
    reward = slo.evaluate(values, reference)     # both: {metric: value}, the metrics below in their raw units
    reward.total, reward.terms, reward.penalties
    values |= request_metrics(records, span_s, slo.targets)      # the per-request metrics of an epoch span

This module knows nothing of models or environments: it maps numbers to a reward.

Metrics (raw units, one epoch):

    name               unit                                                better
    throughput_tok_s   generated tokens per second                         higher
    latency_p95_s      seconds, p95 end-to-end                             lower
    energy_j_per_tok   joules per generated token                          lower
    accuracy           task score in [0, 1]                                higher
    goodput_rps        requests/s that met both TTFT and TPOT targets      higher
    attainment         share of requests that met both targets, in [0, 1]  higher
    ttft_p95_s         seconds, p95 time to first token                    lower
    tpot_p95_s         seconds, p95 time per output token                  lower

Goodput and attainment judge requests against the SLO's `ttft_target_s` and `tpot_target_s` (both required when
either metric is used). See `request_metrics` for how a span's requests are counted, unfinished ones included.

Reward:

    score_m  = value_m / ref_m   (higher-better)      ref_m / value_m   (lower-better)
               bounded metrics (accuracy, attainment) take an additive epsilon (`accuracy_eps`):
               (v + eps) / (ref + eps), so 0 / 0 scores 1
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
A bounded metric whose bound is a fact of the SLO, not of the reference, takes an absolute bound:
`{metric: attainment, min: 0.9}` ("90% of requests within targets"). Only relative bounds read the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from helios.config import check_keys, plain

METRICS: dict[str, bool] = {  # name -> higher is better
    "throughput_tok_s": True,
    "latency_p95_s": False,
    "energy_j_per_tok": False,
    "accuracy": True,
    "goodput_rps": True,
    "attainment": True,
    "ttft_p95_s": False,
    "tpot_p95_s": False,
}
BOUNDED_METRICS: tuple[str, ...] = ("accuracy", "attainment")  # in [0, 1]: ratios take accuracy_eps
TARGET_METRICS: tuple[str, ...] = ("goodput_rps", "attainment")  # need ttft_target_s and tpot_target_s
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
    ttft_target_s: float | None = None  # a request meets its TTFT target when ttft_s <= this
    tpot_target_s: float | None = None  # ... and its TPOT target when tpot_s <= this
    # (metric, normalised weight) of the weighted metrics: all the hot path (once per environment step) walks.
    _objective: tuple[tuple[str, float], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        if not (math.isfinite(self.ratio_clip) and self.ratio_clip > 1.0):
            raise SLOConfigError(f"ratio_clip must be a finite number > 1; got {self.ratio_clip!r}")
        if not (math.isfinite(self.accuracy_eps) and self.accuracy_eps > 0.0):
            raise SLOConfigError(f"accuracy_eps must be a finite number > 0; got {self.accuracy_eps!r}")
        for key in ("ttft_target_s", "tpot_target_s"):
            target = getattr(self, key)
            if target is not None and not (_is_number(target) and 0 < target < math.inf):
                raise SLOConfigError(f"{key} must be a finite number of seconds > 0; got {target!r}")
        needing = sorted(set(self.metrics_used) & set(TARGET_METRICS))
        if needing and self.targets is None:
            raise SLOConfigError(
                f"SLO {self.name!r} uses {needing}, which judge requests against targets: give both ttft_target_s and "
                f"tpot_target_s (seconds); got ttft_target_s={self.ttft_target_s!r}, tpot_target_s={self.tpot_target_s!r}"
            )
        total = sum(self.weights.values())
        objective = tuple((metric, weight / total) for metric, weight in self.weights.items() if weight > 0)
        object.__setattr__(self, "_objective", objective)  # frozen: set once, here

    @property
    def metrics_used(self) -> tuple[str, ...]:
        """The metrics `evaluate` reads: those with a weight > 0, then those of constraints (METRICS order)."""
        used = {metric for metric, weight in self.weights.items() if weight > 0}
        used |= {constraint.metric for constraint in self.constraints}
        return tuple(metric for metric in METRICS if metric in used)

    @property
    def targets(self) -> RequestTargets | None:
        """The per-request targets to pass to `request_metrics`, or None when the SLO gives no (or only one) target."""
        if self.ttft_target_s is None or self.tpot_target_s is None:
            return None
        return RequestTargets(ttft_s=float(self.ttft_target_s), tpot_s=float(self.tpot_target_s))

    def score(self, metric: str, value: float, reference: float) -> float:
        """How much better than the reference `value` is (1 = equal), clipped to [1/ratio_clip, ratio_clip]."""
        if metric in BOUNDED_METRICS:
            ratio = (value + self.accuracy_eps) / (reference + self.accuracy_eps)
        elif METRICS[metric]:
            ratio = value / max(reference, _TINY)
        else:
            ratio = reference / max(value, _TINY)
        return min(max(ratio, 1.0 / self.ratio_clip), self.ratio_clip)

    def evaluate(self, values: Mapping[str, float], reference: Mapping[str, float]) -> Reward:
        """The reward of an epoch with metric `values` against the `reference` run's (both keyed by METRICS; only
        `metrics_used` are read, and of the reference only the weighted metrics and relative constraints')."""
        terms: dict[str, float] = {}
        scores: dict[str, float] = {}
        for metric, weight in self._objective:
            score = self.score(metric, values[metric], reference[metric])
            scores[metric] = score
            terms[metric] = weight * math.log2(score)
        penalties: dict[str, float] = {}
        for constraint in self.constraints:
            # An absolute bound needs no reference value: an SLO may bound attainment without a reference run's.
            ref = reference[constraint.metric] if constraint.relative else 0.0
            violation = constraint.violation(values[constraint.metric], ref)
            penalties[constraint.name] = constraint.penalty * (1.0 + violation) if violation > 0.0 else 0.0
        objective = sum(terms.values())
        return Reward(objective - sum(penalties.values()), objective, terms, scores, penalties)


# ----------------------------------------------------------------------------------------------- per-request metrics


@dataclasses.dataclass(frozen=True)
class RequestTargets:
    """Per-request latency targets: a request is *good* when ttft <= ttft_s and tpot <= tpot_s (DistServe)."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s"):
            value = getattr(self, key)
            if not (_is_number(value) and 0 < value < math.inf):
                raise SLOConfigError(f"RequestTargets.{key} must be a finite number of seconds > 0; got {value!r}")


REQUEST_FIELDS: tuple[str, ...] = ("arrival_s", "ttft_s", "tpot_s", "e2e_s", "output_tokens")


def _field(record: Any, name: str) -> Any:
    if type(record) is dict or isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def p95(values: Sequence[float]) -> float:
    """The 95th percentile with numpy's default (linear) interpolation, in plain Python: the replay env computes it
    every step on a few dozen values, where np.percentile's overhead would dominate. 0.0 for no values."""
    n = len(values)
    if n == 0:
        return 0.0
    ordered = sorted(values)
    position = 0.95 * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _tpot_s(record: Any, ttft_s: float, e2e_s: float) -> float | None:
    """The record's tpot_s, or DistServe's (e2e - ttft) / (output_tokens - 1); None for a single-token output (a
    helios.scheduler.RequestRecord writes NaN there: no TPOT either)."""
    tpot_s = _field(record, "tpot_s")
    if tpot_s is not None:
        return float(tpot_s) if tpot_s == tpot_s else None
    tokens = _field(record, "output_tokens")
    if tokens is None:
        raise ValueError(f"a finished request record needs tpot_s or output_tokens; got {record!r}")
    return (e2e_s - ttft_s) / (int(tokens) - 1) if int(tokens) > 1 else None


def request_metrics(
    records: Sequence[Any], span_s: float, targets: RequestTargets | None, *, span_start_s: float = 0.0
) -> dict[str, float]:
    """Goodput, attainment and TTFT/TPOT p95 of one span [span_start_s, span_start_s + span_s) of serving.

    `records`: every request that finished in the span, and every request still in the system (queued or running)
    at its end; objects or mappings with `arrival_s` (on the span's clock), `ttft_s` (None: no first token yet),
    `e2e_s` (None: unfinished), and `tpot_s` or `output_tokens`. Records of requests that finished before the span
    may be passed too: they are ignored, as their outcome was counted in an earlier span.

    Each request is judged once, in the span in which its outcome becomes known:
      met     it finished with ttft_s <= targets.ttft_s and tpot_s <= targets.tpot_s (a single-token output has no
              TPOT and meets it); judged when it finishes.
      missed  its first token came late, or had not come when it had waited longer than targets.ttft_s: judged at its
              TTFT deadline, arrival_s + targets.ttft_s, finished or not; or it finished on time for its first token
              but over the TPOT target: judged when it finishes.
    DistServe counts completed requests only; under overload that hides the backlog (a span that finishes a few
    requests on time looks good while the queue grows). Judging a queued request at its TTFT deadline charges the
    backlog as it forms, and judging each request once keeps spans additive: summed over an episode, met + missed
    counts every request whose outcome is known.

    `targets` None (an SLO without ttft_target_s and tpot_target_s): only ttft_p95_s and tpot_p95_s are returned.

    Returns (keys of METRICS, then counts):
      goodput_rps   met / span_s, DistServe's goodput (only requests that finished within target add to it)
      attainment    met / (met + missed); 1.0 when nothing was judged (an idle span misses nothing)
      ttft_p95_s    p95 TTFT of the first tokens that came in the span, together with the wait so far of each request
                    still waiting for one at its end (a lower bound of its TTFT, so the backlog shows); 0.0 when none
      tpot_p95_s    p95 TPOT of requests finished in the span with more than one token; 0.0 when none
      met_requests, missed_requests, missed_unfinished_requests (of the missed, those not yet finished)
    Percentiles are numpy's linear interpolation, as helios's other p95 latencies.
    """
    if not (_is_number(span_s) and 0 < span_s < math.inf):
        raise ValueError(f"span_s must be a finite number of seconds > 0; got {span_s!r}")
    if targets is not None and not isinstance(targets, RequestTargets):
        raise TypeError(f"targets must be RequestTargets (an SLO's .targets) or None; got {targets!r}")
    judging = targets is not None
    # Without targets nothing is late: the p95s below do not depend on them.
    ttft_target_s, tpot_target_s = (targets.ttft_s, targets.tpot_s) if targets is not None else (math.inf, math.inf)
    span_end_s = span_start_s + span_s
    met = missed = missed_unfinished = 0
    ttfts_s: list[float] = []
    tpots_s: list[float] = []
    for record in records:
        if type(record) is dict:  # the common case (in-system requests, by the thousand under overload): no _field
            arrival_s, ttft_s, e2e_s = record.get("arrival_s"), record.get("ttft_s"), record.get("e2e_s")
        else:
            arrival_s, ttft_s, e2e_s = _field(record, "arrival_s"), _field(record, "ttft_s"), _field(record, "e2e_s")
        if arrival_s is None:
            raise ValueError(f"a request record needs arrival_s (seconds, on the span's clock); got {record!r}")
        if ttft_s is None:  # still waiting for its first token
            if e2e_s is not None:
                raise ValueError(f"a finished request record (e2e_s={e2e_s!r}) needs ttft_s; got {record!r}")
            waited_s = span_end_s - float(arrival_s)
            ttfts_s.append(waited_s)  # a lower bound of its TTFT, so that the backlog shows in the p95
            if waited_s > ttft_target_s and span_start_s <= float(arrival_s) + ttft_target_s < span_end_s:
                missed += 1  # judged at its TTFT deadline, which fell in this span
                missed_unfinished += 1
            continue
        arrival_s, finished = float(arrival_s), e2e_s is not None
        if finished and arrival_s + float(e2e_s) < span_start_s:
            continue  # finished before this span: judged then
        if arrival_s + float(ttft_s) >= span_start_s:  # first token in this span (earlier ones counted then)
            ttfts_s.append(float(ttft_s))
        late = float(ttft_s) > ttft_target_s
        tpot_s = _tpot_s(record, float(ttft_s), float(e2e_s)) if finished else None
        if tpot_s is not None:
            tpots_s.append(tpot_s)
        if late:  # judged at its TTFT deadline, in whichever span that falls
            if span_start_s <= arrival_s + ttft_target_s < span_end_s:
                missed += 1
                missed_unfinished += not finished
        elif finished:  # on time for its first token: judged when it finishes
            if tpot_s is None or tpot_s <= tpot_target_s:
                met += 1
            else:
                missed += 1
    latencies = {"ttft_p95_s": p95(ttfts_s), "tpot_p95_s": p95(tpots_s)}
    if not judging:
        return latencies
    judged = met + missed
    return {
        "goodput_rps": met / span_s,
        "attainment": met / judged if judged else 1.0,
        **latencies,
        "met_requests": met,
        "missed_requests": missed,
        "missed_unfinished_requests": missed_unfinished,
    }


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

_TOP_KEYS = ("name", "weights", "constraints", "ratio_clip", "accuracy_eps", "ttft_target_s", "tpot_target_s")
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
    """An SLO from a `conf/slo/*.yaml` node (DictConfig or dict): name, weights, constraints, ratio_clip, accuracy_eps,
    and the per-request targets ttft_target_s and tpot_target_s (seconds; required by goodput_rps and attainment)."""
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
        ttft_target_s=cfg.get("ttft_target_s"),
        tpot_target_s=cfg.get("tpot_target_s"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a conf/slo/*.yaml file")
    args = parser.parse_args()
    from omegaconf import OmegaConf

    slo = slo_from_config(OmegaConf.load(args.config))
    targets = "" if slo.targets is None else f"; targets TTFT <= {slo.ttft_target_s:g} s, TPOT <= {slo.tpot_target_s:g} s"
    print(f"SLO {slo.name!r}: weights {slo.weights}; constraints {[c.name for c in slo.constraints]}{targets}")
    reference = {"throughput_tok_s": 100.0, "latency_p95_s": 2.0, "energy_j_per_tok": 0.5, "accuracy": 0.4,
                 "goodput_rps": 2.0, "attainment": 0.95, "ttft_p95_s": 0.5, "tpot_p95_s": 0.05}
    values = {"throughput_tok_s": 200.0, "latency_p95_s": 1.0, "energy_j_per_tok": 0.5, "accuracy": 0.3,
              "goodput_rps": 1.5, "attainment": 0.85, "ttft_p95_s": 0.8, "tpot_p95_s": 0.04}
    reward = slo.evaluate(values, reference)
    used = slo.metrics_used
    print(f"example: { {m: values[m] for m in used} }\n     vs reference { {m: reference[m] for m in used} }\n"
          f"  -> total {reward.total:+.4f}; terms {reward.terms}; penalties {reward.penalties}")


if __name__ == "__main__":
    main()
