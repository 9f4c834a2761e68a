"""Replay: a (depth, exit setting, batch size) run of a candidate, priced from its trace without running the model.

    python -m helios.replay TRACE.parquet --depth 20 --criterion max_prob --threshold 0.8 --exit-points 12,16

Per token, the exit layer of a setting follows from the trace's per-layer signals: the first exit point e < depth
whose criterion value passes the threshold, else the loaded depth (the first token always comes from prefill at
the loaded depth). The token is the trace's exit-head prediction at that layer; fidelity compares it with the
full-depth token, teacher-forced (exact for what the trace recorded; free-running generation diverges after the
first miss, a gap benchmarks/replay.py measures). Batches of requests are then priced by rebuilding the engine's
work counters (helios.costmodel.simulate_features, vectorised here) and applying the calibrated cost model.

Energy in replay is always an estimate: predicted busy seconds x a power figure, labelled `model` (the energy
model's watts) or `replay:<meter>` when the trace measured power with a hardware meter during calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from helios.costmodel import DECODE_FEATURES, CalibrationContentionWarning, CostModel, decision_kind
from helios.exit_config import ExitConfig
from helios.traces import Trace, read_trace

# The per-layer signals a trace records; an exit criterion is replayable only if its signal is among them. `probe`
# is not: a probe reads the hidden state, which a trace does not keep.
SIGNALS: tuple[str, ...] = ("max_prob", "margin", "cosine")
REPLAY_CRITERIA: tuple[str, ...] = ("none", *SIGNALS)


def check_replayable(criterion: str) -> None:
    """Refuse an exit criterion whose signal traces do not record (module docstring), naming the valid ones."""
    if criterion not in REPLAY_CRITERIA:
        raise ValueError(f"replay cannot price exit criterion {criterion!r}: traces record the {', '.join(SIGNALS)} "
                         f"signals only; valid replay criteria: {list(REPLAY_CRITERIA)} (the live backend runs "
                         f"{criterion!r})")


@dataclasses.dataclass(frozen=True)
class Setting:
    depth: int
    exit_config: ExitConfig = ExitConfig()
    batch_size: int = 8


@dataclasses.dataclass
class ReplayResult:
    """The same quantities a live epoch reports (seconds on the profiled device; energy estimated)."""

    tokens: list[list[int]]
    exit_layers: list[list[int]]
    prefill_s: list[float]  # per batch
    decode_s: list[float]  # per batch
    ttft_s: list[float]  # per request, including the wait for earlier batches of the epoch
    e2e_s: list[float]  # per request
    generated_tokens: int
    fidelity: float  # teacher-forced agreement with the full-depth token
    energy_j: float
    energy_source: str
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def busy_s(self) -> float:
        return sum(self.prefill_s) + sum(self.decode_s)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.busy_s, 1e-12)


class Replayer:
    """Prices settings of one candidate from its trace. Per-setting exit layers are computed once and cached."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.meta = trace.meta
        self.num_layers = trace.num_layers
        self.cost = CostModel.from_dict(trace.meta["cost_model"])
        contention = self.cost.contention()
        if contention is not None:
            warnings.warn(f"replay trace of {trace.meta.get('candidate', '?')} was {contention} (delete it to record "
                          "again; benchmarks/RESULTS.md, 'The main job')", CalibrationContentionWarning, stacklevel=2)
        self.weight_bytes_by_depth = {int(k): int(v) for k, v in trace.meta["weight_bytes_by_depth"].items()}
        self.kv_bytes_per_token_layer = int(trace.meta["kv_bytes_per_token_layer"])
        self.power_w = float(trace.meta["power_w"])
        self.energy_source = str(trace.meta["energy_source"])
        # Rows of each request, ordered by position: requests x positions index into the trace arrays.
        order = np.lexsort((trace.position, trace.request_id))
        ids = trace.request_id[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        self.request_rows = {int(ids[s]): order[s:e] for s, e in zip(starts, np.r_[starts[1:], len(ids)])}
        self._exit_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def validate(self, setting: Setting) -> None:
        if not 1 <= setting.depth <= self.num_layers:
            raise ValueError(f"depth {setting.depth} outside [1, {self.num_layers}] for {self.meta['candidate']}")
        setting.exit_config.validate(setting.depth)
        if setting.batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {setting.batch_size}")

    def exits(self, setting: Setting) -> tuple[np.ndarray, np.ndarray]:
        """(exit layer, token) for every trace row under `setting` (cached)."""
        config = setting.exit_config
        key = (setting.depth, config.criterion, config.threshold, config.exit_points)
        if key in self._exit_cache:
            return self._exit_cache[key]
        depth, trace = setting.depth, self.trace
        exit_layer = np.full(len(trace.full_token), depth, dtype=np.int64)
        if config.enabled:
            check_replayable(config.criterion)
            signal = {"max_prob": trace.max_prob, "margin": trace.margin, "cosine": trace.cosine}[config.criterion]
            points = np.array(sorted(e for e in config.exit_points if e < depth), dtype=np.int64)
            passes = signal[:, points - 1] >= np.float32(config.threshold)
            first = np.where(passes.any(1), points[passes.argmax(1)], depth)
            exit_layer = np.where(trace.position > 0, first, depth)  # token 0 comes from prefill
        tokens = trace.pred[np.arange(len(exit_layer)), exit_layer - 1]
        self._exit_cache[key] = (exit_layer, tokens)
        return exit_layer, tokens

    def batch_features(self, exit_matrix: np.ndarray, setting: Setting, prompt_lens: np.ndarray) -> tuple[dict, dict]:
        """Vectorised `simulate_features` for one batch: exit_matrix [rows, tokens] of exit layer counts,
        prompt_lens [rows] (prefill is padded to the longest; decode attention reads the longest context)."""
        depth = setting.depth
        rows, tokens = exit_matrix.shape
        e = exit_matrix[:, 1:]  # decode steps 1..tokens-1
        steps = tokens - 1
        prompt_lens = np.broadcast_to(np.asarray(prompt_lens), (rows,))
        prompt_len = int(prompt_lens.max())
        positions = prompt_len + np.arange(1, tokens)  # positions each step's queries read (dense slots)
        prefill = {"prefill_calls": 1.0, "prefill_token_layers": float(rows * prompt_len * depth),
                   "prefill_attention": float(rows * prompt_len * prompt_len * depth)}
        f = dict.fromkeys(DECODE_FEATURES, 0.0)
        f["steps"] = float(steps)
        f["step_rows"] = float(rows * steps)
        f["layer_calls"] = float(e.max(0).sum()) if steps else 0.0
        f["layer_rows"] = float(e.sum())
        f["attention_row_positions"] = float((e * positions[None, :]).sum())
        at_depth = e >= depth
        f["head_calls"] = float(at_depth.any(0).sum())
        f["head_rows"] = float(at_depth.sum())
        config = setting.exit_config
        if config.enabled:
            kind = decision_kind(config.criterion)
            for point in sorted(p for p in config.exit_points if p < depth):
                reach = e >= point
                leave = e == point
                f[f"decision_{kind}_calls"] += float(reach.any(0).sum())
                f[f"decision_{kind}_rows"] += float(reach.sum())
                leave_steps = float(leave.any(0).sum())
                f["compactions"] += leave_steps
                f["propagate_calls"] += leave_steps * (depth - point)
                f["propagate_rows"] += float(leave.sum()) * (depth - point)
                if kind != "head":  # head-free decisions: an exit head computes the leaving rows' tokens
                    f["exit_head_calls"] += leave_steps
                    f["exit_head_rows"] += float(leave.sum())
        return prefill, f

    def run(self, request_ids: Sequence[int], setting: Setting, new_tokens: int | None = None) -> ReplayResult:
        """Serve `request_ids` in order, in batches of `setting.batch_size`, as the live backend would."""
        self.validate(setting)
        exit_layer, tokens = self.exits(setting)
        prefill_s, decode_s, ttft_s, e2e_s = [], [], [], []
        out_tokens, out_exits = [], []
        matched = total = 0
        elapsed = 0.0
        kv_bytes = 0
        for start in range(0, len(request_ids), setting.batch_size):
            batch = [self.request_rows[int(r)] for r in request_ids[start : start + setting.batch_size]]
            length = min(len(rows) for rows in batch) if new_tokens is None else new_tokens
            rows = np.stack([r[:length] for r in batch])
            exits_b = exit_layer[rows]
            prompt_lens = self.trace.prompt_len[rows[:, 0]].astype(np.int64)
            prompt_len = int(prompt_lens.max())
            pre, dec = self.batch_features(exits_b, setting, prompt_lens)
            p_s, d_s = self.cost.prefill_s(pre), self.cost.decode_s(dec)
            prefill_s.append(p_s)
            decode_s.append(d_s)
            ttft_s += [elapsed + p_s] * len(batch)
            e2e_s += [elapsed + p_s + d_s] * len(batch)
            elapsed += p_s + d_s
            out_tokens += tokens[rows].tolist()
            out_exits += exits_b.tolist()
            matched += int((tokens[rows] == self.trace.full_token[rows]).sum())
            total += rows.size
            kv_bytes = max(kv_bytes, len(batch) * (prompt_len + length) * setting.depth * self.kv_bytes_per_token_layer)
        busy_s = sum(prefill_s) + sum(decode_s)
        return ReplayResult(
            tokens=out_tokens, exit_layers=out_exits, prefill_s=prefill_s, decode_s=decode_s, ttft_s=ttft_s,
            e2e_s=e2e_s, generated_tokens=total, fidelity=matched / max(total, 1),
            energy_j=self.power_w * busy_s, energy_source=self.energy_source,
            weight_bytes=self.weight_bytes_by_depth[setting.depth], kv_cache_bytes=kv_bytes,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--criterion", default="none")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--exit-points", default="")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    replayer = Replayer(read_trace(args.trace))
    points = tuple(int(x) for x in args.exit_points.split(",") if x)
    setting = Setting(args.depth or replayer.num_layers, ExitConfig(args.criterion, args.threshold, points), args.batch_size)
    result = replayer.run(replayer.trace.requests(), setting)
    print(f"{replayer.meta['candidate']} {setting}: {result.tokens_per_s:.1f} tok/s, fidelity {result.fidelity:.3f}, "
          f"p50 e2e {np.median(result.e2e_s):.2f} s, energy {result.energy_j:.1f} J ({result.energy_source}, estimate)")


if __name__ == "__main__":
    main()
