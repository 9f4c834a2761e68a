"""Telemetry records from real tiny-model GenerationResults, checked against sums done by hand; JSONL round trip,
torn last line, schema errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from helios.energy import EnergyReading
from helios.engine import EarlyExitEngine, ExitConfig
from helios.telemetry import SCHEMA_VERSION, EpochRecord, TelemetryWriter, read_records, record_from_results
from tests.conftest import load_cached

PROMPTS = ["The capital of France is", "def add(a, b):", "To be, or not"]
EXITS = ExitConfig("max_prob", 0.05, (2, 4))


@pytest.fixture(scope="module")
def results():
    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    return [engine.generate(PROMPTS, 12, EXITS), engine.generate(PROMPTS[:2], 8, EXITS)]


def test_single_result_by_hand(results) -> None:
    result = results[0]
    energy = EnergyReading(2.0, "model", {"formula": "test"})
    record = record_from_results("tiny-llama", EXITS, [result], energy, {"rouge_l": 0.25}, epoch=4, peak_rss=123)
    generated = sum(len(t) for t in result.tokens)
    assert record.generated_tokens == generated
    assert record.tokens_per_s == pytest.approx(generated / (result.prefill_s + result.decode_s))
    assert record.requests_per_s == pytest.approx(3 / (result.prefill_s + result.decode_s))
    assert record.tokens_per_j == pytest.approx(generated / 2.0)
    assert record.energy_source == "model" and record.accuracy == {"rouge_l": 0.25} and record.epoch == 4
    # histogram: every generated token counted once, at the layer count that produced it
    counts = [0] * 6
    for row in result.exit_layers:
        for layer_count in row:
            counts[layer_count - 1] += 1
    assert record.exit_layer_histogram == counts and sum(counts) == generated
    assert counts[1] + counts[3] > 0, "the exit setting should make some tokens exit at layer 2 or 4"
    e2e = sorted(result.e2e_s)
    assert record.e2e_p50_s == pytest.approx(e2e[1])  # median of 3
    assert record.ttft_s == pytest.approx(result.prefill_s)
    per_token = [(e - result.ttft_s) / (len(t) - 1) for t, e in zip(result.tokens, result.e2e_s) if len(t) > 1]
    assert record.time_per_token_s == pytest.approx(sum(per_token) / len(per_token))
    assert record.depth == 6 and record.threshold == 0.05 and record.exit_points == [2, 4]
    assert record.weight_bytes == result.weight_bytes and record.kv_cache_bytes == result.kv_cache_bytes


def test_several_results_are_pooled(results) -> None:
    record = record_from_results("tiny-llama", EXITS, results, None, {})
    busy_s = sum(r.prefill_s + r.decode_s for r in results)
    generated = sum(len(t) for r in results for t in r.tokens)
    assert record.requests == 5 and record.batch_size == 3
    assert record.tokens_per_s == pytest.approx(generated / busy_s)
    e2es = [e for r in results for e in r.e2e_s]
    assert record.e2e_p95_s == pytest.approx(np.percentile(e2es, 95))
    assert record.energy_j is None and record.tokens_per_j is None and record.energy_source == "none"
    assert record.layer_evals == sum(r.layer_evals for r in results)
    assert record.peak_rss_bytes > 0


def test_jsonl_round_trip_and_torn_tail(results, tmp_path: Path) -> None:
    path = tmp_path / "run" / "telemetry.jsonl"
    records = [
        record_from_results("tiny-llama", EXITS, [r], EnergyReading(1.5, "rapl", {"zones": ["package-0"]}), {"fidelity": 0.9}, epoch=i)
        for i, r in enumerate(results)
    ]
    with TelemetryWriter(path) as writer:
        writer.write(records[0])
    with TelemetryWriter(path) as writer:  # appends
        writer.write(records[1])
    assert read_records(path) == records
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["schema_version"] == SCHEMA_VERSION
    with path.open("a") as handle:
        handle.write('{"schema_version": 1, "epo')  # a write cut short by a crash
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert read_records(path) == records


def test_bad_records(results, tmp_path: Path) -> None:
    data = record_from_results("tiny-llama", EXITS, results[:1], None, {}).to_dict()
    with pytest.raises(ValueError, match="schema_version 99 is not the 1"):
        EpochRecord.from_dict({**data, "schema_version": 99})
    broken = dict(data)
    del broken["energy_j"]
    with pytest.raises(ValueError, match=r"missing \['energy_j'\], unknown \[\]"):
        EpochRecord.from_dict(broken)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(data) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(path)
    with pytest.raises(ValueError, match="at least one GenerationResult"):
        record_from_results("tiny-llama", EXITS, [], None, {})
    with pytest.raises(ValueError, match="accuracy values must be finite"):
        record_from_results("tiny-llama", EXITS, results[:1], None, {"perplexity": float("inf")})
