"""Agent benchmark: how much of the gap between the best fixed arm and the phase oracle each agent recovers, per
scenario, on the replay env.

    python benchmarks/agent_bench.py --quick --json /tmp/agents.json   # both scenarios, 5 seeds: ~15 s once traces
                                                                       # are cached (first run records them, ~10 min each)
    nice -n 10 python benchmarks/agent_bench.py --json benchmarks/agents.json --md benchmarks/agents.md
    python benchmarks/agent_bench.py --scenarios drift3 --slo throughput --agents ucb,sw_ucb --seeds 10
    python benchmarks/agent_bench.py --quick --scenarios /tmp/w1.yaml,/tmp/w2.yaml --env '{"candidates": "tiny"}'
    python benchmarks/agent_bench.py --scenarios bursts,diurnal,flash --episodes 300 --eval-episodes 10 \
        --no-per-epoch --agents seasonal_q,q_load,lin_ucb,ucb      # long training, learned policies: ~15 min

A scenario is a workload: a conf/workload name or a workload YAML file (named by its stem). Default: bursts (the
main job's scenario: load bursts of 0.4-2x capacity on a code -> prose drift, 8 s epochs) and diurnal (a ramp of chat
traffic, 0.3x -> 1.3x -> 0.3x, 10 s epochs: a different burst pattern and task mix). flash (two 2.5x flash crowds
and a 1.5x surge on a qa/prose -> code/qa mix) is a third, held out: it was written before any agent ran on it. The
closed-loop workloads (drift3, gradual) still run with --scenarios. One env per scenario (gymnasium.make, replay
backend, --slo, --env kwargs) is reused by every run. The default SLO is the main job's, accuracy_under_latency.

Per scenario and seed, every run plays `--episodes` episodes with reset seeds seed * 1000 + episode through the one
rollout loop (agents/rollout.py), so every agent and every yardstick meets the same requests, epoch for epoch. The
yardstick ladder (agents/yardsticks.py, replay-only: it plays every feasible arm) gives:
  static            the reference candidate at full depth without exits, played
  best_fixed        the best arm played fixed for the whole run, in hindsight
  phase_oracle      the best fixed arm per workload phase, in hindsight, PLAYED (switch costs, queue carry-over)
  per_epoch_oracle  each epoch the arm env.evaluate_arms() prices best, played; reported, never a target
  lagged_phase_oracle  the phase oracle's schedule one epoch late (each epoch plays the arm of the phase the previous
                    epoch was in; an episode opens with phase 0's arm): what a causal policy that recognises a phase
                    after one epoch of it, and then knows its best arm, could reach; reported, never a target. The
                    phase oracle switches at boundaries no causal agent sees coming.
Bandits and the HELIOS controller learn online across the episodes, as scripts/train.py; PPO/A2C/DQN/MaskablePPO
train with model.learn for the same episodes (hyper-parameters: conf/agent/<name>.yaml). Then every agent plays
`--eval-episodes` more episodes FROZEN: its greedy policy (Agent.greedy: exploration off, no updates; SB3:
deterministic predict), on the episodes after the training ones (new reset seeds; replay draws their arrivals among
the same `variants` training met: benchmarks/heldout_draws.py scores draws training never saw). The yardsticks cover
the same epochs. A planner (PLANNERS: agents/mpc.py) learns nothing: it plays the evaluation episodes alone, planning
each epoch through replay on draws other than the episode's own.

Definitions (R = mean SLO reward per epoch; rewards are log2 ratios, helios/slo.py):
  gap_recovered  = (R - R_best_fixed) / (R_phase_oracle - R_best_fixed) per seed, then mean ± 95% CI (Student t) over
                   seeds: 0 = the best fixed arm, 1 = the phase oracle. This normalises between two fixed references
                   as RouteLLM's APGR does (Ong et al. 2024, arXiv 2406.18665). Null on a seed whose headroom is
                   under 1.01x (no gap to recover); such seeds are left out of the mean. R and the rungs are taken
                   over the same epochs: `gap_recovered` over the frozen evaluation episodes (the learned policy: the
                   target), `gap_recovered_learning` over the training episodes (exploration included),
                   `gap_recovered_last_episode` over the last training episode.
  regret         = dynamic regret: sum over the run's epochs of (phase oracle's reward - the agent's), paired by epoch
  per_epoch_regret = the same against the per-epoch oracle's price (evaluate_arms max, no switch cost): reported
  headroom       = 2 ** (R_phase_oracle - R_best_fixed): the objective ratio (geometric mean over seeds); target >= 1.3
  best_gap_recovered = the adaptive agent with the highest mean gap_recovered (`best_agent`): that mean; null when
                   no seed has headroom (best_agent is then the one with the highest mean reward). Without evaluation
                   episodes (--eval-episodes 0) gap_recovered is the training episodes' figure.
  vs_static[load] = the best agent's served epochs against static full depth's on the same epochs, per load level
                   (info["load"], else the scenario's phase `load`, else "closed-loop"): ratio of the means of
                   goodput (goodput_rps, higher is better), p95 (latency_p95_s, lower is better), energy (J/token,
                   lower is better), concurrency (sequences in flight, higher serves more), plus throughput and
                   accuracy. A metric the env does not report in info["metrics"] is null, with the reason in `why_null`
                   (goodput and concurrency arrive with the continuous-batching env).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from omegaconf import OmegaConf

import envs  # noqa: F401  (registers the helios ids)
from agents import make_agent
from agents.rollout import Rollout, play
from agents.yardsticks import Ladder, compute_ladder, mean_ci95
from helios.paths import atomic_file, write_json

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "helios/ModelDepthReplay-v0"

SCENARIOS: tuple[str, ...] = ("bursts", "diurnal")
BANDITS: tuple[str, ...] = ("ucb", "thompson", "epsilon_greedy", "exp3", "sw_ucb", "d_ucb", "cusum_ucb", "lin_ucb",
                            "helios", "q_load", "seasonal_q")
SB3: tuple[str, ...] = ("ppo", "a2c", "dqn", "maskable_ppo")
PLANNERS: tuple[str, ...] = ("mpc",)  # learn nothing: they play the evaluation episodes only (agents/mpc.py)
BASELINES: tuple[str, ...] = ("static", "best_fixed", "phase_oracle", "per_epoch_oracle", "lagged_phase_oracle")
# vs_static: contract name -> the info["metrics"] keys that may carry it (first present wins; the continuous-batching
# env may name them differently, so each entry lists the names it is known or expected under).
VS_STATIC_METRICS: dict[str, tuple[str, ...]] = {
    "goodput": ("goodput_rps",),
    "p95": ("latency_p95_s", "e2e_p95_s"),
    "energy": ("energy_j_per_tok",),
    "concurrency": ("concurrency", "mean_concurrency", "running_mean", "mean_running"),
    "throughput": ("throughput_tok_s",),
    "accuracy": ("accuracy",),
}
QUICK_EPISODES = 2
QUICK_EVAL_EPISODES = 1
QUICK_SEEDS = 5
HEADROOM_TARGET = 1.3


class Clairvoyant:
    """A baseline that knows what a learner cannot: `choose(rollout)` picks the arm; it learns nothing."""

    def __init__(self, rollout: Rollout, choose: Callable[[Rollout], int]) -> None:
        self.rollout = rollout
        self.choose = choose

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        return self.choose(self.rollout)

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        pass


def agent_config(name: str) -> dict[str, Any]:
    hyper = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "agent" / f"{name}.yaml"), resolve=True)
    hyper.pop("name")
    return hyper  # type: ignore[return-value]


def scenario_workload(scenario: str) -> tuple[str, str | dict[str, Any], dict[str, Any]]:
    """(name, what gymnasium.make takes as `workload`, the workload config) of a conf/workload name or a YAML file."""
    path = Path(scenario)
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        return path.stem, cfg, cfg  # type: ignore[return-value]
    conf = ROOT / "conf" / "workload" / f"{scenario}.yaml"
    if not conf.exists():
        names = sorted(p.stem for p in conf.parent.glob("*.yaml"))
        raise ValueError(f"unknown scenario {scenario!r}: not a workload YAML file nor one of conf/workload {names}")
    return scenario, scenario, OmegaConf.to_container(OmegaConf.load(conf), resolve=True)  # type: ignore[return-value]


def make_env(workload: str | dict[str, Any], slo: str, env_kwargs: Mapping[str, Any]) -> gymnasium.Env:
    return gymnasium.make(ENV_ID, **{**env_kwargs, "workload": workload, "slo": slo})


class Frozen:
    """A learned agent's greedy policy (Agent.greedy), without updates: what the evaluation episodes play."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        return int(self.agent.greedy(obs, mask))

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        pass


