"""The server's controller: every `epoch_s`, observation -> reward -> policy -> arm switch, on its own thread.

    python scripts/serve.py policy=exports/ucb learn=true epoch_s=5      # the controller decides every 5 s

It never touches the engine: it takes the engine worker's epoch tally (helios/serving/core.py: the scheduler's
per-request records and span counters since the last epoch), builds the epoch record the env builds
(helios.telemetry.EpochOutcome -> epoch_metrics, plus helios.slo.request_metrics for goodput/attainment/TTFT/TPOT),
the SLO reward (helios.slo) and the env's observation (helios.observation, the same builder), lets the policy learn
(bandits with learn=true) and act, and asks the core to switch; the switch itself happens on the worker between
decode steps (drain, recompute or keep: core.switch_arm), so no request is dropped.

Epoch record, live:
  requests, tokens    requests finished and tokens generated in the epoch (scheduler records and spans)
  busy_s              prefill + decode seconds (the switch is charged apart, as SwitchCost, like the env does)
  latency_p95_s       p95 end-to-end latency of the epoch's finished requests without the time they waited for a
                      switch's load (epoch_metrics adds the switch back), with each request still in flight counted
                      at its age so far (a lower bound; so that a backlog shows)
  energy_j            the meter over the epoch (the whole serving process: engine, HTTP, tokenization; switch included)
  accuracy            neutral: no references live
An epoch that generated no token is not decided (it goes on until one does). The reference of every ratio is the
first decided epoch (no offline reference run; no switch in it), and so is the nominal epoch that `queue_ratio`
divides the waiting requests by; the workload mix is unknown (zeros) and there is no episode (progress 0).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from helios.arms import Arm, exit_histogram
from helios.observation import ObservationLayout, build_observation
from helios.serving.core import EpochTally, ServingCore, percentile
from helios.serving.metrics import ServerMetrics
from helios.slo import METRICS, SLO, request_metrics
from helios.telemetry import NO_SWITCH, EpochOutcome, SwitchCost, SwitchKind, epoch_metrics

log = logging.getLogger("helios.serving")
ACCURACY_LIVE = 1.0  # no references live: accuracy enters the reward as neutral (ratio 1 to the reference)


def switch_kind(previous: Arm, arm: Arm) -> SwitchKind:
    if previous.candidate != arm.candidate:
        return "candidate"
    if previous.depth != arm.depth:
        return "depth"
    return "exit" if previous.index != arm.index else "none"


def overlap_s(start_s: float, end_s: float, windows: list[tuple[float, float]]) -> float:
    """Seconds of [start_s, end_s] spent inside the switch windows."""
    return sum(max(0.0, min(end_s, b) - max(start_s, a)) for a, b in windows)


class Controller:
    """The policy loop (module docstring). `step()` decides one epoch (the thread calls it every `epoch_s`)."""

    def __init__(self, core: ServingCore, *, policy: Any, slo: SLO, meter: Any, layout: ObservationLayout,
                 metrics: ServerMetrics, arm_index: int, mask: np.ndarray, epoch_s: float = 5.0,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.core, self.policy, self.slo, self.meter, self.layout, self.metrics = core, policy, slo, meter, layout, metrics
        self.arms: tuple[Arm, ...] = policy.arms
        self.mask = mask
        self.epoch_s = float(epoch_s)
        self.on_epoch = on_epoch
        self.arm_index = int(arm_index)
        self.reference: dict[str, float] | None = None
        self.reference_requests = 0  # the first epoch's requests: the nominal epoch of queue_ratio
        self.epoch_log: list[dict[str, Any]] = []
        self._pending_kind: SwitchKind = "none"  # the kind of the switch requested last epoch (charged to the next)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._carry: EpochTally | None = None  # an undecided (tokenless) epoch goes on

    @property
    def arm(self) -> Arm:
        return self.arms[self.arm_index]

    def start(self) -> None:
        self.meter.start()
        self._thread = threading.Thread(target=self._run, name="helios-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.epoch_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 (a policy or loader failure keeps the current arm; next epoch tries again)
                log.exception("policy epoch failed; keeping arm %d", self.arm_index)

    def observation(self, outcome: EpochOutcome | None, values: dict[str, float] | None, switch_s: float) -> np.ndarray:
        """The env's observation (helios.observation) after an epoch, or before any (both None)."""
        return build_observation(
            self.layout, histogram=None if outcome is None else outcome.histogram, values=values,
            reference=self.reference, switch_s=switch_s, waiting=self.core.queue_len,
            nominal=self.reference_requests, mixture=None, arm=self.arm, progress=0.0)

    def _tally(self) -> EpochTally | None:
        """The epoch so far (merged with a tokenless one before it), or None (kept) if it generated nothing."""
        tally = self.core.take_tally()
        carry = self._carry
        if carry is not None:
            carry.merge(tally)
            tally = carry
        if tally.span.output_tokens == 0:
            self._carry = tally
            return None
        self._carry = None
        return tally

    def outcome(self, tally: EpochTally) -> EpochOutcome:
        records = tally.records
        now = tally.span.end_s
        latencies = [r.e2e_s - overlap_s(r.arrival_s, r.finished_s, tally.switch_windows) for r in records]
        latencies += [now - item["arrival_s"] for item in self.core.in_flight()]  # lower bounds: the backlog shows
        exits = [layer for r in records for layer in r.exit_layers]
        energy = self.meter.stop()
        self.meter.start()
        self.metrics.energy.labels(energy.source).inc(max(0.0, energy.energy_j))
        busy_s = tally.span.prefill_s + tally.span.decode_s
        return EpochOutcome(
            requests=len(records), tokens=tally.span.output_tokens, busy_s=busy_s,
            latency_p95_s=percentile(latencies, 95),
            # A meter that read nothing must still leave a positive reference: the ratios divide by it.
            energy_j=max(energy.energy_j, 1e-9), accuracy=ACCURACY_LIVE,
            histogram=exit_histogram(exits, self.arm.num_layers, self.layout.bins),
            batches=tally.span.prefill_calls + tally.span.decode_steps, engine_s=busy_s)

    def step(self) -> dict[str, Any] | None:
        """Decide one epoch: returns its log record, or None when it generated no token (not decided yet)."""
        tally = self._tally()
        if tally is None:
            return None
        outcome = self.outcome(tally)
        switch = SwitchCost(self._pending_kind if tally.span.switches else "none", tally.span.switch_s, 0.0)
        values = epoch_metrics(outcome, switch)
        assert values is not None  # the epoch generated tokens
        span_s = max(tally.span.end_s - tally.span.start_s, 1e-9)
        finished = [{"arrival_s": r.arrival_s, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s, "output_tokens": r.output_tokens,
                     "tpot_s": None if math.isnan(r.tpot_s) else r.tpot_s} for r in tally.records]  # NaN: 1 token
        per_request = request_metrics([*finished, *self.core.in_flight()], span_s, self.slo.targets,
                                      span_start_s=tally.span.start_s)
        values.update({k: v for k, v in per_request.items() if k in METRICS})
        if self.reference is None:
            self.reference = {**values, **(epoch_metrics(outcome, NO_SWITCH) or {})}
            self.reference_requests = outcome.requests
        reward = self.slo.evaluate(values, self.reference)
        obs = self.observation(outcome, values, switch.seconds)
        info = {"metrics": values, "exit_histogram": outcome.histogram.tolist(), "switch_s": switch.seconds,
                "penalties": {k: v for k, v in reward.penalties.items() if v > 0}}
        previous = self.arm_index
        self.policy.update(previous, reward.total, obs, info)
        choice = int(self.policy.act(obs, self.mask))
        record = {"epoch": len(self.epoch_log), "arm": previous, "next_arm": choice, "reward": reward.total,
                  "requests": outcome.requests, "tokens": outcome.tokens, "switch_s": switch.seconds,
                  "switch_kind": switch.kind, **values, "observation": obs.tolist()}
        self.epoch_log.append(record)
        self.metrics.epochs.inc()
        self.metrics.reward.set(reward.total)
        if self.on_epoch is not None:
            self.on_epoch(record)
        self._pending_kind = "none"
        if choice != previous:
            if not (0 <= choice < len(self.arms) and self.mask[choice]):
                raise ValueError(f"the policy chose arm {choice}, which is not feasible; feasible arms: "
                                 f"{np.flatnonzero(self.mask).tolist()}")
            self._pending_kind = switch_kind(self.arms[previous], self.arms[choice])
            policy = self.core.switch_arm(self.arms[choice])
            self.arm_index = choice
            log.info("epoch %d: switching arm %d -> %d (%s, %s)", record["epoch"], previous, choice,
                     self.arms[choice].label, policy)
        return record
