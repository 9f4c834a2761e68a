"""The scheduler (helios.scheduler) on hand-computed schedules, and its replay executor against today's replay.

    python -m pytest -q tests/test_scheduler.py

The toy executor is a test double for the model side: prefill costs a fixed time per context token, a decode step
a fixed time per call plus per row, and each request's output length is fixed in advance (its "EOS"). Every
expected number below is worked out by hand in the comments, not computed by the code under test.
"""

from __future__ import annotations

import math
import random
import time

import pytest

from helios.scheduler import (
    MemoryBudget,
    RequestRecord,
    Scheduler,
    SequenceRequest,
    SequenceState,
    VirtualClock,
)

# Budget for the hand-computed schedules: 100 bytes of weights, 1 byte of K/V per token, 40 bytes free. Every request
# has a 10-token prompt and max_tokens 10, so it reserves (10 + 10) x 1 = 20 bytes: two fit at once.
BUDGET = MemoryBudget(memory_budget_bytes=140, weight_bytes=100, kv_bytes_per_token=1)


class ToyExecutor:
    """Prefill: 0.01 s per context token. Decode: `decode_s_per_call` + `decode_s_per_row` x rows. The exit layer of
    every token is the current arm's "depth" (so a record shows which arm produced each token). Output lengths are
    fixed per request id (the token at that count is "EOS")."""

    def __init__(self, lengths: dict, *, depth: int = 4, switch_s: float = 0.5, decode_s_per_call: float = 0.1,
                 decode_s_per_row: float = 0.0, budget_check: Scheduler | None = None) -> None:
        self.lengths = lengths
        self.depth = depth
        self.switch_s = switch_s
        self.decode_s_per_call = decode_s_per_call
        self.decode_s_per_row = decode_s_per_row
        self.scheduler: Scheduler | None = budget_check
        self.live: set = set()  # request ids holding K/V here
        self.released: list = []
        self.preempted: list = []
        self.calls: list[tuple[str, tuple]] = []
        self.max_resident = 0

    def _check_budget(self) -> None:
        """Independent of the scheduler's own bookkeeping: weights + (prompt + max_tokens) x kv for every sequence
        that holds K/V here, against the budget of the scheduler's current arm."""
        s = self.scheduler
        if s is None:
            return
        budget = s.budget
        seqs = [*s._running, *s._batch_done]
        resident = budget.weight_bytes + sum((q.prompt_tokens + q.max_tokens) * budget.kv_bytes_per_token for q in seqs)
        assert resident <= budget.memory_budget_bytes, (resident, budget)
        if budget.max_sequences is not None:
            assert len(seqs) <= budget.max_sequences
        self.max_resident = max(self.max_resident, resident)

    def _token(self, seq: SequenceState) -> None:
        seq.exit_layers.append(self.depth)
        if seq.output_tokens + 1 >= self.lengths[seq.request.request_id]:
            seq.finished, seq.finish_reason = True, "eos"

    def prefill(self, seqs: list[SequenceState]) -> float:
        self._check_budget()
        self.calls.append(("prefill", tuple(s.request.request_id for s in seqs)))
        for seq in seqs:
            assert seq.request.request_id not in self.live
            self.live.add(seq.request.request_id)
            self._token(seq)
        return 0.01 * sum(s.context_tokens for s in seqs)

    def decode(self, seqs: list[SequenceState]) -> float:
        self._check_budget()
        self.calls.append(("decode", tuple(s.request.request_id for s in seqs)))
        for seq in seqs:
            assert seq.request.request_id in self.live and not seq.finished
            self._token(seq)
        return self.decode_s_per_call + self.decode_s_per_row * len(seqs)

    def release(self, seq: SequenceState) -> None:
        self.live.remove(seq.request.request_id)
        self.released.append(seq.request.request_id)

    def switch(self, arm, preempted: list[SequenceState]) -> float:
        for seq in preempted:
            self.live.remove(seq.request.request_id)
        self.preempted += [s.request.request_id for s in preempted]
        self.depth = arm
        return self.switch_s


