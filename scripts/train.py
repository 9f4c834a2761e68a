"""Train an agent that picks (candidate, depth, exit setting) each epoch of a drifting workload: the main job.

    python scripts/train.py agent=ucb                               # replay training, then one live episode
    python scripts/train.py agent=sw_ucb slo=latency episodes=5 live_eval=false       # replay only: seconds
    python scripts/train.py agent=ucb env=live workload=drift3 slo=balanced episodes=1   # train on live inference
    python scripts/train.py -m agent=ucb,sw_ucb,thompson,helios,ppo seed=0,1,2   # Hydra multirun
    python scripts/train.py resume=outputs/train/<run dir>          # continue a killed run from its checkpoint

Every agent is played by agents/rollout.py (bandits through its `play` loop, SB3 through model.learn on its
wrapper), which records each epoch and, on replay, the per-epoch oracle (reported only) and static full depth. On
replay with oracle=true the yardstick ladder (agents/yardsticks.py) is then played over the same episodes: every
feasible arm fixed and the phase oracle, adding best_fixed_reward, phase_oracle_reward, gap_recovered, dynamic_regret
and headroom to summary.json (live cannot afford it: summary.json says why_no_ladder).
Writes into the Hydra run directory: metrics.jsonl (one line per epoch), summary.json, the resolved config
(.hydra/config.yaml), policy.json (the agent's exported state), checkpoint.json, and PNG plots (reward and regret
against the phase oracle, or on live the cumulative reward with the reason there is no regret; arms over time with
the drift phases shaded and the arrival rate; both for the last two episodes of a longer run, whose every episode is
in learning_curve.png; the throughput-accuracy front of the arms). After replay training with
live_eval=true (the default), one more episode of the learned policy (its first live_eval_epochs epochs: 12 by
default, null for all) is played live and on replay on the same arrivals (agents/live_eval.py): summary.json
live_eval (arm agreement, rewards, each metric's replay error), live_eval.jsonl, live_eval_arms.png.
Logs to W&B offline by default (logger=wandb|tensorboard|none).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agents import AGENTS, make_agent
from agents.rollout import Rollout, play, summarise
from agents.yardsticks import Ladder, compute_ladder, ladder_unavailable, ladder_unavailable_on
from helios.arms import Arm
from helios.exit_config import ExitConfig
from helios.paths import atomic_file, write_json

if TYPE_CHECKING:
    import gymnasium

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
    # An agent that reads observation entries by name (lin_ucb's `context`) checks them against the layout's names
    # (those that do not depend on the candidates: the arm one-hots are left out here).
    from helios.observation import ObservationLayout

    names = ObservationLayout((), 8, int(cfg.env.get("histogram_bins", 8)), 1).names
    make_agent(name, 1_000_000, seed=0, observation_names=names, **hyper)


def env_kwargs(cfg: DictConfig, *, workload: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """gymnasium.make's keyword arguments: the run's env config, SLO, workload (or `workload`) and env_overrides,
    without the keys in `drop`."""
    kwargs = {**OmegaConf.to_container(cfg.env, resolve=True), "slo": OmegaConf.to_container(cfg.slo, resolve=True),
              "workload": OmegaConf.to_container(cfg.workload, resolve=True) if workload is None else workload,
              **OmegaConf.to_container(cfg.env_overrides, resolve=True)}
    return {k: v for k, v in kwargs.items() if k not in drop}


def make_env(cfg: DictConfig, backend: str) -> gymnasium.Env:
    import gymnasium

    import envs  # noqa: F401  (registers the helios ids)

    return gymnasium.make(ENV_IDS[backend], **env_kwargs(cfg))


def arm_point_summary(records: list[dict[str, Any]], arm_labels: list[str]) -> list[dict[str, Any]]:
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

    def abort(self) -> None:
        """Close a run that failed (e.g. no static arm), so W&B marks it failed instead of leaving it open."""
        if self.run is not None:
            self.run.finish(exit_code=1)
        if self.writer is not None:
            self.writer.close()

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


def scalars(record: dict[str, Any]) -> dict[str, float]:
    flat = {"reward": record["reward"], "action": record["action"], "batch_size": record["batch_size"],
            "switch_s": record["switch_s"]}
    flat.update({f"metrics/{k}": v for k, v in record["metrics"].items()})
    flat.update({f"reward_terms/{k}": v for k, v in record["reward_terms"].items()})
    for key in ("oracle_reward", "static_reward", "regret"):
        if key in record:
            flat[key] = record[key]
    return flat


class EpochLog:
    """Where every epoch's record goes, for the bandit loop and SB3 alike: a line of metrics.jsonl (flushed and
    fsynced, so a kill loses at most the epoch in flight) and the logger's scalars."""

    def __init__(self, run_dir: Path, logger: Logger) -> None:
        self.handle = (run_dir / "metrics.jsonl").open("a")
        self.logger = logger

    def __call__(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.logger.log(record["epoch"], scalars(record))

    def close(self) -> None:
        self.handle.close()


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    write_json(run_dir / "checkpoint.json", state)


def load_resume(resume: str) -> tuple[Path, DictConfig, dict[str, Any], list[dict[str, Any]]]:
    run_dir = Path(resume).expanduser().resolve()
    checkpoint_path = run_dir / "checkpoint.json"
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"resume={resume}: no checkpoint.json in {run_dir}")
    checkpoint = json.loads(checkpoint_path.read_text())
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    records: list[dict[str, Any]] = []
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


