"""Continuous batching under a memory budget: one queue, one admission and retirement policy, three clocks.

    python -m pytest -q tests/test_scheduler.py    # hand-computed schedules

Iteration-level scheduling (Yu et al., "Orca", OSDI'22; Kwon et al., "vLLM / PagedAttention", SOSP'23): the unit of
scheduling is one model iteration, not one request. Every iteration
  1. moves requests whose arrival time has come into the FIFO queue;
  2. applies a pending arm switch (only here, i.e. between decode steps; see "Switching" below);
  3. admits sequences from the head of the queue while the memory budget holds (and the optional sequence cap);
  4. prefills the newly admitted prompts in one call (each prefill yields the sequence's first token);
  5. retires sequences that finished at prefill, runs ONE decode step over every running sequence, and retires
     those that finished (EOS or stop string, reported by the executor; `max_tokens`, applied here).
A finished sequence frees its memory at once, so a waiting request can start on the very next iteration instead
of waiting for the longest member of a batch (request-level "static" batching, kept as `mode="static"`: a batch
forms from the queue up to the budget and runs until its longest member finishes, admitting nothing meanwhile;
its members' responses are returned when the batch ends, as `engine.generate` returns a whole batch).

Admission is strict FIFO: if the head does not fit, nothing behind it is admitted, even a smaller request that
would fit. Skipping ahead raises utilisation but can starve a long request indefinitely under load; FIFO bounds
every request's wait by the work ahead of it, which is what TTFT targets need.

Memory and the reservation policy. Resident bytes = the arm's weights + the K/V reserved for every admitted
sequence; admission keeps resident bytes <= `memory_budget_bytes` at every instant. A sequence reserves
(prompt tokens + `max_tokens`) x K/V bytes per token when admitted, and keeps it until it retires. Why not the
whole context window (what `envs.backends.batch_size_for` reserves today, `context_tokens` per sequence): a short
chat request (say 100 + 32 tokens) would hold 2048 tokens of K/V, about 15x fewer concurrent sequences than it
needs. Why not grow on demand (vLLM's paged blocks): on-demand growth can run out of memory mid-sequence and then
needs preemption and an eviction policy; reserving prompt + max_tokens up front means an admitted sequence always
finishes without preemption, at the price of over-reserving the unused tail when EOS comes before `max_tokens`.
A request whose reservation cannot fit beside the weights even alone is rejected at `submit` with the reason
(it would otherwise block the FIFO head forever); after a switch to an arm with less free memory, queued requests
that no longer fit alone are rejected the same way.

Clocks. The scheduler reads time only through a `Clock`, so the same admission and retirement code runs
  * in the server on the `WallClock` (compute takes real time; idle waits sleep until the next submit or t_end);
  * in the live env on a `VirtualClock` advanced by the engine's measured compute seconds: requests arrive at
    their workload times, and idle time is skipped by jumping to the next arrival (no sleeping);
  * in the replay env on the same `VirtualClock`, advanced by the seconds the calibrated cost model predicts
    for each step (helios.replay_executor).
Spans (epochs) are spans of time: `run_until(t_end_s)` runs iterations while the clock is before `t_end_s`; an
iteration that starts before `t_end_s` completes (a step is atomic), so a span ends at the first iteration
boundary at or after `t_end_s` and the next span starts there. The queue, the running set and the clock persist
across calls.

Switching (`switch_arm`): takes effect at the next iteration boundary. In-flight sequences either
  * `drain`: finish on the old arm (nothing is admitted meanwhile), then the executor loads the new arm;
  * `recompute`: are preempted at once (their K/V dropped, their generated tokens kept), return to the head of
    the queue in their order, and are re-prefilled on the new arm over prompt + generated tokens (vLLM's
    recompute preemption). Falls back to `drain` if some in-flight sequence could never fit the new arm alone,
    so that no request is lost;
  * `keep`: continue on the new arm with their K/V (only valid when the weights and K/V layout are unchanged,
    i.e. an exit-setting change; the executor raises otherwise).
The executor's switch seconds (load time; measured live, modelled in replay) advance the clock and are charged to
the span in which the switch happens, as busy time (`SpanStats.switch_s`); re-prefills are ordinary prefill time.

The executor (`StepExecutor`) is the only part that knows the model. It is small on purpose; its contract:
  * `prefill(seqs) -> seconds`: run the prompt of each sequence (for a recomputed one: prompt + its generated
    tokens, `seq.context_tokens` in all) and produce exactly one new token per sequence;
  * `decode(seqs) -> seconds`: one decode step: exactly one new token for each sequence;
    for both: on entry `seq.output_tokens` is the count of tokens produced so far (the scheduler adds 1 after the
    call returns). For each new token the executor records its exit layer in `seq.exit_layers` (and, if it has
    token ids, the id in `seq.token_ids`): at once, or at the latest in `release`/`switch` (replay copies them
    out of its tables then); and it sets `seq.finished = True` with `seq.finish_reason` ("eos" or "stop") in the
    call whose token ends the sequence. `max_tokens` is the scheduler's job, not the executor's;
  * `release(seq)`: the sequence retired: free its K/V; on return `len(seq.exit_layers) == seq.output_tokens`.
    Called once per retired sequence, before its record is made;
  * `switch(arm, preempted) -> seconds`: make `arm` current. `preempted` are the in-flight sequences whose K/V
    must be dropped (recompute): they come back through `prefill`. With `keep`, `preempted` is empty while
    sequences are running: they continue on the new arm, and the executor must raise ValueError if it cannot.
  * optionally `prompt_tokens(request) -> int`: the prompt's length under the current arm's tokenizer;
  Seconds are the step's compute time: measured (live, server) or modelled (replay). The wall clock ignores them
  for timekeeping (real time already passed) but still sums them as busy time.

Cancelling (`cancel(request_id)`, thread-safe): the client went away. Applied at the next iteration boundary (a
decode loop returns early for it): a queued or not yet arrived request is dropped; a running sequence is released
by the executor and its K/V reservation freed at once, so it stops costing compute and its memory admits the next
request. A cancelled request leaves no record and no rejection (nobody waits for either); `SpanStats.cancelled`
counts them. Cancelling an unknown or finished request does nothing.

Per-request records (`RequestRecord`): arrival, admission, first token, finish; queueing delay (admission minus
arrival), TTFT (first token minus arrival), TPOT (time per output token after the first: (finish - first token) /
(tokens - 1), NaN for a single token), end-to-end latency, prompt and output tokens, exit layer of every token.

Pure Python (no torch, no numpy needed): replay must stay torch-free and fast.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal, Protocol

SchedulingMode = Literal["continuous", "static"]
SwitchPolicy = Literal["drain", "recompute", "keep"]
SWITCH_POLICIES: tuple[str, ...] = ("drain", "recompute", "keep")

# ----------------------------------------------------------------------------------------------- requests, records


@dataclasses.dataclass(frozen=True, slots=True)
class SequenceRequest:
    """What a client asked for. `payload` is the executor's (token ids live, a trace request id in replay)."""

    request_id: Hashable
    arrival_s: float  # on the scheduler's clock
    prompt_tokens: int
    max_tokens: int
    payload: Any = None


