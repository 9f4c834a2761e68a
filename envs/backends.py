"""Serving backends of the ModelDepth environment: one scheduler per episode, on one of two clocks.

    backend = ReplayBackend(spec, trace_paths)      # or LiveBackend(spec)
    backend.bind(workload)                          # the episode's workload (its rate known: capacity resolved)
    reference = backend.reference_profile()         # per source: the reference arm's metrics, same scheduler path
    backend.begin_episode(rng)                      # cold start: nothing loaded, empty queue, clock at 0
    result = backend.serve(epoch, arm_index)        # one epoch = one span of the episode's scheduler
    result.values                                   # the SLO's metrics (helios.telemetry.span_metrics)

Both backends run helios.scheduler (continuous batching under the memory budget, FIFO, the one admission and
retirement code the server runs too) on a `VirtualClock`; they differ only in the executor, i.e. in where a step's
seconds come from:
  live    helios.engine_executor on the arm's truncated model: a step advances the clock by the engine's measured
          compute; idle time is skipped (the clock jumps to the next arrival), so a lightly loaded simulated hour
          does not take an hour. Energy: helios.energy's meter around the span's compute.
  replay  helios.replay_executor: a step advances the clock by the calibrated cost model's price of the running
          rows and their context lengths; tokens and exit layers come from the trace (teacher-forced). Energy: busy
          seconds x the trace's power figure (an estimate, labelled `replay:<source>`).

An epoch is a span of time on the episode's timeline, not a fixed count of requests. Epoch e's requests (the
workload's, `Workload.epoch(e)`) are submitted at `t0 + arrival_s`, then `Scheduler.run_until(t_end)`:
  open loop (poisson, gamma)  t0 = e x epoch_s and t_end = t0 + epoch_s. The queue and the running sequences persist
                              across epochs: an overloaded epoch leaves a backlog that the next one starts with. A
                              step is atomic, so a span ends at the first iteration boundary at or after t_end.
  closed loop                 all requests at t0 = the clock now (where the last span ended), t_end = when the
                              scheduler runs dry (closed loop: the next batch is issued when this one finishes), so no
                              queue carries over.
Each request's `max_tokens` is the workload's draw (`Request.max_tokens`), else the env's `new_tokens`; a sequence also
ends at EOS (live: the model's; replay: the trace's full-depth output). Replay traces are recorded with
`ServingSpec.trace_tokens` tokens per request, so no output is cut short by its trace.

Switching happens between decode steps (helios.scheduler, "Switching"): an exit-setting change keeps the in-flight
sequences and their K/V (`keep`, free); a change of candidate or depth loads the new (candidate, depth) after the
in-flight sequences `drain` on the old arm, or preempts them to be re-prefilled on the new one (`recompute`), per the
config's `switch_policy`. A recompute across candidates whose tokenizers differ falls back to drain (generated token
ids mean nothing in another vocabulary), in both backends alike. The load's seconds are charged to the span in which
the switch happens: measured in live (wall clock of loading the truncated model and building its engine), modelled in
replay (seconds per resident weight byte x the arm's weight bytes, the rate measured while the trace was recorded).
A drain that outlasts its epoch completes, and is charged, in a later one. The first epoch of an episode pays a cold
load of its arm.

What an epoch reports (`EpochResult`): the records of the requests that finished in the span, the requests still in
the system at its end, and the span's seconds, tokens, energy, accuracy and exit-layer histogram (over the finished
requests' tokens).

Accuracy: each finished request gets a score (`_accuracy`; None: not scored, left out of the mean) and the epoch's
accuracy is the mean of its requests' scores (a per-request mean, not pooled over tokens; None when no request was
scored). `judge_score` (the default) scores every request, reference or not, under the env's judge (envs/judge.py:
the output's text re-tokenised by a fixed model at full depth, given the prompt); the text metrics (rouge_l,
exact_match, contains_answer) score only requests with a reference text. Live scores the served, free-running output
after the span has run: the judge is evaluation, so its time is outside the span's measured seconds (the virtual
clock only moves by the executor's measured steps inside `run_until`) and outside the energy meter's window. Where the
judge's own model at full depth, exits off, served a request (the reference arm of the default), its judge score is
already known: the engine returns each token's log-probability under that model (SamplingParams(logprobs=0), asked
only while that arm is loaded; it cost 1.007x greedy decoding on SmolLM2: benchmarks/logprobs_cost.py), so live
scores it from them without a judge forward (`Judge.score(..., served_nlls=)`; tests/test_judge.py compares both with
an independent forward). Replay
serves the trace's teacher-forced tokens (they set each request's length and exit layers) but scores what the arm
would have written: its free-running output, generated once per arm and trace request and cached beside the trace
(helios.profiling.free_running_outputs), cut to the served length or the arm's own EOS; scores are cached in memory
per (candidate, request, tokens) and, for the judge, on disk. Capacity runs are not scored (only their clock matters).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import itertools
import math
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from envs.judge import Judge  # torch-free: the judge's model loads on its first score
from helios.arms import Arm, CandidateSpec, ExitSpec, MemoryBudget, MemoryInfo, build_arms, exit_buckets
from helios.exit_config import ExitConfig
from helios.replay_executor import ReplayExecutor
from helios.scheduler import MemoryBudget as SchedulerBudget
from helios.scheduler import RequestRecord, Scheduler, SequenceRequest, SequenceState, VirtualClock
from helios.telemetry import SwitchKind, span_metrics
from helios.workloads import Request, Workload, pool_config

SWITCH_POLICIES: tuple[str, ...] = ("drain", "recompute")  # `keep` is chosen automatically for an exit-only change

# ----------------------------------------------------------------------------------------------- specification


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Everything both backends need, validated by the environment before either is built."""

    candidates: tuple[CandidateSpec, ...]
    exits: tuple[ExitSpec, ...]
    reference: str  # the candidate whose full-depth run normalises the reward
    workload: Workload  # before `bind`: built with a placeholder capacity (pool, mixtures and lengths are right)
    workload_cfg: dict[str, Any]
    memory_budget_bytes: int
    context_tokens: int  # K/V per sequence that sizes an arm's guaranteed batch (`Arm.batch_size`), like max_model_len
    max_batch_size: int  # the scheduler's cap on sequences running at once (an engine's batch limit)
    new_tokens: int  # max_tokens of a request whose workload draws none
    accuracy_metric: str
    histogram_bins: int
    energy_cfg: dict[str, Any]
    switch_policy: str = "drain"
    max_prefill_tokens: int | None = None  # the scheduler's cap on one prefill call's padded tokens
    judge: str = "smollm2-135m"  # the judge_score model (a candidate name), loaded at full depth when first needed

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget(self.memory_budget_bytes, self.context_tokens, self.max_batch_size)

    @property
    def open_loop(self) -> bool:
        return self.workload.arrival.kind != "closed"

    @property
    def trace_tokens(self) -> int:
        """Tokens a replay trace records per request: the most any request may generate (its source's largest
        `max_tokens`, or new_tokens), so that replay never cuts an output short of what live would generate."""
        lengths = self.workload.output_tokens
        if not lengths:
            return self.new_tokens
        return max(int(length.tokens if length.dist == "fixed" else length.max_tokens)  # type: ignore[arg-type]
                   for length in lengths.values())

    @property
    def reference_requests(self) -> int:
        """Requests in a nominal epoch: a closed loop's batch, else the base rate x epoch_s (at least 1)."""
        workload = self.workload
        if workload.base_rate_per_s is None:
            return int(workload.arrival.batch_size)
        return max(1, round(workload.base_rate_per_s * workload.arrival.epoch_s))

    def max_tokens(self, request: Request) -> int:
        return self.new_tokens if request.max_tokens is None else int(request.max_tokens)


