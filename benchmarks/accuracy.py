"""Which accuracy metric separates arms? Signal-to-noise of candidate metrics, and replay's teacher-forced error.

    python benchmarks/accuracy.py --quick --candidates smollm2-135m:10,20,30 gemma3-270m:6,18 \
        --json benchmarks/accuracy.json            # what benchmarks/RESULTS.md reports: ~50 min on a loaded 2-core CPU
    python benchmarks/accuracy.py --quick --json PATH           # default shortlist incl. Gemma-3 at depth 12 (longer)
    python benchmarks/accuracy.py --quick --candidates smollm2-135m:10,20,30 --judges smollm2-135m --json /tmp/a.json
    python benchmarks/accuracy.py --per-source 8 --new-tokens 8 --candidates tiny-llama:2,6 --judges tiny-llama \\
        --reference tiny-llama --json /tmp/tiny.json                                        # smoke test, seconds
    python benchmarks/accuracy.py --forced-error --per-source 8 --new-tokens 16 --candidates smollm2-135m:10,20,30 \\
        --judges smollm2-135m --exit max_prob:0.9:0.5,0.75 --json /tmp/forced.json   # replay's judge error (5.)

1. A pool of requests per source (code, prose, qa: `helios.workloads.Workload.pool`, the pool a replay trace records),
   served by every (candidate, depth) free-running (what live serves and a user sees: greedy, exits off, no stop at
   EOS, as `envs.backends.LiveBackend`) and, below full depth, teacher-forced on the candidate's own full-depth output
   (what replay computes from traces: `engine.generate(..., forced_tokens=full_depth_tokens)`).
   Generations are cached per arm under --cache (keyed by the pool, the token count and the candidate's checkpoint), so
   a run that dies resumes where it stopped.
2. Every request is scored by every candidate metric, on the first 16 tokens (the env's `new_tokens`) and on all
   `--new-tokens` (longer generations):
     rouge_l           ROUGE-L F vs the human reference (the default today)
     exact_match, contains_answer   qa only
     self_fidelity     token agreement with the same candidate's full-depth output (helios.metrics.token_agreement)
     ref_fidelity      token agreement with the reference model's (--reference) full-depth output; needs the
                       reference's tokenizer, so it is left out (NaN) for other tokenizers
     ref_rouge         ROUGE-L F vs the reference model's full-depth text (tokenizer-free, so every candidate has it)
     judge:<name>      exp(-mean NLL per token) under a fixed judge at full depth (helios.metrics.judge_score), text
                       re-tokenised by the judge, conditioned on the prompt. A candidate judged by itself is favoured
                       (its greedy output is the judge's own argmax): compare arms under a judge of another family.
     judge:panel       with several judges: exp(-mean of their pooled NLLs per token), the geometric mean of their
                       scores (each family has one favourable judge on the panel)
3. Per (metric, source, length): the pooled value at full depth and at each truncated depth (the most truncated is
   issue 13's condition; the intermediate ones are the decisions an agent actually faces), the gap, and the
   epoch-to-epoch standard deviation of an epoch of n requests (n = 8, the default closed-loop epoch, 16, 32) by
   bootstrap (requests drawn with replacement from the pool; an epoch's value pools its requests exactly as the
   metric does: token-weighted for fidelity and the judge); SNR = gap / max(std at full depth, std truncated), and
   the epoch size at which SNR would reach 5 (std ~ 1/sqrt(n)). `paired` SNR uses the std of the epoch difference on
   the same requests (what replay's common-random-number floor sees).
4. Teacher-forced error: each metric on the teacher-forced outputs (replay) minus on the free-running ones (live),
   per depth.
5. `--forced-error`: only the teacher-forced error of the env's accuracy, judge_score, as the env computes it
   (envs.judge.Judge of the first --judges: per-request scores, their mean over the pool), for every depth with
   exits off and, with --exit, for exit settings at full depth. Free-running: `engine.generate` with the exit
   setting. Teacher-forced as replay computes it (helios.replay.Replayer.exits on a trace): one full-depth forward over
   the full-depth output (helios.profiling.layer_signals, what a trace records), each position's token taken at the
   first exit point whose signal passes the threshold (else at full depth; the first token always at full depth).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helios.engine import EarlyExitEngine, ExitConfig
from helios.metrics import contains_answer, exact_match, rouge_l, token_agreement
from helios.models import load_candidate, load_tokenizer, memory_profile, resolve_checkpoint
from helios.paths import atomic_file, write_json
from helios.workloads import Arrival, Phase, Request, Workload, encode_requests

ROOT = Path(__file__).resolve().parents[1]
SOURCES: tuple[str, ...] = ("code", "prose", "qa")
EPOCH_SIZES: tuple[int, ...] = (8, 16, 32)
SNR_TARGET = 5.0


@dataclasses.dataclass(frozen=True)
class ArmKey:
    candidate: str
    depth: int
    mode: str  # "free" (free-running, live) or "forced" (teacher-forced on the full-depth output, replay)

    @property
    def label(self) -> str:
        return f"{self.candidate}@{self.depth}/{self.mode}"


# ----------------------------------------------------------------------------------------------- requests


def request_pool(per_source: int, seed: int) -> list[Request]:
    """`per_source` requests of each of code, prose, qa (the pool a replay trace of these sources records)."""
    workload = Workload([Phase(1, {s: 1 / len(SOURCES) for s in SOURCES})], Arrival(), 1, seed=seed)
    return workload.pool(per_source)


def pool_digest(requests: Sequence[Request]) -> str:
    text = json.dumps([[r.source, r.prompt, r.reference] for r in requests])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- generation


def max_context(checkpoint: str) -> int:
    """Positions the model was trained for (as EarlyExitEngine.max_context), from its config alone."""
    from transformers import AutoConfig

    from helios.models import text_config

    return int(getattr(text_config(AutoConfig.from_pretrained(checkpoint)), "max_position_embeddings", 1 << 30))


def batches_by_length(prompts: Sequence[Sequence[int]], sources: Sequence[str], batch_size: int) -> list[list[int]]:
    """Request indices in batches of one source each, sorted by prompt length (less left padding). Every arm of a
    candidate uses the same batches, so padding is identical between free-running and teacher-forced runs."""
    batches = []
    for source in dict.fromkeys(sources):
        members = sorted((i for i, s in enumerate(sources) if s == source), key=lambda i: (len(prompts[i]), i))
        batches += [members[k : k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


def generate_arm(engine: EarlyExitEngine, prompts: Sequence[Sequence[int]], batches: Sequence[Sequence[int]],
                 new_tokens: int, forced: Sequence[Sequence[int]] | None = None,
                 exit_config: ExitConfig = ExitConfig()) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for batch in batches:
        result = engine.generate([list(prompts[i]) for i in batch], new_tokens, exit_config, stop_at_eos=False,
                                 forced_tokens=None if forced is None else [list(forced[i]) for i in batch])
        for i, tokens in zip(batch, result.tokens):
            out[i] = [int(t) for t in tokens]
    return out


def generations(candidate: str, depths: Sequence[int], requests: Sequence[Request], new_tokens: int,
                batch_size: int, cache: Path, digest: str, log: Callable[[str], None]) -> dict[ArmKey, list[list[int]]]:
    """Free-running tokens at every depth and teacher-forced tokens below full depth, cached per arm."""
    full = memory_profile(candidate, progress=False).num_layers
    checkpoint = resolve_checkpoint(candidate, progress=False)
    prompts = encode_requests(list(requests), load_tokenizer(candidate, progress=False), max_context(checkpoint) - new_tokens)
    batches = batches_by_length(prompts, [r.source for r in requests], batch_size)
    arms: dict[ArmKey, list[list[int]]] = {}
    order = [full] + sorted({d for d in depths if d != full}, reverse=True)
    for depth in order:
        modes = ["free"] if depth == full else ["free", "forced"]
        keys = [ArmKey(candidate, depth, mode) for mode in modes]
        paths = {k: cache / f"gen_{candidate}_{depth}_{k.mode}_{digest}_{new_tokens}.json" for k in keys}
        todo = []
        for key in keys:
            if paths[key].exists():
                stored = json.loads(paths[key].read_text())
                if stored["checkpoint"] == checkpoint:
                    arms[key] = stored["tokens"]
                    continue
            todo.append(key)
        if not todo:
            log(f"{candidate}@{depth}: cached")
            continue
        loaded = load_candidate(candidate, depth, progress=False)
        engine = EarlyExitEngine(loaded)
        for key in todo:
            start = time.perf_counter()
            forced = arms[ArmKey(candidate, full, "free")] if key.mode == "forced" else None
            arms[key] = generate_arm(engine, prompts, batches, new_tokens, forced)
            seconds = time.perf_counter() - start
            write_json(paths[key], {"checkpoint": checkpoint, "seconds": seconds, "tokens": arms[key]})
            log(f"{key.label}: {sum(map(len, arms[key]))} tokens in {seconds:.0f} s "
                f"({sum(map(len, arms[key])) / seconds:.1f} tok/s), load average {os.getloadavg()[0]:.1f}")
        del engine, loaded
    return arms


# ----------------------------------------------------------------------------------------------- judge


@torch.inference_mode()
def judge_nll(judge: Any, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each continuation after the same `context`: the context is prefilled once and its
    K/V repeated over the continuations (right-padded; causal attention keeps padding out of real positions).
    Equal to helios.metrics.token_nll per continuation (checked on the first request of every run)."""
    model = judge.model
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(continuations)
    live = [i for i, c in enumerate(continuations) if len(c) > 0]
    if not live:
        return out
    ctx = torch.tensor([list(context)], device=device)
    prefill = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(prefill.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
    width = max(len(continuations[i]) for i in live)
    ids = torch.full((len(live), width), int(continuations[live[0]][0]), dtype=torch.long)
    for row, i in enumerate(live):
        ids[row, : len(continuations[i])] = torch.tensor(list(continuations[i]))
    ids = ids.to(device)
    cache = copy.deepcopy(prefill.past_key_values)
    cache.batch_repeat_interleave(len(live))
    positions = torch.arange(len(context), len(context) + width, device=device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # position j predicts token j + 1
    for row, i in enumerate(live):
        n = len(continuations[i])
        nll = -float(first[ids[row, 0]])
        if n > 1:
            nll -= float(logprobs[row, torch.arange(n - 1, device=device), ids[row, 1:n]].double().sum())
        out[i] = (nll, n)
    return out


def judge_scores(judge_name: str, requests: Sequence[Request], texts: dict[tuple[ArmKey, int], list[str]],
                 cache: Path, digest: str, new_tokens: int, log: Callable[[str], None]) -> dict[tuple[ArmKey, int], list[tuple[float, int]]]:
    """Per (arm, length) and request: the judge's (summed NLL, judge tokens) of the decoded text, cached."""
    path = cache / f"judge_{judge_name}_{digest}_{new_tokens}.json"
    stored: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    out: dict[tuple[ArmKey, int], list[tuple[float, int]]] = {}
    missing = []
    for key in texts:
        name = f"{key[0].label}#{key[1]}"
        if name in stored:
            out[key] = [tuple(x) for x in stored[name]]  # type: ignore[misc]
        else:
            missing.append(key)
    if not missing:
        return out
    from helios.metrics import token_nll

    judge = load_candidate(judge_name, progress=False)
    tokenizer = judge.tokenizer
    contexts = encode_requests(list(requests), tokenizer, max_context(str(judge.checkpoint)) - 4 * new_tokens)
    start = time.perf_counter()
    results: dict[tuple[ArmKey, int], list[tuple[float, int]]] = {k: [] for k in missing}
    for r in range(len(requests)):
        continuations = [tokenizer(texts[k][r], add_special_tokens=False)["input_ids"] for k in missing]
        for k, score in zip(missing, judge_nll(judge, contexts[r], continuations)):
            results[k].append(score)
        if r == 0:  # the batched, cached path against helios.metrics' plain one, on the first two arms
            plain = token_nll(judge.model, continuations[:2], [contexts[0]] * len(continuations[:2]))
            for k, want in zip(missing[:2], plain):
                got = results[k][0]
                if got[1] != want[1] or abs(got[0] - want[0]) > 1e-3 * max(1.0, abs(want[0])):
                    raise AssertionError(f"judge fast path {got} != helios.metrics.token_nll {want} ({k[0].label})")
    log(f"judge {judge_name}: {len(missing)} arm-lengths x {len(requests)} requests in "
        f"{time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    out.update(results)
    stored.update({f"{k[0].label}#{k[1]}": v for k, v in results.items()})
    write_json(path, stored)
    return out


# ----------------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scores:
    """Per request (num, den), one column per part: an epoch's value is transform(mean over parts of
    sum num / sum den over the epoch's requests). One part for every metric but the judge panel, whose parts are its
    judges (exp(-mean of the judges' pooled NLLs) = the geometric mean of their judge scores)."""

    num: np.ndarray  # [requests, parts]
    den: np.ndarray
    transform: str = "identity"  # or "exp_neg" (judge: exp(-mean NLL))

    def __post_init__(self) -> None:
        self.num = np.asarray(self.num, dtype=float).reshape(len(self.num), -1)
        self.den = np.asarray(self.den, dtype=float).reshape(len(self.den), -1)

    @property
    def size(self) -> int:
        return int(self.num.shape[0])

    def value(self, idx: np.ndarray | None = None) -> np.ndarray | float:
        num = self.num if idx is None else self.num[idx]
        den = self.den if idx is None else self.den[idx]
        ratio = (num.sum(-2) / den.sum(-2)).mean(-1)
        return np.exp(-ratio) if self.transform == "exp_neg" else ratio


def per_request_scores(requests: Sequence[Request], arms: dict[ArmKey, list[list[int]]],
                       texts: dict[tuple[ArmKey, int], list[str]], lengths: Sequence[int], reference: str,
                       reference_tokenizer_of: dict[str, str], judged: dict[str, dict[tuple[ArmKey, int], list[tuple[float, int]]]]
                       ) -> dict[tuple[str, ArmKey, int], Scores]:
    """Every metric, arm and length: per-request Scores over the whole pool (NaN rows: metric undefined there)."""
    n = len(requests)
    ref_full = max((k for k in arms if k.candidate == reference and k.mode == "free"), key=lambda k: k.depth)
    out: dict[tuple[str, ArmKey, int], Scores] = {}
    for key, tokens in arms.items():
        full = max((k for k in arms if k.candidate == key.candidate and k.mode == "free"), key=lambda k: k.depth)
        same_tokenizer = reference_tokenizer_of[key.candidate] == reference_tokenizer_of[reference]
        for length in lengths:
            text = texts[(key, length)]
            ones = np.ones(n)

            def text_metric(fn: Callable[[str, str], float], refs: Sequence[str | None]) -> Scores:
                return Scores(np.array([fn(p, r) if r is not None else np.nan for p, r in zip(text, refs)]), ones)

            refs = [r.reference for r in requests]
            out[("rouge_l", key, length)] = text_metric(rouge_l, refs)
            qa_refs = [r.reference if r.source == "qa" else None for r in requests]
            out[("exact_match", key, length)] = text_metric(exact_match, qa_refs)
            out[("contains_answer", key, length)] = text_metric(contains_answer, qa_refs)
            out[("ref_rouge", key, length)] = text_metric(rouge_l, texts[(ref_full, length)])

            def agreement(target: list[list[int]]) -> Scores:
                num = np.array([token_agreement([g[:length]], [f[:length]]) * max(len(g[:length]), len(f[:length]))
                                for g, f in zip(tokens, target)])
                den = np.array([max(len(g[:length]), len(f[:length])) for g, f in zip(tokens, target)], dtype=float)
                return Scores(num, den)

            out[("self_fidelity", key, length)] = agreement(arms[full])
            if same_tokenizer:
                out[("ref_fidelity", key, length)] = agreement(arms[ref_full])
            else:
                out[("ref_fidelity", key, length)] = Scores(np.full(n, np.nan), ones)
            for judge_name, scores in judged.items():
                pairs = scores[(key, length)]
                out[(f"judge:{judge_name}", key, length)] = Scores(
                    np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=float), "exp_neg")
            if len(judged) > 1:
                parts = [out[(f"judge:{j}", key, length)] for j in judged]
                out[("judge:panel", key, length)] = Scores(np.hstack([p.num for p in parts]),
                                                           np.hstack([p.den for p in parts]), "exp_neg")
    return out


def subset(scores: Scores, rows: np.ndarray) -> Scores | None:
    num, den = scores.num[rows], scores.den[rows]
    keep = (np.isfinite(num) & (den > 0)).all(-1)
    if not keep.any():
        return None
    return Scores(num[keep], den[keep], scores.transform)


def bootstrap_std(scores: Scores, n: int, rng: np.random.Generator, draws: int) -> float:
    idx = rng.integers(0, scores.size, size=(draws, n))
    return float(np.std(scores.value(idx), ddof=1))


def paired_std(a: Scores, b: Scores, n: int, rng: np.random.Generator, draws: int) -> float:
    idx = rng.integers(0, a.size, size=(draws, n))
    return float(np.std(np.asarray(a.value(idx)) - np.asarray(b.value(idx)), ddof=1))


def snr(gap: float, std: float) -> float:
    """gap / std; a noiseless gap is infinitely separable, no gap is not separable at all."""
    if std > 0:
        return gap / std
    return math.inf if gap > 0 else (-math.inf if gap < 0 else 0.0)


def snr_rows(scores: dict[tuple[str, ArmKey, int], Scores], requests: Sequence[Request], candidates: dict[str, list[int]],
             full_depth: dict[str, int], draws: int, seed: int) -> list[dict[str, Any]]:
    sources = np.array([r.source for r in requests])
    groups = {s: np.flatnonzero(sources == s) for s in SOURCES}
    groups["mix"] = np.arange(len(requests))
    metrics = sorted({m for m, _, _ in scores}, key=lambda m: (m.startswith("judge"), m))
    lengths = sorted({length for _, _, length in scores})
    rows = []
    pairs = [(c, d) for c, depths in candidates.items() for d in sorted(set(depths)) if d != full_depth[c]]
    for candidate, depth in pairs:  # the most truncated depth first (issue 13's condition), then the others
        full, low = ArmKey(candidate, full_depth[candidate], "free"), ArmKey(candidate, depth, "free")
        for metric in metrics:
            for length in lengths:
                for group, members in groups.items():
                    a, b = subset(scores[(metric, full, length)], members), subset(scores[(metric, low, length)], members)
                    if a is None or b is None or a.size != b.size:
                        continue
                    rng = np.random.default_rng([seed, len(rows)])
                    row: dict[str, Any] = {
                        "candidate": candidate, "metric": metric, "source": group, "tokens": length,
                        "full_depth": full.depth, "truncated_depth": low.depth, "requests": a.size,
                        "mean_full": float(a.value()), "mean_truncated": float(b.value()),
                    }
                    row["gap"] = row["mean_full"] - row["mean_truncated"]
                    for n in EPOCH_SIZES:
                        std = max(bootstrap_std(a, n, rng, draws), bootstrap_std(b, n, rng, draws))
                        row[f"std_{n}"] = std
                        row[f"snr_{n}"] = snr(row["gap"], std)
                        row[f"paired_snr_{n}"] = snr(row["gap"], paired_std(a, b, n, rng, draws))
                    snr8 = row["snr_8"]
                    row["epoch_for_snr5"] = (math.ceil(8 * (SNR_TARGET / snr8) ** 2) if snr8 > 0 and math.isfinite(snr8)
                                             else (1 if snr8 == math.inf else None))
                    rows.append(row)
    return rows


def depth_rows(scores: dict[tuple[str, ArmKey, int], Scores], requests: Sequence[Request]) -> list[dict[str, Any]]:
    """Pooled value of every metric for every arm (free and forced) and source: the cross-candidate table and the
    teacher-forced error (forced minus free at the same depth)."""
    sources = np.array([r.source for r in requests])
    groups = {s: np.flatnonzero(sources == s) for s in SOURCES}
    groups["mix"] = np.arange(len(requests))
    rows = []
    for (metric, key, length), value in scores.items():
        for group, members in groups.items():
            s = subset(value, members)
            if s is None:
                continue
            rows.append({"metric": metric, "candidate": key.candidate, "depth": key.depth, "mode": key.mode,
                         "tokens": length, "source": group, "value": float(s.value()), "requests": s.size})
    return rows


# ----------------------------------------------------------------------------------------------- report


def markdown(result: dict[str, Any], sources: Sequence[str] = ("mix",)) -> str:
    """The SNR table (primary length), every arm's pooled value (comparability across candidates), and the
    teacher-forced error (replay minus live) per depth."""
    lines = []
    primary = result["config"]["primary_tokens"]
    lines.append(f"SNR, {primary} tokens (gap = full depth - most truncated depth; std = max of the two arms' epoch "
                 "std; paired = std of the epoch difference on the same requests):\n")
    lines.append("| candidate | metric | source | full | truncated | gap | std@8 | SNR@8 | SNR@16 | SNR@32 | paired SNR@8 "
                 "| epoch for SNR 5 |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["snr"]:
        if row["tokens"] != primary:
            continue
        lines.append(
            f"| {row['candidate']}@{row['full_depth']}→{row['truncated_depth']} | {row['metric']} | {row['source']} | "
            f"{row['mean_full']:.3f} | {row['mean_truncated']:.3f} | {row['gap']:+.3f} | {row['std_8']:.3f} | "
            f"{row['snr_8']:.1f} | {row['snr_16']:.1f} | {row['snr_32']:.1f} | {row['paired_snr_8']:.1f} | "
            f"{row['epoch_for_snr5'] if row['epoch_for_snr5'] is not None else '—'} |")
    values = {(v["metric"], v["candidate"], v["depth"], v["mode"], v["tokens"], v["source"]): v["value"]
              for v in result["values"]}
    metrics = sorted({k[0] for k in values}, key=lambda m: (m.startswith("judge"), m))
    arms = sorted({(k[1], k[2]) for k in values}, key=lambda a: (a[0], -a[1]))
    for source in sources:
        for tokens in result["config"]["lengths"]:
            lines.append(f"\nEvery arm, free-running (live), source {source}, {tokens} tokens:\n")
            lines.append("| metric | " + " | ".join(f"{c}@{d}" for c, d in arms) + " |")
            lines.append("|---|" + "---:|" * len(arms))
            for metric in metrics:
                cells = [values.get((metric, c, d, "free", tokens, source)) for c, d in arms]
                lines.append(f"| {metric} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in cells) + " |")
    lines.append(f"\nTeacher-forced (replay) minus free-running (live), {primary} tokens, source mix "
                 "(value: forced / free):\n")
    forced_arms = sorted({(k[1], k[2]) for k in values if k[3] == "forced"}, key=lambda a: (a[0], -a[1]))
    lines.append("| metric | " + " | ".join(f"{c}@{d}" for c, d in forced_arms) + " |")
    lines.append("|---|" + "---:|" * len(forced_arms))
    for metric in metrics:
        cells = []
        for c, d in forced_arms:
            f, r = values.get((metric, c, d, "forced", primary, "mix")), values.get((metric, c, d, "free", primary, "mix"))
            cells.append("—" if f is None or r is None else f"{f - r:+.3f} ({f:.3f} / {r:.3f})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_exit(text: str, depth: int) -> ExitConfig:
    """`criterion:threshold:fraction,fraction` -> the ExitConfig the env builds at `depth` (helios.arms.ExitSpec)."""
    from helios.arms import ExitSpec

    criterion, threshold, fractions = text.split(":")
    config = ExitSpec(criterion, float(threshold), tuple(float(f) for f in fractions.split(","))).exit_config(depth)
    if config is None or not config.enabled:
        raise SystemExit(f"--exit {text}: no exit point inside 1..{depth - 1}")
    return config


@torch.inference_mode()
def replay_exit_tokens(engine: EarlyExitEngine, prompts: Sequence[Sequence[int]], full_tokens: Sequence[Sequence[int]],
                       config: ExitConfig) -> list[list[int]]:
    """Per request, the tokens replay gives the full-depth model under exit setting `config`: per position, the
    prediction at the first exit point whose signal passes the threshold after the full-depth prefix (the rule of
    helios.replay.Replayer.exits, on the signals a trace records: helios.profiling.layer_signals)."""
    from helios.profiling import layer_signals

    depth = engine.depth
    points = np.array(sorted(p for p in config.exit_points if p < depth), dtype=np.int64)
    out = []
    for prompt, generated in zip(prompts, full_tokens):
        signals = layer_signals(engine, list(prompt), list(generated))
        signal = signals[config.criterion]
        passes = signal[:, points - 1] >= np.float32(config.threshold)
        exit_layer = np.where(passes.any(1), points[passes.argmax(1)], depth)
        exit_layer[0] = depth  # token 0 comes from prefill
        out.append([int(t) for t in signals["pred"][np.arange(len(generated)), exit_layer - 1]])
    return out


def forced_error(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Section 5 of the module docstring: judge_score free-running vs teacher-forced, per arm."""
    from envs.judge import Judge

    requests = request_pool(args.per_source, args.seed)
    digest = pool_digest(requests)
    judge = Judge(args.judges[0], prompt_margin=args.new_tokens, disk_cache=True)
    rows = []
    for spec in args.candidates:
        name, _, depth_list = spec.partition(":")
        depths = [int(d) for d in depth_list.split(",")]
        arms = generations(name, depths, requests, args.new_tokens, args.batch_size, args.cache, digest, log)
        full = max(k.depth for k in arms)
        tokenizer = load_tokenizer(name, progress=False)
        pairs: list[tuple[str, list[list[int]], list[list[int]]]] = []
        for depth in sorted(depths):
            free = arms[ArmKey(name, depth, "free")]
            forced = free if depth == full else arms[ArmKey(name, depth, "forced")]  # full depth: forced is free
            pairs.append((f"{name}@{depth} exits off", free, forced))
        if args.exit:
            checkpoint = resolve_checkpoint(name, progress=False)
            prompts = encode_requests(list(requests), tokenizer, max_context(checkpoint) - args.new_tokens)
            batches = batches_by_length(prompts, [r.source for r in requests], args.batch_size)
            engine = EarlyExitEngine(load_candidate(name, progress=False))
            for text in args.exit:
                config = parse_exit(text, full)
                path = args.cache / f"gen_{name}_{full}_exit-{text.replace(':', '_')}_{digest}_{args.new_tokens}.json"
                if path.exists() and json.loads(path.read_text())["checkpoint"] == checkpoint:
                    stored = json.loads(path.read_text())
                    free, forced = stored["free"], stored["forced"]
                else:
                    start = time.perf_counter()
                    free = generate_arm(engine, prompts, batches, args.new_tokens, exit_config=config)
                    forced = replay_exit_tokens(engine, prompts, arms[ArmKey(name, full, "free")], config)
                    write_json(path, {"checkpoint": checkpoint, "free": free, "forced": forced})
                    log(f"{name}@{full} {text}: generated and replayed in {time.perf_counter() - start:.0f} s")
                pairs.append((f"{name}@{full} {text} (exit points {list(config.exit_points)})", free, forced))
        for label, free, forced in pairs:
            values = {}
            for mode, tokens in (("free", free), ("forced", forced)):
                texts = [tokenizer.decode(t[: args.new_tokens], skip_special_tokens=True) for t in tokens]
                values[mode] = [judge.score(r, x) for r, x in zip(requests, texts)]
            agree = [sum(a == b for a, b in zip(f, g)) / max(len(f), 1) for f, g in zip(free, forced)]
            rows.append({"arm": label, "requests": len(requests), "judge_free": float(np.mean(values["free"])),
                         "judge_forced": float(np.mean(values["forced"])),
                         "difference": float(np.mean(values["forced"]) - np.mean(values["free"])),
                         "token_agreement_forced_free": float(np.mean(agree)),
                         "per_request_free": values["free"], "per_request_forced": values["forced"]})
            log(f"{label}: free {rows[-1]['judge_free']:.4f} forced {rows[-1]['judge_forced']:.4f}")
    return {"rows": rows, "judge": judge.name, "judge_forwards": judge.forwards, "pool_digest": digest}


def forced_markdown(result: dict[str, Any]) -> str:
    lines = [f"judge_score under {result['judge']} (env's per-request mean), teacher-forced (replay) vs free-running "
             "(live):\n", "| arm | requests | free-running | teacher-forced | difference | token agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['arm']} | {row['requests']} | {row['judge_free']:.4f} | {row['judge_forced']:.4f} | "
                     f"{row['difference']:+.4f} | {row['token_agreement_forced_free']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=["smollm2-135m:10,20,30", "gemma3-270m:6,12,18"],
                        help="name:depth,depth,... (the deepest listed must be the full depth)")
    parser.add_argument("--reference", default="smollm2-135m", help="the fixed reference model of ref_fidelity")
    parser.add_argument("--judges", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--per-source", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--primary-tokens", type=int, default=16, help="the env's new_tokens (conf/env/*.yaml)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draws", type=int, default=4000, help="bootstrap resamples per estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32 requests per source, 32 tokens")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("HELIOS_CACHE_DIR", Path.home() / ".cache" / "helios")) / "accuracy")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--md-sources", nargs="+", default=["mix"], help="sources of the per-arm tables")
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a --json result and exit")
    parser.add_argument("--forced-error", action="store_true",
                        help="only section 5: judge_score (first --judges) teacher-forced vs free-running per arm")
    parser.add_argument("--exit", nargs="*", default=[], metavar="CRITERION:THRESHOLD:FRACTIONS",
                        help="with --forced-error: exit settings at full depth, e.g. max_prob:0.9:0.5,0.75")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text()), args.md_sources))
        return
    if args.quick:
        args.per_source, args.new_tokens = min(args.per_source, 32), min(args.new_tokens, 32)
    torch.set_num_threads(args.threads)
    started = time.time()
    load_start = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    if args.forced_error:
        result = forced_error(args, log)
        result["machine"] = {"threads": args.threads, "load_average_start": load_start,
                             "load_average_end": os.getloadavg(), "wall_s": time.time() - started,
                             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        print(forced_markdown(result))
        if args.json:
            write_json(args.json, result, indent=1)
        return

    candidates = {}
    for spec in args.candidates:
        name, _, depths = spec.partition(":")
        candidates[name] = [int(d) for d in depths.split(",")]
    if args.reference not in candidates:
        raise SystemExit(f"--reference {args.reference} must be one of --candidates")
    requests = request_pool(args.per_source, args.seed)
    digest = pool_digest(requests)
    lengths = sorted({min(args.primary_tokens, args.new_tokens), args.new_tokens})
    log(f"{len(requests)} requests ({args.per_source} per source), {args.new_tokens} tokens, pool {digest}, "
        f"load average {load_start[0]:.1f}")

    arms: dict[ArmKey, list[list[int]]] = {}
    full_depth: dict[str, int] = {}
    tokenizer_id: dict[str, str] = {}
    texts: dict[tuple[ArmKey, int], list[str]] = {}
    gen_seconds: dict[str, float] = {}
    for name, depths in candidates.items():
        t0 = time.perf_counter()
        got = generations(name, depths, requests, args.new_tokens, args.batch_size, args.cache, digest, log)
        gen_seconds[name] = time.perf_counter() - t0
        full_depth[name] = max(k.depth for k in got)
        if max(depths) != full_depth[name]:
            raise SystemExit(f"{name}: the deepest listed depth must be its full depth {full_depth[name]}")
        tokenizer = load_tokenizer(name, progress=False)
        tokenizer_id[name] = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        for key, tokens in got.items():
            for length in lengths:
                texts[(key, length)] = [tokenizer.decode(t[:length], skip_special_tokens=True) for t in tokens]
        arms.update(got)

    judged = {}
    for judge in args.judges:
        judged[judge] = judge_scores(judge, requests, texts, args.cache, digest, args.new_tokens, log)

    scores = per_request_scores(requests, arms, texts, lengths, args.reference, tokenizer_id, judged)
    snr = snr_rows(scores, requests, candidates, full_depth, args.draws, args.seed)
    values = depth_rows(scores, requests)
    samples = {f"{k[0].label}#{k[1]}": v[:3] for k, v in texts.items() if k[1] == args.new_tokens}
    result = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "primary_tokens": min(args.primary_tokens, args.new_tokens), "lengths": lengths,
                   "requests": len(requests), "pool_digest": digest},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "wall_s": time.time() - started, "generation_s": gen_seconds},
        "snr": snr, "values": values, "samples": samples,
    }
    table = markdown(result, args.md_sources)
    print(table)
    if args.json:
        write_json(args.json, result, indent=1)
    if args.md:
        with atomic_file(args.md, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
