"""Physical K/V against the scheduler's reservation, and speed, for two growth factors of the engine's dense cache.

    python benchmarks/kv_growth.py --json benchmarks/kv_growth.json     # ~5 min on 2 CPU cores

`EngineKVCache.GROWTH` 2.0 is the old rule (doubling; identical to it) and 1.25 the current one. The same flood of
requests (all at t=0, prompts U[64, 512] random tokens, max_tokens U[8, 128]) runs at depth 8 of the small random
Llama of benchmarks/serving_core_gpu.py (`--shape test`, fp32, CPU) under one memory budget, through helios.scheduler
on the measured virtual clock, A B A B ...; the first pair is warm-up and excluded; medians. Physical K/V is
`cache.nbytes` at the end of a run (the cache only grows), which is the same on any device for the same schedule.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving_core, serving_core_gpu beside this file
from serving_core import Live, make_load  # noqa: E402
from serving_core_gpu import write_random_checkpoint  # noqa: E402

from helios.engine import EngineKVCache, ExitConfig  # noqa: E402
from helios.paths import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--memory-budget-gib", type=float, default=0.17)
    parser.add_argument("--pairs", type=int, default=4, help="A/B pairs, the first excluded as warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factors = (2.0, 1.25)
    runs: dict[float, list[dict]] = {g: [] for g in factors}
    with tempfile.TemporaryDirectory(prefix="helios-random-") as folder:
        checkpoint = str(write_random_checkpoint("test", Path(folder), "cpu", "float32"))
        rng = np.random.default_rng(0)
        prompts = [list(map(int, rng.integers(300, 4096, size=int(n)))) for n in rng.integers(64, 513, size=64)]
        live = Live(prompts, int(args.memory_budget_gib * 2**30), checkpoint, device="cpu", dtype="float32")
        flood = make_load(args.requests, len(prompts), None, (8, 128), seed=4)
        default = EngineKVCache.GROWTH
        try:
            for pair in range(args.pairs):
                for growth in factors:
                    EngineKVCache.GROWTH = growth
                    run = live.run(flood, 8, ExitConfig())
                    print(f"pair {pair} growth {growth}: {run['tokens_per_s']:.0f} tok/s, physical/reserved K/V "
                          f"{run['kv_allocated_bytes'] / run['kv_reserved_peak_bytes']:.2f}", flush=True)
                    if pair:
                        runs[growth].append(run)
        finally:
            EngineKVCache.GROWTH = default
    out: dict = {"requests": args.requests, "memory_budget_gib": args.memory_budget_gib, "pairs": args.pairs,
                 "threads": args.threads, "shape": "test", "depth": 8, "device": "cpu"}
    for growth, rs in runs.items():
        out[f"growth_{growth:g}"] = {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
            "max_concurrent": rs[0]["max_concurrent"],
            "kv_allocated_bytes": rs[0]["kv_allocated_bytes"], "kv_reserved_peak_bytes": rs[0]["kv_reserved_peak_bytes"],
            "kv_allocated_over_reserved": rs[0]["kv_allocated_bytes"] / rs[0]["kv_reserved_peak_bytes"]}
    out["speed_ratio_1.25_vs_2"] = out["growth_1.25"]["tokens_per_s_median"] / out["growth_2"]["tokens_per_s_median"]
    if args.json:
        write_json(args.json, out, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
