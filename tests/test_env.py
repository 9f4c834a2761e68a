"""The ModelDepth environment: conformance (gymnasium's and stable-baselines3's checkers, vector envs, seeding,
close) over every registered helios id, plus arms, masks, budget -> batch size, switching, drift and bad input.

Every test runs on the tiny random-init candidates with traces recorded into a temporary directory, so the whole
file takes well under a minute; `test_default_replay_env` uses the real default when its traces are cached.
"""

import inspect
import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.envs.registration import registry
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from helios.arms import MemoryBudget
from helios.costmodel import CalibrationContentionWarning
from helios.telemetry import EpochOutcome, SwitchCost, epoch_metrics, latency_p95_s
from envs.model_depth import COMMON_KEYS, REPLAY_KEYS, MaskedActionError, ModelDepthEnv, env_config

ENV_IDS = sorted(env_id for env_id in registry if env_id.startswith("helios/"))
WORKLOAD = {
    "seed": 0, "episode_epochs": 4, "arrival": {"kind": "closed", "batch_size": 3},
    "phases": [{"epochs": 2, "mixture": {"qa": 1.0}}, {"epochs": 2, "mixture": {"prose": 1.0}}],
    "source_options": {"prose": {"prompt_chars": 120, "reference_chars": 60}},
}
PER_SOURCE, NEW_TOKENS = 2, 4
MIB = 2**20
# 1.5 MiB with 512-token K/V reservations: tiny-llama at full depth (0.91 MiB of weights + 0.75 MiB of K/V per
# sequence) does not fit, so two of the ten arms are masked.
COMMON = {
    "candidates": "tiny", "workload": WORKLOAD, "memory_budget_mib": 1.5, "context_tokens": 512,
    "new_tokens": NEW_TOKENS,
    "judge": "tiny-llama",  # the default metric, judge_score, under a judge as fast as the candidates
    "exits": [{"criterion": "none"}, {"criterion": "cosine", "threshold": 0.5, "exit_fractions": [0.5]}],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory, one_torch_thread):
    """Tiny traces recorded once, where the replay env looks for them (same key: workload, pool, tokens)."""
    from helios.profiling import ensure_trace

    out = tmp_path_factory.mktemp("env_traces")
    for name, depths in (("tiny-llama", [2, 4, 6]), ("tiny-gemma3", [3, 6])):
        ensure_trace(name, WORKLOAD, depths=depths, per_source=PER_SOURCE, new_tokens=NEW_TOKENS, out_dir=out,
                     progress=False, calibration_runs=4)
    return out


def kwargs_for(env_id: str, trace_dir) -> dict:
    if env_id == envs.ENV_IDS["live"]:
        return dict(COMMON)
    return {**COMMON, "per_source": PER_SOURCE, "variants": 2, "trace_dir": str(trace_dir), "build_traces": False}


@pytest.fixture
def make_env(trace_dir):
    made = []

    def make(env_id: str = envs.ENV_IDS["replay"], **overrides):
        env = gymnasium.make(env_id, **{**kwargs_for(env_id, trace_dir), **overrides})
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


# ----------------------------------------------------------------------------------------------- registration


def test_both_ids_are_registered_on_import() -> None:
    assert ENV_IDS == sorted(envs.ENV_IDS.values())
    assert registry["helios/ModelDepth-v0"].nondeterministic is True
    assert registry["helios/ModelDepthReplay-v0"].nondeterministic is False
    assert {registry[i].kwargs["backend"] for i in ENV_IDS} == {"live", "replay"}


def test_module_prefixed_id(trace_dir) -> None:
    env = gymnasium.make("envs:helios/ModelDepthReplay-v0", **kwargs_for("helios/ModelDepthReplay-v0", trace_dir))
    assert isinstance(env.unwrapped, ModelDepthEnv)
    env.close()


def test_env_yaml_keys_are_constructor_arguments() -> None:
    params = set(inspect.signature(ModelDepthEnv).parameters)
    assert set(env_config("replay")) == set(COMMON_KEYS + REPLAY_KEYS) <= params
    assert set(env_config("live")) == set(COMMON_KEYS)


