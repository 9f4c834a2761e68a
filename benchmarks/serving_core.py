"""The serving core under load: continuous vs static batching, truncation -> capacity, and replay vs live.

    python benchmarks/serving_core.py --quick --json benchmarks/serving_core.json     # ~15 min on 2 idle CPU cores
    python benchmarks/serving_core.py --json benchmarks/serving_core.json             # more requests, 3 repeats

Everything runs helios.scheduler (the one admission/retirement code) on a measured virtual clock: requests arrive
at their trace times, each step advances the clock by the engine's measured compute (helios.engine_executor), and
idle time is skipped. The model is SmolLM2-135M (fp32, CPU) under one memory budget (`--memory-budget-mib`, default
640 MiB: weights at depth 30 are 513 MiB, so K/V room, and with it concurrency, grows fast as depth drops, the
regime HELIOS's GPU numbers come from). Requests are prompts of the code/prose/qa pool (the replay trace's, so live
and replay see the same prompts), `max_tokens` ~ U[min, max], stopping at EOS.

continuous_vs_static  the same arrival trace through mode="continuous" and mode="static" (a batch forms from the
                      queue up to the budget and runs until its longest member ends). Saturation: every request at
                      t=0, throughput = output tokens / makespan. Then Poisson arrivals at 50% and 80% of the
                      continuous capacity (requests/s at saturation): p95 end-to-end latency. Modes interleave per
                      repeat; medians over repeats.
truncation_capacity   depths 10, 20, 30 at saturation (continuous; more requests at once than depth 10's budget
                      admits): most sequences running at once, tokens/s.
sim_to_real           replay (helios.replay_executor: the cost model's clock, tokens and EOS from the trace) against
                      live on the same arrival trace, for (arm, load) settings incl. one above capacity: relative
                      error of throughput, p95 TTFT and p95 end-to-end latency. Replay's tokens are teacher-forced; its cost model is
                      recalibrated in the same run, beside the live measurements.

Energy is not measured here. Figures and the load they ran under: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

from helios.paths import write_json
from helios.scheduler import MemoryBudget, RequestRecord, Scheduler, SequenceRequest, VirtualClock

CANDIDATE = "smollm2-135m"
WORKLOAD = {"seed": 0, "episode_epochs": 1, "arrival": {"kind": "closed", "batch_size": 8},
            "phases": [{"epochs": 1, "mixture": {"code": 0.4, "prose": 0.3, "qa": 0.3}}]}


@dataclasses.dataclass(frozen=True)
class Load:
    """One arrival trace: (pool index, arrival_s, max_tokens) per request."""

    requests: tuple[tuple[int, float, int], ...]


def make_load(n: int, pool: int, rate_rps: float | None, token_range: tuple[int, int], seed: int) -> Load:
    """`n` requests over the pool; all at t=0 when `rate_rps` is None (saturation), else Poisson at that rate."""
    rng = np.random.default_rng(seed)
    arrivals = np.zeros(n) if rate_rps is None else np.cumsum(rng.exponential(1.0 / rate_rps, size=n))
    tokens = rng.integers(token_range[0], token_range[1] + 1, size=n)
    order = rng.permutation(n) % pool
    return Load(tuple((int(p), float(t), int(m)) for p, t, m in zip(order, arrivals, tokens)))


def summarise(records: list[RequestRecord], scheduler: Scheduler) -> dict:
    tokens = sum(r.output_tokens for r in records)
    start = min(r.arrival_s for r in records)
    makespan = max(r.finished_s for r in records) - start
    return {
        "requests": len(records), "output_tokens": tokens, "makespan_s": makespan,
        "tokens_per_s": tokens / makespan, "requests_per_s": len(records) / makespan,
        "ttft_p50_s": float(np.percentile([r.ttft_s for r in records], 50)),
        "ttft_p95_s": float(np.percentile([r.ttft_s for r in records], 95)),
        "e2e_p50_s": float(np.percentile([r.e2e_s for r in records], 50)),
        "e2e_p95_s": float(np.percentile([r.e2e_s for r in records], 95)),
        "max_concurrent": scheduler.span.max_running, "busy_s": scheduler.span.busy_s,
        "max_resident_bytes": scheduler.span.max_resident_bytes,
    }


def median_run(runs: list[dict]) -> dict:
    """Per key, the median over runs of a numeric field (a label, e.g. the energy source, is the first run's)."""
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float)) else runs[0][k]
            for k in runs[0]}


