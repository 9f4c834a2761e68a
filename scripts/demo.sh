#!/usr/bin/env bash
# Set up (idempotent) and run the main job, offline:  bash scripts/demo.sh
# Until scripts/train.py lands this is the engine demo: SmolLM2 truncated to 20 of 30 layers with early exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m helios.engine smollm2-135m --depth 20 --criterion cosine --threshold 0.95 --exit-points 12,16 "$@"
