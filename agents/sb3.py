"""stable-baselines3 agents (PPO, A2C, DQN; MaskablePPO from sb3-contrib) on the same environment.

    python scripts/train.py agent=ppo env=replay episodes=20
    python scripts/train.py agent=maskable_ppo env=replay episodes=20

Schulman et al. 2017 (PPO), Mnih et al. 2016 (A2C), Mnih et al. 2015 (DQN), Huang & Ontañón 2020 (invalid action
masking, MaskablePPO). SB3 owns its training loop, so these agents train through `model.learn`; a callback records
every epoch in the same metrics.jsonl format as the bandits, so runs compare line for line. Only MaskablePPO sees the
action mask; the others learn from the env's penalty for a masked (infeasible) arm.

Checkpoint and resume: after every episode the model (and DQN's replay buffer) is saved atomically beside
metrics.jsonl and checkpoint.json records the epochs done; `resume=<run dir>` reloads them and learns the remaining
epochs, so no logged epoch is lost or repeated. Episodes reset with seed * 1000 + episode (as the bandit loop), so a
resumed run meets the same requests; its actions can differ from an uninterrupted run's, since SB3's RNG state and a
half-collected PPO/A2C rollout are not part of the checkpoint. The checkpoint .zip/.pkl are SB3's own formats
(pickle inside): training state, never loaded by serving, which reads the exported ONNX + JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

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


def algorithm_class(name: str):
    """The SB3 (or sb3-contrib) class of an agent name in ALGORITHMS."""
    if name == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    import stable_baselines3 as sb3

    return {"ppo": sb3.PPO, "a2c": sb3.A2C, "dqn": sb3.DQN}[name]


def build_model(name: str, env, hyper: dict[str, Any], seed: int):
    hyper = dict(hyper)
    policy = hyper.pop("policy", "MlpPolicy")
    net_arch = hyper.pop("net_arch", None)
    kwargs = {"policy_kwargs": {"net_arch": list(net_arch)}} if net_arch else {}
    return algorithm_class(name)(policy, env, seed=seed, verbose=0, **hyper, **kwargs)


def with_oracle(env):
    """Replay: add the epoch's oracle reward (best arm, no switch) and the static full-depth arm's reward to `info`
    before each step, as the bandit loop records them; `env` is returned unchanged without `evaluate_arms`."""
    import gymnasium

    base = env.unwrapped
    if not hasattr(base, "evaluate_arms") or getattr(base, "backend_kind", "replay") != "replay":
        return env
    static_arm = base.reference_arm_index if base.reference_arm_index is not None else 0

    class OracleInfo(gymnasium.Wrapper):
        def step(self, action):
            rewards = base.evaluate_arms()
            obs, reward, terminated, truncated, info = self.env.step(action)
            info = {**info, "oracle_reward": float(np.max(rewards)), "oracle_action": int(np.argmax(rewards)),
                    "static_reward": float(rewards[static_arm])}
            return obs, reward, terminated, truncated, info

    return OracleInfo(env)


CHECKPOINT_MODEL = "sb3_checkpoint.zip"
CHECKPOINT_BUFFER = "sb3_replay_buffer.pkl"


def episode_seeds(env, base_seed: int, first_episode: int):
    """Reset episode k with base_seed * 1000 + k whatever seed SB3 passes (the bandit loop's schedule)."""
    import gymnasium

    class EpisodeSeeds(gymnasium.Wrapper):
        episode = first_episode

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            obs, info = self.env.reset(seed=base_seed * 1000 + self.episode, options=options)
            self.episode += 1
            return obs, info

    return EpisodeSeeds(env)


def save_checkpoint(model, run_dir: Path) -> None:
    """Model (and replay buffer) to temporary names, then renamed: a kill leaves the previous checkpoint whole."""
    model.save(str(run_dir / "sb3_checkpoint.tmp.zip"))
    os.replace(run_dir / "sb3_checkpoint.tmp.zip", run_dir / CHECKPOINT_MODEL)
    if getattr(model, "replay_buffer", None) is not None:
        model.save_replay_buffer(str(run_dir / "sb3_replay_buffer.tmp.pkl"))
        os.replace(run_dir / "sb3_replay_buffer.tmp.pkl", run_dir / CHECKPOINT_BUFFER)


def load_checkpoint(name: str, env, run_dir: Path):
    model = algorithm_class(name).load(str(run_dir / CHECKPOINT_MODEL), env=env)
    if (run_dir / CHECKPOINT_BUFFER).exists() and hasattr(model, "load_replay_buffer"):
        model.load_replay_buffer(str(run_dir / CHECKPOINT_BUFFER))
    return model


def train_sb3(cfg, backend: str, run_dir: Path, make_env: Callable, checkpoint: dict | None = None) -> None:
    """Train with model.learn, logging each epoch like the bandit loop; save the model and a JSON policy stub.
    `checkpoint` (from resume=): continue from the last episode's saved model."""
    from omegaconf import OmegaConf
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    from helios.paths import atomic_file

    hyper = OmegaConf.to_container(cfg.agent, resolve=True)
    name = hyper.pop("name")
    env = with_oracle(make_env(cfg, backend)) if cfg.get("oracle", True) else make_env(cfg, backend)
    base_env = env.unwrapped
    episode_epochs = base_env.episode_epochs
    done = int(checkpoint["epochs_done"]) if checkpoint else 0
    env = episode_seeds(env, int(cfg.seed), done // episode_epochs)
    labels = [a["label"] for a in base_env.arm_table]
    total = int(cfg.episodes) * episode_epochs
    model = load_checkpoint(name, env, run_dir) if done else build_model(name, env, hyper, int(cfg.seed))
    metrics_path = run_dir / "metrics.jsonl"
    progress = tqdm(total=total, initial=done, desc=f"{name} on {backend}", unit="epoch")

    class Record(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.handle = metrics_path.open("a")
            self.epoch = done

        def _on_step(self) -> bool:
            info = self.locals["infos"][0]
            action = int(np.asarray(self.locals["actions"]).reshape(-1)[0])
            record = {"epoch": self.epoch, "episode": self.epoch // base_env.episode_epochs, "phase": info["phase"],
                      "action": action, "arm": labels[action], "reward": float(self.locals["rewards"][0]),
                      "batch_size": int(info["batch_size"]), "masked_action": bool(info["masked_action"]),
                      "switch_s": float(info["switch_s"]), "metrics": info["metrics"],
                      "reward_terms": info["reward_terms"], "penalties": info["penalties"]}
            if "oracle_reward" in info:
                record.update({key: info[key] for key in ("oracle_reward", "oracle_action", "static_reward")})
                record["regret"] = record["oracle_reward"] - record["reward"]
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.epoch += 1
            progress.update(1)
            if self.epoch % episode_epochs == 0 and self.epoch < total:
                save_checkpoint(self.model, run_dir)
                with atomic_file(run_dir / "checkpoint.json", "w") as handle:
                    json.dump({"epochs_done": self.epoch, "backend": backend, "agent": name}, handle)
            return True

        def _on_training_end(self) -> None:
            self.handle.close()

    if done < total:
        model.learn(total_timesteps=total - done, callback=Record(), reset_num_timesteps=not done)
    progress.close()
    model.save(str(run_dir / f"{name}_model.zip"))
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    policy = {"schema": "helios.policy/v1", "agent": name, "kind": "stable-baselines3", "arm_table": base_env.arm_table,
              "observation_names": list(getattr(base_env, "observation_names", [])),
              "hyperparameters": hyper, "model_zip": f"{name}_model.zip",
              "note": "the SB3 .zip is converted to ONNX + JSON by scripts/export.py (no pickle at load time)"}
    with atomic_file(run_dir / "policy.json", "w") as handle:
        json.dump(policy, handle, indent=1)
    summary = {"agent": name, "backend": backend, "slo": cfg.slo.name, "seed": int(cfg.seed), "epochs": len(records),
               "mean_reward": float(np.mean([r["reward"] for r in records])),
               "mean_reward_last_episode": float(np.mean([r["reward"] for r in records[-base_env.episode_epochs:]])),
               **{f"mean_{k}": float(np.mean([r["metrics"][k] for r in records])) for k in records[0]["metrics"]}}
    if "oracle_reward" in records[0]:  # the same fields as the bandit loop's summary (scripts/compare.py reads them)
        summary.update({"oracle_mean_reward": float(np.mean([r["oracle_reward"] for r in records])),
                        "regret": float(sum(r["regret"] for r in records)),
                        "static_mean_reward": float(np.mean([r["static_reward"] for r in records]))})
    with atomic_file(run_dir / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=1)
    env.close()
    print(json.dumps(summary, indent=1))