class Live:
    """Engines per depth, and runs of a load on the measured virtual clock (CUDA: synchronised per call).

    `max_prefill_tokens` caps one prefill call's padded tokens (helios.scheduler.MemoryBudget); None: no cap."""

    def __init__(self, prompts: list[list[int]], budget_bytes: int, candidate: str = CANDIDATE, *,
                 device: str = "cpu", dtype: str = "float32", max_prefill_tokens: int | None = None) -> None:
        from helios.models import memory_profile

        self.prompts = prompts
        self.budget_bytes = budget_bytes
        self.candidate, self.device, self.dtype = candidate, device, dtype
        self.max_prefill_tokens = max_prefill_tokens
        self.profile = memory_profile(candidate, dtype=dtype, progress=False)
        self.engines: dict[int, object] = {}
        self.meter = None  # an helios.energy meter around each run (the GPU script sets NVML's); None: no energy

    def engine(self, depth: int):
        from helios.engine import EarlyExitEngine
        from helios.models import load_candidate

        if depth not in self.engines:
            loaded = load_candidate(self.candidate, depth, device=self.device, dtype=self.dtype, progress=False)
            self.engines[depth] = EarlyExitEngine(loaded)
            self.engines[depth].generate([self.prompts[0]], 2)  # warm-up
        return self.engines[depth]

    def budget(self, depth: int) -> MemoryBudget:
        return MemoryBudget(self.budget_bytes, self.profile.weight_bytes_by_depth[depth],
                            self.profile.kv_bytes_per_token_layer * depth,
                            max_prefill_tokens=self.max_prefill_tokens)

    def run(self, load: Load, depth: int, exit_config, mode: str = "continuous") -> dict:
        from helios.engine_executor import EngineExecutor, EnginePayload

        engine = self.engine(depth)
        executor = EngineExecutor(lambda arm: (engine, exit_config), arm=depth)
        scheduler = Scheduler(executor, self.budget(depth), VirtualClock(), arm=depth, mode=mode)
        for i, (p, t, m) in enumerate(load.requests):
            reason = scheduler.submit(SequenceRequest(i, t, len(self.prompts[p]), m, EnginePayload(self.prompts[p])))
            assert reason is None, reason
        if self.meter is not None:
            self.meter.start()
        summary = summarise(scheduler.run_until(math.inf), scheduler)
        # The K/V the engine physically holds at the end (its dense slots only grow) beside the most the scheduler
        # reserved: the budget is accounting, and this says how far physical memory strays from it.
        summary["kv_allocated_bytes"] = executor.batch.cache.nbytes
        summary["kv_reserved_peak_bytes"] = summary["max_resident_bytes"] - self.profile.weight_bytes_by_depth[depth]
        if self.meter is not None:
            reading = self.meter.stop()  # the run's wall time: compute and host work (the virtual clock skips idle)
            summary.update(energy_j=reading.energy_j, energy_source=reading.source,
                           energy_j_per_token=reading.energy_j / summary["output_tokens"])
        return summary


