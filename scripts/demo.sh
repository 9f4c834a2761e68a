#!/usr/bin/env bash
# Set up (idempotent) and run the main job, offline:  bash scripts/demo.sh [hydra overrides]
#   = python scripts/train.py agent=ucb  (live backend on the default candidates; outputs under outputs/train/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
# The default candidate (SmolLM2) converts from its GGUF in ~30 s on first load, cached under ~/.cache/helios.
# The early-exit family trained here is an override away (conf/env/live.yaml): env.candidates=live_ee.
exec .venv/bin/python scripts/train.py agent=ucb "$@"
