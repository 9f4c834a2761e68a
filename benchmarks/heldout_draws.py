"""Held-out draws: does a policy learned on replay's training draws of a workload hold on draws it never met?

    python benchmarks/heldout_draws.py --json benchmarks/heldout_draws.json       # seasonal_q, bursts and flash
    python benchmarks/heldout_draws.py --agents seasonal_q,ucb --scenarios bursts,diurnal,flash --seeds 5
    python benchmarks/heldout_draws.py --scenarios diurnal --seeds 1 --explain-seeds 0    # where the gap is lost

agent_bench.py scores a learned policy frozen on episodes after its training ones, but replay draws every episode's
arrivals among the env's `variants` (conf/env/replay.yaml: 32), so those episodes' draws were met in training. Here,
per scenario and seed: the agent trains for `--episodes` on the training env (variants 0..N-1, N = --train-variants,
drawn per episode as in training); then, on an env with 8 more variants, the yardstick ladder (agents/yardsticks.py:
best fixed arm, phase oracle refined by coordinate ascent, both in hindsight ON THE HELD-OUT EPISODES) and the frozen
greedy agent play `--eval-episodes` episodes on 8 draws from --heldout-first (default N) only
(`reset(options={"variant": k})`): draws of arrival times, sources and output lengths that training never saw. The
same held-out draws compare training sets: `--train-variants 8 --heldout-first 32` against `--train-variants 32`.
gap = (R_agent - R_best_fixed) / (R_phase_oracle - R_best_fixed) on those episodes, mean ± 95% t over seeds. A
planner (agents/mpc.py: learns nothing) skips training and plans on the training draws 0..N-1 alone.
Replay only; accuracy judges each arm's free-running output; SLO accuracy_under_latency by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # agent_bench, beside this file

import envs  # noqa: F401  (registers the helios ids)
from agent_bench import ENV_ID, Frozen, agent_config, scenario_workload
from agents import AGENTS, make_agent
from agents.rollout import Rollout, play
from agents.yardsticks import compute_ladder, mean_ci95
from envs.model_depth import env_config
from helios.paths import write_json

TRAIN_VARIANTS = int(env_config("replay")["variants"])  # conf/env/replay.yaml's default: the draws training meets
HELDOUT_VARIANTS = 8  # held-out draws per evaluation


def heldout_draws(first: int) -> Any:
    """Evaluation episode e plays draw first + e mod HELDOUT_VARIANTS: never one training drew (first >= the training
    env's variants)."""
    return lambda episode: {"variant": first + episode % HELDOUT_VARIANTS}


def explain(ladder: Any, records: list[dict[str, Any]], log: Any) -> None:
    """Per epoch of the episode, over the held-out episodes: mean reward of the agent, the phase oracle and the best
    fixed arm, and the arm each played most often (where a policy loses its gap)."""
    epochs = ladder.episode_epochs
    agent = np.array([r["reward"] for r in records])
    oracle, fixed = ladder.phase_oracle.rewards, ladder.best_fixed.rewards
    log("  epoch | agent | phase oracle | best fixed | agent's arm | oracle's arm")
    for e in range(epochs):
        idx = list(range(e, len(agent), epochs))
        mode = lambda rs: Counter(rs[i]["arm"] for i in idx).most_common(1)[0][0]  # noqa: E731
        log(f"  {e} | {agent[idx].mean():.2f} | {oracle[idx].mean():.2f} | {fixed[idx].mean():.2f} | "
            f"{mode(records)} | {mode(ladder.phase_oracle.records)}")


def run(scenario: str, slo: str, agents: list[str], seeds: list[int], episodes: int, eval_episodes: int,
        log: Any, explain_seeds: tuple[int, ...] = (), train_variants: int = TRAIN_VARIANTS,
        heldout_first: int | None = None) -> dict[str, Any]:
    name, workload, _ = scenario_workload(scenario)
    first = train_variants if heldout_first is None else heldout_first
    if first < train_variants:
        raise ValueError(f"held-out draws start at {first}, inside the training draws 0..{train_variants - 1}")
    heldout = heldout_draws(first)
    train_env = gymnasium.make(ENV_ID, workload=workload, slo=slo, variants=train_variants)
    eval_env = gymnasium.make(ENV_ID, workload=workload, slo=slo, variants=first + HELDOUT_VARIANTS)
    gaps: dict[str, list[float | None]] = {a: [] for a in agents}
    headrooms = []
    try:
        for seed in seeds:
            ladder = compute_ladder(eval_env, seed, eval_episodes, reset_options=heldout)
            headrooms.append(ladder.headroom)
            for agent_name in agents:
                hyper = agent_config(agent_name)
                learns = AGENTS[agent_name].learns if agent_name in AGENTS else True
                if not learns:  # a planner: it plans on the training draws
                    hyper["plan_draws"] = list(range(train_variants))
                agent = make_agent(agent_name, int(train_env.action_space.n), seed=seed,
                                   arm_table=train_env.unwrapped.arm_table,
                                   observation_names=train_env.unwrapped.observation_names, **hyper)
                rollout = Rollout(eval_env, seed, yardsticks=False, reset_options=heldout)
                if learns:
                    play(Rollout(train_env, seed, yardsticks=False), agent, episodes * ladder.episode_epochs)
                    play(rollout, Frozen(agent), eval_episodes * ladder.episode_epochs, learn=False)
                else:
                    agent.bind(eval_env)
                    play(rollout, agent, eval_episodes * ladder.episode_epochs)
                gaps[agent_name].append(ladder.score([r["reward"] for r in rollout.records])["gap_recovered"])
                if seed in explain_seeds:
                    log(f"  {name} seed {seed}, {agent_name}, per epoch over the held-out episodes:")
                    explain(ladder, rollout.records, log)
            log(f"  {name} seed {seed}: headroom {ladder.headroom:.3f}, "
                + ", ".join(f"{a} {gaps[a][-1]}" for a in agents))
    finally:
        train_env.close()
        eval_env.close()
    return {"headroom": float(np.exp(np.mean(np.log(headrooms)))), "headroom_per_seed": headrooms,
            "agents": {a: {"gap_recovered": mean_ci95(g)[0], "gap_recovered_ci95": mean_ci95(g)[1],
                           "gap_recovered_per_seed": g} for a, g in gaps.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="bursts,flash")
    parser.add_argument("--slo", default="accuracy_under_latency")
    parser.add_argument("--agents", default="seasonal_q")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=300, help="training episodes")
    parser.add_argument("--eval-episodes", type=int, default=16, help="held-out episodes (8 draws, twice each)")
    parser.add_argument("--train-variants", type=int, default=TRAIN_VARIANTS,
                        help="draws training meets (0..N-1)")
    parser.add_argument("--heldout-first", type=int, default=None,
                        help="first held-out draw (default: --train-variants); the held-out draws are it..it+7")
    parser.add_argument("--explain-seeds", default="", help="seeds whose per-epoch table to print, e.g. 0,2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    first = args.train_variants if args.heldout_first is None else args.heldout_first
    result: dict[str, Any] = {
        "command": "python benchmarks/heldout_draws.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "slo": args.slo, "episodes": args.episodes, "eval_episodes": args.eval_episodes,
        "train_variants": list(range(args.train_variants)),
        "heldout_variants": list(range(first, first + HELDOUT_VARIANTS)),
        "replay": "accuracy: each arm's free-running output at the trace's served length "
                  "(judge: SmolLM2-135M at full depth); energy modelled", "scenarios": {},
    }
    agents = [a for a in args.agents.split(",") if a]
    for scenario in [s for s in args.scenarios.split(",") if s]:
        print(f"scenario {scenario}", flush=True)
        result["scenarios"][scenario] = run(scenario, args.slo, agents, list(range(args.seeds)), args.episodes,
                                            args.eval_episodes, lambda m: print(m, flush=True),
                                            tuple(int(x) for x in args.explain_seeds.split(",") if x),
                                            args.train_variants, first)
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps({s: {a: (v["gap_recovered"], v["gap_recovered_ci95"]) for a, v in r["agents"].items()}
                      | {"headroom": r["headroom"]} for s, r in result["scenarios"].items()}, indent=1))
    if args.json:
        write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    main()
