"""Arms: what an agent chooses between. A candidate truncated to a depth, an exit setting, and the batch that the
memory budget allows beside its weights; plus the exit-layer buckets every histogram of exits uses.

    python -c "from helios.arms import exit_buckets; print(exit_buckets(6, 8))"

The env builds the table (`build_arms`), the server reads it back from an exported policy (`arms_from_dicts`, the
`helios.policy/v1` JSON), and the HELIOS controller and the static agent look arms up in it. Pure arithmetic: no
torch, no models (memory figures come in as `MemoryInfo`, from helios.models or a trace's metadata).

Memory: one sequence reserves K/V for `context_tokens` tokens at every loaded layer, so
    kv_bytes_per_seq = kv_bytes_per_token_layer x depth x context_tokens
    batch_size       = min(max_batch_size, (budget - weight_bytes) // kv_bytes_per_seq)     (0: does not fit)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from helios.exit_config import ExitConfig


@dataclasses.dataclass(frozen=True)
class CandidateSpec:
    name: str
    depths: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ExitSpec:
    """An exit setting; exit points are fractions of the arm's loaded depth (rounded half up, kept in 1..depth-1)."""

    criterion: str = "none"
    threshold: float = 0.9
    exit_fractions: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        if self.criterion == "none":
            return "none"
        return f"{self.criterion}>={self.threshold:g}@{','.join(f'{f:g}' for f in self.exit_fractions)}"

    def exit_config(self, depth: int) -> ExitConfig | None:
        """The engine's ExitConfig at `depth`, or None when no exit point falls inside 1..depth-1."""
        if self.criterion == "none":
            return ExitConfig()
        points = sorted({int(math.floor(f * depth + 0.5)) for f in self.exit_fractions} & set(range(1, depth)))
        if not points:
            return None
        return ExitConfig(self.criterion, float(self.threshold), tuple(points))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """A candidate's memory figures (helios.models.memory_profile, or a trace's metadata)."""

    num_layers: int
    weight_bytes_by_depth: Mapping[int, int]
    kv_bytes_per_token_layer: int


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Memory for resident weights + K/V, the K/V reserved per sequence, and a cap on any batch."""

    budget_bytes: int
    context_tokens: int
    max_batch_size: int

    def kv_bytes_per_seq(self, memory: MemoryInfo, depth: int) -> int:
        return memory.kv_bytes_per_token_layer * depth * self.context_tokens

    def batch_size(self, weight_bytes: int, kv_bytes_per_seq: int) -> int:
        """Sequences that fit beside the weights, capped; 0 = does not fit."""
        free = self.budget_bytes - weight_bytes
        if free <= 0 or kv_bytes_per_seq <= 0:
            return 0
        return int(min(self.max_batch_size, free // kv_bytes_per_seq))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One action: a candidate truncated to `depth` layers, an exit setting, and the batch the budget allows.

    `candidate_index` and `exit_index` place the arm in the table's candidate and exit-setting lists (the
    observation's one-hot entries); `reference` marks the reference run (reference candidate, full depth, no exits).
    """

    index: int
    candidate: str
    candidate_index: int
    depth: int
    num_layers: int
    exit_index: int
    exit_name: str
    exit_config: ExitConfig
    weight_bytes: int
    kv_bytes_per_seq: int
    batch_size: int  # 0 when the arm does not fit the memory budget
    reference: bool = False

    @property
    def feasible(self) -> bool:
        return self.batch_size >= 1

    @property
    def label(self) -> str:
        return f"{self.candidate}@{self.depth}/{self.num_layers} exit={self.exit_name}"

    @property
    def truncated(self) -> bool:
        return self.depth < self.num_layers

    def to_dict(self) -> dict[str, Any]:
        """The arm as `helios.policy/v1` writes it (plain JSON)."""
        return {
            "index": self.index, "label": self.label, "candidate": self.candidate,
            "candidate_index": self.candidate_index, "depth": self.depth, "num_layers": self.num_layers,
            "exit": self.exit_name, "exit_index": self.exit_index, "criterion": self.exit_config.criterion,
            "threshold": self.exit_config.threshold, "exit_points": list(self.exit_config.exit_points),
            "weight_bytes": self.weight_bytes, "kv_bytes_per_seq": self.kv_bytes_per_seq,
            "batch_size": self.batch_size, "feasible": self.feasible, "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], candidate_index: int | None = None,
                  exit_index: int | None = None) -> Arm:
        """Read `to_dict` back. Exports written before the arm carried its candidate/exit indices or the reference
        flag still load: pass the indices (arms_from_dicts derives them); the flag then reads False."""
        required = ("index", "candidate", "depth", "num_layers", "exit", "criterion", "threshold", "exit_points",
                    "weight_bytes", "kv_bytes_per_seq", "batch_size")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"arm {data.get('index', '?')} lacks {missing}; an arm has {list(required)}")
        c_index = data.get("candidate_index", candidate_index)
        e_index = data.get("exit_index", exit_index)
        if c_index is None or e_index is None:
            raise ValueError(f"arm {data['index']} has no candidate_index/exit_index; read the table with "
                             "arms_from_dicts, which derives them")
        config = ExitConfig(data["criterion"], float(data["threshold"]), tuple(int(p) for p in data["exit_points"]))
        return cls(int(data["index"]), str(data["candidate"]), int(c_index), int(data["depth"]),
                   int(data["num_layers"]), int(e_index), str(data["exit"]), config, int(data["weight_bytes"]),
                   int(data["kv_bytes_per_seq"]), int(data["batch_size"]), bool(data.get("reference", False)))


