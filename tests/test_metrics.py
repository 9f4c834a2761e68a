"""Accuracy metrics against hand-computed values and, for perplexity, the model's logits scored by hand."""

import math

import pytest
import torch

from helios.metrics import (
    METRICS, compute_accuracy, contains_answer, exact_match, judge_score, perplexity, rouge_l, token_agreement, token_nll,
)
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


class _UniformLM(torch.nn.Module):
    """A stand-in judge whose logits are all zero: every token has probability 1 / vocab, so NLL = log(vocab)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0):
        keep = logits_to_keep or input_ids.shape[1]
        return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], keep, self.vocab)})()


def test_judge_score_by_hand_on_a_uniform_judge() -> None:
    judge = _UniformLM(vocab=50)
    # 3 generated tokens after a context: 3 scored, each NLL log 50; without context the first token is not scored.
    assert token_nll(judge, [[1, 2, 3]], [[7, 8]]) == [pytest.approx((3 * math.log(50), 3))]
    assert token_nll(judge, [[1, 2, 3]]) == [pytest.approx((2 * math.log(50), 2))]
    assert judge_score(judge, [[1, 2, 3], [4]], [[7], [9]]) == pytest.approx(1 / 50)  # geometric-mean probability
    assert compute_accuracy("judge_score", model=judge, tokens=[[1, 2]], context_ids=[[3]]) == pytest.approx(0.02)
    assert token_nll(judge, [[5]]) == [(0.0, 0)]  # nothing to score
    with pytest.raises(ValueError, match="at least one scored token"):
        judge_score(judge, [[5]])


def test_judge_score_matches_hand_scoring_and_model_loss() -> None:
    model = load_cached("tiny-llama").model
    contexts, generations = [[10, 20, 30], [5]], [[40, 50], [60, 70, 80, 90]]
    scored = [_nll_by_hand(model, c, g) for c, g in zip(contexts, generations)]
    got = token_nll(model, generations, contexts)
    for (nll, count), (want_nll, want_count) in zip(got, scored):
        assert count == want_count and nll == pytest.approx(want_nll, rel=1e-5)
    expected = math.exp(-sum(n for n, _ in scored) / sum(k for _, k in scored))  # pooled per token: 2 + 4 tokens
    assert compute_accuracy("judge_score", model=model, tokens=generations, context_ids=contexts) == pytest.approx(expected, rel=1e-5)
    sequence = [72, 101, 108, 108, 111, 44, 32, 119]
    with torch.inference_mode():
        loss = model(torch.tensor([sequence]), labels=torch.tensor([sequence])).loss
    assert judge_score(model, [sequence]) == pytest.approx(math.exp(-float(loss)), rel=1e-5)  # = 1 / HF perplexity
    assert 0.0 < expected <= 1.0


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown accuracy metric 'bleu'; valid: \['exact_match', 'contains_answer'"):
        compute_accuracy("bleu", predictions=["a"], references=["a"])
    with pytest.raises(ValueError, match=r"metric 'fidelity' needs input\(s\) \['full_depth_tokens'\]"):
        compute_accuracy("fidelity", tokens=[[1]])
    with pytest.raises(ValueError, match="no request has a reference text"):
        compute_accuracy("rouge_l", predictions=["a"], references=[None])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_accuracy("contains_answer", predictions=["a", "b"], references=["a"])
    assert set(METRICS) == {"exact_match", "contains_answer", "rouge_l", "fidelity", "perplexity", "judge_score"}
    assert not METRICS["perplexity"].higher_is_better
    assert METRICS["judge_score"].higher_is_better and not METRICS["judge_score"].needs_reference
