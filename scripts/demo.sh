#!/usr/bin/env bash
# Set up (idempotent) and run the main job, offline:  bash scripts/demo.sh [hydra overrides]
#   = python scripts/train.py agent=ucb  (live backend on the default candidates; outputs under outputs/train/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
# Set-up of the default candidates, once (cached under ~/.cache/helios): the early-exit family trains in ~10 min
# per model on 2 CPU cores; SmolLM2's GGUF converts in ~30 s on first load.
for name in helios-ee-4l helios-ee-8l; do .venv/bin/python scripts/train_ee.py name=$name; done
exec .venv/bin/python scripts/train.py agent=ucb "$@"
