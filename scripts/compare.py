"""Compare training runs: mean ± 95% CI over seeds of SLO reward, regret, throughput, latency, energy and accuracy.

    python scripts/train.py -m agent=ucb,sw_ucb,thompson,helios,ppo seed=0,1,2 env=replay   # -> multirun/<time>/
    python scripts/compare.py multirun/<time>                      # a multirun directory (searched recursively)
    python scripts/compare.py outputs/train/run_a outputs/train/run_b --out /tmp/cmp   # or several run directories

Every directory holding a summary.json (written by scripts/train.py when a run finishes) is one run; runs without one
(killed, unfinished) are listed and skipped. Runs are grouped by their Hydra overrides (.hydra/overrides.yaml) minus
`seed=`, with the overrides shared by every run left out of the label; a run without overrides is grouped by agent and
SLO. Per group and metric: the mean over seeds and the half-width of its 95% confidence interval from Student's t
distribution, t(0.975, n - 1) * s / sqrt(n) (none for a single seed; runs with a null value are left out of that
column). Replay runs with oracle=true carry the yardstick ladder (agents/yardsticks.py): `gap_recovered` =
(R - R_best_fixed) / (R_phase_oracle - R_best_fixed) (0 = the best fixed arm in hindsight, 1 = the played phase
oracle; RouteLLM's APGR form, Ong et al. 2024), `dynamic_regret` against the played phase oracle, and `headroom` =
2 ** (R_phase_oracle - R_best_fixed). `frac_oracle` = (R - R_static) / (R_oracle - R_static) and `regret` are
against the per-epoch oracle: reported, never a target. Writes compare.md, compare.csv and compare.png into --out
(default: the first directory given).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

# (column, summary.json key or None for derived, what it is)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("reward", "mean_reward", "mean SLO reward per epoch"),
    ("gap_recovered", "gap_recovered",
     "(R - R_best_fixed) / (R_phase_oracle - R_best_fixed), RouteLLM's APGR form (replay)"),
    ("dynamic_regret", "dynamic_regret", "sum over epochs of (played phase oracle's reward - reward) (replay)"),
    ("headroom", "headroom", "2 ** (R_phase_oracle - R_best_fixed): the SLO objective ratio (replay)"),
    ("frac_oracle", "", "(R - R_static) / (R_oracle - R_static), per-epoch oracle: reported, not a target"),
    ("regret", "regret", "cumulative regret vs the per-epoch oracle: reported, not a target"),
    ("throughput_tok_s", "mean_throughput_tok_s", "tokens/s"),
    ("latency_p95_s", "mean_latency_p95_s", "p95 latency, s"),
    ("energy_j_per_tok", "mean_energy_j_per_tok", "J/token"),
    ("accuracy", "mean_accuracy", "accuracy"),
)
DROPPED_OVERRIDE_PREFIXES = ("seed=", "hydra.", "resume=")


@dataclass
class Run:
    path: Path
    summary: dict
    overrides: list[str] | None


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


def find_runs(paths: list[Path]) -> tuple[list[Run], list[Path]]:
    """Runs (directories with summary.json) under `paths`, and the Hydra job directories that have none."""
    runs, unfinished = [], []
    for root in paths:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        for config in sorted(root.rglob(".hydra/config.yaml")):
            run_dir = config.parent.parent
            if not (run_dir / "summary.json").exists():
                unfinished.append(run_dir)
        for summary_path in sorted(root.rglob("summary.json")):
            run_dir = summary_path.parent
            overrides_path = run_dir / ".hydra" / "overrides.yaml"
            overrides = list(OmegaConf.load(overrides_path)) if overrides_path.exists() else None
            runs.append(Run(run_dir, json.loads(summary_path.read_text()), overrides))
    return runs, unfinished


def group_runs(runs: list[Run]) -> list[Group]:
    def kept(run: Run) -> list[str] | None:
        if run.overrides is None:
            return None
        return [o for o in run.overrides if not o.startswith(DROPPED_OVERRIDE_PREFIXES)]

    with_overrides = [set(kept(r)) for r in runs if r.overrides is not None]
    common = set.intersection(*with_overrides) if with_overrides else set()
    groups: dict[str, Group] = {}
    for run in runs:
        overrides = kept(run)
        if overrides is None:
            label = f"agent={run.summary.get('agent')} slo={run.summary.get('slo')}"
        else:
            label = " ".join(o for o in overrides if o not in common) or f"agent={run.summary.get('agent')}"
        groups.setdefault(label, Group(label)).runs.append(run)
    return list(groups.values())


def metric_values(group: Group, column: str, key: str) -> np.ndarray:
    values = []
    for run in group.runs:
        s = run.summary
        if column == "frac_oracle":
            if all(k in s for k in ("mean_reward", "oracle_mean_reward", "static_mean_reward")):
                gap = s["oracle_mean_reward"] - s["static_mean_reward"]
                values.append((s["mean_reward"] - s["static_mean_reward"]) / gap if abs(gap) > 1e-12 else math.nan)
        elif key in s:
            # null: no gap to recover on that run (its phase oracle did not beat the best fixed arm)
            values.append(math.nan if s[key] is None else float(s[key]))
    return np.array(values, dtype=float)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (nan for fewer than two values)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    if values.size == 1:
        return float(values[0]), math.nan
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def table(groups: list[Group]) -> list[dict]:
    rows = []
    for group in groups:
        row: dict = {"group": group.label, "n": len(group.runs),
                     "seeds": ",".join(str(r.summary.get("seed")) for r in group.runs)}
        for column, key, _ in METRICS:
            row[f"{column}_mean"], row[f"{column}_ci95"] = mean_ci95(metric_values(group, column, key))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["reward_mean"] if math.isfinite(r["reward_mean"]) else math.inf)


def fmt(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "—"
    digits = 4 if abs(mean) < 1 else 3
    return f"{mean:.{digits}g}" if not math.isfinite(half) else f"{mean:.{digits}g} ± {half:.2g}"


def write_markdown(rows: list[dict], path: Path, sources: list[Path], unfinished: list[Path]) -> None:
    header = ["group", "n", *(c for c, _, _ in METRICS)]
    lines = [f"Runs from {', '.join(str(s) for s in sources)}: mean ± 95% CI (t distribution) over seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"`{r['group']}`", str(r["n"]), *(fmt(r[f"{c}_mean"], r[f"{c}_ci95"]) for c, _, _ in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- `{c}`: {what}" for c, _, what in METRICS)]
    if unfinished:
        lines += ["", f"Skipped {len(unfinished)} run(s) without summary.json: " + ", ".join(str(u) for u in unfinished)]
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(c, what) for c, _, what in METRICS if any(math.isfinite(r[f"{c}_mean"]) for r in rows)]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1.5, (0.35 * len(rows) + 1.2) * nrows), sharey=True,
                             squeeze=False)
    y = np.arange(len(rows))
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, (column, what) in zip(axes.flat, shown):
        means = np.array([r[f"{column}_mean"] for r in rows])
        halves = np.nan_to_num(np.array([r[f"{column}_ci95"] for r in rows]))
        ax.barh(y, np.nan_to_num(means), xerr=halves, color="tab:blue", alpha=0.7, ecolor="black", capsize=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel(what, fontsize=7)
        ax.axvline(0, color="grey", lw=0.5)
        ax.tick_params(labelsize=7)
    for row_axes in axes:
        row_axes[0].set_yticks(y, [r["group"] for r in rows], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("mean ± 95% CI over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="multirun directories and/or run directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first RUNS given)")
    args = parser.parse_args(argv)
    runs, unfinished = find_runs(args.runs)
    if not runs:
        print(f"no summary.json under {[str(p) for p in args.runs]}", file=sys.stderr)
        return 1
    rows = table(group_runs(runs))
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "compare.md", args.runs, unfinished)
    write_csv(rows, out / "compare.csv")
    plot(rows, out / "compare.png")
    print((out / "compare.md").read_text(), end="")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
