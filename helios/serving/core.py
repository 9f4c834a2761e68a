"""The serving core: helios.scheduler on the wall clock, driven by one engine worker thread.

    python scripts/serve.py candidate=tiny-llama        # builds a ServingCore; HTTP side: helios/serving/api.py
    python -m pytest -q tests/test_serving_core.py      # the core without HTTP

Threads. One worker thread owns the engine: it loops `scheduler.run_until(now + span_s)` (continuous batching under
the arm's memory budget, helios/scheduler.py). Spans are short (`span_ms`, 20 ms by default) so that finished
requests are answered, cancellations applied and gauges updated at least that often; with nothing to do the wall
clock sleeps up to `idle_span_s` and a submit or cancel wakes it. HTTP handlers (the event loop) tokenize off both
threads (helios/serving/frontend.py), then `submit` sequences; the controller thread (helios/serving/controller.py)
reads epoch tallies and asks for arm switches. Only the worker touches the engine.

Streaming. Each sequence's `EnginePayload.on_token` hook runs on the worker inside the decode step: it feeds the
sequence's incremental detokeniser (helios/serving/text.py), sends each final piece of text to the event loop at
once (`loop.call_soon_threadsafe`), and returns True when a stop string ends the sequence, so the scheduler retires
it at this step. A hook that raises fails its own sequence only (500 for that request; the others decode on).

Isolation. Whatever belongs to one request fails that request alone: tokenization and templates fail in the
handler (400), a stop-string or detokenisation fault in that sequence's hook (500 for it), a request that no longer
fits after an arm switch is rejected by the scheduler (400 naming why). An exception out of the engine step itself
is a server fault: the sequences in flight get a 500, the executor and scheduler are rebuilt on the same arm, and
the worker goes on serving.

Switching. `switch_arm` passes the controller's choice to `Scheduler.switch_arm` with a policy: `keep` when only the
exit setting changes (same weights, the K/V stays), `drain` when the candidate changes (another tokenizer: generated
ids cannot be re-prefilled on it, and queued prompts are re-encoded with the new tokenizer on the worker), else the
configured `switch_policy` (`drain` or `recompute`). The switch happens between decode steps; no request is dropped.

Backpressure. `reserve(n)` admits n more sequences only while fewer than `max_queued_sequences` wait for their first
token (tokenizing, queued or prefilling); otherwise the handler answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from helios.arms import Arm
from helios.engine import EarlyExitEngine, ExitConfig
from helios.engine_executor import EngineExecutor, EnginePayload
from helios.sampling import SamplingParams, TokenLogprob
from helios.scheduler import MemoryBudget, RequestRecord, Scheduler, SequenceRequest, SequenceState, SpanStats, WallClock
from helios.serving.metrics import ServerMetrics
from helios.serving.text import RenderedLogprobs, TextStream, encode_prompt, final_text, kept_tokens, \
    max_chars_per_token, render_chat, render_logprobs

log = logging.getLogger("helios.serving")


class SequenceError(Exception):
    """One sequence failed: answered with `status` (4xx: the request's fault; 5xx: the server's) and an OpenAI body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