def train_bandit(cfg: DictConfig, backend: str, run_dir: Path, checkpoint: dict[str, Any] | None,
                 on_record: EpochLog) -> tuple[Rollout, Any]:
    """The bandit/HELIOS agents: agents.rollout.play, checkpointed after every epoch; writes policy.json."""
    from tqdm.auto import tqdm

    env = make_env(cfg, backend)
    base_env = env.unwrapped
    hyper = agent_hyperparameters(cfg)
    hyper["arm_table"] = base_env.arm_table  # make_agent hands it to the agents that read it (helios, static)
    agent = make_agent(cfg.agent.name, int(env.action_space.n), seed=int(cfg.seed),
                       observation_names=base_env.observation_names, **hyper)
    if callable(getattr(agent, "bind", None)):
        agent.bind(env)  # a planner plays futures through the env (agents/mpc.py)
    start = int(checkpoint["epochs_done"]) if checkpoint is not None else 0
    rollout = Rollout(env, int(cfg.seed), yardsticks=bool(cfg.oracle), first_epoch=start, on_record=on_record)
    obs = None
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        if start % rollout.episode_epochs:  # killed mid-episode: the episode's reset, then its saved position
            rollout.reset()
            base_env.load_state_dict(checkpoint["env"])  # position in the workload and the loaded arm
            obs = np.array(checkpoint["obs"], dtype=np.float32)
    total = int(cfg.episodes) * rollout.episode_epochs
    progress = tqdm(total=total, initial=start, desc=f"{cfg.agent.name} on {backend}", unit="epoch")

    def after_epoch(record: dict[str, Any], obs: np.ndarray) -> None:
        write_checkpoint(run_dir, {"epochs_done": record["epoch"] + 1, "backend": backend,
                                   "agent": agent.state_dict(), "env": base_env.state_dict(), "obs": obs.tolist()})
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward']:.3f}", arm=record["arm"][:28])

    try:
        play(rollout, agent, total, obs=obs, after_epoch=after_epoch)
    finally:
        progress.close()
    policy = {"schema": "helios.policy/v1", "arm_table": base_env.arm_table, "slo": OmegaConf.to_container(cfg.slo),
              "config": OmegaConf.to_container(cfg, resolve=True), **agent.export()}
    write_json(run_dir / "policy.json", policy, indent=1)
    env.close()
    return rollout, agent


def yardstick_ladder(cfg: DictConfig, backend: str) -> tuple[Ladder | None, str | None]:
    """The ladder (agents/yardsticks.py) over the run's episodes and seed, on a fresh env (the agent's is closed):
    replay with oracle=true only; otherwise None and why."""
    if not cfg.oracle:
        return None, "yardsticks switched off (oracle=false)"
    if backend != "replay":  # said before building an env: a live env would load every candidate for nothing
        return None, ladder_unavailable_on(backend)
    env = make_env(cfg, backend)
    try:
        why = ladder_unavailable(env)
        if why is not None:
            return None, why
        return compute_ladder(env, int(cfg.seed), int(cfg.episodes)), None
    finally:
        env.close()