def toy_requests() -> tuple[list[SequenceRequest], dict]:
    """A, B, C arrive at 0 and D at 0.25 s; they produce 2, 5, 2 and 1 tokens."""
    arrivals = {"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.25}
    lengths = {"A": 2, "B": 5, "C": 2, "D": 1}
    return [SequenceRequest(r, t, 10, 10) for r, t in arrivals.items()], lengths


def by_id(records: list[RequestRecord]) -> dict:
    return {r.request_id: r for r in records}


def assert_record(record: RequestRecord, *, admitted: float, first: float, finished: float, tokens: int) -> None:
    arrival = record.arrival_s
    assert record.admitted_s == pytest.approx(admitted)
    assert record.first_token_s == pytest.approx(first)
    assert record.finished_s == pytest.approx(finished)
    assert record.queueing_delay_s == pytest.approx(admitted - arrival)
    assert record.ttft_s == pytest.approx(first - arrival)
    assert record.e2e_s == pytest.approx(finished - arrival)
    assert record.output_tokens == tokens == len(record.exit_layers)
    if tokens > 1:
        assert record.tpot_s == pytest.approx((finished - first) / (tokens - 1))
    else:
        assert math.isnan(record.tpot_s)


# ----------------------------------------------------------------------------------------------- hand-computed


def test_continuous_batching_schedule_by_hand() -> None:
    """t=0    admit A, B (C would need 60 > 40 bytes). Prefill 20 tokens: 0.2 s -> t=0.2, A=1, B=1 token.
              Decode A, B: 0.1 s -> t=0.3, A=2 (EOS, retires), B=2.
       t=0.3  D arrived at 0.25; queue C, D. Admit C (D does not fit). Prefill 10 tokens -> t=0.4, C=1.
              Decode B, C -> t=0.5: B=3, C=2 (retires).
       t=0.5  admit D; prefill -> t=0.6: D=1 (EOS, retires before the decode). Decode B -> t=0.7: B=4.
       t=0.7  decode B -> t=0.8: B=5 (retires)."""
    requests, lengths = toy_requests()
    executor = ToyExecutor(lengths)
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    executor.scheduler = scheduler
    assert scheduler.submit_many(requests) == [None] * 4
    records = scheduler.run_until(10.0)
    got = by_id(records)
    assert [r.request_id for r in records] == ["A", "C", "D", "B"]  # in finishing order
    assert_record(got["A"], admitted=0.0, first=0.2, finished=0.3, tokens=2)
    assert_record(got["B"], admitted=0.0, first=0.2, finished=0.8, tokens=5)
    assert_record(got["C"], admitted=0.3, first=0.4, finished=0.5, tokens=2)
    assert_record(got["D"], admitted=0.5, first=0.6, finished=0.6, tokens=1)
    assert got["B"].tpot_s == pytest.approx(0.15)
    assert got["D"].ttft_s == pytest.approx(0.35) and got["D"].finish_reason == "eos"
    assert executor.calls == [
        ("prefill", ("A", "B")), ("decode", ("A", "B")), ("prefill", ("C",)), ("decode", ("B", "C")),
        ("prefill", ("D",)), ("decode", ("B",)), ("decode", ("B",)),
    ]
    span = scheduler.span
    assert span.busy_s == pytest.approx(0.8) and span.prefill_s == pytest.approx(0.4)
    assert span.decode_s == pytest.approx(0.4) and span.output_tokens == 10 and span.prefill_tokens == 40
    assert span.max_running == 2 and span.max_resident_bytes == 140 and span.finished == 4
    # The virtual clock jumped over the idle tail to t_end: a span is a span of time.
    assert span.start_s == 0.0 and span.end_s == 10.0 and span.idle_s == pytest.approx(9.2)
    assert sorted(executor.released) == ["A", "B", "C", "D"] and scheduler.idle and scheduler.reserved_bytes == 0


def test_static_batching_schedule_by_hand() -> None:
    """Static: a batch runs until its longest member finishes; members are returned at the batch's end.
       t=0    batch A, B; prefill 0.2 -> 0.2; decode -> 0.3 (A done, B=2); B alone: 0.4, 0.5, 0.6 (B=5). Batch ends 0.6.
       t=0.6  batch C, D; prefill 20 tokens -> 0.8 (C=1, D=1 done); decode C -> 0.9 (C=2). Batch ends 0.9."""
    requests, lengths = toy_requests()
    executor = ToyExecutor(lengths)
    scheduler = Scheduler(executor, BUDGET, VirtualClock(), mode="static")
    executor.scheduler = scheduler
    scheduler.submit_many(requests)
    got = by_id(scheduler.run_until(math.inf))
    assert_record(got["A"], admitted=0.0, first=0.2, finished=0.6, tokens=2)
    assert_record(got["B"], admitted=0.0, first=0.2, finished=0.6, tokens=5)
    assert_record(got["C"], admitted=0.6, first=0.8, finished=0.9, tokens=2)
    assert_record(got["D"], admitted=0.6, first=0.8, finished=0.9, tokens=1)
    assert scheduler.span.end_s == pytest.approx(0.9)  # infinite t_end: returns when nothing is left
    # Continuous batching (previous test) gave mean e2e (0.3 + 0.8 + 0.5 + 0.35) / 4 = 0.4875 s; static gives
    # (0.6 + 0.6 + 0.9 + 0.65) / 4 = 0.6875 s.
    assert sum(r.e2e_s for r in got.values()) / 4 == pytest.approx(0.6875)


def test_max_tokens_ends_a_sequence_with_reason_length() -> None:
    executor = ToyExecutor({"x": 100})
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    scheduler.submit(SequenceRequest("x", 0.0, 10, 3))
    (record,) = scheduler.run_until(math.inf)
    # prefill 0.1 s (token 1), two decodes of 0.1 s (tokens 2, 3): done at 0.3 s
    assert_record(record, admitted=0.0, first=0.1, finished=0.3, tokens=3)
    assert record.finish_reason == "length"


# ----------------------------------------------------------------------------------------------- budget, FIFO, rejection


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("seed", range(5))
def test_memory_budget_is_never_exceeded(mode: str, seed: int) -> None:
    """Random arrivals, prompt and output lengths; the executor checks resident bytes at every prefill and decode."""
    rng = random.Random(seed)
    budget = MemoryBudget(memory_budget_bytes=10_000, weight_bytes=4_000, kv_bytes_per_token=8,
                          max_sequences=rng.choice([None, 3, 6]))
    requests, lengths = [], {}
    t = 0.0
    for i in range(60):
        t += rng.expovariate(4.0)
        prompt, max_tokens = rng.randint(1, 400), rng.randint(1, 300)
        requests.append(SequenceRequest(i, t, prompt, max_tokens))
        lengths[i] = rng.randint(1, max_tokens + 5)
    executor = ToyExecutor(lengths, decode_s_per_call=0.02, decode_s_per_row=0.005)
    scheduler = Scheduler(executor, budget, VirtualClock(), mode=mode)
    executor.scheduler = scheduler
    reasons = scheduler.submit_many(requests)
    # (prompt + max_tokens) x 8 > 6000 free bytes, i.e. more than 750 tokens: never fits, rejected up front
    too_big = {r.request_id for r in requests if r.prompt_tokens + r.max_tokens > 750}
    assert {r.request_id for r, why in zip(requests, reasons) if why} == too_big
    records = []
    for span_end in range(1, 1000):  # one-second spans until everything is done
        records += scheduler.run_until(float(span_end))
        assert scheduler.resident_bytes <= budget.memory_budget_bytes
        if scheduler.idle:
            break
    assert len(executor.calls) > 50 and executor.max_resident > budget.weight_bytes
    assert sorted(r.request_id for r in records) == sorted(set(range(60)) - too_big)
    for r in records:
        assert r.output_tokens == min(lengths[r.request_id], next(q.max_tokens for q in requests if q.request_id == r.request_id))


def test_admission_is_fifo_without_skipping_ahead() -> None:
    """big (reserves 30 of 40 free bytes) waits behind `first`; `small` (11 bytes: fits beside `first`) must not
    overtake it.
       t=0   admit first (20 B). big needs 30 > 20 free: stop; small is not looked at. prefill 0.1 -> 0.1; decode -> 0.2
             (first=2, EOS). t=0.2: admit big (30 B); small needs 11 > 10: wait."""
    executor = ToyExecutor({"first": 2, "big": 2, "small": 2})
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    scheduler.submit(SequenceRequest("first", 0.0, 10, 10))
    scheduler.submit(SequenceRequest("big", 0.0, 20, 10))
    scheduler.submit(SequenceRequest("small", 0.0, 6, 5))
    got = by_id(scheduler.run_until(math.inf))
    admitted = [rid for kind, ids in executor.calls if kind == "prefill" for rid in ids]
    assert admitted == ["first", "big", "small"]
    assert got["big"].admitted_s == pytest.approx(0.2)  # first's prefill (0.1) + one decode (0.1)
    # big: prefill 20 tokens 0.2 -> 0.4, decode -> 0.5 (done); small then: admitted at 0.5
    assert got["small"].admitted_s == pytest.approx(0.5)


def test_prefill_token_cap_splits_a_burst_into_several_prefills() -> None:
    """max_prefill_tokens=25 (padded: count x longest context), memory for all: a, b (10-token prompts), c (30),
    d (10), all at t=0, each 2 tokens long.
       t=0    admit a (1 x 10 = 10), b (2 x 10 = 20 <= 25); c would make 3 x 30 = 90 > 25: stop. prefill 20 tokens
              0.2 -> 0.2; decode (a, b: second token, EOS) 0.1 -> 0.3.
       t=0.3  admit c alone (30 > 25, but the head always goes in); d would make 2 x 30 = 60: stop. prefill 0.3 -> 0.6;
              decode c -> 0.7.
       t=0.7  admit d. prefill 0.1 -> 0.8, decode -> 0.9.
    Static batching ignores the cap: all four in one prefill."""
    budget = MemoryBudget(memory_budget_bytes=1000, weight_bytes=100, kv_bytes_per_token=1, max_prefill_tokens=25)
    lengths = {"a": 2, "b": 2, "c": 2, "d": 2}
    executor = ToyExecutor(lengths)
    scheduler = Scheduler(executor, budget, VirtualClock())
    for rid, prompt in (("a", 10), ("b", 10), ("c", 30), ("d", 10)):
        scheduler.submit(SequenceRequest(rid, 0.0, prompt, 10))
    got = by_id(scheduler.run_until(math.inf))
    assert [ids for kind, ids in executor.calls if kind == "prefill"] == [("a", "b"), ("c",), ("d",)]
    assert got["c"].admitted_s == pytest.approx(0.3) and got["d"].admitted_s == pytest.approx(0.7)
    assert got["d"].finished_s == pytest.approx(0.9)
    static = ToyExecutor(lengths)
    scheduler = Scheduler(static, budget, VirtualClock(), mode="static")
    for rid, prompt in (("a", 10), ("b", 10), ("c", 30), ("d", 10)):
        scheduler.submit(SequenceRequest(rid, 0.0, prompt, 10))
    scheduler.run_until(math.inf)
    assert [ids for kind, ids in static.calls if kind == "prefill"] == [("a", "b", "c", "d")]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        MemoryBudget(memory_budget_bytes=1000, weight_bytes=100, kv_bytes_per_token=1, max_prefill_tokens=0)


def test_a_request_that_can_never_fit_is_rejected_with_a_reason() -> None:
    executor = ToyExecutor({"huge": 1, "ok": 1})
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    reason = scheduler.submit(SequenceRequest("huge", 0.0, 30, 20))  # 50 bytes of K/V > 40 free
    assert reason is not None and "50 bytes" in reason and "40 bytes are free" in reason
    assert scheduler.submit(SequenceRequest("ok", 0.0, 10, 10)) is None
    records = scheduler.run_until(1.0)
    assert [r.request_id for r in records] == ["ok"]
    assert [r.request_id for r in scheduler.rejected] == ["huge"] and scheduler.rejected[0].reason == reason
    assert [r.request_id for r in scheduler.span.rejections] == ["huge"]  # reported in the next span's counters
    assert scheduler.queue_len == 0 and scheduler.idle


# ----------------------------------------------------------------------------------------------- spans and clocks


def test_queue_and_running_set_persist_across_spans() -> None:
    """The schedule of test_continuous_batching_schedule_by_hand, cut into spans. The iteration that starts at 0.3
    (prefill C, decode B, C) ends at 0.5, past 0.35: a step is atomic, so that span ends at 0.5."""
    requests, lengths = toy_requests()
    scheduler = Scheduler(ToyExecutor(lengths), BUDGET, VirtualClock())
    scheduler.submit_many(requests)
    first = scheduler.run_until(0.25)
    assert [r.request_id for r in first] == ["A"] and scheduler.span.end_s == pytest.approx(0.3)
    assert scheduler.running == 1 and scheduler.queue_len == 2  # B running; C and D (arrived 0.25) queued
    assert [seq.request.request_id for seq in scheduler.in_system()] == ["C", "D", "B"]  # queued first, then running
    second = scheduler.run_until(0.35)
    assert [r.request_id for r in second] == ["C"] and scheduler.span.end_s == pytest.approx(0.5)
    assert scheduler.span.busy_s == pytest.approx(0.2) and scheduler.queue_len == 1
    third = scheduler.run_until(5.0)
    assert [r.request_id for r in third] == ["D", "B"]
    assert by_id(third)["B"].finished_s == pytest.approx(0.8)  # the same timeline as one long span


def test_idle_time_is_skipped_on_a_virtual_clock() -> None:
    """200 requests one hour apart: 200 h of virtual time in a fraction of a second of wall time."""
    lengths = {i: 3 for i in range(200)}
    scheduler = Scheduler(ToyExecutor(lengths), BUDGET, VirtualClock())
    scheduler.submit_many(SequenceRequest(i, 3600.0 * i, 10, 10) for i in range(200))
    start = time.perf_counter()
    records = scheduler.run_until(math.inf)
    assert time.perf_counter() - start < 0.5
    assert len(records) == 200
    # each alone: prefill 0.1 + 2 decodes 0.2 = 0.3 s, no queueing
    assert all(r.e2e_s == pytest.approx(0.3) and r.queueing_delay_s == 0.0 for r in records)
    assert records[-1].finished_s == pytest.approx(3600.0 * 199 + 0.3)


def test_wall_clock_serves_a_request_submitted_while_idle() -> None:
    """The server's case: the scheduler idles on the wall clock in its thread; a submit from another thread wakes it.
    The toy's seconds are not slept (a wall clock ignores them), so the request is served within milliseconds."""
    import threading

    from helios.scheduler import WallClock

    clock = WallClock()
    scheduler = Scheduler(ToyExecutor({"late": 3}), BUDGET, clock)
    t_end = clock.now() + 0.6
    out: list[RequestRecord] = []
    worker = threading.Thread(target=lambda: out.extend(scheduler.run_until(t_end)))
    worker.start()
    time.sleep(0.1)
    submitted = clock.now()
    scheduler.submit(SequenceRequest("late", submitted, 10, 10))
    worker.join(timeout=5)
    assert not worker.is_alive() and [r.request_id for r in out] == ["late"]
    assert out[0].finished_s - submitted < 0.2 and out[0].output_tokens == 3
    assert clock.now() >= t_end - 1e-3  # then idled (slept) to the span's end
    # busy time sums the executor's seconds even though the wall clock did not advance by them
    assert scheduler.span.busy_s == pytest.approx(0.1 + 0.2)


def test_scheduler_and_replay_executor_import_without_torch() -> None:
    """Replay must stay torch-free: importing the scheduler and its replay executor pulls in no torch."""
    import subprocess
    import sys

    code = "import sys, helios.scheduler, helios.replay_executor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------- switching under load


def _loaded_scheduler() -> tuple[Scheduler, ToyExecutor]:
    """The hand-computed schedule, stopped after its first iteration (t=0.3): A done, B running with 2 tokens of
    arm 4, C and D queued."""
    requests, lengths = toy_requests()
    executor = ToyExecutor(lengths, depth=4, switch_s=0.5)
    scheduler = Scheduler(executor, BUDGET, VirtualClock(), arm=4)
    executor.scheduler = scheduler
    scheduler.submit_many(requests)
    assert [r.request_id for r in scheduler.run_until(0.25)] == ["A"]
    return scheduler, executor


def test_switch_under_load_with_drain_loses_nothing_and_charges_the_switch() -> None:
    """t=0.3  drain: nothing admitted; decode B -> 0.4 (3), 0.5 (4), 0.6 (5, retires).
       t=0.6  switch: 0.5 s -> 1.1. Admit C, D; prefill 20 tokens -> 1.3 (C=1, D=1 retires); decode C -> 1.4."""
    scheduler, executor = _loaded_scheduler()
    scheduler.switch_arm(2, BUDGET, policy="drain")
    got = by_id(scheduler.run_until(math.inf))
    assert sorted(got) == ["B", "C", "D"] and not scheduler.rejected and scheduler.idle
    assert_record(got["B"], admitted=0.0, first=0.2, finished=0.6, tokens=5)
    assert got["B"].exit_layers == (4, 4, 4, 4, 4)  # finished on the old arm
    assert_record(got["C"], admitted=1.1, first=1.3, finished=1.4, tokens=2)
    assert_record(got["D"], admitted=1.1, first=1.3, finished=1.3, tokens=1)
    assert got["C"].exit_layers == (2, 2)
    span = scheduler.span
    assert span.switches == 1 and span.switch_s == pytest.approx(0.5)
    assert span.busy_s == pytest.approx(1.1) == span.end_s - span.start_s  # 0.3 decode + 0.5 switch + 0.3
    assert executor.preempted == [] and scheduler.arm == 2


def test_switch_under_load_with_recompute_loses_nothing_and_charges_the_switch() -> None:
    """t=0.3  switch now: B preempted (2 tokens kept), back to the queue head: B, C, D. 0.5 s -> 0.8.
              Admit B, C; prefill B over 10 + 2 tokens and C over 10: 0.22 s -> 1.02 (B=3, C=1). Decode -> 1.12
              (B=4, C=2 retires).
       t=1.12 admit D; prefill 0.1 -> 1.22 (D=1 retires); decode B -> 1.32 (B=5 retires)."""
    scheduler, executor = _loaded_scheduler()
    scheduler.switch_arm(2, BUDGET, policy="recompute")
    got = by_id(scheduler.run_until(math.inf))
    assert sorted(got) == ["B", "C", "D"] and not scheduler.rejected and scheduler.idle
    assert_record(got["B"], admitted=0.0, first=0.2, finished=1.32, tokens=5)  # TTFT is the original first token
    assert got["B"].exit_layers == (4, 4, 2, 2, 2) and got["B"].recomputes == 1
    assert_record(got["C"], admitted=0.8, first=1.02, finished=1.12, tokens=2)
    assert_record(got["D"], admitted=1.12, first=1.22, finished=1.22, tokens=1)
    assert executor.preempted == ["B"]
    span = scheduler.span
    assert span.switches == 1 and span.switch_s == pytest.approx(0.5) and span.recomputed == 1
    assert span.prefill_tokens == 12 + 10 + 10
    assert span.busy_s == pytest.approx(1.02) == span.end_s - span.start_s


def test_recompute_falls_back_to_drain_when_a_sequence_cannot_come_back() -> None:
    """The new arm has 15 bytes free: B (20 bytes) could never be re-admitted, so it finishes on the old arm; C and
    D (20 bytes each) can never fit either and are rejected with the reason instead of blocking the queue."""
    scheduler, executor = _loaded_scheduler()
    small = MemoryBudget(memory_budget_bytes=115, weight_bytes=100, kv_bytes_per_token=1)
    scheduler.switch_arm(2, small, policy="recompute")
    got = by_id(scheduler.run_until(math.inf))
    assert sorted(got) == ["B"] and got["B"].exit_layers == (4,) * 5 and executor.preempted == []
    assert sorted(r.request_id for r in scheduler.rejected) == ["C", "D"]
    assert all("after switching to 2" in r.reason for r in scheduler.rejected)


def test_switch_with_keep_continues_in_flight_sequences() -> None:
    """Exit-setting change: B continues without re-prefill. t=0.3 switch 0.5 -> 0.8; admit C; prefill -> 0.9; decode
    B, C -> 1.0 (B=3, C=2 retires); admit D; prefill -> 1.1 (D retires); decode B -> 1.2, 1.3 (B=5)."""
    scheduler, executor = _loaded_scheduler()
    scheduler.switch_arm(2, BUDGET, policy="keep")
    got = by_id(scheduler.run_until(math.inf))
    assert got["B"].exit_layers == (4, 4, 2, 2, 2) and got["B"].recomputes == 0 and executor.preempted == []
    assert got["B"].finished_s == pytest.approx(1.3) and got["D"].finished_s == pytest.approx(1.1)
    with pytest.raises(ValueError, match="same weights"):
        scheduler.switch_arm(3, MemoryBudget(200, 120, 1), policy="keep")


# ----------------------------------------------------------------------------------------------- replay executor

NEW_TOKENS = 8
PROMPT_TOKENS = 12
EXIT_SETTINGS = [
    ("none", (), 0.9),
    ("max_prob", (2, 4), 0.05),
    ("cosine", (1, 3, 5), 0.6),
    ("margin", (3,), 0.02),
]


@pytest.fixture(scope="module")
def lockstep_replayer():
    """A trace of tiny-llama on 4 prompts of exactly PROMPT_TOKENS tokens (so that today's padded batch pricing and
    the scheduler's per-row pricing see the same prompts), recorded with helios.profiling in-process (~2 s)."""
    import torch

    from helios.energy import make_meter
    from helios.engine import EarlyExitEngine
    from helios.profiling import record_trace
    from helios.replay import Replayer
    from tests.conftest import load_cached

    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(PROMPT_TOKENS)] for _ in range(4)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace = record_trace(engine, prompts, ["qa", "code", "qa", "code"], new_tokens=NEW_TOKENS, batch_size=4,
                             calibration_engines=[engine], meter=make_meter("model"), model_power_w=6.0,
                             progress=False, calibration_runs=4)
    finally:
        torch.set_num_threads(before)
    trace.meta["load_timings"] = [{"depth": 6, "weight_bytes": trace.meta["weight_bytes_by_depth"]["6"], "load_s": 0.25}]
    return Replayer(trace)


