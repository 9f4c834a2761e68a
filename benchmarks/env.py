"""Environment benchmark: replay steps per second with the queue simulated, and the share of a live step spent inside
the engine.

    python benchmarks/env.py --json outputs/env_bench.json                 # ~1 minute once traces exist
    python benchmarks/env.py --replay-env tiny --live-steps 4 --threads 1    # no real-model traces needed

Replay: every step serves its epoch as a span of the episode's scheduler (helios.scheduler + helios.replay_executor:
continuous batching, one decode step at a time on the cost model's clock, the queue carried across epochs), then
scores it (helios.telemetry.span_metrics, helios.slo). Steps per second through `gymnasium.make(...)` (its
order-enforcing and checker wrappers included) and on the raw environment, single process, with random feasible
actions drawn beforehand; episode resets are part of the loop, environment construction (trace loading) is not.
Median of `--rounds` rounds, as wall-clock steps/s and as steps per second of this process's CPU time (the machine
may be shared: CPU time leaves out the time other processes took from it). Two workloads:
  drift3     the env's default (closed loop, 8 requests an epoch): the default environment (SmolLM2 + Gemma-3)
             when its traces are cached, else the tiny candidates (a replay step's cost depends on the requests and
             tokens an epoch holds, not on the model)
  open_loop  tiny candidates on bursts-like load: gamma arrivals (cv 2), alternating 0.6x and 2x the measured
             capacity of tiny-llama@2 (envs/capacity.py), epoch_s set so a load-1 epoch holds ~24 requests, up to
             32 tokens each: at 2x a backlog builds and carries over, which is what the scheduler must simulate.

Live: tiny candidates on drift3. engine fraction = seconds inside EarlyExitEngine.generate / step wall seconds,
(a) keeping one arm (after its cold load) and (b) with random feasible arms, where model loads are the rest.

check_env: gymnasium's and stable-baselines3's checkers pass on both (replay and the live tiny env).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

import envs
from envs.model_depth import ModelDepthEnv, _group, env_config
from helios.paths import write_json

# 8 MiB and 2048-token contexts: the tiny models' byte-level tokenizer makes HumanEval prompts ~1,000 tokens long,
# which a smaller budget would refuse (the scheduler reserves prompt + max_tokens of K/V per sequence).
TINY = {
    "candidates": "tiny", "workload": "drift3", "memory_budget_mib": 8.0, "context_tokens": 2048, "new_tokens": 8,
    "judge": "tiny-llama",  # judge_score (the default) under a judge as fast as the tiny candidates
    "exits": [{"criterion": "none"}, {"criterion": "cosine", "threshold": 0.5, "exit_fractions": [0.5]}],
}
OPEN_LOOP_REQUESTS = 24  # a load-1 epoch's requests (epoch_s = this / capacity)


def open_loop_workload(epoch_s: float) -> dict[str, Any]:
    phases = [{"epochs": 5, "load": load, "mixture": mixture}
              for mixture in ({"code": 0.7, "qa": 0.3}, {"prose": 0.7, "qa": 0.3}) for load in (0.6, 2.0)]
    return {"seed": 0, "episode_epochs": 20,
            "arrival": {"kind": "gamma", "cv": 2.0, "epoch_s": epoch_s, "rate_x_capacity": 1.0,
                        "capacity_of": "tiny-llama@2"},
            "output_tokens": {"code": {"median_tokens": 16, "max_tokens": 32}, "prose": {"median_tokens": 16, "max_tokens": 32},
                              "qa": {"dist": "uniform", "min_tokens": 2, "max_tokens": 16}},
            "phases": phases}


def default_traces_cached() -> bool:
    from helios.profiling import trace_path

    cfg = env_config("replay")
    workload = _group("workload", cfg["workload"])
    return all(trace_path(c["name"], workload, cfg["per_source"], cfg["new_tokens"]).exists() for c in cfg["candidates"])


def replay_kwargs(which: str, trace_dir: str) -> dict[str, Any]:
    if which == "default":
        return {}
    return {**TINY, "per_source": 2, "trace_dir": trace_dir}


def open_loop_kwargs(trace_dir: str) -> dict[str, Any]:
    """Tiny candidates on bursts-like load; a first construction measures (and caches) the capacity that sizes
    epoch_s, so that a load-1 epoch holds OPEN_LOOP_REQUESTS requests on any machine."""
    kwargs = {**TINY, "per_source": 2, "trace_dir": trace_dir, "slo": "goodput", "workload": open_loop_workload(1.0)}
    probe = gymnasium.make(envs.ENV_IDS["replay"], **kwargs)
    capacity_rps = probe.unwrapped.capacity["capacity_rps"]
    probe.close()
    return {**kwargs, "workload": open_loop_workload(OPEN_LOOP_REQUESTS / capacity_rps)}


def steps_per_s(env: gymnasium.Env, steps: int, seed: int) -> tuple[float, float, dict[str, float]]:
    """(wall-clock steps/s, CPU-time steps/s, mean requests submitted / finished / queued per step)."""
    mask = env.unwrapped.action_masks()
    actions = np.random.default_rng(seed).choice(np.flatnonzero(mask), size=steps).tolist()
    env.reset(seed=seed)
    step, reset = env.step, env.reset
    submitted = finished = queued = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for action in actions:
        _, _, terminated, _, info = step(action)
        load = info["load"]
        submitted += load["submitted"]
        finished += load["finished"]
        queued += load["queued"]
        if terminated:
            reset()
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return steps / wall_s, steps / cpu_s, {"submitted": submitted / steps, "finished": finished / steps,
                                           "queued_at_end": queued / steps}


def bench_replay(which: str, kwargs: dict[str, Any], steps: int, rounds: int, prefix: str) -> dict[str, Any]:
    start = time.perf_counter()
    env = gymnasium.make(envs.ENV_IDS["replay"], **kwargs)
    construct_s = time.perf_counter() - start
    steps_per_s(env, min(steps, 500), seed=99)  # warm-up (and the passive checker's first-step checks)
    wrapped = [steps_per_s(env, steps, seed=r) for r in range(rounds)]
    raw = [steps_per_s(env.unwrapped, steps, seed=r) for r in range(rounds)]
    unwrapped: ModelDepthEnv = env.unwrapped  # type: ignore[assignment]
    result = {
        f"{prefix}_env": which, f"{prefix}_arms": len(unwrapped.arms),
        f"{prefix}_obs_dim": int(env.observation_space.shape[0]), f"{prefix}_construct_s": construct_s,
        f"{prefix}_steps_per_s": statistics.median(w for w, _, _ in wrapped),
        f"{prefix}_steps_per_cpu_s": statistics.median(c for _, c, _ in wrapped),
        f"{prefix}_steps_per_s_unwrapped": statistics.median(w for w, _, _ in raw),
        f"{prefix}_steps_per_cpu_s_unwrapped": statistics.median(c for _, c, _ in raw),
        f"{prefix}_rounds": [w for w, _, _ in wrapped], f"{prefix}_requests_per_step": wrapped[0][2],
        f"{prefix}_queue_simulated": True,
    }
    if unwrapped.capacity is not None:
        result[f"{prefix}_capacity_rps"] = unwrapped.capacity["capacity_rps"]
        result[f"{prefix}_epoch_s"] = unwrapped.serving.workload.arrival.epoch_s
    env.close()
    return result


def bench_live(steps: int, accuracy_metric: str = "judge_score") -> dict[str, Any]:
    env = gymnasium.make(envs.ENV_IDS["live"], **{**TINY, "accuracy_metric": accuracy_metric})
    unwrapped: ModelDepthEnv = env.unwrapped  # type: ignore[assignment]
    feasible = np.flatnonzero(unwrapped.action_masks())
    env.reset(seed=0)  # measures the reference run (not a step)

    def run(actions: list[int]) -> tuple[float, float, float]:
        engine_s = load_s = wall_s = 0.0
        for action in actions:
            start = time.perf_counter()
            *_, info = env.step(action)
            wall_s += time.perf_counter() - start
            engine_s += info["engine_s"]
            load_s += info["switch_s"]
        return engine_s, load_s, wall_s

    run([int(feasible[0])])  # the cold load of the kept arm
    engine_s, _, wall_s = run([int(feasible[0])] * steps)
    env.reset(seed=1)
    random_arms = np.random.default_rng(1).choice(feasible, size=steps).tolist()
    engine_r, load_r, wall_r = run(random_arms)
    env.close()
    return {
        "live_env": "tiny candidates, drift3", "live_steps": steps, "live_step_s": wall_s / steps,
        "live_engine_fraction": engine_s / wall_s,
        "live_engine_fraction_random_arms": engine_r / wall_r, "live_load_fraction_random_arms": load_r / wall_r,
    }


def run_checkers(which: str, trace_dir: str) -> bool:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    phases = [{"epochs": 1, "mixture": {source: 1.0}} for source in ("code", "prose", "qa")]
    small = {**TINY, "workload": {**_group("workload", "drift3"), "episode_epochs": 3, "phases": phases}}
    ok = True
    for env_id, kwargs in ((envs.ENV_IDS["replay"], replay_kwargs(which, trace_dir)), (envs.ENV_IDS["live"], small)):
        env = gymnasium.make(env_id, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a checker warning counts as a failure
                check_env(env.unwrapped)
                sb3_check_env(env.unwrapped, warn=True)
        except Exception as error:  # report, do not stop the benchmark
            print(f"check_env failed on {env_id}: {type(error).__name__}: {error}")
            ok = False
        finally:
            env.close()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay-env", choices=("auto", "default", "tiny"), default="auto",
                        help="auto: the default env when its traces are cached, else tiny")
    parser.add_argument("--replay-steps", type=int, default=20_000)
    parser.add_argument("--open-loop-steps", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--live-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (live inference, trace recording)")
    parser.add_argument("--trace-dir", default=None, help="tiny traces (default: a folder under the system temp dir)")
    parser.add_argument("--live-accuracy-metric", default="judge_score",
                        help="the live env's accuracy_metric: judge_score (the default: a judge forward per request, "
                             "inside the step) or rouge_l (the framework's own overhead without the judge)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    which = args.replay_env if args.replay_env != "auto" else ("default" if default_traces_cached() else "tiny")
    trace_dir = args.trace_dir or str(Path(tempfile.gettempdir()) / "helios-bench-env-traces")

    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "load_avg_1m_at_start": os.getloadavg()[0], "threads": args.threads,
    }
    results.update(bench_replay(which, replay_kwargs(which, trace_dir), args.replay_steps, args.rounds, "replay"))
    print(f"replay drift3 ({which}, {results['replay_arms']} arms, queue simulated): "
          f"{results['replay_steps_per_s']:,.0f} steps/s through gymnasium.make "
          f"({results['replay_steps_per_cpu_s']:,.0f} per CPU-second), {results['replay_steps_per_s_unwrapped']:,.0f} raw "
          f"({results['replay_steps_per_cpu_s_unwrapped']:,.0f} per CPU-second); construction "
          f"{results['replay_construct_s']:.1f} s; per step {results['replay_requests_per_step']}")
    results.update(bench_replay("tiny", open_loop_kwargs(trace_dir), args.open_loop_steps, args.rounds, "open_loop"))
    print(f"replay open loop (tiny, bursts-like, {results['open_loop_epoch_s']:.3g} s epochs): "
          f"{results['open_loop_steps_per_s']:,.0f} steps/s through gymnasium.make "
          f"({results['open_loop_steps_per_cpu_s']:,.0f} per CPU-second), "
          f"{results['open_loop_steps_per_s_unwrapped']:,.0f} raw; per step {results['open_loop_requests_per_step']}")
    results.update(bench_live(args.live_steps, args.live_accuracy_metric))
    results["live_accuracy_metric"] = args.live_accuracy_metric
    print(f"live (tiny): {results['live_engine_fraction']:.1%} of step time in the engine keeping one arm "
          f"({results['live_step_s'] * 1e3:.0f} ms/step); random arms {results['live_engine_fraction_random_arms']:.1%} "
          f"engine + {results['live_load_fraction_random_arms']:.1%} loads")
    results["check_env"] = run_checkers(which, trace_dir)
    print(f"check_env (gymnasium + stable-baselines3, replay + live): {results['check_env']}")
    results["load_avg_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        write_json(args.json, results, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