# ----------------------------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env(make_env, env_id: str) -> None:
    env = make_env(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # About the machine the fixture's traces were recorded on (its load then), not the env's conformance.
        warnings.simplefilter("ignore", CalibrationContentionWarning)
        gymnasium_check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []  # not even a warning


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env(make_env, env_id: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", CalibrationContentionWarning)
        sb3_check_env(make_env(env_id).unwrapped, warn=True)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_vec_sync(trace_dir, env_id: str) -> None:
    vec = gymnasium.make_vec(env_id, num_envs=2, vectorization_mode="sync", **kwargs_for(env_id, trace_dir))
    obs, info = vec.reset(seed=0)
    assert obs.shape == (2, *vec.single_observation_space.shape) and info["action_mask"].shape == (2, 10)
    for _ in range(WORKLOAD["episode_epochs"] + 1):  # past the end: next-step autoreset
        obs, reward, terminated, truncated, info = vec.step(np.array([0, 6]))
        assert obs.shape[0] == 2 and reward.shape == (2,) and np.isfinite(reward).all()
    vec.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_close_twice(make_env, env_id: str) -> None:
    env = make_env(env_id)
    env.reset(seed=0)
    env.close()
    env.close()


def test_same_seed_same_replay_trajectory(make_env) -> None:
    def rollout(env, seed):
        obs, info = env.reset(seed=seed)
        trajectory = [(obs, info)]
        for action in [0, 1, 2, 6, 8, 6]:
            obs, reward, terminated, _, info = env.step(action)
            trajectory.append((obs, reward, info))
            if terminated:
                obs, info = env.reset()
                trajectory.append((obs, info))
        return trajectory

    first, second = make_env(), make_env()
    a, b, c = rollout(first, 7), rollout(second, 7), rollout(first, 7)
    assert gymnasium.utils.env_checker.data_equivalence(a, b, exact=True)
    assert gymnasium.utils.env_checker.data_equivalence(a, c, exact=True)


# ----------------------------------------------------------------------------------------------- behaviour


def test_arm_table_batch_sizes_follow_the_budget(make_env) -> None:
    env = make_env()
    table = env.unwrapped.arm_table
    assert [(a["candidate"], a["depth"], a["exit"]) for a in table] == [
        (c, d, e) for c, ds in (("tiny-llama", (2, 4, 6)), ("tiny-gemma3", (3, 6))) for d in ds
        for e in ("none", "cosine>=0.5@0.5")
    ]
    for arm in table:
        expected = max(0, min(64, (int(1.5 * MIB) - arm["weight_bytes"]) // arm["kv_bytes_per_seq"]))
        assert arm["batch_size"] == expected and arm["feasible"] == (expected >= 1)
    by_depth = {(a["candidate"], a["depth"]): a["batch_size"] for a in table}
    assert by_depth[("tiny-llama", 2)] == 4 > by_depth[("tiny-llama", 4)] == 1 > by_depth[("tiny-llama", 6)] == 0
    np.testing.assert_array_equal(env.unwrapped.action_masks(), [a["feasible"] for a in table])
    _, info = env.reset(seed=0)
    np.testing.assert_array_equal(info["action_mask"], env.unwrapped.action_masks())
    _, _, _, _, info = env.step(0)
    assert info["batch_size"] == 4
    # Weights alone over the budget: masked too.
    small = make_env(memory_budget_mib=0.8)
    assert not any(a["feasible"] for a in small.unwrapped.arm_table if a["weight_bytes"] > 0.8 * MIB)
    assert MemoryBudget(100, 1, 8).batch_size(101, 1) == 0 and MemoryBudget(100, 1, 8).batch_size(40, 20) == 3
    assert MemoryBudget(10**9, 1, 8).batch_size(0, 1) == 8


def test_reward_components_and_observation(make_env) -> None:
    env = make_env()
    unwrapped: ModelDepthEnv = env.unwrapped
    obs, info = env.reset(seed=1)
    names = unwrapped.observation_names
    assert obs.shape == (len(names),) and obs in env.observation_space
    assert obs[names.index("mix_qa")] == 1.0 and obs[names.index("queue_ratio")] == 1.0
    for action in (0, 6, 6, 1):
        obs, reward, terminated, truncated, info = env.step(action)
        recomputed = unwrapped.slo.evaluate(info["metrics"], info["reference"])
        components = sum(info["reward_terms"].values()) - sum(info["penalties"].values())
        assert reward == recomputed.total == pytest.approx(components)
        assert info["scores"] == recomputed.scores
        o = dict(zip(names, obs))
        assert sum(obs[: unwrapped.serving.histogram_bins]) == pytest.approx(1.0)
        assert o["throughput_ratio"] == pytest.approx(
            min(16, info["metrics"]["throughput_tok_s"] / info["reference"]["throughput_tok_s"]), rel=1e-6)
        arm = unwrapped.arm_table[action]
        assert o[f"arm_{arm['candidate']}"] == 1.0 and o["arm_depth_fraction"] == pytest.approx(arm["depth"] / 6)
    assert terminated and not truncated and o["episode_progress"] == 1.0


def test_drift_plays_inside_an_episode(make_env) -> None:
    env = make_env()
    names = env.unwrapped.observation_names
    obs, info = env.reset(seed=0)
    phases, references, mixes = [], [], [obs[names.index("mix_prose")]]
    terminated = False
    while not terminated:
        obs, _, terminated, _, info = env.step(2)
        phases.append(info["phase"])
        references.append(info["reference"])
        mixes.append(obs[names.index("mix_prose")])
    assert phases == [0, 0, 1, 1] and len(phases) == WORKLOAD["episode_epochs"]
    # The reference follows the mix. Its accuracy is replay's paired one (the reference arm on each epoch's own
    # requests), which judge_score tells apart request by request, so it is compared apart from the mix's metrics.
    mixed = [{k: v for k, v in r.items() if k != "accuracy"} for r in references]
    assert mixed[0] == mixed[1] != mixed[2] == mixed[3]
    assert all(0.0 < r["accuracy"] <= 1.0 for r in references)
    assert mixes == [0.0, 0.0, 1.0, 1.0, 0.0]  # the queue of the next epoch; nothing after the last


def test_switch_costs(make_env) -> None:
    env = make_env()
    backend = env.unwrapped.backend
    arms = env.unwrapped.arms
    env.reset(seed=0)
    kinds, seconds = [], []
    for action in (0, 0, 1, 2):  # cold load; same arm; exit setting only; deeper
        *_, info = env.step(action)
        kinds.append(info["switch"])
        seconds.append(info["switch_s"])
    assert kinds == ["cold", "none", "exit", "depth"]
    assert seconds[1] == seconds[2] == 0.0
    assert seconds[0] == pytest.approx(backend.load_s_per_byte["tiny-llama"] * arms[0].weight_bytes)
    assert seconds[3] == pytest.approx(backend.load_s_per_byte["tiny-llama"] * arms[2].weight_bytes)
    assert seconds[3] > seconds[0]  # more layers, more bytes to load
    assert "trace meta" in backend.switch_cost_source
    env.reset(seed=0)
    *_, info = env.step(6)
    *_, info = env.step(0)
    assert info["switch"] == "candidate"


def test_switch_costs_of_a_trace_without_load_timings(trace_dir, tmp_path) -> None:
    """Traces recorded before load timings existed: measured once at construction, with a warning."""
    from helios.profiling import trace_path
    from helios.traces import read_trace, write_trace

    traces = {}
    for name in ("tiny-llama", "tiny-gemma3"):
        trace = read_trace(trace_path(name, WORKLOAD, PER_SOURCE, NEW_TOKENS, trace_dir))
        del trace.meta["load_timings"]
        traces[name] = write_trace(trace, tmp_path / f"{name}.parquet")
    with pytest.warns(UserWarning, match="predate recorded load timings"):
        env = gymnasium.make("helios/ModelDepthReplay-v0", **COMMON, traces=traces)
    backend = env.unwrapped.backend
    assert "measured at construction" in backend.switch_cost_source and backend.load_s_per_byte["tiny-llama"] > 0
    env.close()


def test_epoch_metrics_and_latency_by_hand() -> None:
    outcome = EpochOutcome(requests=4, tokens=100, busy_s=2.0, latency_p95_s=1.5, energy_j=10.0, accuracy=0.25,
                           histogram=np.zeros(8, np.float32), batches=2)
    assert epoch_metrics(outcome, SwitchCost("depth", 0.5, 1.0)) == {
        "throughput_tok_s": 40.0, "latency_p95_s": 2.0, "energy_j_per_tok": 0.11, "accuracy": 0.25}
    # Arrivals 0, 0, 1, 5 in batches of 2 taking 2 s and 1 s: ends at 2 and max(2, 5) + 1 = 6 -> latencies
    # 2, 2, 5, 1 -> p95 (linear) = 2 + 0.85 x (5 - 2) = 4.55.
    assert latency_p95_s([0.0, 0.0, 1.0, 5.0], 2, [2.0, 1.0]) == pytest.approx(4.55)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_bad_actions(make_env, env_id: str) -> None:
    env = make_env(env_id)
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step(0)
    env.reset(seed=0)
    for action in (-1, 10, 2.0, "0", True, np.array([1, 2])):
        with pytest.raises(ValueError, match="action"):
            env.step(action)
    masked = int(np.flatnonzero(~env.unwrapped.action_masks())[0])
    obs, reward, _, _, info = env.step(masked)  # default: a documented penalty, nothing served
    assert reward == -20.0 and info["masked_action"] and info["penalties"] == {"masked_action": 20.0}
    assert info["requests"] == 0 and not obs[: env.unwrapped.serving.histogram_bins + 5].any()
    _, _, _, _, info = env.step(np.int64(0))  # the refused arm was never loaded: this is still the cold load
    assert info["switch"] == "cold"


def test_masked_action_can_raise(make_env) -> None:
    env = make_env(on_masked_action="raise")
    env.reset(seed=0)
    with pytest.raises(MaskedActionError, match="does not fit the memory budget"):
        env.step(int(np.flatnonzero(~env.unwrapped.action_masks())[0]))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model or records a trace."""
    import helios.models
    import helios.profiling

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded / a trace recorded before the bad input was reported")

    monkeypatch.setattr(helios.models, "load_candidate", forbidden)
    monkeypatch.setattr(helios.profiling, "ensure_trace", forbidden)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"slo": {"weights": {"throughput_tok_s": -1.0, "accuracy": 1.0}}}, ValueError, "must be >= 0"),
        ({"slo": {"weights": {"throughput_tok_s": 0.0}}}, ValueError, "all zero"),
        ({"slo": {"weights": {"accuracy": 1.0}, "constraints": [{"metric": "p99", "max": 1}]}}, ValueError, "metric 'p99'"),
        ({"slo": "fastest"}, ValueError, "no slo config named 'fastest'"),
        ({"candidates": [{"name": "tiny-lama", "depths": [2]}]}, ValueError, "unknown candidate 'tiny-lama'"),
        ({"candidates": [{"name": "tiny-llama", "depths": [2, 9]}]}, ValueError, r"depths \[9\]"),
        ({"reference": "tiny-gemma"}, ValueError, "reference 'tiny-gemma'"),
        ({"exits": [{"criterion": "entropy"}]}, ValueError, "criterion"),
        # Traces hold no probe signal: refused up front, naming what replay can price (was a KeyError later).
        ({"exits": [{"criterion": "probe", "threshold": 0.9, "exit_fractions": [0.5]}]}, ValueError,
         r"replay cannot price exit criterion 'probe'.*valid replay criteria"),
        ({"exits": [{"criterion": "max_prob", "threshold": 0.9, "exit_fractions": [1.5]}]}, ValueError, "exit_fractions"),
        ({"memory_budget_mib": 0}, ValueError, "memory_budget_mib"),
        ({"memory_budget_mib": 0.01}, ValueError, "fits no arm"),
        ({"accuracy_metric": "bleu"}, ValueError,
         r"accuracy_metric must be one of \['exact_match', 'contains_answer', 'rouge_l', 'judge_score'\]; got 'bleu'"),
        ({"accuracy_metric": "perplexity"}, ValueError, "accuracy_metric must be one of"),  # needs inputs the env lacks
        ({"judge": "smollm-135m"}, ValueError,
         r"judge must be a candidate name, one of \[.*'smollm2-135m'.*got 'smollm-135m'"),
        ({"on_masked_action": "ignore"}, ValueError, "on_masked_action"),
        ({"traces": {"tiny-llama": "/nonexistent/a.parquet", "tiny-gemma3": "/nonexistent/b.parquet"}},
         FileNotFoundError, "not found"),
        ({"trace_dir": "/nonexistent/traces"}, FileNotFoundError, "build_traces=False"),
    ],
)
def test_bad_config_fails_before_any_model_loads(trace_dir, no_model_loads, overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        gymnasium.make("helios/ModelDepthReplay-v0", **{**kwargs_for("helios/ModelDepthReplay-v0", trace_dir), **overrides})


def test_bad_backend_arguments(no_model_loads) -> None:
    with pytest.raises(ValueError, match="replay backend only"):
        gymnasium.make("helios/ModelDepth-v0", **COMMON, trace_dir="/tmp")
    with pytest.raises(ValueError, match="unknown backend"):
        ModelDepthEnv("simulated")


# ----------------------------------------------------------------------------------------------- the real default


def test_default_replay_env() -> None:
    """gymnasium.make with no arguments: the real default (SmolLM2 at 10/20/30 x 2 exit settings, the live arm table),
    when its trace is cached; every arm fits the 1 GiB budget."""
    from envs.model_depth import _group
    from helios.profiling import trace_path

    cfg = env_config("replay")
    workload = _group("workload", cfg["workload"])
    missing = [c["name"] for c in cfg["candidates"]
               if not trace_path(c["name"], workload, cfg["per_source"], cfg["new_tokens"]).exists()]
    if missing:
        pytest.skip(f"default traces of {missing} not recorded yet (python -m envs.model_depth records them once)")
    env = gymnasium.make("helios/ModelDepthReplay-v0")
    obs, info = env.reset(seed=0)
    assert env.action_space.n == 6 and info["action_mask"].all() and obs in env.observation_space
    total = 0.0
    for epoch in range(env.unwrapped.episode_epochs):
        obs, reward, terminated, _, info = env.step(int(np.flatnonzero(info["action_mask"])[epoch % 3]))
        total += reward
    assert terminated and math.isfinite(total)
    env.close()
