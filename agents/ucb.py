"""UCB1 (Auer, Cesa-Bianchi & Fischer 2002, "Finite-time Analysis of the Multiarmed Bandit Problem").

    python scripts/train.py agent=ucb

Pull each arm once, then argmax_a  mean_a + c * sqrt(2 ln t / n_a). With rewards in [0, 1] and c = 1 regret is
O(sum_a ln T / gap_a); SLO rewards are ratios to a reference run (about 0..2), so `c` scales the bonus to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import ArmStatistics, argmax_allowed, check_range, feasible


class UCB1(ArmStatistics):
    name = "ucb"

    def __init__(self, n_arms: int, seed: int = 0, c: float = 1.0) -> None:
        super().__init__(n_arms, seed)
        self.c = check_range("c (exploration)", c, 0.0, float("inf"))

    def hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c}

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        untried = allowed[self.counts[allowed] == 0]
        if untried.size:
            return int(untried[self.rng.integers(untried.size)])
        means = self.sums / np.maximum(self.counts, 1)
        total = max(self.counts[allowed].sum(), 1)
        bonus = self.c * np.sqrt(2 * np.log(total) / np.maximum(self.counts, 1))
        return argmax_allowed(means + bonus, allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        self.counts[action] += 1
        self.sums[action] += reward
        self.t += 1

    def means(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)
