"""Replay fidelity: replayed metrics vs live runs of the same prompts, for several settings.

    python benchmarks/replay.py --json benchmarks/replay.json                 # smollm2-135m, ~10 min
    python benchmarks/replay.py --quick --candidate tiny-llama --json /tmp/replay.json

The trace's exit dynamics are replayed as recorded; its cost model is refitted in this run beside the live runs
(--no-recalibrate keeps the recorded one: on a shared machine whose load changed since recording, that shows as a
uniform speed bias). For each (depth, exit setting, batch size): the same trace requests are served live by the engine (loaded to that
depth) in the same batches, `--rounds` times interleaved with the other settings, and we take the median wall time per
batch; replay predicts those times from the trace's calibrated cost model. Throughput error compares tokens/s;
latency error compares the p50 and p95 of per-request end-to-end latency (queueing behind earlier batches included),
and time to first token. Accuracy: replay's teacher-forced fidelity vs the live teacher-forced run (tokens fed from
the full-depth output: exact by construction for truncation and single exit points) and vs live free-running
generation (the reported gap).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from helios.engine import EarlyExitEngine, ExitConfig
from helios.models import load_candidate
from helios.paths import write_json
from helios.profiling import ensure_trace
from helios.replay import Replayer, Setting
from helios.traces import read_trace

ROOT = Path(__file__).resolve().parents[1]


def settings_for(num_layers: int, quick: bool) -> list[Setting]:
    third, two_thirds = max(1, num_layers // 3), max(2, 2 * num_layers // 3)
    settings = [
        Setting(num_layers, ExitConfig(), 8),
        Setting(two_thirds, ExitConfig(), 8),
        Setting(num_layers, ExitConfig("max_prob", 0.5, (third, two_thirds)), 8),
        Setting(num_layers, ExitConfig("cosine", 0.9, (two_thirds,)), 4),
    ]
    if not quick:
        settings += [Setting(num_layers, ExitConfig(), 2), Setting(two_thirds, ExitConfig("margin", 0.3, (third,)), 4)]
    return settings


def rel_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / max(abs(measured), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", default="smollm2-135m")
    parser.add_argument("--workload", default="drift3")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--per-source", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recalibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="refit the cost model in this run, beside the live measurements (default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = min(args.requests, 8), 2
    workload_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "workload" / f"{args.workload}.yaml"))
    probe = load_candidate(args.candidate)
    settings = settings_for(probe.num_layers, args.quick)
    depths = sorted({s.depth for s in settings if s.depth < probe.num_layers})
    # The replay env's trace settings (conf/env/replay.yaml: 8 requests per source, 16 tokens), so its cached trace
    # is the one checked here.
    path = ensure_trace(args.candidate, workload_cfg, depths=depths, per_source=args.per_source,
                        new_tokens=args.new_tokens)
    trace = read_trace(path)
    torch.set_num_threads(int(trace.meta["threads"]))  # live must run as the cost model was calibrated
    replayer = Replayer(trace)
    # Requests spread over the sources of the pool.
    all_ids = trace.requests()
    ids = [all_ids[i] for i in np.linspace(0, len(all_ids) - 1, args.requests).astype(int)]
    prompts = {r: trace.meta["prompts"][r] for r in ids}
    forced = {r: trace.full_token[trace.request_id == r].tolist() for r in ids}
    new_tokens = int(trace.meta["new_tokens"])
    engines = {d: EarlyExitEngine(probe if d == probe.num_layers else load_candidate(args.candidate, d))
               for d in {s.depth for s in settings}}
    for engine in engines.values():
        engine.generate([prompts[ids[0]]], 2)  # warm-up
    recorded_cost = replayer.cost
    if args.recalibrate:
        # The cost model describes the machine as it was when calibrated; on a shared box the load changes that, so
        # recalibrate now, beside the live runs (the trace's exit dynamics are kept; only prices change).
        from helios.calibration import calibrate

        replayer.cost, _ = calibrate(list(engines.values()), [trace.meta["prompts"][r] for r in all_ids])

    def serve(setting: Setting, teacher_forced: bool) -> dict:
        engine = engines[setting.depth]
        prefill, decode, tokens, exits = [], [], [], []
        for start in range(0, len(ids), setting.batch_size):
            batch = ids[start : start + setting.batch_size]
            run = engine.generate([prompts[r] for r in batch], new_tokens, setting.exit_config, stop_at_eos=False,
                                  forced_tokens=[forced[r] for r in batch] if teacher_forced else None)
            prefill.append(run.prefill_s)
            decode.append(run.decode_s)
            tokens += run.tokens
            exits += run.exit_layers
        return {"prefill_s": prefill, "decode_s": decode, "tokens": tokens, "exit_layers": exits}

    live: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    free: dict[int, dict] = {}
    for round_index in range(args.rounds):  # interleave settings round by round
        for i, setting in enumerate(settings):
            live[i].append(serve(setting, teacher_forced=True))
            if round_index == 0:
                free[i] = serve(setting, teacher_forced=False)

    rows = []
    for i, setting in enumerate(settings):
        replay = replayer.run(ids, setting)
        prefill = np.median([r["prefill_s"] for r in live[i]], axis=0)
        decode = np.median([r["decode_s"] for r in live[i]], axis=0)
        batch_ends = np.cumsum(prefill + decode)
        starts = np.r_[0.0, batch_ends[:-1]]
        sizes = [len(ids[s : s + setting.batch_size]) for s in range(0, len(ids), setting.batch_size)]
        live_e2e = np.repeat(batch_ends, sizes)
        live_ttft = np.repeat(starts + prefill, sizes)
        live_tok_s = len(ids) * new_tokens / batch_ends[-1]
        reference = [forced[r] for r in ids]

        def agreement(tokens):
            return sum(a == b for row, ref in zip(tokens, reference) for a, b in zip(row, ref)) / (len(ids) * new_tokens)

        row = {
            "depth": setting.depth, "criterion": setting.exit_config.criterion,
            "threshold": setting.exit_config.threshold if setting.exit_config.enabled else None,
            "exit_points": list(setting.exit_config.exit_points), "batch_size": setting.batch_size,
            "live_tokens_per_s": live_tok_s, "replay_tokens_per_s": replay.tokens_per_s,
            "throughput_rel_error": rel_error(replay.tokens_per_s, live_tok_s),
            "live_e2e_p50_s": float(np.median(live_e2e)), "replay_e2e_p50_s": float(np.median(replay.e2e_s)),
            "live_e2e_p95_s": float(np.percentile(live_e2e, 95)), "replay_e2e_p95_s": float(np.percentile(replay.e2e_s, 95)),
            "live_ttft_p50_s": float(np.median(live_ttft)), "replay_ttft_p50_s": float(np.median(replay.ttft_s)),
            "replay_fidelity_teacher_forced": replay.fidelity,
            "live_fidelity_teacher_forced": agreement(live[i][0]["tokens"]),
            "live_fidelity_free_running": agreement(free[i]["tokens"]),
            "exit_layer_agreement": float(np.mean([a == b for x, y in zip(replay.exit_layers, live[i][0]["exit_layers"])
                                                   for a, b in zip(x, y)])),
            "live_round_spread": float(statistics.pstdev([sum(r["prefill_s"]) + sum(r["decode_s"]) for r in live[i]])
                                       / max(batch_ends[-1], 1e-12)),
        }
        row["latency_rel_error"] = max(rel_error(row["replay_e2e_p50_s"], row["live_e2e_p50_s"]),
                                       rel_error(row["replay_e2e_p95_s"], row["live_e2e_p95_s"]))
        row["ttft_rel_error"] = rel_error(row["replay_ttft_p50_s"], row["live_ttft_p50_s"])
        rows.append(row)
        print(f"depth {setting.depth:2d} {setting.exit_config.criterion:8s} b={setting.batch_size}: tok/s live "
              f"{live_tok_s:7.1f} replay {replay.tokens_per_s:7.1f} ({row['throughput_rel_error']:.1%}); p50 e2e live "
              f"{row['live_e2e_p50_s']:.2f} s replay {row['replay_e2e_p50_s']:.2f} s ({row['latency_rel_error']:.1%}); "
              f"fidelity TF replay {replay.fidelity:.3f} live {row['live_fidelity_teacher_forced']:.3f} "
              f"free {row['live_fidelity_free_running']:.3f}", flush=True)
    summary = {
        "candidate": args.candidate, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "requests": len(ids), "new_tokens": new_tokens, "rounds": args.rounds,
        "cost_model_calibration_rel_error": replayer.cost.calibration_rel_error,
        "cost_model": "recalibrated in this run" if args.recalibrate else "as recorded in the trace",
        "recorded_cost_model_rel_error": recorded_cost.calibration_rel_error,
        "energy_source": trace.meta["energy_source"], "settings": rows,
        "max_rel_error": {"throughput": max(r["throughput_rel_error"] for r in rows),
                          "latency": max(r["latency_rel_error"] for r in rows),
                          "ttft": max(r["ttft_rel_error"] for r in rows)},
        "teacher_forced_fidelity_max_abs_gap": max(abs(r["replay_fidelity_teacher_forced"] - r["live_fidelity_teacher_forced"]) for r in rows),
        "free_running_fidelity_gap": {f"{r['depth']}/{r['criterion']}/b{r['batch_size']}":
                                      r["replay_fidelity_teacher_forced"] - r["live_fidelity_free_running"] for r in rows},
    }
    print(json.dumps(summary["max_rel_error"]))
    if args.json:
        write_json(args.json, summary, indent=1)


if __name__ == "__main__":
    main()