def _exit_config(criterion: str, points: tuple, threshold: float):
    from helios.engine import ExitConfig

    return ExitConfig(criterion, threshold, points) if criterion != "none" else ExitConfig()


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("batch", [4, 2])
@pytest.mark.parametrize("setting", EXIT_SETTINGS, ids=[s[0] for s in EXIT_SETTINGS])
def test_replay_executor_in_lockstep_equals_todays_batch_replay(lockstep_replayer, setting, batch, mode) -> None:
    """Same arrival, same prompt and output lengths: continuous batching runs the same batches as today's replay
    (helios.replay.Replayer.run), so busy time, TTFT, e2e and exit layers must agree. With batch 2 the budget (not a
    sequence cap) holds two sequences: weights + 2 x (12 + 8) tokens x K/V per token."""
    from helios.replay import Setting
    from helios.replay_executor import ReplayArm, ReplayExecutor

    replayer = lockstep_replayer
    config = _exit_config(*setting)
    arm = ReplayArm("tiny-llama", 6, config)
    executor = ReplayExecutor({"tiny-llama": replayer}, arm, stop_at_eos=False)
    kv_per_token = replayer.kv_bytes_per_token_layer * 6
    budget_bytes = replayer.weight_bytes_by_depth[6] + batch * (PROMPT_TOKENS + NEW_TOKENS) * kv_per_token
    budget = executor.budget(arm, budget_bytes)
    assert budget.kv_bytes_per_token == kv_per_token
    scheduler = Scheduler(executor, budget, VirtualClock(), arm=arm, mode=mode)
    ids = replayer.trace.requests()
    scheduler.submit_many(executor.request(f"r{i}", i, 0.0, NEW_TOKENS) for i in ids)
    records = sorted(scheduler.run_until(math.inf), key=lambda r: r.request_id)
    want = replayer.run(ids, Setting(6, config, batch), new_tokens=NEW_TOKENS)
    assert scheduler.span.max_running == batch
    assert scheduler.span.busy_s == pytest.approx(want.busy_s, rel=1e-9)
    assert scheduler.span.prefill_s == pytest.approx(sum(want.prefill_s), rel=1e-9)
    assert [r.ttft_s for r in records] == pytest.approx(want.ttft_s, rel=1e-9)
    assert [r.e2e_s for r in records] == pytest.approx(want.e2e_s, rel=1e-9)
    assert [list(r.exit_layers) for r in records] == want.exit_layers
    assert all(r.output_tokens == NEW_TOKENS and r.finish_reason == "length" for r in records)