def mix_reference(per_source: Mapping[str, Mapping[str, float]], mixture: Mapping[str, float]) -> dict[str, float]:
    """A reference for an epoch of `mixture`: the mixture-weighted mean of the per-source reference metrics."""
    total = sum(w for s, w in mixture.items() if w > 0)
    metrics = next(iter(per_source.values())).keys()
    return {m: sum(w * per_source[s][m] for s, w in mixture.items() if w > 0) / total for m in metrics}


def reference_arm(spec: ServingSpec, memory: MemoryInfo) -> Arm:
    """The reference run's setting: the reference candidate at full depth, no exits (measured even where the budget
    would mask it: its batch is at least 1)."""
    depth, budget = memory.num_layers, spec.budget
    weight_bytes = memory.weight_bytes_by_depth[depth]
    kv_per_seq = budget.kv_bytes_per_seq(memory, depth)
    batch = max(1, budget.batch_size(weight_bytes, kv_per_seq))
    return Arm(-1, spec.reference, -1, depth, depth, -1, "none", ExitConfig(), weight_bytes, kv_per_seq, batch, True)


def switch_kind(previous: Arm | None, arm: Arm) -> SwitchKind:
    if previous is None:
        return "cold"
    if previous.candidate != arm.candidate:
        return "candidate"
    if previous.depth != arm.depth:
        return "depth"
    return "none" if previous.exit_index == arm.exit_index else "exit"


# ----------------------------------------------------------------------------------------------- one epoch


@dataclasses.dataclass
class EpochResult:
    """One epoch served as a span of the episode's scheduler (module docstring). Seconds are on the scheduler's
    clock; `served` is False when no arm was ever loaded (a refused first action): then the requests wait."""

    served: bool
    start_s: float
    end_s: float
    records: list[RequestRecord]  # requests finished in the span (some may have arrived in earlier epochs)
    in_system: list[dict[str, Any]]  # still queued or running at the end: arrival_s, ttft_s (None: no token yet)
    busy_s: float  # prefill + decode + switch
    compute_s: float  # prefill + decode (live: measured; replay: modelled)
    switch_s: float  # loads applied in this span
    output_tokens: int
    energy_j: float
    energy_source: str
    accuracy: float | None  # mean of the finished requests' scores (module docstring); None when none was scored
    histogram: np.ndarray  # float32 [bins]: shares of the finished requests' tokens by exit layer / layers
    submitted: int  # this epoch's requests
    rejected: int  # refused by the scheduler in this span (never fit beside the weights)
    queued: int  # at the end (held requests included when nothing is loaded)
    running: int
    switch: SwitchKind  # the change of arm requested this epoch
    switch_policy: str  # how it was applied ("none" when no switch was requested)
    switch_pending: bool  # the requested arm is not in effect at the end (a drain still running)
    decode_steps: int = 0
    decode_rows: int = 0  # sequences summed over the span's decode steps
    recomputed: int = 0  # re-admissions after a recompute switch in this span
    max_running: int = 0  # most sequences running at once in the span

    def values(self, targets: Any = None, accuracy_default: float = 0.0) -> dict[str, float] | None:
        """helios.telemetry.span_metrics of the epoch, plus `concurrency` (the mean number of sequences per decode
        step: the batch the arm's memory let it run, HELIOS's "larger batches"); None when nothing happened in it
        (scores neutral)."""
        values = span_metrics(
            records=self.records, in_system=self.in_system, span_start_s=self.start_s, span_end_s=self.end_s,
            busy_s=self.busy_s, output_tokens=self.output_tokens, energy_j=self.energy_j,
            accuracy=accuracy_default if self.accuracy is None else self.accuracy, targets=targets,
            rejected=self.rejected,
        )
        if values is not None:
            values["concurrency"] = self.decode_rows / self.decode_steps if self.decode_steps else float(self.running)
        return values


@dataclasses.dataclass
class _Episode:
    """Where an episode stands: its scheduler (None until an arm is loaded), the requests held meanwhile, counters."""

    scheduler: Scheduler | None = None
    requested: int | None = None  # the arm index last requested (in effect, or pending behind a drain)
    held: list[SequenceRequest] = dataclasses.field(default_factory=list)
    closed_clock_s: float = 0.0  # closed loop before any scheduler: where the next epoch starts
    submitted: int = 0
    finished: int = 0
    rejected: int = 0
    actions: list[int | None] = dataclasses.field(default_factory=list)  # per epoch served (None: refused)


