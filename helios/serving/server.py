"""Build the server (policy, batcher, metrics, app) from a plain config dict: what scripts/serve.py and the tests run.

    python scripts/serve.py policy=exports/ucb learn=true port=8000

Without an exported policy, one fixed arm (`candidate` at `depth`, no early exit) is served through a one-arm Static
policy, with the batch size its memory budget allows: the quickest way to serve a model as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from helios.policy import SCHEMA, BanditPolicy, Policy, load_policy, observation_names_for
from helios.serving.api import create_app
from helios.serving.batcher import Batcher, Engines
from helios.serving.metrics import ServerMetrics

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def fixed_arm_policy(candidate: str, depth: int | None, budget_bytes: int, context_tokens: int,
                     max_batch_size: int) -> Policy:
    """A one-arm table (candidate truncated to `depth`, full when None) served by the Static agent."""
    from envs.backends import batch_size_for
    from helios.models import memory_profile

    profile = memory_profile(candidate, progress=False)
    depth = profile.num_layers if depth is None else int(depth)
    if not 1 <= depth <= profile.num_layers:
        raise ValueError(f"depth must be in 1..{profile.num_layers} for {candidate}; got {depth}")
    kv_per_seq = profile.kv_bytes_per_token_layer * depth * context_tokens
    weights = profile.weight_bytes_by_depth[depth]
    batch = batch_size_for(budget_bytes, weights, kv_per_seq, max_batch_size)
    if batch < 1:
        raise ValueError(f"{candidate}@{depth} does not fit a budget of {budget_bytes / 2**20:g} MiB "
                         f"({(weights + kv_per_seq) / 2**20:.1f} MiB for one sequence)")
    arm = {"index": 0, "label": f"{candidate}@{depth}/{profile.num_layers} exit=none", "candidate": candidate,
           "depth": depth, "num_layers": profile.num_layers, "exit": "none", "criterion": "none", "threshold": 0.9,
           "exit_points": [], "weight_bytes": weights, "kv_bytes_per_seq": kv_per_seq, "batch_size": batch,
           "feasible": True}
    document = {"schema": SCHEMA, "kind": "bandit", "agent": "static", "arm_table": [arm], "seed": 0,
                "observation_names": observation_names_for([arm], 1, 8),
                "export": {"agent": "static", "n_arms": 1, "hyperparameters": {"arm": 0},
                           "state": {"t": 0, "rng": _fresh_rng_state()}}}
    return BanditPolicy(document, None)


def _fresh_rng_state() -> dict[str, Any]:
    import numpy as np

    return np.random.default_rng(0).bit_generator.state


def build_server(cfg: dict[str, Any]) -> tuple[FastAPI, Batcher]:
    """The app and its batcher from a serve config (conf/serve.yaml keys, resolved to plain Python)."""
    from helios.energy import meter_from_config
    from helios.slo import slo_from_config

    budget = int(float(cfg["memory_budget_mib"]) * 2**20)
    if cfg.get("policy"):
        policy = load_policy(cfg["policy"], learn=bool(cfg.get("learn", False)))
    else:
        policy = fixed_arm_policy(cfg["candidate"], cfg.get("depth"), budget, int(cfg["context_tokens"]),
                                  int(cfg["max_batch_size"]))
    slo_cfg = policy.document.get("slo") or cfg.get("slo")
    if not slo_cfg:
        from omegaconf import OmegaConf

        slo_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "slo" / "balanced.yaml"))
    max_layers = max(int(a["num_layers"]) for a in policy.arm_table)
    metrics = ServerMetrics(max_layers)
    bins = int(((policy.document.get("config") or {}).get("env") or {}).get("histogram_bins", 8))
    batcher = Batcher(policy=policy, metrics=metrics, slo=slo_from_config(slo_cfg),
                      meter=meter_from_config(cfg.get("energy") or {"kind": "model"}, cfg.get("device", "cpu")),
                      context_tokens=int(cfg["context_tokens"]), max_wait_s=float(cfg["max_wait_ms"]) / 1e3,
                      epoch_s=float(cfg["epoch_s"]), initial_arm=cfg.get("initial_arm"),
                      engines=Engines(cfg.get("device", "cpu"), cfg.get("dtype", "float32")), histogram_bins=bins)

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
