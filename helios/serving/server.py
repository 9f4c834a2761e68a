"""Build the server (policy, serving core, controller, frontend, metrics, app) from a plain config dict: what
scripts/serve.py and the tests run.

    python scripts/serve.py policy=exports/ucb learn=true port=8000

Without an exported policy, one fixed arm (`candidate` at `depth`, no early exit) is served (a one-arm FixedPolicy),
with the batch size its memory budget allows: the quickest way to serve a model as is. A bandit export is rebuilt
by the agent factory the caller passes (scripts/serve.py passes agents.make_agent: helios imports no agents).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

from helios.arms import CandidateSpec, ExitSpec, MemoryBudget, MemoryInfo, build_arms
from helios.policy import SCHEMA, AgentFactory, BanditPolicy, FixedPolicy, Policy, load_policy, observation_layout
from helios.serving.api import create_app
from helios.serving.controller import Controller
from helios.serving.core import Engines, ServingCore
from helios.serving.frontend import Frontend, Limits
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


@dataclasses.dataclass
class Server:
    """What build_server makes: the app and the parts tests and scripts reach into."""

    app: FastAPI
    core: ServingCore
    controller: Controller
    frontend: Frontend
    policy: Policy
    metrics: ServerMetrics


def build_server(cfg: dict[str, Any], make_agent: AgentFactory | None = None) -> Server:
    """The app, its serving core and controller from a serve config (conf/serve.yaml keys, resolved to plain
    Python); `make_agent` (agents.make_agent) rebuilds a bandit policy."""
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
    metrics = ServerMetrics(max(arm.num_layers for arm in policy.arms))
    engines = Engines(budget_bytes=budget.budget_bytes, context_tokens=budget.context_tokens,
                      max_sequences=budget.max_batch_size, device=cfg.get("device", "cpu"),
                      dtype=cfg.get("dtype", "float32"), max_prefill_tokens=cfg.get("max_prefill_tokens"))
    # Feasible: the exported arm fitted its training budget, and its weights leave K/V room in this server's.
    mask = np.array([arm.feasible and engines.fits(arm) for arm in policy.arms])
    if not mask.any():
        raise ValueError(f"no arm of the policy's table fits the memory budget of {cfg['memory_budget_mib']} MiB")
    first = cfg.get("initial_arm")
    if first is None:
        from helios.observation import build_observation

        empty = build_observation(layout, histogram=None, values=None, reference=None, switch_s=0.0, waiting=0,
                                  nominal=0, mixture=None, arm=None, progress=0.0)
        first = policy.act(empty, mask)
    first = int(first)
    if not (0 <= first < len(policy.arms) and mask[first]):
        raise ValueError(f"initial_arm {first} is not a feasible arm; feasible: {np.flatnonzero(mask).tolist()}")
    core = ServingCore(engines, policy.arms[first], metrics, span_s=float(cfg.get("span_ms", 20)) / 1e3,
                       max_queued_sequences=int(cfg.get("max_queued_sequences", 256)),
                       switch_policy=str(cfg.get("switch_policy", "drain")))
    controller = Controller(core, policy=policy, slo=slo_from_config(slo_cfg),
                            meter=meter_from_config(cfg.get("energy") or {"kind": "model"}, cfg.get("device", "cpu")),
                            layout=layout, metrics=metrics, arm_index=first, mask=mask, epoch_s=float(cfg["epoch_s"]))
    limits = Limits(max_body_bytes=int(float(cfg.get("max_body_mib", 4)) * 2**20),
                    max_prompts=int(cfg.get("max_prompts", 64)), retry_after_s=int(cfg.get("retry_after_s", 1)),
                    tokenizer_threads=int(cfg.get("tokenizer_threads", 2)))
    frontend = Frontend(core, metrics, served_model_name=cfg["served_model_name"],
                        default_max_tokens=int(cfg["default_max_tokens"]), limits=limits)

    def save_learned_policy() -> None:
        """With learn=true and save_policy set: the policy as online learning left it, re-loadable by load_policy."""
        if cfg.get("save_policy") and isinstance(policy, BanditPolicy):
            import json

            from helios.paths import atomic_file

            out = Path(cfg["save_policy"])
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / "policy.json", "w") as handle:
                json.dump(policy.state_document(), handle, indent=1)

    app = create_app(core, controller, frontend, metrics, api_key=cfg.get("api_key"), on_shutdown=save_learned_policy)
    return Server(app, core, controller, frontend, policy, metrics)
