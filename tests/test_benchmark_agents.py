"""benchmarks/agents.py --quick on the tiny replay env: every agent and baseline runs in-process, and the numbers obey
their definitions (static = 0 of the oracle gap, regret >= 0, the oracle bound above every agent).

    /work/main/.venv/bin/python -m pytest tests/test_benchmark_agents.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# benchmarks/agents.py shares its module name with the `agents` package: load it under another name.
_SPEC = importlib.util.spec_from_file_location("bench_agents", Path(__file__).resolve().parents[1] / "benchmarks" / "agents.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_agents"] = bench
_SPEC.loader.exec_module(bench)


@pytest.mark.filterwarnings("ignore::UserWarning")  # SB3's notes on the tiny env (e.g. its observation bounds)
def test_quick_benchmark_on_tiny(tiny_train_env, tmp_path):
    out = tmp_path / "agents.json"
    env = json.dumps(tiny_train_env["env_kwargs"])
    result = bench.main(["--quick", "--slos", "throughput,balanced", "--env", env, "--json", str(out),
                         "--md", str(tmp_path / "agents.md")])
    saved = json.loads(out.read_text())
    expected = {*bench.BANDITS, *bench.SB3, *bench.BASELINES}
    assert set(saved["agents"]) == expected
    for name, entry in saved["agents"].items():
        assert {"reward_fraction_of_oracle", "regret"} <= set(entry)
    assert set(saved["gain_vs_static"]) == {"throughput", "balanced"}
    assert saved["best_agent"] in {*bench.BANDITS, *bench.SB3}
    assert saved["best_fraction_of_oracle"] == pytest.approx(
        max(saved["agents"][n]["reward_fraction_of_oracle"] for n in {*bench.BANDITS, *bench.SB3}))
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
