"""scripts/compare.py on synthetic run directories: grouping by overrides minus seed, the t-interval, the outputs.

    python -m pytest tests/test_compare.py -q

The script runs as a user runs it: `python scripts/compare.py ...`, a subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

COMPARE = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), *args], capture_output=True, text=True, timeout=120)


def make_run(root: Path, name: str, overrides: list[str], **summary: float) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_groups_by_overrides_minus_seed_with_a_t_interval(tmp_path):
    rewards = [0.10, 0.30, 0.20]
    gaps = [0.5, None, 0.7]  # seed 1's phase oracle did not beat its best fixed arm: no gap, left out
    for seed, reward in enumerate(rewards):
        make_run(tmp_path, f"{seed}_ucb_s{seed}", ["agent=ucb", f"seed={seed}", "env=replay"], seed=seed,
                 mean_reward=reward, oracle_mean_reward=1.0, static_mean_reward=0.0, regret=10.0 * (seed + 1),
                 gap_recovered=gaps[seed], dynamic_regret=2.0 * seed, headroom=1.5,
                 mean_throughput_tok_s=100.0, mean_latency_p95_s=1.0, mean_energy_j_per_tok=0.5, mean_accuracy=0.8)
    make_run(tmp_path, "3_thompson_s0", ["agent=thompson", "seed=0", "env=replay"], seed=0, mean_reward=0.5,
             mean_throughput_tok_s=90.0, mean_latency_p95_s=1.1, mean_energy_j_per_tok=0.6, mean_accuracy=0.7)
    unfinished = tmp_path / "4_ppo_s0"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text("{}\n")

    result = compare(str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["group"]: r for r in csv.DictReader((tmp_path / "out" / "compare.csv").open())}
    assert set(rows) == {"agent=ucb", "agent=thompson"}  # env=replay is shared, so it is left out of the labels
    ucb = rows["agent=ucb"]
    assert int(ucb["n"]) == 3 and ucb["seeds"] == "0,1,2"
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n); s of (0.1, 0.3, 0.2) is 0.1
    assert float(ucb["reward_mean"]) == pytest.approx(0.2)
    assert float(ucb["reward_ci95"]) == pytest.approx(half)
    assert float(ucb["frac_oracle_mean"]) == pytest.approx(0.2)  # (R - 0) / (1 - 0)
    assert float(ucb["regret_mean"]) == pytest.approx(20.0)
    assert float(ucb["gap_recovered_mean"]) == pytest.approx(0.6)  # (0.5 + 0.7) / 2, the null left out
    # t(0.975, 1) * s / sqrt(2), s of (0.5, 0.7) = 0.1 * sqrt(2): 12.706 * 0.1
    assert float(ucb["gap_recovered_ci95"]) == pytest.approx(12.706204736174707 * 0.1)
    assert float(ucb["dynamic_regret_mean"]) == pytest.approx(2.0)
    assert float(ucb["headroom_mean"]) == pytest.approx(1.5)
    thompson = rows["agent=thompson"]
    assert int(thompson["n"]) == 1 and math.isnan(float(thompson["reward_ci95"]))  # no interval from one seed
    assert math.isnan(float(thompson["frac_oracle_mean"]))  # no oracle fields in its summary
    assert math.isnan(float(thompson["gap_recovered_mean"]))  # nor a ladder (a live run)
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert markdown.index("`agent=thompson`") < markdown.index("`agent=ucb`")  # sorted by reward
    assert "4_ppo_s0" in markdown  # the unfinished run is reported as skipped
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000


def test_no_runs_is_an_error(tmp_path):
    result = compare(str(tmp_path))
    assert result.returncode == 1
    assert "no summary.json under" in result.stderr
