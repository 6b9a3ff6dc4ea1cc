"""A preemption on the GPU machine: train into an S3 store, SIGKILL once, resume, compare.

    python bench/gpu_preempt.py [--model tiny:llama-h768-l12] [--steps 120] [--out DIR]

Starts moto_server on loopback as the S3 store, runs `skytune train jobs/recipes/demo.yaml`
in bf16, kills it with SIGKILL as soon as the checkpoint at half the steps is COMPLETE in
the store (training is then past it, with the next upload possibly in flight), restarts the
same command and checks that it resumed from that checkpoint and finished. Prints one JSON
line (device, date, timings) and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:llama-h768-l12")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from skytune.stores.local_s3 import start_local_s3

    server, endpoint = start_local_s3(Path("/tmp/skytune-preempt-moto.log"))
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint,
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1",
           "SKYTUNE_WORK_DIR": "/tmp/skytune-preempt-work"}
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
        s3.create_bucket(Bucket="skytune")
        half = a.steps // 2
        cmd = [sys.executable, "-m", "skytune.cli", "train", "jobs/recipes/demo.yaml",
               "--set", f"model={a.model}", "--set", "output.store=s3://skytune/gpu",
               "--set", f"train.max_steps={a.steps}", "--set", f"train.save_every={half // 2}",
               "--set", "train.eval_every=null", "--set", "train.log_every=10"]
        t0 = time.monotonic()
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        killed_at = None
        while first.poll() is None:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="skytune", Prefix="gpu/")
                    .get("Contents", [])]
            if any(k.endswith(f"checkpoints/step-{half}/COMPLETE") for k in keys):
                first.send_signal(signal.SIGKILL)
                killed_at = time.monotonic() - t0
                break
            time.sleep(0.2)
        first.wait()
        t1 = time.monotonic()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        t2 = time.monotonic()
        log = second.stdout + second.stderr
        resumed = [line for line in log.splitlines() if "resuming" in line]
        import torch

        result = {
            "bench": "gpu_preempt", "device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d"), "model": a.model, "steps": a.steps,
            "killed_after_s": round(killed_at or -1, 1), "kill_signal": "SIGKILL",
            "resume_log": resumed[:1], "restart_exit_code": second.returncode,
            "restart_seconds": round(t2 - t1, 1),
            "final_adapter_complete": any(
                o["Key"].endswith("adapter/COMPLETE") for o in
                s3.list_objects_v2(Bucket="skytune", Prefix="gpu/").get("Contents", [])),
        }
        print("GPU_PREEMPT_RESULT", json.dumps(result))
        if second.returncode != 0:
            print(log[-4000:])
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-preempt.json").write_text(json.dumps(result, indent=1))
        assert killed_at is not None, "the first run finished before it could be killed"
        import re

        step = int(re.search(r"from step (\d+)", resumed[0]).group(1)) if resumed else -1
        assert step >= half, f"did not resume from the killed run's checkpoint: {resumed}"
        assert result["final_adapter_complete"] and second.returncode == 0
    finally:
        server.kill()


if __name__ == "__main__":
    main()