# ----------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """A prompt as the client sent it: text, chat messages or token ids (exactly one). Kept with the sequence so that
    a switch to a candidate with another tokenizer can re-encode it."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None

    @property
    def param(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    @property
    def chars(self) -> int:
        """Characters the tokenizer will read (message contents; a template only adds to them)."""
        if self.text is not None:
            return len(self.text)
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return 0

    def encode(self, tokenizer: Any) -> list[int]:
        if self.token_ids is not None:
            return list(self.token_ids)
        if self.messages is not None:
            return render_chat(tokenizer, list(self.messages))
        return encode_prompt(tokenizer, self.text or "")


@dataclasses.dataclass
class ServingPayload(EnginePayload):
    """The engine's payload plus what the server needs to re-encode it after a tokenizer change."""

    source: PromptSource | None = None
    tokenizer_key: str = ""
    error: SequenceError | None = None  # set on the worker when the sequence cannot run on the current arm


# ----------------------------------------------------------------------------------------------- engines


@dataclasses.dataclass(frozen=True)
class ArmInfo:
    """What handlers read about the current arm (a snapshot, replaced whole at each switch)."""

    arm: Arm
    tokenizer: Any
    tokenizer_key: str
    max_context: int  # prompt + new tokens per sequence: the model's window capped by `context_tokens`
    chars_per_token: int  # most characters one token stands for (the prompt-length pre-check)
    vocab_size: int
    eos: frozenset[int]


class Engines:
    """Loads arms' engines (one resident model: the memory budget holds one) and sizes their memory budgets from the
    candidates' memory profiles (helios.models.memory_profile: weights at the arm's depth + K/V per token)."""

    def __init__(self, *, budget_bytes: int, context_tokens: int, max_sequences: int, device: str = "cpu",
                 dtype: str = "float32", max_prefill_tokens: int | None = None) -> None:
        self.budget_bytes, self.context_tokens, self.max_sequences = int(budget_bytes), int(context_tokens), int(max_sequences)
        self.max_prefill_tokens = None if max_prefill_tokens is None else int(max_prefill_tokens)
        self.device, self.dtype = device, dtype
        self._profiles: dict[str, Any] = {}
        self._current: tuple[tuple[str, int], EarlyExitEngine] | None = None
        self._chars_per_token: dict[str, int] = {}

    def profile(self, candidate: str) -> Any:
        from helios.models import memory_profile

        if candidate not in self._profiles:
            self._profiles[candidate] = memory_profile(candidate, dtype=self.dtype, progress=False)
        return self._profiles[candidate]

    def budget(self, arm: Arm) -> MemoryBudget:
        """The scheduler's budget of `arm`: the serve config's bytes, the arm's weights and K/V bytes per token."""
        profile = self.profile(arm.candidate)
        return MemoryBudget(self.budget_bytes, int(profile.weight_bytes_by_depth[arm.depth]),
                            int(profile.kv_bytes_per_token_layer) * arm.depth, max_sequences=self.max_sequences,
                            max_prefill_tokens=self.max_prefill_tokens)

    def fits(self, arm: Arm) -> bool:
        """The arm's weights leave room for K/V in the budget."""
        return self.profile(arm.candidate).weight_bytes_by_depth[arm.depth] < self.budget_bytes

    def load(self, arm: Arm) -> tuple[EarlyExitEngine, ExitConfig]:
        """The executor's loader: the same engine object for the same (candidate, depth), so that an exit-only switch
        keeps the K/V; otherwise the old model is dropped before the new one loads."""
        from helios.models import load_candidate

        key = (arm.candidate, arm.depth)
        if self._current is None or self._current[0] != key:
            self._current = None
            loaded = load_candidate(arm.candidate, arm.depth, device=self.device, dtype=self.dtype, progress=False)
            self._current = (key, EarlyExitEngine(loaded))
        return self._current[1], arm.exit_config

    def info(self, arm: Arm, engine: EarlyExitEngine) -> ArmInfo:
        tokenizer = engine.loaded.tokenizer
        if arm.candidate not in self._chars_per_token:
            self._chars_per_token[arm.candidate] = max_chars_per_token(tokenizer)
        return ArmInfo(arm, tokenizer, arm.candidate, min(engine.max_context, self.context_tokens),
                       self._chars_per_token[arm.candidate], len(tokenizer), frozenset(engine.eos_ids))


class ServingExecutor(EngineExecutor):
    """EngineExecutor plus what only the server needs: the arm snapshot for handlers, the wall-clock window of each
    switch (telemetry charges switches apart from request latency), re-encoding of prompts queued across a tokenizer
    change, and a sequence that cannot run on the current arm fails alone at its prefill instead of failing the
    batch's prefill call."""

    def __init__(self, engines: Engines, arm: Arm, clock: WallClock, on_switch: Callable[[ArmInfo], None]) -> None:
        self.engines, self.clock, self._on_switch = engines, clock, on_switch
        self.switch_windows: list[tuple[float, float]] = []
        self.info: ArmInfo | None = None
        super().__init__(engines.load, arm)

    def switch(self, arm: Any, preempted: list[SequenceState]) -> float:
        start_s = self.clock.now()
        seconds = super().switch(arm, preempted)
        assert self.engine is not None
        self.info = self.engines.info(arm, self.engine)
        self.switch_windows.append((start_s, self.clock.now()))
        self._on_switch(self.info)
        return seconds

    def _prepare(self, payload: ServingPayload, max_tokens: int) -> None:
        """Re-encode a prompt tokenized for another candidate; mark a sequence the current arm cannot run."""
        info = self.info
        assert info is not None
        if payload.error is not None:
            return
        source = payload.source
        param = source.param if source is not None else "prompt"
        if payload.tokenizer_key != info.tokenizer_key and source is not None:
            if source.token_ids is None:
                try:
                    payload.token_ids = source.encode(info.tokenizer)
                except Exception as error:  # noqa: BLE001 (this request's input: its 400, nobody else's)
                    payload.error = SequenceError(400, f"the prompt could not be tokenized for {info.arm.label}: "
                                                       f"{error}", "invalid_prompt", param)
                    return
            elif any(not 0 <= t < info.vocab_size for t in payload.token_ids):
                payload.error = SequenceError(400, f"prompt token ids must be in [0, {info.vocab_size}) for "
                                                   f"{info.arm.label}", "invalid_token_id", param)
                return
            payload.tokenizer_key = info.tokenizer_key
        if not payload.token_ids or len(payload.token_ids) + max_tokens > info.max_context:
            payload.error = SequenceError(
                400, f"after an arm switch to {info.arm.label} this request needs {len(payload.token_ids)} prompt + "
                     f"{max_tokens} new tokens, more than its context window of {info.max_context}",
                "context_length_exceeded", param)

    def prompt_tokens(self, request: SequenceRequest) -> int:
        payload: ServingPayload = request.payload
        self._prepare(payload, request.max_tokens)
        return len(payload.token_ids) if payload.token_ids else request.prompt_tokens

    def prefill(self, seqs: list[SequenceState]) -> float:
        good: list[SequenceState] = []
        for seq in seqs:
            payload: ServingPayload = seq.request.payload
            if not seq.token_ids:  # a recomputed sequence was prepared when first admitted
                self._prepare(payload, seq.max_tokens)
            if payload.error is None:
                good.append(seq)
            else:  # it ends here, alone: one placeholder token so the scheduler's accounting holds
                seq.token_ids.append(-1)
                seq.exit_layers.append(0)
                seq.finished, seq.finish_reason = True, "stop"
        return super().prefill(good) if good else 0.0


# ----------------------------------------------------------------------------------------------- sequences


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    exit_layers: list[int]
    arm: str
    logprobs: RenderedLogprobs | None = None  # per returned token, when asked


Event = tuple[int, str, Any]  # (choice index, "piece" | "end" | "error", text | GenerationOutput | SequenceError)


@dataclasses.dataclass(eq=False)
class ServedSequence:
    """One choice of one request, from the handler's submit to its answer. Fields below `arrival_s` are the
    worker's (written in the hook and at the finish)."""

    seq_id: int
    index: int  # choice index in its response
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None  # streaming: the response's shared event queue
    source: PromptSource
    max_tokens: int
    stop: list[str]
    sampling: SamplingParams
    arrival_s: float  # on the core's clock, when the HTTP request arrived (TTFT includes tokenization)
    prompt_tokens: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text_stream: TextStream | None = None
    tokenizer: Any = None  # of the arm that produced the first token (a cross-tokenizer switch drains)
    eos: frozenset[int] = frozenset()
    arm_label: str = ""
    first_token_s: float | None = None
    queued: bool = True  # counts against max_queued_sequences until its first token
    cancelled: bool = False
    error: SequenceError | None = None
    payload: ServingPayload | None = None  # the engine's view (its error: it could not run on the current arm)

    @property
    def streaming(self) -> bool:
        return self.events is not None


@dataclasses.dataclass
class EpochTally:
    """What the worker served since the controller last took the tally: its spans folded into one
    (helios.scheduler.SpanStats.merge), the records they finished, and the switch loads' windows of time."""

    span: SpanStats
    records: list[RequestRecord] = dataclasses.field(default_factory=list)
    switch_windows: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def add(self, span: SpanStats, records: list[RequestRecord]) -> None:
        self.span.merge(span)
        self.records += records

    def merge(self, later: EpochTally) -> None:
        """Fold the tally taken after this one into it (the controller carries a tokenless epoch on)."""
        self.add(later.span, later.records)
        self.switch_windows += later.switch_windows


# ----------------------------------------------------------------------------------------------- the core


class ServingCore:
    """Scheduler + executor + the engine worker thread; thread-safe `reserve`, `submit`, `cancel`, `switch_arm`."""

    def __init__(self, engines: Engines, arm: Arm, metrics: ServerMetrics, *, span_s: float = 0.02,
                 idle_span_s: float = 0.25, max_queued_sequences: int = 256, switch_policy: str = "drain") -> None:
        if switch_policy not in ("drain", "recompute"):
            raise ValueError(f"switch_policy must be 'drain' or 'recompute'; got {switch_policy!r}")
        if max_queued_sequences < 1:
            raise ValueError(f"max_queued_sequences must be >= 1; got {max_queued_sequences}")
        self.engines, self.metrics = engines, metrics
        self.span_s, self.idle_span_s = float(span_s), float(idle_span_s)
        self.max_queued_sequences = int(max_queued_sequences)
        self.switch_policy = switch_policy
        self.clock = WallClock()
        self._lock = threading.Lock()  # sequences, the queue count, the tally, the scheduler reference
        self._sequences: dict[int, ServedSequence] = {}
        self._next_id = 0
        self._queued = 0
        self.info: ArmInfo  # set by _on_switch below, before any request
        self.executor = ServingExecutor(engines, arm, self.clock, self._on_switch)
        self.scheduler = Scheduler(self.executor, engines.budget(arm), self.clock, arm=arm, mode="continuous")
        self.executor.switch_windows = []  # the start-up load delays no request: no epoch pays for it
        self.tally = EpochTally(SpanStats(start_s=self.clock.now()))
        self._stop = threading.Event()
        self.draining = False
        self._thread: threading.Thread | None = None
        self.faults = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="helios-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting: handlers answer 503 from now on; what is in flight is still served."""
        self.draining = True

    def stop(self, timeout_s: float | None = None) -> None:
        """Serve every sequence already submitted, then stop the worker."""
        self.draining = True
        self._stop.set()
        self.clock.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def engine(self) -> EarlyExitEngine:
        assert self.executor.engine is not None
        return self.executor.engine

    @property
    def arm(self) -> Arm:
        return self.info.arm

    def _on_switch(self, info: ArmInfo) -> None:
        self.info = info
        self.metrics.set_arm(info.arm)

    # ------------------------------------------------------------------------------------------ input (any thread)

    def reserve(self, n: int) -> bool:
        """Room for `n` more sequences waiting for their first token? Takes it if so (backpressure: 429 if not)."""
        with self._lock:
            if self._queued + n > self.max_queued_sequences:
                return False
            self._queued += n
            self.metrics.waiting.set(self._queued)
            return True

    def unreserve(self, n: int) -> None:
        with self._lock:
            self._queued -= n
            self.metrics.waiting.set(self._queued)

    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def rejection_reason(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why the current arm's memory budget could never hold this sequence, even alone; None if it can."""
        return self.scheduler.budget.rejection_reason(prompt_tokens, max_tokens)

    def submit(self, seqs: Sequence[ServedSequence], token_ids: Sequence[list[int]], tokenizer_key: str) -> None:
        """Queue sequences whose queue slots were `reserve`d (their ids from `new_id`). Raises SequenceError (and
        submits none) if the scheduler rejects one, or 503 once draining."""
        if self.draining:
            raise SequenceError(503, "the server is shutting down", "shutting_down")
        requests = []
        for seq, ids in zip(seqs, token_ids):
            seq.prompt_tokens = len(ids)
            payload = seq.payload = ServingPayload(list(ids), self._hook(seq), seq.sampling, source=seq.source,
                                                   tokenizer_key=tokenizer_key)
            requests.append(SequenceRequest(seq.seq_id, seq.arrival_s, len(ids), seq.max_tokens, payload))
        with self._lock:
            scheduler = self.scheduler
            for request in requests:
                reason = scheduler.budget.rejection_reason(request.prompt_tokens, request.max_tokens)
                if reason is not None:
                    raise SequenceError(400, f"this request cannot fit the server's memory budget: {reason}",
                                        "memory_budget_exceeded", "max_tokens")
            for seq in seqs:
                self._sequences[seq.seq_id] = seq
        for request in requests:
            reason = scheduler.submit(request)
            if reason is not None:  # the budget changed in between (a switch): fail this one like a late rejection
                self._fail(self._sequences.get(request.request_id),
                           SequenceError(400, f"this request cannot fit the server's memory budget: {reason}",
                                         "memory_budget_exceeded", "max_tokens"))

    def cancel(self, seqs: Sequence[ServedSequence]) -> None:
        """The client went away: drop these sequences at the next step (their K/V and slot are freed)."""
        with self._lock:
            scheduler = self.scheduler
            live = [seq for seq in seqs if self._sequences.pop(seq.seq_id, None) is not None]
            for seq in live:
                seq.cancelled = True
                if seq.queued:
                    seq.queued = False
                    self._queued -= 1
        for seq in live:
            scheduler.cancel(seq.seq_id)
        if live:
            self.metrics.cancelled.inc(len(live))

    def switch_arm(self, arm: Arm) -> str:
        """Switch to `arm` between decode steps (module docstring: Switching). Returns the switch policy used."""
        current = self.scheduler.arm
        if (arm.candidate, arm.depth) == (current.candidate, current.depth):
            policy = "keep"
        elif arm.candidate != current.candidate:
            policy = "drain"
        else:
            policy = self.switch_policy
        with self._lock:
            self.scheduler.switch_arm(arm, self.engines.budget(arm), policy=policy)  # type: ignore[arg-type]
        self.clock.wake()
        return policy

    def take_tally(self) -> EpochTally:
        """The tally since the last call, and a new one from now (the controller's epoch)."""
        with self._lock:
            tally, self.tally = self.tally, EpochTally(SpanStats(start_s=self.clock.now()))
        tally.span.end_s = self.clock.now()
        return tally

    def in_flight(self) -> list[dict[str, Any]]:
        """Requests still waiting or decoding, as helios.slo.request_metrics reads them (ttft None: no token yet)."""
        with self._lock:
            seqs = list(self._sequences.values())
        return [{"arrival_s": s.arrival_s, "ttft_s": None if s.first_token_s is None else s.first_token_s - s.arrival_s,
                 "e2e_s": None, "output_tokens": len(s.tokens)} for s in seqs]

    @property
    def queue_len(self) -> int:
        return self.scheduler.queue_len + self.scheduler.pending_arrivals

    @property
    def running(self) -> int:
        return self.scheduler.running

    # ------------------------------------------------------------------------------------------ the worker

    def _hook(self, seq: ServedSequence) -> Callable[[int, TokenLogprob | None], bool]:
        """The sequence's on_token: runs on the worker inside the engine step; True ends the sequence."""
        def on_token(token: int, logprob: TokenLogprob | None) -> bool:
            if seq.cancelled or seq.error is not None:
                return True
            try:
                if seq.first_token_s is None:
                    info = self.info
                    seq.first_token_s = self.clock.now()
                    seq.tokenizer, seq.eos, seq.arm_label = info.tokenizer, info.eos, info.arm.label
                    if seq.streaming or seq.stop:
                        seq.text_stream = TextStream(info.tokenizer, info.eos, seq.stop, seq.max_tokens)
                    self._first_token(seq)
                seq.tokens.append(token)
                if logprob is not None:
                    seq.logprobs.append(logprob)
                stream = seq.text_stream
                if stream is None:
                    return False
                piece = stream.push(token)
                if piece and seq.streaming:
                    self._emit(seq, "piece", piece)
                return stream.stopped
            except Exception as error:  # noqa: BLE001 (this sequence's fault: it alone fails, with a 500)
                log.exception("sequence %d failed in its token hook", seq.seq_id)
                seq.error = SequenceError(500, f"internal error while detokenizing this request: {error!r}",
                                          "internal_error")
                return True

        return on_token

    def _first_token(self, seq: ServedSequence) -> None:
        with self._lock:
            if seq.queued:
                seq.queued = False
                self._queued -= 1

    def _run(self) -> None:
        while True:
            with self._lock:
                scheduler = self.scheduler
                idle = not self._sequences and scheduler.idle
            if self._stop.is_set() and idle:
                return  # drained
            span_s = self.idle_span_s if idle else self.span_s
            try:
                records = scheduler.run_until(self.clock.now() + span_s)
            except Exception as error:  # noqa: BLE001 (a server fault: fail what is in flight, keep serving)
                self._recover(error)
                continue
            span = scheduler.span
            with self._lock:
                self.tally.add(span, records)
                windows = self.executor.switch_windows
                self.tally.switch_windows += windows
                self.executor.switch_windows = []
            for record in records:
                self._finish(record)
            for rejection in span.rejections:
                self._fail(self._sequences.get(rejection.request_id),  # type: ignore[arg-type]
                           SequenceError(400, f"request rejected: {rejection.reason}", "memory_budget_exceeded"))
            self._observe(span, records)

    def _observe(self, span: SpanStats, records: list[RequestRecord]) -> None:
        m = self.metrics
        m.queue_length.set(self.queue_len)
        m.running.set(self.running)
        m.decode_steps.inc(span.decode_steps)
        m.generated_tokens.inc(span.output_tokens)
        m.prefill_tokens.inc(span.prefill_tokens)
        m.recomputed.inc(span.recomputed)
        if span.switches:
            m.switches.inc(span.switches)
            m.switch_seconds.observe(span.switch_s)
        for r in records:
            m.ttft.observe(r.ttft_s)
            m.e2e.observe(r.e2e_s)
            m.queueing_delay.observe(r.queueing_delay_s)
            if r.output_tokens > 1:
                m.tpot.observe(r.tpot_s)
            for layer in r.exit_layers:
                m.exit_layer.observe(layer)
        for rejection in span.rejections:
            m.rejections.labels("memory_budget").inc()

    def _recover(self, error: BaseException) -> None:
        """The engine step raised: answer everything in flight with a 500 and rebuild executor and scheduler."""
        log.exception("engine step failed; failing the %d sequences in flight and restarting the scheduler",
                      len(self._sequences), exc_info=error)
        self.faults += 1
        self.metrics.engine_faults.inc()
        fault = SequenceError(500, f"the engine failed while serving this request: {error!r}", "engine_fault")
        arm = self.scheduler.arm
        pending = self.scheduler.pending_switch  # a requested switch survives the restart
        executor = ServingExecutor(self.engines, arm, self.clock, self._on_switch)
        scheduler = Scheduler(executor, self.engines.budget(arm), self.clock, arm=arm, mode="continuous")
        if pending is not None:
            pending_arm, pending_budget, policy = pending
            scheduler.switch_arm(pending_arm, pending_budget, "drain" if policy == "keep" else policy)
        with self._lock:
            failed = list(self._sequences.values())
            self.executor, self.scheduler = executor, scheduler
        for seq in failed:
            self._fail(seq, fault)

    def _deliver(self, seq: ServedSequence, result: GenerationOutput | SequenceError) -> None:
        """Hand the result to the event loop (the future of a non-streamed request; the end event of a stream)."""
        def deliver() -> None:
            if seq.future.done():
                return
            if isinstance(result, SequenceError):
                seq.future.set_exception(result)
                seq.future.exception()  # retrieved: a stream reports it through its events instead
            else:
                seq.future.set_result(result)

        try:
            seq.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
        self._emit(seq, "error" if isinstance(result, SequenceError) else "end", result)

    @staticmethod
    def _emit(seq: ServedSequence, kind: str, payload: Any) -> None:
        if seq.events is None or seq.cancelled:
            return
        try:
            seq.loop.call_soon_threadsafe(seq.events.put_nowait, (seq.index, kind, payload))
        except RuntimeError:
            pass

    def _fail(self, seq: ServedSequence | None, error: SequenceError) -> None:
        if seq is None:
            return
        with self._lock:
            if self._sequences.pop(seq.seq_id, None) is None:
                return
            if seq.queued:
                seq.queued = False
                self._queued -= 1
        self.metrics.sequence_errors.labels(str(error.status)).inc()
        self._deliver(seq, error)

    def _finish(self, record: RequestRecord) -> None:
        with self._lock:
            seq = self._sequences.pop(record.request_id, None)  # type: ignore[arg-type]
            if seq is not None and seq.queued:
                seq.queued = False
                self._queued -= 1
        if seq is None:  # cancelled meanwhile
            return
        payload_error = seq.error or (seq.payload.error if seq.payload is not None else None)
        if payload_error is None and seq.first_token_s is None:
            payload_error = SequenceError(500, "the sequence ended without a token", "internal_error")
        if payload_error is not None:
            self._deliver(seq, payload_error)
            return
        try:
            output = self._output(seq, record)
        except Exception as error:  # noqa: BLE001 (this request's output failed: its 500 alone)
            log.exception("sequence %d failed while rendering its output", seq.seq_id)
            self._deliver(seq, SequenceError(500, f"internal error while rendering this request: {error!r}",
                                             "internal_error"))
            return
        if seq.text_stream is not None:
            rest = seq.text_stream.rest(output.text)
            if rest:
                self._emit(seq, "piece", rest)
        self._deliver(seq, output)

    @staticmethod
    def _output(seq: ServedSequence, record: RequestRecord) -> GenerationOutput:
        tokens, exits = seq.tokens[: seq.max_tokens], list(record.exit_layers[: seq.max_tokens])
        finish = "length"
        if tokens and tokens[-1] in seq.eos:
            tokens, exits, finish = tokens[:-1], exits[:-1], "stop"  # EOS ends the text; it is not content
        text, cut_by_stop = final_text(seq.tokenizer, tokens, seq.stop)
        if cut_by_stop or record.finish_reason == "stop":
            finish = "stop"
        logprobs = None
        if seq.sampling.logprobs is not None:
            entries = seq.logprobs[: len(tokens)]
            if cut_by_stop:  # only the tokens that made the returned text
                entries = entries[: kept_tokens(seq.tokenizer, tokens, text)]
            logprobs = render_logprobs(seq.tokenizer, entries)
        return GenerationOutput(text, tokens, seq.prompt_tokens, finish, exits, seq.arm_label, logprobs)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0
