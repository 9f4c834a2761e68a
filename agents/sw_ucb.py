"""Sliding-window UCB (Garivier & Moulines 2011, "On Upper-Confidence Bound Policies for Switching Bandit Problems").

    python scripts/train.py agent=sw_ucb agent.window=20

Statistics over the last `window` pulls only: mean_a,τ + c * sqrt(ξ ln min(t, τ) / n_a,τ). Forgets abruptly, so it
re-finds the best arm after a change point within about one window.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from agents.base import Agent, argmax_allowed, check_range, feasible


class SlidingWindowUCB(Agent):
    name = "sw_ucb"

    def __init__(self, n_arms: int, seed: int = 0, window: int = 50, c: float = 1.0, xi: float = 0.6) -> None:
        super().__init__(n_arms, seed)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer; got {window!r}")
        self.window = window
        self.c = check_range("c (exploration)", c, 0.0, float("inf"))
        self.xi = check_range("xi", xi, 0.0, float("inf"), low_open=True)
        self.history: deque[tuple[int, float]] = deque(maxlen=window)

    def hyperparameters(self) -> dict[str, Any]:
        return {"window": self.window, "c": self.c, "xi": self.xi}

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        counts, sums = np.zeros(self.n_arms), np.zeros(self.n_arms)
        for arm, reward in self.history:
            counts[arm] += 1
            sums[arm] += reward
        return counts, sums

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        counts, sums = self.stats()
        untried = allowed[counts[allowed] == 0]
        if untried.size:
            return int(untried[self.rng.integers(untried.size)])
        horizon = min(self.t, self.window)
        safe = np.maximum(counts, 1)  # masked arms may have no samples in the window; they are never chosen
        bonus = self.c * np.sqrt(self.xi * np.log(max(horizon, 2)) / safe)
        return argmax_allowed(sums / safe + bonus, allowed, self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        self.history.append((int(action), float(reward)))
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.history = deque(((int(a), float(r)) for a, r in state["history"]), maxlen=self.window)
