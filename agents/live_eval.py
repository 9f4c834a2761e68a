"""One evaluation episode of a learned policy, served by replay and by live, and how far the two agree: the main
job's last step (scripts/train.py, `live_eval=true` after training on replay).

    python scripts/train.py agent=ucb                      # replay training, then this: summary.json["live_eval"]
    python scripts/train.py agent=lin_ucb episodes=50 live_eval=false

Both envs serve the same episode (reset seed seed * 1000 + episode, the rollout's schedule) on the same draw of the
workload: live serves the workload's own draw, so replay plays its variant 0 (that draw): the same arrival times,
sources and output lengths. The live env's workload is the replay env's with its capacity-relative rate made absolute
(`absolute_rate_workload`: rate_per_s = rate_x_capacity x the replay-measured capacity), so both offer the same
load; measuring capacity live would take minutes and give a slightly different rate. The policy starts from the
same state on both (a bandit's `state_dict`, or an SB3 model's deterministic `predict`) and keeps learning online on
each, as a deployed bandit would, so the two runs can part ways once their observations differ.

Agreement (`agreement`), over the episode's epochs:
  arm_agreement        share of epochs in which both chose the same arm
  reward_live/replay   mean SLO reward per epoch; reward_corr = Pearson correlation of the per-epoch rewards
  metrics[m]           mean of metric m live and replay, and replay's relative error (replay - live) / |live|
Replay's clock is the calibrated cost model's and its lengths come from the teacher-forced trace; its accuracy scores
each arm's free-running output, recorded once (helios.profiling.free_running_outputs). Live's clock is measured compute
and its accuracy scores what it served (benchmarks/RESULTS.md: replay fidelity). Energy is the labelled `model`
estimate on a CPU without RAPL.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
import numpy as np

from agents.rollout import Policy, Rollout, play

AGREEMENT_METRICS: tuple[str, ...] = ("goodput_rps", "attainment", "ttft_p95_s", "tpot_p95_s", "latency_p95_s",
                                      "throughput_tok_s", "accuracy", "concurrency", "energy_j_per_tok")


def absolute_rate_workload(workload_cfg: Mapping[str, Any], capacity_rps: float | None) -> dict[str, Any]:
    """The workload with `rate_x_capacity` of `capacity_of` replaced by the absolute `rate_per_s` it stands for."""
    cfg = copy.deepcopy(dict(workload_cfg))
    arrival = dict(cfg.get("arrival") or {})
    if arrival.get("rate_x_capacity") is None:
        return cfg
    if capacity_rps is None:
        raise ValueError("the workload's rate is relative to a capacity, but the replay env measured none")
    arrival["rate_per_s"] = float(arrival.pop("rate_x_capacity")) * float(capacity_rps)
    arrival.pop("capacity_of", None)
    cfg["arrival"] = arrival
    return cfg


class SB3Policy:
    """An SB3 model as a rollout Policy: its deterministic action (masked for MaskablePPO); it does not learn here."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.masked = "action_masks" in model.predict.__code__.co_varnames

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        kwargs = {"action_masks": mask} if self.masked and mask is not None else {}
        action, _ = self.model.predict(obs, deterministic=True, **kwargs)
        return int(action)

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        pass


def play_episode(env: gymnasium.Env, policy: Policy, seed: int, episode: int,
                 epochs: int | None = None) -> list[dict[str, Any]]:
    """Play episode `episode` of the rollout schedule (reset seed seed * 1000 + episode) on the workload's own draw
    (replay: variant 0, the draw live serves), its first `epochs` epochs (at most; None: all); its records."""
    replay = getattr(env.unwrapped, "backend_kind", None) == "replay"
    rollout = Rollout(env, seed, yardsticks=False, first_epoch=episode * int(env.unwrapped.episode_epochs),
                      reset_options=(lambda _episode: {"variant": 0}) if replay else None)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"live_eval_epochs must be a positive integer (at most that many epochs) or null (the "
                         f"whole episode); got {epochs!r}")
    length = rollout.episode_epochs if epochs is None else min(epochs, rollout.episode_epochs)
    play(rollout, policy, rollout.next_epoch + length)
    return rollout.records


def agreement(live: list[dict[str, Any]], replay: list[dict[str, Any]]) -> dict[str, Any]:
    """How far replay's records agree with live's, epoch by epoch (module docstring)."""
    if len(live) != len(replay) or not live:
        raise ValueError(f"unpaired evaluation runs: {len(live)} live epochs vs {len(replay)} replay epochs")
    reward_live = np.array([r["reward"] for r in live], dtype=float)
    reward_replay = np.array([r["reward"] for r in replay], dtype=float)
    corr = (float(np.corrcoef(reward_live, reward_replay)[0, 1])
            if reward_live.std() > 0 and reward_replay.std() > 0 else None)
    metrics: dict[str, dict[str, float | None]] = {}
    for name in AGREEMENT_METRICS:
        if not all(name in r["metrics"] for r in (*live, *replay)):
            continue
        mean_live = float(np.mean([r["metrics"][name] for r in live]))
        mean_replay = float(np.mean([r["metrics"][name] for r in replay]))
        metrics[name] = {"live": mean_live, "replay": mean_replay,
                         "replay_rel_error": (mean_replay - mean_live) / abs(mean_live) if mean_live else None}
    return {
        "epochs": len(live),
        "arm_agreement": float(np.mean([a["action"] == b["action"] for a, b in zip(live, replay)])),
        "reward_live": float(reward_live.mean()), "reward_replay": float(reward_replay.mean()),
        "reward_corr": corr, "metrics": metrics,
        "arms_live": [r["arm"] for r in live], "arms_replay": [r["arm"] for r in replay],
    }


def evaluate_transfer(make_policy: Callable[[], Policy], replay_env: gymnasium.Env,
                      make_live_env: Callable[[dict[str, Any]], gymnasium.Env], seed: int, episode: int,
                      epochs: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Play episode `episode` (its first `epochs` epochs; None: all) with a fresh copy of the learned policy on
    `replay_env` and on the live env that `make_live_env(workload_cfg)` builds for the replay env's workload at an
    absolute rate. Returns (agreement, live records, replay records); the live env is closed."""
    replay_records = play_episode(replay_env, make_policy(), seed, episode, epochs)
    base = replay_env.unwrapped
    capacity = (base.capacity or {}).get("capacity_rps")
    live_env = make_live_env(absolute_rate_workload(base.serving.workload_cfg, capacity))
    try:
        live_records = play_episode(live_env, make_policy(), seed, episode, epochs)
    finally:
        live_env.close()
    result = agreement(live_records, replay_records)
    result["capacity_rps"] = capacity
    result["episode"] = int(episode)
    return result, live_records, replay_records
