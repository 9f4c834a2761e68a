"""Train an agent that picks (candidate, depth, exit setting) each epoch of a drifting workload: the main job.

    python scripts/train.py agent=ucb                               # live backend, default candidates, offline
    python scripts/train.py agent=sw_ucb env=replay slo=latency episodes=5
    python scripts/train.py -m agent=ucb,sw_ucb,thompson,helios,ppo seed=0,1,2   # Hydra multirun
    python scripts/train.py resume=outputs/train/<run dir>          # continue a killed run from its checkpoint

Writes into the Hydra run directory: metrics.jsonl (one line per epoch), summary.json, the resolved config
(.hydra/config.yaml), policy.json (the agent's exported state), checkpoint.json, and PNG plots (reward and regret
against the oracle, arms over time with the drift phases marked, the throughput-accuracy front of the arms).
Logs to W&B offline by default (logger=wandb|tensorboard|none).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import AGENTS, make_agent  # noqa: E402
from helios.arms import Arm  # noqa: E402
from helios.exit_config import ExitConfig  # noqa: E402
from helios.paths import atomic_file  # noqa: E402

ENV_IDS = {"live": "helios/ModelDepth-v0", "replay": "helios/ModelDepthReplay-v0"}
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml share their names with the plugins' schemas, which validate them
# (intended); Hydra warns about that matching on every launch.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")
SB3_AGENTS = ("ppo", "a2c", "dqn", "maskable_ppo")


def agent_hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    hyper = OmegaConf.to_container(cfg.agent, resolve=True)
    hyper.pop("name")
    return hyper


def validate_agent(cfg: DictConfig) -> None:
    """Fail on a bad agent config before any model loads (a large dummy arm count; Static checks its arm later)."""
    name = cfg.agent.name
    if name in SB3_AGENTS:
        from agents.sb3 import validate_sb3_config

        validate_sb3_config(name, agent_hyperparameters(cfg))
        return
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid: {sorted([*AGENTS, *SB3_AGENTS])}")
    hyper = agent_hyperparameters(cfg)
    hyper.pop("arm_table", None)
    if name == "helios":  # needs the env's arm table: a one-arm stand-in checks the other hyper-parameters
        stand_in = Arm(0, "stand-in", 0, 1, 1, 0, "none", ExitConfig(), 0, 0, 1)
        make_agent(name, 1, seed=0, arm_table=[stand_in], **hyper)
        return
    make_agent(name, 1_000_000, seed=0, **hyper)


def make_env(cfg: DictConfig, backend: str):
    import gymnasium

    import envs  # noqa: F401  (registers the helios ids)

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items()}
    kwargs.update(slo=OmegaConf.to_container(cfg.slo, resolve=True),
                  workload=OmegaConf.to_container(cfg.workload, resolve=True))
    kwargs.update(OmegaConf.to_container(cfg.env_overrides, resolve=True))
    return gymnasium.make(ENV_IDS[backend], **kwargs)


def arm_point_summary(records: list[dict], arm_labels: list[str]) -> list[dict]:
    points = {}
    for r in records:
        if r["masked_action"]:
            continue
        p = points.setdefault(r["action"], {"label": arm_labels[r["action"]], "tokens_per_s": [], "accuracy": []})
        p["tokens_per_s"].append(r["metrics"]["throughput_tok_s"])
        p["accuracy"].append(r["metrics"]["accuracy"])
    return [{"label": p["label"], "tokens_per_s": float(np.mean(p["tokens_per_s"])),
             "accuracy": float(np.mean(p["accuracy"])), "pulls": len(p["accuracy"])} for p in points.values()]


class Logger:
    """W&B (offline by default), TensorBoard or nothing; the JSONL file is always written."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.kind = cfg.logger.kind
        self.run = self.writer = None
        if self.kind == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.logger.get("mode", "offline"))
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=cfg.logger.project, dir=str(run_dir), name=run_dir.name,
                                  config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
        elif self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        elif self.kind != "none":
            raise ValueError(f"unknown logger {self.kind!r}; valid: wandb, tensorboard, none")

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(values, step=step)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def finish(self, plots: list[Path], policy: Path, summary: dict[str, Any]) -> None:
        if self.run is not None:
            import wandb

            self.run.summary.update(summary)  # what a W&B sweep optimises (conf/sweep/*.yaml: metric mean_reward)
            self.run.log({p.stem: wandb.Image(str(p)) for p in plots})
            artifact = wandb.Artifact("policy", type="policy")
            artifact.add_file(str(policy))
            self.run.log_artifact(artifact)
            self.run.finish()
        if self.writer is not None:
            self.writer.close()


def scalars(record: dict) -> dict[str, float]:
    flat = {"reward": record["reward"], "action": record["action"], "batch_size": record["batch_size"],
            "switch_s": record["switch_s"]}
    flat.update({f"metrics/{k}": v for k, v in record["metrics"].items()})
    flat.update({f"reward_terms/{k}": v for k, v in record["reward_terms"].items()})
    for key in ("oracle_reward", "static_reward", "regret"):
        if key in record:
            flat[key] = record[key]
    return flat


def write_checkpoint(run_dir: Path, state: dict) -> None:
    with atomic_file(run_dir / "checkpoint.json", "w") as handle:
        json.dump(state, handle)


