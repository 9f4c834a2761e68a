"""Agent benchmark: SLO reward, regret and serving gains of every agent against the oracle and static full depth.

    nice -n 10 python benchmarks/agent_bench.py --json benchmarks/agents.json --md benchmarks/agents.md   # ~10 min
    python benchmarks/agent_bench.py --quick --slos throughput --env '{"candidates": "tiny", "trace_dir": "/tmp/t"}'

Replay env (default: SmolLM2-135M + Gemma-3-270M, cached traces), the drifting 3-phase workload drift3 (code ->
prose -> qa, 10 epochs each), one env per SLO built with gymnasium.make and reused by every run. Each agent runs
`--episodes` episodes per seed with the same per-episode reset seeds (seed * 1000 + episode, as scripts/train.py),
so every agent meets the same request samples and epochs pair up across agents. Bandits and the HELIOS controller
learn online across episodes exactly as in scripts/train.py; PPO/A2C/DQN/MaskablePPO train with model.learn for
the same number of epochs (a small budget: `--episodes` x 30 steps) and are scored on the epochs they trained on.
Hyper-parameters: conf/agent/<name>.yaml, as train.py uses them.

Baselines: `static` = the reference candidate at full depth without exits (HELIOS's baseline); `best_in_hindsight`
= the single arm with the highest summed reward over the run, known in advance, played; `oracle` = each epoch the arm
with the best reward on that epoch, played (it pays switching); `phase_oracle` = in each workload phase the arm with
the best summed reward over the phase, played (it knows the phases, not each epoch's request draw). `R_oracle` (the bound) = the mean over epochs of
max over arms of the epoch's reward without switching cost (env.evaluate_arms), the same bound scripts/train.py uses
for regret.

Definitions, per SLO and seed, R = mean reward per epoch over the whole run (learning included):
  reward_fraction_of_oracle = (R - R_static) / (R_oracle - R_static)   0 = static full depth, 1 = the bound; well
                              defined for negative rewards (the headline number; the 0.9 target applies to it)
  reward_fraction_of_phase_oracle = (R - R_static) / (R_phase_oracle - R_static)   the same against the played
                              phase oracle (reported beside the headline: how much of the gap is per-epoch noise)
  reward_ratio_to_oracle    = R / R_oracle                              the plain ratio; with negative rewards it
                              reads upside down (> 1 is worse), reported because it was asked for
  regret                    = sum over epochs of (max over arms of the epoch's reward - the reward earned)
Gains vs static full depth come from the env's info metrics of the agent's served epochs against the static agent's
epochs, paired epoch by epoch (same seed, same requests): the geometric mean of the per-epoch ratios of
throughput_tok_s (x higher), latency_p95_s (x lower),
energy_j_per_tok (tokens/J, x higher), batch_size (x larger), accuracy (ratio; HELIOS's gains hold "at the accuracy
floor", i.e. accuracy >= 0.9 x static's, the floor in conf/slo/*.yaml; accuracy is a ratio of means over the paired
epochs, since an epoch's accuracy can be 0). Epochs refused as masked (infeasible arm:
nothing served, metrics all zero) are left out of the gains and counted in `masked_share`.
HELIOS (arXiv 2504.10724) margins over static full depth: 1.48x throughput, 1.39x lower latency, 1.10x energy
efficiency, 3.7x batch size. `gain_vs_static[slo]` is the best adaptive agent's gain in the SLO's own metric
(balanced: geometric mean of the four metric gains).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from omegaconf import OmegaConf
from scipy import stats

import envs  # noqa: F401  (registers the helios ids)
from agents import make_agent
from agents.rollout import Rollout, play, reference_candidate, static_arm_index
from helios.paths import atomic_file

ROOT = Path(__file__).resolve().parents[1]

SLOS: tuple[str, ...] = ("throughput", "latency", "energy", "accuracy", "balanced")
BANDITS: tuple[str, ...] = ("ucb", "thompson", "epsilon_greedy", "exp3", "sw_ucb", "d_ucb", "cusum_ucb", "lin_ucb",
                            "helios")
SB3: tuple[str, ...] = ("ppo", "a2c", "dqn", "maskable_ppo")
BASELINES: tuple[str, ...] = ("static", "best_in_hindsight", "phase_oracle", "oracle")
METRIC_KEYS: tuple[str, ...] = ("throughput_tok_s", "latency_p95_s", "energy_j_per_tok", "accuracy")
# HELIOS's reported gains over static full depth, and the metric each SLO is judged on.
HELIOS_MARGINS: dict[str, float] = {"throughput": 1.48, "latency": 1.39, "energy": 1.10, "batch_size": 3.7}
HEADLINE_GAIN: dict[str, str] = {"throughput": "throughput", "latency": "latency", "energy": "energy",
                                 "accuracy": "accuracy", "balanced": "geomean"}
FRACTION_TARGET = 0.9
ACCURACY_FLOOR = 0.9


@dataclass
class RunLog:
    """Every epoch of one agent's run on one seed, from the rollout's records: reward, the epoch's oracle bound,
    served metrics."""

    rewards: list[float] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)
    arm_rewards: list[np.ndarray] = field(default_factory=list)  # kept for the oracle run only
    phases: list[str] = field(default_factory=list)
    metrics: list[list[float]] = field(default_factory=list)  # METRIC_KEYS, per epoch
    batch_sizes: list[int] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def of(cls, rollout: Rollout) -> RunLog:
        records = rollout.records
        return cls(rewards=[r["reward"] for r in records], bounds=[r["oracle_reward"] for r in records],
                   arm_rewards=list(rollout.arm_rewards_log), phases=[str(r["phase"]) for r in records],
                   metrics=[[float(r["metrics"][k]) for k in METRIC_KEYS] for r in records],
                   batch_sizes=[r["batch_size"] for r in records], masked=[r["masked_action"] for r in records],
                   actions=[r["action"] for r in records])


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


def rollout_for(env: gymnasium.Env, seed: int, keep_arm_rewards: bool = False) -> Rollout:
    """The rollout loop's wrapper (agents/rollout.py): reset seeds seed * 1000 + episode, as scripts/train.py, so
    every agent meets the same requests; yardsticks (the epoch's oracle bound) taken before each step."""
    rollout = Rollout(env, seed, keep_arm_rewards=keep_arm_rewards)
    if not rollout.has_yardsticks:
        raise ValueError(f"the agent benchmark needs per-epoch oracle rewards: {rollout.why_no_yardsticks}")
    return rollout


def run_bandit(env: gymnasium.Env, name: str, seed: int, episodes: int) -> RunLog:
    """Bandits and the HELIOS controller learn online across episodes, through agents.rollout.play."""
    hyper = agent_config(name)
    if name == "helios":
        hyper["arm_table"] = env.unwrapped.arm_table
    agent = make_agent(name, int(env.action_space.n), seed=seed, **hyper)
    rollout = rollout_for(env, seed)
    play(rollout, agent, episodes * rollout.episode_epochs)
    return RunLog.of(rollout)


def run_static(env: gymnasium.Env, arm: int, seed: int, episodes: int) -> RunLog:
    agent = make_agent("static", int(env.action_space.n), seed=seed, arm=int(arm))
    rollout = rollout_for(env, seed)
    play(rollout, agent, episodes * rollout.episode_epochs)
    return RunLog.of(rollout)


def run_oracle(env: gymnasium.Env, seed: int, episodes: int) -> RunLog:
    """Each epoch the arm with the best reward on that epoch (the rollout's per-arm rewards), played: it pays
    switching. Keeps every epoch's per-arm rewards for the hindsight baselines."""
    rollout = rollout_for(env, seed, keep_arm_rewards=True)
    play(rollout, Clairvoyant(rollout, lambda r: int(np.argmax(r.arm_rewards()))), episodes * rollout.episode_epochs)
    return RunLog.of(rollout)


def run_phase_oracle(env: gymnasium.Env, seed: int, episodes: int, oracle: RunLog) -> RunLog:
    """Plays, in each workload phase, the arm with the highest summed reward over that phase's epochs of the run
    (per-arm rewards and phases from the oracle run on the same epochs): a clairvoyant of the workload's phases,
    not of each epoch's request draw."""
    phases = np.asarray(oracle.phases)
    arm_rewards = np.asarray(oracle.arm_rewards)
    finite = np.where(np.isfinite(arm_rewards), arm_rewards, -1e9)
    best = {phase: int(np.argmax(finite[phases == phase].sum(axis=0))) for phase in set(phases.tolist())}
    rollout = rollout_for(env, seed)
    play(rollout, Clairvoyant(rollout, lambda r: best[oracle.phases[r.next_epoch]]), episodes * rollout.episode_epochs)
    return RunLog.of(rollout)


def run_sb3(env: gymnasium.Env, name: str, seed: int, episodes: int) -> RunLog:
    """PPO/A2C/DQN/MaskablePPO train with model.learn on the rollout wrapper for exactly episodes x epochs steps
    and are scored on the epochs they trained on."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor

    from agents.sb3 import build_model, validate_sb3_config

    hyper = agent_config(name)
    validate_sb3_config(name, hyper)
    rollout = rollout_for(env, seed)
    total = episodes * rollout.episode_epochs

    class Stop(BaseCallback):  # PPO/A2C would finish their last n_steps rollout past `total`
        def _on_step(self) -> bool:
            return rollout.next_epoch < total

    model = build_model(name, Monitor(rollout), hyper, seed)
    model.learn(total_timesteps=total, callback=Stop())
    return RunLog.of(rollout)


# ------------------------------------------------------------------------------------------------- summaries


def mean_ci95(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    if array.size < 2:
        return float(array.mean()), math.nan
    return float(array.mean()), float(stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))


def served_means(logs: list[RunLog]) -> dict[str, float]:
    """Means over the served (not masked) epochs of all seeds: metrics and batch size."""
    metrics = np.concatenate([np.asarray(log.metrics, dtype=float).reshape(-1, len(METRIC_KEYS)) for log in logs])
    batch = np.concatenate([np.asarray(log.batch_sizes, dtype=float) for log in logs])
    served = ~np.concatenate([np.asarray(log.masked, dtype=bool) for log in logs])
    if not served.any():
        return {**dict.fromkeys(METRIC_KEYS, math.nan), "batch_size": math.nan}
    means = dict(zip(METRIC_KEYS, metrics[served].mean(axis=0).tolist()))
    means["batch_size"] = float(batch[served].mean())
    return means


def gains(agent_logs: list[RunLog], static_logs: list[RunLog]) -> dict[str, float]:
    """Gains over static full depth, paired by epoch: the agent's and static's runs of a seed meet the same
    requests epoch for epoch, so each metric's gain is the geometric mean over served epochs of the per-epoch ratio
    (a ratio of means would let a few epochs of a very fast, inaccurate arm stand for the run). Accuracy, which can
    be 0 on an epoch, is the ratio of its means over the same epochs."""
    ratios: dict[str, list[float]] = {"throughput": [], "latency": [], "energy": [], "batch_size": []}
    accuracy = [0.0, 0.0]
    for agent, static in zip(agent_logs, static_logs):
        n = min(len(agent.rewards), len(static.rewards))
        for t in range(n):
            if agent.masked[t] or static.masked[t]:
                continue
            a, s = agent.metrics[t], static.metrics[t]  # METRIC_KEYS order
            if min(a[0], a[1], a[2], s[0], s[1], s[2]) <= 0:
                continue
            ratios["throughput"].append(a[0] / s[0])
            ratios["latency"].append(s[1] / a[1])
            ratios["energy"].append(s[2] / a[2])
            ratios["batch_size"].append(agent.batch_sizes[t] / static.batch_sizes[t])
            accuracy[0] += a[3]
            accuracy[1] += s[3]
    g = {k: float(np.exp(np.mean(np.log(v)))) if v else math.nan for k, v in ratios.items()}
    g["accuracy"] = accuracy[0] / accuracy[1] if accuracy[1] > 0 else math.nan
    four = [g["throughput"], g["latency"], g["energy"], g["accuracy"]]
    g["geomean"] = float(np.exp(np.mean(np.log(four)))) if all(x > 0 for x in four) else math.nan
    return g


def summarise(logs: dict[str, list[RunLog]], episode_epochs: int) -> dict[str, Any]:
    """Per agent: reward, fractions of the oracle, regret, gains vs static (one SLO)."""
    static_r = [float(np.mean(log.rewards)) for log in logs["static"]]
    bound_r = [float(np.mean(log.bounds)) for log in logs["static"]]  # the same epochs for every agent
    phase_r = [float(np.mean(log.rewards)) for log in logs.get("phase_oracle", [])]
    out: dict[str, Any] = {}
    for name, runs in logs.items():
        rewards = [float(np.mean(log.rewards)) for log in runs]
        fractions = [(r - s) / (b - s) if abs(b - s) > 1e-12 else math.nan
                     for r, s, b in zip(rewards, static_r, bound_r)]
        ratios = [r / b if abs(b) > 1e-12 else math.nan for r, b in zip(rewards, bound_r)]
        of_phase = [(r - s) / (p - s) if abs(p - s) > 1e-12 else math.nan
                    for r, s, p in zip(rewards, static_r, phase_r)]
        regrets = [float(np.sum(np.asarray(log.bounds) - np.asarray(log.rewards))) for log in runs]
        means = served_means(runs)
        g = gains(runs, logs["static"])
        out[name] = {
            "adaptive": name not in BASELINES,
            "reward": mean_ci95(rewards)[0], "reward_ci95": mean_ci95(rewards)[1],
            "reward_final_episode": float(np.mean([np.mean(log.rewards[-episode_epochs:]) for log in runs])),
            "reward_fraction_of_oracle": mean_ci95(fractions)[0], "reward_fraction_ci95": mean_ci95(fractions)[1],
            "reward_ratio_to_oracle": float(np.mean(ratios)),
            "reward_fraction_of_phase_oracle": mean_ci95(of_phase)[0] if of_phase else math.nan,
            "regret": mean_ci95(regrets)[0], "regret_ci95": mean_ci95(regrets)[1],
            "gains": g, "at_accuracy_floor": bool(g["accuracy"] >= ACCURACY_FLOOR),
            "masked_share": float(np.mean(np.concatenate([np.asarray(log.masked, float) for log in runs]))),
            "served_means": means, "seconds": float(sum(log.seconds for log in runs)),
        }
    return {"oracle_bound_reward": float(np.mean(bound_r)), "static_reward": float(np.mean(static_r)),
            "agents": out}


def judge(slo: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The best adaptive agent under this SLO, its headline gain and which HELIOS targets it meets."""
    adaptive = {n: a for n, a in summary["agents"].items() if a["adaptive"]}
    best = max(adaptive, key=lambda n: adaptive[n]["reward"])
    g = adaptive[best]["gains"]
    targets: dict[str, Any] = {"fraction_of_oracle": {"target": FRACTION_TARGET,
                                                      "value": adaptive[best]["reward_fraction_of_oracle"]}}
    wanted = {"throughput": ("throughput", "batch_size"), "latency": ("latency",), "energy": ("energy",)}.get(slo, ())
    for key in wanted:
        targets[key] = {"target": HELIOS_MARGINS[key], "value": g[key]}
    for key, t in targets.items():
        t["met"] = bool(t["value"] >= t["target"])
        if key != "fraction_of_oracle" and not adaptive[best]["at_accuracy_floor"]:
            t["met"], t["why"] = False, f"accuracy {g['accuracy']:.2f}x static's, below the {ACCURACY_FLOOR} floor"
    oracle_g = summary["agents"]["oracle"]["gains"]
    return {"best_agent": best, "best_fraction_of_oracle": adaptive[best]["reward_fraction_of_oracle"],
            "best_fraction_of_phase_oracle": adaptive[best]["reward_fraction_of_phase_oracle"],
            "gain_vs_static": g[HEADLINE_GAIN[slo]], "oracle_gain_vs_static": oracle_g[HEADLINE_GAIN[slo]],
            "targets": targets}


# ------------------------------------------------------------------------------------------------- the run


def make_env(slo: str, env_kwargs: dict[str, Any]) -> gymnasium.Env:
    return gymnasium.make("helios/ModelDepthReplay-v0", **{"workload": "drift3", **env_kwargs, "slo": slo})


def trace_files(env_kwargs: dict[str, Any]) -> dict[str, str]:
    """The trace file of every candidate the env replays (their names carry the key: workload, pool, exit heads)."""
    from envs.model_depth import _group, env_config
    from helios.profiling import trace_path

    cfg = {**env_config("replay"), "workload": "drift3", **env_kwargs}
    if cfg.get("traces"):
        return {name: str(path) for name, path in dict(cfg["traces"]).items()}
    candidates = _group("candidates", cfg["candidates"])
    candidates = candidates.get("shortlist") if isinstance(candidates, dict) else candidates
    out_dir = Path(cfg["trace_dir"]).expanduser() if cfg.get("trace_dir") else None
    workload = _group("workload", cfg["workload"])
    return {c["name"]: str(trace_path(c["name"], workload, cfg["per_source"], cfg["new_tokens"], out_dir))
            for c in candidates}


def bench_slo(slo: str, agents: list[str], seeds: list[int], episodes: int, sb3_episodes: int,
              env_kwargs: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    env = make_env(slo, env_kwargs)
    base = env.unwrapped
    static_arm = static_arm_index(base.arm_table, reference_candidate(env))  # a clear error when it is absent
    logs: dict[str, list[RunLog]] = {}

    def timed(name: str, fn: Callable[[], RunLog]) -> RunLog:
        start = time.perf_counter()
        run = fn()
        run.seconds = time.perf_counter() - start
        logs.setdefault(name, []).append(run)
        return run

    for seed in seeds:
        oracle = timed("oracle", lambda: run_oracle(env, seed, episodes))
        timed("static", lambda: run_static(env, static_arm, seed, episodes))
        arm_rewards = np.asarray(oracle.arm_rewards)
        totals = np.sum(np.where(np.isfinite(arm_rewards), arm_rewards, -1e9), axis=0)
        timed("best_in_hindsight", lambda: run_static(env, int(np.argmax(totals)), seed, episodes))
        timed("phase_oracle", lambda: run_phase_oracle(env, seed, episodes, oracle))
        oracle.arm_rewards = []
        for name in agents:
            if name in SB3:
                timed(name, lambda: run_sb3(env, name, seed, sb3_episodes))
            else:
                timed(name, lambda: run_bandit(env, name, seed, episodes))
        log(f"  {slo}: seed {seed} done")
    epochs = base.episode_epochs
    env.close()
    summary = summarise(logs, epochs)
    summary.update(judge(slo, summary))
    summary["static_arm"] = base.arm_table[static_arm]["label"]
    summary["episode_epochs"] = epochs
    return summary


def fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}`", "",
             f"{len(result['seeds'])} seeds x {result['episodes']} episodes of {result['episode_epochs']} epochs "
             f"(SB3: {result['sb3_episodes']} episodes); mean ± 95% CI (t) over seeds. frac = (R - R_static) / "
             "(R_oracle - R_static); frac_ph = the same against the played phase oracle; ratio = R / R_oracle (plain; upside down for negative rewards); gains vs static "
             "full depth, paired by epoch (geometric mean of per-epoch ratios): thr = tokens/s, lat = p95 latency (x lower), "
             "tok/J, batch, acc = accuracy ratio (floor 0.9).", ""]
    for slo, s in result["slos"].items():
        lines += [f"### SLO {slo}: R_oracle (bound) {s['oracle_bound_reward']:.3f}, R_static {s['static_reward']:.3f}; "
                  f"best adaptive `{s['best_agent']}` frac {fmt(s['best_fraction_of_oracle'])}, headline gain "
                  f"{fmt(s['gain_vs_static'], 2)}x (oracle {fmt(s['oracle_gain_vs_static'], 2)}x)", "",
                  "| agent | R | frac | frac_ph | ratio | regret | thr x | lat x | tok/J x | batch x | acc | masked |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ranked = sorted(s["agents"].items(), key=lambda kv: -kv[1]["reward"])
        for name, a in ranked:
            g = a["gains"]
            lines.append(
                f"| {name}{'' if a['adaptive'] else ' (baseline)'} | {fmt(a['reward'])} ± {fmt(a['reward_ci95'])} | "
                f"{fmt(a['reward_fraction_of_oracle'], 2)} ± {fmt(a['reward_fraction_ci95'], 2)} | "
                f"{fmt(a['reward_fraction_of_phase_oracle'], 2)} | {fmt(a['reward_ratio_to_oracle'], 2)} | {fmt(a['regret'], 1)} | {fmt(g['throughput'], 2)} | "
                f"{fmt(g['latency'], 2)} | {fmt(g['energy'], 2)} | {fmt(g['batch_size'], 2)} | "
                f"{fmt(g['accuracy'], 2)} | {fmt(a['masked_share'], 2)} |")
        targets = "; ".join(f"{k} {fmt(t['value'], 2)} vs {t['target']}: {'met' if t['met'] else 'MISSED'}"
                            + (f" ({t['why']})" if "why" in t else "") for k, t in s["targets"].items())
        lines += ["", f"Targets: {targets}.", ""]
    lines.append(f"Best adaptive agent over all SLOs: `{result['best_agent']}`, mean frac "
                 f"{fmt(result['best_fraction_of_oracle'])}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slos", default=",".join(SLOS), help="comma-separated conf/slo names")
    parser.add_argument("--agents", default=",".join((*BANDITS, *SB3)), help="adaptive agents (baselines always run)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=20, help="episodes per run (drift3: 30 epochs each)")
    parser.add_argument("--sb3-episodes", type=int, default=None, help="SB3 training budget (default: --episodes)")
    parser.add_argument("--env", default="{}", help="JSON of extra gymnasium.make kwargs (e.g. tiny candidates)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (SB3)")
    parser.add_argument("--quick", action="store_true", help="2 seeds x 3 episodes: a smoke run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seeds = list(range(2 if args.quick else args.seeds))
    episodes = 3 if args.quick else args.episodes
    sb3_episodes = args.sb3_episodes or episodes
    slos = [s for s in args.slos.split(",") if s]
    agents = [a for a in args.agents.split(",") if a]
    unknown = [a for a in agents if a not in (*BANDITS, *SB3)]
    if unknown:
        parser.error(f"unknown agent(s) {unknown}; valid: {[*BANDITS, *SB3]}")
    env_kwargs = json.loads(args.env)
    traces = trace_files(env_kwargs)
    missing = [path for path in traces.values() if not Path(path).exists()]
    if missing:
        print(f"recording missing traces first (the default pair takes ~10 min): {missing}", flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/agent_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": {"id": "helios/ModelDepthReplay-v0", "workload": "drift3", **env_kwargs},
        "trace_files": traces, "seeds": seeds, "episodes": episodes, "sb3_episodes": sb3_episodes,
        "definitions": {
            "reward_fraction_of_oracle": "(R - R_static) / (R_oracle - R_static), R = mean reward per epoch, "
                                         "R_oracle = mean over epochs of the best arm's reward (no switch cost)",
            "reward_ratio_to_oracle": "R / R_oracle (plain ratio; reads upside down when rewards are negative)",
            "regret": "sum over epochs of (best arm's reward - reward earned), per run, mean over seeds",
            "gains": "paired by epoch against static full depth (same requests): geometric mean of per-epoch ratios "
                     "of throughput (x higher), latency_p95 (x lower), energy (tokens/J, x higher), batch size "
                     "(x larger); accuracy: ratio of means over the same epochs",
            "best_fraction_of_oracle": "the adaptive agent with the highest reward_fraction_of_oracle averaged over "
                                       "the SLOs: that average",
        },
        "helios_margins": HELIOS_MARGINS, "fraction_target": FRACTION_TARGET, "slos": {},
    }
    for slo in slos:
        print(f"SLO {slo}", flush=True)
        result["slos"][slo] = bench_slo(slo, agents, seeds, episodes, sb3_episodes, env_kwargs,
                                        lambda m: print(m, flush=True))
    names = list(next(iter(result["slos"].values()))["agents"])
    result["episode_epochs"] = next(iter(result["slos"].values()))["episode_epochs"]
    result["agents"] = {
        name: {
            "reward_fraction_of_oracle": float(np.mean([s["agents"][name]["reward_fraction_of_oracle"]
                                                        for s in result["slos"].values()])),
            "reward_ratio_to_oracle": float(np.mean([s["agents"][name]["reward_ratio_to_oracle"]
                                                     for s in result["slos"].values()])),
            "reward_fraction_of_phase_oracle": float(np.mean([s["agents"][name]["reward_fraction_of_phase_oracle"]
                                                              for s in result["slos"].values()])),
            "regret": float(np.mean([s["agents"][name]["regret"] for s in result["slos"].values()])),
            "per_slo": {slo: {"reward_fraction_of_oracle": s["agents"][name]["reward_fraction_of_oracle"],
                              "regret": s["agents"][name]["regret"]} for slo, s in result["slos"].items()},
        }
        for name in names
    }
    adaptive = [n for n in names if n not in BASELINES]
    best = max(adaptive, key=lambda n: result["agents"][n]["reward_fraction_of_oracle"])
    result["best_agent"] = best
    result["best_fraction_of_oracle"] = result["agents"][best]["reward_fraction_of_oracle"]
    result["best_fraction_of_phase_oracle"] = max(result["agents"][n]["reward_fraction_of_phase_oracle"]
                                                  for n in adaptive)
    result["gain_vs_static"] = {slo: s["gain_vs_static"] for slo, s in result["slos"].items()}
    result["wall_s"] = time.perf_counter() - started
    text = markdown(result)
    print(text)
    if args.md:
        with atomic_file(args.md, "w") as handle:
            handle.write(text)
    if args.json:
        with atomic_file(args.json, "w") as handle:
            json.dump(finite_or_null(result), handle, indent=1, allow_nan=False)
    return result


def finite_or_null(value: Any) -> Any:
    """NaN/inf -> null, so the JSON file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


if __name__ == "__main__":
    main()
