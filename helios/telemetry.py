"""Per-epoch telemetry: what one (candidate, depth, exit setting) cost and delivered on one epoch of requests.

    result = engine.generate(prompt_ids, max_new_tokens, exit_config)
    record = record_from_results("smollm2-135m", exit_config, [result], meter.stop(), {"rouge_l": 0.31}, epoch=3)
    with TelemetryWriter("outputs/run/telemetry.jsonl") as writer:
        writer.write(record)
    records = read_records("outputs/run/telemetry.jsonl")

    python -m helios.telemetry outputs/run/telemetry.jsonl     # prints a summary per record

Definitions (one epoch may be served as several sequential `generate` calls, one GenerationResult each):
  tokens_per_s         generated tokens / sum of (prefill_s + decode_s) over the results: busy-time throughput.
  requests_per_s       requests / the same busy time.
  ttft_s               mean over requests of their batch's prefill time (the first token comes out of prefill).
  time_per_token_s     mean over requests with >= 2 tokens of (e2e_s - ttft_s) / (tokens - 1): time per output
                       token after the first.
  e2e_p50_s, e2e_p95_s percentiles (numpy's linear interpolation) of per-request e2e_s: service latency from the
                       start of the request's batch; queueing before it is the replay layer's to add.
  exit_layer_histogram counts[k-1] = generated tokens produced by k layers, k = 1..depth (the first token of each
                       request comes from prefill at full loaded depth and is counted at depth).
  kv_cache_bytes       the largest cache of the results (the calls run one after another, so that is the peak).
  peak_rss_bytes       the process's peak resident set since it started (getrusage), not this epoch's alone.
  tokens_per_j         generated tokens / energy_j; None when no energy was measured or it read 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from helios.energy import EnergyReading
from helios.engine import ExitConfig, GenerationResult

SCHEMA_VERSION = 1


@dataclasses.dataclass
class EpochRecord:
    schema_version: int
    epoch: int
    # what was served, and how
    candidate: str
    depth: int
    exit_criterion: str
    threshold: float
    exit_points: list[int]
    batch_size: int
    requests: int
    generated_tokens: int
    exit_layer_histogram: list[int]
    # throughput
    tokens_per_s: float
    requests_per_s: float
    busy_s: float
    # latency
    ttft_s: float
    time_per_token_s: float | None
    e2e_p50_s: float
    e2e_p95_s: float
    # energy
    energy_j: float | None
    tokens_per_j: float | None
    energy_source: str
    energy_detail: dict[str, Any]
    # accuracy: metric name -> value (see helios.metrics)
    accuracy: dict[str, float]
    # memory
    weight_bytes: int
    kv_cache_bytes: int
    peak_rss_bytes: int
    # compute actually paid vs. the same tokens at full loaded depth (rows x layers)
    layer_evals: int
    layer_evals_full: int
    decode_macs: int
    # switching
    switch_s: float
    load_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        if not isinstance(data, dict):
            raise ValueError(f"an EpochRecord is a JSON object; got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"telemetry schema_version {version!r} is not the {SCHEMA_VERSION} this helios reads")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ValueError(f"EpochRecord fields: missing {missing}, unknown {unknown}")
        return cls(**data)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def record_from_results(
    candidate: str,
    exit_config: ExitConfig,
    results: Sequence[GenerationResult],
    energy: EnergyReading | None,
    accuracy: dict[str, float],
    *,
    epoch: int = 0,
    switch_s: float = 0.0,
    load_s: float = 0.0,
    peak_rss: int | None = None,
) -> EpochRecord:
    """One EpochRecord from the GenerationResults that served an epoch (module docstring gives the definitions)."""
    if not results:
        raise ValueError("record_from_results needs at least one GenerationResult")
    depths = {r.depth for r in results}
    if len(depths) != 1:
        raise ValueError(f"results come from different depths {sorted(depths)}; one record is one (model, depth)")
    depth = depths.pop()
    bad_accuracy = {k: v for k, v in accuracy.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad_accuracy:
        raise ValueError(f"accuracy values must be finite numbers; got {bad_accuracy}")

    histogram = [0] * depth
    for result in results:
        for row in result.exit_layers:
            for layer_count in row:
                histogram[layer_count - 1] += 1
    generated = sum(r.generated_tokens for r in results)
    requests = sum(len(r.tokens) for r in results)
    busy_s = sum(r.prefill_s + r.decode_s for r in results)
    ttfts = [r.ttft_s for r in results for _ in r.tokens]
    e2es = [e for r in results for e in r.e2e_s]
    per_token = [
        (e2e - r.ttft_s) / (len(tokens) - 1) for r in results for tokens, e2e in zip(r.tokens, r.e2e_s) if len(tokens) > 1
    ]
    energy_j = None if energy is None else float(energy.energy_j)
    return EpochRecord(
        schema_version=SCHEMA_VERSION,
        epoch=int(epoch),
        candidate=candidate,
        depth=depth,
        exit_criterion=exit_config.criterion,
        threshold=float(exit_config.threshold),
        exit_points=[int(e) for e in exit_config.exit_points],
        batch_size=max(r.batch_size for r in results),
        requests=requests,
        generated_tokens=generated,
        exit_layer_histogram=histogram,
        tokens_per_s=generated / max(busy_s, 1e-12),
        requests_per_s=requests / max(busy_s, 1e-12),
        busy_s=busy_s,
        ttft_s=float(np.mean(ttfts)),
        time_per_token_s=float(np.mean(per_token)) if per_token else None,
        e2e_p50_s=float(np.percentile(e2es, 50)),
        e2e_p95_s=float(np.percentile(e2es, 95)),
        energy_j=energy_j,
        tokens_per_j=_finite(generated / energy_j) if energy_j else None,
        energy_source="none" if energy is None else energy.source,
        energy_detail={} if energy is None else dict(energy.detail),
        accuracy={k: float(v) for k, v in accuracy.items()},
        weight_bytes=max(r.weight_bytes for r in results),
        kv_cache_bytes=max(r.kv_cache_bytes for r in results),
        peak_rss_bytes=peak_rss_bytes() if peak_rss is None else int(peak_rss),
        layer_evals=sum(r.layer_evals for r in results),
        layer_evals_full=sum(r.layer_evals_full for r in results),
        decode_macs=sum(r.decode_macs for r in results),
        switch_s=float(switch_s),
        load_s=float(load_s),
    )


# ----------------------------------------------------------------------------------------------- JSONL


class TelemetryWriter:
    """Appends records to a JSONL file, one whole line per os.write on an O_APPEND descriptor, fsynced.

    A line is written by a single write call (looping only if the kernel takes part of it), so a reader never sees
    two records interleaved, and a crash can at worst leave one final line without its newline, which
    `read_records` skips.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: EpochRecord) -> None:
        if self._fd is None:
            raise ValueError(f"TelemetryWriter for {self.path} is closed")
        # allow_nan=False: NaN/Infinity are not JSON; refuse them here rather than write unreadable lines.
        line = (json.dumps(record.to_dict(), allow_nan=False, sort_keys=True) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(path: str | Path) -> Iterator[EpochRecord]:
    """Records of a JSONL file in order. A final line without newline (a write cut short) is skipped with a
    warning; any other bad line raises ValueError naming the file and line number."""
    path = Path(path)
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        warnings.warn(f"{path}: skipping an incomplete last line ({len(tail)} bytes, no newline)", stacklevel=2)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
        try:
            yield EpochRecord.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: {error}") from error


def read_records(path: str | Path) -> list[EpochRecord]:
    return list(iter_records(path))


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m helios.telemetry PATH.jsonl")
    for record in read_records(sys.argv[1]):
        accuracy = " ".join(f"{k}={v:.3f}" for k, v in record.accuracy.items())
        print(
            f"epoch {record.epoch:4d} {record.candidate}@{record.depth} {record.exit_criterion}:{record.threshold:g} "
            f"{record.tokens_per_s:8.1f} tok/s  p95 {record.e2e_p95_s:.3f} s  "
            f"{record.energy_j if record.energy_j is not None else float('nan'):.2f} J ({record.energy_source})  {accuracy}"
        )


if __name__ == "__main__":
    main()
