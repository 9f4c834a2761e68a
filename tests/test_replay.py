"""Traces, cost model and replay: the engine's own counters and teacher-forced runs are the references."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helios.costmodel import CalibrationContentionWarning, CostModel, simulate_features
from helios.engine import EarlyExitEngine, ExitConfig
from helios.profiling import ensure_trace
from helios.replay import Replayer, Setting
from helios.traces import SCHEMA_VERSION, TraceError, read_trace, write_trace
from tests.conftest import load_cached

WORKLOAD = {
    "seed": 0, "episode_epochs": 2, "arrival": {"kind": "closed", "batch_size": 4},
    "phases": [{"epochs": 2, "mixture": {"qa": 0.5, "code": 0.5}}],
}
SETTINGS = [
    ExitConfig(),
    ExitConfig("max_prob", 0.05, (2, 4)),
    ExitConfig("cosine", 0.6, (1, 3, 5)),
    ExitConfig("margin", 0.02, (3,)),
]


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    path = ensure_trace("tiny-llama", WORKLOAD, depths=[3], per_source=3, new_tokens=10, batch_size=4, out_dir=out,
                        progress=False, calibration_runs=6)
    return path


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("exit_config", SETTINGS)
def test_simulated_features_equal_engine_counters(name, exit_config) -> None:
    """The cost model's reconstruction of work from exit layers alone == what the engine counted while running."""
    engine = EarlyExitEngine(load_cached(name), load_tuned_heads=False)
    prompts = engine.encode(["hello world, a prompt", "short", "a much longer prompt with many words in it"])
    result = engine.generate(prompts, 12, exit_config, stop_at_eos=False)
    prefill, decode = simulate_features(result.exit_layers, engine.depth, exit_config, result.prompt_tokens)
    assert {**prefill, **decode} == {k: result.cost_features[k] for k in {**prefill, **decode}}


def test_vectorised_batch_features_equal_reference_loop(tiny_trace) -> None:
    replayer = Replayer(read_trace(tiny_trace))
    rng = np.random.default_rng(0)
    for exit_config in (*SETTINGS, ExitConfig("probe", 0.9, (2, 4))):
        depth = 6
        points = list(exit_config.exit_points) if exit_config.enabled else []
        choices = np.array(points + [depth])
        exits = rng.choice(choices, size=(5, 9))
        exits[:, 0] = depth
        setting = Setting(depth, exit_config, 5)
        got = replayer.batch_features(exits, setting, np.array([7, 5, 9, 7, 6]))
        want = simulate_features(exits.tolist(), depth, exit_config, [7, 5, 9, 7, 6])
        assert got == want


def test_probe_decisions_are_counted_and_priced_by_hand() -> None:
    """Depth 4, exit point 2, prompt of 1 token, two rows: row 0 exits at step 1, row 1 at step 2. Each step: 2 rows
    reach the probe (1 call), 1 leaves (1 compaction, its token from the exit head, K/V propagated through layers
    3 and 4), 1 runs to the LM head. Probe decisions read no head, so no decision_head work."""
    probe = ExitConfig("probe", 0.9, (2,))
    _, decode = simulate_features([[4, 2, 4], [4, 4, 2]], 4, probe, 1)
    assert {k: v for k, v in decode.items() if v} == {
        "steps": 2, "step_rows": 4, "layer_calls": 8, "layer_rows": 12, "attention_row_positions": 2 * 6 + 3 * 6,
        "decision_probe_calls": 2, "decision_probe_rows": 4, "compactions": 2, "propagate_calls": 4,
        "propagate_rows": 4, "exit_head_calls": 2, "exit_head_rows": 2, "head_calls": 2, "head_rows": 2}
    model = CostModel({}, {"decision_probe_rows": 1e-3, "exit_head_rows": 1e-2}, device="cpu", dtype="float32",
                      threads=1)
    assert model.decode_s(decode) == pytest.approx(4e-3 + 2e-2)


