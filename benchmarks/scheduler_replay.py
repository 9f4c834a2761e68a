"""Replay speed with the queue simulated: helios.scheduler spans (env steps) per second on the cost model's clock.

    python benchmarks/scheduler_replay.py --quick                 # tiny-llama trace, ~20 s
    python benchmarks/scheduler_replay.py --trace T.parquet --json /tmp/sched.json

One span = one env step: `Scheduler.run_until(t + epoch_s)` over a `ReplayExecutor`. Two loads, both with
`--requests` requests of `--tokens` output tokens per epoch (the default env's closed batch: 8 x 16):
  closed  the epoch's requests all arrive at its start (conf/workload/drift3.yaml); the span runs them to the end
          and the virtual clock skips the idle rest of the epoch;
  open    Poisson arrivals at the rate that brings `--requests` per epoch, epoch length = the closed load's busy
          time per epoch, so the server runs near saturation: the queue and running set carry over between spans.
The exit setting has exit points (per-call tables in use). Timing: one process, after one warm-up span (the tables
are built once per arm before timing, as an env does at construction); wall clock (perf_counter) and this process's
CPU time (process_time, the honest figure on a shared machine: the load average is printed with it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

WORKLOAD = {
    "seed": 0, "episode_epochs": 2, "arrival": {"kind": "closed", "batch_size": 8},
    "phases": [{"epochs": 2, "mixture": {"qa": 0.5, "code": 0.5}}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=None, help="a trace file; default: record a tiny-llama trace in a temp dir")
    parser.add_argument("--requests", type=int, default=8, help="requests per epoch")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per request")
    parser.add_argument("--spans", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1000 spans per load")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    spans = 1000 if args.quick else args.spans

    import torch

    from helios.engine import ExitConfig
    from helios.profiling import ensure_trace
    from helios.replay import Replayer
    from helios.replay_executor import ReplayArm, ReplayExecutor
    from helios.scheduler import Scheduler, VirtualClock
    from helios.traces import read_trace

    torch.set_num_threads(1)
    if args.trace is None:
        out = Path(tempfile.mkdtemp(prefix="sched-bench-"))
        path = ensure_trace("tiny-llama", WORKLOAD, depths=[3], per_source=4, new_tokens=args.tokens, out_dir=out,
                            progress=False, calibration_runs=4)
    else:
        path = Path(args.trace)
    replayer = Replayer(read_trace(path))
    name, depth = replayer.meta["candidate"], replayer.num_layers
    points = tuple(sorted({max(1, depth // 2), max(1, 3 * depth // 4)} - {depth}))
    arm = ReplayArm(name, depth, ExitConfig("max_prob", 0.5, points))
    pool = replayer.trace.requests()
    budget_bytes = replayer.weight_bytes_by_depth[depth] + 64 * 2048 * replayer.kv_bytes_per_token_layer * depth
    rng = np.random.default_rng(0)

    def make() -> tuple[Scheduler, ReplayExecutor]:
        executor = ReplayExecutor({name: replayer}, arm, stop_at_eos=False)
        return Scheduler(executor, executor.budget(arm, budget_bytes), VirtualClock(), arm=arm), executor

    results = {}
    # closed: all of an epoch's requests at its start
    scheduler, executor = make()
    epoch_s = 3600.0  # far longer than the work: the rest is skipped idle time
    busy = []
    count = 0
    closed_steps = []

    def closed_span(e: int) -> None:
        nonlocal count
        start = e * epoch_s
        for _ in range(args.requests):
            scheduler.submit(executor.request(count, int(pool[count % len(pool)]), start, args.tokens))
            count += 1
        scheduler.run_until(start + epoch_s)
        busy.append(scheduler.span.busy_s)
        closed_steps.append(scheduler.span.decode_steps)

    closed_span(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for e in range(1, spans + 1):
        closed_span(e)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    results["closed"] = {"spans": spans, "seconds": elapsed, "spans_per_s": spans / elapsed,
                         "spans_per_cpu_s": spans / cpu, "decode_steps_per_span": float(np.mean(closed_steps)),
                         "requests_per_span": args.requests, "tokens_per_request": args.tokens,
                         "modelled_busy_s_per_span": float(np.mean(busy))}

    # open: Poisson arrivals near saturation, queue persisting across spans
    scheduler, executor = make()
    epoch_s = float(np.mean(busy))
    rate = args.requests / epoch_s
    gaps = rng.exponential(1.0 / rate, size=(spans + 2) * args.requests * 2)
    arrivals = np.cumsum(gaps)
    for i, t in enumerate(arrivals):
        scheduler.submit(executor.request(i, int(pool[i % len(pool)]), float(t), args.tokens))
    finished, queue, running, steps = 0, [], [], 0
    scheduler.run_until(epoch_s)
    t0, c0 = time.perf_counter(), time.process_time()
    for e in range(2, spans + 2):
        finished += len(scheduler.run_until(e * epoch_s))
        queue.append(scheduler.queue_len)
        running.append(scheduler.running)
        steps += scheduler.span.decode_steps
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    results["open"] = {"spans": spans, "seconds": elapsed, "spans_per_s": spans / elapsed,
                       "spans_per_cpu_s": spans / cpu, "decode_steps_per_span": steps / spans,
                       "requests_finished_per_span": finished / spans, "mean_queue_len": float(np.mean(queue)),
                       "mean_running": float(np.mean(running)), "epoch_s": epoch_s}
    info = {"load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "trace": str(path), "candidate": name, "depth": depth, "exit": f"max_prob>=0.5@{points}",
            "results": results}
    for load, r in results.items():
        print(f"{load:6s} {r['spans_per_s']:8.0f} spans/s wall, {r['spans_per_cpu_s']:8.0f} per CPU second  "
              f"({r['spans']} spans in {r['seconds']:.2f} s)  " + ", ".join(
                  f"{k}={v:.3g}" for k, v in r.items() if k not in ("spans", "seconds", "spans_per_s", "spans_per_cpu_s")))
    print(f"machine load average (1 min) during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    assert math.isfinite(results["open"]["spans_per_s"])


if __name__ == "__main__":
    main()
