"""The serving core's pieces without HTTP: Scheduler.cancel on hand-computed schedules (the toy executor of
tests/test_scheduler.py), and the prompt-length pre-check's bound.

    python -m pytest -q tests/test_serving_core.py
"""

from __future__ import annotations

import math

from helios.scheduler import Scheduler, SequenceRequest, VirtualClock
from helios.serving.text import max_chars_per_token, min_prompt_tokens
from tests.test_scheduler import BUDGET, ToyExecutor


def test_cancel_frees_running_queued_and_future_requests() -> None:
    """BUDGET fits two sequences (20 bytes each of 40 free). r0, r1 run, r2 waits, r3 arrives at t=5. At t~0.3
    (prefill 0.2 s + one decode step 0.1 s) cancel r0 (running), r2 (queued) and r3 (not arrived yet): r0's K/V is
    released at the next iteration boundary, and r4 (queued behind r2) is admitted into its room; no record or
    rejection is made for the cancelled ones."""
    lengths = {f"r{i}": 10 for i in range(5)}
    executor = ToyExecutor(lengths)
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    executor.scheduler = scheduler
    for i, arrival in enumerate((0.0, 0.0, 0.0, 5.0, 0.0)):
        assert scheduler.submit(SequenceRequest(f"r{i}", arrival, 10, 10)) is None
    first = scheduler.run_until(0.25)  # prefill r0+r1 (0.2 s), one decode step (0.1 s)
    assert not first and scheduler.running == 2 and scheduler.queue_len == 2
    for rid in ("r0", "r2", "r3"):
        scheduler.cancel(rid)
    scheduler.cancel("never-submitted")  # unknown ids are ignored
    records = scheduler.run_until(math.inf)
    assert "r0" in executor.released  # its K/V was freed by the executor
    assert sorted(r.request_id for r in records) == ["r1", "r4"]
    assert not scheduler.rejected and scheduler.idle and scheduler.reserved_bytes == 0
    r4 = next(r for r in records if r.request_id == "r4")
    r1 = next(r for r in records if r.request_id == "r1")
    assert r4.admitted_s < r1.finished_s  # admitted into r0's room, not after r1 finished
    assert scheduler.span.cancelled == 3  # counted in the span the cancels were applied in
    assert scheduler.span.end_s < 5.0  # r3 (due at t=5) was dropped, not waited for


def test_cancel_counts_in_the_span_and_ends_a_decode_loop_early() -> None:
    """A cancel from another thread mid-span must not wait for the span's end: the decode loop returns at the next
    step boundary, so a long span still applies it (here: within one 0.1 s step)."""
    executor = ToyExecutor({"a": 1000, "b": 1000})
    scheduler = Scheduler(executor, BUDGET, VirtualClock())
    scheduler.submit(SequenceRequest("a", 0.0, 10, 10))
    scheduler.submit(SequenceRequest("b", 0.0, 10, 10))
    scheduler.run_until(0.15)
    scheduler.cancel("a")
    records = scheduler.run_until(100.0)
    assert [r.request_id for r in records] == ["b"] and scheduler.span.cancelled == 1
    assert executor.released[0] == "a"


def test_prompt_length_precheck_is_a_lower_bound() -> None:
    """ceil(chars / k) <= the real token count for the byte tokenizer (k from its vocabulary), so the pre-check never
    rejects a prompt that would fit."""
    from helios.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    k = max_chars_per_token(tokenizer)
    for text in ("", "a", "hello world", "é" * 50, "<s>" * 20, "x" * 1000):
        tokens = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        assert min_prompt_tokens(len(text), k) <= tokens, (text[:10], k, tokens)


def test_gpu_benchmark_dry_runs_on_cpu(tmp_path) -> None:
    """benchmarks/serving_core_gpu.py (run on a lent GPU) at its small test shape on the CPU: the step API's tokens
    equal HF greedy `generate` when sequences join and leave mid-way, and truncation admits more sequences under the
    same budget (weights and per-sequence K/V both shrink), so the script cannot rot between GPU sessions."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "serving_core_gpu.py"), "--shape", "test", "--device",
                    "cpu", "--dtype", "float32", "--depths", "8,4", "--memory-budget-gib", "0.02", "--requests", "12",
                    "--flood", "40", "--repeats", "1", "--sections", "exactness,continuous_vs_static,truncation_capacity",
                    "--json", str(out)], check=True, cwd=root, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert all(row["all_equal"] for row in result["exactness"]), result["exactness"]
    deep, shallow = result["truncation_capacity"]
    assert (deep["depth"], shallow["depth"]) == (8, 4)
    assert shallow["max_concurrent"] > deep["max_concurrent"]
    budget = 0.02 * 2**30
    assert deep["max_resident_bytes"] <= budget and shallow["max_resident_bytes"] <= budget
    assert result["continuous_vs_static"]["saturation"]["continuous"]["requests"] == 12
