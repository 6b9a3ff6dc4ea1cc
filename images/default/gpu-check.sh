#!/usr/bin/env bash
# On the GPU machine (no registry access): install the locked pure-Python stack from .whl/
# over the machine's own torch, run `skytune doctor`, then one tiny training step on the GPU.
# Prepare here with images/default/fetch-wheels.sh, then run with the .whl folder carried:
#
#   run(command="images/default/gpu-check.sh", carry=[".whl"])
#
# Prints doctor's report and the training result, writes both under $OUT (if set), and
# exits non-zero if either fails. The wheels go to a --target folder put first on
# PYTHONPATH: the machine's torch/CUDA stay as they are (wherever its Python keeps them) and
# the locked versions shadow anything older. PYTHON picks the interpreter that has torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHL=${WHL:-.whl}
OUT=${OUT:-/tmp/skytune-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -d "$WHL" ] || { echo "gpu-check: no $WHL/; run images/default/fetch-wheels.sh first" >&2; exit 2; }
"$PY" -c "import torch" || { echo "gpu-check: $PY has no torch; set PYTHON=" >&2; exit 2; }

SITE=/tmp/skytune-gpu-site
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SITE" \
  "$WHL"/*.whl
# skytune from this checkout, no build needed: the source tree on PYTHONPATH, then the wheels.
export PYTHONPATH=$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF'
import torch, transformers, trl, peft, accelerate, datasets
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PYEOF

status=0
"$PY" -m skytune.cli doctor --recipe jobs/recipes/demo.yaml | tee "$OUT/doctor.txt" || status=1
"$PY" -m skytune.cli doctor --json > "$OUT/doctor.json" || status=1

# One tiny training step on the GPU: the demo recipe (tiny:llama, local data), one step,
# a throwaway store. Proves model build, LoRA, the TRL trainer and checkpointing run here.
start=$(date +%s)
"$PY" -m skytune.cli train jobs/recipes/demo.yaml --resume never \
  --set train.max_steps=1 --set train.save_every=1 \
  --set "output.store=file://$OUT/runs" 2>&1 | tee "$OUT/train.txt" || status=1
echo "gpu-check: train step took $(( $(date +%s) - start )) s; status $status"
exit $status