def _step_features(exits: list[int], contexts: list[int], depth: int, config) -> dict[str, float]:
    """One decode step's work counters, written out like costmodel.simulate_features' inner loop, for rows at
    different positions: every active row's attention reads the step's longest context (the engine's dense K/V
    slots mask a shorter row's extra keys; they are not skipped)."""
    from helios.costmodel import DECODE_FEATURES

    f = dict.fromkeys(DECODE_FEATURES, 0.0)
    f["steps"], f["step_rows"] = 1.0, float(len(exits))
    for layer in range(1, depth + 1):
        active = [c for e, c in zip(exits, contexts) if e >= layer]
        if active:
            f["layer_calls"] += 1
            f["layer_rows"] += len(active)
            f["attention_row_positions"] += len(active) * max(contexts)
    kind = "cosine" if config.criterion == "cosine" else "head"
    for point in (sorted(p for p in config.exit_points if p < depth) if config.enabled else []):
        reach = sum(1 for e in exits if e >= point)
        if reach:
            f[f"decision_{kind}_calls"] += 1
            f[f"decision_{kind}_rows"] += reach
        leaving = sum(1 for e in exits if e == point)
        if leaving:
            f["compactions"] += 1
            f["propagate_calls"] += depth - point
            f["propagate_rows"] += leaving * (depth - point)
            if kind == "cosine":
                f["exit_head_calls"] += 1
                f["exit_head_rows"] += leaving
    finals = sum(1 for e in exits if e >= depth)
    if finals:
        f["head_calls"] += 1
        f["head_rows"] += finals
    return f


