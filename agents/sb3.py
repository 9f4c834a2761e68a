"""stable-baselines3 agents (PPO, A2C, DQN; MaskablePPO from sb3-contrib) on the same environment.

    python scripts/train.py agent=ppo env=replay episodes=20
    python scripts/train.py agent=maskable_ppo env=replay episodes=20

Schulman et al. 2017 (PPO), Mnih et al. 2016 (A2C), Mnih et al. 2015 (DQN), Huang & Ontañón 2020 (invalid action
masking, MaskablePPO). SB3 owns its training loop, so these agents train through `model.learn` on the env wrapped in
the rollout wrapper (agents/rollout.py), which records every epoch with the same fields and yardsticks as the bandit
loop, so runs compare line for line. Training stops after exactly `episodes` episodes (PPO/A2C would otherwise finish
their last `n_steps` rollout past the end). Only MaskablePPO sees the action mask; the others learn from the env's
penalty for a masked (infeasible) arm.

Checkpoint and resume: after every episode the model (and DQN's replay buffer) is saved atomically beside
metrics.jsonl and checkpoint.json records the epochs done; `resume=<run dir>` reloads them and learns the remaining
epochs, so no logged epoch is lost or repeated. Episodes reset with seed * 1000 + episode (as the bandit loop), so a
resumed run meets the same requests; its actions can differ from an uninterrupted run's, since SB3's RNG state and a
half-collected PPO/A2C rollout are not part of the checkpoint. The checkpoint .zip/.pkl are SB3's own formats
(pickle inside): training state, never loaded by serving, which reads the exported ONNX + JSON.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium

from agents.rollout import Rollout

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

ALGORITHMS = ("ppo", "a2c", "dqn", "maskable_ppo")
# Hyper-parameters forwarded to the SB3 constructor, with their valid ranges (checked before any model loads).
RANGES: dict[str, tuple[float, float]] = {
    "learning_rate": (0.0, 1.0), "gamma": (0.0, 1.0), "ent_coef": (0.0, 10.0), "exploration_fraction": (0.0, 1.0),
}
INT_KEYS = ("n_steps", "batch_size", "learning_starts", "buffer_size", "train_freq", "target_update_interval")


def validate_sb3_config(name: str, hyper: dict[str, Any]) -> None:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown stable-baselines3 agent {name!r}; valid: {list(ALGORITHMS)}")
    for key, value in hyper.items():
        if key in RANGES:
            low, high = RANGES[key]
            if not (low < float(value) <= high):
                raise ValueError(f"{name}.{key} must be in ({low}, {high}]; got {value!r}")
        elif key in INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{key} must be a positive integer; got {value!r}")
        elif key not in ("policy", "net_arch"):
            raise ValueError(f"unknown hyper-parameter {key!r} for {name}; valid: "
                             f"{sorted([*RANGES, *INT_KEYS, 'policy', 'net_arch'])}")


def algorithm_class(name: str) -> type[BaseAlgorithm]:
    """The SB3 (or sb3-contrib) class of an agent name in ALGORITHMS."""
    if name == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    import stable_baselines3 as sb3

    return {"ppo": sb3.PPO, "a2c": sb3.A2C, "dqn": sb3.DQN}[name]


def build_model(name: str, env: gymnasium.Env, hyper: dict[str, Any], seed: int) -> BaseAlgorithm:
    hyper = dict(hyper)
    policy = hyper.pop("policy", "MlpPolicy")
    net_arch = hyper.pop("net_arch", None)
    kwargs = {"policy_kwargs": {"net_arch": list(net_arch)}} if net_arch else {}
    return algorithm_class(name)(policy, env, seed=seed, verbose=0, **hyper, **kwargs)


CHECKPOINT_MODEL = "sb3_checkpoint.zip"
CHECKPOINT_BUFFER = "sb3_replay_buffer.pkl"


def save_checkpoint(model: BaseAlgorithm, run_dir: Path) -> None:
    """Model (and replay buffer) to temporary names, then renamed: a kill leaves the previous checkpoint whole."""
    model.save(str(run_dir / "sb3_checkpoint.tmp.zip"))
    os.replace(run_dir / "sb3_checkpoint.tmp.zip", run_dir / CHECKPOINT_MODEL)
    if getattr(model, "replay_buffer", None) is not None:
        model.save_replay_buffer(str(run_dir / "sb3_replay_buffer.tmp.pkl"))
        os.replace(run_dir / "sb3_replay_buffer.tmp.pkl", run_dir / CHECKPOINT_BUFFER)


def load_checkpoint(name: str, env: gymnasium.Env, run_dir: Path) -> BaseAlgorithm:
    model = algorithm_class(name).load(str(run_dir / CHECKPOINT_MODEL), env=env)
    if (run_dir / CHECKPOINT_BUFFER).exists() and hasattr(model, "load_replay_buffer"):
        model.load_replay_buffer(str(run_dir / CHECKPOINT_BUFFER))
    return model


def train_sb3(cfg: Any, backend: str, run_dir: Path, make_env: Callable[[Any, str], gymnasium.Env],
              checkpoint: dict[str, Any] | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> Rollout:
    """Train with model.learn through the rollout wrapper (agents/rollout.py: episode seeds, records, yardsticks);
    save the model and a JSON policy stub; checkpoint after every episode. `checkpoint` (from resume=): continue
    from the last episode's saved model. `on_record(record)` gets every epoch's record (scripts/train.py writes
    metrics.jsonl with it). Returns the rollout, whose `records` are this session's epochs."""
    from omegaconf import OmegaConf
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    from helios.paths import write_json

    hyper = OmegaConf.to_container(cfg.agent, resolve=True)
    name = hyper.pop("name")
    done = int(checkpoint["epochs_done"]) if checkpoint else 0
    rollout = Rollout(make_env(cfg, backend), int(cfg.seed), yardsticks=bool(cfg.get("oracle", True)),
                      first_epoch=done, on_record=on_record)
    base_env = rollout.base
    episode_epochs = rollout.episode_epochs
    total = int(cfg.episodes) * episode_epochs
    model = load_checkpoint(name, rollout, run_dir) if done else build_model(name, rollout, hyper, int(cfg.seed))
    progress = tqdm(total=total, initial=done, desc=f"{name} on {backend}", unit="epoch")

    class EpisodeCheckpoint(BaseCallback):
        """Progress per step; after each whole episode but the last, the model and the epochs done; stops
        training at `total` epochs (False ends model.learn, even inside a PPO/A2C rollout)."""

        def _on_step(self) -> bool:
            progress.update(1)
            epochs = rollout.next_epoch
            if epochs % episode_epochs == 0 and epochs < total:
                save_checkpoint(self.model, run_dir)
                write_json(run_dir / "checkpoint.json", {"epochs_done": epochs, "backend": backend, "agent": name})
            return epochs < total

    try:
        if done < total:
            model.learn(total_timesteps=total - done, callback=EpisodeCheckpoint(), reset_num_timesteps=not done)
    finally:
        progress.close()
    model.save(str(run_dir / f"{name}_model.zip"))
    policy = {"schema": "helios.policy/v1", "agent": name, "kind": "stable-baselines3", "arm_table": base_env.arm_table,
              "observation_names": list(getattr(base_env, "observation_names", [])),
              "hyperparameters": hyper, "model_zip": f"{name}_model.zip",
              "note": "the SB3 .zip is converted to ONNX + JSON by scripts/export.py (no pickle at load time)"}
    write_json(run_dir / "policy.json", policy, indent=1)
    rollout.close()
    return rollout
