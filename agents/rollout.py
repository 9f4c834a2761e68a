"""The rollout loop: plays a policy on the environment and computes, once per epoch, the reward record, the
yardsticks (static full depth, per-epoch oracle) and the regret. scripts/train.py, the SB3 agents (agents/sb3.py)
and the agent benchmark (benchmarks/agent_bench.py) all go through it.

    python scripts/train.py agent=ucb env=replay          # the bandit loop below (play), with yardsticks
    python scripts/train.py agent=ppo env=replay          # SB3 drives the same Rollout wrapper through model.learn
    python benchmarks/agent_bench.py --quick              # every agent and baseline through the same wrapper

    from agents.rollout import Rollout, play
    rollout = Rollout(env, seed=0)                        # episode k resets with seed * 1000 + k
    play(rollout, agent, until=3 * rollout.episode_epochs)
    rollout.records                                       # one dict per epoch, the metrics.jsonl line format

Yardsticks, per epoch, taken before the step from `env.unwrapped.evaluate_arms()` (the reward every arm would earn
on the coming epoch if it were already loaded, -inf for masked arms; only the replay backend can price every arm
without serving it):
  oracle_reward  = max over arms (no switch cost): the bound regret is measured against; oracle_action its arm
  static_reward  = the static arm's entry: the reference candidate at full depth without exits (HELIOS's baseline)
  regret         = oracle_reward - reward
The static arm is looked up in the env's arm table (`static_arm_index`). There is no fallback: when that arm is
absent or masked the rollout fails before the first epoch, naming the arms that exist, because any other arm would
silently change what "static" means between runs.

The per-epoch oracle is reported, never a target. The targets are the ladder's rungs, played through this same loop
by agents/yardsticks.py (replay only): static full depth, the best fixed arm in hindsight and the phase oracle (best
fixed arm per workload phase, played with queue dynamics and switch costs); `summarise(records, epochs, ladder)`
adds gap_recovered ((R - R_best_fixed) / (R_phase_oracle - R_best_fixed), RouteLLM's APGR form, Ong et al. 2024)
and dynamic_regret (against the played phase oracle, epoch by epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, SupportsFloat

import gymnasium
import numpy as np

RECORD_YARDSTICKS: tuple[str, ...] = ("oracle_reward", "oracle_action", "static_reward", "regret")


class StaticArmMissing(ValueError):
    """The arm table has no usable static arm (the reference candidate at full depth, no exits, feasible)."""


class Policy(Protocol):
    """What `play` drives: every agent in agents/ satisfies it, and so do the benchmark's clairvoyant baselines."""

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int: ...

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None: ...


def reference_candidate(env: gymnasium.Env) -> str:
    """The candidate whose full-depth run normalises the reward (the env's `reference`)."""
    return str(env.unwrapped.serving.reference)


def static_arm_index(arm_table: Sequence[Mapping[str, Any]], reference: str) -> int:
    """Index of the static arm in `arm_table`: `reference` at full depth (depth == num_layers) without exits.
    Raises StaticArmMissing, naming the arms that exist, when it is absent or does not fit the memory budget."""
    for arm in arm_table:
        if arm["candidate"] == reference and arm["depth"] == arm["num_layers"] and arm["criterion"] == "none":
            if not arm["feasible"]:
                raise StaticArmMissing(
                    f"the static arm {arm['label']} (the reference candidate at full depth, no exits) does not fit "
                    "the memory budget, so no static yardstick exists; raise memory_budget_mib or choose another "
                    "`reference` (scripts/train.py: oracle=false runs without yardsticks)")
            return int(arm["index"])
    layers = sorted({int(arm["num_layers"]) for arm in arm_table if arm["candidate"] == reference})
    full = f"depth {layers[0]}" if len(layers) == 1 else "its full depth"
    labels = ", ".join(str(arm["label"]) for arm in arm_table)
    raise StaticArmMissing(
        f"no static arm: the reference candidate {reference!r} at full depth ({full}) without exits is not in the "
        f"arm table. Arms: {labels}. Add {full} to {reference}'s depths, choose another `reference`, or run "
        "without yardsticks (scripts/train.py: oracle=false)")


