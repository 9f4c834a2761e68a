"""Replay against live where the agents train: fixed arms through the loaded scenario, load level by load level, with
replay's cost model calibrated on batches of different sizes.

    python benchmarks/sim_to_real.py --json benchmarks/sim_to_real.json     # ~15 min on 2 idle CPU cores
    python benchmarks/sim_to_real.py --epochs 4 --depths 10 --max-batches 8 # a smoke run, ~3 min

The main job trains on replay and evaluates live (agents/live_eval.py), so replay's clock must price the batches the
scenario makes: up to ~32 rows at full depth in a burst, more when truncated. A fixed arm (the reference candidate at
each of `--depths`, exits off) plays the scenario's first `--epochs` epochs (bursts: 0.4x, 2x, 0.8x of capacity)
live (the live env: real inference, measured clock) and on replay (the replay env: the trace's tokens and EOS, the
cost model's clock), on the same arrivals: the workload's draw 0 at one absolute rate (`--capacity-rps` x each phase's
load; default: the capacity replay measures under the largest calibration below). Replay runs once per cost model:

  trace      the trace's own calibration, as recorded (what replay prices with unless re-recorded)
  batch<=N   recalibrated here, now, on the trace's engines (full depth and its two recorded truncations) and
             prompts, batches 1, 2, 4, ... N (helios.calibration)

Replay's runs are modelled and cheap; the live runs are the cost. Reported per arm, per load level and over all epochs:
live's and replay's mean per epoch of goodput, attainment, TTFT p95, TPOT p95, e2e p95, tokens per second,
concurrency and accuracy, and replay's relative error (replay - live) / |live|. Replay's accuracy scores each arm's
free-running output (helios.profiling.free_running_outputs) cut to the length its teacher-forced trace serves; live's
scores what it served. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import envs  # noqa: E402,F401  (registers the env ids)
from agents.live_eval import absolute_rate_workload, play_episode  # noqa: E402
from agents.yardsticks import FixedArm  # noqa: E402
from benchmarks.agent_bench import load_level, scenario_workload  # noqa: E402
from envs import ENV_IDS  # noqa: E402
from helios.paths import write_json  # noqa: E402

METRICS = ("goodput_rps", "attainment", "ttft_p95_s", "tpot_p95_s", "latency_p95_s", "throughput_tok_s",
           "concurrency", "accuracy")


def arm_index(env: gymnasium.Env, candidate: str, depth: int) -> int:
    """The arm of `candidate` at `depth` with exits off."""
    for i, arm in enumerate(env.unwrapped.arm_table):
        if arm["candidate"] == candidate and int(arm["depth"]) == depth and arm["exit"] == "none":
            return i
    valid = sorted({int(a["depth"]) for a in env.unwrapped.arm_table if a["candidate"] == candidate})
    raise ValueError(f"no arm {candidate}@{depth} with exits off; the env's depths of {candidate} are {valid}")


def by_level(records: Sequence[Mapping[str, Any]], workload_cfg: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean per epoch of each metric, per load level and over all epochs ("all")."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(load_level(record, workload_cfg), []).append(record)
    groups["all"] = list(records)
    return {level: {m: float(np.nanmean([r["metrics"].get(m, np.nan) for r in rs])) for m in METRICS}
            for level, rs in groups.items()}


def compare(live: Mapping[str, Mapping[str, float]], replay: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Replay's relative error against live, per level and metric."""
    return {level: {m: {"live": live[level][m], "replay": replay[level][m],
                        "rel_error": (replay[level][m] - live[level][m]) / abs(live[level][m])
                        if live[level][m] else None} for m in METRICS} for level in live}


def recalibrated_traces(trace_file: Path, max_batches: Sequence[int], runs: int, out_dir: Path) -> dict[str, Any]:
    """Copies of the trace whose cost model is recalibrated on batches up to each of `max_batches`."""
    from helios.calibration import calibrate
    from helios.engine import EarlyExitEngine
    from helios.models import load_candidate
    from helios.traces import read_trace, write_trace

    trace = read_trace(trace_file)
    name = str(trace.meta["candidate"])
    depths = sorted({int(t["depth"]) for t in trace.meta.get("load_timings", [])} - {trace.num_layers})
    full = load_candidate(name, progress=False)
    engines = [EarlyExitEngine(full)] + [EarlyExitEngine(load_candidate(name, d, progress=False)) for d in depths]
    out: dict[str, Any] = {"trace": {"path": str(trace_file), "cost_model": trace.meta["cost_model"]}}
    for n in max_batches:
        start = time.perf_counter()
        model, _ = calibrate(engines, trace.meta["prompts"], runs_per_engine=runs, max_batch=n)
        path = out_dir / f"{name}-batch{n}.parquet"
        write_trace(dataclasses.replace(trace, meta={**trace.meta, "cost_model": model.to_dict()}), path)
        out[f"batch<={n}"] = {"path": str(path), "cost_model": model.to_dict(),
                              "calibration_s": time.perf_counter() - start}
        print(f"calibrated on batches up to {n} in {out[f'batch<={n}']['calibration_s']:.0f} s: held-out error "
              f"{model.calibration_rel_error:.3f}", flush=True)
    return out


