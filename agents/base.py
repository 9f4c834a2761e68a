"""The agent interface every helios agent implements, and the registry `make_agent` builds agents from.

    from agents import make_agent
    agent = make_agent("ucb", n_arms=12, seed=0, c=1.0)
    action = agent.select(obs, mask); agent.update(action, reward, obs, info)

Agents see only numbers: an observation vector, a boolean mask of feasible arms, a scalar reward and the env's info
dict. They know nothing of transformers. State is plain JSON (lists and floats), so checkpoints and exported
policies need no pickle.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class Agent(abc.ABC):
    """Selects one of `n_arms` arms per epoch and learns from the reward that arm earned."""

    name: str = "agent"
    needs_arm_table: bool = False  # True: make_agent passes the env's arm table (`arm_table=`) to the constructor
    needs_observation_names: bool = False  # True: make_agent passes the env's observation layout (`observation_names=`)
    learns: bool = True  # False: a planner, which updates nothing (agent_bench and heldout_draws skip its training)

    def __init__(self, n_arms: int, seed: int = 0) -> None:
        if isinstance(n_arms, bool) or not isinstance(n_arms, int) or n_arms < 1:
            raise ValueError(f"n_arms must be a positive integer; got {n_arms!r}")
        self.n_arms = n_arms
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.t = 0  # number of updates so far

    def reset(self, seed: int | None = None) -> None:
        """Forget everything learned; reseed."""
        self.__init__(**{**self.hyperparameters(), "n_arms": self.n_arms, "seed": self.seed if seed is None else seed})

    @abc.abstractmethod
    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int: ...

    @abc.abstractmethod
    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None: ...

    def greedy(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        """The learned policy without exploration: what a frozen evaluation episode plays (agent_bench's eval
        episodes). Default: `select`, for agents whose choice is already their policy (the HELIOS controller)."""
        return self.select(obs, mask)

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.rng.bit_generator.state = state["rng"]

    def export(self) -> dict[str, Any]:
        """What a serving front end needs to act: the agent's name, hyper-parameters and learned statistics."""
        return {"agent": self.name, "n_arms": self.n_arms, "hyperparameters": self.hyperparameters(),
                "state": self.state_dict()}


class ArmStatistics(Agent):
    """An agent whose whole learned state is a pull count and a reward sum per arm (UCB1, Thompson, ε-greedy,
    discounted UCB): the arrays live here; each agent's own file keeps the rule that uses them."""

    def __init__(self, n_arms: int, seed: int = 0) -> None:
        super().__init__(n_arms, seed)
        self.counts = np.zeros(n_arms)
        self.sums = np.zeros(n_arms)

    def greedy(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        """The best mean reward among tried feasible arms (untried ones only when none was tried)."""
        allowed = feasible(mask, self.n_arms)
        tried = allowed[self.counts[allowed] > 0]
        if tried.size == 0:
            return self.select(obs, mask)
        return argmax_allowed(self.sums / np.maximum(self.counts, 1), tried, self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "counts": self.counts.tolist(), "sums": self.sums.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.counts, self.sums = np.array(state["counts"], float), np.array(state["sums"], float)


def feasible(mask: np.ndarray | None, n_arms: int) -> np.ndarray:
    """Indices of allowed arms (all of them without a mask); an all-false mask is an error, not a silent choice."""
    if mask is None:
        return np.arange(n_arms)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n_arms,):
        raise ValueError(f"action mask has shape {mask.shape}; expected ({n_arms},)")
    allowed = np.flatnonzero(mask)
    if allowed.size == 0:
        raise ValueError("every arm is masked: no feasible action")
    return allowed


def argmax_allowed(scores: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> int:
    """Highest score among allowed arms, ties broken at random (so symmetric arms are explored evenly)."""
    values = scores[allowed]
    best = np.flatnonzero(values == values.max())
    return int(allowed[best[rng.integers(best.size)]])


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high) or isinstance(value, bool):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return float(value)