@dataclasses.dataclass(slots=True, eq=False)
class SequenceState:
    """A request inside the scheduler: what it has produced so far. Fields marked (executor) are the executor's
    to set (module docstring: the executor's contract); the rest belong to the scheduler."""

    request: SequenceRequest
    prompt_tokens: int
    max_tokens: int
    reserved_bytes: int = 0  # K/V reserved while admitted, 0 while queued
    admitted_s: float = math.nan  # first admission (a recompute re-admission keeps it)
    first_token_s: float = math.nan
    output_tokens: int = 0  # tokens produced so far (counted by the scheduler)
    exit_layers: list[int] = dataclasses.field(default_factory=list)  # (executor) one per token (by release at the latest)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # (executor) one per token, if it has ids
    finished: bool = False  # (executor) the last token ended the sequence (EOS or stop string)
    finish_reason: str | None = None  # (executor) "eos" | "stop"; the scheduler sets "length"
    recomputes: int = 0  # times preempted by a recompute switch and re-prefilled
    state: Any = None  # (executor) private per-sequence state: a K/V slot, a trace cursor, ...

    @property
    def context_tokens(self) -> int:
        """Tokens whose K/V the sequence needs: prompt + generated (what a recompute prefill runs over)."""
        return self.prompt_tokens + self.output_tokens


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request. Times are seconds on the scheduler's clock; latencies are relative to arrival."""

    request_id: Hashable
    arrival_s: float
    admitted_s: float
    first_token_s: float
    finished_s: float
    queueing_delay_s: float
    ttft_s: float
    tpot_s: float  # NaN for a single output token
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    exit_layers: tuple[int, ...]
    finish_reason: str  # "eos" | "stop" | "length"
    recomputes: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A request that was never served, and why (for the server: a 4xx body; for the env: a lost request)."""

    request_id: Hashable
    arrival_s: float
    rejected_s: float
    reason: str


# ----------------------------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryBudget:
    """An arm's memory: resident weights + reserved K/V must stay within `memory_budget_bytes`.

    `kv_bytes_per_token` is K and V of one token in every loaded layer (the trace's / memory profile's
    `kv_bytes_per_token_layer` x depth). `max_sequences` optionally caps concurrency too (an engine's batch limit).
    `max_prefill_tokens` optionally caps one prefill call: the admitted prompts' padded tokens (count x longest
    context; the engine prefills a dense padded batch), as vLLM's `max_num_batched_tokens` caps an iteration. The FIFO
    head is always admitted when memory allows, whatever its length, so the cap delays but never blocks. Without it a
    burst admits dozens of prompts into one prefill lasting seconds, during which every running sequence waits for
    its next token (its TPOT) and no epoch boundary can be served. Static batching ignores it: its batch is whatever
    fits, prefilled at once, as `engine.generate` does.
    """

    memory_budget_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    max_sequences: int | None = None
    max_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0 or self.weight_bytes < 0 or self.memory_budget_bytes <= 0:
            raise ValueError(f"memory budget needs positive sizes; got {self}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1 or None; got {self.max_sequences}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 or None; got {self.max_prefill_tokens}")

    @property
    def free_kv_bytes(self) -> int:
        return self.memory_budget_bytes - self.weight_bytes

    @property
    def sequence_cap(self) -> float:
        """Sequences that may run at once: max_sequences, else unbounded (memory decides)."""
        return self.max_sequences if self.max_sequences is not None else math.inf

    @property
    def tokens_alone(self) -> int:
        """The most prompt + max_tokens one sequence may reserve beside the weights (running alone)."""
        return self.free_kv_bytes // self.kv_bytes_per_token

    def reservation_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """K/V held by one admitted sequence: prompt + max_tokens tokens (module docstring: reservation policy)."""
        return (prompt_tokens + max_tokens) * self.kv_bytes_per_token

    def rejection_reason(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request could never be admitted under this budget, even alone; None if it can be."""
        if prompt_tokens + max_tokens > self.tokens_alone:
            need = self.reservation_bytes(prompt_tokens, max_tokens)
            return (f"needs {need} bytes of K/V ({prompt_tokens} prompt + {max_tokens} max_tokens tokens x "
                    f"{self.kv_bytes_per_token} bytes) but only {max(self.free_kv_bytes, 0)} bytes are free beside "
                    f"{self.weight_bytes} bytes of weights in a budget of {self.memory_budget_bytes} bytes")
        return None