@pytest.mark.parametrize("setting", EXIT_SETTINGS[1:], ids=[s[0] for s in EXIT_SETTINGS[1:]])
def test_replay_executor_prices_staggered_rows_by_the_longest_context(lockstep_replayer, setting) -> None:
    """Staggered arrivals and output lengths: every decode step mixes rows at different positions. Each call's price
    must equal the cost model applied to that step's counters (written out above), and the span's busy time their
    sum."""
    from helios.replay import Setting
    from helios.replay_executor import ReplayArm, ReplayExecutor

    replayer = lockstep_replayer
    config = _exit_config(*setting)
    arm = ReplayArm("tiny-llama", 6, config)
    executor = ReplayExecutor({"tiny-llama": replayer}, arm, stop_at_eos=False)
    expected: list[float] = []
    inner_decode, inner_prefill = executor.decode, executor.prefill

    exit_layer, _ = replayer.exits(Setting(6, config, 1))  # today's replay: the exit layer of every trace row
    mixed: list[bool] = []  # a step with rows at different context lengths
    early: list[bool] = []  # a step where some row exited early

    def decode(seqs):
        contexts = [s.context_tokens for s in seqs]
        exits = [int(exit_layer[replayer.request_rows[s.request.payload][s.output_tokens]]) for s in seqs]
        seconds = inner_decode(seqs)
        mixed.append(len(set(contexts)) > 1)
        early.append(min(exits) < 6)
        f = _step_features(exits, contexts, 6, config)
        expected.append(replayer.cost.decode_s(f))
        assert seconds == pytest.approx(expected[-1], rel=1e-9)
        return seconds

    def prefill(seqs):
        longest = max(s.context_tokens for s in seqs)  # today's engine pads a prefill batch to its longest prompt
        seconds = inner_prefill(seqs)
        expected.append(replayer.cost.prefill_s({"prefill_calls": 1, "prefill_token_layers": len(seqs) * longest * 6,
                                                 "prefill_attention": len(seqs) * longest**2 * 6}))
        assert seconds == pytest.approx(expected[-1], rel=1e-9)
        return seconds

    executor.decode, executor.prefill = decode, prefill  # type: ignore[method-assign]
    scheduler = Scheduler(executor, executor.budget(arm, 10**12), VirtualClock(), arm=arm)
    one_step = replayer.cost.decode_s(_step_features([6], [PROMPT_TOKENS + 1], 6, config))
    for k, (rid, max_tokens) in enumerate([(0, 8), (1, 3), (2, 6), (3, 8)]):
        scheduler.submit(executor.request(k, rid, k * 1.5 * one_step, max_tokens))
    records = scheduler.run_until(math.inf)
    assert sorted(r.output_tokens for r in records) == [3, 6, 8, 8]
    for r in records:  # exit layers as today's replay gives them (the first token from prefill, at full depth)
        assert list(r.exit_layers) == exit_layer[replayer.request_rows[r.request_id][: r.output_tokens]].tolist()
    assert len(expected) > 8 and sum(mixed) >= 3 and any(early)
    assert scheduler.span.busy_s == pytest.approx(sum(expected), rel=1e-9)


