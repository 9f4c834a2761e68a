#!/usr/bin/env bash
# Set up (idempotent) and run the main job, offline:  bash scripts/demo.sh [hydra overrides]
#   = python scripts/train.py agent=ucb  (train on replay, then one live episode; outputs under outputs/train/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
# The default candidate (SmolLM2) converts from its GGUF in ~30 s on first load, and its replay trace of the
# scenario's request pool is recorded once (a few minutes), both cached under ~/.cache/helios.
exec .venv/bin/python scripts/train.py agent=ucb "$@"
