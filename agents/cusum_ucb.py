"""CUSUM-UCB (Liu, Lee & Shroff 2018, "A Change-Detection based Framework for Piecewise-stationary Multi-Armed
Bandit Problems", AAAI).

    python scripts/train.py agent=cusum_ucb

UCB1 on the samples since each arm's last detected change, plus forced uniform exploration with probability α.
Per arm, a two-sided CUSUM runs on its rewards once M samples have fixed a reference mean μ̂:
g⁺ <- max(0, g⁺ + (r - μ̂ - ε)), g⁻ <- max(0, g⁻ + (μ̂ - r - ε)); when either exceeds h the arm's statistics restart.
When the workload drifts, the arms whose reward moved restart and get re-explored at once, instead of after a window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, argmax_allowed, check_range, feasible


class CusumUCB(Agent):
    name = "cusum_ucb"

    def __init__(self, n_arms: int, seed: int = 0, c: float = 1.0, alpha: float = 0.02, warmup: int = 5,
                 epsilon: float = 0.05, threshold: float = 1.0) -> None:
        super().__init__(n_arms, seed)
        self.c = check_range("c (exploration)", c, 0.0, float("inf"))
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup (M) must be a positive integer; got {warmup!r}")
        self.warmup = warmup
        self.epsilon = check_range("epsilon (drift)", epsilon, 0.0, float("inf"))
        self.threshold = check_range("threshold (h)", threshold, 0.0, float("inf"), low_open=True)
        self.counts = np.zeros(n_arms)
        self.sums = np.zeros(n_arms)
        self.g_pos = np.zeros(n_arms)
        self.g_neg = np.zeros(n_arms)
        self.changes = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c, "alpha": self.alpha, "warmup": self.warmup, "epsilon": self.epsilon,
                "threshold": self.threshold}

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        untried = allowed[self.counts[allowed] == 0]
        if untried.size:
            return int(untried[self.rng.integers(untried.size)])
        if self.rng.random() < self.alpha:
            return int(allowed[self.rng.integers(allowed.size)])
        total = max(self.counts[allowed].sum(), 1)
        safe = np.maximum(self.counts, 1)  # only masked arms can be untried here; they are never chosen
        index = self.sums / safe + self.c * np.sqrt(2 * np.log(total) / safe)
        return argmax_allowed(index, allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        a = action
        if self.counts[a] >= self.warmup:
            reference = self.sums[a] / self.counts[a]
            self.g_pos[a] = max(0.0, self.g_pos[a] + reward - reference - self.epsilon)
            self.g_neg[a] = max(0.0, self.g_neg[a] + reference - reward - self.epsilon)
            if max(self.g_pos[a], self.g_neg[a]) > self.threshold:
                self.counts[a] = self.sums[a] = self.g_pos[a] = self.g_neg[a] = 0.0
                self.changes += 1
        self.counts[a] += 1
        self.sums[a] += reward
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "counts": self.counts.tolist(), "sums": self.sums.tolist(),
                "g_pos": self.g_pos.tolist(), "g_neg": self.g_neg.tolist(), "changes": self.changes}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        for key in ("counts", "sums", "g_pos", "g_neg"):
            setattr(self, key, np.array(state[key], float))
        self.changes = int(state["changes"])
