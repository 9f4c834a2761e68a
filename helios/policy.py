"""Exported policies (schema `helios.policy/v1`) and their pickle-free loader.

    python -c "from helios.policy import load_policy; p = load_policy('exports/ucb'); print(p.describe())"

An exported policy is a directory written by scripts/export.py:

  policy.json   always: schema, kind ("bandit" | "onnx"), arm table, per-arm statistics, SLO, config, source commit
  policy.onnx   kind "onnx" only: a stable-baselines3 policy network (observation -> action logits or Q-values)

Bandits (and the HELIOS controller) are plain JSON: the agent is rebuilt with `agents.make_agent` and its learned
state restored with `load_state_dict`, so a served bandit can keep learning online (`Policy.update`). Neural
policies are ONNX, run with onnxruntime; they act frozen (their training loop is SB3's, not the server's). Nothing
here unpickles: a stable-baselines3 `.zip` (which holds pickles) is converted once, at export time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "helios.policy/v1"
ONNX_INPUT = "observation"
ONNX_OUTPUT = "scores"  # action logits (PPO, A2C, MaskablePPO) or Q-values (DQN): argmax is the greedy action


class PolicyFormatError(ValueError):
    """The file is not a helios.policy/v1 export (or is missing a part)."""


def _masked_argmax(scores: np.ndarray, mask: np.ndarray | None) -> int:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != scores.shape:
            raise ValueError(f"action mask has shape {mask.shape}; expected {scores.shape}")
        if not mask.any():
            raise ValueError("every arm is masked: no feasible action")
        scores = np.where(mask, scores, -np.inf)  # an infeasible arm is never chosen, whatever the network says
    return int(np.argmax(scores))


class Policy:
    """Chooses an arm index from an observation vector and a feasibility mask."""

    def __init__(self, document: dict[str, Any], directory: Path | None) -> None:
        self.document = document
        self.directory = directory
        self.arm_table: list[dict[str, Any]] = list(document["arm_table"])
        self.observation_names: list[str] = list(document.get("observation_names", []))
        self.kind: str = document["kind"]
        self.agent_name: str = document.get("agent", "?")

    @property
    def n_arms(self) -> int:
        return len(self.arm_table)

    @property
    def learns_online(self) -> bool:
        return False

    def act(self, obs: np.ndarray | None, mask: np.ndarray | None = None) -> int:
        raise NotImplementedError

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        """Online learning hook; frozen policies ignore it (so the server's loop needs no branch)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "agent": self.agent_name, "n_arms": self.n_arms,
                "learns_online": self.learns_online, "source_commit": self.document.get("source_commit")}


class BanditPolicy(Policy):
    """A helios agent (bandit or HELIOS controller) rebuilt from JSON; `update` keeps learning when allowed."""

    def __init__(self, document: dict[str, Any], directory: Path | None, *, learn: bool = False) -> None:
        super().__init__(document, directory)
        from agents import make_agent

        exported = document["export"]
        hyper = dict(exported.get("hyperparameters", {}))
        if exported["agent"] == "helios":  # the controller's export drops the arm table it was built with
            hyper["arm_table"] = self.arm_table
        self.agent = make_agent(exported["agent"], n_arms=int(exported["n_arms"]), seed=int(document.get("seed", 0)),
                                **hyper)
        self.agent.load_state_dict(exported["state"])
        self.learn = learn

    @property
    def learns_online(self) -> bool:
        return self.learn

    def act(self, obs: np.ndarray | None, mask: np.ndarray | None = None) -> int:
        return int(self.agent.select(obs, mask))

    def update(self, action: int, reward: float, obs: np.ndarray | None = None, info: dict | None = None) -> None:
        if self.learn:
            self.agent.update(int(action), float(reward), obs, info)

    def state_document(self) -> dict[str, Any]:
        """The policy as it stands now (after online updates), in the same format: re-loadable with load_policy."""
        return {**self.document, "export": self.agent.export()}


