"""The epoch record: what serving one epoch with one arm produced and cost, and the SLO metrics it comes to.

    python -c "from helios.telemetry import latency_p95_s; print(latency_p95_s([0.0, 0.0, 1.0, 5.0], 2, [2.0, 1.0]))"

Every producer of epochs fills the same record: the env's live backend (measured), its replay backend (priced from
traces) and the HTTP server (measured on the wall clock). `epoch_metrics` turns a record and the epoch's arm switch
into the metrics the SLO reward and the observation (helios.observation) read, so the env and the server score an
epoch alike.

Switching is charged to the epoch served by the new arm: its seconds are added to the busy time (throughput) and to
the p95 latency (a switch delays every request of the epoch by its load), its joules to the energy. The server
therefore records each request's latency without the time it waited for that switch, which `epoch_metrics` adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

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
