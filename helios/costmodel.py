"""Calibrated cost model: the seconds an engine call takes, as a non-negative linear function of the work it did.

    python -m helios.costmodel smollm2-135m       # calibrates on this machine, prints coefficients and held-out error

The engine counts its work per call (`GenerationResult.cost_features`: layer calls and row-evaluations, head rows,
exit decisions, K/V propagations, compactions, attention positions). Time is fitted on those counts over a set of
calibration runs that vary batch size, prompt length, exit criterion, threshold and exit points, by non-negative least
squares (so every coefficient is a cost, never a credit). Prefill and decode are fitted apart.

Replay (helios.replay) rebuilds the same counts from a trace for any (depth, exit setting, batch size) and prices them
with these coefficients: measured on this hardware, not assumed. `simulate_features` is that reconstruction, and it
is tested against the counts the engine reports for the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import nnls

from helios.engine import EarlyExitEngine, ExitConfig

PREFILL_FEATURES = ("prefill_calls", "prefill_token_layers", "prefill_attention")
DECODE_FEATURES = (
    "steps", "step_rows", "layer_calls", "layer_rows", "attention_row_positions", "head_calls", "head_rows",
    "decision_head_calls", "decision_head_rows", "decision_cosine_calls", "decision_cosine_rows", "exit_head_calls",
    "exit_head_rows", "propagate_calls", "propagate_rows", "compactions",
)


@dataclasses.dataclass
class CostModel:
    """Seconds per unit of each work counter, for one candidate on one device/dtype/thread count."""

    prefill_s_per_unit: dict[str, float]
    decode_s_per_unit: dict[str, float]
    device: str
    dtype: str
    threads: int
    calibration_rel_error: float = float("nan")  # median |pred - measured| / measured on held-out runs

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
    and no early stop. `prompt_len`: each row's prompt length (or one for all): prefill runs the batch padded to
    the longest, and a decode step's attention reads each active row's own context.
    """
    batch = len(exit_layers)
    lens = [prompt_len] * batch if isinstance(prompt_len, (int, np.integer)) else [int(n) for n in prompt_len]
    prompt_len = max(lens)
    steps = len(exit_layers[0])
    prefill = {
        "prefill_calls": 1.0,
        "prefill_token_layers": float(batch * prompt_len * depth),
        "prefill_attention": float(batch * prompt_len * prompt_len * depth),
    }
    points = sorted(e for e in exit_config.exit_points if e < depth) if exit_config.enabled else []
    cosine = exit_config.criterion == "cosine"
    f = dict.fromkeys(DECODE_FEATURES, 0.0)
    for step in range(1, steps):
        exits = [row[step] for row in exit_layers]
        f["steps"] += 1
        f["step_rows"] += batch
        for layer in range(1, depth + 1):
            active = sum(1 for e in exits if e >= layer)
            if active:
                f["layer_calls"] += 1
                f["layer_rows"] += active
                f["attention_row_positions"] += sum(n + step for n, e in zip(lens, exits) if e >= layer)
        for point in points:
            active = sum(1 for e in exits if e >= point)
            if not active:
                continue
            kind = "cosine" if cosine else "head"
            f[f"decision_{kind}_calls"] += 1
            f[f"decision_{kind}_rows"] += active
            leaving = sum(1 for e in exits if e == point)
            if leaving:
                f["compactions"] += 1
                f["propagate_calls"] += depth - point
                f["propagate_rows"] += leaving * (depth - point)
                if cosine:
                    f["exit_head_calls"] += 1
                    f["exit_head_rows"] += leaving
        finals = sum(1 for e in exits if e >= depth)
        if finals:
            f["head_calls"] += 1
            f["head_rows"] += finals
    return prefill, f


def _fit(rows: list[dict[str, float]], seconds: list[float], names: Sequence[str]) -> dict[str, float]:
    """NNLS on relative error: each run's equation is divided by its time, so short runs count as much as long."""
    matrix = np.array([[r.get(n, 0.0) for n in names] for r in rows], dtype=np.float64)
    target = np.array(seconds, dtype=np.float64)
    scale = matrix.max(axis=0)
    scale[scale == 0] = 1.0
    weights = 1.0 / target
    coef, _ = nnls((matrix / scale) * weights[:, None], target * weights)
    return {n: float(c / s) for n, c, s in zip(names, coef, scale)}


