"""The epoch record: what serving one epoch with one arm produced and cost, and the SLO metrics it comes to.

    python -c "from helios.telemetry import latency_p95_s; print(latency_p95_s([0.0, 0.0, 1.0, 5.0], 2, [2.0, 1.0]))"

Every producer of epochs fills the same record: the env's live backend (measured), its replay backend (priced from
traces) and the HTTP server (measured on the wall clock). `epoch_metrics` turns a record and the epoch's arm switch
into the metrics the SLO reward and the observation (helios.observation) read, so the env and the server score an
epoch alike.

Switching is charged to the epoch served by the new arm: its seconds are added to the busy time (throughput) and to
the p95 latency (a switch delays every request of the epoch by its load), its joules to the energy. The server
therefore records each request's latency without the time it waited for that switch, which `epoch_metrics` adds.

The env serves an epoch as a span of helios.scheduler (a queue that persists across epochs) and scores it with
`span_metrics` from the span's per-request records instead: there a switch is already inside every record (the
requests waited for it on the scheduler's clock) and inside the span's busy seconds, so nothing is added.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from helios.slo import p95, request_metrics

SwitchKind = Literal["none", "exit", "depth", "candidate", "cold"]


@dataclasses.dataclass(frozen=True, slots=True)
class EpochOutcome:
    """What serving one epoch with one arm produced and cost, before any switching cost."""

    requests: int
    tokens: int
    busy_s: float  # sum of batch prefill + decode seconds
    latency_p95_s: float
    energy_j: float
    accuracy: float
    histogram: np.ndarray  # float32 [bins]: share of generated tokens by exit layer / candidate layers
    batches: int
    engine_s: float = 0.0  # live: wall seconds inside EarlyExitEngine.generate


@dataclasses.dataclass(frozen=True, slots=True)
class SwitchCost:
    kind: SwitchKind
    seconds: float
    energy_j: float


NO_SWITCH = SwitchCost("none", 0.0, 0.0)
# The request counts a span reports when the SLO sets targets (helios.slo.request_metrics); an epoch that judged
# nothing reports them as 0.
REQUEST_COUNTS: tuple[str, ...] = ("met_requests", "missed_requests", "missed_unfinished_requests")


def empty_outcome(bins: int) -> EpochOutcome:
    return EpochOutcome(0, 0, 0.0, 0.0, 0.0, 0.0, np.zeros(bins, np.float32), 0)


def epoch_metrics(outcome: EpochOutcome, switch: SwitchCost) -> dict[str, float] | None:
    """The SLO metrics (helios.slo.METRICS) of an epoch, switching included; None for an epoch without tokens."""
    if outcome.tokens == 0:
        return None
    wall_s = outcome.busy_s + switch.seconds
    return {
        "throughput_tok_s": outcome.tokens / wall_s if wall_s > 0 else 0.0,
        "latency_p95_s": outcome.latency_p95_s + switch.seconds,
        "energy_j_per_tok": (outcome.energy_j + switch.energy_j) / outcome.tokens,
        "accuracy": outcome.accuracy,
    }


def latency_p95_s(arrivals_s: Sequence[float], batch_size: int, batch_durations_s: Sequence[float]) -> float:
    """p95 request latency of consecutive batches in arrival order: a batch starts when the server is free and its
    last request has arrived; a request's latency is its batch's end minus its arrival."""
    free_s = 0.0
    latencies: list[float] = []
    for b, duration_s in enumerate(batch_durations_s):
        members = arrivals_s[b * batch_size : (b + 1) * batch_size]
        end_s = max(free_s, max(members)) + duration_s
        free_s = end_s
        latencies += [end_s - a for a in members]
    return float(np.percentile(latencies, 95)) if latencies else 0.0


def span_metrics(
    *,
    records: Sequence[Any],
    in_system: Sequence[Mapping[str, Any]],
    span_start_s: float,
    span_end_s: float,
    busy_s: float,
    output_tokens: int,
    energy_j: float,
    accuracy: float,
    targets: Any = None,
    rejected: int = 0,
) -> dict[str, float] | None:
    """The SLO metrics (helios.slo.METRICS) of one span of continuous batching (an env epoch); None for a span in
    which nothing happened (no token, no finished request, nobody waiting): such an epoch scores neutral.

    `records`: helios.scheduler.RequestRecords of the requests that finished in the span; `in_system`: one mapping per
    request still queued or running at its end, with `arrival_s` and `ttft_s` (None before its first token);
    `busy_s`: prefill + decode + switch seconds of the span; `output_tokens`: tokens produced in it (by finished and
    unfinished requests); `energy_j`: the span's energy, switch included; `accuracy`: the mean score of the requests
    it finished (the caller's choice when it finished none); `targets`: helios.slo.RequestTargets, or None;
`rejected`: requests the scheduler refused in the span (they can never fit the arm's memory beside its weights).

      throughput_tok_s  output_tokens / busy_s: tokens per second of compute, i.e. the speed of the arm, not the
                        arrival rate (over wall time, every arm that keeps up would read the same); 0 when busy_s = 0
      latency_p95_s     p95 end-to-end latency of the requests finished in the span together with the age at the span's
                        end of each request still in the system (a lower bound of its latency, so a backlog shows)
      energy_j_per_tok  energy_j / output_tokens (a span that spent energy on no token is charged as if on one)
      accuracy          as given
      goodput_rps, attainment, ttft_p95_s, tpot_p95_s   helios.slo.request_metrics of records + in_system over the
                        span (goodput and attainment only when `targets` is given; computed by
                        `span_request_metrics`, its plain-Python twin), and its request counts
                        met_requests, missed_requests, missed_unfinished_requests; a rejected request counts as
                        missed in its span (otherwise an arm with little free memory would gain attainment by
                        refusing the requests it cannot hold) and as rejected_requests
    """
    if output_tokens == 0 and not records and not in_system and not rejected:
        return None
    span_s = span_end_s - span_start_s
    ages = [span_end_s - float(r["arrival_s"]) for r in in_system]
    e2es = [r.e2e_s for r in records if r.arrival_s + r.e2e_s >= span_start_s]  # finished before: counted then
    values: dict[str, float] = {
        "throughput_tok_s": output_tokens / busy_s if busy_s > 0 else 0.0,
        "latency_p95_s": p95(e2es + ages),
        "energy_j_per_tok": energy_j / max(output_tokens, 1),
        "accuracy": float(accuracy),
    }
    if span_s > 0 and math.isfinite(span_s):
        values.update(span_request_metrics(records, in_system, span_start_s, span_end_s, targets))
    else:  # a zero-length span (the clock was already past its end): nothing can be judged in it
        values.update({"ttft_p95_s": 0.0, "tpot_p95_s": 0.0})
        if targets is not None:
            values.update({"goodput_rps": 0.0, "attainment": 1.0, **dict.fromkeys(REQUEST_COUNTS, 0)})
    if targets is not None:
        met, missed = values["met_requests"], values["missed_requests"] + rejected
        values["missed_requests"] = missed
        values["attainment"] = met / (met + missed) if met + missed else 1.0
    values["rejected_requests"] = rejected
    return values


def span_request_metrics(records: Sequence[Any], in_system: Sequence[Mapping[str, Any]], span_start_s: float,
                         span_end_s: float, targets: Any) -> dict[str, float]:
    """helios.slo.request_metrics over the span's finished `records` (RequestRecords) and the requests still
    `in_system` at its end (mappings with arrival_s and ttft_s, None before the first token)."""
    return request_metrics([*records, *in_system], span_end_s - span_start_s, targets, span_start_s=span_start_s)

