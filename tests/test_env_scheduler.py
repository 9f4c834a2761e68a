"""The env's epochs as spans of one scheduler: no request is lost across switches under load (drain and recompute,
replay and live), the queue carries over between epochs, goodput and attainment match a hand count, resume rebuilds
the queue, and capacity-relative rates resolve through a cached capacity.

    python -m pytest -q tests/test_env_scheduler.py

Tiny random-init candidates, traces recorded into a temporary directory (about a minute on 2 shared cores).
"""

import math
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import envs  # noqa: F401  (registers the ids)
from gymnasium.utils.env_checker import data_equivalence

from helios.scheduler import RequestRecord
from helios.slo import RequestTargets, request_metrics
from helios.telemetry import span_metrics, span_request_metrics

EXITS = [{"criterion": "none"}, {"criterion": "cosine", "threshold": 0.5, "exit_fractions": [0.5]}]
SOURCE_OPTIONS = {"prose": {"prompt_chars": 120, "reference_chars": 60}}
OUTPUT_TOKENS = {"qa": {"dist": "uniform", "min_tokens": 2, "max_tokens": 8}, "prose": {"dist": "fixed", "tokens": 8}}
# Load 3x the capacity of tiny-llama@2 (the fastest arm) overloads every arm; 0.3x lets a backlog drain. Epochs of
# 0.5 s outlast a tiny model's load (tens of ms, measured when the trace is recorded), so switches apply inside them.
OVERLOAD = {
    "seed": 0, "episode_epochs": 6,
    "arrival": {"kind": "gamma", "cv": 1.0, "epoch_s": 0.5, "rate_x_capacity": 1.0, "capacity_of": "tiny-llama@2"},
    "output_tokens": OUTPUT_TOKENS, "source_options": SOURCE_OPTIONS,
    "phases": [{"epochs": 3, "load": 3.0, "mixture": {"qa": 0.5, "prose": 0.5}},
               {"epochs": 3, "load": 0.3, "mixture": {"qa": 1.0}}],
}
# 8 MiB: every arm fits and several sequences run at once, so a switch finds sequences in flight.
COMMON = {"candidates": "tiny", "memory_budget_mib": 8.0, "context_tokens": 512, "new_tokens": 4, "exits": EXITS,
          "slo": "goodput", "judge": "tiny-llama"}  # judge_score (the default) under a judge as fast as the candidates
SWITCHING = [0, 2, 6, 1, 8, 4]  # llama@2, llama@4, gemma@3, llama@2 exit, gemma@6, llama@6: every kind of change


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory, one_torch_thread):
    from helios.profiling import ensure_trace

    out = tmp_path_factory.mktemp("sched_traces")
    for name, depths in (("tiny-llama", [2, 4, 6]), ("tiny-gemma3", [3, 6])):
        ensure_trace(name, OVERLOAD, depths=depths, per_source=2, new_tokens=8, out_dir=out,
                     progress=False, calibration_runs=4)
    return out


def replay_env(trace_dir, **overrides):
    return gymnasium.make("helios/ModelDepthReplay-v0", **{**COMMON, "workload": OVERLOAD, "per_source": 2,
                          "variants": 2, "trace_dir": str(trace_dir), "build_traces": False, **overrides})


def collect_records(env, monkeypatch) -> list[list[RequestRecord]]:
    """Every epoch's finished records, as the backend summarised them (the env reports counts only)."""
    backend = env.unwrapped.backend
    spans: list[list[RequestRecord]] = []
    run_span = backend._run_span

    def recording(sched, requests, t_end, **kwargs):
        result = run_span(sched, requests, t_end, **kwargs)
        spans.append(list(result.records))
        return result

    monkeypatch.setattr(backend, "_run_span", recording)
    return spans


def check_conservation(env, actions, spans) -> list[dict]:
    """Steps `actions`; after each: submitted = finished + queued + running (and nothing rejected), by the env's
    counters and by the records' ids."""
    infos = []
    env.reset(seed=0)
    finished_ids: list = []
    for action in actions:
        *_, info = env.step(action)
        load = info["load"]
        finished_ids += [r.request_id for r in spans[-1]]
        assert load["episode_rejected"] == 0
        assert load["episode_submitted"] == load["episode_finished"] + load["queued"] + load["running"]
        assert load["episode_finished"] == len(finished_ids) == len(set(finished_ids))  # each finished once
        infos.append(info)
    return infos