def add_scenario_arguments(parser: argparse.ArgumentParser, depths: str) -> None:
    """The arguments of a fixed-arm run through the scenario's first epochs (here and benchmarks/cost_residuals.py)."""
    parser.add_argument("--scenario", default="bursts", help="a conf/workload name or a workload YAML file")
    parser.add_argument("--slo", default="accuracy_under_latency")
    parser.add_argument("--epochs", type=int, default=12,
                        help="the scenario's first epochs (bursts: 12 = 0.4x, 2x, 0.8x)")
    parser.add_argument("--depths", default=depths, help="depths of the reference candidate, exits off")
    parser.add_argument("--capacity-rps", type=float, default=None,
                        help="the absolute rate's unit (default: the capacity replay measures)")
    parser.add_argument("--json", default=None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser, depths="30,10")
    parser.add_argument("--max-batches", default="8,32", help="recalibrate on batches up to each of these")
    parser.add_argument("--calibration-runs", type=int, default=16, help="calibration runs per engine")
    args = parser.parse_args(argv)
    started, load_start = time.time(), os.getloadavg()[0]
    _, workload, workload_cfg = scenario_workload(args.scenario)
    depths = [int(d) for d in args.depths.split(",") if d]
    max_batches = [int(n) for n in args.max_batches.split(",") if n]

    shipped = gymnasium.make(ENV_IDS["replay"], workload=workload, slo=args.slo)
    backend = shipped.unwrapped.backend
    candidate = shipped.unwrapped.arm_table[shipped.unwrapped.reference_arm_index]["candidate"]
    with tempfile.TemporaryDirectory() as tmp:
        traces = recalibrated_traces(backend.trace_paths[candidate], max_batches, args.calibration_runs, Path(tmp))
        envs_by_model = {"trace": shipped}
        for name in traces:
            if name != "trace":
                envs_by_model[name] = gymnasium.make(ENV_IDS["replay"], workload=workload, slo=args.slo,
                                                     traces={candidate: traces[name]["path"]})
        capacities = {name: (env.unwrapped.capacity or {}).get("capacity_rps") for name, env in envs_by_model.items()}
        capacity = args.capacity_rps or capacities[list(envs_by_model)[-1]]
        fixed_rate = absolute_rate_workload(workload_cfg, capacity)
        for env in envs_by_model.values():
            env.close()
        replay: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for name in traces:
            kwargs = {} if name == "trace" else {"traces": {candidate: traces[name]["path"]}}
            env = gymnasium.make(ENV_IDS["replay"], workload=fixed_rate, slo=args.slo, **kwargs)
            replay[name] = {d: play_episode(env, FixedArm(arm_index(env, candidate, d)), 0, 0, args.epochs)
                            for d in depths}
            env.close()
    live_env = gymnasium.make(ENV_IDS["live"], workload=fixed_rate, slo=args.slo)
    live: dict[int, list[dict[str, Any]]] = {}
    live_s: dict[int, float] = {}
    try:
        for d in depths:
            start = time.perf_counter()
            live[d] = play_episode(live_env, FixedArm(arm_index(live_env, candidate, d)), 0, 0, args.epochs)
            live_s[d] = time.perf_counter() - start
            print(f"live {candidate}@{d}: {args.epochs} epochs in {live_s[d]:.0f} s", flush=True)
    finally:
        live_env.close()

    arms: dict[str, Any] = {}
    for d in depths:
        live_levels = by_level(live[d], workload_cfg)
        arms[f"{candidate}@{d}"] = {
            "live_s": live_s[d], "live": live_levels,
            "replay": {name: compare(live_levels, by_level(replay[name][d], workload_cfg)) for name in traces},
        }
    out = {
        "scenario": args.scenario, "slo": args.slo, "epochs": args.epochs, "candidate": candidate,
        "capacity_rps": capacity, "capacity_rps_by_cost_model": capacities,
        "cost_models": {name: {k: v for k, v in t.items() if k != "path"} for name, t in traces.items()},
        "arms": arms,
        "accuracy": "replay: each arm's free-running output, at the length the trace serves; live: what it served",
        "machine": f"{os.uname().machine} {os.cpu_count()} cpus", "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0], "wall_s": time.time() - started,
    }
    for arm, result in arms.items():
        for name, levels in result["replay"].items():
            line = ", ".join(f"{m} {levels['all'][m]['rel_error']:+.0%}" for m in METRICS
                             if levels["all"][m]["rel_error"] is not None)
            print(f"{arm} replay[{name}] vs live, all epochs: {line}", flush=True)
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    main()
