"""Export a trained run (scripts/train.py run directory) as a versioned, pickle-free policy artifact.

    python scripts/export.py RUN_DIR OUT_DIR [--check-samples 256] [--tolerance 1e-4]

Bandits and the HELIOS controller -> OUT_DIR/policy.json (schema helios.policy/v1: arm table, per-arm statistics from
metrics.jsonl, agent name + hyper-parameters + learned state, SLO, training config, source commit).
stable-baselines3 runs -> OUT_DIR/policy.onnx + OUT_DIR/policy.json (observation feature order, bounds and
normalisation, arm table). The ONNX graph is checked against the torch policy with onnxruntime on random observations
(max |difference| of logits / Q-values must stay under --tolerance) before anything is written. When the run was
logged to W&B online, the export is also logged as a W&B artifact. Load with `helios.policy.load_policy(OUT_DIR)`.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from agents import make_agent
from helios.paths import write_json
from helios.policy import ONNX_INPUT, ONNX_OUTPUT, SCHEMA, load_policy, observation_layout

SB3_AGENTS = ("ppo", "a2c", "dqn", "maskable_ppo")


def source_commit() -> str | None:
    """The checkout's HEAD commit, read from .git directly (None outside a checkout): which code made the artifact."""
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached HEAD
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():  # refs git has packed
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def arm_statistics(run_dir: Path, n_arms: int) -> list[dict[str, Any]]:
    """Per arm: epochs played and mean / last reward, from the run's metrics.jsonl (zeros when it is absent)."""
    plays = np.zeros(n_arms, int)
    total = np.zeros(n_arms)
    last = [None] * n_arms
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            arm = int(record["action"])
            plays[arm] += 1
            total[arm] += float(record["reward"])
            last[arm] = float(record["reward"])
    return [{"index": a, "plays": int(plays[a]), "mean_reward": float(total[a] / plays[a]) if plays[a] else None,
             "last_reward": last[a]} for a in range(n_arms)]


def training_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def export_bandit(trained: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    export = {key: trained[key] for key in ("agent", "n_arms", "hyperparameters", "state")}
    config = trained.get("config") or training_config(run_dir)
    return {"schema": SCHEMA, "kind": "bandit", "agent": trained["agent"], "arm_table": trained["arm_table"],
            # The names do not depend on the batch cap, so a stand-in serves where the config lacks it (runs made
            # outside scripts/train.py); the server rebuilds the whole layout from the same config.
            "observation_names": list(observation_layout({"arm_table": trained["arm_table"], "config": config},
                                                         max_batch_size=1).names),
            "arm_stats": arm_statistics(run_dir, len(trained["arm_table"])), "slo": trained.get("slo"),
            "config": config, "seed": int(config.get("seed", 0)), "source_commit": source_commit(), "export": export}


class _ScoreNet:
    """torch module: observation -> the SB3 policy's action logits (actor-critic) or Q-values (DQN)."""

    @staticmethod
    def build(model: Any):
        import torch

        policy = model.policy

        class ScoreNet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.policy = policy

            def forward(self, obs: torch.Tensor) -> torch.Tensor:
                if hasattr(self.policy, "q_net"):  # DQN
                    return self.policy.q_net(obs)
                features = self.policy.extract_features(obs, self.policy.pi_features_extractor)
                latent_pi = self.policy.mlp_extractor.forward_actor(features)
                return self.policy.action_net(latent_pi)

        return ScoreNet().eval()


def export_sb3(stub: dict[str, Any], run_dir: Path, out_dir: Path, samples: int, tolerance: float) -> dict[str, Any]:
    """Convert `<algo>_model.zip` to ONNX (the only place a pickle is read), verify it, describe it in JSON."""
    import torch

    algo = stub["agent"]
    zip_path = run_dir / stub.get("model_zip", f"{algo}_model.zip")
    from agents.sb3 import algorithm_class

    model = algorithm_class(algo).load(str(zip_path), device="cpu")
    space = model.observation_space
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    net = _ScoreNet.build(model)
    example = torch.zeros(1, low.size, dtype=torch.float32)
    onnx_path = out_dir / "policy.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but needs no onnxscript and is exact here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (example,), str(onnx_path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, opset_version=17,
                          dynamo=False)

    # Verification: random observations inside the Box (where the policy is defined), torch vs onnxruntime.
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    obs = rng.uniform(low, high, size=(samples, low.size)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: obs})[0]
    max_abs_diff = float(np.max(np.abs(expected - got)))
    if not max_abs_diff <= tolerance:
        onnx_path.unlink()
        raise RuntimeError(f"ONNX export of {zip_path} differs from the torch policy: max |diff| {max_abs_diff:.3g} "
                           f"> {tolerance:g}")
    config = training_config(run_dir)
    return {"schema": SCHEMA, "kind": "onnx", "agent": algo, "arm_table": stub["arm_table"],
            "arm_stats": arm_statistics(run_dir, len(stub["arm_table"])),
            "observation_names": stub.get("observation_names", []), "slo": config.get("slo"), "config": config,
            "seed": int(config.get("seed", 0)), "source_commit": source_commit(),
            "hyperparameters": stub.get("hyperparameters", {}),
            "onnx": {"file": onnx_path.name, "input": ONNX_INPUT, "output": ONNX_OUTPUT,
                     "output_kind": "q_values" if algo == "dqn" else "logits",
                     # SB3's MlpPolicy on a Box takes observations as they are (no VecNormalize in train.py):
                     # the server only clips to the bounds it trained within.
                     "normalisation": None, "observation_low": low.tolist(), "observation_high": high.tolist(),
                     "check": {"samples": samples, "max_abs_diff": max_abs_diff, "tolerance": tolerance}}}