# ----------------------------------------------------------------------------------------------- switching


@pytest.mark.parametrize("policy", ["drain", "recompute"])
def test_replay_switch_under_load_loses_no_request(trace_dir, monkeypatch, policy: str) -> None:
    env = replay_env(trace_dir, switch_policy=policy)
    spans = collect_records(env, monkeypatch)
    infos = check_conservation(env, SWITCHING, spans)
    # Under load: sequences were in flight when each later switch was asked for.
    assert all(info["load"]["running"] + info["load"]["queued"] > 0 for info in infos[:3])
    assert [info["switch"] for info in infos] == ["cold", "depth", "candidate", "candidate", "candidate", "candidate"]
    assert infos[3]["load"]["switch_policy"] == policy  # gemma -> llama: the same byte-level tokenizer
    recomputed = sum(info["load"]["recomputed"] for info in infos)
    assert (recomputed > 0) if policy == "recompute" else (recomputed == 0)
    recomputes = [r.recomputes for span in spans for r in span]
    assert (max(recomputes) > 0) == (policy == "recompute")
    env.close()


def test_exit_only_change_keeps_in_flight_sequences(trace_dir) -> None:
    env = replay_env(trace_dir, switch_policy="recompute")
    env.reset(seed=0)
    env.step(0)
    *_, info = env.step(1)  # llama@2, exits on: same weights
    assert info["switch"] == "exit" and info["load"]["switch_policy"] == "keep" and info["switch_s"] == 0.0
    assert info["load"]["recomputed"] == 0
    env.close()


def test_live_switch_under_load_loses_no_request(monkeypatch) -> None:
    """Live (measured clock) on tiny models: an absolute rate far above what they serve (tens of requests/s on a
    CPU); epochs of 0.25 s outlast a tiny model's load (~50 ms), so each switch can apply inside its epoch."""
    workload = {"seed": 0, "episode_epochs": 4, "arrival": {"kind": "poisson", "rate_per_s": 400.0, "epoch_s": 0.25},
                "output_tokens": OUTPUT_TOKENS, "source_options": SOURCE_OPTIONS,
                "phases": [{"epochs": 4, "mixture": {"qa": 0.5, "prose": 0.5}}]}
    for policy in ("drain", "recompute"):
        env = gymnasium.make("helios/ModelDepth-v0", **{**COMMON, "workload": workload, "switch_policy": policy})
        spans = collect_records(env, monkeypatch)
        infos = check_conservation(env, [0, 2, 6, 0], spans)
        # Overloaded: work is left in flight at some epoch's end (which one depends on measured step times).
        assert max(info["load"]["queued"] + info["load"]["running"] for info in infos) > 0
        # Each load is measured and charged to the epoch in which it happens: under recompute at the epoch's first
        # step boundary, under drain once the old arm's sequences finish. Either may fall after the epoch's end (a
        # step is atomic: on a loaded machine one measured prefill of the backlog can outlast a 0.25 s epoch); then
        # the epoch reports the switch as pending.
        assert infos[0]["switch_s"] > 0
        for info in infos[1:]:
            assert info["switch_s"] > 0 or info["load"]["switch_pending"]
        assert sum(info["switch_s"] > 0 for info in infos[1:]) >= 1
        recomputed = sum(info["load"]["recomputed"] for info in infos)
        assert (recomputed > 0) == (policy == "recompute")
        env.close()


# ----------------------------------------------------------------------------------------------- the queue


def test_queue_carries_over_between_epochs(trace_dir, monkeypatch) -> None:
    env = replay_env(trace_dir)
    spans = collect_records(env, monkeypatch)
    names = env.unwrapped.observation_names
    env.reset(seed=0)
    spans.clear()  # the reference run's spans (first reset)
    obs, _, _, _, first = env.step(8)  # gemma@6, the slowest arm, at 3x the fastest arm's capacity
    backlog = first["load"]["queued"] + first["load"]["running"]
    assert backlog > 0 and first["load"]["finished"] < first["load"]["submitted"]
    assert obs[names.index("queue_ratio")] == pytest.approx(
        min(16, first["load"]["queued"] / env.unwrapped.serving.reference_requests), rel=1e-6)
    assert obs[names.index("arrival_ratio")] > 1.0  # 3x the capacity unit, give or take the draw
    *_, second = env.step(0)  # the fastest arm now
    carried = [r for r in spans[1] if r.request_id[0] == 0]  # epoch 0's requests finished in epoch 1
    assert carried and all(r.arrival_s < 0.5 <= r.finished_s for r in carried), (first["load"], second["load"], [r.request_id for r in spans[1]][:5], len(spans))
    assert second["load"]["finished"] == len(spans[1])
    # The backlog grows while the load is 3x, and shrinks epoch by epoch in the light phase (0.3x).
    backlogs = [backlog, second["load"]["queued"] + second["load"]["running"]]
    for _ in range(4):
        *_, info = env.step(0)
        backlogs.append(info["load"]["queued"] + info["load"]["running"])
    assert backlogs[2] > backlogs[1] > backlogs[0] > 0
    assert backlogs[3] > backlogs[4] > backlogs[5]
    env.close()


