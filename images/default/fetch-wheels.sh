#!/usr/bin/env bash
# Download the locked wheels the GPU machine needs for images/default/gpu-check.sh into .whl/
# (that machine reaches no registry). Run here, from the repository root, with network:
#
#   images/default/fetch-wheels.sh            # -> .whl/*.whl (git-ignored)
#   # then on the GPU machine (run tool with carry: [".whl"]): images/default/gpu-check.sh
#
# Not fetched: torch, triton, nvidia-*, cuda-* (the GPU machine has its own torch + CUDA;
# they are GBs) and, by default, what a torch machine already has (numpy, jinja2, ...) or
# gpu-check does not need (bitsandbytes: 43 MB, boto3/botocore: 17 MB), to stay
# under the run tool's 64 MiB carry limit (SKIP, a regex; SKIP= fetches them too).
# Versions and sha256 hashes come from requirements.lock, so what is tested is what the
# image installs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}        # the GPU machine's Python (binary wheels are per-version)
SKIP=${SKIP-^(numpy|pandas|pyarrow|pillow|bitsandbytes|setuptools|sympy|networkx|jinja2|markupsafe|mpmath|filelock|fsspec|typing-extensions|boto3|botocore|s3transfer|jmespath)$}
DEST=${DEST:-.whl}

sub=$(mktemp)
trap 'rm -f "$sub"' EXIT
"$PY" - "$SKIP" > "$sub" <<'PYEOF'
import re, sys
sys.path.insert(0, "images")
import lock
skip = re.compile(sys.argv[1]) if sys.argv[1] else None
for name, pin in lock.parse_lock(lock.ROOT / "images/default/requirements.lock").items():
    if lock.GPU_ONLY.match(name) or (skip and skip.match(name)):
        continue
    print(pin.block)
PYEOF
mkdir -p "$DEST"
# Several --platform tags: pip matches them literally, and most wheels are tagged
# manylinux2014/_2_17, not _2_28.
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
  "$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes \
  --index-url https://pypi.org/simple --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -r "$sub" -d "$DEST"
n=$(find "$DEST" -name '*.whl' | wc -l)
echo "fetch-wheels: $n wheels, $(du -sh "$DEST" | cut -f1) in $DEST (carry limit: 64 MiB)"
