"""EXP3 (Auer, Cesa-Bianchi, Freund & Schapire 2002, "The Nonstochastic Multiarmed Bandit Problem").

    python scripts/train.py agent=exp3 agent.gamma=0.1

p_a = (1 - γ) w_a / Σ_b w_b + γ / K over feasible arms; on reward x in [0, 1] (rewards are mapped from
[reward_min, reward_max] and clipped), w_a <- w_a exp(γ x̂ / K) with the importance-weighted x̂ = x / p_a.
Log-weights keep it numerically stable over long runs. Makes no stochastic assumption: adversarial rewards are fine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, check_range, feasible


class EXP3(Agent):
    name = "exp3"

    def __init__(self, n_arms: int, seed: int = 0, gamma: float = 0.1, reward_min: float = -1.0,
                 reward_max: float = 2.0) -> None:
        super().__init__(n_arms, seed)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, low_open=True)
        if not reward_max > reward_min:
            raise ValueError(f"reward_max ({reward_max}) must exceed reward_min ({reward_min})")
        self.reward_min, self.reward_max = float(reward_min), float(reward_max)
        self.log_weights = np.zeros(n_arms)
        self.last_probs = np.full(n_arms, 1.0 / n_arms)

    def hyperparameters(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "reward_min": self.reward_min, "reward_max": self.reward_max}

    def probabilities(self, allowed: np.ndarray) -> np.ndarray:
        probs = np.zeros(self.n_arms)
        logits = self.log_weights[allowed] - self.log_weights[allowed].max()
        weights = np.exp(logits)
        probs[allowed] = (1 - self.gamma) * weights / weights.sum() + self.gamma / allowed.size
        return probs

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        self.last_probs = self.probabilities(allowed)
        return int(self.rng.choice(self.n_arms, p=self.last_probs))

    def update(self, action, reward, obs=None, info=None) -> None:
        x = np.clip((reward - self.reward_min) / (self.reward_max - self.reward_min), 0.0, 1.0)
        estimate = x / max(self.last_probs[action], 1e-12)
        self.log_weights[action] += self.gamma * estimate / self.n_arms
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_weights": self.log_weights.tolist(), "last_probs": self.last_probs.tolist()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.log_weights = np.array(state["log_weights"], float)
        self.last_probs = np.array(state["last_probs"], float)