def test_replay_executor_stops_at_the_traces_eos(lockstep_replayer) -> None:
    """Make token 3 of request 1 an EOS id: that request ends after 4 tokens (reason "eos"); the others run to
    max_tokens (or to the end of the trace, reason "trace_end")."""
    import dataclasses

    from helios.replay import Replayer
    from helios.replay_executor import ReplayArm, ReplayExecutor

    trace = lockstep_replayer.trace
    rows = lockstep_replayer.request_rows[1]
    eos = int(trace.full_token[rows[3]])
    # the first occurrence of that token in request 1's output decides where it ends
    end = [int(t) for t in trace.full_token[rows]].index(eos) + 1
    others = {rid: [int(t) for t in trace.full_token[r]] for rid, r in lockstep_replayer.request_rows.items()}
    replayer = Replayer(dataclasses.replace(trace, meta={**trace.meta, "eos_ids": [eos]}))
    arm = ReplayArm("tiny-llama", 6, _exit_config("none", (), 0.9))
    executor = ReplayExecutor({"tiny-llama": replayer}, arm)
    scheduler = Scheduler(executor, executor.budget(arm, 10**12), VirtualClock(), arm=arm)
    scheduler.submit_many(executor.request(rid, rid, 0.0, 6 if rid == 0 else 20) for rid in range(4))
    got = by_id(scheduler.run_until(math.inf))
    assert got[1].output_tokens == end <= 4 and got[1].finish_reason == "eos"
    for rid in (0, 2, 3):
        tokens = others[rid]
        stop = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        limit = 6 if rid == 0 else 20
        assert got[rid].output_tokens == min(stop, limit)


