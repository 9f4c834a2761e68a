"""Exit settings: where and how a token may leave the loaded stack early (pure data, importable without torch).

    python -c "from helios.exit_config import ExitConfig; ExitConfig('max_prob', 0.8, (2, 4)).validate(6)"

The engine runs them (helios.engine re-exports both names); replay prices them from traces and the arm table
carries one per arm, neither of which may pull in torch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

CRITERIA: tuple[str, ...] = ("none", "max_prob", "margin", "cosine", "probe")
Criterion = Literal["none", "max_prob", "margin", "cosine", "probe"]


@dataclasses.dataclass(frozen=True)
class ExitConfig:
    """Where and how tokens may leave the loaded stack early. `exit_points` are layer counts in [1, depth)."""

    criterion: Criterion = "none"
    threshold: float = 0.9
    exit_points: tuple[int, ...] = ()

    def validate(self, depth: int) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown exit criterion {self.criterion!r}; valid: {list(CRITERIA)}")
        if isinstance(self.threshold, bool) or not (0.0 < float(self.threshold) <= 1.0):
            raise ValueError(f"exit threshold must be in (0, 1]; got {self.threshold!r}")
        bad = [e for e in self.exit_points if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e < depth]
        if bad:
            raise ValueError(f"exit points {bad} out of range: valid exit points are layer counts 1..{depth - 1}")
        if self.criterion != "none" and not self.exit_points:
            raise ValueError(f"criterion {self.criterion!r} needs at least one exit point in 1..{depth - 1}")

    @property
    def enabled(self) -> bool:
        return self.criterion != "none" and len(self.exit_points) > 0
