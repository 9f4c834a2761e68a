"""Model-predictive control through the replay simulator: plan each epoch's arm by playing candidate schedules forward
on workload draws other than the episode's own, from the queue as it stands.

    python benchmarks/agent_bench.py --agents mpc,seasonal_q --slo goodput --eval-episodes 3
    python benchmarks/heldout_draws.py --agents mpc --slo goodput

Why: under load, an arm's worth depends on the queue it leaves. The phase oracle (agents/yardsticks.py) serves the
2x burst at depth 10 and pays the accuracy floor for it, so that the next phase starts without a backlog, and no
value learner finds that trade from binned features (benchmarks/RESULTS.md, fifth session). A planner that can play
the future forward sees it directly. This one is the rollout algorithm (Bertsekas, "Rollout, Policy Iteration, and
Distributed Reinforcement Learning", 2020, ch. 2) with a sample average over futures (Shapiro, Dentcheva &
Ruszczynski, "Lectures on Stochastic Programming", 2009, ch. 5), re-planned every epoch (receding horizon, as MPC).

Before epoch t, with H = min(horizon_epochs, epochs left), n draws d_1..d_n sampled without replacement from
`plan_draws` (never the episode's own draw: the planner does not know the future it is in), and the base arm b (the
arm whose fixed play over the whole episode earns most on the epoch-0 sample; re-chosen every episode), it scores
every feasible arm a by its best plan among

    a for k epochs, then b for the rest,  k in `hold_epochs` (k < H)        and        a for all H epochs,

    value(plan) = 1/n sum_i sum_{h < H} r_t+h(plan | queue now, arrivals of d_i),

and follows the best plan, unless it is the plan already being followed that the evidence does not beat: the
incumbent is last epoch's plan one epoch on (a for k-1 epochs then b; b throughout once k runs out; at an episode's
start, b throughout), and the best plan replaces it only when its paired gain on the n draws exceeds `switch_z`
standard errors, mean(g) > switch_z * sd(g) / sqrt(n). The maximum over ~30 noisy plan values is biased upwards (the
optimizer's curse: Smith & Winkler, Management Science 2006), so without the test the planner takes detours that
only the sample favours, and it abandons a plan half-way through a burst. Rewards are the env's own:
`ModelDepthEnv.planning(d)` forks the episode's scheduler (queue, running sequences, loaded arm, clock) and `step`
serves the fork with draw d's arrivals, switch costs and queue carry-over included; the episode is left untouched.
Every plan meets the same draws (common random numbers), and the plans of one arm share their prefix (one fork per
branch point).

What it knows that a learner does not: the simulator, i.e. the replay cost model and the scenario's schedule (its
other draws). What it does not know: the episode's own draw (arrival times, sources, lengths) and the workload's
phases. It learns nothing (no update): its evaluation episodes are its only episodes (agent_bench plays no training
episodes for it). Replay only: live has no simulator to fork (a replay twin of a live env is future work).

Cost: per epoch, arms x n x (H + |hold_epochs| x H) replay steps; the default (6 arms, n 6, holds 1-4, H 12) is
~2,500 steps, ~0.6 s an epoch on one CPU core. Defaults chosen on bursts under goodput only (seed 0, 8 episodes): 2
draws mis-timed the switch to depth 10 (an epoch before the burst, -6 to -10 a step); holds {1, 4} could not end a
burst plan mid-burst; 6 draws and holds 1..4 followed the phase oracle's schedule. switch_z 1 (seeds 0-1, 10
episodes each): gap recovered 1.81 and 0.94 against 1.64 and 0.81 without the test (switch_z 0). The test was added
after reading where the untested planner lost flash's gap (benchmarks/RESULTS.md says so), so flash is not untouched
by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gymnasium
import numpy as np

from agents.base import Agent, check_range, feasible

Plan = tuple[int, int | None]  # (arm, k): the arm for k epochs, then the base arm; (arm, None): the arm throughout


class MPCPlanner(Agent):
    """Receding-horizon rollout planning over sampled workload draws (module docstring)."""

    name = "mpc"
    learns = False

    def __init__(self, n_arms: int, seed: int = 0, draws: int = 6, hold_epochs: Sequence[int] = (1, 2, 3, 4),
                 horizon_epochs: int = 12, switch_z: float = 1.0, plan_draws: Sequence[int] | None = None) -> None:
        super().__init__(n_arms, seed)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be a positive integer (futures sampled per epoch); got {draws!r}")
        if isinstance(horizon_epochs, bool) or not isinstance(horizon_epochs, int) or horizon_epochs < 1:
            raise ValueError(f"horizon_epochs must be a positive integer; got {horizon_epochs!r}")
        holds = sorted({int(k) for k in hold_epochs})
        if any(k < 1 for k in holds):
            raise ValueError(f"hold_epochs must be positive epoch counts; got {list(hold_epochs)}")
        self.draws, self.hold_epochs, self.horizon_epochs = draws, holds, horizon_epochs
        self.switch_z = check_range("switch_z", switch_z, 0.0, math.inf)
        self.plan_draws = None if plan_draws is None else [int(d) for d in plan_draws]
        self.plan: Plan | None = None  # the plan being followed (the incumbent of the next epoch)
        self.sim: Any = None  # the replay env (ModelDepthEnv), set by bind()
        self.base_arm: int | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"draws": self.draws, "hold_epochs": list(self.hold_epochs), "horizon_epochs": self.horizon_epochs,
                "switch_z": self.switch_z, "plan_draws": self.plan_draws}

    def bind(self, env: gymnasium.Env) -> None:
        """Plan through `env` (the episode's own env, or a wrapper of it: replay's ModelDepthEnv)."""
        sim = env.unwrapped
        if not callable(getattr(sim, "planning", None)) or getattr(sim, "backend_kind", "replay") != "replay":
            raise ValueError(f"mpc plans through replay's ModelDepthEnv.planning; {type(sim).__name__} "
                             f"({getattr(sim, 'backend_kind', '?')}) has no simulator to fork: use env=replay")
        self.sim = sim

    # ------------------------------------------------------------------------------------------ planning

    def _draw_pool(self) -> list[int]:
        pool = self.plan_draws if self.plan_draws is not None else range(self.sim.backend.variants)
        own = self.sim.episode_variant
        pool = [d for d in pool if d != own]
        if len(pool) < self.draws:
            raise ValueError(f"mpc samples {self.draws} draws per epoch but only {len(pool)} other than the "
                             f"episode's own are available (plan_draws {self.plan_draws}); lower draws")
        return pool

    def _held_return(self, arm: int, epochs: int, draws: Sequence[int]) -> float:
        return float(np.mean([self.sim.simulate([arm] * epochs, d).sum() for d in draws]))

    def _plan_returns(self, arm: int, base: int, horizon: int, draws: Sequence[int]) -> dict[Plan, np.ndarray]:
        """Every plan starting with `arm` (module docstring): its return on each of `draws` (common to all plans).
        A plan is (arm, k): `arm` for k epochs, then `base`; (arm, None): `arm` throughout."""
        returns: dict[Plan, list[float]] = {}
        for draw in draws:
            with self.sim.planning(draw):
                total = 0.0
                for held in range(1, horizon + 1):
                    total += float(self.sim.step(arm)[1])
                    if held in self.hold_epochs and held < horizon and arm != base:
                        tail = self.sim.simulate([base] * (horizon - held), draw).sum()
                        returns.setdefault((arm, held), []).append(total + float(tail))
                returns.setdefault((arm, None), []).append(total)
        return {plan: np.array(r) for plan, r in returns.items()}

    def _incumbent(self, returns: dict[Plan, np.ndarray], horizon: int) -> Plan:
        """Last epoch's plan, one epoch on (module docstring), among this epoch's plans; else the base arm."""
        fallback: Plan = (int(self.base_arm), None)  # type: ignore[arg-type]
        if self.plan is None:
            return fallback
        arm, held = self.plan
        shifted: Plan = (arm, None) if held is None or held - 1 >= horizon else (arm, held - 1)
        if held is not None and held - 1 == 0:
            shifted = fallback
        return shifted if shifted in returns else fallback

    def select(self, obs: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
        if self.sim is None:
            raise RuntimeError("mpc.bind(env) first: the planner plays futures through the env's simulator")
        allowed = feasible(mask, self.n_arms)
        epoch = self.sim.epoch
        left = self.sim.episode_epochs - epoch
        pool = self._draw_pool()
        draws = [int(d) for d in self.rng.choice(pool, size=self.draws, replace=False)]
        if epoch == 0 or self.base_arm is None or self.base_arm not in allowed:
            values = [self._held_return(int(a), left, draws) for a in allowed]
            self.base_arm = int(allowed[int(np.argmax(values))])
            self.plan = None
        horizon = min(self.horizon_epochs, left)
        returns: dict[Plan, np.ndarray] = {}
        for arm in allowed:
            returns.update(self._plan_returns(int(arm), self.base_arm, horizon, draws))
        best = max(returns, key=lambda plan: returns[plan].mean())  # the first of equal means: the lower arm index
        incumbent = self._incumbent(returns, horizon)
        if best != incumbent and self.draws > 1:
            gain = returns[best] - returns[incumbent]  # paired: the same draws
            if gain.mean() <= self.switch_z * gain.std(ddof=1) / np.sqrt(gain.size):
                best = incumbent
        self.plan = best
        return best[0]

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        self.t += 1  # nothing to learn: the plan is remade from the simulator every epoch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_arm": self.base_arm, "plan": None if self.plan is None else list(self.plan)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base_arm = None if state.get("base_arm") is None else int(state["base_arm"])
        plan = state.get("plan")
        self.plan = None if plan is None else (int(plan[0]), None if plan[1] is None else int(plan[1]))
