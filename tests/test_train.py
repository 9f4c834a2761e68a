"""scripts/train.py end to end on the tiny replay env: SIGKILL + resume, bad input, Hydra multirun + compare, the W&B
sweep config's command, the launcher configs.

    python -m pytest tests/test_train.py -q

Every run is a real subprocess of scripts/train.py (replay, tiny candidates, traces recorded once into a temporary
directory by the `tiny_train_env` fixture in conftest.py, logger=none).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
EPISODE_EPOCHS = 40  # conftest.TRAIN_TINY_OVERRIDES


def train_cmd(tiny: dict, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(TRAIN), *tiny["overrides"], *overrides, f"hydra.run.dir={run_dir}"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------------ kill and resume


def sigkill_when(process: subprocess.Popen, ready, log: Path, timeout_message: str) -> None:
    """Poll until `ready()`, then SIGKILL the run; fail with its log if it ends first, or after 120 s."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, timeout_message
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_sigkill_then_resume_loses_and_repeats_no_epoch_and_matches_an_uninterrupted_run(tiny_train_env, tmp_path):
    """A run SIGKILLed mid-way and resumed with resume=<run dir> logs epochs 0..N-1 exactly once, and its actions
    and rewards equal an uninterrupted run's with the same seed (agent state and env position restored)."""
    episodes = 3
    total = episodes * EPISODE_EPOCHS
    args = ("agent=thompson", "seed=3", f"episodes={episodes}")  # Thompson draws from its RNG every epoch
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    with open(tmp_path / "reference.log", "w") as ref_log, open(tmp_path / "killed.log", "w") as run_log:
        reference = subprocess.Popen(train_cmd(tiny_train_env, ref_dir, *args), cwd=ROOT, env=ENV, stdout=ref_log,
                                     stderr=subprocess.STDOUT)
        killed = subprocess.Popen(train_cmd(tiny_train_env, run_dir, *args), cwd=ROOT, env=ENV, stdout=run_log,
                                  stderr=subprocess.STDOUT)
        sigkill_when(killed, lambda: line_count(run_dir / "metrics.jsonl") >= 25, tmp_path / "killed.log",
                     "no epochs logged within 120 s")
        done = json.loads((run_dir / "checkpoint.json").read_text())["epochs_done"]
        logged = line_count(run_dir / "metrics.jsonl")
        assert 25 <= logged < total and 0 < done <= logged, (done, logged)  # killed mid-way, inside the epoch loop
        assert not (run_dir / "summary.json").exists()
        resumed = subprocess.run([sys.executable, str(TRAIN), f"resume={run_dir}",
                                  f"hydra.run.dir={tmp_path / 'resume_job'}"],
                                 cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    got, want = records(run_dir), records(ref_dir)
    assert [r["epoch"] for r in got] == list(range(total))  # each epoch exactly once, in order
    assert [r["action"] for r in got] == [r["action"] for r in want]
    assert [r["reward"] for r in got] == [r["reward"] for r in want]
    assert [r["phase"] for r in got] == [r["phase"] for r in want]
    assert len({r["action"] for r in want}) > 1  # a policy that explores, not one constant arm
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == total
    assert summary["mean_reward"] == pytest.approx(json.loads((ref_dir / "summary.json").read_text())["mean_reward"])


def test_sb3_run_killed_after_a_checkpoint_resumes_without_losing_or_repeating_epochs(tiny_train_env, tmp_path):
    """DQN (model + replay buffer checkpointed per episode): SIGKILL once a checkpoint exists, resume, and every
    epoch is logged exactly once, with each episode meeting the same phases as an uninterrupted run."""
    episodes = 12
    total = episodes * EPISODE_EPOCHS
    run_dir = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as run_log:
        killed = subprocess.Popen(train_cmd(tiny_train_env, run_dir, "agent=dqn", "seed=1", f"episodes={episodes}"),
                                  cwd=ROOT, env=ENV, stdout=run_log, stderr=subprocess.STDOUT)
        sigkill_when(killed, (run_dir / "checkpoint.json").exists, tmp_path / "killed.log",
                     "no checkpoint within 120 s")
    done = json.loads((run_dir / "checkpoint.json").read_text())["epochs_done"]
    assert done % EPISODE_EPOCHS == 0 and 0 < done < total
    assert (run_dir / "sb3_checkpoint.zip").exists() and (run_dir / "sb3_replay_buffer.pkl").exists()
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run([sys.executable, str(TRAIN), f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'job'}"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = records(run_dir)
    assert [r["epoch"] for r in got] == list(range(total))
    phases = [r["phase"] for r in got]
    assert phases == phases[:EPISODE_EPOCHS] * episodes  # every episode starts at its beginning
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == total


# ------------------------------------------------------------------------------------------ bad input


BAD_INPUT: tuple[tuple[tuple[str, ...], str], ...] = (
    (("agent=nope",), "Could not find 'agent/nope'"),
    (("agent=sw_ucb", "agent.window=-3"), "window must be a positive integer; got -3"),
    (("agent=epsilon_greedy", "agent.epsilon=1.5"), "epsilon must be in [0.0, 1.0]; got 1.5"),
    (("agent=d_ucb", "agent.discount=0"), "discount must be in (0.0, 1.0]; got 0"),
    (("agent=d_ucb", "agent.discount=1.2"), "discount must be in (0.0, 1.0]; got 1.2"),
    (("agent=ppo", "agent.gamma=1.5"), "ppo.gamma must be in (0.0, 1.0]; got 1.5"),
    (("agent=mpc",), "plans through replay's simulator (it forks the episode): run it with env=replay live_eval=false"),
)


def test_bad_agent_config_fails_before_any_model_loads(tmp_path):
    """Unknown agent (Hydra lists the choices) and out-of-range hyper-parameters: a clear error and no trace
    recorded. build_traces=true with an empty trace_dir would record traces (loading the models) if a run got as far
    as the environment. The runs go in parallel (each is an interpreter + Hydra start)."""
    start = time.monotonic()
    procs = []
    for i, (overrides, _) in enumerate(BAD_INPUT):
        cmd = [sys.executable, str(TRAIN), "env=replay", "env.candidates=tiny", "env.build_traces=true",
               f"env.trace_dir={tmp_path / f'traces{i}'}", "logger=none", *overrides, f"hydra.run.dir={tmp_path / f'run{i}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for i, ((overrides, message), proc) in enumerate(zip(BAD_INPUT, procs)):
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode != 0, overrides
        assert message in stderr, (overrides, stderr[-2000:])
        if overrides == ("agent=nope",):  # Hydra lists the valid choices
            for choice in ("ucb", "sw_ucb", "thompson", "helios", "maskable_ppo"):
                assert f"\t{choice}\n" in stderr
        assert not (tmp_path / f"traces{i}").exists(), overrides
        assert not (tmp_path / f"run{i}" / "metrics.jsonl").exists(), overrides
    elapsed = time.monotonic() - start
    assert elapsed < 45, f"took {elapsed:.1f} s"  # interpreters + Hydra only (recording the traces takes longer)


def test_reference_depth_missing_from_the_arm_table_is_a_clear_error_before_any_epoch(tiny_train_env, tmp_path):
    """The reference candidate (tiny-llama, 6 layers) listed without its full depth: no static yardstick exists.
    The run used to crash in its first epoch on `oracle_rewards[None]`; it must stop before any epoch, say why, and
    name the arms that do exist."""
    run_dir = tmp_path / "run"
    candidates = "env.candidates=[{name:tiny-llama,depths:[2,4]},{name:tiny-gemma3,depths:[3,6]}]"
    result = subprocess.run(train_cmd(tiny_train_env, run_dir, candidates, "agent=ucb", "episodes=1"), cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no static arm: the reference candidate 'tiny-llama' at full depth (depth 6)" in result.stderr, \
        result.stderr[-3000:]
    for label in ("tiny-llama@2/6 exit=none", "tiny-llama@4/6 exit=none", "tiny-gemma3@6/6 exit=none"):
        assert label in result.stderr
    assert line_count(run_dir / "metrics.jsonl") == 0 and not (run_dir / "checkpoint.json").exists()

    # without yardsticks the same arm table trains, and nothing claims a regret or a static reward
    result = subprocess.run(train_cmd(tiny_train_env, run_dir, candidates, "agent=ucb", "episodes=1", "oracle=false"),
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == EPISODE_EPOCHS
    assert not {"regret", "static_mean_reward", "oracle_mean_reward"} & set(summary)


# ------------------------------------------------------------------------------------------ multirun + compare


def test_multirun_then_compare(tiny_train_env, tmp_path):
    """`-m agent=helios,ppo` (a bandit-loop agent that needs the arm table, and an SB3 agent) finishes every job;
    scripts/compare.py turns the sweep directory into Markdown, CSV and PNG with one row per agent (the interval
    arithmetic over seeds is tested on synthetic runs in test_compare.py)."""
    sweep = tmp_path / "multirun"
    result = subprocess.run(
        [sys.executable, str(TRAIN), "-m", "agent=helios,ppo", "seed=1", *tiny_train_env["overrides"], "episodes=1",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0_helios_s1", "1_ppo_s1"]
    for path in summaries:  # SB3 runs carry the same comparison fields as the bandit loop
        summary = json.loads(path.read_text())
        # exactly one episode: PPO (n_steps 30) used to finish its second 30-step rollout, 60 epochs for 40
        assert summary["epochs"] == EPISODE_EPOCHS == len(records(path.parent)), path
        assert (path.parent / "reward_regret.png").exists(), path  # the SB3 run is plotted like the bandit one
        for key in ("mean_reward", "regret", "oracle_mean_reward", "static_mean_reward", "mean_throughput_tok_s",
                    "mean_latency_p95_s", "mean_energy_j_per_tok", "mean_accuracy"):
            assert math.isfinite(summary[key]), (path, key)
        assert summary["regret"] >= 0

    compared = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), str(sweep)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=60)
    assert compared.returncode == 0, compared.stderr[-2000:]
    rows = (sweep / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("group,n,seeds,reward_mean,reward_ci95")
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["agent=helios", "agent=ppo"]
    assert all(r.split(",")[1:3] == ["1", "1"] for r in rows[1:])  # n, seeds
    assert "| `agent=helios` | 1 |" in (sweep / "compare.md").read_text()
    assert (sweep / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ W&B sweep


def sample(spec: dict, rng: random.Random):
    """One value from a W&B sweep parameter spec (the distributions conf/sweep/*.yaml use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind = spec["distribution"]
    if kind == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if kind == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    raise AssertionError(f"distribution {kind!r} not handled by this test")


def test_wandb_sweep_config_runs_its_command_once(tiny_train_env, tmp_path):
    """Parse conf/sweep/wandb_ucb.yaml, sample its parameters, expand `command` as `wandb agent` does (wandb's own
    create_sweep_command_args; ${env} -> /usr/bin/env, ${interpreter} -> python, ${program}), and run it once on the
    tiny replay env with logger=none and one episode appended."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep = yaml.safe_load((ROOT / "conf" / "sweep" / "wandb_ucb.yaml").read_text())
    assert sweep["program"] == "scripts/train.py" and (ROOT / sweep["program"]).exists()
    assert "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"]["name"] == "mean_reward"  # written to summary.json and the W&B run summary
    assert sweep["method"] in ("random", "grid", "bayes")
    params = {name: sample(spec, random.Random(7)) for name, spec in sweep["parameters"].items()}
    assert params["agent"] == "sw_ucb"

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command: list[str] = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += sweep_vars[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    assert command[:3] == ["/usr/bin/env", "python", "scripts/train.py"]
    assert f"agent.window={params['agent.window']}" in command

    run_dir = tmp_path / "sweep_run"
    # The tiny runs pin slo=balanced; the sweep samples its own, so that pin is left out here.
    extra = [*(o for o in tiny_train_env["overrides"] if not o.startswith("slo=")), "episodes=1",
             f"hydra.run.dir={run_dir}"]
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}"}  # `python` = this venv's
    result = subprocess.run(command + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["agent"]["name"] == "sw_ucb"
    assert config["agent"]["window"] == params["agent.window"]
    assert config["agent"]["c"] == pytest.approx(params["agent.c"])
    assert config["slo"]["name"] == params["slo"] and config["seed"] == params["seed"]
    assert config["logger"]["kind"] == "none" and config["episodes"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == EPISODE_EPOCHS and math.isfinite(summary[sweep["metric"]["name"]])


# ------------------------------------------------------------------------------------------ launchers


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")
@pytest.mark.parametrize("name, schema, changed", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.config:JobLibLauncherConf", {"n_jobs": 2}),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.config:SlurmQueueConf", {"cpus_per_task": 2}),
])
def test_launcher_config_is_valid_for_its_plugin(name, schema, changed):
    """conf/hydra/launcher/<name>.yaml merges into the plugin's schema (every key known, every type right), is what
    `hydra/launcher=<name>` selects, and instantiates the plugin's launcher."""
    import importlib

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    module, cls = schema.split(":")
    pytest.importorskip(module.rsplit(".", 1)[0])
    dataclass_ = getattr(importlib.import_module(module), cls)
    path = ROOT / "conf" / "hydra" / "launcher" / f"{name}.yaml"
    mine = OmegaConf.load(path)
    merged = OmegaConf.merge(OmegaConf.structured(dataclass_), mine)
    assert set(mine) == set(OmegaConf.structured(dataclass_))  # a complete config, not a partial one
    assert merged._target_ == dataclass_._target_

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    for key, value in changed.items():
        assert cfg.hydra.launcher[key] == value  # our file, not the plugin's defaults
    launcher = instantiate(OmegaConf.merge(cfg.hydra.launcher, {"submitit_folder": "/tmp/x", "name": "x"})
                           if name.startswith("submitit") else cfg.hydra.launcher)
    assert type(launcher).__name__ == dataclass_._target_.rsplit(".", 1)[1]


# ------------------------------------------------------------------------------------------ the main job's live step


@pytest.mark.parametrize(("agent", "epochs"), [("ucb", 3), ("ppo", 12)])
def test_replay_training_then_a_live_evaluation_episode_on_the_same_arrivals(tiny_train_env, tmp_path, agent, epochs):
    """The main job's shape on tiny models: train on replay for 2 episodes of an open-loop workload whose rate is
    relative to a measured capacity, then one episode of the learned policy live and on replay (its first
    `live_eval_epochs`: 3 of 4, or 12, more than the episode has: all 4). Live must offer the same arrivals as replay
    (its rate is replay's capacity made absolute, and replay plays the workload's own draw, variant 0): the epochs'
    submitted counts and phases are equal run for run, and the agreement figures are computed from the two runs' own
    records."""
    run_dir = tmp_path / "run"
    n = min(epochs, 4)
    result = subprocess.run(train_cmd(
        tiny_train_env, run_dir, f"agent={agent}", "episodes=2", "live_eval=true", f"live_eval_epochs={epochs}",
        "oracle=false", "slo=goodput",
        "workload.episode_epochs=4",
        "~workload.arrival", "+workload.arrival={kind:gamma,cv:1.0,epoch_s:0.5,rate_x_capacity:1.0,"
                             "capacity_of:'tiny-llama@6'}",
        "workload.phases=[{epochs:2,load:0.5,mixture:{qa:1.0}},{epochs:2,load:2.0,mixture:{code:1.0}}]"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "live_eval.jsonl").read_text().splitlines()]
    live = [r for r in lines if r["backend"] == "live"]
    replay = [r for r in lines if r["backend"] == "replay"]
    assert len(live) == len(replay) == n
    assert [r["epoch"] for r in live] == [r["epoch"] for r in replay] == [8, 9, 10, 11][:n]  # after training
    assert [r["phase"] for r in live] == [r["phase"] for r in replay] == [0, 0, 1, 1][:n]
    assert [r["load"]["submitted"] for r in live] == [r["load"]["submitted"] for r in replay]
    assert sum(r["load"]["submitted"] for r in live) > 0
    agreement = summary["live_eval"]
    same = sum(a["action"] == b["action"] for a, b in zip(live, replay)) / n
    assert agreement["arm_agreement"] == pytest.approx(same)
    assert agreement["reward_live"] == pytest.approx(sum(r["reward"] for r in live) / n)
    assert agreement["metrics"]["goodput_rps"]["live"] == pytest.approx(
        sum(r["metrics"]["goodput_rps"] for r in live) / n)
    assert agreement["capacity_rps"] > 0
    assert (run_dir / "live_eval_arms.png").stat().st_size > 0


def test_mpc_plans_a_replay_episode(tiny_train_env, tmp_path):
    """agent=mpc (a planner: no learning, replay only) runs through the same loop and writes the same summary."""
    run_dir = tmp_path / "mpc"
    result = subprocess.run(train_cmd(tiny_train_env, run_dir, "agent=mpc", "agent.draws=1", "agent.hold_epochs=[1]",
                                      "agent.horizon_epochs=2"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == EPISODE_EPOCHS == len(records(run_dir))
    assert "gap_recovered" in summary and "mean_reward" in summary
