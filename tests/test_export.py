"""scripts/export.py and helios.policy: JSON round trip of bandits, ONNX vs the torch policy of SB3 agents.

    python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from agents import make_agent
from helios.policy import SCHEMA, BanditPolicy, OnnxPolicy, PolicyFormatError, load_policy

ROOT = Path(__file__).resolve().parents[1]
N_ARMS, N_OBS = 5, 7


def export_module():
    spec = importlib.util.spec_from_file_location("helios_export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def arm_table(n: int = N_ARMS) -> list[dict]:
    return [{"index": i, "label": f"tiny-llama@{i + 2}/6 exit=none", "candidate": "tiny-llama", "depth": i + 2,
             "num_layers": 6, "exit": "none", "criterion": "none", "threshold": 0.9, "exit_points": [],
             "weight_bytes": 1, "kv_bytes_per_seq": 1, "batch_size": 4, "feasible": True} for i in range(n)]


def trained_bandit_run(tmp_path: Path, name: str, **hyper) -> tuple[Path, object]:
    """A run directory as scripts/train.py leaves it (policy.json + metrics.jsonl), from a few simulated epochs."""
    agent = make_agent(name, n_arms=N_ARMS, seed=3, **hyper)
    rng = np.random.default_rng(0)
    run = tmp_path / f"run_{name}"
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as handle:
        for epoch in range(25):
            obs = rng.uniform(0, 1, 30).astype(np.float32)
            action = agent.select(obs, None)
            reward = float(rng.normal(action / N_ARMS, 0.1))
            info = {"metrics": {"accuracy": 1.0}, "exit_histogram": [0.0] * 7 + [1.0]}
            agent.update(action, reward, obs, info)
            handle.write(json.dumps({"epoch": epoch, "action": action, "reward": reward}) + "\n")
    policy = {"schema": SCHEMA, "arm_table": arm_table(), "slo": {"name": "balanced"},
              "config": {"seed": 3, "env": {"histogram_bins": 8, "exits": [{"criterion": "none"}]}},
              **agent.export()}
    (run / "policy.json").write_text(json.dumps(policy))
    return run, agent


@pytest.mark.parametrize("name,hyper", [("ucb", {}), ("thompson", {}), ("sw_ucb", {}), ("exp3", {})])
def test_bandit_json_round_trip(tmp_path: Path, name: str, hyper: dict) -> None:
    run, agent = trained_bandit_run(tmp_path, name, **hyper)
    out = export_module().export_run(run, tmp_path / "export")
    document = json.loads(out.read_text())
    assert document["schema"] == SCHEMA and document["kind"] == "bandit"
    assert sum(s["plays"] for s in document["arm_stats"]) == 25
    # 8 exit-histogram buckets, 5 telemetry ratios, 4 load entries (queue, running, arrival, attainment), 6 sources,
    # 1 candidate, depth, 1 exit setting, batch fraction, episode progress.
    assert len(document["observation_names"]) == 8 + 5 + 4 + 6 + 1 + 1 + 1 + 1 + 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy.json"]  # JSON only: nothing to unpickle
    policy = load_policy(out.parent, make_agent=make_agent)
    assert isinstance(policy, BanditPolicy) and not policy.learns_online
    with pytest.raises(ValueError, match="make_agent=agents.make_agent"):
        load_policy(out.parent)  # helios imports no agents: the caller hands over the factory
    obs = np.zeros(30, np.float32)
    mask = np.array([True, False, True, True, False])
    for _ in range(10):  # same state, same RNG: the same decisions as the trained agent
        expected = agent.select(obs, mask)
        assert policy.act(obs, mask) == expected
        assert mask[expected]


def test_bandit_keeps_learning_online(tmp_path: Path) -> None:
    run, _ = trained_bandit_run(tmp_path, "ucb")
    out = export_module().export_run(run, tmp_path / "export").parent
    frozen, learning = load_policy(out, make_agent=make_agent), load_policy(out, learn=True, make_agent=make_agent)
    t0 = frozen.agent.t
    for policy in (frozen, learning):
        policy.update(0, 5.0)
    assert frozen.agent.t == t0 and learning.agent.t == t0 + 1
    saved = tmp_path / "online"
    saved.mkdir()
    (saved / "policy.json").write_text(json.dumps(learning.state_document()))
    assert load_policy(saved, make_agent=make_agent).agent.state_dict()["counts"] == learning.agent.state_dict()["counts"]


def test_helios_controller_round_trip(tmp_path: Path) -> None:
    run, agent = trained_bandit_run(tmp_path, "helios", arm_table=arm_table())
    out = export_module().export_run(run, tmp_path / "export")
    policy = load_policy(out.parent, make_agent=make_agent)
    assert policy.agent.state_dict() == agent.state_dict()
    assert policy.act(None, None) == agent.select(None, None)


class BoxEnv(gym.Env):
    """A stand-in with the helios env's shape of spaces (Box observations, Discrete arms)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0.0, np.array([1.0] * 4 + [4.0] * 3, np.float32), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(N_ARMS)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action), False, False, {}


