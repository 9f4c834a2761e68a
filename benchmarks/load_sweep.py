"""Every arm held fixed at steady loads: what the default scenario is made of (replay).

    python benchmarks/load_sweep.py --json benchmarks/load_sweep.json          # ~1 min once the traces are cached
    python benchmarks/load_sweep.py --loads 0.4,0.8,1.2,2 --slo goodput --seeds 3

For each load (a multiple of the measured saturation capacity of the scenario's `capacity_of` arm) a steady workload
of `--epochs` epochs on the scenario's request pool, arrival process and output lengths, with a fixed source mix
(`--mix`), is served by every arm of the replay env's default table, for `--seeds` episodes. Reported per (load,
arm): the mean over epochs 2.. (the first two fill the system) of the SLO reward and the epoch metrics (attainment,
goodput, TTFT/TPOT p95, judge-scored accuracy, tokens per busy second, mean batch). Replay's accuracy judges
each arm's free-running output (at the length the teacher-forced trace serves); energy is the `model` estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gymnasium
import numpy as np
from omegaconf import OmegaConf

import envs  # noqa: F401  (registers the helios ids)
from agents.yardsticks import FixedArm, play_policy
from helios.paths import atomic_file

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("attainment", "goodput_rps", "ttft_p95_s", "tpot_p95_s", "accuracy", "throughput_tok_s", "concurrency",
           "energy_j_per_tok")
WARMUP_EPOCHS = 2


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="bursts", help="the conf/workload whose pool, arrivals, lengths are used")
    parser.add_argument("--slo", default="accuracy_under_latency")
    parser.add_argument("--loads", default="0.4,0.8,1.2,2")
    parser.add_argument("--mix", default='{"code": 0.5, "prose": 0.2, "qa": 0.3}', help="JSON source mixture")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for load in (float(x) for x in args.loads.split(",")):
        workload = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "workload" / f"{args.scenario}.yaml"))
        workload["episode_epochs"] = args.epochs
        workload["phases"] = [{"epochs": args.epochs, "load": load, "mixture": json.loads(args.mix)}]
        env = gymnasium.make("helios/ModelDepthReplay-v0", workload=workload, slo=args.slo)
        labels = [str(a["label"]) for a in env.unwrapped.arm_table]
        for arm, label in enumerate(labels):
            records = [r for seed in range(args.seeds)
                       for r in play_policy(env, seed, 1, FixedArm(arm), label).records[WARMUP_EPOCHS:]]
            row = {"load_x_capacity": load, "arm": label, "epochs": len(records),
                   "reward": float(np.mean([r["reward"] for r in records]))}
            row.update({m: float(np.mean([r["metrics"][m] for r in records])) for m in METRICS
                        if all(m in r["metrics"] for r in records)})
            rows.append(row)
            print(json.dumps(row), flush=True)
        env.close()
    print("| load x capacity | arm | reward | attainment | goodput rps | TTFT p95 s | TPOT p95 s | accuracy (judge) | "
          "tok/s busy | mean batch |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['load_x_capacity']:g} | {r['arm']} | {r['reward']:.2f} | {r['attainment']:.2f} | "
              f"{r['goodput_rps']:.2f} | {r['ttft_p95_s']:.2f} | {r['tpot_p95_s']:.3f} | {r['accuracy']:.3f} | "
              f"{r['throughput_tok_s']:.0f} | {r.get('concurrency', float('nan')):.1f} |")
    if args.json:
        with atomic_file(args.json, "w") as handle:
            json.dump({"command": "python benchmarks/load_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "replay": "accuracy: each arm's free-running output at the trace's served length "
                                 "(judge: SmolLM2-135M at full depth); energy modelled",
                       "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
