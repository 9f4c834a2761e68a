#!/usr/bin/env bash
# Set up (idempotent) and run the main job, offline:  bash scripts/demo.sh [hydra overrides]
#   = python scripts/train.py agent=ucb  (live backend on the default candidates; outputs under outputs/train/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python scripts/train.py agent=ucb "$@"
