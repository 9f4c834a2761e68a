"""Accuracy metrics against hand-computed values and, for perplexity, the model's logits scored by hand."""

import math

import pytest
import torch

from helios.metrics import METRICS, compute_accuracy, contains_answer, exact_match, perplexity, rouge_l, token_agreement
from tests.conftest import load_cached


def test_rouge_l_by_hand() -> None:
    # reference 6 words, prediction 5; LCS = the, cat, on, mat (4): P = 4/5, R = 4/6, F = 2PR / (P + R) = 8/11.
    assert rouge_l("the cat on a mat", "the cat sat on the mat") == pytest.approx(8 / 11)
    # LCS is in order: "mat cat" vs "cat mat" share one word in order -> P = R = 1/2.
    assert rouge_l("mat cat", "cat mat") == pytest.approx(0.5)
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)  # lower-cased alphanumeric tokens
    assert rouge_l("completely different", "nothing shared here") == 0.0


def test_exact_match_and_contains_answer_by_hand() -> None:
    assert exact_match(" Paris.\n\nQ: What is 2 + 3?\nA: 5", "Paris") == 1.0  # first line only
    assert exact_match("The Paris", "paris") == 1.0  # articles, case
    assert exact_match("Parisian", "Paris") == 0.0
    assert exact_match("\n\n 95 ", "95") == 1.0
    assert contains_answer("I think it is 95, surely.", "95") == 1.0
    assert contains_answer("195", "95") == 0.0  # whole words only
    assert contains_answer("it is buenos aires.", "Buenos Aires") == 1.0
    assert contains_answer("aires buenos", "Buenos Aires") == 0.0


def test_mean_over_requests_skips_missing_references() -> None:
    value = compute_accuracy("exact_match", predictions=["4", "5", "x"], references=["4", "6", None])
    assert value == pytest.approx(0.5)


def test_fidelity_by_hand() -> None:
    # request 0: positions 0 and 2 agree, max length 4; request 1: positions 0, 1 agree, max length 3 -> 4/7.
    value = token_agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3], [5, 6, 7]])
    assert value == pytest.approx(4 / 7)
    assert compute_accuracy("fidelity", tokens=[[1, 2]], full_depth_tokens=[[1, 2]]) == 1.0


def _nll_by_hand(model, context: list[int], generated: list[int]) -> tuple[float, int]:
    ids = torch.tensor([context + generated])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = max(len(context), 1)  # the first token of a sequence without context is never predicted
    nll = -sum(float(logprobs[p - 1, ids[0, p]]) for p in range(start, ids.shape[1]))
    return nll, ids.shape[1] - start


def test_perplexity_matches_model_loss_and_hand_scoring() -> None:
    model = load_cached("tiny-llama").model
    sequence = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    with torch.inference_mode():
        loss = model(torch.tensor([sequence]), labels=torch.tensor([sequence])).loss
    assert perplexity(model, [sequence]) == pytest.approx(math.exp(float(loss)), rel=1e-5)

    contexts, generations = [[10, 20, 30], [5]], [[40, 50], [60, 70, 80, 90]]
    scored = [_nll_by_hand(model, c, g) for c, g in zip(contexts, generations)]
    expected = math.exp(sum(n for n, _ in scored) / sum(k for _, k in scored))  # pooled per token: 2 + 4 tokens
    got = compute_accuracy("perplexity", model=model, tokens=generations, context_ids=contexts)
    assert got == pytest.approx(expected, rel=1e-5)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown accuracy metric 'bleu'; valid: \['exact_match', 'contains_answer'"):
        compute_accuracy("bleu", predictions=["a"], references=["a"])
    with pytest.raises(ValueError, match=r"metric 'fidelity' needs input\(s\) \['full_depth_tokens'\]"):
        compute_accuracy("fidelity", tokens=[[1]])
    with pytest.raises(ValueError, match="no request has a reference text"):
        compute_accuracy("rouge_l", predictions=["a"], references=[None])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_accuracy("contains_answer", predictions=["a", "b"], references=["a"])
    assert set(METRICS) == {"exact_match", "contains_answer", "rouge_l", "fidelity", "perplexity"}
    assert not METRICS["perplexity"].higher_is_better
