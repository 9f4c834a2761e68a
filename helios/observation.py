"""The observation: one layout and one builder, shared by the env (envs/model_depth.py) and the server
(helios/serving/batcher.py), so a policy trained in one reads the same numbers in the other.

    python -c "from helios.observation import ObservationLayout; print(ObservationLayout(('a', 'b'), 2, 4, 8).names)"

| entries            | meaning                                                                          |
|--------------------|----------------------------------------------------------------------------------|
| exit_hist_0..B-1   | share of the last epoch's tokens by exit layer / candidate layers, B buckets     |
| throughput_ratio   | tokens/s, switching included                         (ratios: to the reference)  |
| latency_ratio      | p95 end-to-end latency, switching included                                       |
| energy_ratio       | joules per token, switching included                                             |
| accuracy_ratio     | (accuracy + 1e-3) / (reference + 1e-3)                                           |
| switch_ratio       | seconds the last epoch spent switching arm / reference p95 latency               |
| queue_ratio        | requests waiting to be served next / a nominal epoch's requests                  |
| running_fraction   | sequences running (admitted, holding K/V) at the epoch's end / max_batch_size    |
| arrival_ratio      | the epoch's arrival rate (requests/s) / the workload's rate unit (the measured   |
|                    | capacity of its `capacity_of` arm, else its base rate); 0 for a closed loop     |
| attainment         | share of the epoch's judged requests that met the SLO's TTFT and TPOT targets    |
|                    | (helios.slo.request_metrics; 0 when the SLO sets no targets or nothing served)   |
| mix_<source>       | source mixture of the waiting requests (zeros where unknown)                     |
| arm_<candidate>    | one-hot: candidate loaded now                                                    |
| arm_depth_fraction | loaded depth / candidate layers                                                  |
| arm_exit_<k>       | one-hot: exit setting in use                                                     |
| arm_batch_fraction | batch size / max_batch_size                                                      |
| episode_progress   | epochs served / episode length (0 where there is no episode: the server)         |

Ratios are clipped to [0, OBS_RATIO_MAX]; every other entry lies in [0, 1]. An epoch that served nothing (or no
epoch yet) leaves the histogram and the five telemetry ratios at 0; no loaded arm leaves the arm entries at 0.
The load entries (running_fraction, arrival_ratio, attainment) are what contextual agents need to tell an
overloaded epoch from a light one; a caller that does not know them (e.g. a server before it tracks them) leaves
them at 0 by not passing them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np

from helios.arms import Arm
from helios.workloads import SOURCE_NAMES

OBS_RATIO_MAX = 16.0
ACCURACY_EPS = 1e-3  # (acc + eps) / (ref + eps), so that 0 / 0 reads 1
_TINY = 1e-12
TELEMETRY = ("throughput_ratio", "latency_ratio", "energy_ratio", "accuracy_ratio", "switch_ratio")
LOAD = ("queue_ratio", "running_fraction", "arrival_ratio", "attainment")


@dataclasses.dataclass(frozen=True)
class ObservationLayout:
    """Which entries an observation has, in order (module docstring)."""

    candidates: tuple[str, ...]
    n_exits: int
    bins: int
    max_batch_size: int
    sources: tuple[str, ...] = SOURCE_NAMES

    @classmethod
    def for_arms(cls, arms: Sequence[Arm], bins: int, max_batch_size: int, n_exits: int | None = None) -> ObservationLayout:
        """The layout of an arm table: its candidates in index order, and its exit settings (at least those the
        arms use: a setting that fits no depth has no arm but still has its one-hot entry in the env)."""
        candidates = tuple(dict(sorted({a.candidate_index: a.candidate for a in arms}.items())).values())
        used = max(a.exit_index for a in arms) + 1
        return cls(candidates, max(used, n_exits or 0), int(bins), int(max_batch_size))

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return (*(f"exit_hist_{j}" for j in range(self.bins)), *TELEMETRY, *LOAD,
                *(f"mix_{s}" for s in self.sources), *(f"arm_{c}" for c in self.candidates), "arm_depth_fraction",
                *(f"arm_exit_{k}" for k in range(self.n_exits)), "arm_batch_fraction", "episode_progress")

    @functools.cached_property
    def high(self) -> np.ndarray:
        return np.array([OBS_RATIO_MAX if n.endswith("_ratio") else 1.0 for n in self.names], dtype=np.float32)

    @functools.cached_property
    def _offsets(self) -> tuple[int, int, int, int]:
        queue = self.bins + len(TELEMETRY)
        arm = queue + len(LOAD) + len(self.sources)
        return queue, arm, arm + len(self.candidates), arm + len(self.candidates) + 1 + self.n_exits


def build_observation(layout: ObservationLayout, *, histogram: np.ndarray | None, values: Mapping[str, float] | None,
                      reference: Mapping[str, float] | None, switch_s: float, waiting: int, nominal: int,
                      mixture: np.ndarray | None, arm: Arm | None, progress: float, running: int = 0,
                      arrival_rps: float = 0.0, rate_unit_rps: float | None = None,
                      attainment: float | None = None) -> np.ndarray:
    """The observation after an epoch: its exit histogram and SLO metrics (`values`, helios.telemetry.epoch_metrics
    or span_metrics) against `reference`, the seconds it spent switching, `waiting` requests queued for the next
    epoch against a `nominal` epoch's, their source mixture, the arm now loaded and the episode's progress. `values`
    None: nothing was served (histogram and telemetry stay 0).

    Load (keyword, optional, 0 when left out): `running` sequences at the epoch's end (over the layout's
    max_batch_size), `arrival_rps` the epoch's arrivals per second over `rate_unit_rps` (None or 0: entry 0), and
    `attainment` of the epoch (None: 0)."""
    obs = np.zeros(len(layout.names), dtype=np.float32)
    queue, arm_start, depth_at, batch_at = layout._offsets
    if values is not None and reference is not None:
        if histogram is not None:
            obs[: layout.bins] = histogram
        # A zero reference (e.g. an idle reference span) reads as the clip, not a ZeroDivisionError.
        ratios = (
            values["throughput_tok_s"] / max(reference["throughput_tok_s"], _TINY),
            values["latency_p95_s"] / max(reference["latency_p95_s"], _TINY),
            values["energy_j_per_tok"] / max(reference["energy_j_per_tok"], _TINY),
            (values["accuracy"] + ACCURACY_EPS) / (reference["accuracy"] + ACCURACY_EPS),
            switch_s / max(reference["latency_p95_s"], _TINY),
        )
        # Plain floats, not a numpy clip: this runs every replay step (the hot path of training).
        obs[layout.bins : queue] = [min(max(r, 0.0), OBS_RATIO_MAX) for r in ratios]
    obs[queue] = min(waiting / nominal, OBS_RATIO_MAX) if nominal > 0 else 0.0
    obs[queue + 1] = min(running / layout.max_batch_size, 1.0)
    obs[queue + 2] = min(max(arrival_rps / rate_unit_rps, 0.0), OBS_RATIO_MAX) if rate_unit_rps else 0.0
    obs[queue + 3] = 0.0 if attainment is None else min(max(attainment, 0.0), 1.0)
    if mixture is not None:
        obs[queue + len(LOAD) : arm_start] = mixture
    if arm is not None:
        obs[arm_start + arm.candidate_index] = 1.0
        obs[depth_at] = arm.depth / arm.num_layers
        obs[depth_at + 1 + arm.exit_index] = 1.0
        obs[batch_at] = min(arm.batch_size / layout.max_batch_size, 1.0)
    obs[-1] = progress
    return obs