def test_resume_rebuilds_the_queue(trace_dir) -> None:
    """state_dict mid-episode, then a fresh env restored from it continues exactly as the original does."""
    first, second = replay_env(trace_dir), replay_env(trace_dir)
    first.reset(seed=3)
    for action in (8, 6):
        first.step(action)
    state = first.unwrapped.state_dict()
    assert state["queued"] + state["running"] > 0  # there is a queue to restore
    ahead = [first.step(a) for a in (0, 2, 0)]
    second.reset(seed=3)
    second.unwrapped.load_state_dict(state)
    again = [second.step(a) for a in (0, 2, 0)]
    assert data_equivalence(ahead, again, exact=True)
    first.close()
    second.close()


# ----------------------------------------------------------------------------------------------- metrics


def record(rid, arrival_s, first_s, finished_s, tokens) -> RequestRecord:
    return RequestRecord(rid, arrival_s, arrival_s, first_s, finished_s, 0.0, first_s - arrival_s,
                         (finished_s - first_s) / (tokens - 1) if tokens > 1 else math.nan, finished_s - arrival_s,
                         4, tokens, (1,) * tokens, "length")


def test_goodput_and_attainment_by_hand() -> None:
    """Span [10, 20) s, targets TTFT <= 1 s and TPOT <= 0.1 s:
      a: ttft 0.5, tpot (15 - 10.5) / 9 = 0.5      finished in span -> missed (TPOT)
      b: ttft 0.5, tpot (12 - 11.5) / 10 = 0.05    finished in span -> met
      c: ttft 0.2, one token (no TPOT)             finished in span -> met
      d: ttft 3.0 (late), finished 16              deadline 13 in span -> missed
      e: finished at 9.5 (before the span)         ignored
      f: waiting since 18.5, no token              deadline 19.5 in span -> missed, unfinished
      g: waiting since 19.5                        deadline 20.5 after the span -> not judged yet
      h: running, ttft 0.4 (on time)               not judged until it finishes
    met 2, missed 3 -> attainment 0.4, goodput 2 / 10 s = 0.2 rps."""
    records = [record("a", 10.0, 10.5, 15.0, 10), record("b", 11.0, 11.5, 12.0, 11), record("c", 12.0, 12.2, 12.2, 1),
               record("d", 13.0 - 1.0, 15.0, 16.0, 5), record("e", 5.0, 6.0, 9.5, 4)]
    in_system = [{"arrival_s": 18.5, "ttft_s": None}, {"arrival_s": 19.5, "ttft_s": None},
                 {"arrival_s": 17.0, "ttft_s": 0.4}]
    values = span_metrics(records=records, in_system=in_system, span_start_s=10.0, span_end_s=20.0, busy_s=8.0,
                          output_tokens=40, energy_j=4.0, accuracy=0.5, targets=RequestTargets(1.0, 0.1))
    assert values["met_requests"] == 2 and values["missed_requests"] == 3
    assert values["missed_unfinished_requests"] == 1
    assert values["attainment"] == pytest.approx(0.4) and values["goodput_rps"] == pytest.approx(0.2)
    assert values["throughput_tok_s"] == 5.0 and values["energy_j_per_tok"] == 0.1
    # e2e of a, b, c, d (5, 1, 0.2, 4) and ages 1.5, 0.5, 3: sorted 0.2 0.5 1 1.5 3 4 5 -> p95 at 5.7 = 4.7.
    assert values["latency_p95_s"] == pytest.approx(4.7)
    # A rejected request counts as missed: 2 met of 6.
    rejected = span_metrics(records=records, in_system=in_system, span_start_s=10.0, span_end_s=20.0, busy_s=8.0,
                            output_tokens=40, energy_j=4.0, accuracy=0.5, targets=RequestTargets(1.0, 0.1), rejected=1)
    assert rejected["attainment"] == pytest.approx(2 / 6)


