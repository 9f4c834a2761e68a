"""Engine benchmark: HF `generate` vs helios at full depth, truncated, and with early exits; the speed-accuracy front.

    python benchmarks/engine.py --json benchmarks/engine.json            # full run (~20-30 min on 2 CPU cores)
    python benchmarks/engine.py --quick --json /tmp/engine.json          # a few minutes

Method: CPU fp32 with `--threads` threads. Every variant of a section runs once per round, interleaved with the
others (A B C A B C ...), so machine drift hits all of them alike; the first `--warmup` rounds are dropped and we
report medians over the remaining rounds, and ratios as the median of per-round ratios. Every run generates exactly
`--new-tokens` tokens per row (HF with min_new_tokens, helios with stop_at_eos=False), prompts are held-out corpus
passages (Shakespeare, Python docs, stdlib source, HumanEval), batch sizes 1 and 8.

Cost model for "ideal" speedups: per generated token, depth k costs k x (layer multiply-adds) + (LM head
multiply-adds); attention score work and the embedding lookup are left out (short contexts). The oracle speedup is
that cost at full depth over its mean when every token exits at the first layer whose exit head already predicts the
full-depth token (teacher-forced on the full-depth greedy output); it bounds what any exit criterion can gain.
Agreement = fraction of generated positions whose token equals the full-depth greedy output at that position
(free-running, so one early divergence costs every later position: a strict measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from helios.corpus import passages
from helios.engine import EarlyExitEngine, ExitConfig
from helios.exits import load_exit_heads
from helios.models import LoadedModel, load_candidate
from helios.paths import atomic_file, write_json
from helios.probes import load_exit_probes
from helios.speculative import generate_speculative


def make_prompts(tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """`count` held-out passages, round-robin over sources, cut to `max_tokens` tokens."""
    sources = ("shakespeare", "pydoc", "humaneval", "python_src")
    pools = {s: [p for p in passages(s, "heldout") if len(p) > 400] for s in sources}
    prompts = []
    for i in range(count):
        text = pools[sources[i % len(sources)]][i // len(sources)]
        prompts.append(tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens])
    return prompts


def interleaved(fns: dict[str, Callable[[], int]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """tokens/s of each function per counted round, run A B C A B C ..."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - start
            if r >= warmup:
                rates[name].append(tokens / seconds)
    return rates


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def hf_generate_fn(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> Callable[[], int]:
    pad = loaded.tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> int:
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad,
            )
        return (out.shape[1] - width) * len(prompts)

    return run


def helios_fn(engine: EarlyExitEngine, prompts, new_tokens: int, exit_config: ExitConfig = ExitConfig()):
    def run() -> int:
        return engine.generate(prompts, new_tokens, exit_config, stop_at_eos=False).generated_tokens

    return run


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    matched = sum(sum(a == b for a, b in zip(row, ref)) for row, ref in zip(tokens, reference))
    return matched / sum(len(ref) for ref in reference)


def token_cost(engine: EarlyExitEngine, layers: float) -> float:
    return layers * engine._macs["layer"] + engine._macs["head"]


@torch.inference_mode()
def layer_dynamics(engine: EarlyExitEngine, prompts, outputs, heads) -> dict:
    """Teacher-forced on the full-depth output: per-layer agreement with the final token, the oracle's first
    agreeing layer, and ShortGPT's block influence (1 - cos(h_in, h_out)) per layer."""
    model, depth = engine.model, engine.depth
    agree = torch.zeros(depth)
    first_agree: list[int] = []
    influence = torch.zeros(depth)
    count = 0
    saved = engine.exit_heads
    engine.exit_heads = heads
    try:
        for prompt, generated in zip(prompts, outputs):
            ids = torch.tensor([prompt + generated[:-1]])
            hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
            positions = slice(len(prompt) - 1, len(prompt) - 1 + len(generated))
            target = torch.tensor(generated)
            hits = []
            for layer in range(1, depth + 1):
                h = hidden[layer][0, positions]
                if layer == depth:
                    predicted = target  # full-depth greedy output, by construction
                else:
                    predicted = engine.logits(h, layer).argmax(-1)
                hits.append(predicted == target)
            hits_t = torch.stack(hits)  # [depth, tokens]
            agree += hits_t.float().sum(1)
            first_agree += (hits_t.float().argmax(0) + 1).tolist()
            for i in range(depth - 1):
                cos = torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1)
                influence[i] += (1 - cos).sum()
            count += len(generated)
    finally:
        engine.exit_heads = saved
    mean_first = statistics.fmean(first_agree)
    oracle_cost = statistics.fmean(token_cost(engine, e) for e in first_agree)
    return {
        "agreement_by_layer": (agree / count).tolist(),
        "oracle_mean_exit_layer": mean_first,
        "oracle_speedup": token_cost(engine, depth) / oracle_cost,
        "block_influence": (influence / max(count, 1)).tolist()[: depth - 1],
    }


