"""Exit-layer profiles per workload source: how early each source's tokens could leave each candidate model.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/exit_profiles.py --quick \
        --json outputs/exit_profiles.json

For each source x candidate: greedy-decode a few prompts of the source at full depth, then teacher-force prompt +
generated tokens through the model once, keep every layer's hidden state at the positions that produced generated
tokens, and record per token its "exit layer": the first layer count k whose exit logits (`engine.logits(h_k, k)`:
the tuned exit head when the checkpoint has one, then the shared norm + LM head) have the same argmax as the last
layer's. That is the oracle exit an ideal criterion would take; a source whose tokens exit early rewards a shallow
(cheaper, larger-batch) configuration, which is why the workload mix matters.

Writes a Markdown table (--md), a PNG of the per-source exit-layer CDFs per candidate (--png) and, with --json,
the raw per-token exit layers. Candidates default to smollm2-135m, plus helios-ee-8l when its checkpoint is cached.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from helios.engine import EarlyExitEngine
from helios.models import load_candidate
from helios.paths import cache_dir
from helios.workloads import SOURCE_NAMES, Arrival, Phase, Workload, encode_requests

DEFAULT_SOURCES = ("code", "prose", "qa", "chat:qa")


@torch.inference_mode()
def exit_layers_for(engine: EarlyExitEngine, prompt_ids: list[int], generated: list[int]) -> tuple[list[int], float]:
    """Oracle exit layer per generated token, and the share of tokens where the teacher-forced last layer agrees
    with the generated token (a check that the teacher-forced pass reproduces the engine's decoding)."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in engine.layers
    ]
    try:
        sequence = torch.tensor([prompt_ids + generated[:-1]], device=engine.device)
        engine.model.get_decoder()(input_ids=sequence, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    # Position len(prompt) - 1 + t produces generated token t.
    positions = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(generated))
    per_layer = torch.stack(
        [engine.logits(captured[k - 1][0, positions], k).argmax(-1) for k in range(1, engine.depth + 1)]
    )  # [depth, tokens]
    final = per_layer[-1]
    agrees = per_layer == final  # the last row is all True, so every token has an exit layer
    exits = agrees.float().argmax(0) + 1  # first True
    matches = float((final.cpu() == torch.tensor(generated)).float().mean())
    return exits.tolist(), matches


def profile(candidate: str, sources: list[str], prompts: int, max_new_tokens: int, seed: int) -> list[dict]:
    loaded = load_candidate(candidate)
    engine = EarlyExitEngine(loaded)
    rows = []
    for source in sources:
        requests = Workload([Phase(1, {source: 1.0})], Arrival("closed", batch_size=prompts), 1, seed=seed).epoch(0)
        prompt_ids = encode_requests(requests, loaded.tokenizer)
        t0 = time.perf_counter()
        result = engine.generate(prompt_ids, max_new_tokens)
        exits, matches = [], []
        for ids, tokens in zip(prompt_ids, result.tokens):
            layer_counts, match = exit_layers_for(engine, ids, tokens)
            exits.extend(layer_counts)
            matches.append(match)
        exit_array = np.array(exits)
        rows.append({
            "source": source,
            "candidate": candidate,
            "depth": engine.depth,
            "exit_heads": "tuned" if engine.exit_heads is not None else "shared",
            "tokens": len(exits),
            "mean_exit": float(exit_array.mean()),
            "median_exit": float(np.median(exit_array)),
            "share_by_quarter": [float((exit_array <= engine.depth * q / 4).mean()) for q in (1, 2, 3)],
            "teacher_forced_match": float(np.mean(matches)),
            "seconds": time.perf_counter() - t0,
            "exit_layers": exits,
        })
        print(f"{candidate:14s} {source:9s} {len(exits):4d} tokens, mean exit {exit_array.mean():5.1f}/{engine.depth}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| source | candidate | depth | heads | tokens | mean exit | median | mean / depth | ≤ ¼ depth | ≤ ½ depth | ≤ ¾ depth | TF match |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q1, q2, q3 = r["share_by_quarter"]
        lines.append(
            f"| {r['source']} | {r['candidate']} | {r['depth']} | {r['exit_heads']} | {r['tokens']} | "
            f"{r['mean_exit']:.1f} | {r['median_exit']:.0f} | {r['mean_exit'] / r['depth']:.2f} | "
            f"{q1:.0%} | {q2:.0%} | {q3:.0%} | {r['teacher_forced_match']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    fig, axes = plt.subplots(1, len(candidates), figsize=(5.5 * len(candidates), 4), squeeze=False)
    for ax, candidate in zip(axes[0], candidates):
        mine = [r for r in rows if r["candidate"] == candidate]
        for r in mine:
            depth = r["depth"]
            layers = np.arange(1, depth + 1)
            cdf = [(np.array(r["exit_layers"]) <= k).mean() for k in layers]
            ax.step(layers, cdf, where="post", label=f"{r['source']} (mean {r['mean_exit']:.1f})")
        ax.set(title=f"{candidate} ({mine[0]['exit_heads']} exit heads)", xlabel="layer count k",
               ylabel="share of tokens with exit layer <= k", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default=None, help="comma-separated; default smollm2-135m (+ helios-ee-8l if cached)")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help=f"comma-separated of {list(SOURCE_NAMES)}")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per source")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 prompts per source, 24 new tokens")
    parser.add_argument("--md", type=Path, default=Path("outputs/exit_profiles.md"))
    parser.add_argument("--png", type=Path, default=Path("outputs/exit_profiles.png"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens = 4, 24
    if args.candidates:
        candidates = args.candidates.split(",")
    else:
        candidates = ["smollm2-135m"]
        if (cache_dir() / "checkpoints" / "helios-ee-8l" / "config.json").exists():
            candidates.append("helios-ee-8l")
        else:
            print("helios-ee-8l: no cached checkpoint, skipped (train it with scripts/train_ee.py)")
    sources = args.sources.split(",")
    unknown = [s for s in sources if s not in SOURCE_NAMES]
    if unknown:
        parser.error(f"unknown source(s) {unknown}; valid: {list(SOURCE_NAMES)}")

    rows = [row for candidate in candidates for row in profile(candidate, sources, args.prompts, args.max_new_tokens, args.seed)]
    table = markdown(rows)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    settings = f"{args.prompts} prompts per source, {args.max_new_tokens} new tokens, seed {args.seed}"
    args.md.write_text(f"Exit-layer profiles ({settings}); exit = first layer whose exit argmax equals the final token.\n\n{table}")
    plot(rows, args.png)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings_dict = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings_dict, "rows": rows}, indent=1))
    print(f"\n{table}\nwrote {args.md}, {args.png}" + (f", {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
