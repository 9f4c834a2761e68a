"""helios agents: one small file each, one interface (agents.base.Agent); `make_agent(name, n_arms, **hyper)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agents.base import Agent
from agents.cusum_ucb import CusumUCB
from agents.d_ucb import DiscountedUCB
from agents.epsilon_greedy import EpsilonGreedy
from agents.exp3 import EXP3
from agents.helios import HeliosController
from agents.lin_ucb import LinUCB
from agents.mpc import MPCPlanner
from agents.q_load import LoadQLearning
from agents.seasonal_q import SeasonalLoadQ
from agents.static import Static
from agents.sw_ucb import SlidingWindowUCB
from agents.thompson import GaussianThompson
from agents.ucb import UCB1

AGENTS: dict[str, type[Agent]] = {
    cls.name: cls
    for cls in (UCB1, GaussianThompson, EpsilonGreedy, EXP3, SlidingWindowUCB, DiscountedUCB, CusumUCB, LinUCB, Static,
                HeliosController, LoadQLearning, SeasonalLoadQ, MPCPlanner)
}


def make_agent(name: str, n_arms: int, seed: int = 0, arm_table: Sequence[Any] | None = None,
               observation_names: Sequence[str] | None = None, **hyperparameters: Any) -> Agent:
    """Build agent `name`; `arm_table` (the env's, dicts or helios.arms.Arm) and `observation_names` (the env's
    observation layout) reach only agents that read them."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid: {sorted(AGENTS)}")
    cls = AGENTS[name]
    if cls.needs_arm_table:
        hyperparameters["arm_table"] = arm_table
    if getattr(cls, "needs_observation_names", False) and observation_names is not None:
        hyperparameters["observation_names"] = list(observation_names)
    return cls(n_arms=n_arms, seed=seed, **hyperparameters)


__all__ = ["AGENTS", "Agent", "make_agent"]