def test_replay_switch_under_load_loses_no_request(lockstep_replayer) -> None:
    """Depth 6 -> 4 while 4 sequences run (budget for 2 at a time). Both policies finish every request; recompute
    re-prefills the two in flight; the switch costs the trace's load rate x the new depth's weights."""
    from helios.replay_executor import ReplayArm, ReplayExecutor

    replayer = lockstep_replayer
    old = ReplayArm("tiny-llama", 6, _exit_config("none", (), 0.9))
    new = ReplayArm("tiny-llama", 4, _exit_config("max_prob", (2,), 0.05))
    load_s = 0.25 / replayer.weight_bytes_by_depth[6] * replayer.weight_bytes_by_depth[4]  # the fixture's timing
    for policy in ("drain", "recompute"):
        executor = ReplayExecutor({"tiny-llama": replayer}, old, stop_at_eos=False)
        budget_bytes = replayer.weight_bytes_by_depth[6] + 2 * (PROMPT_TOKENS + NEW_TOKENS) * replayer.kv_bytes_per_token_layer * 6
        scheduler = Scheduler(executor, executor.budget(old, budget_bytes), VirtualClock(), arm=old)
        scheduler.submit_many(executor.request(i, i % 4, 0.0, NEW_TOKENS) for i in range(8))
        first = scheduler.run_until(1e-9)  # one iteration: 2 admitted, prefilled, one decode step
        assert first == [] and scheduler.running == 2 and scheduler.queue_len == 6
        scheduler.switch_arm(new, executor.budget(new, budget_bytes), policy=policy)
        records = scheduler.run_until(math.inf)
        assert sorted(r.request_id for r in records) == list(range(8)) and not scheduler.rejected
        assert all(r.output_tokens == NEW_TOKENS for r in records)
        assert scheduler.span.switch_s == pytest.approx(load_s)
        in_flight = [r for r in records if r.request_id in (0, 1)]
        if policy == "drain":
            assert all(set(r.exit_layers) == {6} for r in in_flight) and scheduler.span.recomputed == 0
        else:
            # tokens 0, 1 from depth 6; token 2 from the re-prefill at depth 4; the rest decoded at depth 4
            assert all(r.exit_layers[:3] == (6, 6, 4) and max(r.exit_layers[3:]) <= 4 for r in in_flight)
            assert scheduler.span.recomputed == 2 and all(r.recomputes == 1 for r in in_flight)
        # the new arm holds more sequences (fewer layers of K/V per token): more than 2 ran at once after the switch
        assert scheduler.span.max_running > 2


