"""Build the server (policy, batcher, metrics, app) from a plain config dict: what scripts/serve.py and the tests run.

    python scripts/serve.py policy=exports/ucb learn=true port=8000

Without an exported policy, one fixed arm (`candidate` at `depth`, no early exit) is served (a one-arm FixedPolicy),
with the batch size its memory budget allows: the quickest way to serve a model as is. A bandit export is rebuilt
by the agent factory the caller passes (scripts/serve.py passes agents.make_agent: helios imports no agents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from helios.arms import CandidateSpec, ExitSpec, MemoryBudget, MemoryInfo, build_arms
from helios.policy import SCHEMA, AgentFactory, BanditPolicy, FixedPolicy, Policy, load_policy, observation_layout
from helios.serving.api import create_app
from helios.serving.batcher import Batcher, Engines
from helios.serving.metrics import ServerMetrics

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HISTOGRAM_BINS = 8  # the env's default (conf/env/*.yaml): the fixed arm's observation has no training config


def fixed_arm_policy(candidate: str, depth: int | None, budget: MemoryBudget) -> Policy:
    """A one-arm table (candidate truncated to `depth`, full when None, no exits), sized like the env sizes arms."""
    from helios.models import memory_profile

    profile = memory_profile(candidate, progress=False)
    depth = profile.num_layers if depth is None else int(depth)
    if not 1 <= depth <= profile.num_layers:
        raise ValueError(f"depth must be in 1..{profile.num_layers} for {candidate}; got {depth}")
    memory = MemoryInfo(profile.num_layers, profile.weight_bytes_by_depth, profile.kv_bytes_per_token_layer)
    (arm,) = build_arms((CandidateSpec(candidate, (depth,)),), (ExitSpec(),), {candidate: memory}, budget, candidate)
    config = {"env": {"histogram_bins": HISTOGRAM_BINS, "max_batch_size": budget.max_batch_size}}
    document = {"schema": SCHEMA, "kind": "fixed", "agent": "fixed", "arm_table": [arm.to_dict()], "config": config}
    document["observation_names"] = list(observation_layout(document).names)
    return FixedPolicy(document, None)


def build_server(cfg: dict[str, Any], make_agent: AgentFactory | None = None) -> tuple[FastAPI, Batcher]:
    """The app and its batcher from a serve config (conf/serve.yaml keys, resolved to plain Python); `make_agent`
    (agents.make_agent) rebuilds a bandit policy."""
    from helios.energy import meter_from_config
    from helios.slo import slo_from_config

    budget = MemoryBudget(int(float(cfg["memory_budget_mib"]) * 2**20), int(cfg["context_tokens"]),
                          int(cfg["max_batch_size"]))
    if cfg.get("policy"):
        policy = load_policy(cfg["policy"], learn=bool(cfg.get("learn", False)), make_agent=make_agent)
    else:
        policy = fixed_arm_policy(cfg["candidate"], cfg.get("depth"), budget)
    layout = observation_layout(policy.document, budget.max_batch_size)
    if policy.observation_names and list(layout.names) != policy.observation_names:
        raise ValueError(f"the policy reads observations {policy.observation_names}, but its arm table and config "
                         f"give the layout {list(layout.names)}")
    slo_cfg = policy.document.get("slo") or cfg.get("slo")
    if not slo_cfg:
        from omegaconf import OmegaConf

        slo_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "slo" / "balanced.yaml"))
    max_layers = max(arm.num_layers for arm in policy.arms)
    metrics = ServerMetrics(max_layers)
    batcher = Batcher(policy=policy, metrics=metrics, slo=slo_from_config(slo_cfg),
                      meter=meter_from_config(cfg.get("energy") or {"kind": "model"}, cfg.get("device", "cpu")),
                      context_tokens=budget.context_tokens, layout=layout, max_wait_s=float(cfg["max_wait_ms"]) / 1e3,
                      epoch_s=float(cfg["epoch_s"]), initial_arm=cfg.get("initial_arm"),
                      engines=Engines(cfg.get("device", "cpu"), cfg.get("dtype", "float32")))

    def save_learned_policy() -> None:
        """With learn=true and save_policy set: the policy as online learning left it, re-loadable by load_policy."""
        if cfg.get("save_policy") and isinstance(policy, BanditPolicy):
            import json

            from helios.paths import atomic_file

            out = Path(cfg["save_policy"])
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / "policy.json", "w") as handle:
                json.dump(policy.state_document(), handle, indent=1)

    app = create_app(batcher, metrics, served_model_name=cfg["served_model_name"], api_key=cfg.get("api_key"),
                     default_max_tokens=int(cfg["default_max_tokens"]), on_shutdown=save_learned_policy)
    return app, batcher