class OnnxPolicy(Policy):
    """A stable-baselines3 network exported to ONNX: greedy over its scores, masked arms excluded. Frozen."""

    def __init__(self, document: dict[str, Any], directory: Path) -> None:
        super().__init__(document, directory)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a tiny MLP: threads cost more than they save, and the engine needs the cores
        options.inter_op_num_threads = 1
        path = directory / document["onnx"]["file"]
        if not path.is_file():
            raise PolicyFormatError(f"{path} is missing (named by policy.json)")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        norm = document["onnx"].get("normalisation") or {}
        self.mean = np.asarray(norm["mean"], np.float32) if "mean" in norm else None
        self.std = np.asarray(norm["std"], np.float32) if "std" in norm else None
        self.low = np.asarray(document["onnx"]["observation_low"], np.float32)
        self.high = np.asarray(document["onnx"]["observation_high"], np.float32)

    def scores(self, obs: np.ndarray) -> np.ndarray:
        """Raw network outputs for a batch [n, n_obs] (or one observation) of unnormalised observations."""
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float32))
        if obs.shape[1] != self.low.size:
            raise ValueError(f"observation has {obs.shape[1]} entries; the policy expects {self.low.size} "
                             f"({self.observation_names})")
        obs = np.clip(obs, self.low, self.high)  # the env's Box bounds: what the network saw in training
        if self.mean is not None and self.std is not None:
            obs = (obs - self.mean) / self.std
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: obs})[0]

    def act(self, obs: np.ndarray | None, mask: np.ndarray | None = None) -> int:
        if obs is None:
            raise ValueError("an ONNX policy needs an observation")
        return _masked_argmax(self.scores(obs)[0], mask)


def read_document(path: str | Path) -> tuple[dict[str, Any], Path]:
    """policy.json of an export directory (or the file itself) and the directory it lives in."""
    path = Path(path)
    file = path / "policy.json" if path.is_dir() else path
    if not file.is_file():
        raise PolicyFormatError(f"no exported policy at {path} (expected a directory with policy.json)")
    document = json.loads(file.read_text())
    if document.get("schema") != SCHEMA:
        raise PolicyFormatError(f"{file}: schema {document.get('schema')!r}, expected {SCHEMA!r}")
    if "kind" not in document or "arm_table" not in document:
        raise PolicyFormatError(f"{file}: not an export (no 'kind'); run scripts/export.py on the training run first")
    return document, file.parent


def load_policy(path: str | Path, *, learn: bool = False) -> Policy:
    """Load an export (JSON or JSON + ONNX). `learn=True` lets a bandit keep updating its statistics online."""
    document, directory = read_document(path)
    if document["kind"] == "bandit":
        return BanditPolicy(document, directory, learn=learn)
    if document["kind"] == "onnx":
        if learn:
            raise ValueError("an ONNX policy is frozen: set learn=false (online learning is for bandit exports)")
        return OnnxPolicy(document, directory)
    raise PolicyFormatError(f"unknown policy kind {document['kind']!r}; valid: bandit, onnx")


def observation_names_for(arm_table: list[dict[str, Any]], n_exits: int | None, bins: int) -> list[str]:
    """The env's observation layout (envs.model_depth `observation_names`) rebuilt from an arm table: candidates and
    exit settings in the order the arm table first names them (the order the env built its arms in)."""
    from helios.workloads import SOURCE_NAMES

    candidates = list(dict.fromkeys(arm["candidate"] for arm in arm_table))
    n_exits = n_exits or len(dict.fromkeys(arm["exit"] for arm in arm_table))
    return [*(f"exit_hist_{j}" for j in range(bins)), "throughput_ratio", "latency_ratio", "energy_ratio",
            "accuracy_ratio", "switch_ratio", "queue_ratio", *(f"mix_{s}" for s in SOURCE_NAMES),
            *(f"arm_{c}" for c in candidates), "arm_depth_fraction", *(f"arm_exit_{k}" for k in range(n_exits)),
            "arm_batch_fraction", "episode_progress"]