def test_replay_recompute_onto_another_candidate_retokenizes_the_queue(lockstep_replayer) -> None:
    """Candidates tokenize differently: after a switch, queued and preempted sequences take the new candidate's prompt
    length (the executor's optional `prompt_tokens` hook), and re-prefill over it plus their generated tokens.
    "other" is the same trace under another name with prompts 2 tokens longer."""
    import dataclasses

    from helios.replay import Replayer
    from helios.replay_executor import ReplayArm, ReplayExecutor

    trace = lockstep_replayer.trace
    other = Replayer(dataclasses.replace(trace, prompt_len=trace.prompt_len + 2, meta={**trace.meta, "candidate": "other"}))
    old = ReplayArm("tiny-llama", 6, _exit_config("none", (), 0.9))
    new = ReplayArm("other", 6, _exit_config("none", (), 0.9))
    executor = ReplayExecutor({"tiny-llama": lockstep_replayer, "other": other}, old, stop_at_eos=False)
    budget_bytes = lockstep_replayer.weight_bytes_by_depth[6] + 2 * (PROMPT_TOKENS + 2 + NEW_TOKENS) * lockstep_replayer.kv_bytes_per_token_layer * 6
    scheduler = Scheduler(executor, executor.budget(old, budget_bytes), VirtualClock(), arm=old)
    scheduler.submit_many(executor.request(i, i, 0.0, NEW_TOKENS) for i in range(4))
    scheduler.run_until(1e-9)
    prefilled: list[list[int]] = []
    inner = executor.prefill
    executor.prefill = lambda seqs: prefilled.append([s.context_tokens for s in seqs]) or inner(seqs)  # type: ignore[method-assign]
    scheduler.switch_arm(new, executor.budget(new, budget_bytes), policy="recompute")
    records = scheduler.run_until(math.inf)
    assert sorted(r.request_id for r in records) == [0, 1, 2, 3]
    assert all(r.prompt_tokens == PROMPT_TOKENS + 2 and r.output_tokens == NEW_TOKENS for r in records)
    # first re-prefill: requests 0 and 1 over 14 prompt + 2 generated tokens; then 2 and 3 over their 14-token prompts
    assert prefilled == [[16, 16], [14, 14]]


def test_span_stats_merge_is_one_span_of_both() -> None:
    """Two spans folded by hand: counters summed, maxima kept, rejections appended, the end the later span's."""
    from helios.scheduler import SpanStats

    first = SpanStats(start_s=0.0, end_s=1.0, busy_s=0.8, prefill_s=0.3, decode_s=0.4, switch_s=0.1, prefill_calls=2,
                      decode_steps=5, decode_rows=12, prefill_tokens=40, output_tokens=17, admitted=3, recomputed=1,
                      finished=2, switches=1, max_running=3, max_resident_bytes=900, rejections=["a"],
                      queue_len_end=4, running_end=1, cancelled=1)
    later = SpanStats(start_s=1.0, end_s=2.5, busy_s=1.0, prefill_s=0.5, decode_s=0.5, prefill_calls=1, decode_steps=7,
                      decode_rows=20, prefill_tokens=10, output_tokens=8, admitted=1, finished=3, max_running=2,
                      max_resident_bytes=1200, rejections=["b"], queue_len_end=0, running_end=2)
    first.merge(later)
    assert (first.start_s, first.end_s, first.wall_s) == (0.0, 2.5, 2.5)
    assert (first.busy_s, first.prefill_s, first.decode_s, first.switch_s) == pytest.approx((1.8, 0.8, 0.9, 0.1))
    assert (first.prefill_calls, first.decode_steps, first.decode_rows, first.prefill_tokens) == (3, 12, 32, 50)
    assert (first.output_tokens, first.admitted, first.recomputed, first.finished) == (25, 4, 1, 5)
    assert (first.switches, first.cancelled, first.max_running, first.max_resident_bytes) == (1, 1, 3, 1200)
    assert first.rejections == ["a", "b"] and (first.queue_len_end, first.running_end) == (0, 2)
