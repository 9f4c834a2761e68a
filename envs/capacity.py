"""Capacity, and live's reference run: measured once per machine and cached like the traces.

    python -m envs.capacity --backend replay --workload bursts        # prints (and caches) capacity(smollm2-135m@30)

Workloads may write their rate relative to a measured capacity (`arrival.rate_x_capacity: 1.5` x
`capacity_of: "smollm2-135m@30"`, helios.workloads), so that a scenario loads any machine alike. The environment
resolves that arm's capacity before it builds the workload (`resolve_capacity`):

  what      requests/s that helios.scheduler's continuous batching sustains with (candidate, depth), exits off, under
            the env's memory budget and max_batch_size, on the workload's request mix (sources by the episode's mean
            mixture weighted by load, lengths by its output-length draws): SchedulerBackend.measure_capacity
  replay    from the traces and their calibrated cost model (a fraction of a second; the candidate must be one of
            the env's, since only its trace can price it)
  live      measured once on this machine with the real engine (minutes for a real model on a CPU)
  cache     <HELIOS_CACHE_DIR or ~/.cache/helios>/capacity/<candidate>@<depth>-<backend>-<digest>.json (replay with a
            `trace_dir`: <trace_dir>/capacity/...), written atomically (helios.paths.atomic_file). The digest covers
            everything the figure depends on: backend, arm, the workload's request mix (its config without the rate,
            which capacity must not depend on), memory budget, max_batch_size, new_tokens, the measuring method, and
            for replay the trace files (name and size: trace names are content hashes of their recording key), for
            live the machine (host, processor, torch threads). Delete the file to measure again.

The live env's reference run (SchedulerBackend.reference_profile: the reference candidate at full depth serving a
nominal epoch of each source, which normalises every reward) is a measurement of the same kind, and as slow (a
third of a repeat main job's time before it was cached): `resolve_reference_profile` caches it under
<cache>/reference/<candidate>-live-<digest>.json, keyed by the machine and everything the run and its metrics depend
on (workload without its rate, the nominal epoch's request count, SLO targets, accuracy metric and judge, memory
budget, batch and prefill caps, new_tokens, energy meter). Replay's reference run is modelled and takes a fraction
of a second: it is not cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helios.paths import cache_dir, write_json

METHOD = "saturation-middle-half/v1"  # bump when measure_capacity changes what it measures
REFERENCE_METHOD = "reference-run/v1"  # bump when reference_profile changes what it measures
CAPACITY_REQUESTS = 256


def machine_key() -> dict[str, Any]:
    """What a live measurement depends on besides its inputs: this machine and torch's thread count."""
    import torch

    return {"host": platform.node(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def capacity_key(backend: Any, candidate: str, depth: int, workload_cfg: Mapping[str, Any],
                 trace_paths: Mapping[str, Path] | None) -> dict[str, Any]:
    """The fields a cached capacity is keyed by (module docstring)."""
    from envs.backends import rate_free_workload_cfg

    spec = backend.spec
    fields: dict[str, Any] = {
        "backend": backend.kind, "arm": f"{candidate}@{depth}", "workload": rate_free_workload_cfg(workload_cfg),
        "memory_budget_bytes": spec.memory_budget_bytes, "max_batch_size": spec.max_batch_size,
        "new_tokens": spec.new_tokens, "requests": CAPACITY_REQUESTS, "method": METHOD,
    }
    if backend.kind == "replay":
        paths = trace_paths or {}
        fields["traces"] = {name: [Path(p).name, Path(p).stat().st_size] for name, p in sorted(paths.items())}
    else:
        fields["machine"] = machine_key()
    return fields


def capacity_path(fields: Mapping[str, Any], out_dir: Path | None = None) -> Path:
    return _keyed_path(out_dir or cache_dir() / "capacity", str(fields["arm"]), fields)


def _keyed_path(directory: Path, name: str, fields: Mapping[str, Any]) -> Path:
    """<directory>/<name>-<backend>-<digest of the key fields>.json"""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return directory / f"{name.replace('/', '--')}-{fields['backend']}-{digest}.json"


def resolve_capacity(backend: Any, arm_name: str, workload_cfg: Mapping[str, Any], *,
                     trace_paths: Mapping[str, Path] | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """The cached capacity of `arm_name` ("<candidate>@<depth>") on `backend`, measured and cached on first use.
    Returns the cache record: capacity_rps, the key fields, where it was measured and how long it took."""
    from helios.workloads import parse_capacity_arm

    candidate, depth = parse_capacity_arm(arm_name)
    if backend.kind == "replay" and candidate not in {c.name for c in backend.spec.candidates}:
        raise ValueError(f"the workload's rate is relative to capacity({arm_name}), but replay can only measure a "
                         f"candidate it has a trace of: {[c.name for c in backend.spec.candidates]}; add {candidate!r} "
                         "to the env's candidates, or give the workload an absolute rate_per_s")
    fields = capacity_key(backend, candidate, depth, workload_cfg, trace_paths)

    def measure() -> dict[str, Any]:
        measured = backend.measure_capacity(candidate, depth, CAPACITY_REQUESTS)
        return {"capacity_rps": float(measured["capacity_rps"]), "measurement": measured}

    return _cached(capacity_path(fields, out_dir), fields, measure)


def reference_key(backend: Any, targets: Any) -> dict[str, Any]:
    """The fields live's cached reference run is keyed by (module docstring)."""
    from envs.backends import rate_free_workload_cfg

    spec = backend.spec
    return {
        "backend": backend.kind, "reference": spec.reference, "workload": rate_free_workload_cfg(spec.workload_cfg),
        "reference_requests": spec.reference_requests,
        "targets": None if targets is None else {"ttft_s": targets.ttft_s, "tpot_s": targets.tpot_s},
        "accuracy_metric": spec.accuracy_metric, "judge": spec.judge, "memory_budget_bytes": spec.memory_budget_bytes,
        "context_tokens": spec.context_tokens, "max_batch_size": spec.max_batch_size,
        "max_prefill_tokens": spec.max_prefill_tokens, "new_tokens": spec.new_tokens, "energy": spec.energy_cfg,
        "method": REFERENCE_METHOD, "machine": machine_key(),
    }


def resolve_reference_profile(backend: Any, targets: Any, out_dir: Path | None = None) -> dict[str, Any]:
    """Live's reference run (`backend.reference_profile(targets)`), measured on first use and cached (module
    docstring). Returns the cache record: profile (per source: the run's metrics), key, path, cached."""
    fields = reference_key(backend, targets)
    path = _keyed_path(out_dir or cache_dir() / "reference", str(fields["reference"]), fields)
    return _cached(path, fields, lambda: {"profile": backend.reference_profile(targets)})


def _cached(path: Path, fields: Mapping[str, Any], measure: Any) -> dict[str, Any]:
    """The record cached at `path` if its key is `fields`, else `measure()`'s, written atomically with its key."""
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}  # unreadable: measure again and overwrite
        if record.get("key") == json.loads(json.dumps(fields)):
            record["path"], record["cached"] = str(path), True
            return record
    start = time.perf_counter()
    record = {**measure(), "key": fields, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "measure_s": time.perf_counter() - start}
    write_json(path, record, indent=1)
    record["path"], record["cached"] = str(path), False
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("live", "replay"), default="replay")
    parser.add_argument("--workload", default="bursts", help="a conf/workload name with a capacity-relative rate")
    args = parser.parse_args()
    import gymnasium

    import envs

    env = gymnasium.make(envs.ENV_IDS[args.backend], workload=args.workload)
    print(json.dumps(env.unwrapped.capacity, indent=1))
    env.close()


if __name__ == "__main__":
    main()
