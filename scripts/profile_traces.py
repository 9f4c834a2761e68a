"""Record replay traces (helios.profiling) for the configured candidates on a workload.

    python scripts/profile_traces.py                            # every candidate of conf/candidates/offline.yaml
    python scripts/profile_traces.py candidate=smollm2-135m workload=drift3 per_source=8 force=true

(Issue 3 called this scripts/profile.py; a script of that name in scripts/ shadows the standard library's `profile`,
which torch imports through cProfile, and breaks every script in the folder.)
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from helios.profiling import ensure_trace
from helios.traces import read_trace


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile_traces")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    entries = OmegaConf.to_container(cfg.candidates.shortlist, resolve=True)
    names = [e["name"] for e in entries]
    if cfg.candidate is not None:
        if cfg.candidate not in names:
            entries = [{"name": cfg.candidate, "depths": []}]
        else:
            entries = [e for e in entries if e["name"] == cfg.candidate]
    workload_cfg = OmegaConf.to_container(cfg.workload, resolve=True)
    energy_cfg = OmegaConf.to_container(cfg.energy, resolve=True)
    for entry in entries:
        path = ensure_trace(
            entry["name"], workload_cfg, depths=entry.get("depths", []), per_source=int(cfg.per_source),
            new_tokens=int(cfg.new_tokens), batch_size=int(cfg.batch_size), energy_cfg=energy_cfg,
            out_dir=Path(cfg.out_dir) if cfg.out_dir else None, force=bool(cfg.force),
        )
        trace = read_trace(path)
        cost = trace.meta["cost_model"]
        print(f"{entry['name']}: {len(trace.full_token)} tokens of {len(trace.requests())} requests -> {path}\n"
              f"  cost model held-out median rel. error {cost['calibration_rel_error']:.3f}; "
              f"energy {trace.meta['energy_source']} at {trace.meta['power_w']:.1f} W (estimate)")


if __name__ == "__main__":
    main()
