"""LinUCB with disjoint linear models (Li, Chu, Langford & Schapire 2010, "A Contextual-Bandit Approach to
Personalized News Article Recommendation").

    python scripts/train.py agent=lin_ucb agent.alpha=0.5

Per arm a ridge regression of reward on the observation x (plus a bias): A_a = λI + Σ x xᵀ, b_a = Σ r x,
θ_a = A_a⁻¹ b_a; play argmax θ_aᵀx + α sqrt(xᵀ A_a⁻¹ x). The observation carries the workload's mix and last
epoch's exit histogram, so the arm choice can follow the workload without waiting for rewards to drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, argmax_allowed, check_range, feasible


class LinUCB(Agent):
    name = "lin_ucb"
    needs_observation_names = True

    def __init__(self, n_arms: int, seed: int = 0, alpha: float = 0.5, ridge: float = 1.0,
                 features: int | None = None, context: list[str] | None = None,
                 observation_names: list[str] | None = None, feature_indices: list[int] | None = None) -> None:
        """`context`: the observation entries (by name) the regression reads, e.g. the load features
        [queue_ratio, arrival_ratio, attainment]; None reads the whole vector. Names are resolved against the env's
        `observation_names` into `feature_indices` (what an export keeps)."""
        super().__init__(n_arms, seed)
        self.alpha = check_range("alpha", alpha, 0.0, float("inf"))
        self.ridge = check_range("ridge", ridge, 0.0, float("inf"), low_open=True)
        if context is not None:
            if observation_names is None:
                raise ValueError("lin_ucb: `context` names observation entries; pass the env's observation_names")
            unknown = [c for c in context if c not in observation_names]
            if unknown:
                raise ValueError(f"lin_ucb: unknown context feature(s) {unknown}; valid: {list(observation_names)}")
            feature_indices = [list(observation_names).index(c) for c in context]
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        self.features = features
        self.A_inv: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self._selected: tuple[int, np.ndarray] | None = None  # (arm, context) of the last select, for its update
        if features is not None:
            self._allocate(features)

    def _allocate(self, dim: int) -> None:
        self.features = dim
        self.A_inv = np.stack([np.eye(dim + 1) / self.ridge] * self.n_arms)
        self.b = np.zeros((self.n_arms, dim + 1))

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ridge": self.ridge, "features": self.features,
                "feature_indices": self.feature_indices}

    def _context(self, obs: np.ndarray | None) -> np.ndarray:
        if obs is None:
            raise ValueError("LinUCB needs the observation vector as context")
        x = np.asarray(obs, dtype=float).ravel()
        if self.feature_indices is not None:
            x = x[self.feature_indices]
        x = np.append(x, 1.0)
        if self.A_inv is None:
            self._allocate(x.size - 1)
        if x.size != self.features + 1:
            raise ValueError(f"observation has {x.size - 1} features; this LinUCB was built for {self.features}")
        return x

    def select(self, obs=None, mask=None) -> int:
        allowed = feasible(mask, self.n_arms)
        x = self._context(obs)
        theta = np.einsum("aij,aj->ai", self.A_inv, self.b)
        width = np.sqrt(np.einsum("i,aij,j->a", x, self.A_inv, x))
        action = argmax_allowed(theta @ x + self.alpha * width, allowed, self.rng)
        self._selected = (int(action), x)
        return action

    def greedy(self, obs=None, mask=None) -> int:
        """The arm with the highest predicted reward in this context (no confidence width)."""
        x = self._context(obs)
        theta = np.einsum("aij,aj->ai", self.A_inv, self.b)
        return argmax_allowed(theta @ x, feasible(mask, self.n_arms), self.rng)

    def update(self, action, reward, obs=None, info=None) -> None:
        # The reward answers the context the arm was chosen in, not `obs` (what the epoch left behind): regress on
        # the context of the matching select. Without one (an update fed from a log), `obs` is that context.
        if self._selected is not None and self._selected[0] == int(action):
            x = self._selected[1]
        else:
            x = self._context(obs)
        self._selected = None
        # Sherman-Morrison: (A + x xᵀ)⁻¹ without a solve per step.
        A_inv = self.A_inv[action]
        Ax = A_inv @ x
        self.A_inv[action] = A_inv - np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.b[action] += reward * x
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.A_inv is not None:
            state.update({"A_inv": self.A_inv.tolist(), "b": self.b.tolist(), "features": self.features})
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "A_inv" in state:
            self.features = int(state["features"])
            self.A_inv, self.b = np.array(state["A_inv"], float), np.array(state["b"], float)