# ----------------------------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Where the scheduler's time comes from (module docstring: Clocks)."""

    virtual: bool

    def now(self) -> float:
        """Seconds since the clock's origin."""
        ...

    def advance(self, seconds: float) -> None:
        """`seconds` of compute just happened (virtual clocks move; the wall clock already has)."""
        ...

    def idle_until(self, t_s: float) -> None:
        """Nothing to run before `t_s`: virtual clocks jump there; the wall clock sleeps (a `wake` cuts it short)."""
        ...

    def wake(self) -> None:
        """New work was submitted (ends a wall-clock idle wait early)."""
        ...


class VirtualClock:
    """Simulated time: moves only by compute seconds (measured live, modelled in replay) and idle jumps."""

    virtual = True

    def __init__(self, start_s: float = 0.0) -> None:
        self._t_s = float(start_s)

    def now(self) -> float:
        return self._t_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a step cannot take negative time; got {seconds} s")
        self._t_s += seconds

    def idle_until(self, t_s: float) -> None:
        self._t_s = max(self._t_s, t_s)  # idle time is skipped, not slept

    def wake(self) -> None:
        pass


class WallClock:
    """Real time (monotonic) for the server; `submit` from another thread wakes an idle wait."""

    virtual = False

    def __init__(self) -> None:
        self._origin = time.monotonic()
        self._woken = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self._origin

    def advance(self, seconds: float) -> None:
        pass  # the compute already took its time on the wall

    def idle_until(self, t_s: float) -> None:
        timeout = t_s - self.now()
        if timeout > 0:
            self._woken.wait(timeout if math.isfinite(timeout) else None)
        self._woken.clear()

    def wake(self) -> None:
        self._woken.set()


