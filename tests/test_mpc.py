"""agents/mpc.py against a hand-solved queue: the planner serves the burst with the fast arm because the backlog the
accurate arm leaves costs more later than the fast arm's penalty costs now, which a one-epoch lookahead cannot see.

    python -m pytest -q tests/test_mpc.py

The toy (a stand-in for ModelDepthEnv's planning interface, deterministic, so every draw gives the same future):
6 epochs, arrivals 1, 1, 3, 1, 1, 1 (a burst at epoch 2); arm 0 ("depth 10") serves 3 an epoch and pays 3 for its
accuracy; arm 1 ("full depth") serves 1 and pays nothing; every epoch that ends with a backlog pays 1. By hand:
  serve the burst with arm 1: backlog 2 that arm 1 never drains (it serves exactly the arrivals): -1 at epochs 2..5,
      total -4; draining it later with arm 0 costs -1 (burst) - 3 = -4 too;
  serve the burst with arm 0: -3 at epoch 2, no backlog after: total -3, the optimum, [1, 1, 0, 1, 1, 1].
At epoch 2, the immediate rewards are -3 (arm 0) and -1 (arm 1): a myopic planner (horizon 1) picks arm 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from agents import make_agent
from agents.mpc import MPCPlanner

ARRIVALS = (1, 1, 3, 1, 1, 1)
CAPACITY = (3, 1)
PENALTY = (3.0, 0.0)
OPTIMAL = [1, 1, 0, 1, 1, 1]


class ToyBackend:
    variants = 4


class ToyQueue:
    """The toy of the module docstring, with ModelDepthEnv's planning interface (epoch, planning, step, simulate)."""

    backend_kind = "replay"
    episode_epochs = len(ARRIVALS)

    def __init__(self, episode_variant: int = 2) -> None:
        self.backend = ToyBackend()
        self.episode_variant = episode_variant
        self.epoch, self.backlog = 0, 0
        self.planned_draws: list[int] = []

    @property
    def unwrapped(self) -> ToyQueue:
        return self

    def action_masks(self) -> np.ndarray:
        return np.ones(2, dtype=bool)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.backlog = max(0, self.backlog + ARRIVALS[self.epoch] - CAPACITY[action])
        reward = -PENALTY[action] - (1.0 if self.backlog else 0.0)
        self.epoch += 1
        return np.zeros(1), reward, self.epoch >= self.episode_epochs, False, {}

    @contextlib.contextmanager
    def planning(self, variant: int) -> Iterator[None]:
        self.planned_draws.append(int(variant))
        saved = self.epoch, self.backlog
        try:
            yield
        finally:
            self.epoch, self.backlog = saved

    def simulate(self, actions: Sequence[int], variant: int) -> np.ndarray:
        with self.planning(variant):
            rewards = [self.step(a)[1] for a in actions[: self.episode_epochs - self.epoch]]
        return np.array(rewards)


def play_episode(agent: MPCPlanner, env: ToyQueue) -> tuple[list[int], float]:
    actions, total = [], 0.0
    while env.epoch < env.episode_epochs:
        action = agent.select(np.zeros(1), env.action_masks())
        actions.append(action)
        total += env.step(action)[1]
        agent.update(action, 0.0)
    return actions, total


def test_planner_finds_the_hand_solved_schedule() -> None:
    env = ToyQueue()
    agent = make_agent("mpc", 2, seed=0, draws=2, horizon_epochs=6)
    agent.bind(env)
    actions, total = play_episode(agent, env)
    assert actions == OPTIMAL
    assert total == -3.0
    assert agent.base_arm == 1  # held for the whole episode: arm 1 earns -4, arm 0 -18


def test_a_one_epoch_lookahead_falls_into_the_backlog() -> None:
    env = ToyQueue()
    agent = make_agent("mpc", 2, seed=0, draws=2, horizon_epochs=1)
    agent.bind(env)
    actions, total = play_episode(agent, env)
    assert actions == [1] * 6
    assert total == -4.0


