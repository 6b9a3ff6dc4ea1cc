"""How much longer is a training step that triggers a checkpoint? Target: skytune adds < 2%.

    .venv/bin/python bench/checkpoint_stall.py                       # CPU, tiny model, local S3
    python bench/checkpoint_stall.py --model Qwen/Qwen2.5-7B-Instruct --steps 60 \\
        --save-every 10 --micro-batch 4 --max-length 2048 --store s3://my-bucket/bench   # GPU

Runs a real `skytune train` (in this process, S3 store; a local moto_server unless --store is
given) and times every step from one `on_step_begin` to the next, so a checkpoint step's
interval includes everything the trainer does after it: the trainer's own synchronous save
to local disk (transformers' code, the same with or without skytune) and skytune's on_save
hook (queue the upload). The upload itself (stamping, sha256, transfer, COMPLETE, pruning)
runs in skytune's upload worker process; steps that overlap it are compared with steps that
do not. Times are time.monotonic(), which the worker's reported upload windows use too.

Reported, in % of the median plain step (no checkpoint, no upload running). Steps that log
(every 5th) are compared with plain steps that log: a checkpoint step usually is one, and
logging costs the trainer a sync and a print, with or without skytune.
  skytune_added_pct       (checkpoint-step interval - trainer's own save) vs a plain step
  hook_pct                skytune's on_save hook alone
  upload_interference_pct steps that do not log, while an upload runs vs without one
  checkpoint_step_pct     the whole checkpoint step, trainer's own save included
Results go to bench/results/stall-<host>-<date>.json.

On a CPU the trainer's torch threads use every core, so any work beside it (the upload, the
local S3 server) takes time from it, whoever does that work; `--threads 1` leaves a core
free, as on a GPU machine, where the training loop is one Python thread and the GIL, not
cores, is what an upload in the training process takes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOG_EVERY = 5


def _git_version() -> str | None:
    """The commit measured, '+' when the tree had changes."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


class Timeline:
    """Monotonic-clock marks from the training loop and the upload worker."""

    def __init__(self):
        self.step_begin: dict[int, float] = {}
        self.saves: dict[int, float] = {}  # step -> trainer's _save_checkpoint seconds
        self.hooks: dict[int, float] = {}  # step -> skytune on_save seconds
        self.uploaders: list = []  # their .uploads: (step, start, end) per checkpoint

    @property
    def uploads(self) -> list[tuple[float, float]]:
        return [(a, b) for u in self.uploaders for _, a, b in u.uploads]


def instrument(tl: Timeline, control: bool = False) -> None:
    """Wrap the pieces we time; no library code changes. `control`: skytune's on_save does
    nothing (no upload), to see what a checkpoint step costs here without it."""
    from transformers import Trainer, TrainerCallback

    from skytune.sync import CheckpointUploader
    from skytune.train import session as sess

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            tl.step_begin[state.global_step + 1] = time.monotonic()

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

    orig_on_save = (lambda *a, **kw: None) if control else sess._StoreCallback.on_save

    def on_save(self, args, state, control, **kw):
        t0 = time.perf_counter()
        try:
            return orig_on_save(self, args, state, control, **kw)
        finally:
            tl.hooks[state.global_step] = time.perf_counter() - t0

    sess._StoreCallback.on_save = on_save

    orig_init = CheckpointUploader.__init__

    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        tl.uploaders.append(self)

    CheckpointUploader.__init__ = __init__