def run_agent(env: gymnasium.Env, name: str, seed: int, episodes: int, eval_episodes: int = 0,
              per_epoch: bool = True) -> list[dict[str, Any]]:
    """One adaptive agent's run through the rollout loop: `episodes` learning, then `eval_episodes` frozen (module
    docstring); its records (with the per-epoch oracle's price unless `per_epoch` is False: pricing every arm each
    epoch is most of a bandit's run time)."""
    rollout = Rollout(env, seed, yardsticks=per_epoch)
    total = episodes * rollout.episode_epochs
    until = (episodes + eval_episodes) * rollout.episode_epochs
    hyper = agent_config(name)
    if name in SB3:
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.monitor import Monitor

        from agents.sb3 import build_model, validate_sb3_config

        validate_sb3_config(name, hyper)

        class Stop(BaseCallback):  # PPO/A2C would finish their last n_steps rollout past `total`
            def _on_step(self) -> bool:
                return rollout.next_epoch < total

        from agents.live_eval import SB3Policy

        model = build_model(name, Monitor(rollout), hyper, seed)
        model.learn(total_timesteps=total, callback=Stop())
        frozen: Any = SB3Policy(model)
    else:
        agent = make_agent(name, int(env.action_space.n), seed=seed, arm_table=env.unwrapped.arm_table,
                           observation_names=env.unwrapped.observation_names, **hyper)
        if callable(getattr(agent, "bind", None)):
            agent.bind(env)  # a planner plays futures through the env (agents/mpc.py)
        if not agent.learns:  # nothing to learn: the evaluation episodes alone (the training ones without any)
            rollout = Rollout(env, seed, yardsticks=per_epoch, first_epoch=total if until > total else 0)
            play(rollout, agent, until)
            return rollout.records
        play(rollout, agent, total)
        frozen = Frozen(agent)
    if until > total:
        play(rollout, frozen, until, learn=False)
    return rollout.records


