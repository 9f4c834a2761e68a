"""The HELIOS controller (Kumar et al. 2025, arXiv 2504.10724) as an agent.

    python scripts/train.py agent=helios agent.coverage=0.74

1. Shortlist and profile: every candidate in the arm table plays its deepest feasible arm with early exits on for
   `profile_epochs` epochs; the exit-layer histograms show where its tokens become confident.
2. Load only what is used: per candidate, the smallest depth whose layers cover `coverage` of the observed exits
   ("74% of tokens exit by layer 6 -> load 6"); deeper tokens are force-exited at that depth.
3. Choose the candidate: among those whose profiled accuracy is within `accuracy_tolerance` of the best, the one
   that served best (profiled SLO reward): another candidate wins when it serves with fewer layers at no accuracy
   loss.
4. Monitor and reassess: re-profile every `reassess_every` epochs, and at once after `patience` consecutive epochs
   of breach: the share of force-exited tokens above `breach_share` (confidence breach) or an SLO constraint
   violated (a penalty in the reward).

It reads `info["exit_histogram"]` (shares of tokens by exit layer / candidate layers) and `info["metrics"]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, check_range, feasible
from helios.arms import Arm, arms_from_dicts, exit_buckets


class HeliosController(Agent):
    name = "helios"
    needs_arm_table = True

    def __init__(self, n_arms: int, seed: int = 0, arm_table: list[dict] | list[Arm] | None = None,
                 profile_epochs: int = 1, coverage: float = 0.74, accuracy_tolerance: float = 0.05, breach_share: float = 0.5,
                 patience: int = 2, reassess_every: int = 10) -> None:
        super().__init__(n_arms, seed)
        if arm_table is None or len(arm_table) != n_arms:
            raise ValueError("the helios controller needs the env's arm table (one dict per arm: env.arm_table)")
        for key, value in (("profile_epochs", profile_epochs), ("patience", patience), ("reassess_every", reassess_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer; got {value!r}")
        self.arms = arms_from_dicts(arm_table)
        self.arm_table = [arm.to_dict() for arm in self.arms]  # JSON, for hyperparameters()
        self.profile_epochs, self.patience, self.reassess_every = profile_epochs, patience, reassess_every
        self.coverage = check_range("coverage", coverage, 0.0, 1.0, low_open=True)
        self.accuracy_tolerance = check_range("accuracy_tolerance", accuracy_tolerance, 0.0, 1.0)
        self.breach_share = check_range("breach_share", breach_share, 0.0, 1.0)
        self.candidates = sorted({a.candidate for a in self.arms})
        self.profile: dict[str, dict[str, Any]] = {}
        self.mode = "start"  # start -> profile -> serve -> (breach or period) -> start
        self.plan: list[int] = []  # arms still to profile
        self.chosen: int | None = None
        self.since_assessment = 0
        self.breaches = 0
        self.assessments = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"arm_table": self.arm_table, "profile_epochs": self.profile_epochs, "coverage": self.coverage,
                "accuracy_tolerance": self.accuracy_tolerance, "breach_share": self.breach_share,
                "patience": self.patience, "reassess_every": self.reassess_every}

    # -------------------------------------------------------------------------------------------- arms

    def _profiling_arm(self, candidate: str, allowed: set[int]) -> int | None:
        """Deepest feasible arm of `candidate`, exits on if it has such an arm (exits show where tokens settle)."""
        arms = [a for a in self.arms if a.candidate == candidate and a.index in allowed]
        if not arms:
            return None
        return max(arms, key=lambda a: (a.depth, a.exit_config.criterion != "none")).index

    def _depth_arm(self, candidate: str, allowed: set[int]) -> int | None:
        """The smallest depth covering `coverage` of the profiled exits (exit setting kept when available)."""
        stats = self.profile.get(candidate)
        if not stats:
            return None
        histogram = stats["histogram"] / max(stats["histogram"].sum(), 1e-12)
        bins = histogram.size
        cumulative = np.cumsum(histogram)
        arms = sorted((a for a in self.arms if a.candidate == candidate and a.index in allowed),
                      key=lambda a: (a.depth, a.exit_config.criterion == "none"))
        profiled_exit = self.arms[stats["arm"]].exit_name
        for arm in arms:
            top_bucket = exit_buckets(arm.num_layers, bins)[arm.depth]  # where a token forced out at this depth lands
            if cumulative[top_bucket] >= self.coverage - 1e-9 and arm.exit_name in (profiled_exit, "none"):
                same_depth = [a for a in arms if a.depth == arm.depth and a.exit_name == profiled_exit]
                return (same_depth or [arm])[0].index
        return stats["arm"]

    def _assess(self, allowed: set[int]) -> int:
        """Pick the candidate (accuracy within tolerance of the best, then best profiled reward) and its depth."""
        profiled = {c: s for c, s in self.profile.items() if s["epochs"]}
        best_accuracy = max(s["accuracy"] / s["epochs"] for s in profiled.values())
        eligible = [c for c, s in profiled.items() if s["accuracy"] / s["epochs"] >= best_accuracy - self.accuracy_tolerance]
        winner = max(eligible, key=lambda c: profiled[c]["reward"] / profiled[c]["epochs"])
        arm = self._depth_arm(winner, allowed)
        self.assessments += 1
        if arm is None or arm not in allowed:
            arm = profiled[winner]["arm"]
        return arm if arm in allowed else int(min(allowed))

    # -------------------------------------------------------------------------------------------- the loop

    def select(self, obs=None, mask=None) -> int:
        allowed = set(feasible(mask, self.n_arms).tolist())
        if self.mode == "start":
            self.profile, self.plan = {}, []
            for candidate in self.candidates:
                arm = self._profiling_arm(candidate, allowed)
                if arm is not None:
                    self.plan += [arm] * self.profile_epochs
            self.mode = "profile"
        while self.plan and self.plan[0] not in allowed:  # the mask changed since the plan was made
            self.plan.pop(0)
        if self.mode == "profile" and self.plan:
            return self.plan[0]
        if self.mode == "profile" or self.chosen not in allowed:
            if not any(s["epochs"] for s in self.profile.values()):  # nothing profiled could be served
                self.mode = "start"
                return int(min(allowed))
            self.chosen = self._assess(allowed)
            self.mode, self.since_assessment, self.breaches = "serve", 0, 0
        return self.chosen

    def update(self, action, reward, obs=None, info=None) -> None:
        self.t += 1
        info = info or {}
        histogram = np.asarray(info.get("exit_histogram", []), dtype=float)
        accuracy = float(info.get("metrics", {}).get("accuracy", 0.0))
        if self.mode == "profile" and self.plan:  # a profiling epoch
            self.plan.pop(0)
            candidate = self.arms[action].candidate
            stats = self.profile.setdefault(candidate, {"arm": action, "epochs": 0, "reward": 0.0, "accuracy": 0.0,
                                                        "histogram": np.zeros(max(histogram.size, 1))})
            stats["epochs"] += 1
            stats["reward"] += float(reward)
            stats["accuracy"] += accuracy
            if histogram.size == stats["histogram"].size:
                stats["histogram"] += histogram
            return  # assessed at the next select once the plan is done, with that epoch's mask
        self.since_assessment += 1
        arm = self.arms[action]
        forced_bucket = exit_buckets(arm.num_layers, max(histogram.size, 1))[arm.depth]
        # Tokens are force-exited only by a truncated load: at full depth the last bucket holds tokens that simply
        # ran every layer, which is no loss of confidence.
        forced_share = float(histogram[forced_bucket]) if histogram.size and arm.truncated else 0.0
        # The env reports every constraint's penalty, 0 when it holds: only a positive one is an SLO breach.
        slo_breach = any(float(v) > 0 for v in (info.get("penalties") or {}).values())
        breached = (arm.exit_config.criterion != "none" and forced_share > self.breach_share) or slo_breach
        self.breaches = self.breaches + 1 if breached else 0
        if self.breaches >= self.patience or self.since_assessment >= self.reassess_every:
            self.mode = "start"  # re-profile from the next epoch

    def state_dict(self) -> dict[str, Any]:
        profile = {c: {**s, "histogram": s["histogram"].tolist()} for c, s in self.profile.items()}
        return {**super().state_dict(), "mode": self.mode, "profile": profile, "plan": list(self.plan), "chosen": self.chosen,
                "since_assessment": self.since_assessment, "breaches": self.breaches, "assessments": self.assessments}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.profile = {c: {**s, "histogram": np.array(s["histogram"], float)} for c, s in state["profile"].items()}
        self.plan = [int(a) for a in state["plan"]]
        self.mode = state["mode"]
        self.chosen = state["chosen"]
        self.since_assessment, self.breaches = int(state["since_assessment"]), int(state["breaches"])
        self.assessments = int(state["assessments"])

    def export(self) -> dict[str, Any]:
        exported = super().export()
        exported["hyperparameters"].pop("arm_table")
        return exported