def test_replay_pricing_imports_neither_torch_nor_transformers(tiny_trace) -> None:
    """Pricing a trace is arithmetic: a fresh interpreter replays one and never imports torch or transformers."""
    code = (
        "import sys\n"
        "from helios.exit_config import ExitConfig\n"
        "from helios.replay import Replayer, Setting\n"
        "from helios.traces import read_trace\n"
        f"replayer = Replayer(read_trace({str(tiny_trace)!r}))\n"
        "result = replayer.run(replayer.trace.requests(), Setting(3, ExitConfig('cosine', 0.6, (1, 2)), 2))\n"
        "assert result.busy_s > 0 and result.generated_tokens > 0\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root}, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cost_model_prices_features_linearly() -> None:
    model = CostModel({"prefill_calls": 0.5, "prefill_token_layers": 0.001}, {"steps": 0.01, "layer_rows": 0.002},
                      device="cpu", dtype="float32", threads=2)
    assert model.prefill_s({"prefill_calls": 1, "prefill_token_layers": 100}) == pytest.approx(0.6)
    assert model.decode_s({"steps": 10, "layer_rows": 50, "unknown": 3}) == pytest.approx(0.2)


def test_a_trace_calibrated_under_contention_warns_when_replayed(tiny_trace) -> None:
    """The calibration records the load it ran under; replay warns (naming the load) when other processes competed
    for the CPU (load beyond this process's threads above half the CPUs), and stays quiet otherwise."""
    import dataclasses
    import warnings

    trace = read_trace(tiny_trace)
    recorded = trace.meta["cost_model"]
    assert recorded["calibration_cpus"] >= 1 and recorded["calibration_load_average"] >= 0.0  # recorded at calibration

    def replayer_with(load: float, cpus: int, threads: int) -> list[warnings.WarningMessage]:
        cost = {**recorded, "calibration_load_average": load, "calibration_cpus": cpus, "threads": threads}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Replayer(dataclasses.replace(trace, meta={**trace.meta, "cost_model": cost}))
        return [w for w in caught if "calibrated at load average" in str(w.message)]

    assert "load average 5.4 on 2 CPUs" in str(replayer_with(5.4, 2, 2)[0].message)  # 3.4 others > 1
    assert replayer_with(5.4, 2, 2)[0].category is CalibrationContentionWarning  # filterable by category
    assert replayer_with(2.9, 2, 2) == []  # 0.9 beyond its own 2 threads: within half the CPUs
    assert replayer_with(float("nan"), 0, 2) == []  # an older trace: not recorded, nothing to say
    old = {k: v for k, v in recorded.items() if not k.startswith("calibration_") or k == "calibration_rel_error"}
    assert CostModel.from_dict(old).contention() is None  # traces recorded before the field still load


def test_calibration_batches_double_up_to_the_largest_the_scenario_runs() -> None:
    """The runs cycle through batches 1, 2, 4, ... and the maximum itself, so that a linear fit interpolates up to
    the batches replay will price (up to 8 before; 32 for traces now)."""
    from helios.calibration import calibration_settings

    assert [b for b, _, _ in calibration_settings(30, 0, 12, 32)] == [1, 2, 4, 8, 16, 32] * 2
    assert [b for b, _, _ in calibration_settings(30, 0, 8, 8)] == [1, 2, 4, 8] * 2  # the old ladder, unchanged
    assert [b for b, _, _ in calibration_settings(30, 0, 6, 24)] == [1, 2, 4, 8, 16, 24]


def test_the_calibrations_batch_range_is_recorded_and_keys_the_trace(tiny_trace) -> None:
    from helios.profiling import CALIBRATION_MAX_BATCH, trace_path

    cost = read_trace(tiny_trace).meta["cost_model"]
    assert CALIBRATION_MAX_BATCH == 32 and cost["calibration_max_batch"] == 32  # 6 runs per engine: 1, 2, ..., 32
    key = ("tiny-llama", WORKLOAD, 3, 10, tiny_trace.parent)
    assert trace_path(*key) == tiny_trace
    assert trace_path(*key, calibration_max_batch=8) != tiny_trace  # a trace calibrated on other batches is another


def test_pricing_beyond_the_calibrated_batches_is_named() -> None:
    """Up to twice the calibrated batch is measured harmless (calibrations to 32 and 64 agreed); beyond, say so."""
    model = CostModel({}, {"steps": 0.01}, device="cpu", dtype="float32", threads=2, calibration_max_batch=32)
    assert model.batch_extrapolation(64) is None
    assert "a step of 65 sequences" in model.batch_extrapolation(65) and "at most 32:" in model.batch_extrapolation(65)
    legacy = CostModel({}, {"steps": 0.01}, device="cpu", dtype="float32", threads=2)  # an older trace's model
    assert legacy.batch_extrapolation(16) is None
    assert "at most 8 (not recorded" in legacy.batch_extrapolation(17)


def test_free_running_outputs_are_what_transformers_generate_writes_and_are_cached(tiny_trace, monkeypatch) -> None:
    """Replay judges a truncated arm's free-running output: Hugging Face generate (greedy) on the same truncated model
    writes the same tokens (up to its EOS, where it stops). Full depth without exits is the trace's own output, and a
    second call reads the cache beside the trace without loading a model."""
    import torch

    import helios.models
    from helios.profiling import free_running_outputs, free_running_path

    trace = read_trace(tiny_trace)
    outputs = free_running_outputs(tiny_trace, trace, 3, ExitConfig())
    assert free_running_path(tiny_trace, 3, ExitConfig()).exists() and sorted(outputs) == trace.requests()
    loaded = load_cached("tiny-llama", 3)
    new_tokens = int(trace.meta["new_tokens"])
    for rid in trace.requests():
        ids = torch.tensor([trace.meta["prompts"][rid]])
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
        reference = out[0, ids.shape[1]:].tolist()
        assert len(outputs[rid]) == new_tokens and outputs[rid][: len(reference)] == reference, rid
    # Teacher-forced predictions at depth 3 are not this text (the trace's own caveat), else the test proves nothing.
    forced = {rid: trace.pred[trace.request_id == rid, 2].tolist() for rid in trace.requests()}
    assert any(forced[rid] != outputs[rid] for rid in trace.requests())

    monkeypatch.setattr(helios.models, "load_candidate", lambda *a, **k: pytest.fail("the cache was not read"))
    assert free_running_outputs(tiny_trace, trace, 3, ExitConfig()) == outputs
    full = free_running_outputs(tiny_trace, trace, 6, ExitConfig())  # full depth: no generation either
    assert all(full[rid] == trace.full_token[trace.request_id == rid].tolist() for rid in trace.requests())
    assert free_running_path(tiny_trace, 3, ExitConfig("max_prob", 0.9, (1,))) != free_running_path(tiny_trace, 3,
                                                                                                       ExitConfig())


def test_trace_round_trip_and_metadata(tiny_trace) -> None:
    trace = read_trace(tiny_trace)
    assert trace.meta["candidate"] == "tiny-llama" and trace.num_layers == 6
    assert trace.pred.shape == (len(trace.full_token), 6)
    assert len(trace.requests()) == 6 and set(trace.source) == {"qa", "code"}
    # The trace's last layer is the full-depth output itself.
    np.testing.assert_array_equal(trace.pred[:, -1], trace.full_token)
    weights = trace.meta["weight_bytes_by_depth"]
    assert weights["6"] == load_cached("tiny-llama").weight_bytes and weights["3"] == load_cached("tiny-llama", 3).weight_bytes


def test_replay_truncation_matches_live_teacher_forced_exactly(tiny_trace) -> None:
    """With exits off, a replayed depth-k run predicts exactly what the engine loaded to k predicts, teacher-forced."""
    trace = read_trace(tiny_trace)
    replayer = Replayer(trace)
    ids = trace.requests()
    for depth in (2, 4, 6):
        engine = EarlyExitEngine(load_cached("tiny-llama", depth), load_tuned_heads=False)
        replay = replayer.run(ids, Setting(depth, ExitConfig(), 3))
        prompts = [trace.meta["prompts"][r] for r in ids]
        forced = [trace.full_token[trace.request_id == r].tolist() for r in ids]
        live = []
        for start in range(0, len(ids), 3):
            live += engine.generate(prompts[start:start + 3], 10, stop_at_eos=False, forced_tokens=forced[start:start + 3]).tokens
        assert replay.tokens == live
        matches = sum(a == b for row, ref in zip(live, forced) for a, b in zip(row, ref))
        assert replay.fidelity == pytest.approx(matches / sum(map(len, forced)))


@pytest.mark.parametrize("exit_config", [ExitConfig("max_prob", 0.05, (2,)), ExitConfig("cosine", 0.6, (3,))])
def test_replay_single_exit_point_matches_live_teacher_forced(tiny_trace, exit_config) -> None:
    """With one exit point e, layers <= e never see propagated K/V, so replay's decisions are exact."""
    trace = read_trace(tiny_trace)
    replayer = Replayer(trace)
    ids = trace.requests()
    engine = EarlyExitEngine(load_cached("tiny-llama"), load_tuned_heads=False)
    replay = replayer.run(ids, Setting(6, exit_config, 3))
    prompts = [trace.meta["prompts"][r] for r in ids]
    forced = [trace.full_token[trace.request_id == r].tolist() for r in ids]
    live_tokens, live_exits = [], []
    for start in range(0, len(ids), 3):
        run = engine.generate(prompts[start:start + 3], 10, exit_config, stop_at_eos=False,
                              forced_tokens=forced[start:start + 3])
        live_tokens += run.tokens
        live_exits += run.exit_layers
    assert replay.exit_layers == live_exits
    assert any(e < 6 for row in live_exits for e in row[1:]), "the setting must exit somewhere to test anything"
    early = [(a, b) for r_tok, l_tok, l_exit in zip(replay.tokens, live_tokens, live_exits)
             for a, b, e in zip(r_tok, l_tok, l_exit) if e < 6]
    assert all(a == b for a, b in early)


def test_replay_latency_accounts_for_queueing(tiny_trace) -> None:
    replayer = Replayer(read_trace(tiny_trace))
    result = replayer.run(replayer.trace.requests(), Setting(6, ExitConfig(), 2))
    assert len(result.prefill_s) == 3
    first_batch_end = result.prefill_s[0] + result.decode_s[0]
    assert result.e2e_s[0] == result.e2e_s[1] == pytest.approx(first_batch_end)
    assert result.ttft_s[2] == pytest.approx(first_batch_end + result.prefill_s[1])
    assert result.tokens_per_s == pytest.approx(result.generated_tokens / result.busy_s)
    assert result.energy_source == "model" and result.energy_j == pytest.approx(replayer.power_w * result.busy_s)


def test_bad_settings_are_rejected(tiny_trace) -> None:
    with pytest.raises(ValueError, match=r"replay cannot price exit criterion 'probe'.*\['none', 'max_prob'"):
        Replayer(read_trace(tiny_trace)).run([0], Setting(3, ExitConfig("probe", 0.9, (1,)), 1))
    replayer = Replayer(read_trace(tiny_trace))
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        replayer.run([0], Setting(7))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        replayer.run([0], Setting(6, ExitConfig("max_prob", 1.5, (2,))))


def test_missing_truncated_foreign_and_old_traces_fail_clearly(tiny_trace, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="profile_traces.py"):
        read_trace(tmp_path / "nope.parquet")
    data = tiny_trace.read_bytes()
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated or foreign"):
        read_trace(truncated)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), foreign)
    with pytest.raises(TraceError, match="not a helios trace"):
        read_trace(foreign)
    old = tmp_path / "old.parquet"
    table = pq.read_table(tiny_trace)
    meta = json.loads(table.schema.metadata[b"helios.trace"])
    meta["version"] = SCHEMA_VERSION + 1
    pq.write_table(table.replace_schema_metadata({b"helios.trace": json.dumps(meta).encode()}), old)
    with pytest.raises(TraceError, match="version"):
        read_trace(old)


def test_failed_write_leaves_nothing_behind(tiny_trace, tmp_path, monkeypatch) -> None:
    trace = read_trace(tiny_trace)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", explode)
    with pytest.raises(OSError):
        write_trace(trace, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []
