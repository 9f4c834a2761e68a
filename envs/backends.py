"""Serving backends of the ModelDepth environment: one interface, two ways to serve an epoch of requests.

    backend = ReplayBackend(spec, trace_paths)      # or LiveBackend(spec)
    reference = backend.reference_profile()         # per source: the reference run's metrics
    backend.begin_episode(rng)                      # cold start: nothing loaded
    outcome, switch = backend.serve(epoch, arm)     # the epoch's requests served by that arm
    values = epoch_metrics(outcome, switch)         # the SLO's metrics (helios.slo.METRICS)

live    Real early-exit inference. An arm switch loads the arm's candidate truncated to its depth
        (helios.models.load_candidate; the load is timed), then the epoch's requests run through helios.engine in
        batches of the arm's batch size; energy is read from helios.energy's meter around it, accuracy scored by
        helios.metrics on the decoded outputs.
replay  The same from recorded traces (helios.profiling, helios.replay). Every (variant, epoch, arm) outcome is
        computed once at construction, so a step is a table lookup. A variant is one draw of trace requests for
        every epoch: request i of epoch e is a trace request of the same source as the live workload's request i
        (the trace holds a pool per source), so both backends see the same source mix and arrivals.

Switching (what a change of arm really costs, added to the epoch by `epoch_metrics`):
  * exit setting only: free (the same weights serve it).
  * depth or candidate: a load of the new (candidate, depth). helios.models has no incremental layer loading, so a
    depth change reloads the truncated model; its cost is that reload. Live: measured (wall clock of load_candidate
    plus engine set-up; energy metered). Replay: modeled as seconds per resident weight byte x the arm's weight
    bytes, the rate measured while the trace was recorded (trace meta `load_timings`, warm page cache), or, for a
    trace recorded before that field existed, measured once when the backend is built (`switch_cost_source`).
    Energy: the trace's power figure x the load seconds (an estimate, like all replay energy).
  * re-prefilling the KV cache: zero here. Epochs are served whole (closed loop: the next batch is issued when this
    one finishes), so no sequence is in flight across an epoch boundary, and each batch's prefill is already part
    of its epoch's busy time.
  The first epoch of an episode pays a cold load of its arm.

Latency: requests are served in arrival order, in consecutive batches of the arm's batch size; a batch starts when
the server is free and its last request has arrived; a request's latency is its batch's end minus its arrival. A
switch delays every request of the epoch by its load (exact for closed-loop arrivals, an upper bound for Poisson).
"""

from __future__ import annotations

import abc
import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from helios.arms import (
    Arm,
    CandidateSpec,
    ExitSpec,
    MemoryBudget,
    MemoryInfo,
    build_arms,
    exit_buckets,
    exit_histogram,
    normalised,
)
from helios.exit_config import ExitConfig
from helios.telemetry import (
    NO_SWITCH,
    EpochOutcome,
    SwitchCost,
    SwitchKind,
    empty_outcome,
    epoch_metrics,
    latency_p95_s,
)
from helios.workloads import Request, Workload

# ----------------------------------------------------------------------------------------------- specification


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Everything both backends need, validated by the environment before either is built."""

    candidates: tuple[CandidateSpec, ...]
    exits: tuple[ExitSpec, ...]
    reference: str  # the candidate whose full-depth run normalises the reward
    workload: Workload
    workload_cfg: dict[str, Any]
    memory_budget_bytes: int
    context_tokens: int  # K/V reserved per sequence (prompt + generated), like a server's max_model_len
    max_batch_size: int
    new_tokens: int
    accuracy_metric: str
    histogram_bins: int
    energy_cfg: dict[str, Any]

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget(self.memory_budget_bytes, self.context_tokens, self.max_batch_size)

    @property
    def reference_requests(self) -> int:
        """Requests per source in the reference run: a nominal epoch's worth."""
        arrival = self.workload.arrival
        if arrival.kind == "closed":
            return int(arrival.batch_size)
        return max(1, round(arrival.rate_per_s * arrival.epoch_s))


# ----------------------------------------------------------------------------------------------- one epoch