def test_scheduler_records_read_like_plain_mappings() -> None:
    """The env hands helios.slo.request_metrics the scheduler's RequestRecords (tpot_s NaN for a single-token
    output); on random spans they must give the numbers of plain mappings that spell 'no TPOT' as None, the rule
    request_metrics documents (a single-token output meets the TPOT target)."""
    rng = np.random.default_rng(0)
    targets = RequestTargets(1.0, 0.05)
    single_token = 0
    for _ in range(50):
        start, end = 10.0, 10.0 + float(rng.uniform(1, 20))
        records, mappings, in_system = [], [], []
        for k in range(int(rng.integers(0, 40))):
            arrival = float(rng.uniform(0, end))
            first = arrival + float(rng.exponential(0.8))
            tokens = int(rng.integers(1, 20))
            finished = first + tokens * float(rng.exponential(0.05))
            if finished < end:
                r = record(k, arrival, first, finished, tokens)
                records.append(r)
                mappings.append({"arrival_s": r.arrival_s, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s,
                                 "tpot_s": None if tokens == 1 else r.tpot_s, "output_tokens": tokens})
            else:
                in_system.append({"arrival_s": arrival, "ttft_s": first - arrival if first < end else None})
        ours = span_request_metrics(records, in_system, start, end, targets)
        theirs = request_metrics([*mappings, *in_system], end - start, targets, span_start_s=start)
        assert ours == pytest.approx(theirs)
        single_token += sum(r.output_tokens == 1 for r in records)
    assert single_token > 0  # the NaN-TPOT reading was exercised


def test_metrics_in_info_match_the_records(trace_dir, monkeypatch) -> None:
    """info['metrics'] goodput and attainment, recounted from the epoch's records and backlog by hand."""
    env = replay_env(trace_dir)
    spans = collect_records(env, monkeypatch)
    slo = env.unwrapped.slo
    env.reset(seed=0)
    *_, info = env.step(2)
    records, load = spans[-1], info["load"]
    start, end = 0.0, info["load"]["span_s"]
    good = [r for r in records if r.ttft_s <= slo.ttft_target_s and (r.output_tokens == 1 or r.tpot_s <= slo.tpot_target_s)]
    late_finished = [r for r in records if r.ttft_s > slo.ttft_target_s and r.arrival_s + slo.ttft_target_s < end]
    slow = [r for r in records if r.ttft_s <= slo.ttft_target_s and r.output_tokens > 1 and r.tpot_s > slo.tpot_target_s]
    # The backlog: nothing waited a full second in a 0.5 s epoch, so no unfinished request is judged yet.
    assert load["queued"] + load["running"] > 0 and end < slo.ttft_target_s
    assert info["metrics"]["met_requests"] == len(good)
    assert info["metrics"]["missed_requests"] == len(late_finished) + len(slow)
    assert info["metrics"]["goodput_rps"] == pytest.approx(len(good) / (end - start))
    judged = len(good) + len(late_finished) + len(slow)
    assert info["metrics"]["attainment"] == pytest.approx(len(good) / judged if judged else 1.0)
    tokens = sum(r.output_tokens for r in records)
    assert info["tokens"] >= tokens  # plus tokens of the unfinished
    env.close()


# ----------------------------------------------------------------------------------------------- capacity


def test_capacity_is_measured_once_and_cached(trace_dir) -> None:
    first = replay_env(trace_dir)
    capacity = first.unwrapped.capacity
    assert capacity is not None and capacity["capacity_rps"] > 0 and capacity["key"]["arm"] == "tiny-llama@2"
    workload = first.unwrapped.serving.workload
    # Rates are load x rate_x_capacity x the measured capacity.
    assert [workload.rate_at(e) for e in range(6)] == pytest.approx([3.0 * capacity["capacity_rps"]] * 3
                                                                    + [0.3 * capacity["capacity_rps"]] * 3)
    second = replay_env(trace_dir)
    assert second.unwrapped.capacity["cached"] and second.unwrapped.capacity["capacity_rps"] == capacity["capacity_rps"]
    assert second.unwrapped.capacity["path"].startswith(str(trace_dir))
    first.close()
    second.close()