class SchedulerBackend(abc.ABC):
    """The part both backends share: the episode's scheduler, epochs as spans, metrics (module docstring).

    Subclasses provide the executor (`_executor`), the epoch's requests (`_requests`), the energy of a span
    (`_energy_begin` / `_energy_end`) and per-request accuracy (`_accuracy`)."""

    kind: str
    arms: tuple[Arm, ...]
    switch_cost_source: str
    energy_source: str

    def __init__(self, spec: ServingSpec) -> None:
        self.spec = spec
        self._episode = _Episode()
        self._tokenizers_equal: dict[tuple[str, str], bool] = {}
        self._buckets: dict[int, list[int]] = {}

    # -- hooks

    @abc.abstractmethod
    def _executor(self, arm: Any, *, cold: bool) -> Any:
        """An executor with `arm` current (cold: its first switch charges the load). For the episode, the reference
        run and capacity runs."""

    @abc.abstractmethod
    def _requests(self, epoch: int, t0_s: float) -> list[SequenceRequest]:
        """Epoch `epoch`'s requests, arriving at t0_s + their arrival_s."""

    @abc.abstractmethod
    def _energy_begin(self, executor: Any) -> None: ...

    @abc.abstractmethod
    def _energy_end(self, executor: Any) -> float: ...

    @abc.abstractmethod
    def _accuracy(self, request_id: Hashable, arm: Any, token_ids: Sequence[int]) -> float | None:
        """The score of one finished request under the env's accuracy_metric (None: not scored, i.e. a text metric
        and a request without reference text; judge_score scores every request)."""

    def _forget(self, request_id: Hashable) -> None:  # noqa: B027 (optional hook)
        """Drop what the backend kept to score a request that is not scored (capacity runs)."""

    @abc.abstractmethod
    def _tokenizer_vocab(self, candidate: str) -> Mapping[str, int]: ...

    @abc.abstractmethod
    def memory(self, candidate: str) -> MemoryInfo: ...

    # -- shared

    def scheduler_budget(self, candidate: str, depth: int) -> SchedulerBudget:
        """The scheduler's budget for (candidate, depth): weights at that depth + K/V per token over its layers,
        within the env's memory budget, at most max_batch_size sequences at once."""
        info = self.memory(candidate)
        return SchedulerBudget(self.spec.memory_budget_bytes, int(info.weight_bytes_by_depth[int(depth)]),
                               info.kv_bytes_per_token_layer * int(depth), self.spec.max_batch_size,
                               self.spec.max_prefill_tokens)

    def _budget(self, arm: Any) -> SchedulerBudget:
        return self.scheduler_budget(arm.candidate, arm.depth)

    def _same_tokenizer(self, a: str, b: str) -> bool:
        if a == b:
            return True
        key = (a, b) if a < b else (b, a)
        if key not in self._tokenizers_equal:
            self._tokenizers_equal[key] = self._tokenizer_vocab(a) == self._tokenizer_vocab(b)
        return self._tokenizers_equal[key]

    def _policy(self, current: Any, arm: Any) -> str:
        if (current.candidate, current.depth) == (arm.candidate, arm.depth):
            return "keep"
        if self.spec.switch_policy == "recompute" and not self._same_tokenizer(current.candidate, arm.candidate):
            return "drain"  # generated ids mean nothing in another vocabulary (module docstring)
        return self.spec.switch_policy

    def _bucket_table(self, num_layers: int) -> list[int]:
        if num_layers not in self._buckets:
            self._buckets[num_layers] = exit_buckets(num_layers, self.spec.histogram_bins).tolist()
        return self._buckets[num_layers]

    @property
    def episode(self) -> _Episode:
        return self._episode

    def begin_episode(self, rng: np.random.Generator) -> None:
        """Start an episode cold: nothing loaded, no queue, the clock at 0."""
        self._end_episode()
        self._episode = _Episode()

    def _end_episode(self) -> None:  # noqa: B027 (optional hook)
        """Release what the last episode held."""

    def _episode_executor(self, arm: Any) -> Any:
        """The executor of a new episode's scheduler, cold (its first switch charges the load)."""
        return self._executor(arm, cold=True)

    def serve(self, epoch: int, arm_index: int | None) -> EpochResult:
        """Serve epoch `epoch` with arm `arm_index` (None: keep what is loaded, a refused action)."""
        ep = self._episode
        ep.actions.append(arm_index)
        spec = self.spec
        sched = ep.scheduler
        if spec.open_loop:
            epoch_s = float(spec.workload.arrival.epoch_s)
            t0, t_end = epoch * epoch_s, (epoch + 1) * epoch_s
        else:
            t0 = sched.clock.now() if sched is not None else ep.closed_clock_s
            t_end = math.inf
        requests = self._requests(epoch, t0)
        submitted = len(requests)
        ep.submitted += submitted
        kind: SwitchKind = "none"
        policy = "none"
        if arm_index is not None and arm_index != ep.requested:
            arm = self.arms[arm_index]
            kind = switch_kind(None if ep.requested is None else self.arms[ep.requested], arm)
            if sched is None:  # the episode's first arm: a scheduler on the episode's clock, the cold load pending
                sched = ep.scheduler = Scheduler(self._episode_executor(arm), self._budget(arm), VirtualClock(t0),
                                                 arm=None)
                policy = "drain"  # nothing is in flight, so the load applies at the first iteration
                requests = ep.held + requests  # what waited for an arm keeps its arrival times (and its wait)
                ep.held = []
            else:
                policy = self._policy(sched.arm, arm)
            sched.switch_arm(arm, self._budget(arm), policy)  # type: ignore[arg-type]
            ep.requested = arm_index
        if sched is None:  # nothing ever loaded: the requests wait for the first arm, and the time passes
            ep.held.extend(requests)
            end = t_end if math.isfinite(t_end) else t0
            return EpochResult(
                served=False, start_s=t0, end_s=end, records=[],
                in_system=[{"arrival_s": r.arrival_s, "ttft_s": None} for r in ep.held], busy_s=0.0, compute_s=0.0,
                switch_s=0.0, output_tokens=0, energy_j=0.0, energy_source=self.energy_source, accuracy=None,
                histogram=np.zeros(spec.histogram_bins, np.float32), submitted=submitted, rejected=0,
                queued=len(ep.held), running=0, switch="none", switch_policy="none", switch_pending=False)
        result = self._run_span(sched, requests, t_end)
        result.submitted = submitted
        result.switch, result.switch_policy = kind, policy
        result.switch_pending = sched.arm is not self.arms[ep.requested]  # type: ignore[index]
        ep.finished += len(result.records)
        ep.rejected += result.rejected
        return result

    def _run_span(self, sched: Scheduler, requests: Sequence[SequenceRequest], t_end: float, *,
                  score: bool = True) -> EpochResult:
        """Submit `requests`, run the scheduler to `t_end`, and summarise the span (`score`: compute accuracy).

        Scoring comes after `run_until` and after the energy meter stops: the span's seconds and energy are the
        serving's alone, however long the judge takes (module docstring, Accuracy)."""
        executor = sched.executor
        rejected_before = len(sched.rejected)
        for request in requests:
            sched.submit(request)
        self._energy_begin(executor)
        records = sched.run_until(t_end)
        energy_j = self._energy_end(executor)
        span = sched.span
        # Accuracy and exit layers of the finished requests, from what the executor captured at release.
        released = executor.released
        bins = self.spec.histogram_bins
        counts = [0] * bins
        scores: list[float] = []
        for record in records:
            arm, token_ids = released.pop(record.request_id)
            if score:
                value = self._accuracy(record.request_id, arm, token_ids)
                if value is not None:
                    scores.append(value)
            else:
                self._forget(record.request_id)
            table = self._bucket_table(arm.num_layers if hasattr(arm, "num_layers") else arm.depth)
            for layer in record.exit_layers:
                counts[table[layer]] += 1
        total = sum(counts)
        histogram = np.array([c / total for c in counts] if total else counts, dtype=np.float32)
        end = span.end_s
        in_system = [
            {"arrival_s": seq.request.arrival_s,
             "ttft_s": None if seq.first_token_s != seq.first_token_s else seq.first_token_s - seq.request.arrival_s}
            for seq in sched.in_system()
        ]
        return EpochResult(
            served=True, start_s=span.start_s, end_s=end, records=records, in_system=in_system, busy_s=span.busy_s,
            compute_s=span.prefill_s + span.decode_s, switch_s=span.switch_s, output_tokens=span.output_tokens,
            energy_j=energy_j, energy_source=self.energy_source,
            accuracy=sum(scores) / len(scores) if scores else None, histogram=histogram, submitted=len(requests),
            rejected=len(sched.rejected) - rejected_before, queued=sched.queue_len, running=sched.running,
            switch="none", switch_policy="none", switch_pending=False, decode_steps=span.decode_steps,
            recomputed=span.recomputed, max_running=span.max_running, decode_rows=span.decode_rows,
        )

    # -- reference and capacity: the same scheduler path, on a scheduler of their own

    def _standalone(self, arm: Any, requests: Sequence[SequenceRequest], t_end: float, *,
                    fit_all: bool = False, score: bool = True) -> EpochResult:
        """`requests` served by `arm`, already loaded (warm: no switch), from an empty queue at clock 0. `fit_all`:
        enlarge the memory budget, if needed, so that the largest request fits beside the weights (the reference
        run is measured even where the budget would mask its arm, as its batch is at least 1)."""
        executor = self._executor(arm, cold=False)
        budget = self._budget(arm)
        if fit_all and requests:
            need = budget.weight_bytes + budget.kv_bytes_per_token * max(r.prompt_tokens + r.max_tokens
                                                                         for r in requests)
            budget = dataclasses.replace(budget, memory_budget_bytes=max(budget.memory_budget_bytes, need))
        sched = Scheduler(executor, budget, VirtualClock(0.0), arm=arm)
        return self._run_span(sched, requests, t_end, score=score)

    def reference_profile(self, targets: Any = None) -> dict[str, dict[str, float]]:
        """Per workload source: the metrics of the reference candidate at full depth, no exits, already loaded,
        serving a nominal epoch of that source from an empty queue, with memory for at least its largest request
        beside the weights (so it refuses none): `reference_requests` requests, arriving evenly
        over epoch_s at the workload's base rate (open loop; the span is [0, epoch_s)), or all at 0 (closed loop;
        the span runs until they finish). Computed by `_run_span` and span_metrics, as every epoch is."""
        spec = self.spec
        profile: dict[str, dict[str, float]] = {}
        n = spec.reference_requests
        epoch_s = float(spec.workload.arrival.epoch_s) if spec.open_loop else math.inf
        for index, source in enumerate(spec.workload.sources):
            rng = np.random.default_rng([spec.workload.seed, 0x5EF, index])
            arrivals = [k * epoch_s / n if spec.open_loop else 0.0 for k in range(n)]
            lengths = spec.workload.output_tokens
            max_tokens = [spec.new_tokens if not lengths else lengths[source].draw(rng) for _ in range(n)]
            requests = self._source_requests(source, arrivals, max_tokens, tag="reference")
            result = self._standalone(self._reference_arm, requests, epoch_s, fit_all=True)
            values = result.values(targets, accuracy_default=0.0)
            if values is None:
                raise RuntimeError(f"the reference run of source {source!r} produced nothing")
            profile[source] = values
        return profile

    @abc.abstractmethod
    def _source_requests(self, source: str, arrivals_s: Sequence[float], max_tokens: Sequence[int],
                         tag: str) -> list[SequenceRequest]:
        """Requests of `source` from the backend's pool, cycling through it, at the given arrivals and lengths."""

    def measure_capacity(self, candidate: str, depth: int, requests: int = 256) -> dict[str, Any]:
        """Requests/s that the continuous scheduler sustains with (candidate, depth), exits off, at saturation on
        the workload's request mix: `requests` requests (sources drawn by the episode's mean mixture, weighted by
        each epoch's load; max_tokens by the workload's output lengths) all at t = 0. The rate is taken over the
        middle half of the completions (finishes n/4 .. 3n/4), while the queue is still full, which leaves out the
        start (every sequence prefilling at once) and the drain at the end."""
        spec = self.spec
        workload = spec.workload
        info = self.memory(candidate)
        if not 1 <= depth <= info.num_layers:
            raise ValueError(f"capacity_of {candidate}@{depth}: depth outside 1..{info.num_layers}")
        weights = np.zeros(len(workload.sources))
        for e in range(workload.episode_epochs):
            mixture = workload.mixture_at(e)
            weights += workload.load_at(e) * np.array([mixture[s] for s in workload.sources])
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))
        rng = np.random.default_rng([workload.seed, 0xCA9])
        sources = [workload.sources[int(i)] for i in rng.choice(len(weights), size=requests, p=weights)]
        lengths = workload.output_tokens
        batch: list[SequenceRequest] = []
        for k, source in enumerate(sources):
            length = spec.new_tokens if not lengths else lengths[source].draw(rng)
            batch += self._source_requests(source, [0.0], [length], tag=f"capacity-{k}")
        arm = _CapacityArm(candidate, int(depth), ExitConfig(), info.num_layers)
        start = time.perf_counter()
        result = self._standalone(arm, batch, math.inf, score=False)  # a rate: accuracy is not needed
        finishes = sorted(r.finished_s for r in result.records)
        lo, hi = len(finishes) // 4, (3 * len(finishes)) // 4
        if len(finishes) < 8 or finishes[hi] <= finishes[lo]:
            raise RuntimeError(f"capacity of {candidate}@{depth}: too few completions to measure ({len(finishes)})")
        return {"capacity_rps": (hi - lo) / (finishes[hi] - finishes[lo]), "requests": requests,
                "finished": len(finishes), "makespan_s": finishes[-1], "rejected": result.rejected,
                "measure_wall_s": time.perf_counter() - start}

    # -- state

    def state_dict(self) -> dict[str, Any]:
        return {"actions": list(self._episode.actions)}

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the backend holds (idempotent)."""


@dataclasses.dataclass(frozen=True)
class _CapacityArm:
    """The arm whose capacity is measured: (candidate, depth), exits off (not necessarily in the arm table)."""

    candidate: str
    depth: int
    exit_config: ExitConfig
    num_layers: int


# ----------------------------------------------------------------------------------------------- replay


class _ReplayStepper(ReplayExecutor):
    """The replay executor as the env drives it: charges a cold load, sums the span's energy (seconds x the serving
    candidate's power figure), and keeps what each retiring sequence produced for scoring."""

    def __init__(self, replayers: Mapping[str, Any], arm: Any, *, load_s_per_byte: Mapping[str, float],
                 power_w: Mapping[str, float], cold: bool) -> None:
        super().__init__(replayers, arm, load_s_per_byte=load_s_per_byte, record_tokens=True)
        self.power_w = dict(power_w)
        self._power = self.power_w[arm.candidate]
        self.energy_j = 0.0
        self.cold = cold
        self.free_switch = False  # evaluate_arms: "if it were already loaded"
        self.released: dict[Hashable, tuple[Any, list[int]]] = {}

    def prefill(self, seqs: list[SequenceState]) -> float:
        seconds = super().prefill(seqs)
        self.energy_j += seconds * self._power
        return seconds

    def decode(self, seqs: list[SequenceState]) -> float:
        seconds = super().decode(seqs)
        self.energy_j += seconds * self._power
        return seconds

    def release(self, seq: SequenceState) -> None:
        super().release(seq)
        self.released[seq.request.request_id] = (self.arm, seq.token_ids)

    def switch(self, arm: Any, preempted: list[SequenceState]) -> float:
        seconds = super().switch(arm, preempted)
        if self.cold:  # the episode's first load: nothing was resident, whatever arm the executor was built with
            seconds, self.cold = self.load_s(arm), False
        if self.free_switch:
            seconds = 0.0
        self._power = self.power_w[arm.candidate]
        self.energy_j += seconds * self._power
        return seconds


