"""python scripts/tune_exits.py candidate=smollm2-135m

Train tuned exit heads (one adapter per exit layer feeding the shared LM head) by self-distillation from the frozen
model's final layer, on offline text (helios.corpus, train split), then measure on held-out text how often exiting
after each layer gives the final layer's argmax, shared head vs tuned, and the exit-oracle bound. The heads and the
table are saved beside the cached checkpoint (exit_heads.safetensors + exit_heads.json), where the engine finds them.

    python scripts/tune_exits.py candidate=gemma3-270m eval_tokens=6000
    python scripts/tune_exits.py candidate=smollm2-135m exit_layers=[10,15,20] rank=64 train_seconds=60
    python scripts/tune_exits.py candidate=helios-ee-8l heads=false probes=true   # exit-confidence probes only

With `probes=true` it also trains the `probe` criterion's classifiers (helios/probes.py) on the heads now saved
beside the checkpoint (or the shared head when there are none) and reports their held-out precision and coverage.

Options: conf/tune_exits.yaml. Hydra's own logs go under cache_dir()/hydra (never the current directory).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from helios import corpus
from helios.exits import (
    TuneConfig, exit_matches, load_exit_heads, mac_counts, oracle_bound, train_exit_heads,
)
from helios.models import load_candidate

CHARS_PER_TOKEN_BOUND = 8  # draw this many characters per wanted token; the tokenizer output is then cut exactly


def _table(shared: list[float], tuned: list[float]) -> str:
    lines = [f"{'layer':>5}  {'shared':>6}  {'tuned':>6}  {'gain':>6}"]
    for layer, (a, b) in enumerate(zip(shared, tuned), start=1):
        lines.append(f"{layer:>5}  {a:6.3f}  {b:6.3f}  {b - a:+6.3f}")
    return "\n".join(lines)


def _oracle_line(label: str, stats: dict) -> str:
    return (
        f"oracle ({label}): first agreeing layer {stats['mean_first_agree_layer']:.2f} of {stats['num_layers']} "
        f"on average -> at most {stats['speedup_layers']:.2f}x fewer layer multiply-adds, "
        f"{stats['speedup_with_head']:.2f}x counting one LM-head evaluation per token"
    )


def run(cfg: DictConfig) -> dict:
    wall_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    tune = TuneConfig(
        rank=cfg.rank, exit_layers=list(cfg.exit_layers) if cfg.exit_layers is not None else None,
        train_seconds=float(cfg.train_seconds), max_steps=cfg.max_steps, batch_tokens=int(cfg.batch_tokens),
        topk=int(cfg.topk), n_random=int(cfg.n_random), temperature=float(cfg.temperature), lr=float(cfg.lr),
        warmup_steps=int(cfg.warmup_steps),
        init=str(cfg.init), amp=bool(cfg.amp), seq_len=int(cfg.seq_len), seed=int(cfg.seed),
    )
    sources = tuple(cfg.sources)
    loaded = load_candidate(cfg.candidate, device=cfg.device)
    train_tokens = max(int(cfg.train_tokens), int(cfg.probe_tokens) if cfg.probes else 0)
    train_texts = corpus.mixed_passages(tune.seed, train_tokens * CHARS_PER_TOKEN_BOUND, "train", sources)
    eval_texts = corpus.mixed_passages(tune.seed, int(cfg.eval_tokens) * CHARS_PER_TOKEN_BOUND, "heldout", sources)
    metadata: dict = {}
    if cfg.heads:
        metadata = tune_heads(cfg, tune, loaded, train_texts, eval_texts, sources, wall_start)
    if cfg.probes:
        metadata["probes"] = tune_probes(cfg, loaded, train_texts, eval_texts)
    return metadata


def tune_probes(cfg: DictConfig, loaded, train_texts: list[str], eval_texts: list[str]) -> dict:
    """Train and save the exit-confidence probes for the heads saved beside the checkpoint (see helios/probes.py)."""
    from helios.probes import heads_fingerprint, precision_coverage, probe_dataset, train_exit_probes

    depth = loaded.num_layers
    layers = list(cfg.exit_layers) if cfg.exit_layers is not None else list(range(1, depth))
    heads = load_exit_heads(loaded.checkpoint, device=loaded.device)
    started = time.perf_counter()
    features, labels = probe_dataset(loaded, train_texts, heads, layers, max_tokens=int(cfg.probe_tokens),
                                     seq_len=int(cfg.seq_len))
    probes, stats = train_exit_probes(features, labels, width=int(cfg.probe_width), steps=int(cfg.probe_steps),
                                      validation_fraction=float(cfg.probe_validation), seed=int(cfg.seed))
    del features, labels
    eval_features, eval_labels = probe_dataset(loaded, eval_texts, heads, layers, max_tokens=int(cfg.eval_tokens),
                                               seq_len=int(cfg.seq_len))
    table = precision_coverage(probes, eval_features, eval_labels)
    print(f"\n{cfg.candidate}: exit probes ({'tuned' if heads is not None else 'shared'} head), held-out "
          f"coverage / precision by threshold")
    for layer, rows in table.items():
        cells = "  ".join(f"{r['threshold']:.2f}: {r['coverage']:.2f}/{r['precision'] if r['precision'] is not None else '-'}"
                          for r in rows)
        print(f"  layer {layer:>3}  {cells}")
    metadata = {"candidate": cfg.candidate, "command": "python scripts/tune_exits.py " + " ".join(sys.argv[1:]),
                "heads_fingerprint": heads_fingerprint(loaded.checkpoint), "heldout": table, **stats,
                "wall_seconds": round(time.perf_counter() - started, 2)}
    if cfg.save:
        path = probes.save(loaded.checkpoint, metadata)
        print(f"saved {path}")
    return metadata


def tune_heads(cfg: DictConfig, tune: TuneConfig, loaded, train_texts: list[str], eval_texts: list[str],
               sources: tuple, wall_start: float) -> dict:
    heads, stats = train_exit_heads(
        loaded, train_texts, tune, train_tokens=int(cfg.train_tokens), progress=bool(cfg.progress)
    )
    eval_start = time.perf_counter()
    shared_m, tuned_m = exit_matches(
        loaded, eval_texts, [None, heads], max_tokens=int(cfg.eval_tokens), seq_len=tune.seq_len,
        progress=bool(cfg.progress),
    )
    eval_s = time.perf_counter() - eval_start
    macs = mac_counts(loaded)
    adapter_macs = heads.macs(heads.exit_layers[0])
    shared, tuned = shared_m.float().mean(0).tolist(), tuned_m.float().mean(0).tolist()
    oracle_shared = oracle_bound(shared_m, layer_macs=macs["layer"], head_macs=macs["head"])
    oracle_tuned = oracle_bound(tuned_m, layer_macs=macs["layer"], head_macs=macs["head"], adapter_macs=adapter_macs)

    print(f"\n{cfg.candidate}: agreement with the final layer's argmax on {shared_m.shape[0]} held-out tokens")
    print(_table(shared, tuned))
    print(_oracle_line("shared head", oracle_shared))
    print(_oracle_line("tuned heads", oracle_tuned))
    metadata = {
        "candidate": cfg.candidate,
        "command": "python scripts/tune_exits.py " + " ".join(sys.argv[1:]),
        "corpus_sources": list(sources),
        "eval_tokens": int(shared_m.shape[0]),
        "agreement_shared": [round(x, 4) for x in shared],
        "agreement_tuned": [round(x, 4) for x in tuned],
        "oracle_shared": oracle_shared,
        "oracle_tuned": oracle_tuned,
        "macs": {**macs, "adapter": adapter_macs},
        "eval_seconds": round(eval_s, 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
        "torch": torch.__version__,
        **stats,
    }
    if cfg.save:
        path = heads.save(loaded.checkpoint, metadata)
        print(f"saved {path} (+ {Path(path).with_suffix('.json').name}); wall {metadata['wall_seconds']:.0f} s")
    return metadata


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune_exits")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    run(cfg)


if __name__ == "__main__":
    main()
