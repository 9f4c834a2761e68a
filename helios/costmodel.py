"""Cost model: the seconds an engine call takes, as a non-negative linear function of the work it did. Pricing only.

    python -m helios.calibration smollm2-135m     # calibrates on this machine (runs the engine), prints coefficients

The engine counts its work per call (`GenerationResult.cost_features`: layer calls and row-evaluations, head rows,
exit decisions, K/V propagations, compactions, attention positions). Time is fitted on those counts over a set of
calibration runs that vary batch size, prompt length, exit criterion, threshold and exit points, by non-negative least
squares (so every coefficient is a cost, never a credit; helios.calibration). Prefill and decode are fitted apart.

This module is arithmetic on those counts and imports neither torch nor transformers: replay prices traces with it
on machines (and in processes) that never load a model. COST_FEATURES is the one list of work counters: the engine
counts exactly these, calibration fits them and replay rebuilds them.

Replay (helios.replay) rebuilds the same counts from a trace for any (depth, exit setting, batch size) and prices them
with these coefficients: measured on this hardware, not assumed. `simulate_features` is that reconstruction, and it
is tested against the counts the engine reports for the same run.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

from helios.exit_config import ExitConfig

PREFILL_FEATURES = ("prefill_calls", "prefill_token_layers", "prefill_attention")
DECODE_FEATURES = (
    "steps", "step_rows", "layer_calls", "layer_rows", "attention_row_positions", "head_calls", "head_rows",
    "decision_head_calls", "decision_head_rows", "decision_cosine_calls", "decision_cosine_rows", "decision_probe_calls",
    "decision_probe_rows", "exit_head_calls", "exit_head_rows", "propagate_calls", "propagate_rows", "compactions",
)
COST_FEATURES: tuple[str, ...] = PREFILL_FEATURES + DECODE_FEATURES  # what EarlyExitEngine.generate counts


def decision_kind(criterion: str) -> str:
    """Which decision counters an exit criterion feeds: `cosine` and `probe` need no LM head until a row exits (then
    an exit head computes its token); `max_prob` and `margin` run the head at every exit point."""
    return criterion if criterion in ("cosine", "probe") else "head"


class CalibrationContentionWarning(UserWarning):
    """A trace's cost model was calibrated while other processes competed for the CPU (CostModel.contention): a
    warning about the machine the trace was recorded on, not about the code replaying it, so callers can filter it."""


@dataclasses.dataclass
class CostModel:
    """Seconds per unit of each work counter, for one candidate on one device/dtype/thread count."""

    prefill_s_per_unit: dict[str, float]
    decode_s_per_unit: dict[str, float]
    device: str
    dtype: str
    threads: int
    calibration_rel_error: float = float("nan")  # median |pred - measured| / measured on held-out runs
    # The machine while calibrating (nan: not recorded, e.g. an older trace): the 1-minute load average at the end of
    # the runs (this process's own threads included) and the CPUs. A load above `threads` means other processes
    # competed for the CPU, so every timed step, and the model fitted to them, came out slow (`contention`).
    calibration_load_average: float = float("nan")
    calibration_cpus: int = 0
    # The largest batch of the calibration runs (0: not recorded; traces recorded before the field were calibrated on
    # batches of at most 8). The model is linear in rows and a CPU's cost per row falls as batches grow, so pricing
    # far larger batches than it saw over-prices them: calibrated up to 8, replay put full depth's 2x burst (~28 rows)
    # 59% below live in goodput; up to 32, 4% (benchmarks/sim_to_real.py, RESULTS.md).
    calibration_max_batch: int = 0

    LEGACY_CALIBRATION_MAX_BATCH = 8  # what helios.calibration used before the field was recorded
    # Calibrated up to 32 and up to 64, replay priced the same scenario within a few percent of each other (full depth
    # ran 38 rows at most): up to twice the calibrated range, extrapolation was measured harmless.
    EXTRAPOLATION_FACTOR = 2.0

    def batch_extrapolation(self, rows: int) -> str | None:
        """Why pricing a step of `rows` sequences extrapolates too far beyond the calibration, or None."""
        seen = self.calibration_max_batch or self.LEGACY_CALIBRATION_MAX_BATCH
        if rows <= self.EXTRAPOLATION_FACTOR * seen:
            return None
        how = "" if self.calibration_max_batch else " (not recorded: the default before traces recorded it)"
        return (f"priced a step of {rows} sequences with a cost model calibrated on batches of at most {seen}{how}: "
                "the linear model extrapolates, and on a CPU it over-prices large batches")

    def contention(self) -> str | None:
        """Why this model's seconds may be inflated by other processes, or None (a quiet calibration, or not known).
        The heuristic: runnable tasks beyond this process's threads exceeded half the CPUs."""
        load, cpus = self.calibration_load_average, self.calibration_cpus
        if not (load == load and cpus > 0) or load - self.threads <= 0.5 * cpus:
            return None
        return (f"calibrated at load average {load:.1f} on {cpus} CPUs with {self.threads} torch threads of its own: "
                "other processes competed for the CPU, so its per-step seconds, and replay's clock, are inflated "
                "(latency over-priced, capacity under-measured); re-record the trace on a quiet machine")

    def prefill_s(self, features: dict[str, float]) -> float:
        return sum(c * features.get(k, 0.0) for k, c in self.prefill_s_per_unit.items())

    def decode_s(self, features: dict[str, float]) -> float:
        return sum(c * features.get(k, 0.0) for k, c in self.decode_s_per_unit.items())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(**data)


