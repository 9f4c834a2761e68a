"""Discounted UCB (Kocsis & Szepesvári 2006; analysed by Garivier & Moulines 2011).

    python scripts/train.py agent=d_ucb agent.discount=0.95

Every step all statistics decay by γ: N_a <- γ N_a + 1[a pulled], S_a <- γ S_a + r 1[a pulled];
index = S_a / N_a + 2c * sqrt(ξ ln(Σ_b N_b) / N_a). Forgets smoothly, with an effective memory of 1 / (1 - γ).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import ArmStatistics, argmax_allowed, check_range, feasible


class DiscountedUCB(ArmStatistics):
    name = "d_ucb"

    def __init__(self, n_arms: int, seed: int = 0, discount: float = 0.95, c: float = 0.5, xi: float = 0.6) -> None:
        super().__init__(n_arms, seed)
        self.discount = check_range("discount", discount, 0.0, 1.0, low_open=True)
        self.c = check_range("c (exploration)", c, 0.0, float("inf"))
        self.xi = check_range("xi", xi, 0.0, float("inf"), low_open=True)

    def hyperparameters(self) -> dict[str, Any]:
        return {"discount": self.discount, "c": self.c, "xi": self.xi}

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        untried = allowed[self.counts[allowed] < 1e-12]
        if untried.size:
            return int(untried[self.rng.integers(untried.size)])
        total = max(self.counts[allowed].sum(), 1.0 + 1e-9)
        bonus = 2 * self.c * np.sqrt(self.xi * np.log(total) / np.maximum(self.counts, 1e-12))
        return argmax_allowed(self.sums / np.maximum(self.counts, 1e-12) + bonus, allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        self.counts *= self.discount
        self.sums *= self.discount
        self.counts[action] += 1
        self.sums[action] += reward
        self.t += 1
