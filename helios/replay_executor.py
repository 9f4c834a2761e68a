"""The scheduler's executor on the cost model's clock: continuous batching replayed from traces, no model run.

    python benchmarks/scheduler_replay.py --quick      # spans/s of the replay scheduler

`ReplayExecutor` implements helios.scheduler.StepExecutor from recorded traces (helios.traces) and their calibrated
cost models (helios.costmodel), so that the replay env runs the same admission and retirement code as live:
  * tokens and exit layers: a request's token t under an arm's exit setting is the trace row at position t
    (helios.replay.Replayer.exits: the first exit point whose signal passes, else the loaded depth; a prefill's
    token comes from the full loaded depth). Output length = min(max_tokens, tokens to the first EOS of the trace's
    full-depth output, the trace's length). The trace is teacher-forced on that output, so an early exit that
    changes a token does not change what follows (helios.replay's fidelity caveat applies);
  * decode step time = the calibrated linear cost model applied to the step's work counters, exactly the counters
    `Replayer.batch_features` / `costmodel.simulate_features` rebuild for one step of a compacted batch: steps = 1,
    step_rows = B, layer_calls = the deepest row's exit, layer_rows = sum of exits, attention_row_positions = sum of
    exit x the step's longest context (the engine's dense K/V slots mask a shorter row's extra keys, they are
    not skipped, so every active row reads the longest context of the running set), head and
    decision calls/rows, K/V propagation calls/rows and compactions per exit point;
  * prefill time = the cost model's prefill features of the admitted prompts in one call: with `pad_prefill`
    (default, what today's engine does: a batch is padded to its longest prompt) rows x longest, else the sum of
    the prompts (a variable-length prefill). A recomputed sequence's prefill runs over prompt + generated tokens;
  * switch time = the trace's load rate (seconds per resident weight byte, trace meta `load_timings`, as
    envs.backends.ReplayBackend prices it) x the new arm's weight bytes; free when (candidate, depth) is unchanged.

Speed. The model is linear, so a step's price splits into per-row terms (every *_rows counter and the attention
positions, whose context length is fixed by the row's request and position) and per-call terms (steps, and
*_calls counters that depend only on the deepest exit and on which exit points some row left at). Both are
tabulated once per (candidate, depth, exit setting) over every trace row with numpy; a decode step is then one
table lookup per running row plus two per step, in plain Python (faster than numpy calls at serving batch sizes).

Arms are duck-typed: anything with `candidate`, `depth` and `exit_config` (envs.backends.Arm, or a `ReplayArm`).
No torch here; the `Replayer`s passed in were built by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from helios.scheduler import MemoryBudget, SequenceRequest, SequenceState

if TYPE_CHECKING:
    from helios.replay import Replayer

# Counters tabulated below; a cost model with a non-zero coefficient on anything else is refused rather than
# silently priced at zero (the feature list may grow).
_PER_CALL = ("steps", "layer_calls", "head_calls", "decision_head_calls", "decision_cosine_calls", "compactions",
             "propagate_calls", "exit_head_calls")
_PER_ROW = ("step_rows", "layer_rows", "attention_row_positions", "head_rows", "decision_head_rows",
            "decision_cosine_rows", "propagate_rows", "exit_head_rows")
_PREFILL = ("prefill_calls", "prefill_token_layers", "prefill_attention")
_MAX_TABULATED_POINTS = 16  # leave-cost table over subsets of exit points: 2**points entries


@dataclasses.dataclass(frozen=True)
class ReplayArm:
    """A minimal arm for the replay executor (envs.backends.Arm works as well)."""

    candidate: str
    depth: int
    exit_config: Any  # helios.engine.ExitConfig


@dataclasses.dataclass
class _Candidate:
    """One candidate's trace, reordered request by request and position by position."""

    replayer: Replayer
    order: np.ndarray  # reordered row -> trace row
    offset: dict[int, int]  # trace request id -> first reordered row
    rows: dict[int, int]  # trace request id -> tokens recorded
    prompt_len: dict[int, int]
    end: dict[int, tuple[int, str]]  # tokens until the sequence ends in the trace, and why ("eos" | "trace_end")
    context: np.ndarray  # float64 per reordered row: prompt_len + position (the K/V positions a decode attends to)
    load_s_per_byte: float