def yardsticks_unavailable(env: gymnasium.Env) -> str | None:
    """None when the env can price every arm on the coming epoch (replay); otherwise why not, in a sentence."""
    base = env.unwrapped
    if not callable(getattr(base, "evaluate_arms", None)):
        return f"{type(base).__name__} has no evaluate_arms(): it cannot price every arm on an epoch"
    if getattr(base, "backend_kind", "replay") != "replay":
        return (f"the {base.backend_kind} backend would have to serve every arm on each epoch to know the oracle; "
                "env=replay records oracle, static and regret")
    return None


def epoch_record(epoch: int, episode: int, reward: float, info: Mapping[str, Any], labels: Sequence[str],
                 arm_rewards: np.ndarray | None, static_arm: int | None) -> dict[str, Any]:
    """One metrics.jsonl line: what the env reported for the epoch, plus the yardsticks when `arm_rewards` is given."""
    action = int(info["arm"])
    record: dict[str, Any] = {
        "epoch": epoch, "episode": episode, "phase": info["phase"], "action": action, "arm": labels[action],
        "reward": float(reward), "batch_size": int(info["batch_size"]), "masked_action": bool(info["masked_action"]),
        "switch_s": float(info["switch_s"]), "metrics": dict(info["metrics"]),
        "reward_terms": dict(info["reward_terms"]), "penalties": dict(info["penalties"]),
    }
    if "load" in info:  # open-loop workloads: the epoch's offered load (x capacity), for per-load reports
        record["load"] = info["load"]
    if arm_rewards is not None:
        record["oracle_reward"] = float(np.max(arm_rewards))
        record["oracle_action"] = int(np.argmax(arm_rewards))
        if static_arm is not None:
            record["static_reward"] = float(arm_rewards[static_arm])
        record["regret"] = record["oracle_reward"] - record["reward"]
    return record


class Rollout(gymnasium.Wrapper):
    """The env, with a fixed reset schedule and one record (with yardsticks) per step.

    Episode k (k = global epoch // episode_epochs) resets with seed * 1000 + k whatever seed the caller passes (SB3
    passes its own), so every agent meets the same requests and a resumed run meets the ones it would have.
    `first_epoch` is the global epoch the next step plays (resume). `yardsticks=True` records oracle, static and
    regret where the env can price every arm (see `yardsticks_unavailable`; the reason is kept in `why_no_yardsticks`).
    `on_record(record)` is called after every step (e.g. to append to metrics.jsonl); `keep_arm_rewards` keeps every
    epoch's per-arm rewards in `arm_rewards_log` (the benchmark's hindsight baselines need them).
    `reset_options(episode)` gives the reset options of an episode when the caller passes none (e.g. replay's
    {"variant": k}: benchmarks/heldout_draws.py plays draws that training never met).
    """

    def __init__(self, env: gymnasium.Env, seed: int, *, yardsticks: bool = True, first_epoch: int = 0,
                 on_record: Callable[[dict[str, Any]], None] | None = None, keep_arm_rewards: bool = False,
                 reset_options: Callable[[int], dict[str, Any] | None] | None = None) -> None:
        super().__init__(env)
        self.base = env.unwrapped
        self.seed = int(seed)
        self.episode_epochs = int(self.base.episode_epochs)
        self.labels = [str(arm["label"]) for arm in self.base.arm_table]
        self.why_no_yardsticks = yardsticks_unavailable(env) if yardsticks else "yardsticks switched off (oracle=false)"
        # Looked up before the first epoch, so a missing static arm fails before any model loads or epoch runs.
        self.static_arm = (static_arm_index(self.base.arm_table, reference_candidate(env))
                           if self.why_no_yardsticks is None else None)
        self.next_epoch = int(first_epoch)
        self.on_record = on_record
        self.keep_arm_rewards = keep_arm_rewards
        self.reset_options = reset_options
        self.records: list[dict[str, Any]] = []
        self.arm_rewards_log: list[np.ndarray] = []
        self._arm_rewards: np.ndarray | None = None  # the coming epoch's, once computed

    @property
    def has_yardsticks(self) -> bool:
        return self.why_no_yardsticks is None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        episode = self.next_epoch // self.episode_epochs
        self._arm_rewards = None
        if options is None and self.reset_options is not None:
            options = self.reset_options(episode)
        return self.env.reset(seed=self.seed * 1000 + episode, options=options)

    def arm_rewards(self) -> np.ndarray:
        """Every arm's reward on the coming epoch (no switch cost; -inf masked), computed once per epoch: the
        yardsticks and a clairvoyant policy read the same array."""
        if not self.has_yardsticks:
            raise RuntimeError(f"no per-arm rewards: {self.why_no_yardsticks}")
        if self._arm_rewards is None:
            self._arm_rewards = np.asarray(self.base.evaluate_arms(), dtype=float)
        return self._arm_rewards

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        arm_rewards = self.arm_rewards() if self.has_yardsticks else None  # before the step: the coming epoch
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._arm_rewards = None
        episode, epoch = divmod(self.next_epoch, self.episode_epochs)
        if int(info["epoch"]) != epoch:  # a reset or state restore out of step with the global epoch counter
            raise RuntimeError(f"the env played epoch {info['epoch']} of its episode where the rollout expected "
                               f"{epoch} (global epoch {self.next_epoch}); reset through the Rollout")
        record = epoch_record(self.next_epoch, episode, float(reward), info, self.labels, arm_rewards, self.static_arm)
        self.next_epoch += 1
        self.records.append(record)
        if self.keep_arm_rewards and arm_rewards is not None:
            self.arm_rewards_log.append(arm_rewards)
        if self.on_record is not None:
            self.on_record(record)
        return obs, reward, terminated, truncated, info


