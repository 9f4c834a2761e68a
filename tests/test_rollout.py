"""The rollout loop (agents/rollout.py) on a toy env whose rewards, static arm, oracle and regret are worked out by
hand below, so every expected number is independent of the code under test.

    python -m pytest -q tests/test_rollout.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


# ------------------------------------------------------------------ the yardstick ladder (agents/yardsticks.py)
#
# QueueToy: 4 epochs per episode in 2 phases, "calm" (epochs 0-1, 2 arrivals an epoch) and "rush" (epochs 2-3, 4
# arrivals), 3 arms. Arm a serves up to CAPACITY[a] requests an epoch; the unserved ones wait in a queue that carries
# over to the next epoch (reset to 0 with the episode). Reward = QUALITY[a] - queue left after the epoch - SWITCH on a
# change of arm (loading the first arm of an episode is free). evaluate_arms() prices each arm on the current queue
# without switch cost, so summing per-epoch values and playing a schedule differ, as they will on the real env.
QUALITY = [4.0, 2.0, 0.0]  # arm 0 = the reference at full depth (static): accurate, slow
CAPACITY = [1, 2, 5]
ARRIVALS = [2, 2, 4, 4]
PHASES = ["calm", "calm", "rush", "rush"]
QUEUE_TABLE = [arm(0, "ref", 4, 4), arm(1, "ref", 2, 4), arm(2, "ref", 1, 4)]

# By hand, q' = max(0, q + arrivals - capacity), reward = quality - q' (- switch):
#   fixed arm 0: q' 1, 2, 5, 8 -> 3, 2, -1, -4      = 0   (calm 5, rush -5)
#   fixed arm 1: q' 0, 0, 2, 4 -> 2, 2,  0, -2      = 2   (calm 4, rush -2)
#   fixed arm 2: q' 0, 0, 0, 0 -> 0, 0,  0,  0      = 0   (calm 0, rush  0)
# best fixed: arm 1, 2 per episode = 0.5 per epoch. Per phase: calm -> arm 0 (5), rush -> arm 2 (0).
# Summing those phase totals would promise 5 + 0 = 5; played, schedule [0, 0, 2, 2] inherits arm 0's queue of 2 and
# pays the switch (1.0): q' 1, 2, 1, 0 -> 3, 2, 0 - 1 - 1 = -2, 0 = 3 per episode = 0.75 per epoch.
FIXED_TOTALS = {0: 0.0, 1: 2.0, 2: 0.0}
SCHEDULE_REWARDS = [3.0, 2.0, -2.0, 0.0]
# The agent: episode 0 plays [1, 1, 1, 2]: 2, 2, 0 (q' 2), then switch to 2 with q' 1: -1 - 1 = -2 -> 2;
#            episode 1 plays [1, 1, 2, 2]: 2, 2, switch to 2 with q' 0: -1, then 0                -> 3.
AGENT_PLAYED = [1, 1, 1, 2, 1, 1, 2, 2]
AGENT_REWARDS = [2.0, 2.0, 0.0, -2.0, 2.0, 2.0, -1.0, 0.0]
# R_agent = 5 / 8 = 0.625; gap recovered = (0.625 - 0.5) / (0.75 - 0.5) = 0.5;
# dynamic regret = sum(schedule - agent) = (3-2)+(2-2)+(-2-0)+(0+2) + (3-2)+(2-2)+(-2+1)+(0-0) = 1 = 8 x (0.75 - 0.625);
# headroom = 2 ** (0.75 - 0.5) = 2 ** 0.25.


class QueueToy(gymnasium.Env):
    """The queueing toy above (deterministic; the seed only gets recorded)."""

    def __init__(self, switch_cost: float = 1.0, backend_kind: str = "replay", arrivals: Sequence[int] = ARRIVALS,
                 phases: Sequence[str] = PHASES) -> None:
        self.backend_kind = backend_kind
        self.serving = SimpleNamespace(reference="ref")
        self.arm_table = QUEUE_TABLE
        self.arrivals, self.phases = list(arrivals), list(phases)
        self.episode_epochs = len(self.arrivals)
        self.switch_cost = switch_cost
        self.action_space = spaces.Discrete(len(QUEUE_TABLE))
        self.observation_space = spaces.Box(0.0, 100.0, (1,), np.float32)
        self.reset_seeds: list[int | None] = []
        self.reset_options: list[dict | None] = []
        self._epoch, self._queue, self._loaded = 0, 0, None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.reset_seeds.append(seed)
        self.reset_options.append(options)
        self._epoch, self._queue, self._loaded = 0, 0, None
        return np.zeros(1, np.float32), {"phase": self.phases[0]}

    def _after(self, action: int) -> int:
        return max(0, self._queue + self.arrivals[self._epoch] - CAPACITY[action])

    def evaluate_arms(self) -> np.ndarray:
        return np.array([QUALITY[a] - self._after(a) for a in range(len(QUEUE_TABLE))])

    def action_masks(self) -> np.ndarray:
        return np.ones(len(QUEUE_TABLE), dtype=bool)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = int(action)
        switched = self._loaded is not None and action != self._loaded
        queue = self._after(action)
        objective = QUALITY[action] - queue
        reward = objective - (self.switch_cost if switched else 0.0)
        info = {"epoch": self._epoch, "phase": self.phases[self._epoch], "arm": action, "batch_size": CAPACITY[action],
                "masked_action": False, "switch_s": 1.0 if switched else 0.0,
                "metrics": {"latency_p95_s": 1.0 + queue, "energy_j_per_tok": 1.0 / CAPACITY[action]},
                "reward_terms": {"quality": QUALITY[action], "queue": -float(queue)},
                "penalties": {"switch": self.switch_cost if switched else 0.0}}
        self._queue, self._loaded = queue, action
        self._epoch += 1
        return np.full(1, queue, np.float32), reward, self._epoch == self.episode_epochs, False, info


def test_ladder_best_fixed_phase_oracle_gap_and_dynamic_regret_match_the_hand_computed_values() -> None:
    from agents.yardsticks import compute_ladder

    env = QueueToy()
    ladder = compute_ladder(env, seed=3, episodes=2)
    assert {a: run.rewards.sum() / 2 for a, run in ladder.fixed.items()} == pytest.approx(FIXED_TOTALS)
    assert ladder.best_fixed_arm == 1
    assert ladder.best_fixed_reward == pytest.approx(0.5)
    assert ladder.phase_fixed_rewards == {"calm": pytest.approx({0: 10.0, 1: 8.0, 2: 0.0}),  # two episodes each
                                          "rush": pytest.approx({0: -10.0, 1: -4.0, 2: 0.0})}
    assert ladder.phase_schedule == {"calm": 0, "rush": 2}
    assert not ladder.phase_oracle_is_fixed
    assert ladder.phase_oracle.actions == [0, 0, 2, 2] * 2
    assert list(ladder.phase_oracle.rewards) == pytest.approx(SCHEDULE_REWARDS * 2)  # played, not 5 + 0 summed
    assert ladder.phase_oracle_reward == pytest.approx(0.75)
    assert ladder.static_arm == 0 and ladder.static.mean_reward == pytest.approx(0.0)
    assert ladder.headroom == pytest.approx(2 ** 0.25)
    # objective = reward + switch penalty: the schedule's one switch per episode is left out (3 + 2 - 1 + 0 = 4)
    assert ladder.headroom_objective == pytest.approx(2 ** (4 / 4 - 0.5))
    # every rung meets the agent's reset seeds: 3 arms, the schedule and its 4 refinement trials (2 phases x 2 other
    # arms; by hand none beats 3 per episode: {1, 2} ties at 3, {0, 1} -2, {2, 2} 0, {1, 1} 2, {0, 0} 0, so the
    # schedule stays), 2 episodes each, after one reset for the mask
    assert env.reset_seeds == [3000] + [3000, 3001] * 8

    agent_env = QueueToy()
    rollout = Rollout(agent_env, seed=3)
    play(rollout, Scripted(AGENT_PLAYED), until=8)
    assert [r["reward"] for r in rollout.records] == pytest.approx(AGENT_REWARDS)
    score = ladder.score([r["reward"] for r in rollout.records])
    assert score["gap_recovered"] == pytest.approx(0.5)
    assert score["dynamic_regret"] == pytest.approx(1.0)
    assert score["best_fixed_reward"] == pytest.approx(0.5)
    assert score["phase_oracle_reward"] == pytest.approx(0.75)
    # a resumed run scored from its sixth epoch on: epochs 5..7, agent 2 - 1 + 0, oracle 2 - 2 + 0, fixed 2 + 0 - 2
    tail = ladder.score(AGENT_REWARDS[5:], first_epoch=5)
    assert tail["dynamic_regret"] == pytest.approx(-1.0)
    assert tail["gap_recovered"] is None  # over those epochs the schedule (0) does not beat the fixed arm (0)
    with pytest.raises(ValueError, match="ladder covers 8"):
        ladder.score([0.0] * 9)
    # the per-epoch oracle (evaluate_arms on the agent's own queue, no switch cost) is still recorded, for reporting
    # only. Episode 0, queue before each epoch 0, 0, 0, 2: max(4 - 1, 2 - 0, 0) = 3 twice; max(4 - 3, 2 - 2, 0) = 1;
    # max(4 - 5, 2 - 4, 0 - 1) = -1.
    assert [r["oracle_reward"] for r in rollout.records[:4]] == pytest.approx([3.0, 3.0, 1.0, -1.0])


def test_the_phase_oracle_refines_a_phase_misjudged_behind_a_queue() -> None:
    """A quiet third phase after the rush (0 arrivals). Chosen from the fixed-arm runs, it goes to arm 1: in arm 0's
    fixed run it inherits the rush's queue of 8 (q' 7, 6: 4 - 7 + 4 - 6 = -5), arm 1's gives 0 + 2 = 2, arm 2's 0.
    Played after the schedule's own rush (arm 2, queue 0), arm 0 earns 4 - 1 (switch) + 4 = 7 there, arm 1 only
    2 - 1 + 2 = 3: by hand the independent schedule {0, 2, 1} earns 3 + 2 - 2 + 0 + 1 + 2 = 6 per episode and
    {0, 2, 0} earns 3 + 2 - 2 + 0 + 3 + 4 = 10, which coordinate ascent finds (no other change helps: calm -> 1
    ties at 10, rush -> 0 or 1 leaves a queue)."""
    from agents.yardsticks import compute_ladder

    env = QueueToy(arrivals=[2, 2, 4, 4, 0, 0], phases=["calm", "calm", "rush", "rush", "quiet", "quiet"])
    ladder = compute_ladder(env, seed=0, episodes=1)
    assert ladder.phase_fixed_rewards["quiet"] == pytest.approx({0: -5.0, 1: 2.0, 2: 0.0})
    assert ladder.schedule_run.mean_reward == pytest.approx(6 / 6)  # the independent choice, played
    assert ladder.phase_schedule == {"calm": 0, "rush": 2, "quiet": 0}
    assert list(ladder.phase_oracle.rewards) == pytest.approx([3.0, 2.0, -2.0, 0.0, 3.0, 4.0])
    assert ladder.phase_oracle_reward == pytest.approx(10 / 6)


def test_a_schedule_that_loses_to_its_switches_leaves_the_best_fixed_arm_as_phase_oracle() -> None:
    """Switch cost 3: the schedule earns 3 + 2 - 1 - 3 + 0 = 1 per episode < 2 of fixed arm 1, so the phase oracle
    is the constant schedule (arm 1), the headroom is 1 and there is no gap to recover."""
    from agents.yardsticks import compute_ladder

    ladder = compute_ladder(QueueToy(switch_cost=3.0), seed=0, episodes=1)
    assert ladder.schedule_run.mean_reward == pytest.approx(1 / 4)
    assert ladder.phase_oracle_is_fixed and ladder.phase_schedule == {"calm": 1, "rush": 1}
    assert ladder.phase_oracle_reward == pytest.approx(0.5) and ladder.headroom == pytest.approx(1.0)
    assert ladder.score([2.0, 2.0, 0.0, -2.0])["gap_recovered"] is None
    summary = ladder.summary()
    assert summary["best_fixed_arm"] == QUEUE_TABLE[1]["label"] and summary["phase_schedule_reward"] == 0.25


def test_ladder_is_replay_only_and_says_why() -> None:
    from agents.yardsticks import compute_ladder, ladder_unavailable

    env = QueueToy(backend_kind="live")
    assert "replay-only" in ladder_unavailable(env)
    with pytest.raises(ValueError, match="live backend would serve every arm"):
        compute_ladder(env, seed=0, episodes=1)
    assert env.reset_seeds == []


def test_gap_recovered_regret_and_ci_helpers() -> None:
    from agents.yardsticks import dynamic_regret, gap_recovered, headroom, mean_ci95

    assert gap_recovered(1.0, 0.5, 1.5) == pytest.approx(0.5)
    assert gap_recovered(0.0, 0.5, 1.5) == pytest.approx(-0.5)  # worse than the best fixed arm: negative
    assert gap_recovered(1.0, 0.5, 0.5) is None
    assert gap_recovered(1.0, 0.5, 0.5 + math.log2(1.009)) is None  # a headroom under 1.01x is no gap
    assert dynamic_regret([1.0, 2.0], [2.0, 2.5]) == pytest.approx(1.5)
    assert headroom(-0.5, -1.0) == pytest.approx(math.sqrt(2))
    mean, half = mean_ci95([0.1, 0.3, 0.2, None])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert mean_ci95([0.4]) == (0.4, None) and mean_ci95([]) == (None, None)


def test_regret_panel_is_against_the_played_phase_oracle_and_never_empty() -> None:
    from agents.yardsticks import compute_ladder, ladder_unavailable
    from helios.plots import arms_figure, reward_and_regret_figure

    ladder = compute_ladder(QueueToy(), seed=3, episodes=2)
    rollout = Rollout(QueueToy(), seed=3)
    play(rollout, Scripted(AGENT_PLAYED), until=8)
    yardsticks = {"phase oracle": ladder.phase_oracle.rewards, "best fixed arm": ladder.best_fixed.rewards,
                  "static full depth": ladder.static.rewards}
    fig = reward_and_regret_figure(rollout.records, [0, 2, 4, 6], "toy", yardsticks=yardsticks)
    lower = fig.axes[1]
    curves = [line for line in lower.get_lines() if len(line.get_xdata()) == 8]
    # cumulative (schedule - agent): 1, 0, -2, 2 | 1, 0, -1, 0 (hand-computed above), ending at the dynamic regret 1
    assert len(curves) == 1 and np.allclose(curves[0].get_ydata(), [1, 1, -1, 1, 2, 2, 1, 1])
    assert "phase oracle" in lower.get_ylabel() and lower.get_title(loc="left") == ""
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[:4] == ["agent", "phase oracle", "best fixed arm", "static full depth"]
    assert "per-epoch oracle (reported, not a target)" in labels
    assert len(fig.axes[0].patches) == 2  # phases 2 and 4 (rush, rush) shaded: the panel shows where drift happens

    arms = arms_figure(rollout.records, [a["label"] for a in QUEUE_TABLE], [0, 2, 4, 6], "toy",
                       schedule=ladder.phase_oracle.actions)
    step = [line for line in arms.axes[0].get_lines() if line.get_label() == "phase oracle's arm"]
    assert len(step) == 1 and list(step[0].get_ydata()) == [0, 0, 2, 2, 0, 0, 2, 2]

    live = Rollout(QueueToy(backend_kind="live"), seed=0)
    play(live, Scripted(AGENT_PLAYED), until=4)
    fig = reward_and_regret_figure(live.records, [0, 2], "toy", why_no_regret=ladder_unavailable(live.env))
    lower = fig.axes[1]
    curves = [line for line in lower.get_lines() if len(line.get_xdata()) == 4]
    assert len(curves) == 1 and np.allclose(curves[0].get_ydata(), np.cumsum(AGENT_REWARDS[:4]))
    assert lower.get_ylabel() == "cumulative SLO reward"
    note = lower.get_title(loc="left").replace("\n", " ")
    assert note.startswith("No regret vs the phase oracle: the live backend") and "replay-only" in note


def test_reset_options_per_episode_reach_every_rung() -> None:
    """Rollout(reset_options=f) resets episode e with f(e) (replay's {"variant": k}: benchmarks/heldout_draws.py), and
    compute_ladder passes the same f to every rung, so agent and yardsticks meet the same draws."""
    from agents.yardsticks import compute_ladder

    options = lambda episode: {"variant": 10 + episode}  # noqa: E731
    env = QueueToy()
    play(Rollout(env, seed=0, yardsticks=False, reset_options=options), Scripted([0] * 8), until=8)
    assert env.reset_options == [{"variant": 10}, {"variant": 11}]
    ladder_env = QueueToy()
    compute_ladder(ladder_env, seed=0, episodes=2, reset_options=options)
    assert ladder_env.reset_options == [{"variant": 10}] + [{"variant": 10}, {"variant": 11}] * 8