@dataclasses.dataclass
class _Tables:
    """Per (candidate, depth, exit setting): the decode price split into per-row and per-call lookups."""

    depth: int
    row_cost: list[float]  # per reordered row: its per-row share of a decode step (seconds)
    row_exit: list[int]  # exit layer of the row's token
    row_context: list[float]  # K/V positions the row's query reads on its own (prompt + position)
    attention_s: float  # seconds per attention row-position
    row_bits: list[int]  # bit k set when the row leaves at the k-th exit point
    tokens: list[int]
    call_cost: list[float]  # by the step's deepest exit layer 0..depth: steps + layer/head/decision calls
    leave_cost: list[float] | None  # by subset (bitmask) of exit points some row left at: compactions, propagations
    leave_point_cost: list[float]  # per exit point, when there are too many points to tabulate subsets
    prefill_call_s: float
    prefill_token_s: float  # per prompt token (x depth layers folded in)
    prefill_attention_s: float  # per squared prompt token


class ReplayExecutor:
    """helios.scheduler.StepExecutor priced by traces and their cost models (module docstring)."""

    def __init__(
        self,
        replayers: Mapping[str, Replayer],
        arm: Any,
        *,
        load_s_per_byte: Mapping[str, float] | None = None,
        stop_at_eos: bool = True,
        pad_prefill: bool = True,
        record_tokens: bool = False,
    ) -> None:
        self.stop_at_eos = stop_at_eos
        self.pad_prefill = pad_prefill
        self.record_tokens = record_tokens
        self._candidates = {name: self._index(name, r, (load_s_per_byte or {}).get(name))
                            for name, r in replayers.items()}
        self._tables_cache: dict[tuple, _Tables] = {}
        self._live: dict[int, SequenceState] = {}  # id() -> sequence, for those holding K/V here
        self.arm = arm
        self._cand = self._candidates[arm.candidate]
        self._tables = self._arm_tables(arm)

    # -- construction

    def _index(self, name: str, replayer: Replayer, rate: float | None) -> _Candidate:
        trace = replayer.trace
        rids = sorted(replayer.request_rows)
        order = np.concatenate([replayer.request_rows[r] for r in rids])
        offset, rows, prompt_len, end = {}, {}, {}, {}
        eos = np.array(trace.meta.get("eos_ids") or [], dtype=np.int64)
        start = 0
        for rid in rids:
            trace_rows = replayer.request_rows[rid]
            n = len(trace_rows)
            offset[rid], rows[rid] = start, n
            prompt_len[rid] = int(trace.prompt_len[trace_rows[0]])
            hits = np.flatnonzero(np.isin(trace.full_token[trace_rows], eos)) if self.stop_at_eos else []
            end[rid] = (int(hits[0]) + 1, "eos") if len(hits) else (n, "trace_end")
            start += n
        context = (trace.prompt_len[order] + trace.position[order]).astype(np.float64)
        if rate is None:
            timings = trace.meta.get("load_timings") or []
            if timings:
                rate = sum(t["load_s"] for t in timings) / max(sum(t["weight_bytes"] for t in timings), 1)
            else:
                rate = math.nan  # no recorded load: a switch that needs a load raises (pass load_s_per_byte)
        return _Candidate(replayer, order, offset, rows, prompt_len, end, context, float(rate))

    def _arm_tables(self, arm: Any) -> _Tables:
        config = arm.exit_config
        key = (arm.candidate, arm.depth, config.criterion, config.threshold, tuple(config.exit_points))
        if key not in self._tables_cache:
            self._tables_cache[key] = self._tabulate(arm)
        return self._tables_cache[key]

    def _tabulate(self, arm: Any) -> _Tables:
        from helios.replay import Setting  # the Replayer exists, so its imports are already paid for

        cand = self._candidates[arm.candidate]
        replayer, depth, config = cand.replayer, int(arm.depth), arm.exit_config
        replayer.validate(Setting(depth, config, 1))
        exit_all, tokens_all = replayer.exits(Setting(depth, config, 1))
        e = exit_all[cand.order].astype(np.int64)
        cost = replayer.cost
        dc, pc = cost.decode_s_per_unit, cost.prefill_s_per_unit
        unknown = {k for k, v in dc.items() if v and k not in (*_PER_CALL, *_PER_ROW)}
        unknown |= {k for k, v in pc.items() if v and k not in _PREFILL}
        if unknown:
            raise ValueError(f"the cost model of {arm.candidate!r} prices counters {sorted(unknown)} that the replay "
                             "executor does not rebuild; extend helios/replay_executor.py")
        c = lambda name: float(dc.get(name, 0.0))  # noqa: E731
        points = sorted(p for p in config.exit_points if p < depth) if config.enabled else []
        kind = "cosine" if config.criterion == "cosine" else "head"  # as Replayer.batch_features

        # Per-row share (every *_rows counter); attention is priced per step (exits x the longest context).
        row = c("step_rows") + c("layer_rows") * e
        row = row + c("head_rows") * (e >= depth)
        bits = np.zeros(len(e), dtype=np.int64)
        leave_point_cost = []
        for k, p in enumerate(points):
            leave = e == p
            row = row + c(f"decision_{kind}_rows") * (e >= p) + c("propagate_rows") * (depth - p) * leave
            if kind == "cosine":
                row = row + c("exit_head_rows") * leave
            bits |= leave.astype(np.int64) << k
            leave_point_cost.append(c("compactions") + c("propagate_calls") * (depth - p)
                                    + (c("exit_head_calls") if kind == "cosine" else 0.0))
        # Per-call share: a function of the deepest exit m of the step ...
        m = np.arange(depth + 1)
        call = c("steps") + c("layer_calls") * m + c("head_calls") * (m >= depth)
        for p in points:
            call = call + c(f"decision_{kind}_calls") * (m >= p)
        # ... plus, for each exit point some row left at, one compaction and the propagation calls below it.
        leave_cost = None
        if len(points) <= _MAX_TABULATED_POINTS:
            masks = np.arange(1 << len(points))
            leave_cost = np.zeros(len(masks))
            for k, value in enumerate(leave_point_cost):
                leave_cost += value * ((masks >> k) & 1)
            leave_cost = leave_cost.tolist()
        return _Tables(
            depth=depth, row_cost=np.asarray(row, dtype=np.float64).tolist(), row_exit=e.tolist(),
            row_context=cand.context.tolist(), attention_s=c("attention_row_positions"),
            row_bits=bits.tolist(), tokens=tokens_all[cand.order].tolist(), call_cost=call.tolist(),
            leave_cost=leave_cost, leave_point_cost=leave_point_cost,
            prefill_call_s=float(pc.get("prefill_calls", 0.0)),
            prefill_token_s=float(pc.get("prefill_token_layers", 0.0)) * depth,
            prefill_attention_s=float(pc.get("prefill_attention", 0.0)) * depth,
        )

    # -- helpers for the caller

    def request(self, request_id: Hashable, trace_request_id: int, arrival_s: float, max_tokens: int) -> SequenceRequest:
        """A scheduler request for trace request `trace_request_id`, its prompt length under the current arm."""
        return SequenceRequest(request_id, float(arrival_s), self._cand.prompt_len[int(trace_request_id)],
                               int(max_tokens), int(trace_request_id))

    def prompt_tokens(self, request: SequenceRequest) -> int:
        """Prompt length of `request` under the current arm's candidate (tokenizers differ between candidates)."""
        return self._cand.prompt_len[int(request.payload)]

    def budget(self, arm: Any, memory_budget_bytes: int, max_sequences: int | None = None) -> MemoryBudget:
        """`arm`'s memory: resident weights at its depth, K/V bytes per token over its depth (from the trace)."""
        replayer = self._candidates[arm.candidate].replayer
        return MemoryBudget(memory_budget_bytes, replayer.weight_bytes_by_depth[int(arm.depth)],
                            replayer.kv_bytes_per_token_layer * int(arm.depth), max_sequences)

    def load_s(self, arm: Any) -> float:
        cand = self._candidates[arm.candidate]
        return cand.load_s_per_byte * cand.replayer.weight_bytes_by_depth[int(arm.depth)]

    # -- StepExecutor

    def prefill(self, seqs: list[SequenceState]) -> float:
        cand, t = self._cand, self._tables
        depth, live = t.depth, self._live
        total = squares = longest = 0
        for seq in seqs:
            rid = seq.request.payload
            if seq.prompt_tokens != cand.prompt_len[rid]:
                raise ValueError(f"request {seq.request.request_id!r} has {seq.prompt_tokens} prompt tokens; trace "
                                 f"request {rid} of {self.arm.candidate!r} has {cand.prompt_len[rid]}")
            end, reason = cand.end[rid]
            if reason == "trace_end" and seq.max_tokens <= end:
                end = seq.max_tokens + 1  # max_tokens comes first: the scheduler ends it, reason "length"
            n = seq.output_tokens
            context = seq.prompt_tokens + n
            total += context
            squares += context * context
            longest = max(longest, context)
            seq.exit_layers.append(depth)  # a prefill's token comes from the full loaded depth
            if self.record_tokens:
                seq.token_ids.append(t.tokens[cand.offset[rid] + n] if n < cand.rows[rid] else -1)
            if n + 1 >= end:
                seq.finished, seq.finish_reason = True, reason
            # [first row, index of the last token, why it ends, tables, tokens whose exit layers are recorded]
            seq.state = [cand.offset[rid], end - 1, reason, t, n + 1]
            live[id(seq)] = seq
        if self.pad_prefill:
            total, squares = len(seqs) * longest, len(seqs) * longest * longest
        return t.prefill_call_s + t.prefill_token_s * total + t.prefill_attention_s * squares

    def decode(self, seqs: list[SequenceState]) -> float:
        # The hot loop of replay: lookups only. Exit layers are copied out of the tables in one slice per sequence
        # when it retires or the arm changes (_flush), not appended per step.
        t = self._tables
        row_cost, row_exit, row_bits, row_context = t.row_cost, t.row_exit, t.row_bits, t.row_context
        seconds = 0.0
        deepest = bits = exits = 0
        longest = 0.0
        for seq in seqs:
            state = seq.state
            n = seq.output_tokens
            r = state[0] + n
            seconds += row_cost[r]
            e = row_exit[r]
            exits += e
            if row_context[r] > longest:
                longest = row_context[r]
            if e > deepest:
                deepest = e
            bits |= row_bits[r]
            if n >= state[1]:
                seq.finished = True
                seq.finish_reason = state[2]
        seconds += t.attention_s * exits * longest
        if t.leave_cost is not None:
            return seconds + t.call_cost[deepest] + t.leave_cost[bits]
        return seconds + t.call_cost[deepest] + sum(c for k, c in enumerate(t.leave_point_cost) if bits >> k & 1)

    def _flush(self, seq: SequenceState) -> None:
        """Copy the exit layers (and tokens) of `seq`'s decoded tokens since the last flush out of the tables."""
        state = seq.state
        first, tables, done = state[0], state[3], state[4]
        n = seq.output_tokens
        if n > done:
            seq.exit_layers.extend(tables.row_exit[first + done : first + n])
            if self.record_tokens:
                seq.token_ids.extend(tables.tokens[first + done : first + n])
            state[4] = n

    def release(self, seq: SequenceState) -> None:
        self._flush(seq)
        self._live.pop(id(seq), None)

    def switch(self, arm: Any, preempted: list[SequenceState]) -> float:
        for seq in self._live.values():
            self._flush(seq)
        for seq in preempted:
            self._live.pop(id(seq), None)
        same_weights = (arm.candidate, int(arm.depth)) == (self.arm.candidate, int(self.arm.depth))
        if not same_weights and self._live:
            raise ValueError(f"{len(self._live)} sequences still hold K/V of {self.arm.candidate}@{self.arm.depth}; "
                             f"switching to {arm.candidate}@{arm.depth} needs 'drain' or 'recompute'")
        seconds = 0.0 if same_weights else self.load_s(arm)
        if math.isnan(seconds):
            raise ValueError(f"the trace of {arm.candidate!r} has no load timings: pass load_s_per_byte")
        self.arm = arm
        self._cand = self._candidates[arm.candidate]
        self._tables = self._arm_tables(arm)
        for seq in self._live.values():  # 'keep': the running continue on the new exit setting's tables
            seq.state[3] = self._tables
        return seconds
