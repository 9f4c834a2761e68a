"""Accuracy metrics for served generations, chosen by name from config.

    from helios.metrics import compute_accuracy
    compute_accuracy("rouge_l", predictions=texts, references=refs)                     # prose / code
    compute_accuracy("contains_answer", predictions=texts, references=refs)             # qa
    compute_accuracy("fidelity", tokens=early_exit_tokens, full_depth_tokens=full_tokens)
    compute_accuracy("perplexity", model=full_model, tokens=generated_ids, context_ids=prompt_ids)
    compute_accuracy("judge_score", model=judge_model, tokens=judge_ids_of_output, context_ids=judge_ids_of_prompt)

Tests: python -m pytest -q tests/test_metrics.py

Metrics (all means over requests; higher is better except perplexity):
  exact_match      1 if the prediction's first non-empty line equals the reference after SQuAD normalisation
                   (lower case, punctuation and articles a/an/the removed, whitespace collapsed). Only the first line
                   counts because a base model keeps generating past its answer ("A: 95\\n\\nQ: ...").
  contains_answer  1 if the normalised reference occurs in the normalised prediction as whole words (so "5" is
                   not found in "15"); lenient about where the answer appears.
  rouge_l          ROUGE-L F-measure (longest common subsequence of words) from Google's `rouge-score` package,
                   without stemming; its tokenizer keeps lower-cased alphanumeric runs, so code punctuation and
                   indentation do not count.
  fidelity         position-wise token agreement with the same model's full-depth greedy output for the same
                   prompt: sum over requests of #{t : gen[t] == full[t]} / sum of max(len(gen), len(full)). Positions
                   after a first disagreement compare continuations of different prefixes; they still count when the
                   text re-synchronises (e.g. a reworded clause), which is why this is agreement, not matched-prefix
                   length. Using the longer length penalises stopping early and running past the full-depth EOS.
                   Needs no reference text, so it applies to every source.
  perplexity       exp(token-weighted mean NLL) of the generated tokens under a reference model (pass a full-depth
                   model), conditioned on the prompt (`token_nll`: log-softmax of the logits at the positions that
                   predict generated tokens, as HF's shifted loss). Reference-free; the only metric where lower is
                   better.
  judge_score      exp(-token-weighted mean NLL) = 1 / perplexity, in (0, 1], higher is better: the geometric-mean
                   probability a fixed judge (a full-depth model) gives the output, conditioned on the prompt. Give
                   it the judge's tokens of the decoded output text (re-tokenise it with the judge's tokenizer), so
                   candidates with different vocabularies are scored on one scale. A judge favours its own greedy
                   outputs (self-judging bias): judge a candidate family with a model of another family where the
                   comparison across candidates matters. Chosen by measurement in benchmarks/accuracy.py
                   (benchmarks/RESULTS.md, issue 13).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch


# ----------------------------------------------------------------------------------------------- text metrics

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official answer normalisation (a few lines, reproduced rather than pulling in `evaluate` and
    `datasets` for it): lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The first non-empty line of a generation (its answer, for short-answer prompts)."""
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(first_line(prediction)) == normalize_answer(reference))


def contains_answer(prediction: str, reference: str) -> float:
    answer = normalize_answer(reference).split()
    words = normalize_answer(prediction).split()
    if not answer:
        return 0.0
    n = len(answer)
    return float(any(words[i : i + n] == answer for i in range(len(words) - n + 1)))


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)  # score(target, prediction)