def run_lagged_phase_oracle(env: gymnasium.Env, seed: int, episodes: int, ladder: Ladder) -> list[dict[str, Any]]:
    """The ladder's phase schedule, one epoch late (module docstring)."""
    rollout = Rollout(env, seed, yardsticks=False)
    phases = [r["phase"] for r in ladder.best_fixed.records[: rollout.episode_epochs]]

    def choose(r: Rollout) -> int:
        epoch = r.next_epoch % r.episode_epochs
        return ladder.phase_schedule[phases[max(epoch - 1, 0)]]

    play(rollout, Clairvoyant(rollout, choose), episodes * rollout.episode_epochs)
    return rollout.records


def run_per_epoch_oracle(env: gymnasium.Env, seed: int, episodes: int) -> list[dict[str, Any]]:
    """Each epoch the arm evaluate_arms() prices best (no switch cost), played: reported, never a target."""
    rollout = Rollout(env, seed)
    play(rollout, Clairvoyant(rollout, lambda r: int(np.argmax(r.arm_rewards()))), episodes * rollout.episode_epochs)
    return rollout.records


# ------------------------------------------------------------------------------------------------- summaries


def score_run(records: list[dict[str, Any]], ladder: Ladder, eval_episodes: int = 0) -> dict[str, Any]:
    """One run against its seed's ladder, each figure against the rungs on the same epochs: the frozen evaluation
    episodes (the last `eval_episodes`; none: the training ones stand in), the training episodes, and the last
    training episode. Dynamic regret and per-epoch regret are over the evaluation epochs too."""
    rewards = [r["reward"] for r in records]
    if records and int(records[0]["epoch"]) > 0:  # a planner's run: the evaluation episodes alone, nothing learned
        scored = ladder.score(rewards, first_epoch=int(records[0]["epoch"]))
        per_epoch = float(sum(r["regret"] for r in records)) if all("regret" in r for r in records) else None
        return {"reward": float(np.mean(rewards)), "gap_recovered": scored["gap_recovered"],
                "gap_recovered_learning": None, "gap_recovered_last_episode": None,
                "regret": scored["dynamic_regret"], "per_epoch_regret": per_epoch}
    split = len(rewards) - eval_episodes * ladder.episode_epochs
    train = ladder.score(rewards[:split])
    last = ladder.score(rewards[split - ladder.episode_epochs:split], first_epoch=split - ladder.episode_epochs)
    scored = ladder.score(rewards[split:], first_epoch=split) if eval_episodes else train
    kept = records[split:] if eval_episodes else records
    per_epoch = (float(sum(r["regret"] for r in kept)) if all("regret" in r for r in kept) else None)
    return {"reward": float(np.mean(rewards[split:] if eval_episodes else rewards)),
            "gap_recovered": scored["gap_recovered"], "gap_recovered_learning": train["gap_recovered"],
            "gap_recovered_last_episode": last["gap_recovered"],
            "regret": scored["dynamic_regret"], "per_epoch_regret": per_epoch}


