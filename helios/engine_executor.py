"""The scheduler's executor on a real engine: what the live env (measured clock) and the server (wall clock) run.

    python -m pytest -q tests/test_engine_executor.py

helios.scheduler decides who runs; this runs them on helios.engine's step API (DecodeBatch) and reports the seconds
each call took (synchronised on CUDA, so the time is the device's, not the launch's). It implements the scheduler's
StepExecutor contract (helios/scheduler.py's docstring):

  prefill(seqs)  the admitted sequences join the running batch (a recomputed one re-prefills prompt + generated)
  decode(seqs)   one step of every running sequence
  release(seq)   a sequence left: its slot is freed
  switch(arm, preempted)  load `arm` (timed); `preempted` sequences drop their K/V and come back through prefill

Each token is appended to `seq.token_ids` / `seq.exit_layers`; a sequence ends at an EOS id of the model or when its
payload's `on_token(token, logprob)` says a stop string ended it (the server's detokeniser owns stop strings).
Each sequence decodes with its payload's SamplingParams (helios.sampling: greedy by default; a seeded sequence's
text does not depend on who shares its batch). A recomputed sequence restarts its noise stream from its seed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from helios.engine import DecodeBatch, EarlyExitEngine, ExitConfig
from helios.sampling import GREEDY, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from helios.scheduler import SequenceState


@dataclasses.dataclass
class EnginePayload:
    """A request as the engine sees it: prompt token ids, its sampling settings, and an optional per-token hook
    `on_token(token_id, logprob)` (streaming, stop strings) that returns True when the token ended the sequence;
    `logprob` is None unless the SamplingParams asked for logprobs."""

    token_ids: list[int]
    on_token: Callable[[int, TokenLogprob | None], bool] | None = None
    sampling: SamplingParams = GREEDY


ArmLoader = Callable[[Any], tuple[EarlyExitEngine, ExitConfig]]


class EngineExecutor:
    """StepExecutor over helios.engine. `load(arm) -> (engine, exit_config)` builds or fetches an arm's engine;
    a loader that returns the same engine object for the same weights lets an exit-only switch keep the K/V."""

    def __init__(self, load: ArmLoader, arm: Any = None) -> None:
        self._load = load
        self.engine: EarlyExitEngine | None = None
        self.batch: DecodeBatch | None = None
        self.arm = None
        self.load_s = 0.0
        if arm is not None:
            self.load_s = self.switch(arm, [])

    def _synchronise(self) -> None:
        if self.engine is not None and self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    @staticmethod
    def _key(seq: SequenceState) -> Hashable:
        return seq.request.request_id

    def _emit(self, seq: SequenceState, token: int, exit_layer: int, logprob: TokenLogprob | None) -> None:
        seq.token_ids.append(token)
        seq.exit_layers.append(exit_layer)
        payload: EnginePayload = seq.request.payload
        stopped = payload.on_token is not None and payload.on_token(token, logprob)
        if token in self.engine.eos_ids:
            seq.finished, seq.finish_reason = True, "eos"
        elif stopped:
            seq.finished, seq.finish_reason = True, "stop"

    def prefill(self, seqs: list[SequenceState]) -> float:
        start = time.perf_counter()
        # A recomputed sequence re-runs its prompt and what it had generated, and goes on from there.
        contexts = [list(seq.request.payload.token_ids) + list(seq.token_ids) for seq in seqs]
        remaining = [max(seq.max_tokens - seq.output_tokens, 1) for seq in seqs]
        out = self.batch.add([self._key(seq) for seq in seqs], contexts, remaining,
                             [seq.request.payload.sampling for seq in seqs])
        self._synchronise()
        seconds = time.perf_counter() - start
        logprobs = out.logprobs or [None] * len(seqs)
        for seq, token, layer, logprob in zip(seqs, out.tokens, out.exit_layers, logprobs):
            self._emit(seq, token, layer, logprob)
        return seconds

    def decode(self, seqs: list[SequenceState]) -> float:
        keys = {self._key(seq) for seq in seqs}
        unknown = keys - set(self.batch.seq_ids)
        if unknown:
            raise RuntimeError(f"decode of sequences the engine never prefilled: {sorted(map(str, unknown))}")
        # Static batching holds finished members until the batch ends (release comes then); they stop costing
        # compute now, as the engine's generate retires a row at its EOS.
        self.batch.remove([key for key in self.batch.seq_ids if key not in keys])
        start = time.perf_counter()
        out = self.batch.step()
        self._synchronise()
        seconds = time.perf_counter() - start
        by_key = {self._key(seq): seq for seq in seqs}
        logprobs = out.logprobs or [None] * len(seqs)
        for key, token, layer, logprob in zip(out.seq_ids, out.tokens, out.exit_layers, logprobs):
            self._emit(by_key[key], token, layer, logprob)
        return seconds

    def release(self, seq: SequenceState) -> None:
        if self._key(seq) in self.batch.seq_ids:  # a finished static-batch member may have left at its last step
            self.batch.remove([self._key(seq)])

    def switch(self, arm: Any, preempted: list[SequenceState]) -> float:
        start = time.perf_counter()
        engine, exit_config = self._load(arm)
        running = len(self.batch) - len(preempted) if self.batch is not None else 0
        if running and engine is not self.engine:
            raise ValueError("sequences can keep their K/V only across an exit-setting change of the same weights; "
                             "switch with policy 'drain' or 'recompute'")
        if self.batch is not None:
            self.batch.remove([self._key(seq) for seq in preempted])
        if running:
            engine.check_exit_config(exit_config)
            self.batch.exit_config = exit_config
            self.batch.exit_points = set(exit_config.exit_points) if exit_config.enabled else set()
        else:
            self.batch = engine.batch(exit_config)
        self.engine, self.arm = engine, arm
        self._synchronise()
        return time.perf_counter() - start
