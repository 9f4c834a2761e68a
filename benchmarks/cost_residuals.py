"""Where replay's clock and live's part: every live call's measured seconds against the cost model's price of its work.

    python benchmarks/cost_residuals.py --json benchmarks/cost_residuals.json      # ~4 min on 2 idle CPU cores
    python benchmarks/cost_residuals.py --depths 10 --epochs 4                      # a smoke run, ~1 min

benchmarks/sim_to_real.py compares replay with live per load level (goodput, TTFT, ...); this looks one level down.
A fixed arm (the reference candidate at each of `--depths`, exits off) serves the scenario's first `--epochs` epochs
live (the live env: the scheduler on the real engine, measured clock), with every executor call recorded: its kind
(prefill or decode), rows, the engine's work counters for that call (DecodeBatch.features, the counters the cost
model is linear in) and its measured seconds. Each call is then priced by the trace's cost model on the same
counters. Reported per kind and per batch-size bucket: calls, measured and predicted seconds (sums), and
measured / predicted; and the seconds the engine spent growing its K/V cache inside a prefill (a copy of every
running sequence's K/V that calibration through `generate`, which sizes its cache once, never meets).
A ratio above 1 is work replay under-prices. Measured clock: CPU wall time of each call (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import envs  # noqa: E402,F401  (registers the env ids)
from agents.live_eval import absolute_rate_workload, play_episode  # noqa: E402
from agents.yardsticks import FixedArm  # noqa: E402
from benchmarks.agent_bench import scenario_workload  # noqa: E402
from benchmarks.sim_to_real import add_scenario_arguments, arm_index  # noqa: E402
from envs import ENV_IDS  # noqa: E402
from helios import engine as engine_module  # noqa: E402
from helios.costmodel import CostModel  # noqa: E402
from helios.engine_executor import EngineExecutor  # noqa: E402
from helios.paths import write_json  # noqa: E402
from helios.traces import read_trace  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_index(rows: int) -> int:
    """Index of the first bucket bound at or above `rows` (len(BUCKETS): beyond the last)."""
    return next((i for i, high in enumerate(BUCKETS) if rows <= high), len(BUCKETS))


def bucket(rows: int) -> str:
    """The batch-size bucket of a call: '1', '2', '3-4', '5-8', ..."""
    i = bucket_index(rows)
    if i == len(BUCKETS):
        return f">{BUCKETS[-1]}"
    low = BUCKETS[i - 1] + 1 if i else 1
    return str(BUCKETS[i]) if low == BUCKETS[i] else f"{low}-{BUCKETS[i]}"


class CallRecorder:
    """Wraps EngineExecutor.prefill/decode and EngineKVCache.grow for the duration of a `with` block, recording per
    call (kind, rows, counter deltas, measured seconds, seconds spent growing the cache inside it)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._grow_s = 0.0

    def __enter__(self) -> CallRecorder:
        recorder = self
        self._saved = (EngineExecutor.prefill, EngineExecutor.decode, engine_module.EngineKVCache.grow)
        prefill, decode, grow = self._saved

        def timed_grow(cache: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return grow(cache, *args, **kwargs)
            finally:
                recorder._grow_s += time.perf_counter() - start

        def wrap(kind: str, method: Any) -> Any:
            def call(executor: EngineExecutor, seqs: list[Any]) -> float:
                before = dict(executor.batch.features)
                recorder._grow_s = 0.0
                seconds = method(executor, seqs)
                after = executor.batch.features
                recorder.calls.append({
                    "kind": kind, "rows": len(seqs), "seconds": seconds, "grow_s": recorder._grow_s,
                    "features": {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)},
                })
                return seconds
            return call

        EngineExecutor.prefill = wrap("prefill", prefill)  # type: ignore[method-assign]
        EngineExecutor.decode = wrap("decode", decode)  # type: ignore[method-assign]
        engine_module.EngineKVCache.grow = timed_grow  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        EngineExecutor.prefill, EngineExecutor.decode, engine_module.EngineKVCache.grow = self._saved  # type: ignore


def summarise(calls: Sequence[dict[str, Any]], model: CostModel) -> dict[str, Any]:
    """Per kind and per (kind, batch bucket): calls, measured and predicted seconds, their ratio, cache growth."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)  # (kind, bucket index; -1: all)
    for call in calls:
        groups[call["kind"], -1].append(call)
        groups[call["kind"], bucket_index(call["rows"])].append(call)
    out = {}
    for kind, index in sorted(groups):
        group = groups[kind, index]
        name = kind if index < 0 else f"{kind} rows {bucket(group[0]['rows'])}"
        price = model.prefill_s if kind == "prefill" else model.decode_s
        measured = sum(c["seconds"] for c in group)
        predicted = sum(price(c["features"]) for c in group)
        out[name] = {"calls": len(group), "measured_s": measured, "predicted_s": predicted,
                     "measured_over_predicted": measured / predicted if predicted else None,
                     "grow_s": sum(c["grow_s"] for c in group),
                     "mean_rows": sum(c["rows"] for c in group) / len(group)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser, depths="10,30")
    args = parser.parse_args(argv)
    started, load_start = time.time(), os.getloadavg()[0]
    _, workload, workload_cfg = scenario_workload(args.scenario)
    replay = gymnasium.make(ENV_IDS["replay"], workload=workload, slo=args.slo)
    base = replay.unwrapped
    candidate = base.arm_table[base.reference_arm_index]["candidate"]
    trace_path = base.backend.trace_paths[candidate]
    model = CostModel.from_dict(read_trace(trace_path).meta["cost_model"])
    capacity = args.capacity_rps or base.capacity["capacity_rps"]
    replay.close()
    live = gymnasium.make(ENV_IDS["live"], workload=absolute_rate_workload(workload_cfg, capacity), slo=args.slo)
    arms: dict[str, Any] = {}
    try:
        for depth in [int(d) for d in args.depths.split(",") if d]:
            start = time.perf_counter()
            with CallRecorder() as recorder:
                play_episode(live, FixedArm(arm_index(live, candidate, depth)), 0, 0, args.epochs)
            arms[f"{candidate}@{depth}"] = {"live_s": time.perf_counter() - start,
                                            "by_kind": summarise(recorder.calls, model)}
            for name, row in arms[f"{candidate}@{depth}"]["by_kind"].items():
                ratio = row["measured_over_predicted"]
                print(f"{candidate}@{depth} {name}: {row['calls']} calls, measured {row['measured_s']:.2f} s, "
                      f"predicted {row['predicted_s']:.2f} s, ratio {ratio:.3f}, cache growth {row['grow_s']:.2f} s",
                      flush=True)
    finally:
        live.close()
    out = {"scenario": args.scenario, "epochs": args.epochs, "candidate": candidate, "capacity_rps": capacity,
           "trace": str(trace_path), "cost_model": model.to_dict(), "arms": arms,
           "measured": "CPU wall time per executor call (the live env's clock)",
           "machine": f"{os.uname().machine} {os.cpu_count()} cpus", "load_avg_1m_start": load_start,
           "load_avg_1m_end": os.getloadavg()[0], "wall_s": time.time() - started}
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    main()
