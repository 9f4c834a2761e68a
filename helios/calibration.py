"""Calibration: time the engine on varied runs and fit the cost model (helios.costmodel) to its work counters.

    python -m helios.calibration smollm2-135m     # calibrates on this machine, prints coefficients and held-out error

Kept apart from the cost model because it runs the engine (torch, transformers); pricing a trace needs neither.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import nnls

from helios.costmodel import DECODE_FEATURES, PREFILL_FEATURES, CostModel
from helios.engine import EarlyExitEngine, ExitConfig


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
    others, over the context lengths the workload really has (the fit must interpolate, not extrapolate). Batch
    sizes cycle through 1, 2, 4, ... up to `max_batch` (which is always included)."""
    rng = random.Random(seed)
    ladder = [b for b in (2**k for k in range(max(1, max_batch).bit_length())) if b < max_batch] + [max_batch]
    settings = []
    for i in range(count):
        batch = ladder[i % len(ladder)]
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
    try:
        model.calibration_load_average = float(os.getloadavg()[0])  # after the runs: the load they ran under
    except (AttributeError, OSError):  # not on this platform
        model.calibration_load_average = float("nan")
    model.calibration_cpus = int(os.cpu_count() or 0)
    model.calibration_max_batch = max(r["batch_size"] for r in records)
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
