"""ε-greedy (Sutton & Barto 2018, §2.2): explore a random feasible arm with probability ε, else the best mean.

    python scripts/train.py agent=epsilon_greedy agent.epsilon=0.1
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import ArmStatistics, argmax_allowed, check_range, feasible


class EpsilonGreedy(ArmStatistics):
    name = "epsilon_greedy"

    def __init__(self, n_arms: int, seed: int = 0, epsilon: float = 0.1) -> None:
        super().__init__(n_arms, seed)
        self.epsilon = check_range("epsilon", epsilon, 0.0, 1.0)

    def hyperparameters(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        untried = allowed[self.counts[allowed] == 0]
        if untried.size:
            return int(untried[self.rng.integers(untried.size)])
        if self.rng.random() < self.epsilon:
            return int(allowed[self.rng.integers(allowed.size)])
        return argmax_allowed(self.sums / np.maximum(self.counts, 1), allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        self.counts[action] += 1
        self.sums[action] += reward
        self.t += 1