def test_live_reference_run_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    """Live's reference run is a measurement of this machine, like capacity: the first env measures and caches it,
    an env with the same configuration reads it back without serving, and one that changes what it depends on
    (here new_tokens) measures its own."""
    import envs.capacity

    monkeypatch.setattr(envs.capacity, "cache_dir", lambda: tmp_path)
    workload = {"seed": 0, "episode_epochs": 2, "arrival": {"kind": "poisson", "rate_per_s": 16.0, "epoch_s": 0.25},
                "output_tokens": OUTPUT_TOKENS, "source_options": SOURCE_OPTIONS,
                "phases": [{"epochs": 2, "mixture": {"qa": 0.5, "prose": 0.5}}]}
    first = gymnasium.make("helios/ModelDepth-v0", **{**COMMON, "workload": workload})
    _, info = first.reset(seed=0)
    record = first.unwrapped.reference_record
    assert not record["cached"] and Path(record["path"]).parent == tmp_path / "reference"
    assert set(record["profile"]) == {"qa", "prose"} and record["key"]["reference_requests"] == 4

    second = gymnasium.make("helios/ModelDepth-v0", **{**COMMON, "workload": workload})
    monkeypatch.setattr(second.unwrapped.backend, "reference_profile",
                        lambda *a, **k: pytest.fail("a cached reference run was measured again"))
    _, info_second = second.reset(seed=0)
    assert second.unwrapped.reference_record["cached"]
    assert info_second["reference"] == info["reference"]  # the same normalisation, read back exactly

    third = gymnasium.make("helios/ModelDepth-v0", **{**COMMON, "workload": workload, "new_tokens": 3})
    third.reset(seed=0)
    assert not third.unwrapped.reference_record["cached"]
    assert len(list((tmp_path / "reference").glob("*.json"))) == 2
    for env in (first, second, third):
        env.close()


def test_replay_warns_once_when_it_prices_batches_larger_than_its_calibration(trace_dir, tmp_path) -> None:
    """Under 3x overload several sequences run at once; a trace calibrated on single sequences must say that its
    cost model extrapolates (once per candidate), and one calibrated on larger batches than any epoch runs must stay
    quiet."""
    import dataclasses
    import warnings

    from helios.traces import read_trace, write_trace

    paths = replay_env(trace_dir).unwrapped.backend.trace_paths

    def episode_with(calibration_max_batch: int) -> tuple[list[str], int]:
        traces = {}
        for name, path in paths.items():
            trace = read_trace(path)
            if name == "tiny-llama":
                cost = {**trace.meta["cost_model"], "calibration_max_batch": calibration_max_batch}
                trace = dataclasses.replace(trace, meta={**trace.meta, "cost_model": cost})
            traces[name] = write_trace(trace, tmp_path / f"{name}-{calibration_max_batch}.parquet")
        most = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            env = replay_env(trace_dir, traces=traces)
            env.reset(seed=0)
            for _ in range(6):
                most = max(most, env.step(2)[4]["load"]["max_running"])  # tiny-llama@4, exits off
        env.close()
        return [str(w.message) for w in caught if "replay of tiny-llama" in str(w.message)], most

    caught, most = episode_with(1)
    assert most > 2 and len(caught) == 1, (most, caught)  # beyond twice the calibrated batch
    assert "calibrated on batches of at most 1:" in caught[0]
    assert episode_with(1000)[0] == []


def test_capacity_of_an_unknown_candidate_is_a_clear_error(trace_dir) -> None:
    bad = {**OVERLOAD, "arrival": {**OVERLOAD["arrival"], "capacity_of": "smollm2-135m@30"}}
    with pytest.raises(ValueError, match=r"replay can only measure a candidate it has a trace of: \['tiny-llama'"):
        replay_env(trace_dir, workload=bad, traces=None, build_traces=False)


def test_bad_switch_policy_names_the_valid_ones(trace_dir) -> None:
    with pytest.raises(ValueError, match=r"switch_policy must be one of \['drain', 'recompute'\]"):
        replay_env(trace_dir, switch_policy="keep")


