#!/usr/bin/env bash
# `make lock-check`: slow checks of the image locks, no Docker engine needed.
#   1. offline: every lock is fresh and covers its requirements.in (same as make test);
#   2. the CPU-installable part of each lock (everything but torch/triton/nvidia-*/cuda-*/
#      xformers) installs with --require-hashes --no-deps from PyPI into a fresh Python 3.12
#      venv, skytune installs on top with --no-deps, and the torch-free imports work.
# Usage: images/lock-check.sh [PYTHON_FOR_SCRIPTS]      (needs network to PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
UV=${UV:-.venv/bin/uv}

"$PY" images/lock.py check

# Python 3.12, the images' Python: $PY312, python3.12 on PATH, uv's discovery, then pyenv's.
py312=${PY312:-}
if [ -z "$py312" ] && python3.12 -c pass 2>/dev/null; then py312=python3.12; fi
if [ -z "$py312" ] && [ -x "$UV" ]; then
  py312=$("$UV" python find 3.12 --no-python-downloads 2>/dev/null || true)
fi
if [ -z "$py312" ]; then
  py312=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
fi
[ -n "$py312" ] || { echo "lock-check: no Python 3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }

for lock in images/*/requirements.lock; do
  image=$(basename "$(dirname "$lock")")
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  start=$(date +%s)
  "$py312" -m venv "$tmp/venv"
  "$PY" images/lock.py cpu-subset "$lock" > "$tmp/cpu.lock"
  # PyPI only, as in the image build: ignore this machine's pip config (mirrors, find-links).
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$tmp/venv/bin/pip" install -q --disable-pip-version-check --index-url https://pypi.org/simple \
    --require-hashes --no-deps -r "$tmp/cpu.lock"
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$tmp/venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation .
  "$tmp/venv/bin/python" -c "import transformers, datasets, huggingface_hub, tokenizers, \
safetensors, numpy, pandas, pyarrow, boto3, pydantic, typer, yaml, rich, skytune.cli"
  "$tmp/venv/bin/skytune" --help > /dev/null
  # No torch in this venv: doctor must say so (exit 1) and still print valid JSON.
  "$tmp/venv/bin/skytune" doctor --json > "$tmp/doctor.json" || true
  "$tmp/venv/bin/python" -c "import json,sys; d=json.load(open(sys.argv[1])); \
assert not d['ok'] and any(p['what']=='torch not installed' for p in d['problems'])" "$tmp/doctor.json"
  n=$(grep -c '==' "$tmp/cpu.lock")
  echo "lock-check: $image: $n CPU packages installed with --require-hashes in $(( $(date +%s) - start )) s"
  rm -rf "$tmp"
  trap - EXIT
done