def play(rollout: Rollout, policy: Policy, until: int, *, obs: np.ndarray | None = None,
         after_epoch: Callable[[dict[str, Any], np.ndarray], None] | None = None,
         learn: bool = True) -> np.ndarray | None:
    """The bandit loop: select on (obs, mask), step, update (unless `learn=False`: a frozen policy), until the
    global epoch `until`; the policy persists across episodes. A new episode starts at every episode boundary (and
    first, unless `obs` is given: a run resumed mid-episode passes the checkpoint's observation after restoring the
    env's state; the rollout's `reset_options` give each episode's options). `after_epoch(record, obs)` runs after
    the update (checkpointing, logging). Returns the last observation."""
    while rollout.next_epoch < until:
        if obs is None or rollout.next_epoch % rollout.episode_epochs == 0:
            obs, _ = rollout.reset()
        action = int(policy.select(obs, rollout.base.action_masks()))
        obs, reward, _, _, info = rollout.step(action)
        if learn:
            policy.update(action, float(reward), obs, info)
        if after_epoch is not None:
            after_epoch(rollout.records[-1], obs)
    return obs


def summarise(records: Sequence[Mapping[str, Any]], episode_epochs: int, ladder: Any = None,
              why_no_ladder: str | None = None) -> dict[str, Any]:
    """The run's means (reward, every info metric) and, when the records carry them, the per-epoch yardsticks: the
    fields summary.json holds and scripts/compare.py reads. Regret (vs the per-epoch oracle) is the sum over epochs,
    the others are means. With `ladder` (agents.yardsticks.Ladder over the same episodes): best_fixed_reward,
    phase_oracle_reward, gap_recovered, dynamic_regret, headroom, best_fixed_arm; without, `why_no_ladder`."""
    if not records:
        raise ValueError("no epochs were played: nothing to summarise")
    rewards = np.array([r["reward"] for r in records], dtype=float)
    summary: dict[str, float] = {
        "epochs": len(records), "mean_reward": float(rewards.mean()),
        "mean_reward_last_episode": float(rewards[-episode_epochs:].mean()),
        **{f"mean_{k}": float(np.mean([r["metrics"][k] for r in records])) for k in records[0]["metrics"]},
    }
    if all("oracle_reward" in r for r in records):
        summary["oracle_mean_reward"] = float(np.mean([r["oracle_reward"] for r in records]))
        summary["regret"] = float(sum(r["regret"] for r in records))
    if all("static_reward" in r for r in records):
        summary["static_mean_reward"] = float(np.mean([r["static_reward"] for r in records]))
    if ladder is not None:
        summary.update(ladder.score(rewards, first_epoch=int(records[0]["epoch"])))
        summary["best_fixed_arm"] = ladder.labels[ladder.best_fixed_arm]
        summary["phase_schedule"] = {str(p): ladder.labels[a] for p, a in ladder.phase_schedule.items()}
    elif why_no_ladder is not None:
        summary["why_no_ladder"] = why_no_ladder
    return summary