def mix_reference(per_source: Mapping[str, Mapping[str, float]], mixture: Mapping[str, float]) -> dict[str, float]:
    """A reference for an epoch of `mixture`: the mixture-weighted mean of the per-source reference metrics."""
    total = sum(w for s, w in mixture.items() if w > 0)
    metrics = next(iter(per_source.values())).keys()
    return {m: sum(w * per_source[s][m] for s, w in mixture.items() if w > 0) / total for m in metrics}


class Backend(abc.ABC):
    """Serves epochs of a workload with the arm of each step (see module docstring)."""

    kind: str
    arms: tuple[Arm, ...]
    switch_cost_source: str

    @abc.abstractmethod
    def reference_profile(self) -> dict[str, dict[str, float]]:
        """Per workload source: the metrics of the reference candidate at full depth, no exits, serving a nominal
        epoch of that source at its budget batch size (at least 1)."""

    @abc.abstractmethod
    def begin_episode(self, rng: np.random.Generator) -> None:
        """Start an episode cold (nothing loaded); replay draws its request variant from `rng`."""

    @abc.abstractmethod
    def serve(self, epoch: int, arm_index: int) -> tuple[EpochOutcome, SwitchCost]:
        """Switch to the arm if needed and serve the epoch's requests with it."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The backend's position within an episode (JSON), for resuming a run."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the backend holds (idempotent)."""


def reference_arm(spec: ServingSpec, memory: MemoryInfo) -> Arm:
    """The reference run's setting: the reference candidate at full depth, no exits, its budget batch (>= 1; the
    reference is measured even where the budget would mask it)."""
    depth, budget = memory.num_layers, spec.budget
    weight_bytes = memory.weight_bytes_by_depth[depth]
    kv_per_seq = budget.kv_bytes_per_seq(memory, depth)
    batch = max(1, budget.batch_size(weight_bytes, kv_per_seq))
    return Arm(-1, spec.reference, -1, depth, depth, -1, "none", ExitConfig(), weight_bytes, kv_per_seq, batch, True)


# ----------------------------------------------------------------------------------------------- replay