def live_evaluation(cfg: DictConfig, run_dir: Path, agent: Any) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                         list[dict[str, Any]]]:
    """After replay training: one episode of the learned policy on replay and on live (agents/live_eval.py), the
    episode after the training ones. Writes live_eval.jsonl (both runs' records, tagged by backend)."""
    import copy

    import gymnasium

    from agents.live_eval import SB3Policy, evaluate_transfer
    from envs.model_depth import REPLAY_KEYS

    replay_env = make_env(cfg, "replay")
    if cfg.agent.name in SB3_AGENTS:
        from agents.sb3 import algorithm_class

        model = algorithm_class(cfg.agent.name).load(str(run_dir / f"{cfg.agent.name}_model.zip"))

        def make_policy() -> Any:
            return SB3Policy(model)
    else:
        state = copy.deepcopy(agent.state_dict())
        hyper = {**agent_hyperparameters(cfg), "arm_table": replay_env.unwrapped.arm_table}

        def make_policy() -> Any:
            fresh = make_agent(cfg.agent.name, int(replay_env.action_space.n), seed=int(cfg.seed),
                               observation_names=replay_env.unwrapped.observation_names, **hyper)
            fresh.load_state_dict(copy.deepcopy(state))
            return fresh

    def make_live_env(workload: dict[str, Any]) -> gymnasium.Env:
        # The replay run's world on live: its env config without the replay-only keys, on the absolute-rate workload.
        return gymnasium.make(ENV_IDS["live"], **env_kwargs(cfg, workload=workload, drop=(*REPLAY_KEYS, "backend")))

    try:
        epochs = cfg.get("live_eval_epochs")
        result, live, replay = evaluate_transfer(make_policy, replay_env, make_live_env, int(cfg.seed),
                                                 int(cfg.episodes), None if epochs is None else int(epochs))
    finally:
        replay_env.close()
    with atomic_file(run_dir / "live_eval.jsonl", "w") as handle:
        handle.write("".join(json.dumps({"backend": b, **r}) + "\n" for b, rs in (("live", live), ("replay", replay))
                             for r in rs))
    return result, live, replay


