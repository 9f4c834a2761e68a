"""Tabular Q-learning over the load (Watkins & Dayan 1992, "Q-learning", Machine Learning 8): an agent for a world
whose epochs are coupled by a queue.

    python scripts/train.py agent=q_load
    python benchmarks/agent_bench.py --agents q_load,ucb,lin_ucb

Why not a bandit: a burst served at full depth leaves a backlog that the next epochs pay for whatever arm they
choose, so an epoch's reward is not its arm's value alone (benchmarks/RESULTS.md, "A testbed where adaptation
pays"). Here the state is the load the last epoch left behind, binned: s = (bin of each named observation entry),
by default the arrival rate over capacity and the backlog (`arrival_ratio`, `queue_ratio`), and the value of an arm
includes what it leaves for the next epoch:

    Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a))

with s the state the arm was chosen in and s' the one the epoch left. Actions are epsilon-greedy over the feasible
arms (epsilon decays per update to `min_epsilon`). Q starts at `initial_q`: 0 is above every reward an SLO here
pays, so each arm is tried once in each state before the greedy choice settles (optimism in the face of
uncertainty); a value near the typical reward (e.g. -4, the accuracy clip) leaves exploration to epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.base import Agent, check_range, feasible


class LoadQLearning(Agent):
    name = "q_load"
    needs_observation_names = True

    def __init__(self, n_arms: int, seed: int = 0, features: Sequence[str] = ("arrival_ratio", "queue_ratio"),
                 edges: Sequence[Sequence[float]] = ((0.6, 1.0, 1.6), (0.1, 1.0)), alpha: float = 0.3,
                 gamma: float = 0.5, epsilon: float = 0.2, epsilon_decay: float = 0.99, min_epsilon: float = 0.02,
                 initial_q: float = 0.0,
                 observation_names: Sequence[str] | None = None,
                 feature_indices: Sequence[int] | None = None) -> None:
        super().__init__(n_arms, seed)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, low_open=True)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, high_open=True)
        self.epsilon = check_range("epsilon", epsilon, 0.0, 1.0)
        self.epsilon_decay = check_range("epsilon_decay", epsilon_decay, 0.0, 1.0, low_open=True)
        self.min_epsilon = check_range("min_epsilon", min_epsilon, 0.0, 1.0)
        if len(features) != len(edges):
            raise ValueError(f"q_load: {len(features)} features but {len(edges)} edge lists; give one per feature")
        self.features = [str(f) for f in features]
        self.edges = [sorted(float(e) for e in row) for row in edges]
        if feature_indices is None:
            if observation_names is None:
                raise ValueError("q_load reads observation entries by name; pass the env's observation_names")
            unknown = [f for f in self.features if f not in observation_names]
            if unknown:
                raise ValueError(f"q_load: unknown feature(s) {unknown}; valid: {list(observation_names)}")
            feature_indices = [list(observation_names).index(f) for f in self.features]
        self.feature_indices = [int(i) for i in feature_indices]
        shape = tuple(len(row) + 1 for row in self.edges)
        self.initial_q = float(initial_q)
        self.q = np.full((*shape, n_arms), self.initial_q)
        self._selected: tuple[tuple[int, ...], int] | None = None  # (state, arm) of the last select

    def hyperparameters(self) -> dict[str, Any]:
        return {"features": self.features, "edges": self.edges, "alpha": self.alpha, "gamma": self.gamma,
                "epsilon": self.epsilon, "epsilon_decay": self.epsilon_decay, "min_epsilon": self.min_epsilon,
                "initial_q": self.initial_q,
                "feature_indices": self.feature_indices}

    def state(self, obs: np.ndarray | None) -> tuple[int, ...]:
        if obs is None:
            raise ValueError("q_load needs the observation vector")
        x = np.asarray(obs, dtype=float).ravel()
        return tuple(int(np.searchsorted(row, x[i], side="right")) for i, row in zip(self.feature_indices, self.edges))

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        allowed = feasible(mask, self.n_arms)
        s = self.state(obs)
        action = int(self.rng.choice(allowed)) if self.rng.random() < self.epsilon else self._best(s, allowed)
        self._selected = (s, action)
        return action

    def greedy(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        return self._best(self.state(obs), feasible(mask, self.n_arms))

    def _best(self, s: tuple[int, ...], allowed: np.ndarray) -> int:
        values = self.q[s][allowed]
        return int(self.rng.choice(allowed[np.flatnonzero(values == values.max())]))

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        if self._selected is None or self._selected[1] != int(action):
            raise ValueError("q_load: update() must follow the select() that chose `action` (it needs that state)")
        s, a = self._selected
        s_next = self.state(obs)
        target = float(reward) + self.gamma * float(self.q[s_next].max())
        self.q[(*s, a)] += self.alpha * (target - self.q[(*s, a)])
        self.epsilon = max(self.min_epsilon, self.epsilon * self.epsilon_decay)
        self._selected = None
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "q": self.q.tolist(), "epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.q = np.array(state["q"], dtype=float)
        self.epsilon = float(state["epsilon"])