def calibration_settings(depth: int, seed: int, count: int, max_batch: int) -> list[tuple[int, ExitConfig, float]]:
    """Varied (batch size, exit config, fraction of each prompt kept) so every counter moves independently of the
    others, over the context lengths the workload really has (the fit must interpolate, not extrapolate)."""
    rng = random.Random(seed)
    settings = []
    for i in range(count):
        batch = [1, 2, 4, max_batch][i % 4]
        criterion = ["none", "max_prob", "cosine", "margin"][(i // 4) % 4]
        points = tuple(sorted(rng.sample(range(1, depth), k=min(depth - 1, rng.randint(1, 3))))) if depth > 1 else ()
        threshold = rng.choice([0.2, 0.5, 0.8, 0.95]) if criterion != "cosine" else rng.choice([0.5, 0.8, 0.95, 0.99])
        config = ExitConfig(criterion, threshold, points) if criterion != "none" and points else ExitConfig()
        settings.append((batch, config, rng.choice([0.25, 0.5, 1.0])))
    return settings


def calibrate(
    engines: Sequence[EarlyExitEngine],
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int = 16,
    runs_per_engine: int = 16,
    max_batch: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[CostModel, list[dict]]:
    """Time calibration runs on `engines` (the same candidate at several depths) and fit the cost model.

    Every 4th run is held out to report the fit's relative error on runs it did not see.
    """
    from tqdm.auto import tqdm

    jobs = [
        (engine, setting)
        for engine in engines
        for setting in calibration_settings(engine.depth, seed + engine.depth, runs_per_engine, max_batch)
    ]
    random.Random(seed).shuffle(jobs)  # interleave depths and settings against machine drift
    engines[0].generate([list(prompts[0])], 2)  # warm-up
    records = []
    for n, (engine, (batch, config, keep)) in enumerate(
        tqdm(jobs, desc="calibrating cost model", disable=not progress)
    ):
        chosen = [list(prompts[(n * max_batch + i) % len(prompts)]) for i in range(batch)]
        batch_prompts = [p[len(p) - max(1, int(len(p) * keep)) :] for p in chosen]
        result = engine.generate(batch_prompts, new_tokens, config, stop_at_eos=False)
        records.append({"depth": engine.depth, "batch_size": batch, "features": result.cost_features,
                        "prefill_s": result.prefill_s, "decode_s": result.decode_s})
    train = [r for i, r in enumerate(records) if i % 4 != 3]
    held = [r for i, r in enumerate(records) if i % 4 == 3]
    prefill = _fit([r["features"] for r in train], [r["prefill_s"] for r in train], PREFILL_FEATURES)
    decode = _fit([r["features"] for r in train], [r["decode_s"] for r in train], DECODE_FEATURES)
    engine = engines[0]
    model = CostModel(
        prefill_s_per_unit=prefill, decode_s_per_unit=decode, device=engine.device.type,
        dtype=str(engine.loaded.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
    )
    errors = [abs(model.prefill_s(r["features"]) + model.decode_s(r["features"]) - r["prefill_s"] - r["decode_s"])
              / (r["prefill_s"] + r["decode_s"]) for r in held]
    model.calibration_rel_error = statistics.median(errors) if errors else float("nan")
    return model, records


def main() -> None:
    from helios.models import load_candidate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default="smollm2-135m")
    parser.add_argument("--depths", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = load_candidate(args.name)
    depths = [int(d) for d in args.depths.split(",") if d] or [full.depth]
    engines = [EarlyExitEngine(full if d == full.depth else load_candidate(args.name, d)) for d in depths]
    prompts = engines[0].encode(["The quick brown fox jumps over the lazy dog. " * 8, "def f(x):\n    return x" * 6])
    start = time.perf_counter()
    model, _ = calibrate(engines, prompts, progress=True)
    print(f"calibrated in {time.perf_counter() - start:.0f} s; held-out median relative error "
          f"{model.calibration_rel_error:.3f}")
    for name, value in {**model.prefill_s_per_unit, **model.decode_s_per_unit}.items():
        print(f"  {name:26s} {value * 1e6:12.3f} us/unit")


if __name__ == "__main__":
    main()