@pytest.mark.parametrize("algo", ["ppo", "dqn", "maskable_ppo"])
def test_sb3_onnx_matches_torch(tmp_path: Path, algo: str) -> None:
    import torch

    from agents.sb3 import build_model

    hyper = {"learning_starts": 1, "buffer_size": 100} if algo == "dqn" else {"n_steps": 8, "batch_size": 8}
    if algo == "maskable_ppo":
        from sb3_contrib.common.wrappers import ActionMasker

        env = ActionMasker(BoxEnv(), lambda e: np.ones(N_ARMS, bool))
    else:
        env = BoxEnv()
    model = build_model(algo, env, hyper, seed=0)
    model.learn(16)  # a few updates, so that weights are not at their initialisation
    run = tmp_path / "run"
    run.mkdir()
    model.save(str(run / f"{algo}_model.zip"))
    names = [f"f{i}" for i in range(N_OBS)]
    (run / "policy.json").write_text(json.dumps({"schema": SCHEMA, "agent": algo, "kind": "stable-baselines3",
                                                 "arm_table": arm_table(), "observation_names": names,
                                                 "model_zip": f"{algo}_model.zip"}))
    out = export_module().export_run(run, tmp_path / "export", samples=128)
    document = json.loads(out.read_text())
    assert document["onnx"]["check"]["max_abs_diff"] < 1e-4
    assert document["observation_names"] == names
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy.json", "policy.onnx"]
    policy = load_policy(out.parent)
    assert isinstance(policy, OnnxPolicy)
    # Independent check on fresh random observations: ONNX scores vs the torch policy's own computation.
    obs = np.random.default_rng(1).uniform(0, 1, (64, N_OBS)).astype(np.float32)
    with torch.no_grad():
        tensor = torch.from_numpy(obs)
        if algo == "dqn":
            expected = model.q_net(tensor).numpy()
        else:
            expected = model.policy.get_distribution(tensor).distribution.logits.numpy()
            expected = expected - expected.max(1, keepdims=True)  # logits up to a constant per row
    got = policy.scores(obs)
    if algo != "dqn":
        got = got - got.max(1, keepdims=True)
    assert np.max(np.abs(got - expected)) < 1e-4
    assert [policy.act(o) for o in obs[:8]] == list(expected[:8].argmax(1))
    mask = np.array([False, True, False, True, False])
    assert all(mask[policy.act(o, mask)] for o in obs)
    with pytest.raises(ValueError):
        load_policy(out.parent, learn=True)  # ONNX policies are frozen


def test_rejects_non_exports(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps({"schema": "other/v0"}))
    with pytest.raises(PolicyFormatError):
        load_policy(tmp_path, make_agent=make_agent)
    run, _ = trained_bandit_run(tmp_path, "ucb")
    with pytest.raises(PolicyFormatError):  # a training run's own policy.json is not an export
        load_policy(run, make_agent=make_agent)


def test_wandb_artifact_only_when_online(monkeypatch: pytest.MonkeyPatch) -> None:
    online = export_module().wandb_online
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert online({"logger": {"kind": "wandb", "mode": "online"}})
    assert not online({"logger": {"kind": "wandb", "mode": "offline"}})
    assert not online({"logger": {"kind": "none"}})
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not online({"logger": {"kind": "wandb", "mode": "online"}})