# ----------------------------------------------------------------------------------------------- executor


class StepExecutor(Protocol):
    """What the scheduler drives: the model side (module docstring: the executor's contract)."""

    def prefill(self, seqs: list[SequenceState]) -> float:
        """Prefill `seqs` (prompt, or prompt + generated after a recompute); one new token each. Returns seconds."""
        ...

    def decode(self, seqs: list[SequenceState]) -> float:
        """One decode step over `seqs`: one new token each. Returns seconds."""
        ...

    def release(self, seq: SequenceState) -> None:
        """`seq` retired: free what the executor holds for it."""
        ...

    def switch(self, arm: Any, preempted: list[SequenceState]) -> float:
        """Make `arm` current; drop the K/V of `preempted`. Returns seconds (the load)."""
        ...

    # Optional: `prompt_tokens(request: SequenceRequest) -> int`, the request's prompt length under the current
    # arm's tokenizer (candidates tokenize differently). When the executor has it, the scheduler uses it when a
    # request arrives and, after every switch, for every queued (and preempted) sequence; otherwise
    # `SequenceRequest.prompt_tokens` stands.


# ----------------------------------------------------------------------------------------------- the scheduler


@dataclasses.dataclass(slots=True)
class SpanStats:
    """Counters of one `run_until` span (an epoch). Busy = prefill + decode + switch seconds."""

    start_s: float
    end_s: float = math.nan
    busy_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    switch_s: float = 0.0
    prefill_calls: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sequences summed over decode steps: decode_rows / decode_steps is the mean batch
    prefill_tokens: int = 0  # context tokens prefilled (recomputes included)
    output_tokens: int = 0  # tokens produced in the span (by prefill and decode)
    admitted: int = 0
    recomputed: int = 0  # re-admissions after a recompute switch
    finished: int = 0
    switches: int = 0
    max_running: int = 0  # most sequences admitted at once
    max_resident_bytes: int = 0  # most weights + reserved K/V at once
    rejections: list[Rejection] = dataclasses.field(default_factory=list)  # made in the span or since the last
    queue_len_end: int = 0
    running_end: int = 0
    cancelled: int = 0  # requests cancelled in the span (queued, yet to arrive or running)

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def idle_s(self) -> float:
        return max(self.wall_s - self.busy_s, 0.0)

    def merge(self, later: SpanStats) -> None:
        """Fold `later` (a span that began where this one ended) into this one, as if one span had run: counters
        summed, maxima kept, rejections appended, and the end (end_s, queue and running counts) the later span's.
        The server's worker runs short spans and its controller decides per epoch over their sum."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(later, name))
        self.max_running = max(self.max_running, later.max_running)
        self.max_resident_bytes = max(self.max_resident_bytes, later.max_resident_bytes)
        self.rejections = [*self.rejections, *later.rejections]
        self.end_s, self.queue_len_end, self.running_end = later.end_s, later.queue_len_end, later.running_end


_SUMMED: tuple[str, ...] = ("busy_s", "prefill_s", "decode_s", "switch_s", "prefill_calls", "decode_steps",
                            "decode_rows", "prefill_tokens", "output_tokens", "admitted", "recomputed", "finished",
                            "switches", "cancelled")


@dataclasses.dataclass(slots=True)
class _PendingSwitch:
    arm: Any
    budget: MemoryBudget
    policy: SwitchPolicy


class Scheduler:
    """Iteration-level (or static) batching of one executor under a memory budget (see module docstring).

        scheduler = Scheduler(executor, MemoryBudget(budget, weights, kv_per_token), VirtualClock(), arm=arm)
        scheduler.submit(SequenceRequest("r0", arrival_s=0.0, prompt_tokens=12, max_tokens=16))
        records = scheduler.run_until(10.0)        # requests finished in [start, ~10 s); queue persists
        scheduler.switch_arm(new_arm, new_budget, policy="drain")
        records = scheduler.run_until(20.0)        # the switch is charged to this span
    """

    def __init__(
        self,
        executor: StepExecutor,
        budget: MemoryBudget,
        clock: Clock | None = None,
        *,
        arm: Any = None,
        mode: SchedulingMode = "continuous",
    ) -> None:
        if mode not in ("continuous", "static"):
            raise ValueError(f"scheduling mode must be 'continuous' or 'static'; got {mode!r}")
        self.executor = executor
        self.budget = budget
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self.arm = arm
        self.mode: SchedulingMode = mode
        self._lock = threading.Lock()  # submit/switch_arm may come from other threads (the server's handlers)
        self._future: list[tuple[float, int, SequenceRequest]] = []  # heap of (arrival_s, order, request)
        self._order = itertools.count()
        self._queue: collections.deque[SequenceState] = collections.deque()  # arrived, waiting, FIFO
        self._running: list[SequenceState] = []  # admitted, in admission order
        self._batch_done: list[SequenceState] = []  # static mode: finished members held until the batch ends
        self._reserved_bytes = 0
        self._pending: _PendingSwitch | None = None
        self._cancels: set[Hashable] = set()  # request ids to drop at the next iteration boundary (cancel())
        self.rejected: list[Rejection] = []
        self._rejections_reported = 0
        # Optional executor hook (see StepExecutor): prompt length under the current arm's tokenizer.
        self._prompt_tokens: Callable[[SequenceRequest], int] | None = getattr(executor, "prompt_tokens", None)
        self.span = SpanStats(start_s=self.clock.now(), end_s=self.clock.now())

    # -- observation

    @property
    def queue_len(self) -> int:
        """Requests that have arrived and wait for admission (recomputed sequences included)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Sequences admitted and holding memory (static mode: finished batch members until the batch ends)."""
        return len(self._running) + len(self._batch_done)

    def in_system(self) -> list[SequenceState]:
        """The sequences that have arrived and not yet finished: queued, then running (static mode: with finished
        batch members held until the batch ends), each a live object to read, not to change. What a caller judges
        against its TTFT deadline at a span's end (helios.slo.request_metrics)."""
        return [*self._queue, *self._running, *self._batch_done]

    @property
    def pending_switch(self) -> tuple[Any, MemoryBudget, str] | None:
        """The switch asked for and not yet applied (arm, budget, policy), or None."""
        pending = self._pending
        return None if pending is None else (pending.arm, pending.budget, pending.policy)

    @property
    def pending_arrivals(self) -> int:
        """Submitted requests whose arrival time is still ahead of the clock."""
        return len(self._future)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_bytes

    @property
    def resident_bytes(self) -> int:
        """Weights + reserved K/V: never above `budget.memory_budget_bytes`."""
        return self.budget.weight_bytes + self._reserved_bytes

    @property
    def idle(self) -> bool:
        """Nothing queued, running or yet to arrive."""
        return not (self._future or self._queue or self._running or self._batch_done)

    # -- input

    def submit(self, request: SequenceRequest) -> str | None:
        """Queue `request` (it becomes eligible at its `arrival_s`). Returns None, or the reason it was rejected."""
        if request.max_tokens < 1 or request.prompt_tokens < 1:
            reason = f"needs prompt_tokens >= 1 and max_tokens >= 1; got {request.prompt_tokens}, {request.max_tokens}"
        else:
            reason = self.budget.rejection_reason(request.prompt_tokens, request.max_tokens)
        with self._lock:
            if reason is not None:
                self._reject(request, reason)
            else:
                heapq.heappush(self._future, (request.arrival_s, next(self._order), request))
        self.clock.wake()
        return reason

    def submit_many(self, requests: Iterable[SequenceRequest]) -> list[str | None]:
        return [self.submit(r) for r in requests]

    def switch_arm(self, arm: Any, budget: MemoryBudget, policy: SwitchPolicy = "drain") -> None:
        """Switch to `arm` (with its memory budget) at the next iteration boundary (module docstring: Switching).
        A later call before it applies replaces it."""
        if policy not in SWITCH_POLICIES:
            raise ValueError(f"switch policy must be one of {SWITCH_POLICIES}; got {policy!r}")
        if policy == "keep" and (budget.weight_bytes, budget.kv_bytes_per_token) != (
            self.budget.weight_bytes, self.budget.kv_bytes_per_token
        ):
            raise ValueError("policy 'keep' continues in-flight sequences with their K/V, so it needs the same "
                             "weights and K/V layout (an exit-setting change); use 'drain' or 'recompute'")
        with self._lock:
            self._pending = _PendingSwitch(arm, budget, policy)

    def cancel(self, request_id: Hashable) -> None:
        """Drop request `request_id` at the next iteration boundary wherever it is (module docstring: Cancelling)."""
        with self._lock:
            self._cancels.add(request_id)
        self.clock.wake()

    # -- the loop

    def run_until(self, t_end_s: float) -> list[RequestRecord]:
        """Run iterations while the clock is before `t_end_s`; returns the records of requests that finished in this
        span (counters: `self.span`). With nothing left to do and no arrival ahead, a virtual clock jumps to a
        finite `t_end_s` (idle) and returns at once for an infinite one."""
        clock = self.clock
        span = self.span = SpanStats(start_s=clock.now())
        records: list[RequestRecord] = []
        while True:
            now = clock.now()
            if now >= t_end_s:
                break
            if self._future and self._future[0][0] <= now:
                self._arrive(now)
            if self._cancels:
                self._apply_cancels(span)
            if self._pending is not None:
                self._apply_switch(span, records)
            new = self._admit(span) if self._queue else None
            if new:
                self._prefill(new, span, records)
            if self._running:
                self._decode(t_end_s, span, records)
                continue
            if self._batch_done:  # static: every member of the batch finished at prefill
                self._end_batch(span, records)
                continue
            if new:
                continue  # all finished at prefill, freeing memory: admit again before idling
            if self._queue:  # cannot happen: with nothing running, the head always fits (else it was rejected)
                raise RuntimeError(f"scheduler stalled with {len(self._queue)} queued and nothing running")
            next_arrival = self._future[0][0] if self._future else math.inf
            if not math.isfinite(next_arrival) and not math.isfinite(t_end_s):
                break  # nothing will ever happen: return instead of waiting forever
            clock.idle_until(min(next_arrival, t_end_s))
        span.end_s = clock.now()
        self._arrive(span.end_s)  # so that queue_len counts what arrived during the last step
        span.queue_len_end = len(self._queue)
        span.running_end = self.running
        span.busy_s = span.prefill_s + span.decode_s + span.switch_s
        span.rejections = self.rejected[self._rejections_reported :]
        self._rejections_reported = len(self.rejected)
        return records

    # -- steps

    def _arrive(self, now: float) -> None:
        future = self._future
        if future and future[0][0] <= now:
            with self._lock:
                while future and future[0][0] <= now:
                    request = heapq.heappop(future)[2]
                    prompt = self._prompt_tokens(request) if self._prompt_tokens else request.prompt_tokens
                    self._queue.append(SequenceState(request, prompt, request.max_tokens))

    def _admit(self, span: SpanStats) -> list[SequenceState]:
        """Admit from the FIFO head while the budget holds; never skip the head (module docstring)."""
        if self._pending is not None and self._pending.policy == "drain":
            return []  # draining: the old arm takes nothing new
        if self.mode == "static" and (self._running or self._batch_done):
            return []  # static: nothing joins a batch in flight
        budget, queue, running = self.budget, self._queue, self._running
        free = budget.free_kv_bytes - self._reserved_bytes
        cap = budget.sequence_cap
        token_cap = budget.max_prefill_tokens if budget.max_prefill_tokens is not None and self.mode == "continuous" \
            else math.inf
        kv = budget.kv_bytes_per_token
        new: list[SequenceState] = []
        longest = 0
        now = self.clock.now()
        while queue and len(running) + len(self._batch_done) < cap:
            seq = queue[0]
            need = (seq.prompt_tokens + seq.max_tokens) * kv
            if need > free:
                break
            longest_if = max(longest, seq.context_tokens)
            if new and (len(new) + 1) * longest_if > token_cap:
                break  # the next iteration's prefill takes it
            longest = longest_if
            queue.popleft()
            free -= need
            seq.reserved_bytes = need
            self._reserved_bytes += need
            if seq.recomputes:
                span.recomputed += 1
            else:
                seq.admitted_s = now
                span.admitted += 1
            running.append(seq)
            new.append(seq)
        if new:
            span.max_running = max(span.max_running, len(running) + len(self._batch_done))
            span.max_resident_bytes = max(span.max_resident_bytes, self.resident_bytes)
        return new

    def _prefill(self, new: list[SequenceState], span: SpanStats, records: list[RequestRecord]) -> None:
        seconds = self.executor.prefill(new)
        self.clock.advance(seconds)
        span.prefill_s += seconds
        span.prefill_calls += 1
        now = self.clock.now()
        done = False
        for seq in new:
            span.prefill_tokens += seq.prompt_tokens + seq.output_tokens
            seq.output_tokens += 1
            if seq.first_token_s != seq.first_token_s:  # NaN: the first token ever (a re-prefill keeps the old one)
                seq.first_token_s = now
            if seq.finished or seq.output_tokens >= seq.max_tokens:
                done = True
        span.output_tokens += len(new)
        if done:
            self._retire(span, records)

    def _decode(self, t_end_s: float, span: SpanStats, records: list[RequestRecord]) -> None:
        """Decode steps over the running set until something can change the schedule: a sequence retires, a
        request arrives (continuous mode: it may be admissible), a switch is requested, or the span ends. One
        step per loop; the loop only saves the per-step admission bookkeeping (replay runs tens of thousands of
        steps per second, so that bookkeeping is most of its time)."""
        decode, advance, now_fn = self.executor.decode, self.clock.advance, self.clock.now
        future = self._future
        # An arrival matters only if it could be admitted: not in a static batch, and not behind a queue head that
        # cannot fit (FIFO: it joins the tail). Memory and the running set change only when a sequence retires, which
        # ends this loop, so the test holds for the whole loop; under overload it spares a scheduler iteration (an
        # admission that admits nothing) per arrival. The arrival is queued at the next iteration as before.
        watch_arrivals = self.mode == "continuous" and not self._head_blocked()
        decode_s = 0.0
        steps = tokens = 0
        try:
            while True:
                running = self._running
                seconds = decode(running)
                advance(seconds)
                decode_s += seconds
                steps += 1
                tokens += len(running)
                done = False
                for seq in running:
                    n = seq.output_tokens + 1
                    seq.output_tokens = n
                    if seq.finished or n >= seq.max_tokens:
                        done = True
                if done:
                    self._retire(span, records)
                    if not self._running and self._batch_done:
                        self._end_batch(span, records)
                    return
                now = now_fn()
                if (now >= t_end_s or self._pending is not None or self._cancels
                        or (watch_arrivals and future and future[0][0] <= now)):
                    return
        finally:
            span.decode_s += decode_s
            span.decode_steps += steps
            span.decode_rows += tokens
            span.output_tokens += tokens

    def _head_blocked(self) -> bool:
        """Whether the queue's head cannot be admitted until a running sequence retires (no slot, or not enough free
        K/V for its reservation): then no later arrival can be admitted either."""
        queue = self._queue
        if not queue:
            return False
        budget, head = self.budget, queue[0]
        if len(self._running) + len(self._batch_done) >= budget.sequence_cap:
            return True
        return budget.reservation_bytes(head.prompt_tokens, head.max_tokens) > budget.free_kv_bytes - self._reserved_bytes

    def _retire(self, span: SpanStats, records: list[RequestRecord]) -> None:
        """Move finished sequences out of the running set: freed now (continuous) or at batch end (static)."""
        keep: list[SequenceState] = []
        now = self.clock.now()
        for seq in self._running:
            if not (seq.finished or seq.output_tokens >= seq.max_tokens):
                keep.append(seq)
                continue
            if not seq.finished:
                seq.finished, seq.finish_reason = True, "length"
            if self.mode == "static":
                self._batch_done.append(seq)
            else:
                self._finish(seq, now, span, records)
        self._running = keep

    def _end_batch(self, span: SpanStats, records: list[RequestRecord]) -> None:
        now = self.clock.now()
        for seq in self._batch_done:
            self._finish(seq, now, span, records)
        self._batch_done = []

    def _finish(self, seq: SequenceState, now: float, span: SpanStats, records: list[RequestRecord]) -> None:
        self.executor.release(seq)
        self._reserved_bytes -= seq.reserved_bytes
        seq.reserved_bytes = 0
        span.finished += 1
        request = seq.request
        n = seq.output_tokens
        records.append(RequestRecord(
            request_id=request.request_id, arrival_s=request.arrival_s, admitted_s=seq.admitted_s,
            first_token_s=seq.first_token_s, finished_s=now, queueing_delay_s=seq.admitted_s - request.arrival_s,
            ttft_s=seq.first_token_s - request.arrival_s,
            tpot_s=(now - seq.first_token_s) / (n - 1) if n > 1 else math.nan, e2e_s=now - request.arrival_s,
            prompt_tokens=seq.prompt_tokens, output_tokens=n, exit_layers=tuple(seq.exit_layers),
            finish_reason=seq.finish_reason or "length", recomputes=seq.recomputes,
        ))

    def _apply_cancels(self, span: SpanStats) -> None:
        """Drop cancelled requests: queued and future ones leave their queue, running ones free their K/V now."""
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            future = [item for item in self._future if item[2].request_id not in cancels]
            if len(future) != len(self._future):
                span.cancelled += len(self._future) - len(future)
                heapq.heapify(future)
                self._future[:] = future  # in place: submit() and the loop hold this list
        kept = collections.deque(seq for seq in self._queue if seq.request.request_id not in cancels)
        span.cancelled += len(self._queue) - len(kept)
        self._queue = kept
        for group in ("_running", "_batch_done"):
            members: list[SequenceState] = getattr(self, group)
            gone = [seq for seq in members if seq.request.request_id in cancels]
            if not gone:
                continue
            setattr(self, group, [seq for seq in members if seq.request.request_id not in cancels])
            for seq in gone:
                self.executor.release(seq)
                self._reserved_bytes -= seq.reserved_bytes
                seq.reserved_bytes = 0
            span.cancelled += len(gone)

    def _apply_switch(self, span: SpanStats, records: list[RequestRecord]) -> None:
        with self._lock:
            pending = self._pending
        assert pending is not None
        in_flight = self._running + self._batch_done
        if pending.policy == "recompute" and any(
            pending.budget.rejection_reason(s.prompt_tokens, s.max_tokens) for s in in_flight
        ):
            pending.policy = "drain"  # a preempted sequence could never come back: let it finish here instead
        if pending.policy == "drain" and in_flight:
            return  # keep decoding the old arm's sequences; _admit admits nothing meanwhile
        preempted: list[SequenceState] = []
        if pending.policy == "recompute" and in_flight:
            now = self.clock.now()
            for seq in self._batch_done:  # static mode: members already finished retire now (their output is whole)
                self._finish(seq, now, span, records)
            preempted, self._running, self._batch_done = self._running, [], []
            for seq in preempted:
                self._reserved_bytes -= seq.reserved_bytes
                seq.reserved_bytes = 0
                seq.recomputes += 1
            # Back to the head of the queue in admission (= arrival) order: they arrived before anything queued.
            self._queue.extendleft(reversed(preempted))
        seconds = self.executor.switch(pending.arm, preempted)
        self.clock.advance(seconds)
        span.switch_s += seconds
        span.switches += 1
        self.arm, self.budget = pending.arm, pending.budget
        with self._lock:
            if self._pending is pending:
                self._pending = None
        if self._prompt_tokens is not None:  # the new arm may tokenize differently
            for seq in self._queue:
                seq.prompt_tokens = self._prompt_tokens(seq.request)
        self._reject_unfit()

    def _reject_unfit(self) -> None:
        """After a switch: queued requests that can never fit the new arm alone would block the FIFO head forever."""
        budget = self.budget
        fit = budget.tokens_alone  # one comparison per queued request (the queue may be long); the message if not
        kept: collections.deque[SequenceState] = collections.deque()
        for seq in self._queue:
            if seq.prompt_tokens + seq.max_tokens <= fit:
                kept.append(seq)
            else:
                reason = budget.rejection_reason(seq.prompt_tokens, seq.max_tokens)
                self._reject(seq.request, f"after switching to {self.arm!r}: {reason}")
        self._queue = kept

    def _reject(self, request: SequenceRequest, reason: str) -> Rejection:
        """Record a rejection (reported in `rejected`, and in the counters of the span it falls in or precedes)."""
        rejection = Rejection(request.request_id, request.arrival_s, self.clock.now(), reason)
        self.rejected.append(rejection)
        return rejection
