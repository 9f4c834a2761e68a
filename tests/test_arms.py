"""helios.arms: the arm table, K/V and memory budget -> batch size, exit buckets, and the policy JSON round trip.

    python -m pytest tests/test_arms.py -q
"""

import numpy as np
import pytest

from helios.arms import (
    Arm,
    CandidateSpec,
    ExitSpec,
    MemoryBudget,
    MemoryInfo,
    arms_from_dicts,
    build_arms,
    exit_buckets,
    exit_histogram,
    reference_arm_index,
)
from helios.exit_config import ExitConfig

# Candidate A: 4 layers, 100 / 200 bytes of weights at depth 2 / 4, 2 bytes of K/V per token per layer.
MEMORY = {"A": MemoryInfo(4, {2: 100, 4: 200}, 2)}
BUDGET = MemoryBudget(budget_bytes=500, context_tokens=10, max_batch_size=64)


def test_table_sizes_batches_by_hand() -> None:
    """K/V per sequence = 2 x depth x 10: 40 at depth 2, 80 at depth 4. Batch = (500 - weights) // K/V:
    400 // 40 = 10 and 300 // 80 = 3. max_prob at half depth: exit point 1 at depth 2, 2 at depth 4."""
    arms = build_arms((CandidateSpec("A", (2, 4)),), (ExitSpec(), ExitSpec("max_prob", 0.8, (0.5,))), MEMORY,
                      BUDGET, reference="A")
    assert [(a.label, a.kv_bytes_per_seq, a.batch_size, a.exit_config.exit_points) for a in arms] == [
        ("A@2/4 exit=none", 40, 10, ()), ("A@2/4 exit=max_prob>=0.8@0.5", 40, 10, (1,)),
        ("A@4/4 exit=none", 80, 3, ()), ("A@4/4 exit=max_prob>=0.8@0.5", 80, 3, (2,))]
    assert [a.reference for a in arms] == [False, False, True, False] and reference_arm_index(arms) == 2
    assert MemoryBudget(10, 1, 64).batch_size(100, 40) == 0  # weights alone exceed the budget
    assert MemoryBudget(10**9, 1, 8).batch_size(100, 40) == 8  # capped
    with pytest.raises(ValueError, match="fits no arm: the smallest, A@2/4 exit=none, needs"):
        build_arms((CandidateSpec("A", (2,)),), (ExitSpec(),), MEMORY, MemoryBudget(120, 10, 64))
    with pytest.raises(ValueError, match=r"depths \[5\] of 'A' are outside 1..4"):
        build_arms((CandidateSpec("A", (5,)),), (ExitSpec(),), MEMORY, BUDGET)


def test_policy_json_round_trip_and_older_exports() -> None:
    arms = build_arms((CandidateSpec("A", (2, 4)),), (ExitSpec(), ExitSpec("cosine", 0.5, (0.5,))), MEMORY, BUDGET, "A")
    table = [a.to_dict() for a in arms]
    assert arms_from_dicts(table) == arms
    # An export written before arms carried candidate/exit indices and the reference flag (helios.policy/v1 as
    # first shipped): indices are the order of first appearance, the flag reads False.
    old = [{k: v for k, v in row.items() if k not in ("candidate_index", "exit_index", "reference")} for row in table]
    assert [(a.candidate_index, a.exit_index, a.reference) for a in arms_from_dicts(old)] == [
        (0, 0, False), (0, 1, False), (0, 0, False), (0, 1, False)]
    assert arms_from_dicts(old)[1].exit_config == ExitConfig("cosine", 0.5, (1,))
    with pytest.raises(ValueError, match=r"lacks \['batch_size'\]"):
        arms_from_dicts([{k: v for k, v in table[0].items() if k != "batch_size"}])
    with pytest.raises(ValueError, match="indices must be 0..1 in order"):
        arms_from_dicts([table[1], table[0]])
    assert isinstance(arms_from_dicts(arms)[0], Arm)


def test_exit_buckets_and_histogram_by_hand() -> None:
    # Bucket of k exit layers out of 6 in 8 buckets: ceil(k / 6 x 8) - 1.
    assert exit_buckets(6, 8).tolist()[1:] == [1, 2, 3, 5, 6, 7]
    np.testing.assert_array_equal(exit_histogram([2, 2, 6, 1], 6, 8), [0, 0.25, 0.5, 0, 0, 0, 0, 0.25])
    np.testing.assert_array_equal(exit_histogram([], 6, 4), [0, 0, 0, 0])