class ReplayBackend(Backend):
    """Outcomes priced from traces (helios.replay), tabulated at construction; `serve` is a lookup."""

    kind = "replay"

    def __init__(self, spec: ServingSpec, trace_paths: Mapping[str, Path], *, variants: int = 4) -> None:
        from helios.models import load_tokenizer
        from helios.replay import Replayer
        from helios.traces import read_trace

        self.spec = spec
        traces = {name: read_trace(path) for name, path in trace_paths.items()}
        self._check_traces(traces, trace_paths)
        self.replayers = {name: Replayer(trace) for name, trace in traces.items()}
        memory = {name: _trace_memory(trace.meta) for name, trace in traces.items()}
        self.arms = build_arms(spec.candidates, spec.exits, memory, spec.budget, spec.reference)
        self._reference_arm = reference_arm(spec, memory[spec.reference])
        self.power_w = {name: float(trace.meta["power_w"]) for name, trace in traces.items()}
        self.load_s_per_byte, self.switch_cost_source = self._load_rates(traces)

        # The trace pool: request id -> source and reference text (shared by every candidate's trace).
        any_trace = traces[spec.candidates[0].name]
        first_rows = {rid: rows[0] for rid, rows in self.replayers[spec.candidates[0].name].request_rows.items()}
        self.pool_source = {rid: str(any_trace.source[row]) for rid, row in first_rows.items()}
        self.pool_by_source = {
            source: np.array(sorted(r for r, s in self.pool_source.items() if s == source), dtype=np.int64)
            for source in spec.workload.sources
        }
        missing = [s for s, ids in self.pool_by_source.items() if ids.size == 0]
        if missing:
            raise ValueError(f"the traces hold no request of source(s) {missing}; re-record them for this workload")
        references = list(any_trace.meta["references"])
        tokenizers = {c.name: load_tokenizer(c.name, progress=False) for c in spec.candidates}

        # Per (arm, trace request): accuracy and exit-bucket counts, which do not depend on batching.
        per_request = {arm.index: self._per_request(arm, tokenizers[arm.candidate], references) for arm in self.arms
                       if arm.feasible}
        self._reference_profile = self._measure_reference(tokenizers[spec.reference], references)

        # Per (variant, epoch, arm): the epoch's requests drawn from the pool by source, priced per batch.
        epochs = [spec.workload.epoch(e) for e in range(spec.workload.episode_epochs)]
        self.variants = variants
        self._table: list[list[list[EpochOutcome | None]]] = []
        for k in range(variants):
            rows = []
            for e, requests in enumerate(epochs):
                rng = np.random.default_rng([spec.workload.seed, 0x5EED, k, e])
                ids = [int(rng.choice(self.pool_by_source[r.source])) for r in requests]
                arrivals = [r.arrival_s for r in requests]
                rows.append([self._price(arm, ids, arrivals, per_request.get(arm.index)) for arm in self.arms])
            self._table.append(rows)
        self._switch_table = self._switch_costs()
        self._variant = 0
        self._loaded: int | None = None

    # -- construction helpers

    def _check_traces(self, traces: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
        spec = self.spec
        expected = _json_roundtrip(spec.workload_cfg)
        names = None
        for name, trace in traces.items():
            meta = trace.meta
            if meta.get("candidate") != name:
                raise ValueError(f"trace {paths[name]} is of candidate {meta.get('candidate')!r}, not {name!r}")
            if meta.get("workload") != expected:
                raise ValueError(f"trace {paths[name]} was recorded on a different workload than this environment's; "
                                 "re-record it (envs.model_depth builds traces with build_traces=True)")
            if int(meta.get("new_tokens", 0)) < spec.new_tokens:
                raise ValueError(f"trace {paths[name]} has {meta.get('new_tokens')} tokens per request; the "
                                 f"environment needs new_tokens={spec.new_tokens}")
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

    def _per_request(self, arm: Arm, tokenizer: Any, references: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        from helios.metrics import compute_accuracy
        from helios.replay import Setting

        replayer = self.replayers[arm.candidate]
        exit_layer, tokens = replayer.exits(Setting(arm.depth, arm.exit_config, 1))
        buckets = exit_buckets(arm.num_layers, self.spec.histogram_bins)  # per request below: counts, not shares
        n = len(replayer.request_rows)
        accuracy = np.full(n, np.nan)
        counts = np.zeros((n, self.spec.histogram_bins), dtype=np.float64)
        for rid, rows in replayer.request_rows.items():
            rows = rows[: self.spec.new_tokens]
            counts[rid] = np.bincount(buckets[exit_layer[rows]], minlength=self.spec.histogram_bins)
            if references[rid] is not None:
                text = tokenizer.decode(tokens[rows].tolist(), skip_special_tokens=True)
                accuracy[rid] = compute_accuracy(self.spec.accuracy_metric, predictions=[text],
                                                 references=[references[rid]])
        return accuracy, counts

    def _price(self, arm: Arm, ids: list[int], arrivals: list[float],
               per_request: tuple[np.ndarray, np.ndarray] | None) -> EpochOutcome | None:
        from helios.replay import Setting

        if not arm.feasible or per_request is None:
            return None
        if not ids:
            return empty_outcome(self.spec.histogram_bins)
        result = self.replayers[arm.candidate].run(ids, Setting(arm.depth, arm.exit_config, arm.batch_size),
                                                   new_tokens=self.spec.new_tokens)
        durations = [p + d for p, d in zip(result.prefill_s, result.decode_s)]
        accuracy, counts = per_request
        scores = accuracy[ids]
        return EpochOutcome(
            requests=len(ids), tokens=result.generated_tokens, busy_s=result.busy_s,
            latency_p95_s=latency_p95_s(arrivals, arm.batch_size, durations), energy_j=result.energy_j,
            accuracy=float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0,
            histogram=normalised(counts[ids].sum(0)), batches=len(durations),
        )

    def _measure_reference(self, tokenizer: Any, references: Sequence[str | None]) -> dict[str, dict[str, float]]:
        arm = self._reference_arm
        per_request = self._per_request(arm, tokenizer, references)
        profile = {}
        for source, pool in self.pool_by_source.items():
            ids = [int(pool[i % pool.size]) for i in range(self.spec.reference_requests)]
            outcome = self._price(arm, ids, [0.0] * len(ids), per_request)
            profile[source] = epoch_metrics(outcome, NO_SWITCH)  # type: ignore[arg-type]
        return profile

    def _switch_costs(self) -> list[list[SwitchCost]]:
        """[previous arm + 1][next arm] (row 0: nothing loaded)."""
        def cost(previous: Arm | None, arm: Arm) -> SwitchCost:
            if previous is not None and (previous.candidate, previous.depth) == (arm.candidate, arm.depth):
                return NO_SWITCH if previous.exit_index == arm.exit_index else SwitchCost("exit", 0.0, 0.0)
            kind: SwitchKind = (
                "cold" if previous is None else "candidate" if previous.candidate != arm.candidate else "depth"
            )
            seconds = self.load_s_per_byte[arm.candidate] * arm.weight_bytes
            return SwitchCost(kind, seconds, self.power_w[arm.candidate] * seconds)

        return [[cost(previous, arm) for arm in self.arms] for previous in (None, *self.arms)]

    # -- the interface

    def reference_profile(self) -> dict[str, dict[str, float]]:
        return {source: dict(metrics) for source, metrics in self._reference_profile.items()}

    def begin_episode(self, rng: np.random.Generator) -> None:
        self._variant = int(rng.integers(self.variants))
        self._loaded = None

    def peek(self, epoch: int, arm_index: int) -> EpochOutcome | None:
        """The outcome `arm_index` would have on `epoch` (None if infeasible), without serving or switching."""
        return self._table[self._variant][epoch][arm_index]

    def state_dict(self) -> dict[str, Any]:
        return {"variant": self._variant, "loaded": self._loaded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._variant, self._loaded = int(state["variant"]), state["loaded"]

    def serve(self, epoch: int, arm_index: int) -> tuple[EpochOutcome, SwitchCost]:
        outcome = self._table[self._variant][epoch][arm_index]
        if outcome is None:
            raise ValueError(f"arm {arm_index} ({self.arms[arm_index].label}) does not fit the memory budget")
        switch = self._switch_table[0 if self._loaded is None else self._loaded + 1][arm_index]
        self._loaded = arm_index
        return outcome, switch

    def close(self) -> None:
        self._table = []


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


class LiveBackend(Backend):
    """Real inference through helios.engine on the arm's truncated model; every figure is measured."""

    kind = "live"
    switch_cost_source = "measured (wall clock of each load)"

    def __init__(self, spec: ServingSpec) -> None:
        from helios.energy import meter_from_config
        from helios.models import memory_profile

        self.spec = spec
        # Config files only (no weights): sizes the arms before anything loads.
        profiles = {c.name: memory_profile(c.name, progress=False) for c in spec.candidates}
        memory = {name: MemoryInfo(p.num_layers, p.weight_bytes_by_depth, p.kv_bytes_per_token_layer)
                  for name, p in profiles.items()}
        self.arms = build_arms(spec.candidates, spec.exits, memory, spec.budget, spec.reference)
        self._reference_arm = reference_arm(spec, memory[spec.reference])
        self.meter = meter_from_config(spec.energy_cfg, device="cpu")
        self._loaded: tuple[Arm, Any, Any] | None = None  # (arm, LoadedModel, EarlyExitEngine)
        self._reference_profile: dict[str, dict[str, float]] | None = None
        self.engine_s_total = 0.0  # seconds inside EarlyExitEngine.generate since construction
        self.load_s_total = 0.0

    def _load(self, arm: Arm) -> tuple[SwitchCost, Any, Any]:
        from helios.engine import EarlyExitEngine
        from helios.models import load_candidate

        loaded_arm = None if self._loaded is None else self._loaded[0]
        if loaded_arm is not None and (loaded_arm.candidate, loaded_arm.depth) == (arm.candidate, arm.depth):
            kind: SwitchKind = "none" if loaded_arm.exit_index == arm.exit_index else "exit"
            _, model, engine = self._loaded  # type: ignore[misc]
            self._loaded = (arm, model, engine)
            return (NO_SWITCH if kind == "none" else SwitchCost("exit", 0.0, 0.0)), model, engine
        kind = "cold" if loaded_arm is None else "candidate" if loaded_arm.candidate != arm.candidate else "depth"
        self._loaded = None  # free the old model before loading the new one, as a budget-bound server must
        self.meter.start()
        start = time.perf_counter()
        model = load_candidate(arm.candidate, arm.depth, progress=False)
        engine = EarlyExitEngine(model)
        seconds = time.perf_counter() - start
        energy = self.meter.stop().energy_j
        self.load_s_total += seconds
        self._loaded = (arm, model, engine)
        return SwitchCost(kind, seconds, energy), model, engine

    def _run(self, arm: Arm, model: Any, engine: Any, requests: Sequence[Request]) -> EpochOutcome:
        from helios.metrics import compute_accuracy
        from helios.workloads import encode_requests

        spec = self.spec
        if not requests:
            return empty_outcome(spec.histogram_bins)
        prompts = encode_requests(list(requests), model.tokenizer, engine.max_context - spec.new_tokens)
        results = []
        engine_s = 0.0
        self.meter.start()
        for start in range(0, len(prompts), arm.batch_size):
            t0 = time.perf_counter()
            results.append(engine.generate(prompts[start : start + arm.batch_size], spec.new_tokens,
                                           arm.exit_config, stop_at_eos=False))
            engine_s += time.perf_counter() - t0
        energy_j = self.meter.stop().energy_j
        self.engine_s_total += engine_s
        exit_layers = np.concatenate([np.asarray(row) for r in results for row in r.exit_layers])
        texts = [model.tokenizer.decode(tokens, skip_special_tokens=True) for r in results for tokens in r.tokens]
        references = [request.reference for request in requests]
        accuracy = 0.0
        if any(ref is not None for ref in references):
            accuracy = compute_accuracy(spec.accuracy_metric, predictions=texts, references=references)
        durations = [r.prefill_s + r.decode_s for r in results]
        return EpochOutcome(
            requests=len(requests), tokens=sum(r.generated_tokens for r in results), busy_s=sum(durations),
            latency_p95_s=latency_p95_s([q.arrival_s for q in requests], arm.batch_size, durations),
            energy_j=float(energy_j), accuracy=float(accuracy),
            histogram=exit_histogram(exit_layers, arm.num_layers, spec.histogram_bins),
            batches=len(results), engine_s=engine_s,
        )

    # -- the interface

    def reference_profile(self) -> dict[str, dict[str, float]]:
        """Measured on first call (the reference candidate loaded at full depth, then freed) and kept."""
        if self._reference_profile is None:
            arm = self._reference_arm
            _, model, engine = self._load(arm)
            pool = self.spec.workload.pool(self.spec.reference_requests)
            profile = {}
            for source in self.spec.workload.sources:
                requests = [r for r in pool if r.source == source]
                outcome = self._run(arm, model, engine, [dataclasses.replace(r, arrival_s=0.0) for r in requests])
                profile[source] = epoch_metrics(outcome, NO_SWITCH)
            self._loaded = None
            self._reference_profile = profile  # type: ignore[assignment]
        return {source: dict(metrics) for source, metrics in self._reference_profile.items()}  # type: ignore[union-attr]

    def begin_episode(self, rng: np.random.Generator) -> None:
        self._loaded = None  # cold start, as in replay

    def state_dict(self) -> dict[str, Any]:
        return {}  # a resumed live run starts cold: the next step reloads its arm (and pays for it)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loaded = None

    def serve(self, epoch: int, arm_index: int) -> tuple[EpochOutcome, SwitchCost]:
        arm = self.arms[arm_index]
        if not arm.feasible:
            raise ValueError(f"arm {arm_index} ({arm.label}) does not fit the memory budget")
        switch, model, engine = self._load(arm)
        return self._run(arm, model, engine, self.spec.workload.epoch(epoch)), switch

    def close(self) -> None:
        self._loaded = None
