"""Static baseline: always the same arm (e.g. the reference candidate at full depth: HELIOS's baseline).

    python scripts/train.py agent=static agent.arm=0
"""

from __future__ import annotations

from typing import Any

from agents.base import Agent, feasible


class Static(Agent):
    name = "static"

    def __init__(self, n_arms: int, seed: int = 0, arm: int = 0) -> None:
        super().__init__(n_arms, seed)
        if isinstance(arm, bool) or not isinstance(arm, int) or not 0 <= arm < n_arms:
            raise ValueError(f"arm must be an index in [0, {n_arms - 1}]; got {arm!r}")
        self.arm = arm

    def hyperparameters(self) -> dict[str, Any]:
        return {"arm": self.arm}

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        if self.arm not in allowed:
            raise ValueError(f"static arm {self.arm} is masked (infeasible) in this environment")
        return self.arm

    def update(self, action, reward, obs=None, info=None) -> None:
        self.t += 1
