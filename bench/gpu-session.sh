#!/usr/bin/env bash
# Everything skytune checks on the GPU machine, in one call of the device tool.
#   bash bench/gpu-session.sh tests          # doctor + tests/gpu (sft, methods incl. QLoRA, merge)
#   bash bench/gpu-session.sh preempt bench  # S3 kill/resume + attention + checkpoint-stall benches
#   bash bench/gpu-session.sh fast throughput # packing equality + tokens/s vs plain TRL (ROWS=...)
#   bash bench/gpu-session.sh ddp             # one GPU vs all GPUs (torchrun), on nvidia-h200-x2
# Carries: .whl (training stack + bitsandbytes, ../shared/device/wheels.sh) and .whl-extra
# (boto3 + moto server). Logs and JSON results go to $OUT (or bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  $(ls .whl-extra/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SKYTUNE_CACHE=/tmp/skytune-cache \
  SKYTUNE_BENCH_OUT=$OUT SKYTUNE_WORK_DIR=/tmp/skytune-work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
python3 -c "import inspect; from torch.nn.attention.varlen import varlen_attn as f; print('varlen_attn', inspect.signature(f))" 2>&1 | tail -1
for part in "$@"; do
  case $part in
    tests)
      python3 -m skytune.cli doctor > "$OUT/doctor.txt" 2>&1; echo "doctor exit $?"; tail -25 "$OUT/doctor.txt"
      python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" \
        | grep -E "RESULT|GPU_|passed|failed|FAILED|Error" ;;
    preempt)
      python3 bench/gpu_preempt.py --out "$OUT" 2>&1 | tail -8 ;;
    fast)
      python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_fast_gpu.py 2>&1 \
        | grep -E "GPU_|passed|failed|FAILED|Error" ;;
    throughput)
      python3 bench/throughput.py --rows "${ROWS:-trl-sft,skytune-sft,trl-dpo,skytune-dpo}" \
        --steps "${STEPS:-15}" --timeout "${ROW_TIMEOUT:-200}" --out "$OUT" 2>&1 | tail -40 ;;
    ddp)  # the same row on one GPU and, data parallel, on every GPU of this machine
      CUDA_VISIBLE_DEVICES=0 python3 bench/throughput.py --rows "${ROWS:-skytune-sft}" \
        --steps "${STEPS:-15}" --out "$OUT" 2>&1 | tail -3
      python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" \
        bench/throughput.py --rows "${ROWS:-skytune-sft}" --steps "${STEPS:-15}" --out "$OUT" \
        2>&1 | grep -E "RESULT|Error|error" | tail -6 ;;
    stall)  # to the local S3 server; uploading nothing (--control: the noise floor); to a file
            # store in /dev/shm (the upload worker's own cost, without the local S3 server's)
      for extra in "" "--control" "--store file:///dev/shm/skytune-stall"; do
        python3 bench/checkpoint_stall.py --model tiny:llama-h2048-l16 --micro-batch 8 \
          --max-length 512 --steps "${STALL_STEPS:-200}" --save-every 10 $extra --out "$OUT" \
          2>&1 | tail -19
      done
      rm -rf /dev/shm/skytune-stall ;;
    bench)
      python3 bench/attention.py --out "$OUT" 2>&1 | tail -15
      python3 bench/checkpoint_stall.py --model tiny:llama-h2048-l16 --steps 60 --save-every 10 \
        --micro-batch 8 --max-length 512 --out "$OUT" 2>&1 | tail -12 ;;
  esac
done
