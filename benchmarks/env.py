"""Environment benchmark: replay steps per second, and the share of a live step spent inside the engine.

    python benchmarks/env.py --json outputs/env_bench.json                 # ~1 minute once traces exist
    python benchmarks/env.py --replay-env tiny --live-steps 4 --threads 1    # no real-model traces needed

Replay: steps per second through `gymnasium.make(...)` (its order-enforcing and checker wrappers included) and on the
raw environment, single process, with random feasible actions drawn beforehand; episode resets are part of the
loop, environment construction (trace loading and tabulation) is not. Median of `--rounds` rounds. The default
environment (SmolLM2 + Gemma-3) is used when its traces are cached, else the tiny candidates (the step cost does
not depend on the model: a replay step is a table lookup plus the reward).

Live: tiny candidates on drift3. engine fraction = seconds inside EarlyExitEngine.generate / step wall seconds,
(a) keeping one arm (after its cold load) and (b) with random feasible arms, where model loads are the rest.

check_env: gymnasium's and stable-baselines3's checkers pass on both (replay and the live tiny env).
"""

from __future__ import annotations

import argparse
import json
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
from helios.paths import atomic_file

TINY = {
    "candidates": "tiny", "workload": "drift3", "memory_budget_mib": 1.5, "context_tokens": 512, "new_tokens": 8,
    "exits": [{"criterion": "none"}, {"criterion": "cosine", "threshold": 0.5, "exit_fractions": [0.5]}],
}


def default_traces_cached() -> bool:
    from helios.profiling import trace_path

    cfg = env_config("replay")
    workload = _group("workload", cfg["workload"])
    return all(trace_path(c["name"], workload, cfg["per_source"], cfg["new_tokens"]).exists() for c in cfg["candidates"])


def replay_kwargs(which: str, trace_dir: str) -> dict[str, Any]:
    if which == "default":
        return {}
    return {**TINY, "per_source": 2, "trace_dir": trace_dir}


def steps_per_s(env: gymnasium.Env, steps: int, seed: int) -> float:
    mask = env.unwrapped.action_masks()
    actions = np.random.default_rng(seed).choice(np.flatnonzero(mask), size=steps).tolist()
    env.reset(seed=seed)
    step, reset = env.step, env.reset
    start = time.perf_counter()
    for action in actions:
        if step(action)[2]:
            reset()
    return steps / (time.perf_counter() - start)


def bench_replay(which: str, trace_dir: str, steps: int, rounds: int) -> dict[str, Any]:
    start = time.perf_counter()
    env = gymnasium.make(envs.ENV_IDS["replay"], **replay_kwargs(which, trace_dir))
    construct_s = time.perf_counter() - start
    steps_per_s(env, 2000, seed=99)  # warm-up (and the passive checker's first-step checks)
    wrapped = [steps_per_s(env, steps, seed=r) for r in range(rounds)]
    raw = [steps_per_s(env.unwrapped, steps, seed=r) for r in range(rounds)]
    unwrapped: ModelDepthEnv = env.unwrapped  # type: ignore[assignment]
    result = {
        "replay_env": which, "replay_arms": len(unwrapped.arms), "replay_obs_dim": int(env.observation_space.shape[0]),
        "replay_construct_s": construct_s, "replay_steps_per_s": statistics.median(wrapped),
        "replay_steps_per_s_unwrapped": statistics.median(raw), "replay_rounds": wrapped,
    }
    env.close()
    return result


def bench_live(steps: int) -> dict[str, Any]:
    env = gymnasium.make(envs.ENV_IDS["live"], **TINY)
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
    parser.add_argument("--replay-steps", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--live-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (live inference, trace recording)")
    parser.add_argument("--trace-dir", default=None, help="tiny traces (default: a folder under the system temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    which = args.replay_env if args.replay_env != "auto" else ("default" if default_traces_cached() else "tiny")
    trace_dir = args.trace_dir or str(Path(tempfile.gettempdir()) / "helios-bench-env-traces")

    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "load_avg_1m_at_start": os.getloadavg()[0], "threads": args.threads,
    }
    results.update(bench_replay(which, trace_dir, args.replay_steps, args.rounds))
    print(f"replay ({which}, {results['replay_arms']} arms): {results['replay_steps_per_s']:,.0f} steps/s through "
          f"gymnasium.make, {results['replay_steps_per_s_unwrapped']:,.0f} raw "
          f"(construction {results['replay_construct_s']:.1f} s)")
    results.update(bench_live(args.live_steps))
    print(f"live (tiny): {results['live_engine_fraction']:.1%} of step time in the engine keeping one arm "
          f"({results['live_step_s'] * 1e3:.0f} ms/step); random arms {results['live_engine_fraction_random_arms']:.1%} "
          f"engine + {results['live_load_fraction_random_arms']:.1%} loads")
    results["check_env"] = run_checkers(which, trace_dir)
    print(f"check_env (gymnasium + stable-baselines3, replay + live): {results['check_env']}")
    results["load_avg_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        with atomic_file(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
