"""Plots of a training run (PNG, written atomically): what users look at first. scripts/train.py draws them into
its run directory (reward_regret.png, arms.png, pareto.png).

    python scripts/train.py agent=ucb env=replay          # then open outputs/train/<run>/reward_regret.png
    from helios.plots import plot_reward_and_regret
    plot_reward_and_regret(records, phase_starts, path, title, yardsticks={"phase oracle": rewards, ...})

Regret is drawn against the played phase oracle (agents/yardsticks.py), never against the per-epoch oracle, which is
only reported; a panel without its data says why on the plot instead of staying empty.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
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


def _shade_phases(ax: Axes, phases: Sequence[int], end: float | None = None) -> None:
    """Workload phases as alternately shaded spans (`phases`: the first epoch of each phase, in order; `end`: one
    past the last epoch), so a reader sees where the drift happens without reading tick labels."""
    if not phases:
        return
    stops = [*phases[1:], end if end is not None else phases[-1] + 1]
    for i, (start, stop) in enumerate(zip(phases, stops)):
        if i % 2:
            ax.axvspan(start - 0.5, stop - 0.5, color="tab:orange", alpha=0.12, lw=0)
        if i:
            ax.axvline(start - 0.5, color="tab:red", lw=0.6, ls="--", alpha=0.6)


def plot_reward_and_regret(records: list[dict], phases: Sequence[int], path: Path, title: str,
                           why_no_regret: str | None = None,
                           yardsticks: Mapping[str, Sequence[float]] | None = None) -> Path:
    """Reward per epoch with the yardsticks, above the cumulative dynamic regret vs the played phase oracle
    (agents/yardsticks.py). Without a phase oracle (live backend, oracle=false) the lower panel shows the cumulative
    reward instead and says on the plot why regret is absent (`why_no_regret`), rather than staying empty."""
    return _save(reward_and_regret_figure(records, phases, title, why_no_regret, yardsticks), path)


def reward_and_regret_figure(records: list[dict], phases: Sequence[int], title: str,
                             why_no_regret: str | None = None,
                             yardsticks: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """The figure plot_reward_and_regret saves (axes[0]: rewards, axes[1]: cumulative regret or reward).

    `yardsticks`: per-epoch rewards of played rungs aligned with `records` ("phase oracle", "best fixed arm",
    "static full depth"); the "phase oracle" series is the regret's comparator. The per-epoch oracle the records
    may carry (`oracle_reward`) is drawn faintly: reported, never a target."""
    plt = _pyplot()
    epochs = np.array([r["epoch"] for r in records])
    reward = np.array([r["reward"] for r in records])
    yardsticks = {k: np.asarray(v, dtype=float) for k, v in (yardsticks or {}).items()}
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    axes[0].plot(epochs, reward, lw=1.2, label="agent", zorder=3)
    styles = {"phase oracle": dict(color="k", lw=1.2), "best fixed arm": dict(color="tab:green", lw=1, ls="--"),
              "static full depth": dict(color="tab:gray", lw=1, ls=":")}
    for name, values in yardsticks.items():
        axes[0].plot(epochs, values, label=name, **styles.get(name, dict(lw=1)))
    if "static full depth" not in yardsticks and records and all("static_reward" in r for r in records):
        axes[0].plot(epochs, [r["static_reward"] for r in records], label="static full depth (priced)",
                     **styles["static full depth"])
    if records and all("oracle_reward" in r for r in records):
        axes[0].plot(epochs, [r["oracle_reward"] for r in records], lw=0.8, color="tab:purple", alpha=0.35,
                     label="per-epoch oracle (reported, not a target)")
    comparator = yardsticks.get("phase oracle")
    if comparator is not None and comparator.size == reward.size and reward.size:
        axes[1].plot(epochs, np.cumsum(comparator - reward), color="tab:purple")
        axes[1].axhline(0.0, color="0.5", lw=0.5)
        axes[1].set_ylabel("cumulative regret\nvs phase oracle")
    else:
        axes[1].plot(epochs, np.cumsum(reward), color="tab:blue")
        axes[1].set_ylabel("cumulative SLO reward")
        # Said above the panel, not inside it, so the note never hides the curve.
        why = why_no_regret or "no played phase oracle was given for these epochs"
        axes[1].set_title(textwrap.fill(f"No regret vs the phase oracle: {why}. Shown: cumulative reward.", 110),
                          fontsize=8, loc="left", color="0.25")
    axes[0].set_ylabel("SLO reward")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title)
    end = float(epochs[-1] + 1) if epochs.size else None
    for ax in axes:
        _shade_phases(ax, phases, end)
    axes[1].set_xlabel("epoch (workload phases shaded)")
    fig.tight_layout()
    return fig


def plot_arms(records: list[dict], arm_labels: Sequence[str], phases: Sequence[int], path: Path, title: str,
              schedule: Sequence[int] | None = None, other: tuple[str, list[dict]] | None = None) -> Path:
    """The arm played each epoch, with the workload phases shaded and the offered load (arrivals per second, right
    axis) where the records carry it; `schedule`: the phase oracle's arm per epoch; `other`: (name, records) of a
    second run of the same epochs to overlay (the live evaluation beside replay)."""
    return _save(arms_figure(records, arm_labels, phases, title, schedule, other), path)


def arms_figure(records: list[dict], arm_labels: Sequence[str], phases: Sequence[int], title: str,
                schedule: Sequence[int] | None = None, other: tuple[str, list[dict]] | None = None) -> Figure:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(arm_labels)))
    epochs = np.array([r["epoch"] for r in records])
    ax.scatter(epochs, [r["action"] for r in records], s=14, label="chosen arm", zorder=3)
    if other is not None:
        name, second = other
        ax.scatter([r["epoch"] for r in second], [r["action"] for r in second], s=40, marker="o", facecolors="none",
                   edgecolors="tab:red", label=f"chosen arm ({name})", zorder=4)
    if schedule is not None and len(schedule) == len(records):
        ax.step(epochs, schedule, where="mid", color="k", lw=1, alpha=0.7, label="phase oracle's arm")
    ax.set_yticks(range(len(arm_labels)), arm_labels, fontsize=7)
    ax.set_xlabel("epoch (workload phases shaded)")
    ax.set_title(title)
    rates = [r.get("load", {}).get("arrival_rps") if isinstance(r.get("load"), dict) else None for r in records]
    if epochs.size and all(rate is not None for rate in rates):
        right = ax.twinx()
        right.plot(epochs, rates, color="tab:orange", lw=1.2, alpha=0.8, label="arrivals/s")
        right.set_ylabel("arrivals per second", color="tab:orange", fontsize=8)
        right.tick_params(axis="y", labelcolor="tab:orange", labelsize=7)
        right.set_ylim(bottom=0)
        right.legend(fontsize=7, loc="upper left")
    ax.legend(fontsize=7, loc="upper right")
    _shade_phases(ax, phases, float(epochs[-1] + 1) if epochs.size else None)
    fig.tight_layout()
    return fig


def plot_learning_curve(records: list[dict], rungs: dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """Mean reward per episode of the run, beside the same of each yardstick rung (rewards per epoch, the run's
    epochs in order): whether the agent learns, and towards which rung."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    episodes = np.array([r["episode"] for r in records])
    order = sorted(set(episodes.tolist()))

    def per_episode(values: Sequence[float]) -> list[float]:
        values = np.asarray(values, dtype=float)
        return [float(values[episodes == e].mean()) for e in order]

    ax.plot(order, per_episode([r["reward"] for r in records]), "o-", label="agent", zorder=3)
    styles = {"phase oracle": ("k", "-"), "best fixed arm": ("tab:green", "--"), "static full depth": ("grey", ":")}
    for name, values in rungs.items():
        color, line = styles.get(name, (None, "-"))
        ax.plot(order, per_episode(values), color=color, ls=line, label=name)
    ax.set_xlabel("episode")
    ax.set_ylabel("mean SLO reward per epoch")
    ax.set_title(title)
    ax.legend(fontsize=8)
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
