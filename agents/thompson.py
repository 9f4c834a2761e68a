"""Gaussian Thompson sampling (Agrawal & Goyal 2013, "Further Optimal Regret Bounds for Thompson Sampling").

    python scripts/train.py agent=thompson

Each arm's mean has a Gaussian posterior N(m_a, σ² / (n_a + 1)) (prior N(prior_mean, σ²), known noise σ); sample one
value per arm and play the argmax. Exploration fades as posteriors tighten.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import ArmStatistics, argmax_allowed, check_range, feasible


class GaussianThompson(ArmStatistics):
    name = "thompson"

    def __init__(self, n_arms: int, seed: int = 0, sigma: float = 0.5, prior_mean: float = 0.0) -> None:
        super().__init__(n_arms, seed)
        self.sigma = check_range("sigma", sigma, 0.0, float("inf"), low_open=True)
        self.prior_mean = float(prior_mean)

    def hyperparameters(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "prior_mean": self.prior_mean}

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        mean = (self.prior_mean + self.sums) / (self.counts + 1)
        std = self.sigma / np.sqrt(self.counts + 1)
        return mean, std

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        mean, std = self.posterior()
        return argmax_allowed(self.rng.normal(mean, std), allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        self.counts[action] += 1
        self.sums[action] += reward
        self.t += 1