def shortgpt_layers(block_influence: list[float], depth: int, keep: int) -> list[int]:
    """ShortGPT (Men et al. 2024): drop the layers whose output is most similar to their input. The last layer's
    influence is not measured against a next state here, so it is always kept (it feeds the final norm)."""
    ranked = sorted(range(depth - 1), key=lambda i: block_influence[i], reverse=True)
    return sorted([*ranked[: keep - 1], depth - 1])


def exit_grid(depth: int, quick: bool, probes: bool) -> list[tuple[int, tuple[int, ...], str, float]]:
    depths = [depth] if quick else sorted({depth, max(2, round(depth * 2 / 3))})
    criteria = [("max_prob", (0.5, 0.8, 0.95)), ("cosine", (0.9, 0.97))]
    if probes:
        criteria.append(("probe", (0.9, 0.95, 0.98)))
    grid = []
    for d in depths:
        fractions = [(0.5, 0.75)] if quick else [(0.5, 0.75), (0.34, 0.5, 0.67, 0.84)]
        for fr in fractions:
            points = tuple(sorted({max(1, min(d - 1, round(d * f))) for f in fr}))
            for criterion, thresholds in criteria:
                for threshold in thresholds[:2] if quick else thresholds:
                    grid.append((d, points, criterion, threshold))
    return grid


