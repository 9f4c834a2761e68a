"""Dynamic batching and arm switching: one worker thread owns the engine; the event loop only enqueues and awaits.

    python scripts/serve.py policy=/path/to/export   # builds a Batcher; see helios/serving/api.py for the HTTP side

The engine call is blocking torch, so it never runs on the event loop: handlers put a `GenerationRequest` on a
thread-safe queue and await an asyncio future that the worker resolves with `loop.call_soon_threadsafe`.

Batching: the worker takes the oldest waiting request, then waits up to `max_wait_s` for more, up to the current
arm's batch size (what the memory budget allows beside its weights). The batch decodes `max(max_tokens)` with each
request's own SamplingParams (greedy or sampled, per row); each request keeps its own first `max_tokens` (a row's
tokens, greedy or seeded, do not depend on how long the batch runs or on the other rows).

Epochs and switching: after a batch, when `epoch_s` has passed and the epoch generated tokens, the worker turns the
epoch's record (helios.telemetry) into the SLO metrics and reward and the env's observation (helios.observation, the
same builder), lets the policy learn (if online) and act, and loads the new arm if it changed. That happens between
batches, in the same thread, so a switch never touches an in-flight batch: requests that arrive meanwhile wait in
the queue and are served by the new arm. The switch is charged to the epoch it opens, like the env charges it to
the epoch the new arm serves (the load at start-up, before any request, to none).

Live, the reference of every ratio is the first epoch (no offline reference run; no switch in it), and so is the
nominal epoch that `queue_ratio` divides the waiting requests by; accuracy is neutral (no references live), the
workload mix is unknown (zeros) and there is no episode (progress 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from helios.arms import Arm, exit_histogram
from helios.engine import EarlyExitEngine
from helios.observation import ObservationLayout, build_observation
from helios.sampling import GREEDY, SamplingParams, TokenLogprob
from helios.serving.metrics import ServerMetrics
from helios.telemetry import NO_SWITCH, EpochOutcome, SwitchCost, epoch_metrics

log = logging.getLogger("helios.serving")
ACCURACY_LIVE = 1.0  # no references live: accuracy enters the reward as neutral (ratio 1 to the reference)


class RequestError(ValueError):
    """A request the engine cannot serve as asked (answered as HTTP 400 with `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclasses.dataclass
class GenerationRequest:
    """What a handler hands the worker. Prompts are encoded by the worker with the arm that serves them (arms can
    have different tokenizers); `messages` (chat) go through the tokenizer's chat template."""

    max_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    sampling: SamplingParams = GREEDY  # one sequence's decoding settings (n > 1 is n requests, see api.py)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    # Streaming: the worker puts (stream_index, kind, payload) here as the batch decodes: ("start", None) once the
    # prompt is accepted, ("piece", text) per text increment, then ("end", GenerationOutput) or ("error", exception).
    stream: asyncio.Queue | None = None
    stream_index: int = 0


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    exit_layers: list[int]
    arm: str
    # When the request asked for logprobs: per returned token, (text, logprob, [(text, logprob)] alternatives),
    # rendered with the tokenizer of the arm that served it. See helios.sampling for what the numbers mean.
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still turn out to begin a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class TextStream:
    """Incremental detokenisation of one streaming request, fed one token at a time from the decode loop.

    Sends only text that is final: never the tail of a character whose bytes are still coming, nor text that may
    begin a stop string; stops at EOS, at a stop string or after `max_tokens`. What it sends is always a prefix of
    the request's final text (checked before each send), so the chunks concatenate to the non-streamed answer.
    """

    def __init__(self, request: GenerationRequest, tokenizer: Any, eos: set[int]) -> None:
        self.request, self.tokenizer, self.eos = request, tokenizer, eos
        self.tokens: list[int] = []
        self.text = ""  # decoded text of tokens[:read_offset]
        # Decode window (vLLM's incremental detokenisation): only tokens[prefix_offset:] are decoded per token, the
        # tokens before read_offset giving the context that spacing depends on. Decoding the whole prefix instead
        # would cost O(n^2) per stream inside the decode loop.
        self.prefix_offset = self.read_offset = 0
        self.sent = ""
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.eos or len(self.tokens) >= self.request.max_tokens:
            self.done = True
            return ""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix_offset: self.read_offset], skip_special_tokens=True)
        window = decode(self.tokens[self.prefix_offset:], skip_special_tokens=True)
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # an incomplete character (or no text yet): wait for the next tokens
        self.text += window[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        text = self.text
        for stop in self.request.stop:
            cut = text.find(stop, max(0, len(self.sent) - len(stop)))  # sent text holds no stop string
            if cut >= 0:
                text, self.done = text[:cut], True
        if not self.done:
            text = text[: len(text) - held_back(text, self.request.stop)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def rest(self, final_text: str) -> str:
        """What is left to send of the final text once decoding has ended."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""


def kept_tokens(tokenizer: Any, tokens: list[int], text: str) -> int:
    """How many leading tokens it takes to produce `text` (a stop-string cut of their decode): the shortest prefix
    whose decode starts with it (a prefix that ends inside a multi-byte character decodes to U+FFFD there, so it does
    not count). Binary search, so only O(log n) decodes."""
    low, high = 0, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if tokenizer.decode(tokens[:mid], skip_special_tokens=True).startswith(text):
            high = mid
        else:
            low = mid + 1
    return low


def render_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Token ids as text, one token at a time (as vLLM reports them: a byte of a multi-byte character decodes to
    U+FFFD on its own)."""
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return [(text(e.token_id), e.logprob, [(text(i), lp) for i, lp in e.top]) for e in entries]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat prompt ids: the tokenizer's template when it has one, else a plain "role: content" transcript (the tiny
    test models' byte tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


class Engines:
    """Loads the engine of an arm (candidate truncated to depth) and keeps only the current one resident: the memory
    budget that sized the batches holds one model."""

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self.device, self.dtype = device, dtype

    def load(self, arm: Arm) -> EarlyExitEngine:
        from helios.models import load_candidate

        loaded = load_candidate(arm.candidate, arm.depth, device=self.device, dtype=self.dtype, progress=False)
        return EarlyExitEngine(loaded)


class Batcher:
    def __init__(self, *, policy: Any, metrics: ServerMetrics, slo: Any, meter: Any, context_tokens: int,
                 layout: ObservationLayout, max_wait_s: float = 0.01, epoch_s: float = 5.0,
                 initial_arm: int | None = None, engines: Engines | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.policy = policy
        self.arms: tuple[Arm, ...] = policy.arms
        self.layout = layout
        self.mask = np.array([arm.feasible for arm in self.arms])
        if not self.mask.any():
            raise ValueError("no arm of the policy's table fits the memory budget")
        self.metrics, self.slo, self.meter = metrics, slo, meter
        self.context_tokens = int(context_tokens)
        self.max_wait_s, self.epoch_s = float(max_wait_s), float(epoch_s)
        self.engines = engines or Engines()
        self.on_epoch = on_epoch
        self.queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine: EarlyExitEngine | None = None
        self._max_context = self.context_tokens
        self.arm_index = -1
        self.reference: dict[str, float] | None = None
        self.reference_requests = 0  # the first epoch's requests: the nominal epoch of queue_ratio
        self.epoch_log: list[dict[str, Any]] = []
        self._epoch_reset()
        first = initial_arm if initial_arm is not None else policy.act(self.observation(None, None), self.mask)
        self.switch(int(first))
        self._epoch_reset()  # the start-up load delays no request: no epoch pays for it

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="helios-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Serve what is queued, then stop (the HTTP server has already stopped accepting requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def arm(self) -> Arm:
        return self.arms[self.arm_index]

    @property
    def tokenizer(self) -> Any:
        assert self.engine is not None
        return self.engine.loaded.tokenizer

    @property
    def max_context(self) -> int:
        """Prompt + new tokens per sequence: the model's window, capped by the K/V the budget reserved per sequence.
        Cached at each switch: handlers read it on the event loop while the worker may be loading the next arm."""
        return self._max_context

    def submit(self, request: GenerationRequest) -> None:
        if self._stop.is_set():
            raise RuntimeError("server is shutting down")
        self.queue.put(request)
        self.metrics.queue_depth.set(self.queue.qsize())

    # ------------------------------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return  # stop requested and nothing left: drained
                continue
            batch = [first]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < max(1, self.arm.batch_size):
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            batch = [r for r in batch if not r.future.cancelled()]  # the client went away while it waited
            if batch:
                try:
                    self._serve(batch)
                except Exception as error:  # never let one bad batch kill the worker; its requests get the error
                    log.exception("engine batch failed")
                    self.metrics.errors.inc()
                    for request in batch:
                        self._resolve(request, error)
            try:
                self._maybe_end_epoch()
            except Exception:  # a policy/loader failure keeps the current arm; the next epoch tries again
                log.exception("policy epoch failed; keeping arm %s", self.arm_index)
                self._epoch_reset()

    @staticmethod
    def _emit(request: GenerationRequest, kind: str, payload: Any) -> None:
        """Put one streaming event on the request's queue, from the worker thread, in order."""
        if request.stream is None:
            return
        try:
            request.loop.call_soon_threadsafe(request.stream.put_nowait, (request.stream_index, kind, payload))
        except RuntimeError:  # the loop is closed: nobody is reading
            pass

    @staticmethod
    def _resolve(request: GenerationRequest, result: Any) -> None:
        Batcher._emit(request, "error" if isinstance(result, BaseException) else "end", result)

        def deliver() -> None:
            if request.future.done():  # cancelled by a disconnect
                return
            if isinstance(result, BaseException):
                if request.stream is not None:  # the stream reported it; nobody awaits this future
                    request.future.cancel()
                else:
                    request.future.set_exception(result)
            else:
                request.future.set_result(result)

        try:
            request.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed (server gone): nobody is waiting any more
            pass

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_token_id")
        elif request.messages is not None:
            ids = render_chat(self.tokenizer, request.messages)
        else:
            ids = list(self.tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"])
        if not ids:
            raise RequestError("the prompt is empty", "prompt", "empty_prompt")
        if len(ids) + request.max_tokens > self.max_context:
            raise RequestError(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{len(ids) + request.max_tokens} tokens ({len(ids)} in the prompt, {request.max_tokens} for the "
                f"completion). Please reduce the prompt or max_tokens.", "messages" if request.messages else "prompt",
                "context_length_exceeded")
        return ids

    def _serve(self, batch: list[GenerationRequest]) -> None:
        assert self.engine is not None
        encoded: list[tuple[GenerationRequest, list[int]]] = []
        for request in batch:  # a request that cannot be encoded fails alone, the rest of the batch runs
            try:
                encoded.append((request, self.encode(request)))
            except RequestError as error:
                self._resolve(request, error)
        if not encoded:
            return
        started = time.perf_counter()
        for request, _ in encoded:
            self.metrics.queue_wait.observe(started - request.arrival)
            self._emit(request, "start", None)
        arm = self.arm
        max_new = max(r.max_tokens for r, _ in encoded)
        eos = set(self.engine.eos_ids)
        tokenizer = self.tokenizer
        streams = {row: TextStream(request, tokenizer, eos) for row, (request, _) in enumerate(encoded)
                   if request.stream is not None}

        def on_token(step: int, tokens: Any) -> None:
            row_tokens = tokens.tolist()
            for row, text_stream in streams.items():
                piece = text_stream.push(int(row_tokens[row]))
                if piece:
                    self._emit(text_stream.request, "piece", piece)

        self.meter.start()
        try:
            result = self.engine.generate([ids for _, ids in encoded], max_new, arm.exit_config,
                                          on_token=on_token if streams else None,
                                          sampling=[request.sampling for request, _ in encoded])
        finally:
            reading = self.meter.stop()
        finished = time.perf_counter()
        self.metrics.batch_latency.observe(finished - started)
        self.metrics.batch_size.observe(len(encoded))
        self.metrics.energy.labels(reading.source).inc(max(0.0, reading.energy_j))
        generated = 0
        for row, ((request, ids), tokens, exits) in enumerate(zip(encoded, result.tokens, result.exit_layers)):
            tokens, exits = tokens[: request.max_tokens], exits[: request.max_tokens]
            finish = "length"
            if tokens and tokens[-1] in eos:
                tokens, exits, finish = tokens[:-1], exits[:-1], "stop"  # EOS ends the text; it is not content
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            cut_by_stop = False
            for stop in request.stop:
                cut = text.find(stop)
                if cut >= 0:
                    text, finish, cut_by_stop = text[:cut], "stop", True
            logprobs = None
            if request.sampling.logprobs is not None and result.logprobs is not None:
                entries = result.logprobs[row][: len(tokens)]
                if cut_by_stop:  # only the tokens that made the returned text
                    entries = entries[: kept_tokens(tokenizer, tokens, text)]
                logprobs = render_logprobs(tokenizer, entries)
            generated += len(tokens)
            self.metrics.prompt_tokens.inc(len(ids))
            for layer in exits:
                self.metrics.exit_layer.observe(layer)
            self.epoch["latencies"].append(finished - request.arrival - self._waited_for_switch(request.arrival))
            self.epoch["exit_layers"].extend(exits)
            if row in streams:
                rest = streams[row].rest(text)
                if rest:
                    self._emit(request, "piece", rest)
            self._resolve(request, GenerationOutput(text, tokens, len(ids), finish, exits, arm.label, logprobs))
        self.metrics.generated_tokens.inc(generated)
        self.epoch["tokens"] += generated
        self.epoch["busy_s"] += finished - started
        self.epoch["energy_j"] += max(0.0, reading.energy_j)
        self.epoch["requests"] += len(encoded)
        self.epoch["batches"] += 1

    # ------------------------------------------------------------------------------------------ the policy

    def _epoch_reset(self) -> None:
        self.epoch: dict[str, Any] = {"start": time.perf_counter(), "tokens": 0, "busy_s": 0.0, "energy_j": 0.0,
                                      "requests": 0, "batches": 0, "latencies": [], "exit_layers": [],
                                      "switch": NO_SWITCH, "switch_window": (0.0, 0.0)}

    def _waited_for_switch(self, arrival: float) -> float:
        """Seconds a request arriving at `arrival` spent waiting for this epoch's switch: epoch_metrics charges
        the switch to every request of the epoch, so it must not be in the measured latency too."""
        start, end = self.epoch["switch_window"]
        return max(0.0, end - max(start, arrival))

    def epoch_outcome(self) -> EpochOutcome:
        """The epoch's record so far, as the env's backends fill it (helios.telemetry)."""
        epoch = self.epoch
        latencies = epoch["latencies"]
        return EpochOutcome(
            requests=epoch["requests"], tokens=epoch["tokens"], busy_s=epoch["busy_s"],
            latency_p95_s=float(np.percentile(latencies, 95)) if latencies else 0.0,
            # A meter that read nothing must still leave a positive reference: the ratios divide by it.
            energy_j=max(epoch["energy_j"], 1e-9), accuracy=ACCURACY_LIVE,
            histogram=exit_histogram(epoch["exit_layers"], self.arm.num_layers, self.layout.bins),
            batches=epoch["batches"],
        )

    def observation(self, outcome: EpochOutcome | None, values: dict[str, float] | None) -> np.ndarray:
        """The env's observation (helios.observation) after an epoch, or before any (both None)."""
        return build_observation(
            self.layout, histogram=None if outcome is None else outcome.histogram, values=values,
            reference=self.reference, switch_s=self.epoch["switch"].seconds, waiting=self.queue.qsize(),
            nominal=self.reference_requests, mixture=None, arm=self.arm if self.arm_index >= 0 else None,
            progress=0.0)

    def _maybe_end_epoch(self) -> None:
        if time.perf_counter() - self.epoch["start"] < self.epoch_s or self.epoch["tokens"] == 0:
            return
        outcome, switch = self.epoch_outcome(), self.epoch["switch"]
        values = epoch_metrics(outcome, switch)
        assert values is not None  # the epoch generated tokens
        if self.reference is None:
            self.reference = epoch_metrics(outcome, NO_SWITCH)
            self.reference_requests = outcome.requests
        reward = self.slo.evaluate(values, self.reference)
        obs = self.observation(outcome, values)
        info = {"metrics": values, "exit_histogram": outcome.histogram.tolist(), "switch_s": switch.seconds,
                "penalties": {k: v for k, v in reward.penalties.items() if v > 0}}
        previous = self.arm_index
        self.policy.update(previous, reward.total, obs, info)
        choice = int(self.policy.act(obs, self.mask))
        record = {"epoch": len(self.epoch_log), "arm": previous, "next_arm": choice, "reward": reward.total,
                  "requests": outcome.requests, "switch_s": switch.seconds, **values, "observation": obs.tolist()}
        self.epoch_log.append(record)
        self.metrics.epochs.inc()
        self.metrics.reward.set(reward.total)
        if self.on_epoch is not None:
            self.on_epoch(record)
        self._epoch_reset()  # before the switch: the next epoch pays for it
        if choice != previous:
            self.switch(choice)

    def switch(self, index: int) -> None:
        """Load arm `index` (only between batches: this runs in the worker thread, or before it starts)."""
        if not 0 <= index < len(self.arms) or not self.mask[index]:
            valid = np.flatnonzero(self.mask).tolist()
            raise ValueError(f"arm {index} is not a feasible arm of the table; feasible arms: {valid}")
        arm = self.arms[index]
        loaded = None if self.engine is None else self.arm
        if loaded is not None and (arm.candidate, arm.depth) == (loaded.candidate, loaded.depth):
            cost = NO_SWITCH if index == self.arm_index else SwitchCost("exit", 0.0, 0.0)
            self.arm_index = index  # same model, another exit setting: nothing to load
        else:
            started = time.perf_counter()
            self.meter.start()
            self.engine = None  # drop the old model first: the budget holds one (only the worker reads it)
            try:
                self.engine = self.engines.load(arm)
            finally:
                energy_j = max(0.0, self.meter.stop().energy_j)
            finished = time.perf_counter()
            self._max_context = min(self.engine.max_context, self.context_tokens)
            kind = "cold" if loaded is None else "candidate" if loaded.candidate != arm.candidate else "depth"
            cost = SwitchCost(kind, finished - started, energy_j)
            self.epoch["switch_window"] = (started, finished)
            self.metrics.switch_seconds.observe(cost.seconds)
            self.arm_index = index
        self.epoch["switch"] = cost
        self.metrics.switches.inc()
        self.metrics.set_arm(arm)
        log.info("serving arm %d: %s (%.2f s to load)", index, arm.label, cost.seconds)
