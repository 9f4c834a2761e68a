"""Plots of a training run (PNG, written atomically): what users look at first. scripts/train.py draws them into
its run directory (reward_regret.png, arms.png, pareto.png).

    python scripts/train.py agent=ucb env=replay          # then open outputs/train/<run>/reward_regret.png
    from helios.plots import plot_reward_and_regret; plot_reward_and_regret(records, phase_starts, path, title)
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from helios.paths import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> Path:
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    _pyplot().close(fig)
    return path


def _shade_phases(ax: Axes, phases: Sequence[int]) -> None:
    """Vertical lines at the first epoch of every workload phase after the first."""
    for boundary in phases[1:]:
        ax.axvline(boundary - 0.5, color="tab:red", lw=0.8, ls="--")


def plot_reward_and_regret(records: list[dict], phases: Sequence[int], path: Path, title: str,
                           why_no_regret: str | None = None) -> Path:
    """Reward per epoch (with the oracle and static yardsticks when the records carry them) above the cumulative
    regret vs the oracle. Without yardsticks (live backend, oracle=false) the lower panel shows the cumulative
    reward instead and says on the plot why regret is absent (`why_no_regret`), rather than staying empty."""
    return _save(reward_and_regret_figure(records, phases, title, why_no_regret), path)


def reward_and_regret_figure(records: list[dict], phases: Sequence[int], title: str,
                             why_no_regret: str | None = None) -> Figure:
    """The figure plot_reward_and_regret saves (axes[0]: rewards, axes[1]: cumulative regret or reward)."""
    plt = _pyplot()
    epochs = np.array([r["epoch"] for r in records])
    reward = np.array([r["reward"] for r in records])
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    axes[0].plot(epochs, reward, lw=1, label="agent")
    if records and all("oracle_reward" in r for r in records):
        oracle = np.array([r["oracle_reward"] for r in records])
        axes[0].plot(epochs, oracle, lw=1, color="k", alpha=0.6, label="oracle (best arm per epoch)")
        axes[1].plot(epochs, np.cumsum(oracle - reward), color="tab:purple")
        axes[1].set_ylabel("cumulative regret vs oracle")
    else:
        axes[1].plot(epochs, np.cumsum(reward), color="tab:blue")
        axes[1].set_ylabel("cumulative SLO reward")
        # Said above the panel, not inside it, so the note never hides the curve.
        why = why_no_regret or "the records carry no oracle reward"
        axes[1].set_title(textwrap.fill(f"No regret vs the oracle: {why}. Shown: cumulative reward.", 110),
                          fontsize=8, loc="left", color="0.25")
    if records and all("static_reward" in r for r in records):
        axes[0].plot(epochs, [r["static_reward"] for r in records], lw=1, ls=":", color="tab:gray",
                     label="static full depth")
    axes[0].set_ylabel("SLO reward")
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    for ax in axes:
        _shade_phases(ax, phases)
    axes[1].set_xlabel("epoch (workload phases: dashed)")
    fig.tight_layout()
    return fig


def plot_arms(records: list[dict], arm_labels: Sequence[str], phases: Sequence[int], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.28 * len(arm_labels)))
    epochs = [r["epoch"] for r in records]
    ax.scatter(epochs, [r["action"] for r in records], s=12, label="chosen arm")
    if records and all("oracle_action" in r for r in records):
        ax.scatter(epochs, [r["oracle_action"] for r in records], s=30, facecolors="none", edgecolors="k",
                   lw=0.6, label="oracle arm")
    ax.set_yticks(range(len(arm_labels)), arm_labels, fontsize=7)
    ax.set_xlabel("epoch (workload phases: dashed)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    _shade_phases(ax, phases)
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(arm_points: list[dict], path: Path, title: str) -> Path:
    """Mean throughput vs accuracy of each arm the run observed; the non-dominated ones joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = np.array([p["tokens_per_s"] for p in arm_points])
    ys = np.array([p["accuracy"] for p in arm_points])
    ax.scatter(xs, ys, s=[20 + 4 * p.get("pulls", 1) for p in arm_points], alpha=0.7)
    for p in arm_points:
        ax.annotate(p["label"], (p["tokens_per_s"], p["accuracy"]), fontsize=6, alpha=0.8)
    order = np.argsort(-xs)
    front, best = [], -np.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    ax.plot(xs[front], ys[front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("tokens/s (mean over epochs played)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
