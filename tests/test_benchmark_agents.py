"""benchmarks/agent_bench.py --quick on two tiny replay scenarios, run as a user runs it (a subprocess, from another
directory): the JSON holds the benchmark contract's fields, and the yardsticks obey their definitions (the best fixed
arm recovers 0 of the gap and has the phase oracle's regret, the phase oracle has none, nothing beats the ladder's
best fixed arm by more than the phase oracle's margin allows on a seed without headroom).

    python -m pytest tests/test_benchmark_agents.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_bench.py"
AGENTS = ("ucb", "sw_ucb", "maskable_ppo")  # a bandit, a drift-aware bandit, an SB3 agent: every code path, quickly
YARDSTICKS = {"static", "best_fixed", "phase_oracle", "per_epoch_oracle", "lagged_phase_oracle"}
# Two 8-epoch scenarios (an abrupt and a gradual drift), closed loop like drift3 and gradual.
SCENARIOS = {
    "abrupt": {"seed": 0, "episode_epochs": 8, "arrival": {"kind": "closed", "batch_size": 4},
               "phases": [{"epochs": 4, "mixture": {"qa": 1.0}}, {"epochs": 4, "mixture": {"code": 1.0}}]},
    "ramp": {"seed": 0, "episode_epochs": 8, "arrival": {"kind": "closed", "batch_size": 4},
             "phases": [{"epochs": 2, "mixture": {"code": 1.0}},
                        {"epochs": 6, "mixture": {"qa": 1.0}, "transition": "linear"}]},
}


def test_quick_benchmark_writes_the_contract(tmp_path: Path) -> None:
    paths = []
    for name, workload in SCENARIOS.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(workload))
    env = json.dumps({"candidates": "tiny", "judge": "tiny-llama", "per_source": 2, "new_tokens": 4, "build_traces": True,
                      "trace_dir": str(tmp_path / "traces")})
    out = tmp_path / "agents.json"
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--slo", "balanced", "--scenarios",
                          ",".join(map(str, paths)), "--agents", ",".join(AGENTS), "--env", env, "--json", str(out), "--md",
                          str(tmp_path / "agents.md")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/agent_bench.py --quick")
    assert len(saved["seeds"]) >= 5  # the statistics: at least 5 seeds, 95% intervals
    assert set(saved["scenarios"]) == set(SCENARIOS)
    for name, s in saved["scenarios"].items():
        # the contract (issue §8)
        assert {"headroom", "best_fixed_arm", "agents", "best_gap_recovered", "vs_static"} <= set(s), name
        assert set(s["agents"]) == {*AGENTS, *YARDSTICKS}
        for agent, a in s["agents"].items():
            assert {"gap_recovered", "gap_recovered_ci95", "regret"} <= set(a), (name, agent)
        assert s["vs_static"], name
        for level, v in s["vs_static"].items():
            assert {"goodput", "p95", "energy", "concurrency"} <= set(v), (name, level)
        # definitions
        assert s["headroom"] >= 1 - 1e-9  # the phase oracle is never below the best fixed arm
        assert s["headroom"] == pytest.approx(2 ** (s["phase_oracle_reward"] - s["best_fixed_reward"]))
        agents = s["agents"]
        assert agents["phase_oracle"]["regret"] == pytest.approx(0.0, abs=1e-9)
        # quick: 2 training episodes of 8 epochs, then 1 frozen evaluation episode, on which R, the gap and the regret
        # are scored (the yardsticks' rewards too, so they are comparable)
        assert saved["episodes"] == 2 and saved["eval_episodes"] == 1
        epochs = 8
        po = agents["phase_oracle"]["reward"]
        assert agents["best_fixed"]["regret"] == pytest.approx(epochs * (po - agents["best_fixed"]["reward"]))
        for a in agents.values():
            assert "gap_recovered_learning" in a
        if min(s["headroom_per_seed"]) >= 1.01:  # over the whole run; on the evaluation epochs it may be smaller
            assert agents["best_fixed"]["gap_recovered"] == pytest.approx(0.0)
            assert agents["phase_oracle"]["gap_recovered"] == pytest.approx(1.0)
            assert s["best_gap_recovered"] == max(agents[a]["gap_recovered"] for a in AGENTS)
        for agent in AGENTS:
            a = agents[agent]
            # dynamic regret = epochs x (R_phase_oracle - R) per seed, so its mean pairs with the mean reward
            assert a["regret"] == pytest.approx(epochs * (po - a["reward"]), abs=1e-6)
            assert a["per_epoch_regret"] >= -1e-9  # the per-epoch price is an upper bound on any served epoch
        assert s["best_agent"] in AGENTS
        closed = s["vs_static"]["closed-loop"]  # drift-free of load: the tiny scenarios are closed loop
        assert closed["goodput"] is None and "goodput_rps" in closed["why_null"]["goodput"]
        assert closed["energy"] is not None and math.isfinite(closed["energy"])
    markdown = (tmp_path / "agents.md").read_text()
    assert "| phase_oracle (yardstick) |" in markdown and "headroom" in markdown
