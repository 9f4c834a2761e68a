"""Exported policies (schema `helios.policy/v1`) and their pickle-free loader.

    python -c "from helios.policy import read_document; print(read_document('exports/ucb')[0]['kind'])"

An exported policy is a directory written by scripts/export.py:

  policy.json   always: schema, kind ("bandit" | "onnx"), arm table, per-arm statistics, SLO, config, source commit
  policy.onnx   kind "onnx" only: a stable-baselines3 policy network (observation -> action logits or Q-values)

Bandits (and the HELIOS controller) are plain JSON: the agent is rebuilt by the agent factory the caller passes
(`load_policy(path, make_agent=agents.make_agent)`: the helios package never imports the agents package) and its
learned state restored with `load_state_dict`, so a served bandit can keep learning online (`Policy.update`). Neural
policies are ONNX, run with onnxruntime; they act frozen (their training loop is SB3's, not the server's). Nothing
here unpickles: a stable-baselines3 `.zip` (which holds pickles) is converted once, at export time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from helios.arms import Arm, arms_from_dicts
from helios.observation import ObservationLayout

SCHEMA = "helios.policy/v1"
ONNX_INPUT = "observation"
ONNX_OUTPUT = "scores"  # action logits (PPO, A2C, MaskablePPO) or Q-values (DQN): argmax is the greedy action
# agents.make_agent's signature: (name, n_arms, seed=, arm_table=, **hyperparameters) -> an agent with select,
# update, load_state_dict and export.
AgentFactory = Callable[..., Any]


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
        self.arms: tuple[Arm, ...] = arms_from_dicts(self.arm_table)
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

    def __init__(self, document: dict[str, Any], directory: Path | None, *, make_agent: AgentFactory,
                 learn: bool = False) -> None:
        super().__init__(document, directory)
        exported = document["export"]
        hyper = dict(exported.get("hyperparameters", {}))
        # Exports drop the arm table agents were built with (the document carries it); the factory hands it to the
        # agents that read it.
        self.agent = make_agent(exported["agent"], n_arms=int(exported["n_arms"]), seed=int(document.get("seed", 0)),
                                arm_table=self.arm_table, **hyper)
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


class FixedPolicy(Policy):
    """One arm, always (the server's no-policy mode); frozen."""

    def act(self, obs: np.ndarray | None, mask: np.ndarray | None = None) -> int:
        return _masked_argmax(np.zeros(self.n_arms), mask)


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


def load_policy(path: str | Path, *, learn: bool = False, make_agent: AgentFactory | None = None) -> Policy:
    """Load an export (JSON or JSON + ONNX). A bandit export is rebuilt with `make_agent` (agents.make_agent);
    `learn=True` lets it keep updating its statistics online."""
    document, directory = read_document(path)
    if document["kind"] == "bandit":
        if make_agent is None:
            raise ValueError(f"{directory} holds a bandit policy ({document.get('agent')}): rebuilding it needs the "
                             "agent factory, load_policy(path, make_agent=agents.make_agent)")
        return BanditPolicy(document, directory, make_agent=make_agent, learn=learn)
    if document["kind"] == "onnx":
        if learn:
            raise ValueError("an ONNX policy is frozen: set learn=false (online learning is for bandit exports)")
        return OnnxPolicy(document, directory)
    raise PolicyFormatError(f"unknown policy kind {document['kind']!r}; valid: bandit, onnx")


def observation_layout(document: dict[str, Any], max_batch_size: int | None = None) -> ObservationLayout:
    """The observation layout a policy acts on, rebuilt as the env built it: the arm table's candidates and exit
    settings, the training config's histogram bins, exit settings and max_batch_size (`max_batch_size` standing in
    where the config lacks it)."""
    env = (document.get("config") or {}).get("env") or {}
    cap = env.get("max_batch_size", max_batch_size)
    if cap is None:
        raise PolicyFormatError("the policy's training config gives no env.max_batch_size: pass max_batch_size")
    return ObservationLayout.for_arms(arms_from_dicts(document["arm_table"]), int(env.get("histogram_bins", 8)),
                                      int(cap), len(env.get("exits", [])) or None)