def analyze(tl: Timeline, save_every: int, log_every: int, skip: int) -> dict:
    steps = sorted(tl.step_begin)
    begin = tl.step_begin
    interval = {s: begin[n] - begin[s] for s, n in zip(steps, steps[1:], strict=False)}
    interval = {s: v for s, v in interval.items() if s > skip}  # warm-up steps excluded
    ckpt = {s: v for s, v in interval.items() if s % save_every == 0}

    def busy(s: int) -> bool:
        a, b = tl.step_begin[s], tl.step_begin[s] + interval[s]
        return any(u0 < b and u1 > a for u0, u1 in tl.uploads)

    plain = {s: v for s, v in interval.items() if s not in ckpt and not busy(s)}
    during = {s: v for s, v in interval.items() if s not in ckpt and busy(s)}

    # A step that logs costs more (the trainer syncs for the loss and prints it), and a
    # checkpoint step usually is one (save_every is a multiple of log_every): compare steps
    # that log with steps that log, and the rest with the rest.
    def logs(s: int) -> bool:
        return s % log_every == 0

    def median(d: dict[int, float], log: bool) -> float | None:
        vals = [v for s, v in d.items() if logs(s) == log]
        return statistics.median(vals) if vals else None

    base = median(plain, False)
    base_log = median(plain, True) or base

    def pct_of(s: int, x: float) -> float:
        return 100 * (x / (base_log if logs(s) else base) - 1)

    def med_pct(xs) -> float:
        return round(statistics.median(xs), 2)

    hook = statistics.median(tl.hooks[s] for s in ckpt)
    quiet_during = median(during, False)
    return {
        "plain_step_s": round(base, 4), "plain_log_step_s": round(base_log, 4),
        "plain_steps": len(plain), "steps_during_upload": len(during),
        "checkpoint_steps": len(ckpt),
        "trainer_save_s_median": round(statistics.median(tl.saves[s] for s in ckpt), 4),
        "hook_s_median": round(hook, 4),
        "upload_s_median": round(statistics.median(b - a for a, b in tl.uploads), 3)
        if tl.uploads else None,
        "skytune_added_pct": med_pct(pct_of(s, v - tl.saves.get(s, 0.0))
                                     for s, v in ckpt.items()),
        "hook_pct": round(100 * hook / base, 2),
        "upload_interference_pct": round(100 * (quiet_during / base - 1), 2)
        if quiet_during else None,
        "checkpoint_step_pct": med_pct(pct_of(s, v) for s, v in ckpt.items()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llama-h512-l4")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--store", help="s3://bucket/prefix, or file:///dir for the upload worker's "
                    "own cost without an S3 server (default: a local moto_server)")
    ap.add_argument("--threads", type=int, help="torch CPU threads; on a CPU, 1 leaves the other "
                    "cores free, as a GPU trainer does (its training loop is one Python thread)")
    ap.add_argument("--control", action="store_true", help="upload nothing (skytune's on_save "
                    "does nothing): the same numbers without skytune's part, a noise floor")
    ap.add_argument("--out", type=Path, help="a .json file, or a directory (default: "
                    "bench/results) for stall-<host>-<date>.json")
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
            "train": {"max_steps": args.steps, "save_every": args.save_every,
                      "log_every": LOG_EVERY, "micro_batch": args.micro_batch,
                      "max_length": args.max_length, "epochs": 100, "warmup_ratio": 0.0},
            "output": {"store": store, "keep_last": 2,
                       "run_id": f"stall-{uuid.uuid4().hex[:6]}"},
        }))
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        tl = Timeline()
        instrument(tl, control=args.control)
        from skytune.recipe import load_recipe
        from skytune.train import run
        from skytune.train.common import detect_device

        result = run(load_recipe(str(recipe)), resume="never")
        numbers = analyze(tl, args.save_every, LOG_EVERY, skip=max(2, args.save_every // 2))
        dev = detect_device()
        out = {
            "bench": "checkpoint_stall",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"host": socket.gethostname(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "device": dev.name,
                        "load_avg_1m": os.getloadavg()[0]},
            "model": args.model, "steps": args.steps, "save_every": args.save_every,
            "micro_batch": args.micro_batch, "max_length": args.max_length,
            "torch_threads": args.threads, "control_no_upload": args.control,
            "skytune_git": _git_version(),
            "store": store if args.store else "local moto_server",
            "result_step": result.get("step"),
            **numbers,
            "target": "skytune_added_pct < 2 and upload_interference_pct < 2",
        }
        path = args.out or HERE / "results"
        if path.suffix != ".json":  # a directory, as the other benches take (gpu-session.sh)
            path = path / f"stall-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
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