def wandb_online(config: dict[str, Any]) -> bool:
    """Whether the training run logged to W&B online (logger kind wandb, and WANDB_MODE or its mode is online)."""
    logger = config.get("logger") or {}
    mode = os.environ.get("WANDB_MODE", logger.get("mode", "offline"))
    return logger.get("kind") == "wandb" and mode == "online"


def log_wandb_artifact(run_dir: Path, out_dir: Path, document: dict[str, Any]) -> bool:
    """Log the export as a W&B artifact when the training run was logged online (never offline or disabled)."""
    config = document.get("config") or {}
    if not wandb_online(config):
        return False
    logger = config["logger"]
    import wandb

    run = wandb.init(project=logger.get("project", "helios"), job_type="export", config={"run_dir": str(run_dir)})
    artifact = wandb.Artifact(f"policy-{document['agent']}", type="policy",
                              metadata={"schema": SCHEMA, "kind": document["kind"],
                                        "source_commit": document["source_commit"]})
    artifact.add_dir(str(out_dir))
    run.log_artifact(artifact)
    run.finish()
    return True


def export_run(run_dir: str | Path, out_dir: str | Path, *, samples: int = 256, tolerance: float = 1e-4) -> Path:
    """Export `run_dir` into `out_dir`; returns the path of the written policy.json (already re-loaded once)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    source = run_dir / "policy.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: is {run_dir} a scripts/train.py run directory?")
    trained = json.loads(source.read_text())
    if trained.get("schema") != SCHEMA:
        raise ValueError(f"{source}: schema {trained.get('schema')!r}, expected {SCHEMA!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if trained.get("kind") == "stable-baselines3" or trained.get("agent") in SB3_AGENTS:
        document = export_sb3(trained, run_dir, out_dir, samples, tolerance)
    else:
        document = export_bandit(trained, run_dir)
    write_json(out_dir / "policy.json", document, indent=1)
    load_policy(out_dir, make_agent=make_agent)  # fail here, not in the server, if the artifact does not load
    log_wandb_artifact(run_dir, out_dir, document)
    return out_dir / "policy.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--check-samples", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    path = export_run(args.run_dir, args.out_dir, samples=args.check_samples, tolerance=args.tolerance)
    document = json.loads(path.read_text())
    print(json.dumps({"policy": str(path), "kind": document["kind"], "agent": document["agent"],
                      "n_arms": len(document["arm_table"]), **({"onnx_check": document["onnx"]["check"]}
                                                                if "onnx" in document else {})}, indent=1))


if __name__ == "__main__":
    main()
