"""benchmarks/agent_bench.py --quick on the tiny replay env, run as a user runs it (a subprocess, from another
directory): every agent and baseline runs, and the numbers obey their definitions (static = 0 of the oracle gap,
regret >= 0, the oracle bound above every agent).

    python -m pytest tests/test_benchmark_agents.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_bench.py"
BANDITS = {"ucb", "thompson", "epsilon_greedy", "exp3", "sw_ucb", "d_ucb", "cusum_ucb", "lin_ucb", "helios"}
SB3 = {"ppo", "a2c", "dqn", "maskable_ppo"}
BASELINES = {"static", "best_in_hindsight", "phase_oracle", "oracle"}


def test_quick_benchmark_on_tiny(tiny_train_env, tmp_path):
    out = tmp_path / "agents.json"
    env = json.dumps(tiny_train_env["env_kwargs"])
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--slos", "throughput,balanced", "--env", env,
                          "--json", str(out), "--md", str(tmp_path / "agents.md")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = result = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/agent_bench.py --quick")
    expected = {*BANDITS, *SB3, *BASELINES}
    assert set(saved["agents"]) == expected
    for name, entry in saved["agents"].items():
        assert {"reward_fraction_of_oracle", "regret"} <= set(entry)
    assert set(saved["gain_vs_static"]) == {"throughput", "balanced"}
    assert saved["best_agent"] in {*BANDITS, *SB3}
    assert saved["best_fraction_of_oracle"] == pytest.approx(
        max(saved["agents"][n]["reward_fraction_of_oracle"] for n in {*BANDITS, *SB3}))
    for slo, s in result["slos"].items():
        agents = s["agents"]
        assert agents["static"]["reward_fraction_of_oracle"] == pytest.approx(0.0)
        assert agents["static"]["gains"]["throughput"] == pytest.approx(1.0)
        for name, a in agents.items():
            assert a["regret"] >= -1e-9, (slo, name)  # the per-epoch bound is above every reward earned
            assert a["reward"] <= s["oracle_bound_reward"] + 1e-9, (slo, name)
            assert a["reward_fraction_of_oracle"] <= 1 + 1e-9, (slo, name)
        # the fraction is (R - R_static) / (R_bound - R_static), recomputed from the reported means
        thompson = agents["thompson"]
        assert s["oracle_bound_reward"] > s["static_reward"]
        assert thompson["reward_ratio_to_oracle"] == pytest.approx(thompson["reward"] / s["oracle_bound_reward"],
                                                                   rel=0.2)
        assert s["best_agent"] == max((n for n, a in agents.items() if a["adaptive"]), key=lambda n: agents[n]["reward"])
    assert "| oracle (baseline) |" in (tmp_path / "agents.md").read_text()