def write_outputs(cfg: DictConfig, backend: str, run_dir: Path, records: list[dict[str, Any]], rollout: Rollout,
                  logger: Logger, started: float, ladder: Ladder | None = None,
                  why_no_ladder: str | None = None, live_eval: tuple[dict[str, Any], list, list] | None = None,
                  why_no_live_eval: str | None = None) -> None:
    """Plots, summary.json and the logger's run summary, from every epoch's record (those before a resume too)."""
    from helios.plots import plot_arms, plot_learning_curve, plot_pareto, plot_reward_and_regret

    phase_starts = [r["epoch"] for i, r in enumerate(records)
                    if i == 0 or r["phase"] != records[i - 1]["phase"] or r["episode"] != records[i - 1]["episode"]]
    title = f"{cfg.agent.name} on {backend}, slo={cfg.slo.name}, seed {cfg.seed}"
    labels = rollout.labels
    yardsticks, schedule = None, None
    if ladder is not None and records:
        first, last = int(records[0]["epoch"]), int(records[-1]["epoch"]) + 1  # the ladder's epochs the run played
        yardsticks = {"phase oracle": ladder.phase_oracle.rewards[first:last],
                      "best fixed arm": ladder.best_fixed.rewards[first:last]}
        if ladder.static is not None:
            yardsticks["static full depth"] = ladder.static.rewards[first:last]
        schedule = ladder.phase_oracle.actions[first:last]
    # A long run's epochs crowd one axis: the reward and arm plots show its last two episodes (phases readable), and
    # learning_curve.png shows every episode's mean reward beside the rungs'.
    shown = records
    episodes = sorted({r["episode"] for r in records})
    if len(episodes) > 2:
        keep = len([r for r in records if r["episode"] in episodes[-2:]])
        shown = records[-keep:]
        title += f", episodes {episodes[-2]}-{episodes[-1]} of {episodes[0]}-{episodes[-1]}"
        if yardsticks is not None:
            yardsticks = {name: values[-keep:] for name, values in yardsticks.items()}
            schedule = schedule[-keep:]
    starts_shown = [e for e in phase_starts if e >= shown[0]["epoch"]] if shown else phase_starts
    plots = [
        plot_reward_and_regret(shown, starts_shown, run_dir / "reward_regret.png", title,
                               why_no_regret=why_no_ladder, yardsticks=yardsticks),
        plot_arms(shown, labels, starts_shown, run_dir / "arms.png", title, schedule=schedule),
        plot_pareto(arm_point_summary(records, labels), run_dir / "pareto.png", f"arms played ({backend})"),
    ]
    if len(episodes) > 2:
        rungs = {}
        if ladder is not None:
            first, last = int(records[0]["epoch"]), int(records[-1]["epoch"]) + 1
            rungs = {"phase oracle": ladder.phase_oracle.rewards[first:last],
                     "best fixed arm": ladder.best_fixed.rewards[first:last]}
            if ladder.static is not None:
                rungs["static full depth"] = ladder.static.rewards[first:last]
        plots.append(plot_learning_curve(records, rungs, run_dir / "learning_curve.png",
                                         f"{cfg.agent.name} on {backend}, slo={cfg.slo.name}, seed {cfg.seed}"))
    if live_eval is not None:
        result, live, replay = live_eval
        starts = [r["epoch"] for i, r in enumerate(replay) if i == 0 or r["phase"] != replay[i - 1]["phase"]]
        plots.append(plot_arms(replay, labels, starts, run_dir / "live_eval_arms.png",
                               f"{cfg.agent.name}, evaluation episode: replay vs live (circles), "
                               f"arm agreement {result['arm_agreement']:.2f}", other=("live", live)))
    summary = {"agent": cfg.agent.name, "backend": backend, "slo": cfg.slo.name, "seed": int(cfg.seed),
               **summarise(records, rollout.episode_epochs, ladder, why_no_ladder),
               "wall_s_this_session": time.perf_counter() - started}
    if live_eval is not None:
        summary["live_eval"] = live_eval[0]
    elif why_no_live_eval is not None:
        summary["why_no_live_eval"] = why_no_live_eval
    write_json(run_dir / "summary.json", summary, indent=1)
    logger.finish(plots, run_dir / "policy.json", summary)
    print(json.dumps(summary, indent=1))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    checkpoint: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    if cfg.resume:
        run_dir, cfg, checkpoint, records = load_resume(cfg.resume)
        backend = checkpoint["backend"]
    else:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        backend = HydraConfig.get().runtime.choices["env"]
    if backend not in ENV_IDS:
        raise ValueError(f"env={backend!r}: valid backends are {sorted(ENV_IDS)}")
    validate_agent(cfg)  # before any model loads
    planner = cfg.agent.name in AGENTS and not AGENTS[cfg.agent.name].learns
    if planner and (backend != "replay" or cfg.get("live_eval", False)):
        raise ValueError(f"agent={cfg.agent.name} plans through replay's simulator (it forks the episode): run it "
                         f"with env=replay live_eval=false (got env={backend}, live_eval={cfg.get('live_eval')})")
    started = time.perf_counter()
    logger = Logger(cfg, run_dir)
    epoch_log = EpochLog(run_dir, logger)
    agent = None  # SB3 agents live in their saved model (live_evaluation loads it)
    try:
        if cfg.agent.name in SB3_AGENTS:
            from agents.sb3 import train_sb3

            rollout = train_sb3(cfg, backend, run_dir, make_env, checkpoint, on_record=epoch_log)
        else:
            rollout, agent = train_bandit(cfg, backend, run_dir, checkpoint, epoch_log)
    except BaseException:
        logger.abort()
        raise
    finally:
        epoch_log.close()
    # The yardstick ladder is played after the agent, on its own env: (feasible arms + 1) runs of the same episodes.
    ladder, why_no_ladder = yardstick_ladder(cfg, backend)
    live_eval, why_no_live_eval = None, None
    if not cfg.get("live_eval", False):
        why_no_live_eval = "live_eval=false"
    elif backend != "replay":
        why_no_live_eval = f"trained on {backend}: the live evaluation follows replay training"
    else:
        live_eval = live_evaluation(cfg, run_dir, agent)
    write_outputs(cfg, backend, run_dir, records + rollout.records, rollout, logger, started, ladder, why_no_ladder,
                  live_eval, why_no_live_eval)


if __name__ == "__main__":
    main()