def test_replay_variants_are_draws_of_the_workload(trace_dir) -> None:
    """Variant k replays the workload's draw k (its arrival times and lengths), so training episodes differ;
    variant 0 is the draw live serves (Workload.epoch(e)); reset(options={"variant": k}) picks one."""
    env = replay_env(trace_dir)
    backend = env.unwrapped.backend
    workload = backend.spec.workload

    def arrivals(variant: int, epoch: int) -> list[float]:
        env.reset(seed=0, options={"variant": variant})
        return [r.arrival_s for r in backend._requests(epoch, 0.0)]

    for epoch in range(3):
        assert arrivals(0, epoch) == pytest.approx([r.arrival_s for r in workload.epoch(epoch)])
        assert arrivals(1, epoch) == pytest.approx([r.arrival_s for r in workload.epoch(epoch, draw=1)])
    assert arrivals(0, 0) != arrivals(1, 0)
    with pytest.raises(ValueError, match="outside 0..1"):
        env.reset(seed=0, options={"variant": 2})
    env.close()


def test_an_idle_epoch_reports_the_same_metrics_as_a_served_one(trace_dir) -> None:
    """An epoch without arrivals and nothing in flight scores neutral (the reference's metrics), and its
    info["metrics"] carries every key a served epoch's does (request counts at 0), so per-run means over epochs
    (agents.rollout.summarise) find every metric in every epoch."""
    quiet_first = {**OVERLOAD, "phases": [{"epochs": 1, "load": 0.0, "mixture": {"qa": 0.5, "prose": 0.5}},
                                          *OVERLOAD["phases"][:1], {"epochs": 2, "load": 0.3, "mixture": {"qa": 1.0}}]}
    quiet_first["episode_epochs"] = 6
    env = replay_env(trace_dir, workload=quiet_first)
    env.reset(seed=0)
    _, reward, _, _, idle = env.step(0)
    assert idle["load"]["submitted"] == 0 and reward == 0.0
    assert idle["metrics"]["met_requests"] == idle["metrics"]["missed_requests"] == 0
    _, _, _, _, served = env.step(0)
    assert served["load"]["submitted"] > 0
    assert set(idle["metrics"]) == set(served["metrics"])
    env.close()


# ----------------------------------------------------------------------------------------------- the ladder's plays


def test_open_loop_rungs_serve_each_replayed_draw_once_and_match_playing_every_episode(trace_dir, monkeypatch) -> None:
    """The ladder's rungs (a fixed arm, a phase schedule) act on the epoch alone, and replay is deterministic given
    the draw: play_policy serves each variant once and copies its records to later episodes on that variant. Every
    record equals the one `play` gets by serving all 7 episodes (2 variants), and the backend serves 2 x 6 epochs,
    not 7 x 6."""
    from agents.rollout import Rollout, play
    from agents.yardsticks import FixedArm, PhaseSchedule, play_policy

    env = replay_env(trace_dir)
    phases = [env.unwrapped.serving.workload.phase_at(e) for e in range(6)]
    for policy in (FixedArm(2), PhaseSchedule({phases[0]: 8, phases[-1]: 0}, phases)):
        reference = Rollout(env, seed=3, yardsticks=False)
        if hasattr(policy, "bind"):
            policy.bind(reference)
        play(reference, policy, 7 * 6)
        served = []
        serve = env.unwrapped.backend.serve
        monkeypatch.setattr(env.unwrapped.backend, "serve", lambda epoch, arm: served.append(epoch) or serve(epoch, arm))
        run = play_policy(env, 3, 7, policy, "rung")
        monkeypatch.undo()
        assert len({r["episode"] for r in reference.records}) == 7 and len(served) == 2 * 6
        assert [(r["epoch"], r["episode"], r["action"], r["reward"], r["metrics"]) for r in run.records] == \
            [(r["epoch"], r["episode"], r["action"], r["reward"], r["metrics"]) for r in reference.records]
    env.close()


# ----------------------------------------------------------------------------------------------- planning


