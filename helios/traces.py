"""Replay traces: what a candidate does on a workload, recorded once at full depth, enough to price any setting later.

    python scripts/profile_traces.py candidate=smollm2-135m workload=drift3     # records a trace (see scripts/profile_traces.py)

One Parquet file per (candidate, workload). One row per generated token (teacher-forced on the candidate's own
full-depth greedy output), with, at every layer count l = 1..L: the exit head's predicted token, its max
probability and top-1 minus top-2 margin, and the cosine of h_l with h_{l-1} (CALM's saturation signal); plus the
full-depth token. File-level metadata (JSON in the Parquet schema): schema version, candidate and checkpoint, layer
count, which exit heads produced the predictions, device/dtype/threads, the calibrated cost model (helios.costmodel),
resident weight bytes per depth and K/V bytes per token per layer, and the workload's config.

Writes are atomic (temporary file, fsync, rename): a failed profiling run leaves no half-written trace. Loading
checks the magic bytes, the schema name and version, and the columns, and fails with a clear error on a truncated,
foreign or mismatched file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from helios.paths import atomic_file

SCHEMA_NAME = "helios.trace"
SCHEMA_VERSION = 1
META_KEY = b"helios.trace"
COLUMNS = ("request_id", "source", "position", "prompt_len", "full_token", "pred", "max_prob", "margin", "cosine")


class TraceError(ValueError):
    pass


@dataclasses.dataclass
class Trace:
    """Per-token exit dynamics of one candidate on one workload (arrays indexed [token] or [token, layer-1])."""

    meta: dict[str, Any]
    request_id: np.ndarray  # int64 [T]
    source: np.ndarray  # object (str) [T]
    position: np.ndarray  # int32 [T]: index of the generated token within its request
    prompt_len: np.ndarray  # int32 [T]
    full_token: np.ndarray  # int64 [T]
    pred: np.ndarray  # int64 [T, L]
    max_prob: np.ndarray  # float32 [T, L]
    margin: np.ndarray  # float32 [T, L]
    cosine: np.ndarray  # float32 [T, L]

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    def requests(self) -> list[int]:
        return sorted(set(self.request_id.tolist()))


def write_trace(trace: Trace, path: str | Path) -> Path:
    path = Path(path)
    table = pa.table(
        {
            "request_id": pa.array(trace.request_id, pa.int64()),
            "source": pa.array(trace.source.astype(str).tolist(), pa.string()),
            "position": pa.array(trace.position, pa.int32()),
            "prompt_len": pa.array(trace.prompt_len, pa.int32()),
            "full_token": pa.array(trace.full_token, pa.int64()),
            "pred": pa.FixedSizeListArray.from_arrays(pa.array(trace.pred.reshape(-1), pa.int64()), trace.num_layers),
            "max_prob": _fixed(trace.max_prob, trace.num_layers),
            "margin": _fixed(trace.margin, trace.num_layers),
            "cosine": _fixed(trace.cosine, trace.num_layers),
        }
    )
    meta = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, **trace.meta}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_file(path) as handle:
        pq.write_table(table, handle)
    return path


def _fixed(values: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32), pa.float32()), width)


def read_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no trace at {path}; record one with: python scripts/profile_traces.py (see its docstring)")
    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, path.stat().st_size - 4))
        tail = handle.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise TraceError(f"{path} is not a helios trace: not a complete Parquet file (truncated or foreign)")
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise TraceError(f"{path} is not a readable helios trace: {error}") from error
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{path} is a Parquet file but not a helios trace (no '{META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta.get("schema") != SCHEMA_NAME or meta.get("version") != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: trace schema {meta.get('schema')!r} version {meta.get('version')!r}; this helios reads "
            f"{SCHEMA_NAME!r} version {SCHEMA_VERSION}. Re-record it with scripts/profile_traces.py"
        )
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise TraceError(f"{path}: trace lacks columns {missing}")
    layers = int(meta["num_layers"])

    def matrix(name: str, dtype) -> np.ndarray:
        flat = table.column(name).combine_chunks().flatten().to_numpy()
        return flat.reshape(-1, layers).astype(dtype)

    return Trace(
        meta=meta,
        request_id=table.column("request_id").to_numpy(),
        source=np.array(table.column("source").to_pylist(), dtype=object),
        position=table.column("position").to_numpy(),
        prompt_len=table.column("prompt_len").to_numpy(),
        full_token=table.column("full_token").to_numpy(),
        pred=matrix("pred", np.int64),
        max_prob=matrix("max_prob", np.float32),
        margin=matrix("margin", np.float32),
        cosine=matrix("cosine", np.float32),
    )
