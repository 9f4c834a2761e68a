"""Static baseline: always the same arm; by default the reference run (the reference candidate at full depth, no
exits: HELIOS's baseline), looked up in the env's arm table.

    python scripts/train.py agent=static                 # the reference arm
    python scripts/train.py agent=static agent.arm=3     # arm 3 of the table
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.base import Agent, feasible
from helios.arms import Arm, arms_from_dicts, reference_arm_index

REFERENCE = "reference"


class Static(Agent):
    name = "static"
    needs_arm_table = True

    def __init__(self, n_arms: int, seed: int = 0, arm: int | str = REFERENCE,
                 arm_table: Sequence[dict[str, Any] | Arm] | None = None) -> None:
        super().__init__(n_arms, seed)
        if arm != REFERENCE and (isinstance(arm, bool) or not isinstance(arm, int) or not 0 <= arm < n_arms):
            raise ValueError(f"arm must be {REFERENCE!r} or an index in [0, {n_arms - 1}]; got {arm!r}")
        self.arm = arm
        self.arm_table = None if arm_table is None else [a.to_dict() for a in arms_from_dicts(arm_table)]
        self.index = arm if isinstance(arm, int) else self._reference_index()

    def _reference_index(self) -> int | None:
        """The arm the table marks as the reference run; None until a table is given (make_agent passes the env's)."""
        if self.arm_table is None:
            return None
        index = reference_arm_index(arms_from_dicts(self.arm_table))
        if index is None:
            raise ValueError(f"the arm table has no reference arm (reference candidate at full depth, no exits: "
                             f"list full depth in the candidates' depths and keep an exit setting 'none'); or set "
                             f"arm to an index in [0, {self.n_arms - 1}]")
        return index

    def hyperparameters(self) -> dict[str, Any]:
        return {"arm": self.arm, "arm_table": self.arm_table}

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        if self.index is None:
            raise ValueError(f"static arm {self.arm!r} is looked up in the env's arm table: build the agent with "
                             "make_agent(..., arm_table=env.unwrapped.arm_table)")
        if self.index not in feasible(mask, self.n_arms):
            raise ValueError(f"static arm {self.index} is masked (infeasible) in this environment")
        return self.index

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        self.t += 1

    def export(self) -> dict[str, Any]:
        exported = super().export()
        exported["hyperparameters"].pop("arm_table")  # the export carries the table itself
        return exported