def _mean_over_references(fn: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[str | None]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must pair up")
    pairs = [(p, r) for p, r in zip(predictions, references) if r is not None]
    if not pairs:
        raise ValueError("no request has a reference text; use a reference-free metric (fidelity, perplexity)")
    return sum(fn(p, r) for p, r in pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------- token metrics


def token_agreement(tokens: Sequence[Sequence[int]], full_depth_tokens: Sequence[Sequence[int]]) -> float:
    """Position-wise agreement with the full-depth output (see `fidelity` in the module docstring)."""
    if len(tokens) != len(full_depth_tokens):
        raise ValueError(f"got {len(tokens)} generations but {len(full_depth_tokens)} full-depth ones; they must pair up")
    agree = total = 0
    for generated, full in zip(tokens, full_depth_tokens):
        agree += sum(int(a == b) for a, b in zip(generated, full))
        total += max(len(generated), len(full))
    if total == 0:
        raise ValueError("fidelity of empty generations is undefined: every sequence has zero tokens")
    return agree / total


@torch.inference_mode()
def token_nlls(
    model: torch.nn.Module, tokens: Sequence[Sequence[int]], context_ids: Sequence[Sequence[int]] | None = None
) -> list[list[float]]:
    """Per request: the NLL in nats of each scored token of `tokens[i]` under `model`, given `context_ids[i]`.

    One forward per request (no padding, so no attention-mask subtleties). Only the positions that predict a generated
    token are projected onto the vocabulary (`logits_to_keep`): a judge with a 262k-token head (Gemma-3) would
    otherwise build a [prompt length x 262k] logit matrix per request. Without context the first token is never
    predicted (as in HF's shifted loss), so it is not scored; a request with nothing to score gives []. A causal model
    gives a prefix of the tokens the same per-token NLLs, so one forward prices every prefix of an output.
    """
    contexts = context_ids if context_ids is not None else [[] for _ in tokens]
    if len(contexts) != len(tokens):
        raise ValueError(f"got {len(tokens)} generations but {len(contexts)} contexts; they must pair up")
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for context, generated in zip(contexts, tokens):
        ids = [*map(int, context), *map(int, generated)]
        start = max(len(context), 1)  # first scored position; position p is predicted by the logits at p - 1
        scored = len(ids) - start
        if scored < 1:
            out.append([])
            continue
        input_ids = torch.tensor([ids], device=device)
        logits = _last_logits(model, input_ids, scored + 1)[0, :-1]  # predictions for positions start..len-1
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = input_ids[0, start:]
        out.append((-logprobs.gather(-1, targets[:, None])[:, 0].double()).tolist())
    return out


def token_nll(
    model: torch.nn.Module, tokens: Sequence[Sequence[int]], context_ids: Sequence[Sequence[int]] | None = None
) -> list[tuple[float, int]]:
    """Per request: (summed NLL in nats, number of scored tokens) of `tokens[i]` under `model`, given `context_ids[i]`
    (`token_nlls` summed; a request with nothing to score gives (0.0, 0))."""
    return [(float(sum(nlls)), len(nlls)) for nlls in token_nlls(model, tokens, context_ids)]


def _last_logits(model: torch.nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions (all of them for a model whose forward lacks `logits_to_keep`)."""
    try:
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[:, -keep:]


def _pooled_nll(model: torch.nn.Module, tokens: Sequence[Sequence[int]],
                context_ids: Sequence[Sequence[int]] | None) -> float:
    per_request = token_nll(model, tokens, context_ids)
    count = sum(k for _, k in per_request)
    if count == 0:
        raise ValueError("perplexity needs at least one scored token (a generation of >= 1 token after a prompt)")
    return sum(n for n, _ in per_request) / count


def perplexity(
    model: torch.nn.Module, tokens: Sequence[Sequence[int]], context_ids: Sequence[Sequence[int]] | None = None
) -> float:
    """exp(mean NLL per generated token) under `model`, pooled over requests by token count (lower is better)."""
    return math.exp(_pooled_nll(model, tokens, context_ids))


def judge_score(
    model: torch.nn.Module, tokens: Sequence[Sequence[int]], context_ids: Sequence[Sequence[int]] | None = None
) -> float:
    """exp(-mean NLL per generated token) = 1 / perplexity, in (0, 1], higher is better: the judge's geometric-mean
    probability of the generated tokens, pooled over requests by token count (module docstring: judge_score)."""
    return math.exp(-_pooled_nll(model, tokens, context_ids))


# ----------------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., float]
    inputs: tuple[str, ...]  # keyword arguments compute_accuracy must be given for this metric
    higher_is_better: bool
    needs_reference: bool


METRICS: dict[str, Metric] = {
    "exact_match": Metric(
        "exact_match", lambda predictions, references: _mean_over_references(exact_match, predictions, references),
        ("predictions", "references"), True, True,
    ),
    "contains_answer": Metric(
        "contains_answer",
        lambda predictions, references: _mean_over_references(contains_answer, predictions, references),
        ("predictions", "references"), True, True,
    ),
    "rouge_l": Metric(
        "rouge_l", lambda predictions, references: _mean_over_references(rouge_l, predictions, references),
        ("predictions", "references"), True, True,
    ),
    "fidelity": Metric("fidelity", token_agreement, ("tokens", "full_depth_tokens"), True, False),
    "perplexity": Metric("perplexity", perplexity, ("model", "tokens"), False, False),
    "judge_score": Metric("judge_score", judge_score, ("model", "tokens"), True, False),
}
_OPTIONAL_INPUTS = {"perplexity": ("context_ids",), "judge_score": ("context_ids",)}


def compute_accuracy(metric_name: str, **inputs: Any) -> float:
    """Compute the metric called `metric_name` (a key of METRICS) from the keyword `inputs` it needs.

    Inputs it does not use are ignored, so a caller can pass everything it has (predictions, references, tokens,
    full_depth_tokens, model, context_ids) and let config pick the metric.
    """
    if metric_name not in METRICS:
        raise ValueError(f"unknown accuracy metric {metric_name!r}; valid: {list(METRICS)}")
    metric = METRICS[metric_name]
    missing = [key for key in metric.inputs if inputs.get(key) is None]
    if missing:
        raise ValueError(f"metric {metric_name!r} needs input(s) {missing}; it takes {list(metric.inputs)}")
    kwargs = {key: inputs[key] for key in metric.inputs}
    for key in _OPTIONAL_INPUTS.get(metric_name, ()):
        if inputs.get(key) is not None:
            kwargs[key] = inputs[key]
    return float(metric.fn(**kwargs))
