"""What asking the engine for each token's log-probability costs: greedy decoding with and without
`SamplingParams(logprobs=0)`, interleaved, on one model.

    python benchmarks/logprobs_cost.py --json benchmarks/logprobs_cost.json          # SmolLM2-135M, ~1.5 min on 2 cores

Why: the live env asks for logprobs=0 while the judge's own model at full depth serves (envs/backends.py, Accuracy),
so that the judge reads each token's NLL from the serving instead of running a forward; that request is on the
serving clock, so its cost must be negligible. Method: `--batch` prompts of 40-200 random token ids, `--tokens`
greedy tokens each without stopping at EOS, `EarlyExitEngine.generate` at full depth, exits off; the two settings
alternate within each round (machine drift hits both alike); the first round is warm-up and left out; the figure is
the median over rounds of each setting's wall seconds, and their ratio. The tokens must be identical (checked).
JSON fields: model, batch, tokens, threads, rounds, greedy_s, logprobs_s, ratio, same_tokens, load_average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from helios.engine import EarlyExitEngine
from helios.models import load_candidate
from helios.paths import write_json
from helios.sampling import SamplingParams


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=6, help="including one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = EarlyExitEngine(load_candidate(args.model, progress=False))
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(rng.randint(40, 200))] for _ in range(args.batch)]

    def run(sampling: SamplingParams | None) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=args.tokens, sampling=sampling, stop_at_eos=False)
        return time.perf_counter() - start, [list(t) for t in out.tokens]

    greedy_s, logprobs_s, same = [], [], True
    for _ in range(args.rounds):
        seconds, greedy_tokens = run(None)
        greedy_s.append(seconds)
        seconds, logprob_tokens = run(SamplingParams(logprobs=0))
        logprobs_s.append(seconds)
        same = same and greedy_tokens == logprob_tokens
    result = {
        "model": args.model, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
        "rounds": args.rounds - 1, "greedy_s": statistics.median(greedy_s[1:]),
        "logprobs_s": statistics.median(logprobs_s[1:]), "same_tokens": same,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    result["ratio"] = result["logprobs_s"] / result["greedy_s"]
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    main()
