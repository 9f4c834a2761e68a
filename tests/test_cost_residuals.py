"""benchmarks/cost_residuals.py's arithmetic against hand-computed prices: calls bucketed by batch size, each priced
by the cost model on its own counters (prefill calls by the prefill coefficients, decode calls by the decode ones),
and measured / predicted per kind and bucket. The live run itself is the benchmark's (minutes of real inference).

    python -m pytest tests/test_cost_residuals.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cost_residuals import bucket, summarise  # noqa: E402

from helios.costmodel import CostModel  # noqa: E402


def test_buckets_are_powers_of_two_ranges() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129)] == [
        "1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "9-16", "17-32", "17-32", "33-64", "33-64", "65-128", "65-128",
        ">128"]


def test_summarise_prices_each_call_by_its_own_counters() -> None:
    model = CostModel(prefill_s_per_unit={"prefill_calls": 0.5, "prefill_token_layers": 0.001},
                      decode_s_per_unit={"steps": 0.01, "layer_rows": 0.002}, device="cpu", dtype="float32", threads=2)
    calls = [
        # prefill of one 100-token prompt at depth 10: 0.5 + 0.001 * 1000 = 1.5 s predicted
        {"kind": "prefill", "rows": 1, "seconds": 3.0, "grow_s": 0.25,
         "features": {"prefill_calls": 1, "prefill_token_layers": 1000}},
        # decode of 1 row through 10 layers: 0.01 + 0.002 * 10 = 0.03 s; measured 0.03
        {"kind": "decode", "rows": 1, "seconds": 0.03, "grow_s": 0.0, "features": {"steps": 1, "layer_rows": 10}},
        # decode of 3 rows: 0.01 + 0.002 * 30 = 0.07 s, twice; measured 0.14 each
        {"kind": "decode", "rows": 3, "seconds": 0.14, "grow_s": 0.0, "features": {"steps": 1, "layer_rows": 30}},
        {"kind": "decode", "rows": 4, "seconds": 0.14, "grow_s": 0.0, "features": {"steps": 1, "layer_rows": 30}},
    ]
    out = summarise(calls, model)
    assert list(out) == ["decode", "decode rows 1", "decode rows 3-4", "prefill", "prefill rows 1"]
    assert out["prefill"]["predicted_s"] == pytest.approx(1.5)
    assert out["prefill"]["measured_over_predicted"] == pytest.approx(2.0)
    assert out["prefill"]["grow_s"] == pytest.approx(0.25)
    assert out["decode rows 1"]["measured_over_predicted"] == pytest.approx(1.0)
    assert out["decode rows 3-4"] == pytest.approx({"calls": 2, "measured_s": 0.28, "predicted_s": 0.14,
                                                    "measured_over_predicted": 2.0, "grow_s": 0.0, "mean_rows": 3.5})
    assert out["decode"]["predicted_s"] == pytest.approx(0.03 + 0.14)
    assert out["decode"]["calls"] == 3