def test_simulate_equals_stepping_and_leaves_the_episode_as_it_was(trace_dir) -> None:
    """ModelDepthEnv.simulate on the episode's own draw gives the rewards that stepping the same arms gives, from a
    queue built under overload, switches included; afterwards the episode continues exactly as an untouched twin
    does. Nested planning forks the fork."""
    planned, twin = replay_env(trace_dir), replay_env(trace_dir)
    for env in (planned, twin):
        env.reset(seed=0, options={"variant": 1})
        for action in (8, 6):
            env.step(action)
    base = planned.unwrapped
    assert base.state_dict()["queued"] + base.state_dict()["running"] > 0  # there is a queue to fork
    plan = [0, 2, 1]  # depth changes (drain) and an exit-only change
    simulated = base.simulate(plan, variant=1)
    with base.planning(1):
        first = base.step(plan[0])[1]
        rest = base.simulate(plan[1:], variant=1)
        assert base.epoch == 3
    assert base.epoch == 2
    stepped = [twin.step(a)[1] for a in plan]
    assert simulated.tolist() == stepped
    assert [first, *rest.tolist()] == stepped
    continued = [planned.step(a) for a in plan]
    assert [r[1] for r in continued] == stepped
    assert continued[-1][4]["load"] == twin.unwrapped._last["load"]
    assert base.simulate([0] * 10, variant=1).size == 6 - 5  # stops at the episode's end
    for env in (planned, twin):
        env.close()


def test_simulate_plays_the_other_draw_arrivals(trace_dir) -> None:
    """From the start of an episode on draw 0, simulating on draw 1 is a fresh episode on draw 1."""
    env, other = replay_env(trace_dir), replay_env(trace_dir)
    env.reset(seed=0, options={"variant": 0})
    simulated = env.unwrapped.simulate([8, 0, 2], variant=1)
    other.reset(seed=0, options={"variant": 1})
    assert simulated.tolist() == [other.step(a)[1] for a in (8, 0, 2)]
    assert env.unwrapped.simulate([8, 0, 2], variant=0).tolist() != simulated.tolist()
    with pytest.raises(ValueError, match="outside 0..1"):
        env.unwrapped.simulate([0], variant=2)
    env.close()
    other.close()


def test_mpc_plays_an_episode_through_the_replay_env(trace_dir, monkeypatch) -> None:
    """agents/mpc.py bound to the replay env: a whole episode, planned on the other draw only, the episode's records
    unchanged by planning (its rewards are what stepping its own actions gives)."""
    from agents import make_agent

    env, twin = replay_env(trace_dir), replay_env(trace_dir)
    agent = make_agent("mpc", int(env.action_space.n), seed=0, draws=1, hold_epochs=(1, 2), horizon_epochs=3)
    agent.bind(env)
    backend = env.unwrapped.backend
    drawn = []
    planning = backend.planning
    monkeypatch.setattr(backend, "planning", lambda variant: drawn.append(variant) or planning(variant))
    obs, _ = env.reset(seed=0, options={"variant": 0})
    actions, rewards = [], []
    for _ in range(6):
        actions.append(agent.select(obs, env.unwrapped.action_masks()))
        obs, reward, *_ = env.step(actions[-1])
        rewards.append(reward)
    assert set(drawn) == {1}
    twin.reset(seed=0, options={"variant": 0})
    assert [twin.step(a)[1] for a in actions] == rewards
    env.close()
    twin.close()


def test_agent_bench_scores_a_planner_on_its_evaluation_episodes_alone(trace_dir, monkeypatch) -> None:
    """benchmarks/agent_bench.py gives a planner (learns nothing) the evaluation episodes only: its records start
    after the training episodes, and its gap and regret are the rungs' on exactly those epochs, by hand."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import agent_bench
    from agents.yardsticks import compute_ladder

    monkeypatch.setattr(agent_bench, "agent_config", lambda name: {"draws": 1, "hold_epochs": [1], "horizon_epochs": 2})
    env = replay_env(trace_dir)
    ladder = compute_ladder(env, 0, 3)
    records = agent_bench.run_agent(env, "mpc", 0, episodes=2, eval_episodes=1, per_epoch=False)
    assert [r["epoch"] for r in records] == list(range(12, 18))
    scores = agent_bench.score_run(records, ladder, eval_episodes=1)
    agent = np.array([r["reward"] for r in records])
    best, oracle = ladder.best_fixed.rewards[12:], ladder.phase_oracle.rewards[12:]
    assert scores["regret"] == pytest.approx(float((oracle - agent).sum()))
    if oracle.mean() - best.mean() > math.log2(1.01):
        assert scores["gap_recovered"] == pytest.approx((agent.mean() - best.mean()) / (oracle.mean() - best.mean()))
    else:
        assert scores["gap_recovered"] is None
    assert scores["gap_recovered_learning"] is None  # nothing was learned
    env.close()
