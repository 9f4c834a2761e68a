"""Build one LayerSkip-style early-exit checkpoint into the helios cache and print its per-layer table.

    python scripts/train_ee.py name=helios-ee-4l
    python scripts/train_ee.py name=helios-ee-8l force=true   # retrain over an existing one
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from helios import ee_family


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_ee")
def main(cfg: DictConfig) -> None:
    path = ee_family.ensure_checkpoint(str(cfg.name), progress=bool(cfg.progress), force=bool(cfg.force))
    print(path)
    print(ee_family.format_table(ee_family.load_record(str(cfg.name))))


if __name__ == "__main__":
    main()
