"""How much longer is a training step that triggers a checkpoint? Target: skytune adds < 2%.

    .venv/bin/python bench/checkpoint_stall.py                       # CPU, tiny model, local S3
    python bench/checkpoint_stall.py --model Qwen/Qwen2.5-7B-Instruct --steps 60 \\
        --save-every 10 --micro-batch 4 --max-length 2048 --store s3://my-bucket/bench   # GPU

Runs a real `skytune train` (in this process, S3 store; a local moto_server unless --store is
given) and times every step from one `on_step_begin` to the next, so a checkpoint step's
interval includes everything the trainer does after it: the trainer's own synchronous save
to local disk (transformers' code, the same with or without skytune) and skytune's on_save
hook (stamp the checkpoint, queue the upload). The upload itself (sha256 + transfer) runs in
a background thread; steps that overlap it are compared with steps that do not.

Reported, in % of the median plain step:
  skytune_added_pct       (checkpoint-step interval - trainer's own save) vs a plain step
  hook_pct                skytune's on_save hook alone
  upload_interference_pct plain steps while an upload runs vs plain steps without one
  checkpoint_step_pct     the whole checkpoint step, trainer's own save included
Results go to bench/results/stall-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class Timeline:
    """Wall-clock marks from the training loop and the upload thread."""

    def __init__(self):
        self.step_begin: dict[int, float] = {}
        self.saves: dict[int, float] = {}  # step -> trainer's _save_checkpoint seconds
        self.hooks: dict[int, float] = {}  # step -> skytune on_save seconds
        self.uploads: list[tuple[float, float]] = []


def instrument(tl: Timeline) -> None:
    """Wrap the pieces we time; no library code changes."""
    from transformers import Trainer, TrainerCallback

    from skytune.sync import CheckpointUploader
    from skytune.train import session as sess

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            tl.step_begin[state.global_step + 1] = time.perf_counter()

    orig_callbacks = sess.Session.callbacks

    def callbacks(self, *a, **kw):
        return [StepClock(), *orig_callbacks(self, *a, **kw)]

    sess.Session.callbacks = callbacks

    orig_save = Trainer._save_checkpoint

    def _save_checkpoint(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_save(self, *a, **kw)
        finally:
            tl.saves[self.state.global_step] = time.perf_counter() - t0

    Trainer._save_checkpoint = _save_checkpoint

    orig_on_save = sess._StoreCallback.on_save

    def on_save(self, args, state, control, **kw):
        t0 = time.perf_counter()
        try:
            return orig_on_save(self, args, state, control, **kw)
        finally:
            tl.hooks[state.global_step] = time.perf_counter() - t0

    sess._StoreCallback.on_save = on_save

    orig_upload = CheckpointUploader._upload

    def _upload(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_upload(self, *a, **kw)
        finally:
            tl.uploads.append((t0, time.perf_counter()))

    CheckpointUploader._upload = _upload


def analyze(tl: Timeline, save_every: int, skip: int) -> dict:
    steps = sorted(tl.step_begin)
    begin = tl.step_begin
    interval = {s: begin[n] - begin[s] for s, n in zip(steps, steps[1:], strict=False)}
    interval = {s: v for s, v in interval.items() if s > skip}  # warm-up steps excluded
    ckpt = {s: v for s, v in interval.items() if s % save_every == 0}

    def busy(s: int) -> bool:
        a, b = tl.step_begin[s], tl.step_begin[s] + interval[s]
        return any(u0 < b and u1 > a for u0, u1 in tl.uploads)

    plain = [v for s, v in interval.items() if s not in ckpt and not busy(s)]
    during = [v for s, v in interval.items() if s not in ckpt and busy(s)]
    base = statistics.median(plain)
    added = [v - tl.saves.get(s, 0.0) for s, v in ckpt.items()]

    def pct(x: float) -> float:
        return round(100 * (x / base - 1), 2)

    return {
        "plain_step_s": round(base, 4),
        "plain_steps": len(plain), "steps_during_upload": len(during),
        "checkpoint_steps": len(ckpt),
        "trainer_save_s_median": round(statistics.median(tl.saves[s] for s in ckpt), 4),
        "hook_s_median": round(statistics.median(tl.hooks[s] for s in ckpt), 4),
        "upload_s_median": round(statistics.median(b - a for a, b in tl.uploads), 3),
        "skytune_added_pct": pct(statistics.median(added)),
        "hook_pct": round(100 * statistics.median(tl.hooks[s] for s in ckpt) / base, 2),
        "upload_interference_pct": pct(statistics.median(during)) if during else None,
        "checkpoint_step_pct": pct(statistics.median(ckpt.values())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llama-h512-l4")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--store", help="s3://bucket/prefix (default: a local moto_server)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from skytune.stores.local_s3 import start_local_s3

    work = Path(tempfile.mkdtemp(prefix="skytune-stall-"))
    os.environ["SKYTUNE_WORK_DIR"] = str(work / "work")
    moto = None
    try:
        store = args.store
        if not store:
            for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                         "AWS_DEFAULT_REGION": "us-east-1"}.items():
                os.environ[k] = v
            moto, endpoint = start_local_s3(work / "moto.log", nice=19)
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            import boto3

            bucket = f"stall-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            store = f"s3://{bucket}/bench"
        recipe = work / "stall.yaml"
        recipe.write_text(json.dumps({
            "name": "stall", "model": args.model, "method": "sft",
            "data": {"train": str(REPO / "jobs/recipes/data/demo_qa.jsonl"), "format": "qa"},
            "train": {"max_steps": args.steps, "save_every": args.save_every, "log_every": 5,
                      "micro_batch": args.micro_batch, "max_length": args.max_length,
                      "epochs": 100, "warmup_ratio": 0.0},
            "output": {"store": store, "keep_last": 2,
                       "run_id": f"stall-{uuid.uuid4().hex[:6]}"},
        }))
        tl = Timeline()
        instrument(tl)
        from skytune.recipe import load_recipe
        from skytune.train import run
        from skytune.train.common import detect_device

        result = run(load_recipe(str(recipe)), resume="never")
        numbers = analyze(tl, args.save_every, skip=max(2, args.save_every // 2))
        dev = detect_device()
        out = {
            "bench": "checkpoint_stall",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"host": socket.gethostname(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "device": dev.name,
                        "load_avg_1m": os.getloadavg()[0]},
            "model": args.model, "steps": args.steps, "save_every": args.save_every,
            "micro_batch": args.micro_batch, "max_length": args.max_length,
            "store": store if args.store else "local moto_server",
            "result_step": result.get("step"),
            **numbers,
            "target": "skytune_added_pct < 2 and upload_interference_pct < 2",
        }
        path = args.out or HERE / "results" / (
            f"stall-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    finally:
        if moto:
            moto.terminate()
            moto.wait(10)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