class Replay:
    def __init__(self, trace_path: Path, budget_bytes: int) -> None:
        from helios.replay import Replayer
        from helios.traces import read_trace

        self.replayer = Replayer(read_trace(trace_path))
        self.budget_bytes = budget_bytes

    def run(self, load: Load, depth: int, exit_config, mode: str = "continuous") -> dict:
        from helios.replay_executor import ReplayArm, ReplayExecutor

        arm = ReplayArm(CANDIDATE, depth, exit_config)
        executor = ReplayExecutor({CANDIDATE: self.replayer}, arm)
        scheduler = Scheduler(executor, executor.budget(arm, self.budget_bytes), VirtualClock(), arm=arm, mode=mode)
        for i, (p, t, m) in enumerate(load.requests):
            assert scheduler.submit(executor.request(i, p, t, m)) is None
        return summarise(scheduler.run_until(math.inf), scheduler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests, one repeat")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-budget-mib", type=float, default=640.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="override the saturation/Poisson request counts")
    args = parser.parse_args()

    import torch

    from helios.engine import ExitConfig
    from helios.models import load_candidate
    from helios.profiling import ensure_trace
    from helios.workloads import encode_requests, workload_from_config

    torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    token_range = (8, 64) if quick else (8, 128)
    n_saturation = args.requests or (64 if quick else 192)
    n_poisson = args.requests or (64 if quick else 128)
    # Enough requests at once that the budget, not the request count, bounds concurrency at depth 10 (~190 fit).
    n_truncation = args.requests or (256 if quick else 384)
    per_source = 8 if quick else 16
    budget_bytes = int(args.memory_budget_mib * 2**20)
    started = time.time()

    trace = ensure_trace(CANDIDATE, WORKLOAD, depths=[10, 20], per_source=per_source, new_tokens=token_range[1],
                         progress=False)
    tokenizer = load_candidate(CANDIDATE, 1, progress=False).tokenizer
    requests = workload_from_config(WORKLOAD).pool(per_source)
    prompts = encode_requests(requests, tokenizer, 8192 - token_range[1])
    live, replay = Live(prompts, budget_bytes), Replay(trace, budget_bytes)
    lengths = [replay.replayer.trace.prompt_len[replay.replayer.request_rows[i][0]] for i in range(len(prompts))]
    assert [len(p) for p in prompts] == [int(n) for n in lengths], "trace pool and live prompts differ"
    full = ExitConfig()
    # The cost model describes the machine as it was when calibrated (a shared box drifts with its load), so replay's
    # prices are recalibrated here, beside the live runs; the trace's exit dynamics and EOS positions are kept.
    from helios.calibration import calibrate

    replay.replayer.cost, _ = calibrate([live.engine(d) for d in (30, 20, 10)], prompts, max_batch=32)
    out: dict = {"candidate": CANDIDATE, "dtype": "float32", "device": "cpu", "threads": args.threads,
                 "memory_budget_mib": args.memory_budget_mib, "max_tokens_range": token_range, "repeats": repeats,
                 "clock": "measured virtual clock (engine compute; idle skipped)", "quick": quick,
                 "cost_model": "recalibrated in this run", "calibration_rel_error": replay.replayer.cost.calibration_rel_error,
                 "load_average_1min_start": os.getloadavg()[0]}

    # Continuous vs static: saturation, then Poisson at 50% / 80% of the continuous capacity.
    saturation = make_load(n_saturation, len(prompts), None, token_range, seed=1)
    runs: dict[str, list[dict]] = {"continuous": [], "static": []}
    for _ in range(repeats):
        for mode in ("continuous", "static"):
            runs[mode].append(live.run(saturation, 30, full, mode))
            print(f"saturation {mode}: {runs[mode][-1]['tokens_per_s']:.1f} tok/s, "
                  f"concurrency {runs[mode][-1]['max_concurrent']}", flush=True)
    med = {m: median_run(rs) for m, rs in runs.items()}
    capacity_rps = med["continuous"]["requests_per_s"]
    cvs: dict = {"saturation": med, "capacity_rps": capacity_rps,
                 "throughput_ratio": med["continuous"]["tokens_per_s"] / med["static"]["tokens_per_s"]}
    for fraction in (0.5, 0.8):
        load = make_load(n_poisson, len(prompts), fraction * capacity_rps, token_range, seed=2)
        at: dict[str, list[dict]] = {"continuous": [], "static": []}
        for _ in range(repeats):
            for mode in ("continuous", "static"):
                at[mode].append(live.run(load, 30, full, mode))
        cvs[f"load_{fraction:g}"] = {m: median_run(rs) for m, rs in at.items()}
        print(f"{fraction:.0%} load: p95 e2e continuous {cvs[f'load_{fraction:g}']['continuous']['e2e_p95_s']:.2f} s, "
              f"static {cvs[f'load_{fraction:g}']['static']['e2e_p95_s']:.2f} s", flush=True)
    cvs["p95_ratio_at_80pct_load"] = cvs["load_0.8"]["static"]["e2e_p95_s"] / cvs["load_0.8"]["continuous"]["e2e_p95_s"]
    cvs["p95_ratio_at_50pct_load"] = cvs["load_0.5"]["static"]["e2e_p95_s"] / cvs["load_0.5"]["continuous"]["e2e_p95_s"]
    out["continuous_vs_static"] = cvs

    # Truncation -> capacity.
    capacity = []
    flood = make_load(n_truncation, len(prompts), None, token_range, seed=4)
    for depth in (10, 20, 30):
        rs = [live.run(flood, depth, full) for _ in range(repeats)]
        capacity.append({"depth": depth, "max_concurrent": statistics.median(r["max_concurrent"] for r in rs),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "weight_bytes": live.profile.weight_bytes_by_depth[depth]})
        print(f"depth {depth}: concurrency {capacity[-1]['max_concurrent']}, {capacity[-1]['tokens_per_s']:.1f} tok/s",
              flush=True)
    out["truncation_capacity"] = capacity
    out["truncation_vs_full"] = {"batch_ratio_10_vs_30": capacity[0]["max_concurrent"] / capacity[2]["max_concurrent"],
                                 "throughput_ratio_10_vs_30": capacity[0]["tokens_per_s"] / capacity[2]["tokens_per_s"],
                                 "helios_paper": {"batch": 3.7, "throughput": 1.48}}

    # Sim-to-real: replay vs live on the same arrival traces.
    exits = ExitConfig("max_prob", 0.9, (15, 22))
    settings = [("smollm2-135m@30", 30, full, 0.5), ("smollm2-135m@20", 20, full, 0.8),
                ("smollm2-135m@30 max_prob>=0.9@15,22", 30, exits, 0.8), ("smollm2-135m@30", 30, full, 1.5)]
    sim = []
    for label, depth, config, fraction in settings:
        load = make_load(n_poisson, len(prompts), fraction * capacity_rps, token_range, seed=3)
        real = live.run(load, depth, config)
        model = replay.run(load, depth, config)
        err = {k: (model[v] - real[v]) / real[v] for k, v in
               (("throughput_rel_error", "tokens_per_s"), ("ttft_p95_rel_error", "ttft_p95_s"),
                ("e2e_p95_rel_error", "e2e_p95_s"))}
        sim.append({"setting": f"{label}, {fraction:g}x capacity", **err, "live": real, "replay": model})
        print(f"sim-to-real {sim[-1]['setting']}: " + ", ".join(f"{k} {v:+.1%}" for k, v in err.items()), flush=True)
    out["sim_to_real"] = sim
    out["wall_s"] = time.time() - started
    out["load_average_1min_end"] = os.getloadavg()[0]
    if args.json:
        write_json(args.json, out, indent=2)
    print(json.dumps({k: out[k] for k in ("truncation_vs_full",)}, indent=2))
    print(f"continuous/static throughput at saturation: {cvs['throughput_ratio']:.2f}x; "
          f"p95 at 80% load static/continuous: {cvs['p95_ratio_at_80pct_load']:.2f}x")


if __name__ == "__main__":
    main()