def simulate_features(
    exit_layers: Sequence[Sequence[int]], depth: int, exit_config: ExitConfig, prompt_len: int | Sequence[int]
) -> tuple[dict[str, float], dict[str, float]]:
    """The engine's work counters for one compacted batch, from each row's exit layer at every decode step.

    `exit_layers[b][t]` is the layer count that produced row b's token t (t = 0 comes from prefill at full loaded
    depth; decode step s feeds token s-1 and produces token s). Mirrors EarlyExitEngine.generate with compact=True
    and no early stop. `prompt_len`: the rows' prompt lengths (or one for all): prefill runs the batch padded to
    the longest, and a decode step's attention reads the longest context of the batch for every active row (the
    engine's dense K/V slots mask a shorter row's extra keys; they are not skipped).
    """
    batch = len(exit_layers)
    if not isinstance(prompt_len, numbers.Integral):
        prompt_len = max(int(n) for n in prompt_len)
    steps = len(exit_layers[0])
    prefill = {
        "prefill_calls": 1.0,
        "prefill_token_layers": float(batch * prompt_len * depth),
        "prefill_attention": float(batch * prompt_len * prompt_len * depth),
    }
    points = sorted(e for e in exit_config.exit_points if e < depth) if exit_config.enabled else []
    kind = decision_kind(exit_config.criterion)
    f = dict.fromkeys(DECODE_FEATURES, 0.0)
    for step in range(1, steps):
        read_len = prompt_len + step  # positions the step's query reads: the longest context, its new token included
        exits = [row[step] for row in exit_layers]
        f["steps"] += 1
        f["step_rows"] += batch
        for layer in range(1, depth + 1):
            active = sum(1 for e in exits if e >= layer)
            if active:
                f["layer_calls"] += 1
                f["layer_rows"] += active
                f["attention_row_positions"] += active * read_len
        for point in points:
            active = sum(1 for e in exits if e >= point)
            if not active:
                continue
            f[f"decision_{kind}_calls"] += 1
            f[f"decision_{kind}_rows"] += active
            leaving = sum(1 for e in exits if e == point)
            if leaving:
                f["compactions"] += 1
                f["propagate_calls"] += depth - point
                f["propagate_rows"] += leaving * (depth - point)
                if kind != "head":
                    f["exit_head_calls"] += 1
                    f["exit_head_rows"] += leaving
        finals = sum(1 for e in exits if e >= depth)
        if finals:
            f["head_calls"] += 1
            f["head_rows"] += finals
    return prefill, f
