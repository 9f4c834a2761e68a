"""Build one LayerSkip-style early-exit checkpoint into the helios cache and print its per-layer table.

    python scripts/train_ee.py name=helios-ee-4l
    python scripts/train_ee.py name=helios-ee-8l force=true   # retrain over an existing one
"""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPTS_DIR = Path(__file__).resolve().parent
# Python puts this folder first on sys.path, where a sibling script named like a stdlib module (profile.py)
# would shadow it (torch._dynamo imports cProfile -> profile). Import from the repo root instead, from any cwd.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _SCRIPTS_DIR]
sys.path.insert(0, str(_SCRIPTS_DIR.parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from helios import ee_family  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_ee")
def main(cfg: DictConfig) -> None:
    path = ee_family.ensure_checkpoint(str(cfg.name), progress=bool(cfg.progress), force=bool(cfg.force))
    print(path)
    print(ee_family.format_table(ee_family.load_record(str(cfg.name))))


if __name__ == "__main__":
    main()