class ReplayBackend(SchedulerBackend):
    """Epochs priced from traces through helios.replay_executor on a virtual clock (module docstring)."""

    kind = "replay"

    def __init__(self, spec: ServingSpec, trace_paths: Mapping[str, Path], *, variants: int = 4) -> None:
        from helios.models import load_tokenizer
        from helios.replay import Replayer
        from helios.traces import read_trace

        super().__init__(spec)
        self.trace_paths = {name: Path(path) for name, path in trace_paths.items()}
        traces = {name: read_trace(path) for name, path in trace_paths.items()}
        self._check_traces(traces, trace_paths)
        self.replayers = {name: Replayer(trace) for name, trace in traces.items()}
        self._memory = {name: _trace_memory(trace.meta) for name, trace in traces.items()}
        self.arms = build_arms(spec.candidates, spec.exits, self._memory, spec.budget, spec.reference)
        self._reference_arm = reference_arm(spec, self._memory[spec.reference])
        self.power_w = {name: float(trace.meta["power_w"]) for name, trace in traces.items()}
        sources = {str(trace.meta.get("energy_source", "model")) for trace in traces.values()}
        self.energy_source = "replay:" + ",".join(sorted(sources)) + " (estimate: busy seconds x power)"
        self.load_s_per_byte, self.switch_cost_source = self._load_rates(traces)
        self.variants = variants

        # The trace pool: request id -> source and reference text (shared by every candidate's trace).
        any_trace = traces[spec.candidates[0].name]
        first = self.replayers[spec.candidates[0].name]
        self.pool_source = {rid: str(any_trace.source[rows[0]]) for rid, rows in first.request_rows.items()}
        self.pool_by_source = {
            source: np.array(sorted(r for r, s in self.pool_source.items() if s == source), dtype=np.int64)
            for source in spec.workload.sources
        }
        missing = [s for s, ids in self.pool_by_source.items() if ids.size == 0]
        if missing:
            raise ValueError(f"the traces hold no request of source(s) {missing}; re-record them for this workload")
        self.references: list[str | None] = list(any_trace.meta["references"])
        self._pool_requests: list[Request] | None = None  # the trace pool's requests (prompt text), for the judge
        self._judge: Judge | None = None  # built when first needed
        self._judge_contexts: dict[int, list[int]] = {}  # trace request -> its prompt's judge ids
        self.tokenizers = {c.name: load_tokenizer(c.name, progress=False) for c in spec.candidates}
        self._accuracy_cache: dict[tuple[str, int, tuple[int, ...]], float | None] = {}
        self._free_running: dict[tuple[str, int, ExitConfig], dict[int, list[int]]] = {}  # per arm: rid -> output
        self._stepper: _ReplayStepper | None = None
        self._extrapolation_warned: set[str] = set()  # candidates warned of pricing beyond their calibration
        self._evaluating = False
        self._variant = 0
        self._ids: list[list[list[int]]] = []
        self._epoch_requests: dict[tuple[int, int], list[SequenceRequest]] = {}

    # -- construction helpers

    def _check_traces(self, traces: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
        spec = self.spec
        expected = _json_roundtrip(pool_config(spec.workload_cfg))
        names = None
        for name, trace in traces.items():
            meta = trace.meta
            if meta.get("candidate") != name:
                raise ValueError(f"trace {paths[name]} is of candidate {meta.get('candidate')!r}, not {name!r}")
            if meta.get("workload") != expected:
                raise ValueError(f"trace {paths[name]} was recorded on a different workload than this environment's; "
                                 "re-record it (envs.model_depth builds traces with build_traces=True)")
            if int(meta.get("new_tokens", 0)) < spec.trace_tokens:
                raise ValueError(f"trace {paths[name]} has {meta.get('new_tokens')} tokens per request; the "
                                 f"environment needs {spec.trace_tokens} (the most a request of this workload may "
                                 "generate, or new_tokens)")
            if names is None:
                names = meta.get("request_names")
            elif meta.get("request_names") != names:
                raise ValueError(f"trace {paths[name]} holds a different request pool than the other candidates' traces")

    def _load_rates(self, traces: Mapping[str, Any]) -> tuple[dict[str, float], str]:
        rates: dict[str, float] = {}
        measured = []
        for name, trace in traces.items():
            timings = trace.meta.get("load_timings")
            if not timings:
                depths = next(c.depths for c in self.spec.candidates if c.name == name)
                timings = [_time_load(name, min(depths))]
                measured.append(name)
            rates[name] = sum(t["load_s"] for t in timings) / max(sum(t["weight_bytes"] for t in timings), 1)
        if measured:
            warnings.warn(f"traces of {measured} predate recorded load timings: switch costs measured now, once "
                          "(re-record the traces to make replay rewards reproducible across constructions)", stacklevel=3)
            return rates, "measured at construction for " + ", ".join(measured) + "; trace meta load_timings otherwise"
        return rates, "trace meta load_timings (measured while recording)"

    def bind(self, workload: Workload) -> None:
        """The episode workload (rates resolved). Variant k plays the workload's draw k (`Workload.epoch(e, draw=k)`:
        its own arrival times, sources and output lengths; variant 0 is the draw live serves) and, per epoch, the
        trace request that stands in for each workload request: one of the same source (common to all arms, so arms
        meet the same requests)."""
        spec = self.spec = dataclasses.replace(self.spec, workload=workload)
        self._ids = []
        self._epoch_requests = {}
        self._lengths = []  # [variant][epoch] -> [(source, arrival_s, max_tokens)]
        for k in range(self.variants):
            lengths = [[(r.source, r.arrival_s, spec.max_tokens(r)) for r in workload.epoch(e, draw=k)]
                       for e in range(workload.episode_epochs)]
            rows = []
            for e, requests in enumerate(lengths):
                rng = np.random.default_rng([workload.seed, 0x5EED, k, e])
                rows.append([int(rng.choice(self.pool_by_source[source])) for source, _, _ in requests])
            self._lengths.append(lengths)
            self._ids.append(rows)
        self._paired: dict[tuple[int, int], float | None] = {}

    def memory(self, candidate: str) -> MemoryInfo:
        if candidate not in self._memory:
            raise ValueError(f"replay can only price candidates with a trace: {sorted(self._memory)}; got {candidate!r}")
        return self._memory[candidate]

    def _tokenizer_vocab(self, candidate: str) -> Mapping[str, int]:
        return self.tokenizers[candidate].get_vocab()

    def _run_span(self, sched: Scheduler, requests: Sequence[SequenceRequest], t_end: float, *,
                  score: bool = True) -> EpochResult:
        result = super()._run_span(sched, requests, t_end, score=score)
        arm = sched.arm
        if arm is not None and arm.candidate not in self._extrapolation_warned:
            why = self.replayers[arm.candidate].cost.batch_extrapolation(result.max_running)
            if why is not None:
                self._extrapolation_warned.add(arm.candidate)
                warnings.warn(f"replay of {arm.candidate} {why} (helios.profiling.ensure_trace(calibration_max_batch=...)"
                              " records a trace calibrated on larger batches)", UserWarning, stacklevel=2)
        return result

    def _executor(self, arm: Any, *, cold: bool) -> _ReplayStepper:
        return _ReplayStepper(self.replayers, arm, load_s_per_byte=self.load_s_per_byte, power_w=self.power_w,
                              cold=cold)

    def _episode_executor(self, arm: Any) -> _ReplayStepper:
        """One executor per env, reset per episode: indexing the traces and tabulating an arm's step prices is
        done once, not per episode."""
        if self._stepper is None:
            self._stepper = self._executor(arm, cold=True)
        stepper = self._stepper
        stepper._live.clear()  # noqa: SLF001 (a new episode: nothing holds K/V)
        stepper.released.clear()
        stepper.cold, stepper.free_switch, stepper.energy_j = True, self._evaluating, 0.0
        return stepper

    def _requests(self, epoch: int, t0_s: float) -> list[SequenceRequest]:
        # Open loop: t0 is fixed by the epoch, so the (immutable) requests of a (variant, epoch) are built once and
        # reused by every episode that draws the variant; building them was the largest cost of a loaded step.
        key = (self._variant, epoch)
        cached = self._epoch_requests.get(key) if self.spec.open_loop else None
        if cached is not None:
            return list(cached)
        ids = self._ids[self._variant][epoch]
        prompt_len = self._prompt_len
        requests = [SequenceRequest((epoch, k, rid), t0_s + arrival_s, prompt_len(rid), max_tokens, rid)
                    for k, ((_, arrival_s, max_tokens), rid) in enumerate(zip(self._lengths[self._variant][epoch], ids))]
        if self.spec.open_loop:
            self._epoch_requests[key] = requests
        return list(requests)

    def _prompt_len(self, rid: int) -> int:
        replayer = self.replayers[self.spec.reference]
        return int(replayer.trace.prompt_len[replayer.request_rows[rid][0]])

    def _source_requests(self, source: str, arrivals_s: Sequence[float], max_tokens: Sequence[int],
                         tag: str) -> list[SequenceRequest]:
        pool = self.pool_by_source[source]
        return [SequenceRequest((tag, source, k, int(pool[k % pool.size])), float(a), self._prompt_len(int(pool[k % pool.size])),
                                int(m), int(pool[k % pool.size]))
                for k, (a, m) in enumerate(zip(arrivals_s, max_tokens))]

    def _energy_begin(self, executor: _ReplayStepper) -> None:
        executor.energy_j = 0.0

    def _energy_end(self, executor: _ReplayStepper) -> float:
        return executor.energy_j

    def _rid(self, request_id: Hashable) -> int:
        return int(request_id[-1])  # type: ignore[index]  (every replay request id ends with its trace request)

    def _accuracy(self, request_id: Hashable, arm: Any, token_ids: Sequence[int]) -> float | None:
        rid = self._rid(request_id)
        full = self._full_output(arm, rid)
        # The executor's tokens are the trace's teacher-forced predictions, which set how many tokens were served; what
        # a user would read is the arm's free-running output: that many tokens of it (fewer where the arm reaches its
        # own EOS first, where live stops). A request whose tokens came from two arms (an exit-only switch kept it
        # running, helios.scheduler "keep") is scored as the arm that finished it.
        return self._score(arm.candidate, rid, full[: len(token_ids)], full)

    def _full_output(self, arm: Any, rid: int) -> list[int]:
        """`arm`'s whole free-running output of trace request `rid`, up to its own first EOS (helios.profiling.
        free_running_outputs: generated once per arm and cached beside the trace); every served output of the
        request is scored as a prefix of it, so the judge prices them all with one forward (envs/judge.py)."""
        key = (arm.candidate, int(arm.depth), arm.exit_config)
        outputs = self._free_running.get(key)
        if outputs is None:
            from helios.profiling import free_running_outputs

            eos = set(self.replayers[arm.candidate].trace.meta.get("eos_ids") or [])
            outputs = {}
            for r, tokens in free_running_outputs(self.trace_paths[arm.candidate],
                                                  self.replayers[arm.candidate].trace, int(arm.depth),
                                                  arm.exit_config).items():
                cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
                outputs[r] = list(tokens[:cut])
            self._free_running[key] = outputs
        return outputs[rid]

    def _score(self, candidate: str, rid: int, token_ids: Sequence[int],
               full: Sequence[int] | None = None) -> float | None:
        key = (candidate, rid, tuple(token_ids))
        score = self._accuracy_cache.get(key, -1.0)
        if score == -1.0:
            def decode(ids: Sequence[int]) -> str:
                return self.tokenizers[candidate].decode(list(ids), skip_special_tokens=True)

            if self.spec.accuracy_metric == "judge_score" and candidate == self.spec.judge:
                # The judge's own vocabulary: its tokens as generated, and every served output is exactly a prefix
                # of the arm's whole output, so one forward prices them all.
                score = self.judge.score(self.pool_request(rid), ids=list(token_ids),
                                         context=self._judge_context(rid), full_ids=None if full is None else list(full))
            elif self.spec.accuracy_metric == "judge_score":
                score = self.judge.score(self.pool_request(rid), decode(token_ids), context=self._judge_context(rid),
                                         full_text=None if full is None else decode(full))
            elif self.references[rid] is None:
                score = None
            else:
                from helios.metrics import compute_accuracy

                score = compute_accuracy(self.spec.accuracy_metric, predictions=[decode(token_ids)],
                                         references=[self.references[rid]])
            self._accuracy_cache[key] = score
        return score

    @property
    def judge(self) -> Judge:
        """The env's judge (envs/judge.py), scores cached on disk: replay meets the same (request, tokens) in every
        env built on these traces."""
        if self._judge is None:
            self._judge = Judge(self.spec.judge, prompt_margin=self.spec.trace_tokens, disk_cache=True)
        return self._judge

    def _judge_context(self, rid: int) -> list[int]:
        if rid not in self._judge_contexts:
            self._judge_contexts[rid] = self.judge.context_ids(self.pool_request(rid))
        return self._judge_contexts[rid]

    def pool_request(self, rid: int) -> Request:
        """Trace request `rid` (its prompt text): the workload's pool, rebuilt as the trace recorded it
        (helios.profiling.ensure_trace: `Workload.pool(per_source)`), checked against the trace's request names."""
        if self._pool_requests is None:
            meta = self.replayers[self.spec.reference].trace.meta
            names = list(meta.get("request_names") or [])
            per_source = meta.get("per_source")
            pool = self.spec.workload.pool(int(per_source)) if per_source else []
            if not names or [r.request_id for r in pool] != names:
                raise ValueError("the traces do not record their request pool (request_names, per_source) as this "
                                 "workload rebuilds it, so judge_score cannot find their prompts; re-record them")
            self._pool_requests = pool
        return self._pool_requests[rid]

    # -- replay only: what an arm would do, without serving

    def paired_reference_accuracy(self, epoch: int) -> float | None:
        """The reference arm's mean accuracy on epoch `epoch`'s own requests (this episode's variant), each
        generating what the replay executor would give it (max_tokens, cut at the trace's EOS): common random
        numbers for the accuracy floor (the env card's Rewards section)."""
        key = (self._variant, epoch)
        if key not in self._paired:
            arm = self._reference_arm
            scores = []
            for (_, _, max_tokens), rid in zip(self._lengths[self._variant][epoch], self._ids[self._variant][epoch]):
                # The reference's output is the trace's own (free-running already), cut at its EOS, where the replay
                # executor ends the request too (helios.replay_executor).
                full = self._full_output(arm, rid)
                score = self._score(arm.candidate, rid, full[:max_tokens], full)
                if score is not None:
                    scores.append(score)
            self._paired[key] = sum(scores) / len(scores) if scores else None
        return self._paired[key]

    def fork(self) -> _Episode:
        """A copy of the episode's state that can be served on without touching the episode (evaluate_arms). The
        traces, the tabulated step prices and the arm objects are shared, not copied."""
        ep = self._episode
        memo: dict[int, Any] = {id(arm): arm for arm in self.arms}
        stepper = self._stepper
        if stepper is not None:
            memo[id(stepper._candidates)] = stepper._candidates  # noqa: SLF001
            memo[id(stepper._tables_cache)] = stepper._tables_cache  # noqa: SLF001
            for cand in stepper._candidates.values():  # noqa: SLF001
                memo[id(cand)] = cand
            for tables in stepper._tables_cache.values():  # noqa: SLF001
                memo[id(tables)] = tables
            memo[id(stepper.power_w)] = stepper.power_w
        sched = ep.scheduler
        if sched is not None:
            if sched.pending_arrivals:
                raise RuntimeError("fork between epochs only: every submitted request has arrived then")
            memo[id(sched._lock)] = threading.Lock()  # noqa: SLF001 (a lock cannot be copied)
            memo[id(sched._order)] = itertools.count()  # noqa: SLF001 (orders only break ties among future arrivals)
        forked = copy.deepcopy(ep, memo)
        if forked.scheduler is not None:  # the executor finds its sequences by id(): re-key them to the copies
            executor = forked.scheduler.executor
            executor._live = {id(seq): seq for seq in executor._live.values()}  # noqa: SLF001
        return forked

    def evaluate(self, epoch: int, arm_index: int) -> EpochResult:
        """What serving `epoch` with `arm_index` would give from the episode's current state if the arm were already
        loaded: no load time (in-flight sequences still follow the switch policy). The episode is left as it was."""
        saved = self._episode
        self._episode = self.fork()
        self._evaluating = True
        try:
            if self._episode.scheduler is not None:
                self._episode.scheduler.executor.free_switch = True
            return self.serve(epoch, arm_index)
        finally:
            self._episode, self._evaluating = saved, False

    @contextlib.contextmanager
    def planning(self, variant: int) -> Iterator[None]:
        """Serve on a fork of the episode as it stands (queue, running sequences, loaded arm, clock) with the arrivals
        of draw `variant` from the next epoch on; on exit the episode and its draw are as they were. Nested calls fork
        the fork (a plan's branches share their prefix). What a model-based agent plans with (ModelDepthEnv.simulate):
        switches are charged as in the episode, unlike `evaluate`."""
        if not 0 <= variant < self.variants:
            raise ValueError(f"variant {variant} outside 0..{self.variants - 1}")
        saved = self._episode, self._variant
        self._episode, self._variant = self.fork(), int(variant)
        try:
            yield
        finally:
            self._episode, self._variant = saved

    def begin_episode(self, rng: np.random.Generator) -> None:
        super().begin_episode(rng)
        self._variant = int(rng.integers(self.variants))

    @property
    def variant(self) -> int:
        """The draw of the workload the current episode plays."""
        return self._variant

    def begin_episode_at(self, variant: int) -> None:
        """A cold episode on request sample `variant` (resuming: the env then re-serves the recorded epochs)."""
        if not 0 <= variant < self.variants:
            raise ValueError(f"variant {variant} outside 0..{self.variants - 1}")
        self._episode = _Episode()
        self._variant = variant

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "variant": self._variant}

    def close(self) -> None:
        self._episode = _Episode()
        self._stepper = None