def load_level(record: Mapping[str, Any], workload_cfg: Mapping[str, Any]) -> str:
    """The epoch's load level: info["load"] when the env reports it, else its phase's `load` in the workload
    config, else "closed-loop" (a fixed batch each epoch: no offered load) or "all"."""
    load = record.get("load")
    if isinstance(load, Mapping):
        load = None  # the env's per-epoch load counters (info["load"]), not a level: read the phase's
    if load is None:
        phases = workload_cfg.get("phases") or []
        phase = record.get("phase")
        if isinstance(phase, int) and 0 <= phase < len(phases):
            load = phases[phase].get("load")
    if load is None:
        return "closed-loop" if (workload_cfg.get("arrival") or {}).get("kind") == "closed" else "all"
    return f"{float(load):g}x capacity"


def vs_static(agent_runs: Sequence[list[dict[str, Any]]], static_runs: Sequence[list[dict[str, Any]]],
              workload_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per load level, the ratio (agent / static) of the means of each VS_STATIC_METRICS metric over the epochs both
    served (same seed, same epoch: the same requests); null where info["metrics"] lacks the metric, with why."""
    pairs: dict[str, list[tuple[Mapping[str, float], Mapping[str, float]]]] = {}
    for agent, static in zip(agent_runs, static_runs):
        for a, s in zip(agent, static):
            if a["masked_action"] or s["masked_action"]:
                continue  # a refused epoch served nothing: its metrics are zeros, not a measurement
            pairs.setdefault(load_level(a, workload_cfg), []).append((a["metrics"], s["metrics"]))
    out: dict[str, dict[str, Any]] = {}
    for level, rows in pairs.items():
        entry: dict[str, Any] = {"epochs": len(rows)}
        why: dict[str, str] = {}
        reported = sorted(rows[0][0])
        for name, keys in VS_STATIC_METRICS.items():
            key = next((k for k in keys if all(k in a and k in s for a, s in rows)), None)
            if key is None:
                entry[name], why[name] = None, f"info['metrics'] has none of {list(keys)} (it reports {reported})"
                continue
            agent_mean = float(np.mean([a[key] for a, _ in rows]))
            static_mean = float(np.mean([s[key] for _, s in rows]))
            if static_mean > 0:
                entry[name] = agent_mean / static_mean
            else:
                entry[name], why[name] = None, f"static full depth's mean {key} is {static_mean:g}: no ratio"
        # The issue's comparison holds "at attainment >= 0.9": both sides' attainment, absolute, so a reader sees
        # where each met the SLO (static full depth cannot above its capacity).
        for side, index in (("agent", 0), ("static", 1)):
            if all("attainment" in pair[index] for pair in rows):
                entry[f"attainment_{side}"] = float(np.mean([pair[index]["attainment"] for pair in rows]))
        entry["why_null"] = why
        out[level] = entry
    return out


def summarise_scenario(name: str, workload_cfg: Mapping[str, Any], ladders: list[Ladder],
                       runs: dict[str, list[list[dict[str, Any]]]], seconds: dict[str, float],
                       eval_episodes: int = 0) -> dict[str, Any]:
    """The contract's scenario entry (module docstring), from each seed's ladder and every run's records."""
    agents: dict[str, Any] = {}
    for agent, per_seed in runs.items():
        scores = [score_run(records, ladder, eval_episodes) for records, ladder in zip(per_seed, ladders)]
        reward, reward_ci = mean_ci95([s["reward"] for s in scores])
        gap, gap_ci = mean_ci95([s["gap_recovered"] for s in scores])
        gap_learning, gap_learning_ci = mean_ci95([s["gap_recovered_learning"] for s in scores])
        gap_last, gap_last_ci = mean_ci95([s["gap_recovered_last_episode"] for s in scores])
        regret, regret_ci = mean_ci95([s["regret"] for s in scores])
        per_epoch_regret = mean_ci95([s["per_epoch_regret"] for s in scores])[0]
        agents[agent] = {"adaptive": agent not in BASELINES, "reward": reward, "reward_ci95": reward_ci,
                         "gap_recovered": gap, "gap_recovered_ci95": gap_ci,
                         "gap_recovered_learning": gap_learning, "gap_recovered_learning_ci95": gap_learning_ci,
                         "gap_recovered_last_episode": gap_last, "gap_recovered_last_episode_ci95": gap_last_ci,
                         "gap_recovered_per_seed": [s["gap_recovered"] for s in scores],
                         "regret": regret, "regret_ci95": regret_ci, "per_epoch_regret": per_epoch_regret,
                         "seconds": seconds.get(agent, 0.0)}
    # The best agent by mean gap recovered; on a scenario without headroom (no gap on any seed) by mean reward, so
    # vs_static still names the agent a user would deploy.
    adaptive = [a for a in agents if agents[a]["adaptive"]]
    with_gap = [a for a in adaptive if agents[a]["gap_recovered"] is not None]
    best = (max(with_gap, key=lambda a: agents[a]["gap_recovered"]) if with_gap
            else max(adaptive, key=lambda a: agents[a]["reward"]) if adaptive else None)
    gaps = [ladder.phase_oracle_reward - ladder.best_fixed_reward for ladder in ladders]
    best_fixed = Counter(ladder.labels[ladder.best_fixed_arm] for ladder in ladders).most_common(1)[0][0]
    static_runs = [ladder.static.records for ladder in ladders] if all(ladder.static for ladder in ladders) else None
    if best is None:
        comparison: dict[str, Any] = {}
        why_no_vs_static = "no adaptive agent was run (--agents)"
    elif static_runs is None:
        comparison, why_no_vs_static = {}, ladders[0].why_no_static
    else:
        # The learned policy's epochs (the frozen evaluation episodes) when there are any.
        cut = -eval_episodes * ladders[0].episode_epochs if eval_episodes else 0
        comparison, why_no_vs_static = vs_static([r[cut:] for r in runs[best]], [r[cut:] for r in static_runs],
                                                 workload_cfg), None
    return {
        "headroom": float(2.0 ** np.mean(gaps)), "headroom_ci95_log2": mean_ci95(gaps)[1],
        "headroom_per_seed": [ladder.headroom for ladder in ladders],
        "headroom_objective": float(np.exp(np.mean([np.log(ladder.headroom_objective) for ladder in ladders]))),
        "headroom_target": HEADROOM_TARGET, "headroom_met": bool(2.0 ** np.mean(gaps) >= HEADROOM_TARGET),
        "best_fixed_arm": best_fixed,
        "best_fixed_arm_per_seed": [ladder.labels[ladder.best_fixed_arm] for ladder in ladders],
        "best_fixed_reward": float(np.mean([ladder.best_fixed_reward for ladder in ladders])),
        "phase_oracle_reward": float(np.mean([ladder.phase_oracle_reward for ladder in ladders])),
        "phase_oracle_is_fixed_per_seed": [ladder.phase_oracle_is_fixed for ladder in ladders],
        "phase_schedule_per_seed": [ladder.summary()["phase_schedule"] for ladder in ladders],
        "static_reward": (float(np.mean([ladder.static.mean_reward for ladder in ladders]))
                          if static_runs is not None else None),
        "agents": agents, "best_agent": best,
        "best_gap_recovered": agents[best]["gap_recovered"] if best else None,
        "best_gap_recovered_ci95": agents[best]["gap_recovered_ci95"] if best else None,
        "vs_static": comparison, "vs_static_agent": best, "why_no_vs_static": why_no_vs_static,
        "episode_epochs": ladders[0].episode_epochs, "scenario": name,
    }


# ------------------------------------------------------------------------------------------------- the run


def bench_scenario(scenario: str, slo: str, agents: list[str], seeds: list[int], episodes: int,
                   env_kwargs: Mapping[str, Any], log: Callable[[str], None], eval_episodes: int = 0,
                   per_epoch: bool = True) -> dict[str, Any]:
    name, workload, workload_cfg = scenario_workload(scenario)
    env = make_env(workload, slo, env_kwargs)
    ladders: list[Ladder] = []
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    seconds: dict[str, float] = {}

    def timed(agent: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
        start = time.perf_counter()
        runs.setdefault(agent, []).append(fn())
        seconds[agent] = seconds.get(agent, 0.0) + time.perf_counter() - start

    try:
        for seed in seeds:
            start = time.perf_counter()
            ladder = compute_ladder(env, seed, episodes + eval_episodes)
            seconds["ladder"] = seconds.get("ladder", 0.0) + time.perf_counter() - start
            ladders.append(ladder)
            if ladder.static is not None:
                runs.setdefault("static", []).append(ladder.static.records)
            runs.setdefault("best_fixed", []).append(ladder.best_fixed.records)
            runs.setdefault("phase_oracle", []).append(ladder.phase_oracle.records)
            played = episodes + eval_episodes
            if per_epoch:
                timed("per_epoch_oracle", lambda: run_per_epoch_oracle(env, seed, played))
            timed("lagged_phase_oracle", lambda: run_lagged_phase_oracle(env, seed, played, ladder))
            for agent in agents:
                timed(agent, lambda: run_agent(env, agent, seed, episodes, eval_episodes, per_epoch))
            log(f"  {name}: seed {seed} done (headroom {ladder.headroom:.3f}, best fixed "
                f"{ladder.labels[ladder.best_fixed_arm]})")
    finally:
        env.close()
    summary = summarise_scenario(name, workload_cfg, ladders, runs, seconds, eval_episodes)
    summary["ladder_seconds"] = seconds.get("ladder", 0.0)
    return summary


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def planner_note(result: dict[str, Any]) -> str:
    """The header's word on planners (PLANNERS) among the agents: they play the evaluation episodes alone."""
    planners = sorted({a for s in result["scenarios"].values() for a in s["agents"] if a in PLANNERS})
    if not planners:
        return ""
    return (f" Planners ({', '.join(planners)}) learn nothing: they play the evaluation episodes alone, so their "
            "training columns are empty.")


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}`", "",
             f"Replay, SLO {result['slo']}; {len(result['seeds'])} seeds x ({result['episodes']} training + "
             f"{result.get('eval_episodes', 0)} frozen evaluation episodes); mean ± 95% "
             "CI (t) over seeds. gap = (R - R_best_fixed) / (R_phase_oracle - R_best_fixed) (RouteLLM's APGR form) "
             "over the evaluation episodes (the learned greedy policy; R too), learning = over the training ones; "
             "regret = dynamic regret vs the played phase oracle (sum over epochs); per-epoch regret vs the "
             "per-epoch oracle's price (reported, never a target); headroom = 2 ** (R_phase_oracle - R_best_fixed)."
             + planner_note(result), ""]
    for name, s in result["scenarios"].items():
        lines += [f"### {name}: headroom {fmt(s['headroom'])}x (target {HEADROOM_TARGET}x), best fixed arm "
                  f"`{s['best_fixed_arm']}`, best agent `{s['best_agent']}` gap {fmt(s['best_gap_recovered'], 2)}"
                  f" ± {fmt(s['best_gap_recovered_ci95'], 2)}", "",
                  "| agent | R | gap recovered | gap while learning | last training episode's gap | regret (vs phase "
                  "oracle) | per-epoch regret | s |",
                  "|---|---|---|---|---|---|---|---|"]
        ranked = sorted(s["agents"].items(), key=lambda kv: -(kv[1]["reward"] or -math.inf))
        for agent, a in ranked:
            lines.append(f"| {agent}{'' if a['adaptive'] else ' (yardstick)'} | {fmt(a['reward'])} ± "
                         f"{fmt(a['reward_ci95'])} | {fmt(a['gap_recovered'], 2)} ± {fmt(a['gap_recovered_ci95'], 2)} "
                         f"| {fmt(a.get('gap_recovered_learning'), 2)} ± {fmt(a.get('gap_recovered_learning_ci95'), 2)} "
                         f"| {fmt(a.get('gap_recovered_last_episode'), 2)} ± "
                         f"{fmt(a.get('gap_recovered_last_episode_ci95'), 2)} "
                         f"| {fmt(a['regret'], 2)} ± {fmt(a['regret_ci95'], 2)} | {fmt(a['per_epoch_regret'], 2)} | "
                         f"{a['seconds']:.1f} |")
        if s["vs_static"]:
            lines += ["", f"vs static full depth (`{s['vs_static_agent']}`, ratio of means, same epochs):", "",
                      "| load | epochs | " + " | ".join(VS_STATIC_METRICS) + " | attainment agent / static |",
                      "|---" * (len(VS_STATIC_METRICS) + 3) + "|"]
            for level, v in sorted(s["vs_static"].items()):
                lines.append(f"| {level} | {v['epochs']} | " + " | ".join(fmt(v[m], 3) for m in VS_STATIC_METRICS)
                             + f" | {fmt(v.get('attainment_agent'), 2)} / {fmt(v.get('attainment_static'), 2)} |")
            lines += ["", "Beside HELIOS (Kumar et al. 2025, vs static full depth on a GPU with models trained to exit "
                          "early): goodput ~ throughput 1.48x, p95 0.72 (1.39x lower latency), energy 0.91 (1.10x "
                          "efficiency), concurrency 3.7x. Here p95 and energy are agent / static (lower is better); "
                          "energy is the `model` estimate (CPU time x power), not a hardware counter."]
            nulls = {m: w for v in s["vs_static"].values() for m, w in v["why_null"].items()}
            lines += [f"- {m}: null: {w}" for m, w in nulls.items()]
        else:
            lines += ["", f"vs static: unavailable: {s['why_no_vs_static']}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def trace_files(workload_cfg: Mapping[str, Any], env_kwargs: Mapping[str, Any]) -> dict[str, str] | str:
    """Where the replay traces of a scenario come from (provenance for the JSON); a sentence when unknown."""
    try:
        from helios.profiling import trace_path

        cfg = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "env" / "replay.yaml"), resolve=True),
               **env_kwargs}
        if cfg.get("traces"):
            return {k: str(v) for k, v in dict(cfg["traces"]).items()}
        candidates = cfg["candidates"]
        if isinstance(candidates, str):
            candidates = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "candidates" / f"{candidates}.yaml"),
                                                resolve=True)
        candidates = candidates.get("shortlist") if isinstance(candidates, dict) else candidates
        out_dir = Path(cfg["trace_dir"]).expanduser() if cfg.get("trace_dir") else None
        return {c["name"]: str(trace_path(c["name"], dict(workload_cfg), cfg["per_source"], cfg["new_tokens"], out_dir))
                for c in candidates}
    except Exception as error:  # provenance only: never fail a benchmark on it
        return f"unknown ({type(error).__name__}: {error})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated conf/workload names or workload YAML files")
    parser.add_argument("--slo", default="accuracy_under_latency", help="a conf/slo name")
    parser.add_argument("--agents", default=",".join((*BANDITS, *SB3, *PLANNERS)),
                        help="adaptive agents (yardsticks always run)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (at least 5 for the 95%% intervals)")
    parser.add_argument("--episodes", type=int, default=20, help="training episodes per run (drift3: 30 epochs each)")
    parser.add_argument("--eval-episodes", type=int, default=3,
                        help="frozen evaluation episodes after training (the learned policy's gap_recovered)")
    parser.add_argument("--no-per-epoch", dest="per_epoch", action="store_false",
                        help="skip the per-epoch oracle and per-epoch regret (they price every arm every epoch: "
                             "most of a long run's time)")
    parser.add_argument("--env", default="{}", help="JSON of extra gymnasium.make kwargs (e.g. tiny candidates)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (SB3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SEEDS} seeds x {QUICK_EPISODES} episodes per scenario: minutes")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seeds = list(range(QUICK_SEEDS if args.quick else args.seeds))
    episodes = QUICK_EPISODES if args.quick else args.episodes
    eval_episodes = QUICK_EVAL_EPISODES if args.quick else args.eval_episodes
    if eval_episodes < 0 or episodes < 1:
        parser.error(f"--episodes must be >= 1 and --eval-episodes >= 0; got {episodes} and {eval_episodes}")
    scenarios = [s for s in args.scenarios.split(",") if s]
    agents = [a for a in args.agents.split(",") if a]
    unknown = [a for a in agents if a not in (*BANDITS, *SB3, *PLANNERS)]
    if unknown:
        parser.error(f"unknown agent(s) {unknown}; valid: {[*BANDITS, *SB3, *PLANNERS]}")
    for scenario in scenarios:
        try:
            scenario_workload(scenario)
        except ValueError as error:
            parser.error(str(error))
    env_kwargs = json.loads(args.env)
    if "workload" in env_kwargs or "slo" in env_kwargs:
        parser.error("--env may not set workload or slo: use --scenarios and --slo")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/agent_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": {"id": ENV_ID, **env_kwargs}, "slo": args.slo, "seeds": seeds, "episodes": episodes,
        "eval_episodes": eval_episodes,
        "agent_config": {a: agent_config(a) for a in agents},  # conf/agent/<name>.yaml as run (provenance)
        "trace_files": {s: trace_files(scenario_workload(s)[2], env_kwargs) for s in scenarios},
        "definitions": {
            "gap_recovered": "(R - R_best_fixed) / (R_phase_oracle - R_best_fixed) per seed, R = mean reward per "
                             "epoch over the frozen evaluation episodes (the learned greedy policy), the rungs over "
                             "the same epochs; mean and 95% t half-width over seeds (RouteLLM's APGR form, Ong et "
                             "al. 2024)",
            "gap_recovered_learning": "the same over the training episodes, exploration included",
            "regret": "dynamic regret: sum over epochs of (played phase oracle's reward - the agent's), same epochs",
            "per_epoch_regret": "sum over epochs of (max over arms of evaluate_arms() - reward): reported only",
            "headroom": "2 ** (R_phase_oracle - R_best_fixed): the SLO objective ratio (rewards are log2 ratios); "
                        "geometric mean over seeds",
            "phase_oracle": "each workload phase's best arm in the fixed-arm runs, played (switches, queues); the "
                            "best fixed arm when that schedule earns less",
            "vs_static": "best agent / static full depth, ratio of means over the epochs both served, per load",
        },
        "replay_only": "the yardstick ladder plays every arm: live runs have no ladder", "scenarios": {},
    }
    for scenario in scenarios:
        print(f"scenario {scenario}", flush=True)
        entry = bench_scenario(scenario, args.slo, agents, seeds, episodes, env_kwargs, lambda m: print(m, flush=True),
                               eval_episodes, args.per_epoch)
        result["scenarios"][entry["scenario"]] = entry
    result["wall_s"] = time.perf_counter() - started
    text = markdown(result)
    print(text)
    if args.md:
        with atomic_file(args.md, "w") as handle:
            handle.write(text)
    if args.json:
        write_json(args.json, finite_or_null(result), indent=1, allow_nan=False)
    return result


def finite_or_null(value: Any) -> Any:
    """NaN/inf -> null, so the JSON file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, np.generic):
        return finite_or_null(value.item())
    return value


if __name__ == "__main__":
    main()