def arms_from_dicts(table: Iterable[Mapping[str, Any] | Arm]) -> tuple[Arm, ...]:
    """An arm table from JSON (or Arms, passed through). Candidate and exit indices missing from older exports are
    their order of first appearance in the table: the order build_arms creates them in."""
    rows = list(table)
    candidates = list(dict.fromkeys(a.candidate if isinstance(a, Arm) else a["candidate"] for a in rows))
    exits = list(dict.fromkeys(a.exit_name if isinstance(a, Arm) else a["exit"] for a in rows))
    arms = tuple(a if isinstance(a, Arm) else Arm.from_dict(a, candidates.index(a["candidate"]), exits.index(a["exit"]))
                 for a in rows)
    wrong = [(position, arm.index) for position, arm in enumerate(arms) if arm.index != position]
    if wrong:
        raise ValueError(f"arm table indices must be 0..{len(arms) - 1} in order; (position, index) {wrong[:3]}")
    return arms


def build_arms(candidates: Sequence[CandidateSpec], exits: Sequence[ExitSpec], memory: Mapping[str, MemoryInfo],
               budget: MemoryBudget, reference: str | None = None) -> tuple[Arm, ...]:
    """The arm table: candidates x depths x exit settings, in config order (exit settings with no exit point
    inside a depth are left out at that depth), each with its memory footprint and budget batch size."""
    arms: list[Arm] = []
    for c_index, candidate in enumerate(candidates):
        info = memory[candidate.name]
        bad = [d for d in candidate.depths if not 1 <= d <= info.num_layers]
        if bad:
            raise ValueError(f"depths {bad} of {candidate.name!r} are outside 1..{info.num_layers} (its layer count)")
        for depth in candidate.depths:
            weight_bytes = info.weight_bytes_by_depth[depth]
            kv_per_seq = budget.kv_bytes_per_seq(info, depth)
            batch = budget.batch_size(weight_bytes, kv_per_seq)
            for e_index, exit_spec in enumerate(exits):
                config = exit_spec.exit_config(depth)
                if config is None:
                    continue
                is_reference = candidate.name == reference and depth == info.num_layers and not config.enabled
                arms.append(Arm(len(arms), candidate.name, c_index, depth, info.num_layers, e_index, exit_spec.name,
                                config, weight_bytes, kv_per_seq, batch, is_reference))
    if not any(arm.feasible for arm in arms):
        smallest = min(arms, key=lambda a: a.weight_bytes + a.kv_bytes_per_seq)
        raise ValueError(
            f"the memory budget of {budget.budget_bytes / 2**20:.1f} MiB fits no arm: the smallest, "
            f"{smallest.label}, needs {(smallest.weight_bytes + smallest.kv_bytes_per_seq) / 2**20:.1f} MiB "
            f"(weights + one sequence of {budget.context_tokens} tokens of K/V)"
        )
    return tuple(arms)


def reference_arm_index(arms: Sequence[Arm]) -> int | None:
    """The arm marked as the reference run, if the table has one."""
    return next((arm.index for arm in arms if arm.reference), None)


def exit_buckets(num_layers: int, bins: int) -> np.ndarray:
    """Lookup exit layer count (0..num_layers) -> histogram bucket: bucket j holds fractions in (j/bins, (j+1)/bins]."""
    layers = np.arange(num_layers + 1)
    return np.clip(np.ceil(layers / num_layers * bins).astype(np.int64) - 1, 0, bins - 1)


def exit_histogram(exit_layers: Sequence[int] | np.ndarray, num_layers: int, bins: int) -> np.ndarray:
    """float32 [bins]: shares of tokens by exit layer / the candidate's layers (zeros when there are no tokens)."""
    layers = np.asarray(exit_layers, dtype=np.int64).reshape(-1)
    counts = np.bincount(exit_buckets(num_layers, bins)[layers], minlength=bins).astype(np.float64)
    return normalised(counts)


def normalised(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return (counts / total if total > 0 else counts).astype(np.float32)