def rate_free_workload_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The workload config without a capacity-relative rate: what a capacity measurement depends on (the request
    mix and output lengths, not the rate, which is what it is measured for)."""
    cfg = dict(cfg)
    arrival = dict(cfg.get("arrival") or {})
    if arrival.get("rate_x_capacity") is not None:
        arrival.pop("rate_x_capacity")
        arrival.pop("capacity_of", None)
        cfg["arrival"] = arrival
    return cfg


def _trace_memory(meta: Mapping[str, Any]) -> MemoryInfo:
    return MemoryInfo(
        num_layers=int(meta["num_layers"]),
        weight_bytes_by_depth={int(d): int(b) for d, b in meta["weight_bytes_by_depth"].items()},
        kv_bytes_per_token_layer=int(meta["kv_bytes_per_token_layer"]),
    )


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _time_load(name: str, depth: int) -> dict[str, float]:
    """One warm load of `name` at `depth` (a first load warms the files), for traces without load timings."""
    from helios.models import load_candidate

    load_candidate(name, depth, progress=False)
    start = time.perf_counter()
    loaded = load_candidate(name, depth, progress=False)
    return {"depth": depth, "weight_bytes": loaded.weight_bytes, "load_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- live


class LiveBackend(SchedulerBackend):
    """Real inference through helios.engine_executor on a measured virtual clock; every figure is measured."""

    kind = "live"
    switch_cost_source = "measured (wall clock of loading the truncated model and building its engine)"

    def __init__(self, spec: ServingSpec) -> None:
        from helios.energy import meter_from_config
        from helios.models import memory_profile

        super().__init__(spec)
        # Config files only (no weights): sizes the arms before anything loads.
        profiles = {c.name: memory_profile(c.name, progress=False) for c in spec.candidates}
        self._memory = {name: MemoryInfo(p.num_layers, p.weight_bytes_by_depth, p.kv_bytes_per_token_layer)
                        for name, p in profiles.items()}
        self.arms = build_arms(spec.candidates, spec.exits, self._memory, spec.budget, spec.reference)
        self._reference_arm = reference_arm(spec, self._memory[spec.reference])
        self.meter = meter_from_config(spec.energy_cfg, device="cpu")
        self.energy_source = f"live:{self.meter.source}"
        self._resident: tuple[tuple[str, int], Any] | None = None  # ((candidate, depth), EarlyExitEngine)
        self._tokenizers: dict[str, Any] = {}
        self._max_contexts: dict[str, int] = {}
        self._prompt_ids: dict[tuple[Hashable, str], list[int]] = {}
        self._pool: dict[str, list[Request]] | None = None
        self._requests_by_id: dict[Hashable, Request] = {}
        self._judge: Judge | None = None  # built when first needed
        self._served_nlls: dict[Hashable, list[float]] = {}  # request -> its tokens' NLLs, served by judge_exact arms
        self.serving_judge_exact = False  # whether the arm last loaded is judge_exact (set by _load_engine)
        self.engine_s_total = 0.0  # measured compute seconds since construction
        self.load_s_total = 0.0

    def bind(self, workload: Workload) -> None:
        self.spec = dataclasses.replace(self.spec, workload=workload)

    def memory(self, candidate: str) -> MemoryInfo:
        if candidate not in self._memory:
            from helios.models import memory_profile

            p = memory_profile(candidate, progress=False)
            self._memory[candidate] = MemoryInfo(p.num_layers, p.weight_bytes_by_depth, p.kv_bytes_per_token_layer)
        return self._memory[candidate]

    def tokenizer(self, candidate: str) -> Any:
        if candidate not in self._tokenizers:
            from helios.models import load_tokenizer

            self._tokenizers[candidate] = load_tokenizer(candidate, progress=False)
        return self._tokenizers[candidate]

    def _tokenizer_vocab(self, candidate: str) -> Mapping[str, int]:
        return self.tokenizer(candidate).get_vocab()

    def prompt_ids(self, request: Request, candidate: str) -> list[int]:
        """The prompt's token ids under `candidate`'s tokenizer, cut to the model's context minus the longest output
        (as replay traces are recorded)."""
        key = (request.request_id, candidate)
        if key not in self._prompt_ids:
            from helios.workloads import encode_requests

            max_context = self._max_context(candidate)
            self._prompt_ids[key] = encode_requests([request], self.tokenizer(candidate),
                                                    max_context - self.spec.trace_tokens)[0]
        return self._prompt_ids[key]

    def _max_context(self, candidate: str) -> int:
        """Positions `candidate` was trained for, from its config (EarlyExitEngine.max_context, without loading)."""
        if candidate not in self._max_contexts:
            from transformers import AutoConfig

            from helios.models import resolve_checkpoint

            config = AutoConfig.from_pretrained(resolve_checkpoint(candidate, progress=False))
            config = getattr(config, "text_config", None) or config
            self._max_contexts[candidate] = int(getattr(config, "max_position_embeddings", 1 << 30))
        return self._max_contexts[candidate]

    @property
    def resident_candidate(self) -> str:
        """The candidate whose model is loaded: live holds one model at a time, so this is who serves."""
        if self._resident is None:
            raise RuntimeError("no model is loaded")
        return self._resident[0][0]

    def _load_engine(self, arm: Any) -> tuple[Any, ExitConfig]:
        """The executor's loader: the resident engine when (candidate, depth) is unchanged (an exit-only switch keeps
        the K/V), else free it and load the truncated model (the executor times this)."""
        from helios.engine import EarlyExitEngine
        from helios.models import load_candidate

        key = (arm.candidate, int(arm.depth))
        self.serving_judge_exact = self.judge_exact(arm)  # decided once per switch: read at prefill and per token
        if self._resident is None or self._resident[0] != key:
            self._resident = None  # free the old model before loading the new one, as a budget-bound server must
            start = time.perf_counter()
            engine = EarlyExitEngine(load_candidate(arm.candidate, int(arm.depth), progress=False))
            self.load_s_total += time.perf_counter() - start
            self._resident = (key, engine)
        return self._resident[1], arm.exit_config

    def _executor(self, arm: Any, *, cold: bool) -> Any:
        stepper = _live_stepper(self)
        if not cold:  # warm (reference, capacity): loaded before the span, not charged to it
            stepper.switch(arm, [])
        return stepper

    def _payload(self, request: Request) -> _LivePayload:
        self._requests_by_id[request.request_id] = request
        return _LivePayload(self, request)

    def _requests(self, epoch: int, t0_s: float) -> list[SequenceRequest]:
        spec = self.spec
        out = []
        for request in spec.workload.epoch(epoch):
            payload = self._payload(request)
            out.append(SequenceRequest(request.request_id, t0_s + request.arrival_s,
                                       len(self.prompt_ids(request, spec.reference)), spec.max_tokens(request), payload))
        return out

    def _source_requests(self, source: str, arrivals_s: Sequence[float], max_tokens: Sequence[int],
                         tag: str) -> list[SequenceRequest]:
        if self._pool is None:
            pool = self.spec.workload.pool(max(1, self.spec.reference_requests))
            self._pool = {s: [r for r in pool if r.source == s] for s in self.spec.workload.sources}
        pool = self._pool[source]
        out = []
        for k, (a, m) in enumerate(zip(arrivals_s, max_tokens)):
            request = dataclasses.replace(pool[k % len(pool)], request_id=f"{tag}-{source}-{k}")
            out.append(SequenceRequest(request.request_id, float(a), len(self.prompt_ids(request, self.spec.reference)),
                                       int(m), self._payload(request)))
        return out

    def _energy_begin(self, executor: Any) -> None:
        self.meter.start()

    def _energy_end(self, executor: Any) -> float:
        return float(self.meter.stop().energy_j)

    @property
    def judge(self) -> Judge:
        """The env's judge (envs/judge.py), scores cached on disk as replay's are: live decodes greedily, so whenever
        an arm serves a request again (a repeat run of the main job: the same policy on the same draw) its output
        repeats token for token, and the cached NLLs are the ones the forward would compute. The serving is measured
        afresh every time; only the judge's arithmetic on identical tokens is reused."""
        if self._judge is None:
            self._judge = Judge(self.spec.judge, prompt_margin=self.spec.trace_tokens, disk_cache=True)
        return self._judge

    def _accuracy(self, request_id: Hashable, arm: Any, token_ids: Sequence[int]) -> float | None:
        # Called by _run_span after the span has run: the judge's time is not on the serving clock.
        request = self._requests_by_id.pop(request_id)
        served_nlls = self._served_nlls.pop(request_id, None)
        if self.spec.accuracy_metric == "judge_score" and arm.candidate == self.spec.judge:
            # The judge's own vocabulary: its tokens as generated (and, from the judge's own arm, their NLLs as served).
            return self.judge.score(request, ids=list(token_ids), served_nlls=served_nlls)
        text = self.tokenizer(arm.candidate).decode(list(token_ids), skip_special_tokens=True)
        if self.spec.accuracy_metric == "judge_score":
            return self.judge.score(request, text)
        if request.reference is None:
            return None
        from helios.metrics import compute_accuracy

        return compute_accuracy(self.spec.accuracy_metric, predictions=[text], references=[request.reference])

    def _forget(self, request_id: Hashable) -> None:
        self._requests_by_id.pop(request_id, None)
        self._served_nlls.pop(request_id, None)

    def judge_exact(self, arm: Any) -> bool:
        """Whether `arm` is the judge's model at full depth with exits off: its tokens' log-probabilities as served are
        the judge's (module docstring, Accuracy)."""
        spec = self.spec
        return (spec.accuracy_metric == "judge_score" and arm is not None and arm.candidate == spec.judge
                and int(arm.depth) == self.memory(arm.candidate).num_layers and not arm.exit_config.enabled)

    def _run_span(self, sched: Scheduler, requests: Sequence[SequenceRequest], t_end: float, *,
                  score: bool = True) -> EpochResult:
        result = super()._run_span(sched, requests, t_end, score=score)
        self.engine_s_total += result.compute_s
        return result

    def begin_episode(self, rng: np.random.Generator) -> None:
        super().begin_episode(rng)
        self._resident = None  # cold start, as in replay: the first epoch pays a real load
        self._requests_by_id.clear()
        self._served_nlls.clear()

    def resume_at(self, epoch: int) -> None:
        """Resume an episode at `epoch` cold with an empty queue (ModelDepthEnv.load_state_dict says why)."""
        self._episode = _Episode()
        self._resident = None
        self._requests_by_id.clear()
        self._served_nlls.clear()

    def close(self) -> None:
        self._episode = _Episode()
        self._resident = None