def load_resume(resume: str) -> tuple[Path, DictConfig, dict, list[dict]]:
    run_dir = Path(resume).expanduser().resolve()
    checkpoint_path = run_dir / "checkpoint.json"
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"resume={resume}: no checkpoint.json in {run_dir}")
    checkpoint = json.loads(checkpoint_path.read_text())
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    records: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by the kill: that epoch is re-run
    # Epochs logged after the last checkpoint are re-run, so each epoch appears exactly once.
    records = records[: checkpoint["epochs_done"]]
    with atomic_file(metrics_path, "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    return run_dir, cfg, checkpoint, records


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tqdm.auto import tqdm

    checkpoint: dict | None = None
    records: list[dict] = []
    if cfg.resume:
        run_dir, cfg, checkpoint, records = load_resume(cfg.resume)
        backend = checkpoint["backend"]
    else:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        backend = HydraConfig.get().runtime.choices["env"]
    if backend not in ENV_IDS:
        raise ValueError(f"env={backend!r}: valid backends are {sorted(ENV_IDS)}")
    validate_agent(cfg)  # before any model loads
    if cfg.agent.name in SB3_AGENTS:
        from agents.sb3 import train_sb3

        train_sb3(cfg, backend, run_dir, make_env, checkpoint)
        return

    env = make_env(cfg, backend)
    base_env = env.unwrapped
    arm_labels = [a["label"] for a in base_env.arm_table]
    n_arms = int(env.action_space.n)
    hyper = agent_hyperparameters(cfg)
    hyper["arm_table"] = base_env.arm_table  # make_agent hands it to the agents that read it (helios, static)
    agent = make_agent(cfg.agent.name, n_arms, seed=int(cfg.seed), **hyper)
    epochs_per_episode = base_env.episode_epochs
    total = int(cfg.episodes) * epochs_per_episode
    static_arm = base_env.reference_arm_index if hasattr(base_env, "reference_arm_index") else 0
    oracle = bool(cfg.oracle) and backend == "replay" and hasattr(base_env, "evaluate_arms")

    start = 0
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        start = checkpoint["epochs_done"]
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    logger = Logger(cfg, run_dir)
    progress = tqdm(total=total, initial=start, desc=f"{cfg.agent.name} on {backend}", unit="epoch")
    obs, info = None, None
    started = time.perf_counter()
    for global_epoch in range(start, total):
        episode, epoch = divmod(global_epoch, epochs_per_episode)
        if epoch == 0 or obs is None:
            obs, info = env.reset(seed=int(cfg.seed) * 1000 + episode)
            if checkpoint is not None and epoch > 0:
                base_env.load_state_dict(checkpoint["env"])  # position in the workload and the loaded arm
                obs = np.array(checkpoint["obs"], dtype=np.float32)
            checkpoint = None
        mask = base_env.action_masks()
        oracle_rewards = base_env.evaluate_arms() if oracle else None
        action = agent.select(obs, mask)
        obs, reward, terminated, truncated, info = env.step(action)
        agent.update(action, reward, obs, info)
        record = {
            "epoch": global_epoch, "episode": episode, "phase": info["phase"], "action": int(action),
            "arm": arm_labels[action], "reward": float(reward), "batch_size": int(info["batch_size"]),
            "masked_action": bool(info["masked_action"]), "switch_s": float(info["switch_s"]),
            "metrics": info["metrics"], "reward_terms": info["reward_terms"], "penalties": info["penalties"],
        }
        if oracle_rewards is not None:
            record["oracle_reward"] = float(np.max(oracle_rewards))
            record["oracle_action"] = int(np.argmax(oracle_rewards))
            record["static_reward"] = float(oracle_rewards[static_arm])
            record["regret"] = record["oracle_reward"] - record["reward"]
        records.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
        write_checkpoint(run_dir, {"epochs_done": global_epoch + 1, "backend": backend, "agent": agent.state_dict(),
                                   "env": base_env.state_dict(), "obs": obs.tolist()})
        logger.log(global_epoch, scalars(record))
        progress.update(1)
        progress.set_postfix(reward=f"{reward:.3f}", arm=arm_labels[action][:28])
    progress.close()
    metrics_file.close()
    env.close()

    from helios.plots import plot_arms, plot_pareto, plot_reward_and_regret

    phase_starts = [r["epoch"] for i, r in enumerate(records)
                    if i == 0 or r["phase"] != records[i - 1]["phase"] or r["episode"] != records[i - 1]["episode"]]
    title = f"{cfg.agent.name} on {backend}, slo={cfg.slo.name}, seed {cfg.seed}"
    plots = [
        plot_reward_and_regret(records, phase_starts, run_dir / "reward_regret.png", title),
        plot_arms(records, arm_labels, phase_starts, run_dir / "arms.png", title),
        plot_pareto(arm_point_summary(records, arm_labels), run_dir / "pareto.png", f"arms played ({backend})"),
    ]
    policy = {"schema": "helios.policy/v1", "arm_table": base_env.arm_table, "slo": OmegaConf.to_container(cfg.slo),
              "config": OmegaConf.to_container(cfg, resolve=True), **agent.export()}
    with atomic_file(run_dir / "policy.json", "w") as handle:
        json.dump(policy, handle, indent=1)
    rewards = np.array([r["reward"] for r in records])
    summary = {
        "agent": cfg.agent.name, "backend": backend, "slo": cfg.slo.name, "seed": int(cfg.seed), "epochs": len(records),
        "mean_reward": float(rewards.mean()), "wall_s_this_session": time.perf_counter() - started,
        **{f"mean_{k}": float(np.mean([r["metrics"][k] for r in records])) for k in records[0]["metrics"]},
    }
    if "oracle_reward" in records[0]:
        oracle_total = sum(r["oracle_reward"] for r in records)
        summary.update({"oracle_mean_reward": oracle_total / len(records),
                        "regret": float(sum(r["regret"] for r in records)),
                        "static_mean_reward": float(np.mean([r["static_reward"] for r in records]))})
    with atomic_file(run_dir / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=1)
    logger.finish(plots, run_dir / "policy.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