def test_planner_never_plans_on_the_episode_own_draw() -> None:
    env = ToyQueue(episode_variant=2)
    agent = make_agent("mpc", 2, seed=3, draws=3)
    agent.bind(env)
    play_episode(agent, env)
    assert env.planned_draws and 2 not in env.planned_draws
    assert set(env.planned_draws) == {0, 1, 3}  # 3 draws of the 3 others, every epoch
    restricted = ToyQueue(episode_variant=0)
    agent = make_agent("mpc", 2, seed=0, draws=1, plan_draws=[0, 1])  # held-out evaluation: training draws only
    agent.bind(restricted)
    play_episode(agent, restricted)
    assert set(restricted.planned_draws) == {1}


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        MPCPlanner(2, draws=0)
    with pytest.raises(ValueError, match="hold_epochs must be positive"):
        MPCPlanner(2, hold_epochs=(0, 2))
    with pytest.raises(ValueError, match="horizon_epochs must be a positive integer"):
        MPCPlanner(2, horizon_epochs=0)
    agent = MPCPlanner(2, draws=4)
    with pytest.raises(RuntimeError, match="bind"):
        agent.select(np.zeros(1), np.ones(2, dtype=bool))
    agent.bind(ToyQueue())
    with pytest.raises(ValueError, match="only 3 other than the episode's own"):
        agent.select(np.zeros(1), np.ones(2, dtype=bool))


def test_bind_refuses_an_env_without_a_simulator() -> None:
    class Live(ToyQueue):
        backend_kind = "live"

    with pytest.raises(ValueError, match="env=replay"):
        MPCPlanner(2).bind(Live())


class NoisyDetour(ToyQueue):
    """Arm 0 earns 0. Arm 1 earns 0.5 + 10 s_d on its first epoch in a row (s_d = +1 on even draws, -1 on odd ones:
    a detour worth 0.5 on average over draws, but +-10 on any one) and -5 on later ones."""

    def __init__(self) -> None:
        super().__init__(episode_variant=0)
        self.backend.variants = 5  # plans on draws 1..4: two +1, two -1
        self.draw, self.run = 0, 0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.run = self.run + 1 if action == 1 else 0
        reward = 0.0 if action == 0 else (0.5 + 10.0 * (1 if self.draw % 2 == 0 else -1) if self.run == 1 else -5.0)
        self.epoch += 1
        return np.zeros(1), reward, self.epoch >= self.episode_epochs, False, {}

    @contextlib.contextmanager
    def planning(self, variant: int) -> Iterator[None]:
        saved = self.epoch, self.draw, self.run
        self.draw = int(variant)
        try:
            yield
        finally:
            self.epoch, self.draw, self.run = saved


def test_a_detour_whose_gain_is_within_its_noise_is_not_taken() -> None:
    """Over the 4 draws the detour's mean gain is +0.5 and its standard error 5.8: the base arm (0) is kept at
    switch_z 1; without the test (switch_z 0) the planner takes every detour the mean favours."""
    gated = make_agent("mpc", 2, seed=0, draws=4, hold_epochs=(1,), switch_z=1.0)
    env = NoisyDetour()
    gated.bind(env)
    assert play_episode(gated, env)[0] == [0] * 6
    ungated = make_agent("mpc", 2, seed=0, draws=4, hold_epochs=(1,), switch_z=0.0)
    env = NoisyDetour()
    ungated.bind(env)
    assert play_episode(ungated, env)[0][0] == 1


def test_agent_bench_markdown_says_when_planners_skip_training() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import agent_bench

    with_planner = {"scenarios": {"bursts": {"agents": {"mpc": {}, "ucb": {}}}}}
    assert "Planners (mpc) learn nothing" in agent_bench.planner_note(with_planner)
    assert agent_bench.planner_note({"scenarios": {"bursts": {"agents": {"ucb": {}}}}}) == ""