class _LivePayload:
    """helios.engine_executor's payload, tokenised for whichever candidate serves the request (a queued request
    that outlives a switch of candidate is re-tokenised for the new one)."""

    __slots__ = ("backend", "request")
    on_token = None

    def __init__(self, backend: LiveBackend, request: Request) -> None:
        self.backend, self.request = backend, request

    @property
    def sampling(self) -> Any:
        """Greedy; with each token's log-probability while a judge_exact arm serves (read at prefill)."""
        from helios.sampling import GREEDY, WITH_LOGPROB

        return WITH_LOGPROB if self.backend.serving_judge_exact else GREEDY

    @property
    def token_ids(self) -> list[int]:
        return self.backend.prompt_ids(self.request, self.backend.resident_candidate)


def _live_stepper_class() -> type:
    from helios.engine_executor import EngineExecutor

    class LiveStepper(EngineExecutor):
        """The engine executor as the env drives it: prompts tokenised for the current candidate, and what each
        retiring sequence produced kept for scoring."""

        def __init__(self, backend: LiveBackend) -> None:
            self.backend = backend
            self.released: dict[Hashable, tuple[Any, list[int]]] = {}
            self.served_nlls: dict[Hashable, list[float]] = {}  # per sequence: its tokens' judge-exact NLLs so far
            super().__init__(backend._load_engine, arm=None)  # noqa: SLF001

        def prompt_tokens(self, request: SequenceRequest) -> int:
            if self.arm is None:
                return request.prompt_tokens
            return len(self.backend.prompt_ids(request.payload.request, self.arm.candidate))

        def _emit(self, seq: SequenceState, token: int, exit_layer: int, logprob: Any) -> None:
            # A token's NLL is the judge's only if a judge_exact arm produced it; one that did not (a sequence that
            # outlived a switch) drops what was kept, so the length check at release sends it to a judge forward.
            key = seq.request.request_id
            if logprob is not None and self.backend.serving_judge_exact:
                self.served_nlls.setdefault(key, []).append(-logprob.logprob)
            elif key in self.served_nlls:
                del self.served_nlls[key]
            super()._emit(seq, token, exit_layer, logprob)

        def release(self, seq: SequenceState) -> None:
            super().release(seq)
            key = seq.request.request_id
            self.released[key] = (self.arm, list(seq.token_ids))
            nlls = self.served_nlls.pop(key, [])
            if nlls and len(nlls) == len(seq.token_ids):  # every token served by a judge_exact arm
                self.backend._served_nlls[key] = nlls  # noqa: SLF001

    return LiveStepper


_LIVE_STEPPER: list[type] = []  # the class, built on first use: helios.engine_executor imports torch


def _live_stepper(backend: LiveBackend) -> Any:
    if not _LIVE_STEPPER:
        _LIVE_STEPPER.append(_live_stepper_class())
    return _LIVE_STEPPER[0](backend)

Backend = SchedulerBackend  # the name envs.model_depth and older callers use