def speculative_grid(depth: int, quick: bool) -> list[tuple[int, int]]:
    """(draft layers, draft tokens): drafts from a half and three quarters of the depth."""
    grid = [(max(1, depth // 2), 3), (max(1, round(depth * 3 / 4)), 4)]
    return sorted(set(grid if not quick else grid[:1]))


def speculative_fn(engine: EarlyExitEngine, prompts, new_tokens: int, draft_layers: int, draft_tokens: int):
    def run() -> int:
        out = generate_speculative(engine, prompts, new_tokens, draft_layers=draft_layers, draft_tokens=draft_tokens,
                                   stop_at_eos=False)
        return sum(len(t) for t in out.tokens)

    return run


def bench_model(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    full = load_candidate(name)
    engine = EarlyExitEngine(full, load_tuned_heads=False)
    depth = full.depth
    prompts8 = make_prompts(full.tokenizer, 8, args.prompt_tokens)
    batches = {1: prompts8[:1], 8: prompts8}
    result: dict = {"model": name, "num_layers": depth, "threads": torch.get_num_threads(), "dtype": "float32"}
    print(f"== {name}: {depth} layers", flush=True)

    # 1. Baseline and full depth, then truncation, per batch size, interleaved.
    truncation_depths = [k for k in args.depths if k < depth] if name.startswith("smollm2") else list(
        range(max(1, depth // 4), depth, max(1, depth // 4))
    )
    truncated = {k: EarlyExitEngine(load_candidate(name, k), load_tuned_heads=False) for k in truncation_depths}
    result["truncation"] = []
    result["baseline_tok_s"] = {}
    result["full_depth_ratio_by_batch"] = {}
    for batch, prompts in batches.items():
        fns = {"hf": hf_generate_fn(full, prompts, args.new_tokens), "helios": helios_fn(engine, prompts, args.new_tokens)}
        fns.update({f"k{k}": helios_fn(e, prompts, args.new_tokens) for k, e in truncated.items()})
        rates = interleaved(fns, args.rounds, args.warmup)
        result["baseline_tok_s"][batch] = statistics.median(rates["hf"])
        result["full_depth_ratio_by_batch"][batch] = median_ratio(rates["helios"], rates["hf"])
        for k in truncation_depths:
            ideal = token_cost(engine, depth) / token_cost(engine, k)
            speedup = median_ratio(rates[f"k{k}"], rates["hf"])
            result["truncation"].append(
                {"depth": k, "batch_size": batch, "speedup": speedup, "ideal_speedup": ideal,
                 "fraction_of_ideal": speedup / ideal, "weight_bytes": truncated[k].loaded.weight_bytes}
            )
        print(f"  batch {batch}: HF {result['baseline_tok_s'][batch]:.1f} tok/s, helios full-depth ratio "
              f"{result['full_depth_ratio_by_batch'][batch]:.3f}", flush=True)
    result["full_depth_ratio"] = min(result["full_depth_ratio_by_batch"].values())

    # 2. Reference outputs (full depth, exits off) and layer dynamics with shared and tuned heads.
    reference = engine.generate(prompts8, args.new_tokens, stop_at_eos=False).tokens
    tuned = load_exit_heads(full.checkpoint, dtype=full.dtype)
    shared_dyn = layer_dynamics(engine, prompts8, reference, None)
    result["agreement_by_layer"] = {"shared": shared_dyn["agreement_by_layer"]}
    result["oracle_speedup"] = shared_dyn["oracle_speedup"]
    result["oracle_mean_exit_layer"] = shared_dyn["oracle_mean_exit_layer"]
    if tuned is not None:
        tuned_dyn = layer_dynamics(engine, prompts8, reference, tuned)
        result["agreement_by_layer"]["tuned"] = tuned_dyn["agreement_by_layer"]
        result["oracle_speedup_tuned"] = tuned_dyn["oracle_speedup"]
        result["oracle_mean_exit_layer_tuned"] = tuned_dyn["oracle_mean_exit_layer"]

    # 3. Depth profiles: prefix truncation vs ShortGPT's most-influential layers, same layer count.
    result["depth_profiles"] = []
    for k in truncation_depths:
        kept = shortgpt_layers(shared_dyn["block_influence"], depth, k)
        short = EarlyExitEngine(load_candidate(name, layers=kept), load_tuned_heads=False)
        prefix_tokens = truncated[k].generate(prompts8, args.new_tokens, stop_at_eos=False).tokens
        short_tokens = short.generate(prompts8, args.new_tokens, stop_at_eos=False).tokens
        result["depth_profiles"].append(
            {"depth": k, "prefix_agreement": agreement(prefix_tokens, reference),
             "shortgpt_agreement": agreement(short_tokens, reference), "shortgpt_layers": kept}
        )

    # 4. Exit grid (batch 8 and 1), each point timed interleaved with full-depth helios (exits off).
    points = []
    for k in truncation_depths:  # truncation alone is a point on the front too
        row = next(t for t in result["truncation"] if t["depth"] == k and t["batch_size"] == 8)
        prefix = next(p for p in result["depth_profiles"] if p["depth"] == k)
        points.append({"model": name, "depth": k, "exit_points": [], "criterion": "none", "threshold": None,
                       "heads": "none", "batch_size": 8, "speedup": row["speedup"],
                       "agreement": prefix["prefix_agreement"], "weight_bytes": row["weight_bytes"]})
    head_options = [("shared", None)] + ([("tuned", tuned)] if tuned is not None else [])
    # Probes are labelled with the heads saved beside the checkpoint (tuned if any, else shared): only that pairing.
    probes = load_exit_probes(full.checkpoint)
    probe_heads = "tuned" if tuned is not None else "shared"
    grid_engines = {depth: engine, **truncated}
    grid = exit_grid(depth, args.quick, probes is not None)
    if tuned is not None:  # truncation alone, exiting at k through the tuned head of layer k
        grid += [(k, (), "none", None) for k in truncation_depths]
    decision_fractions: dict[str, list[float]] = {}
    for d, exit_points, criterion, threshold in grid:
        if d not in grid_engines:  # a grid depth that is not one of the truncation depths
            grid_engines[d] = EarlyExitEngine(load_candidate(name, d), load_tuned_heads=False)
        eng = grid_engines[d]
        config = ExitConfig(criterion, threshold or 0.9, exit_points)
        for head_name, heads in head_options:
            if criterion == "none" and head_name == "shared":
                continue  # measured above as plain truncation
            if criterion == "probe" and (head_name != probe_heads
                                         or not set(exit_points) <= set(probes.exit_layers)):
                continue  # probes are trained per exit layer, for the saved heads only
            eng.exit_heads, eng.exit_probes = heads, probes
            run = eng.generate(prompts8, args.new_tokens, config, stop_at_eos=False, measure_decisions=True)
            if criterion != "none":
                decision_fractions.setdefault(criterion, []).append(run.exit_decision_s / max(run.decode_s, 1e-12))
            for batch in args.grid_batches:
                prompts = batches[batch]
                fns = {"full": helios_fn(engine, prompts, args.new_tokens),
                       "point": helios_fn(eng, prompts, args.new_tokens, config)}
                rates = interleaved(fns, max(2, args.rounds // 2), 1)
                speedup = median_ratio(rates["point"], rates["full"]) * result["full_depth_ratio_by_batch"][batch]
                points.append({
                    "model": name, "depth": d, "exit_points": list(exit_points), "criterion": criterion,
                    "threshold": threshold, "heads": head_name, "batch_size": batch, "speedup": speedup,
                    "agreement": agreement(run.tokens, reference), "weight_bytes": eng.loaded.weight_bytes,
                    "compute_fraction": run.layer_evals / max(run.layer_evals_full, 1) * d / depth,
                    "exit_decision_time_fraction": run.exit_decision_s / max(run.decode_s, 1e-12),
                    "exit_decision_mac_fraction": run.exit_decision_macs / max(run.decode_macs, 1),
                })
            eng.exit_heads, eng.exit_probes = None, None
        print(f"  grid depth={d} points={exit_points} {criterion} {threshold}: done", flush=True)
    # 5. Lossless self-speculative decoding (helios/speculative.py): draft with E layers, verify with the rest;
    # drafts through the tuned head when there is one (lossless either way: the head only changes acceptance).
    engine.exit_heads = tuned
    for draft_layers, draft_tokens in speculative_grid(depth, args.quick):
        run = generate_speculative(engine, prompts8, args.new_tokens, draft_layers=draft_layers,
                                   draft_tokens=draft_tokens, stop_at_eos=False)
        feats = run.cost_features
        for batch in args.grid_batches:
            prompts = batches[batch]
            fns = {"full": helios_fn(engine, prompts, args.new_tokens),
                   "point": speculative_fn(engine, prompts, args.new_tokens, draft_layers, draft_tokens)}
            rates = interleaved(fns, max(2, args.rounds // 2), 1)
            speedup = median_ratio(rates["point"], rates["full"]) * result["full_depth_ratio_by_batch"][batch]
            points.append({
                "model": name, "depth": depth, "exit_points": [draft_layers], "criterion": "speculative",
                "threshold": draft_tokens, "heads": "tuned" if engine.exit_heads is not None else "shared",
                "batch_size": batch, "speedup": speedup, "agreement": agreement(run.tokens, reference),
                "weight_bytes": engine.loaded.weight_bytes,
                "compute_fraction": run.layer_evals / max(run.layer_evals_full, 1),
                "draft_acceptance": feats["accepted_drafts"] / max(feats["drafted_tokens"], 1),
                "tokens_per_round": (args.new_tokens - 1) / max(feats["draft_rounds"], 1),
            })
        print(f"  speculative E={draft_layers} k={draft_tokens}: done", flush=True)
    engine.exit_heads = None
    result["points"] = points
    result["exit_decision_cost_fraction_by_criterion"] = {c: statistics.median(v) for c, v in decision_fractions.items()}
    return result


def pareto(points: list[dict]) -> list[dict]:
    best = sorted(points, key=lambda p: (-p["speedup"], -p["agreement"]))
    front, top_agreement = [], -1.0
    for p in best:
        if p["agreement"] > top_agreement:
            front.append(p)
            top_agreement = p["agreement"]
    return front


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        pts = [p for p in res["points"] if p["batch_size"] == 8]
        for label, marker in (("none", "s"), ("max_prob", "o"), ("cosine", "^")):
            for heads, color in (("none", "tab:gray"), ("shared", "tab:blue"), ("tuned", "tab:orange")):
                sel = [p for p in pts if p["criterion"] == label and p["heads"] == heads]
                if sel:
                    ax.scatter([p["speedup"] for p in sel], [p["agreement"] for p in sel], marker=marker, c=color,
                               label=f"{label} ({heads} head)" if label != "none" else "truncation", alpha=0.8)
        front = pareto(pts)
        ax.plot([p["speedup"] for p in front], [p["agreement"] for p in front], "k--", lw=1, label="Pareto front")
        ax.axvline(res["oracle_speedup"], color="tab:red", lw=1, label=f"oracle bound {res['oracle_speedup']:.2f}x")
        ax.axhline(0.9, color="tab:green", lw=0.8, ls=":")
        ax.set_title(f"{res['model']} (batch 8, CPU fp32)")
        ax.set_xlabel("tokens/s vs HF generate (full depth)")
        ax.set_ylabel("token agreement with full depth")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,helios-ee-8l,helios-ee-4l")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the front (default: beside --json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--depths", default="10,15,20,25")
    parser.add_argument("--grid-batches", default="8", help="batch sizes at which exit-grid points are timed")
    args = parser.parse_args()
    args.depths = [int(x) for x in args.depths.split(",")]
    args.grid_batches = [int(x) for x in args.grid_batches.split(",")]
    if args.quick:
        args.new_tokens, args.rounds, args.models = min(args.new_tokens, 16), 3, args.models
    torch.set_num_threads(args.threads)
    results = []
    for name in (n for n in args.models.split(",") if n):
        results.append(bench_model(name, args))
        if args.json:  # after every model, so that a failure later loses nothing measured
            write_json(args.json.with_suffix(".partial.json"), {"partial": True, "per_model": results}, indent=1)

    main_result = results[0]
    ee = [p for r in results if r["model"].startswith("helios-ee") for p in r["points"] if p["agreement"] >= 0.9]
    best_ee = max(ee, key=lambda p: p["speedup"]) if ee else None
    summary = {
        "model": main_result["model"],
        "device": "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "baseline_tok_s": main_result["baseline_tok_s"],
        "full_depth_ratio": main_result["full_depth_ratio"],
        "truncation": main_result["truncation"],
        "exit_decision_cost_fraction": min(main_result["exit_decision_cost_fraction_by_criterion"].values()),
        "exit_decision_cost_fraction_by_criterion": main_result["exit_decision_cost_fraction_by_criterion"],
        "points": [p for r in results for p in r["points"]],
        "oracle_speedup": main_result["oracle_speedup"],
        "agreement_by_layer": main_result["agreement_by_layer"],
        "best_ee_trained": {"model": best_ee["model"], "speedup": best_ee["speedup"], "agreement": best_ee["agreement"],
                            "point": best_ee} if best_ee else None,
        "per_model": results,
    }
    for r in results:
        front = pareto([p for p in r["points"] if p["batch_size"] == 8])
        print(f"\n{r['model']}: oracle {r['oracle_speedup']:.2f}x; Pareto front (speedup, agreement, config):")
        for p in front:
            print(f"  {p['speedup']:.2f}x  {p['agreement']:.3f}  depth={p['depth']} {p['criterion']} "
                  f"{p['threshold']} {p['exit_points']} {p['heads']}")
    if args.json:
        write_json(args.json, summary, indent=1)
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)  # the whole result supersedes it
        plot(results, args.plot or args.json.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in ("full_depth_ratio", "oracle_speedup", "exit_decision_cost_fraction",
                                              "best_ee_trained")}, indent=1, default=str))


if __name__ == "__main__":
    main()
