"""The rollout loop (agents/rollout.py) on a toy env whose rewards, static arm, oracle and regret are worked out by
hand below, so every expected number is independent of the code under test.

    python -m pytest -q tests/test_rollout.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

from agents.rollout import Rollout, StaticArmMissing, play, static_arm_index, summarise

NEG_INF = -math.inf
# Reward of each arm on each epoch of an episode if it were already loaded (what evaluate_arms returns).
#            arm: 0 ref@2/4   1 ref@4/4 exits   2 ref@4/4 (static)   3 other@6/6   4 masked
ARM_REWARDS = [[1.0, 0.5, 0.2, 0.0, NEG_INF],
               [0.0, 2.0, 0.3, 0.1, NEG_INF],
               [0.4, 0.4, 0.9, 3.0, NEG_INF]]
SWITCH_COST = 0.25  # charged whenever the played arm differs from the loaded one (a fresh episode loads nothing)


def arm(index: int, candidate: str, depth: int, layers: int, criterion: str = "none", feasible: bool = True) -> dict:
    label = f"{candidate}@{depth}/{layers} exit={criterion}"
    return {"index": index, "label": label, "candidate": candidate, "depth": depth, "num_layers": layers,
            "criterion": criterion, "feasible": feasible, "batch_size": 4 if feasible else 0}


TABLE = [arm(0, "ref", 2, 4), arm(1, "ref", 4, 4, "max_prob"), arm(2, "ref", 4, 4), arm(3, "other", 6, 6),
         arm(4, "other", 3, 6, feasible=False)]


class ToyEnv(gymnasium.Env):
    """Three epochs per episode; reward = ARM_REWARDS[epoch][arm] - SWITCH_COST on a switch. Counts the calls the
    rollout makes, and remembers the seeds it was reset with."""

    def __init__(self, backend_kind: str = "replay", table: list[dict] = TABLE) -> None:
        self.backend_kind = backend_kind
        self.serving = SimpleNamespace(reference="ref")
        self.arm_table = table
        self.episode_epochs = len(ARM_REWARDS)
        self.action_space = spaces.Discrete(len(table))
        self.observation_space = spaces.Box(0.0, 10.0, (1,), np.float32)
        self.reset_seeds: list[int | None] = []
        self.evaluations = 0
        self._epoch = 0
        self._loaded: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.reset_seeds.append(seed)
        self._epoch, self._loaded = 0, None
        return np.zeros(1, np.float32), {}

    def evaluate_arms(self) -> np.ndarray:
        self.evaluations += 1
        return np.array(ARM_REWARDS[self._epoch])

    def action_masks(self) -> np.ndarray:
        return np.array([a["feasible"] for a in self.arm_table])

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = int(action)
        switched = action != self._loaded
        reward = ARM_REWARDS[self._epoch][action] - (SWITCH_COST if switched else 0.0)
        info = {"epoch": self._epoch, "phase": "first" if self._epoch < 2 else "second", "arm": action,
                "batch_size": 4, "masked_action": False, "switch_s": 0.1 if switched else 0.0,
                "metrics": {"throughput_tok_s": 10.0 * (action + 1)}, "reward_terms": {}, "penalties": {}}
        self._loaded = action
        self._epoch += 1
        return np.full(1, self._epoch, np.float32), reward, self._epoch == self.episode_epochs, False, info


class Scripted:
    """Plays a fixed list of arms and remembers what it was told."""

    def __init__(self, actions: list[int]) -> None:
        self.actions = list(actions)
        self.updates: list[tuple[int, float]] = []

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        return self.actions[len(self.updates)]

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        self.updates.append((action, reward))


# Two episodes of the toy env, worked out by hand (switch cost 0.25; each episode starts with nothing loaded):
PLAYED = [0, 0, 2, 3, 1, 1]
REWARDS = [1.0 - 0.25, 0.0, 0.9 - 0.25, 0.0 - 0.25, 2.0 - 0.25, 0.4]
ORACLE = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]  # best arm's reward per epoch, no switch cost
ORACLE_ARM = [0, 1, 3, 0, 1, 3]
STATIC = [0.2, 0.3, 0.9, 0.2, 0.3, 0.9]  # arm 2: the reference candidate at full depth without exits
REGRET = [0.25, 2.0, 2.35, 1.25, 0.25, 2.6]  # ORACLE - REWARDS


def test_rewards_yardsticks_and_regret_match_the_hand_computed_values() -> None:
    env = ToyEnv()
    seen: list[dict] = []
    rollout = Rollout(env, seed=7, on_record=seen.append)
    policy = Scripted(PLAYED)
    play(rollout, policy, until=6)

    records = rollout.records
    assert seen == records
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["episode"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert [r["action"] for r in records] == PLAYED
    assert [r["arm"] for r in records] == [TABLE[a]["label"] for a in PLAYED]
    assert [r["reward"] for r in records] == pytest.approx(REWARDS)
    assert [r["oracle_reward"] for r in records] == pytest.approx(ORACLE)
    assert [r["oracle_action"] for r in records] == ORACLE_ARM
    assert [r["static_reward"] for r in records] == pytest.approx(STATIC)
    assert [r["regret"] for r in records] == pytest.approx(REGRET)
    assert policy.updates == [(a, pytest.approx(r)) for a, r in zip(PLAYED, REWARDS)]
    assert env.evaluations == 6  # once per epoch
    assert env.reset_seeds == [7000, 7001]  # seed * 1000 + episode

    summary = summarise(records, episode_epochs=3)
    assert summary["epochs"] == 6
    assert summary["mean_reward"] == pytest.approx(3.3 / 6)
    assert summary["mean_reward_last_episode"] == pytest.approx((-0.25 + 1.75 + 0.4) / 3)
    assert summary["oracle_mean_reward"] == pytest.approx(2.0)
    assert summary["static_mean_reward"] == pytest.approx(1.4 / 3)
    assert summary["regret"] == pytest.approx(8.7)
    assert summary["mean_throughput_tok_s"] == pytest.approx(10.0 * (1 + 1 + 3 + 4 + 2 + 2) / 6)


def test_a_clairvoyant_policy_reading_the_arm_rewards_does_not_price_the_epoch_twice() -> None:
    env = ToyEnv()
    rollout = Rollout(env, seed=0)

    class Oracle(Scripted):
        def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
            return int(np.argmax(rollout.arm_rewards()))

    play(rollout, Oracle([]), until=3)
    assert [r["action"] for r in rollout.records] == ORACLE_ARM[:3]
    # switches on every epoch: 1.0 - 0.25, 2.0 - 0.25, 3.0 - 0.25
    assert [r["regret"] for r in rollout.records] == pytest.approx([0.25, 0.25, 0.25])
    assert env.evaluations == 3


def test_reset_seed_follows_the_global_epoch_whatever_seed_the_caller_passes() -> None:
    """SB3 passes its own seed to reset; a resumed run starts mid-way (first_epoch)."""
    env = ToyEnv()
    rollout = Rollout(env, seed=2, first_epoch=6)
    rollout.reset(seed=123)
    assert env.reset_seeds == [2002]
    rollout.step(0)
    assert rollout.records[0]["epoch"] == 6 and rollout.records[0]["episode"] == 2


def test_a_reset_behind_the_rollouts_back_is_an_error() -> None:
    env = ToyEnv()
    rollout = Rollout(env, seed=0)
    rollout.reset()
    rollout.step(0)
    env.reset()  # the env is at its epoch 0, the rollout expects epoch 1
    with pytest.raises(RuntimeError, match="expected 1"):
        rollout.step(0)


def test_without_yardsticks_records_carry_none_and_nothing_is_priced() -> None:
    env = ToyEnv(backend_kind="live")
    rollout = Rollout(env, seed=0)
    assert not rollout.has_yardsticks and "live backend" in rollout.why_no_yardsticks
    play(rollout, Scripted(PLAYED), until=3)
    assert env.evaluations == 0
    assert all(not {"oracle_reward", "static_reward", "regret"} & set(r) for r in rollout.records)
    summary = summarise(rollout.records, episode_epochs=3)
    assert summary["mean_reward"] == pytest.approx((0.75 + 0.0 + 0.65) / 3)
    assert not {"oracle_mean_reward", "static_mean_reward", "regret"} & set(summary)
    off = Rollout(ToyEnv(), seed=0, yardsticks=False)
    assert "oracle=false" in off.why_no_yardsticks


def test_static_arm_is_the_reference_at_full_depth_without_exits() -> None:
    assert static_arm_index(TABLE, "ref") == 2  # not arm 1 (full depth, with exits), not arm 3 (other candidate)
    assert static_arm_index(TABLE, "other") == 3


def test_missing_static_arm_fails_before_the_first_epoch_naming_the_arms() -> None:
    table = [TABLE[0], TABLE[1], TABLE[3]]  # ref's full depth only with exits
    env = ToyEnv(table=table)
    with pytest.raises(StaticArmMissing) as error:
        Rollout(env, seed=0)
    message = str(error.value)
    assert "'ref' at full depth (depth 4)" in message
    for entry in table:
        assert entry["label"] in message
    assert env.reset_seeds == [] and env.evaluations == 0
    Rollout(ToyEnv(backend_kind="live", table=table), seed=0)  # no yardsticks: no static arm needed


def test_a_masked_static_arm_is_an_error() -> None:
    table = [TABLE[0], {**TABLE[2], "feasible": False, "batch_size": 0}]
    with pytest.raises(StaticArmMissing, match="does not fit the memory budget"):
        static_arm_index(table, "ref")


def test_reward_panel_without_regret_draws_the_cumulative_reward_and_says_why() -> None:
    from helios.plots import reward_and_regret_figure

    rollout = Rollout(ToyEnv(backend_kind="live"), seed=0)
    play(rollout, Scripted(PLAYED), until=6)
    fig = reward_and_regret_figure(rollout.records, [0, 3], "toy", why_no_regret=rollout.why_no_yardsticks)
    lower = fig.axes[1]
    curves = [line for line in lower.get_lines() if len(line.get_xdata()) == 6]
    assert len(curves) == 1 and np.allclose(curves[0].get_ydata(), np.cumsum(REWARDS))
    assert lower.get_ylabel() == "cumulative SLO reward"
    note = lower.get_title(loc="left").replace("\n", " ")
    assert note.startswith("No regret vs the oracle") and "live backend" in note

    rollout = Rollout(ToyEnv(), seed=0)
    play(rollout, Scripted(PLAYED), until=6)
    fig = reward_and_regret_figure(rollout.records, [0, 3], "toy")
    lower = fig.axes[1]
    curves = [line for line in lower.get_lines() if len(line.get_xdata()) == 6]
    assert len(curves) == 1 and np.allclose(curves[0].get_ydata(), np.cumsum(REGRET))
    assert lower.get_title(loc="left") == ""
