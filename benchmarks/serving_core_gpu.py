"""The serving core on a GPU: continuous vs static batching and truncation -> capacity, in bf16 with random weights
at a real model's shapes (Llama-3.1-8B), plus a CUDA exactness check of the step API against Hugging Face `generate`.

    python benchmarks/serving_core_gpu.py --json benchmarks/serving_core_gpu.json    # CUDA; ~9-10 min on one H200
    python benchmarks/serving_core_gpu.py --shape test --device cpu --dtype float32 --json /tmp/gpu_check.json

The same code path as benchmarks/serving_core.py (helios.scheduler on the measured virtual clock, helios.engine_executor
synchronising CUDA around each call, helios.models.load_candidate loading only the first `depth` layers), with:
  * weights: a random-init checkpoint of `--shape`, written once to a temporary folder and loaded from it per depth
    (random weights do not change what a step costs; they do change when EOS comes, so lengths come from max_tokens);
  * prompts: random token ids, lengths ~ U[64, 512]; max_tokens ~ U[8, 128] (as serving_core.py's full run);
  * memory budget: `--memory-budget-gib` (default 20 GiB: Llama-3.1-8B's bf16 weights are 14.95 GiB at depth 32, so
    K/V room grows 2.3x at depth 16 while each sequence's K/V halves; the regime of HELIOS's batch figure). It is the
    scheduler's accounting (weights + K/V reserved for prompt + max_tokens), not an allocator limit; the GPU's own peak
    allocation is reported beside it;
  * prefill: at most `--max-prefill-tokens` padded tokens per prefill call (vLLM's max_num_batched_tokens);
  * energy: NVIDIA's whole-GPU energy counter (NVML) around each run, when present: a reading, not a model.

exactness             tiny-llama and tiny-gemma3 (sliding window) in float32 on the device: sequences join a running
                      batch mid-way and leave while others continue (the step API directly); every sequence's tokens
                      must equal HF greedy `generate` on its prompt alone, on the same device.
continuous_vs_static  depth 32, every request at t=0: tokens/s; then Poisson at 50% / 80% of the continuous capacity:
                      p95 end-to-end latency. Modes interleave; medians over `--repeats`.
truncation_capacity   depths 32, 24, 16 at saturation (more requests than depth 16's budget admits): most sequences
                      running at once, tokens/s, energy per output token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving_core, beside this file
from serving_core import Live, make_load, median_run  # noqa: E402

from helios.engine import ExitConfig  # noqa: E402
from helios.paths import write_json  # noqa: E402

# Published shapes (config.json of meta-llama/Llama-3.1-8B); "test" is a small Llama for a CPU dry run of this script.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "test": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=False),
}


def write_random_checkpoint(shape: str, folder: Path, device: str, dtype: str, seed: int = 0) -> Path:
    """A random-init Llama of `shape` saved as a Hugging Face checkpoint (initialised on `device`: seconds, not
    minutes, at 8B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helios.models import DTYPES, byte_tokenizer

    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model("llama", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def exactness(device: str) -> list[dict]:
    """Join mid-way / leave early on the step API vs HF greedy generate per prompt, for the tiny test models."""
    from helios.engine import EarlyExitEngine
    from helios.models import load_candidate

    out = []
    rng = np.random.default_rng(0)
    for name in ("tiny-llama", "tiny-gemma3"):
        loaded = load_candidate(name, device=device, dtype="float32", progress=False)
        engine = EarlyExitEngine(loaded)
        prompts = [list(map(int, rng.integers(0, 256, size=int(n)))) for n in (5, 17, 9, 30, 12, 3)]
        limits = [12, 5, 16, 9, 14, 7]
        joins = {0: [0, 1, 2], 3: [3, 4], 6: [5]}  # step -> sequences that join before it
        batch = engine.batch(ExitConfig())
        tokens: dict[int, list[int]] = {}
        step = 0
        while step <= max(joins) or len(batch):
            if step in joins:
                new = joins[step]
                first = batch.add(new, [prompts[i] for i in new], [limits[i] for i in new])
                for i, t in zip(first.seq_ids, first.tokens):
                    tokens[i] = [t]
            done = [i for i in batch.seq_ids if len(tokens[i]) >= limits[i] or tokens[i][-1] in engine.eos_ids]
            batch.remove(done)
            if len(batch):
                result = batch.step()
                for i, t in zip(result.seq_ids, result.tokens):
                    tokens[i].append(t)
            step += 1
        matches = []
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=device)
            hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limits[i],
                                       do_sample=False, pad_token_id=engine.pad_id)[0, len(prompt):].tolist()
            matches.append(tokens[i][: len(hf)] == hf and len(tokens[i]) == len(hf))
        out.append({"model": name, "device": device, "sequences": len(prompts), "equal_to_hf_generate": sum(matches),
                    "all_equal": all(matches)})
        print(f"exactness {name} on {device}: {sum(matches)}/{len(prompts)} sequences equal HF generate", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--memory-budget-gib", type=float, default=20.0)
    parser.add_argument("--max-prefill-tokens", type=int, default=16384)
    parser.add_argument("--depths", default="32,24,16", help="full depth first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=256, help="saturation and Poisson runs at full depth")
    parser.add_argument("--flood", type=int, default=768, help="requests at once for truncation -> capacity")
    parser.add_argument("--sections", default="exactness,continuous_vs_static,poisson,truncation_capacity",
                        help="comma-separated subset to run")
    args = parser.parse_args()
    started = time.time()
    depths = [int(d) for d in args.depths.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; for a dry run: --shape test --device cpu")
    import transformers

    out: dict = {"shape": args.shape, "dtype": args.dtype, "device": args.device,
                 "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "memory_budget_gib": args.memory_budget_gib, "max_prefill_tokens": args.max_prefill_tokens,
                 "repeats": args.repeats, "weights": "random init at the shape's sizes",
                 "clock": "measured virtual clock (engine compute, CUDA-synchronised per call; idle skipped)"}

    def save() -> None:
        out["wall_s"] = time.time() - started
        if args.json:
            write_json(args.json, out, indent=2)

    sections = set(args.sections.split(","))
    if "exactness" in sections:
        out["exactness"] = exactness(args.device)
        save()

    with tempfile.TemporaryDirectory(prefix="helios-random-") as folder:
        t0 = time.time()
        checkpoint = str(write_random_checkpoint(args.shape, Path(folder), args.device, args.dtype))
        out["checkpoint_write_s"] = time.time() - t0
        rng = np.random.default_rng(0)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompts = [list(map(int, rng.integers(300, vocab, size=int(n)))) for n in rng.integers(64, 513, size=64)]
        live = Live(prompts, int(args.memory_budget_gib * 2**30), checkpoint, device=args.device, dtype=args.dtype,
                    max_prefill_tokens=args.max_prefill_tokens)
        try:
            from helios.energy import NvmlMeter

            live.meter = NvmlMeter(0) if args.device.startswith("cuda") else None
        except Exception as error:  # no NVML here: runs go without energy, and the JSON says why
            out["energy_unavailable"] = str(error)
        full, token_range = ExitConfig(), (8, 128)

        # Continuous vs static at full depth.
        saturation = make_load(args.requests, len(prompts), None, token_range, seed=1)
        runs: dict[str, list[dict]] = {"continuous": [], "static": []}
        # One discarded run per mode first: kernels' first launches and the K/V cache's growth to its working size
        # (the first repeat of the first GPU run came out 2.6x slower than the second) are not steady state.
        for mode in runs:
            live.run(saturation, depths[0], full, mode)
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(live.run(saturation, depths[0], full, mode))
                print(f"saturation {mode}: {runs[mode][-1]['tokens_per_s']:.0f} tok/s, "
                      f"concurrency {runs[mode][-1]['max_concurrent']}", flush=True)
        sat = {m: median_run(rs) for m, rs in runs.items()}
        capacity_rps = sat["continuous"]["requests_per_s"]
        cvs: dict = {"saturation": sat, "capacity_rps": capacity_rps,
                     "throughput_ratio": sat["continuous"]["tokens_per_s"] / sat["static"]["tokens_per_s"]}
        out["continuous_vs_static"] = cvs
        save()
        for fraction in (0.5, 0.8) if "poisson" in sections else ():
            load = make_load(args.requests, len(prompts), fraction * capacity_rps, token_range, seed=2)
            at: dict[str, list[dict]] = {"continuous": [], "static": []}
            for _ in range(args.repeats):
                for mode in at:
                    at[mode].append(live.run(load, depths[0], full, mode))
            cvs[f"load_{fraction:g}"] = {m: median_run(rs) for m, rs in at.items()}
            cvs[f"p95_ratio_at_{round(fraction * 100)}pct_load"] = (
                cvs[f"load_{fraction:g}"]["static"]["e2e_p95_s"] / cvs[f"load_{fraction:g}"]["continuous"]["e2e_p95_s"])
            print(f"{fraction:.0%} load: p95 e2e continuous {cvs[f'load_{fraction:g}']['continuous']['e2e_p95_s']:.2f} s,"
                  f" static {cvs[f'load_{fraction:g}']['static']['e2e_p95_s']:.2f} s", flush=True)
            save()

        # Truncation -> capacity.
        capacity = []
        flood = make_load(args.flood, len(prompts), None, token_range, seed=4)
        for depth in depths:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            live.run(flood, depth, full)  # discarded: warm-up (see above)
            median = median_run([live.run(flood, depth, full) for _ in range(args.repeats)])
            row = {"depth": depth, **{k: median[k] for k in ("max_concurrent", "tokens_per_s", "requests_per_s",
                                                              "e2e_p95_s", "max_resident_bytes",
                                                              "kv_reserved_peak_bytes", "kv_allocated_bytes")},
                   "weight_bytes": live.profile.weight_bytes_by_depth[depth]}
            if "energy_j_per_token" in median:
                row["energy_j_per_token"] = median["energy_j_per_token"]
            if args.device.startswith("cuda"):
                row["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            capacity.append(row)
            print(f"depth {depth}: concurrency {row['max_concurrent']}, {row['tokens_per_s']:.0f} tok/s, "
                  f"{row.get('energy_j_per_token', float('nan')):.3f} J/token", flush=True)
            live.engines.pop(depth, None)  # free this depth's weights before the next loads
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            out["truncation_capacity"] = capacity
            save()
        shallow, deep = capacity[-1], capacity[0]
        out["truncation_vs_full"] = {
            f"batch_ratio_{shallow['depth']}_vs_{deep['depth']}": shallow["max_concurrent"] / deep["max_concurrent"],
            f"throughput_ratio_{shallow['depth']}_vs_{deep['depth']}": shallow["tokens_per_s"] / deep["tokens_per_s"],
            "helios_paper": {"batch": 3.7, "throughput": 1.48, "energy_efficiency": 1.10}}
        if "energy_j_per_token" in deep:
            out["truncation_vs_full"]["energy_per_token_ratio"] = shallow["energy_j_per_token"] / deep["energy_j_per_token"]
    save()
    print(json.dumps(out["truncation_vs_full"], indent=2))
    print(f"continuous/static throughput at saturation: {cvs['throughput_ratio']:.2f}x; p95 at 80% load "
          f"static/continuous: {cvs.get('p95_ratio_at_80pct_load', float('nan')):.2f}x; {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
