#!/usr/bin/env bash
# On the GPU machine (no registry access): install the locked pure-Python stack from .whl/
# over the machine's own torch, run `skytune doctor`, then one tiny training step on the GPU.
# Prepare here with images/default/fetch-wheels.sh, then run with the .whl folder carried:
#
#   run(command="images/default/gpu-check.sh", carry=[".whl"])
#
# Prints doctor's report and the training result, writes both under $OUT (if set), and
# exits non-zero if either fails. Uses a venv with --system-site-packages so the machine's
# torch/CUDA stay as they are and the locked versions shadow anything older.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHL=${WHL:-.whl}
OUT=${OUT:-/tmp/skytune-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -d "$WHL" ] || { echo "gpu-check: no $WHL/; run images/default/fetch-wheels.sh first" >&2; exit 2; }

"$PY" -m venv --system-site-packages /tmp/skytune-gpu-venv
V=/tmp/skytune-gpu-venv/bin
"$V/pip" install -q --no-index --no-deps --disable-pip-version-check "$WHL"/*.whl
# skytune from this checkout, no build needed: the source tree on PYTHONPATH.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$V/python" - <<'PYEOF'
import torch, transformers, trl, peft, accelerate, datasets
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PYEOF

status=0
"$V/python" -m skytune.cli doctor --recipe jobs/recipes/demo.yaml | tee "$OUT/doctor.txt" || status=1
"$V/python" -m skytune.cli doctor --json > "$OUT/doctor.json" || status=1

# One tiny training step on the GPU: the demo recipe (tiny:llama, local data), one step,
# a throwaway store. Proves model build, LoRA, the TRL trainer and checkpointing run here.
start=$(date +%s)
"$V/python" -m skytune.cli train jobs/recipes/demo.yaml --resume never \
  --set train.max_steps=1 --set train.save_every=1 \
  --set "output.store=file://$OUT/runs" 2>&1 | tee "$OUT/train.txt" || status=1
echo "gpu-check: train step took $(( $(date +%s) - start )) s; status $status"
exit $status
