"""The yardstick ladder, played through the rollout loop: what an agent's reward is measured against.

    python scripts/train.py agent=ucb env=replay episodes=3      # summary.json: best_fixed_reward, phase_oracle_reward,
                                                                 #   gap_recovered, dynamic_regret, headroom
    python benchmarks/agent_bench.py --quick --json /tmp/agents.json   # the same ladder per scenario and seed

    from agents.yardsticks import compute_ladder
    ladder = compute_ladder(env, seed=0, episodes=3)             # replay only: plays n_feasible_arms + 1 runs
    ladder.score(agent_rewards)                                  # gap_recovered, dynamic_regret, ... for one run

The ladder (rewards are mean SLO reward per epoch over the run's episodes, reset seeds seed * 1000 + episode, the
seeds agents.rollout.Rollout gives every run, so every rung meets the agent's requests):
  static            the reference candidate at full depth without exits, played (HELIOS's baseline)
  best fixed arm    every feasible arm played as a fixed policy for the whole run; the best mean reward, in hindsight
  phase oracle      the best schedule of one arm per workload phase (info["phase"]), PLAYED, so it pays its switches
                    and inherits the queue the previous phase's arm left behind. The search: start from each phase's
                    arm whose fixed-arm run earned the most over that phase's epochs (or from the best fixed arm, a
                    constant schedule, when that earns more played), then improve by coordinate ascent: for each
                    phase in turn, every other arm is played in its place and kept when it earns more, until a
                    sweep changes nothing (at most `REFINE_SWEEPS`). Trials are played on the run's first
                    `REFINE_EPISODES` episodes (schedules differ by whole phases, which that many tell apart); the
                    result is played on the whole run and kept if it beats the starting schedule there. The first step alone misjudges a phase
                    that follows a queue: in a fixed-arm run full depth meets a quiet phase after a burst with the
                    burst's backlog, so the independent choice said depth 10 where, played after depth 10's burst,
                    full depth earns more (the flash scenario). `phase_oracle_is_fixed` when the result is constant.
  per-epoch oracle  max over arms of env.evaluate_arms() each epoch (no switch cost, knows each epoch's draw):
                    recorded by the rollout (`oracle_reward`, `regret`), reported, never a target.

Rungs are played, not summed from per-epoch evaluate_arms values: once queues carry over between epochs, an arm's
reward depends on what was served before it, and only playing it through env.step prices switches and queues.

Definitions (R = mean reward per epoch; rewards are sums of weight x log2(metric ratio) minus penalties, helios/slo.py):
  gap_recovered  = (R_agent - R_best_fixed) / (R_phase_oracle - R_best_fixed): 0 = the best fixed arm, 1 = the phase
                   oracle; it normalises between two fixed references as RouteLLM's APGR does (Ong et al. 2024,
                   "RouteLLM: Learning to Route LLMs with Preference Data", arXiv 2406.18665). None (null) when the
                   phase oracle does not beat the best fixed arm by at least 1% (headroom < 1.01): no gap to recover.
  dynamic_regret = sum over the run's epochs of (phase oracle's reward on that epoch - the agent's reward on it):
                   regret against a time-varying comparator (the played per-phase schedule), paired epoch by epoch
                   (same seed, same requests); = epochs x (R_phase_oracle - R_agent); negative when the agent wins.
  headroom       = 2 ** (R_phase_oracle - R_best_fixed): the factor by which the phase oracle beats the best fixed
                   arm on the SLO's objective. With weights normalised, 2 ** reward is the weighted geometric mean of
                   the metric ratios to the reference, so the headroom is the ratio of the two rungs' geometric means
                   over epochs of that objective (a constraint penalty p counts as a factor 2 ** -p).
                   `headroom_objective` is the same on the objective alone (sum of info["reward_terms"], penalties
                   left out). The issue's target: headroom >= 1.3 on the default scenario.

Cost: (feasible arms + 1) extra runs of the agent's episodes per seed, plus phases x (arms - 1) per refinement sweep. Replay prices an epoch in milliseconds; live
would serve every arm for real, so the ladder is replay-only: `ladder_unavailable(env)` says why not elsewhere, and
live runs report no ladder (scripts/train.py and the benchmark say so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from scipy import stats

from agents.rollout import Rollout, StaticArmMissing, play, reference_candidate, static_arm_index

# A gap below this (reward units, log2 ratios: a headroom under 1.01x) counts as none: dividing by it would turn
# gap_recovered into noise (an agent 0.3 below the best fixed arm on a 0.001 gap reads -300) and swamp the seed mean.
MIN_GAP = math.log2(1.01)
REFINE_SWEEPS = 2  # coordinate-ascent sweeps over the phases (module docstring); the second rarely changes anything
REFINE_EPISODES = 30  # episodes each refinement trial plays (module docstring)


class FixedArm:
    """A policy that plays one arm, whatever it sees (a rung of the ladder)."""

    open_loop = True  # its action depends on nothing it observes (play_policy: a replayed draw repeats)

    def __init__(self, arm: int) -> None:
        self.arm = int(arm)

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        return self.arm

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        pass


class PhaseSchedule:
    """Plays `schedule[phase]` in each workload phase. `info["phase"]` names the phase of the epoch just served, not
    of the coming one, so the coming epoch's phase is looked up in `phase_of_epoch` (phase per epoch of an episode,
    as the fixed-arm runs met them on the same episodes); `bind(rollout)` gives the epoch counter."""

    open_loop = True  # its action depends on the epoch alone (play_policy: a replayed draw repeats)

    def __init__(self, schedule: Mapping[Hashable, int], phase_of_epoch: Sequence[Hashable]) -> None:
        self.schedule = dict(schedule)
        self.phase_of_epoch = list(phase_of_epoch)
        self.rollout: Rollout | None = None

    def bind(self, rollout: Rollout) -> None:
        self.rollout = rollout

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        if self.rollout is None:
            raise RuntimeError("PhaseSchedule.bind(rollout) first: the schedule needs the rollout's epoch")
        return self.schedule[self.phase_of_epoch[self.rollout.next_epoch % self.rollout.episode_epochs]]

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        pass


@dataclass
class PlayedRun:
    """One rung played for the run: its records (the rollout's, one per epoch, global epoch order)."""

    name: str
    records: list[dict[str, Any]]

    @property
    def rewards(self) -> np.ndarray:
        return np.array([r["reward"] for r in self.records], dtype=float)

    @property
    def objectives(self) -> np.ndarray:
        """The SLO objective per epoch: the sum of the reward terms, penalties left out."""
        return np.array([sum(r["reward_terms"].values()) for r in self.records], dtype=float)

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def actions(self) -> list[int]:
        return [int(r["action"]) for r in self.records]


def play_policy(env: gymnasium.Env, seed: int, episodes: int, policy: Any, name: str,
                reset_options: Callable[[int], dict[str, Any] | None] | None = None) -> PlayedRun:
    """Play `policy` for `episodes` episodes through the rollout loop (reset seeds seed * 1000 + episode, options
    `reset_options(episode)`), without per-epoch pricing (the ladder does not need evaluate_arms, so a rung costs
    one env.step per epoch)."""
    rollout = Rollout(env, seed, yardsticks=False, reset_options=reset_options)
    if callable(getattr(policy, "bind", None)):
        policy.bind(rollout)
    if getattr(policy, "open_loop", False) and hasattr(env.unwrapped, "episode_variant"):
        _play_open_loop(rollout, policy, episodes)
    else:
        play(rollout, policy, episodes * rollout.episode_epochs)
    return PlayedRun(name, rollout.records)


def _play_open_loop(rollout: Rollout, policy: Any, episodes: int) -> None:
    """`play` for a policy whose arm depends on the epoch alone, on replay: replay is deterministic given the
    episode's draw (its variant), so an episode on a variant already played repeats that episode's records exactly;
    they are copied (with this episode's numbering) instead of served again. A run of 30 episodes over 8 variants
    serves 8 (the ladder's and the refinement's cost, cut ~4x; tests/test_rollout.py checks it against `play`)."""
    epochs = rollout.episode_epochs
    played: dict[int, list[dict[str, Any]]] = {}
    for episode in range(episodes):
        obs, _ = rollout.reset()  # the episode's own seed and options, as play would reset it
        variant = rollout.base.episode_variant  # None: not a replayed draw (live), so nothing repeats
        if variant is not None and variant in played:
            for record in played[variant]:
                rollout.records.append({**record, "epoch": rollout.next_epoch, "episode": episode})
                rollout.next_epoch += 1
            continue
        first = len(rollout.records)
        play(rollout, policy, (episode + 1) * epochs, obs=obs)
        if variant is not None:
            played[variant] = rollout.records[first:]


def ladder_unavailable(env: gymnasium.Env) -> str | None:
    """None when the ladder can be played on `env` (replay); otherwise why not, in a sentence."""
    return ladder_unavailable_on(str(getattr(env.unwrapped, "backend_kind", "replay")))


def ladder_unavailable_on(backend: str) -> str | None:
    """`ladder_unavailable` by backend name, before any env is built."""
    if backend != "replay":
        return (f"the {backend} backend would serve every arm for real to play the ladder ((arms + 1) x the run's "
                "episodes); best fixed arm, phase oracle, gap recovered and dynamic regret are replay-only")
    return None


@dataclass
class Ladder:
    """The yardsticks of one (env, seed, episodes): every feasible arm played fixed, and the phase oracle played."""

    seed: int
    episodes: int
    episode_epochs: int
    labels: list[str]
    fixed: dict[int, PlayedRun]
    static_arm: int | None
    why_no_static: str | None
    best_fixed_arm: int
    phase_schedule: dict[Hashable, int]
    schedule_run: PlayedRun
    phase_oracle: PlayedRun
    phase_oracle_is_fixed: bool
    phase_fixed_rewards: dict[Hashable, dict[int, float]] = field(default_factory=dict)

    @property
    def static(self) -> PlayedRun | None:
        return None if self.static_arm is None else self.fixed[self.static_arm]

    @property
    def best_fixed(self) -> PlayedRun:
        return self.fixed[self.best_fixed_arm]

    @property
    def best_fixed_reward(self) -> float:
        return self.best_fixed.mean_reward

    @property
    def phase_oracle_reward(self) -> float:
        return self.phase_oracle.mean_reward

    @property
    def headroom(self) -> float:
        """2 ** (R_phase_oracle - R_best_fixed): the objective ratio the phase oracle wins (module docstring)."""
        return headroom(self.phase_oracle_reward, self.best_fixed_reward)

    @property
    def headroom_objective(self) -> float:
        return headroom(float(self.phase_oracle.objectives.mean()), float(self.best_fixed.objectives.mean()))

    def score(self, rewards: Sequence[float], first_epoch: int = 0) -> dict[str, float | None]:
        """An agent's run against the ladder: its rewards are epochs first_epoch, first_epoch + 1, ... of the run
        (a resumed run passes all its epochs from 0). Fails when the agent played epochs the ladder did not."""
        rewards = np.asarray(rewards, dtype=float)
        comparator = self.phase_oracle.rewards[first_epoch:first_epoch + rewards.size]
        if comparator.size != rewards.size:
            raise ValueError(f"the agent played {rewards.size} epochs from {first_epoch}; the ladder covers "
                             f"{self.phase_oracle.rewards.size}")
        agent = float(rewards.mean())
        # The rungs' means over exactly the agent's epochs, so every number compares like with like.
        best = float(self.best_fixed.rewards[first_epoch:first_epoch + rewards.size].mean())
        oracle = float(comparator.mean())
        return {"best_fixed_reward": best, "phase_oracle_reward": oracle,
                "gap_recovered": gap_recovered(agent, best, oracle),
                "dynamic_regret": dynamic_regret(rewards, comparator), "headroom": headroom(oracle, best)}

    def summary(self) -> dict[str, Any]:
        """The ladder's own numbers, JSON-ready (phase keys as strings)."""
        return {
            "best_fixed_arm": self.labels[self.best_fixed_arm], "best_fixed_reward": self.best_fixed_reward,
            "phase_oracle_reward": self.phase_oracle_reward, "phase_schedule_reward": self.schedule_run.mean_reward,
            "phase_schedule": {str(p): self.labels[a] for p, a in self.phase_schedule.items()},
            "phase_oracle_is_fixed": self.phase_oracle_is_fixed,
            "static_reward": None if self.static is None else self.static.mean_reward,
            "why_no_static": self.why_no_static,
            "headroom": self.headroom, "headroom_objective": self.headroom_objective,
            "fixed_arm_rewards": {self.labels[a]: run.mean_reward for a, run in self.fixed.items()},
        }


def compute_ladder(env: gymnasium.Env, seed: int, episodes: int,
                   reset_options: Callable[[int], dict[str, Any] | None] | None = None) -> Ladder:
    """Play every feasible arm fixed, choose each phase's best arm from those runs, play that schedule (replay only;
    raises ValueError with the reason elsewhere); every run resets episode e with `reset_options(e)`. The env is
    reused and left reset by the last run."""
    why = ladder_unavailable(env)
    if why is not None:
        raise ValueError(f"no yardstick ladder: {why}")
    base = env.unwrapped
    labels = [str(arm["label"]) for arm in base.arm_table]
    env.reset(seed=seed * 1000, options=None if reset_options is None else reset_options(0))  # the start's mask
    feasible = [int(a) for a in np.flatnonzero(np.asarray(base.action_masks(), dtype=bool))]
    if not feasible:
        raise ValueError("no yardstick ladder: every arm is masked")
    try:
        static_arm: int | None = static_arm_index(base.arm_table, reference_candidate(env))
        why_no_static = None
    except StaticArmMissing as error:
        static_arm, why_no_static = None, str(error)
    fixed = {arm: play_policy(env, seed, episodes, FixedArm(arm), labels[arm], reset_options) for arm in feasible}
    # Ties go to the lower arm index, so the choice is reproducible.
    best_fixed_arm = max(feasible, key=lambda a: (fixed[a].mean_reward, -a))

    phases = [r["phase"] for r in fixed[best_fixed_arm].records]
    episode_epochs = int(base.episode_epochs)
    phase_fixed: dict[Hashable, dict[int, float]] = {}
    for phase in dict.fromkeys(phases):  # phases in order of appearance
        in_phase = np.array([p == phase for p in phases])
        phase_fixed[phase] = {a: float(fixed[a].rewards[in_phase].sum()) for a in feasible}
    schedule = {p: max(feasible, key=lambda a: (totals[a], -a)) for p, totals in phase_fixed.items()}
    phase_of_epoch = phases[:episode_epochs]
    schedule_run = play_policy(env, seed, episodes, PhaseSchedule(schedule, phase_of_epoch), "phase schedule",
                               reset_options)
    # The constant schedule is a per-phase schedule too: start from the better of the two.
    oracle = schedule_run
    if schedule_run.mean_reward < fixed[best_fixed_arm].mean_reward:
        schedule, oracle = dict.fromkeys(phase_fixed, best_fixed_arm), fixed[best_fixed_arm]
    schedule, oracle = refine_schedule(env, seed, episodes, schedule, oracle, phase_of_epoch, feasible,
                                       reset_options=reset_options)
    is_fixed = len(set(schedule.values())) == 1
    return Ladder(seed=int(seed), episodes=int(episodes), episode_epochs=episode_epochs, labels=labels, fixed=fixed,
                  static_arm=static_arm, why_no_static=why_no_static, best_fixed_arm=best_fixed_arm,
                  phase_schedule=schedule, schedule_run=schedule_run, phase_oracle=oracle,
                  phase_oracle_is_fixed=is_fixed, phase_fixed_rewards=phase_fixed)


def refine_schedule(env: gymnasium.Env, seed: int, episodes: int, schedule: Mapping[Hashable, int], run: PlayedRun,
                    phase_of_epoch: Sequence[Hashable], feasible: Sequence[int], sweeps: int = REFINE_SWEEPS,
                    reset_options: Callable[[int], dict[str, Any] | None] | None = None,
                    ) -> tuple[dict[Hashable, int], PlayedRun]:
    """Coordinate ascent on a per-phase schedule whose played run is `run`: each phase in turn takes every other
    feasible arm, played on the first REFINE_EPISODES episodes; a strictly better trial is kept; the result is
    played on all `episodes` and returned if it beats `run` there (module docstring)."""
    start, schedule = dict(schedule), dict(schedule)
    trial_episodes = min(episodes, REFINE_EPISODES)
    cut = trial_episodes * int(env.unwrapped.episode_epochs)
    best = float(run.rewards[:cut].mean())
    for _ in range(sweeps):
        improved = False
        for phase in list(schedule):
            for arm in feasible:
                if arm == schedule[phase]:
                    continue
                trial = {**schedule, phase: arm}
                reward = play_policy(env, seed, trial_episodes, PhaseSchedule(trial, phase_of_epoch),
                                     "phase schedule", reset_options).mean_reward
                if reward > best + 1e-12:
                    schedule, best, improved = trial, reward, True
        if not improved:
            break
    if schedule == start:
        return start, run
    refined = play_policy(env, seed, episodes, PhaseSchedule(schedule, phase_of_epoch), "phase schedule",
                          reset_options)
    return (schedule, refined) if refined.mean_reward > run.mean_reward else (start, run)


# ----------------------------------------------------------------------------------------------- the maths


def gap_recovered(agent: float, best_fixed: float, phase_oracle: float) -> float | None:
    """(R_agent - R_best_fixed) / (R_phase_oracle - R_best_fixed), RouteLLM's APGR form (Ong et al. 2024); None
    when the phase oracle beats the best fixed arm by less than MIN_GAP (a headroom under 1.01x: no gap)."""
    gap = phase_oracle - best_fixed
    if not gap > MIN_GAP:
        return None
    return (agent - best_fixed) / gap


def dynamic_regret(agent_rewards: Sequence[float], comparator_rewards: Sequence[float]) -> float:
    """Sum over paired epochs of (comparator's reward - agent's reward); the comparator is the played phase oracle."""
    agent = np.asarray(agent_rewards, dtype=float)
    comparator = np.asarray(comparator_rewards, dtype=float)
    if agent.shape != comparator.shape:
        raise ValueError(f"unpaired epochs: {agent.shape} agent rewards vs {comparator.shape} comparator rewards")
    return float(np.sum(comparator - agent))


def headroom(phase_oracle: float, best_fixed: float) -> float:
    """2 ** (R_phase_oracle - R_best_fixed): rewards are log2 ratios, so this is the objective ratio."""
    return float(2.0 ** (phase_oracle - best_fixed))


def mean_ci95(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean over seeds and the half-width of its 95% Student-t interval, t(0.975, n - 1) * s / sqrt(n); values that
    are None or not finite are left out; (None, None) without values, (mean, None) with one."""
    array = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return None, None
    if array.size == 1:
        return float(array[0]), None
    half = float(stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return float(array.mean()), half
