"""The checkpoint upload worker: a child process of the training process that stamps, hashes
and uploads each checkpoint (COMPLETE last), prunes older ones, and writes the run's
manifest.json and metrics.jsonl in order with them. `sync.CheckpointUploader` starts it,
feeds it and reads its answers; nothing else talks to it.

    up = CheckpointUploader(writer, keep_last=3)    # starts this worker at nice 10
    up.submit(Path("work/checkpoints/checkpoint-40"), 40, meta, files)

Why a process and not a thread: boto3/s3transfer, sha256 and JSON are Python that holds the
GIL. On a thread of the training process they made every step that overlapped an upload
26% slower (bench/checkpoint_stall.py, H200, 0.11 s steps), because the training loop
launches its GPU kernels from Python too. Here they cost the trainer a spare core at most
(where training keeps every core busy, as on a CPU, nice 10 only lowers their share).

Protocol, one JSON object per line. On stdin, from the trainer:
    {"op": "open", "url", "endpoint_url"|"private", "run_id", "keep_last", "attempts",
     "backoff", "log_level"}                                     first, once
    {"op": "upload", "id", "step", "dir", "meta", "files", "metrics"}
    {"op": "put", "id", "key", "data"}                           manifest.json, metrics.jsonl
    {"op": "exit"}
On stdout, to the trainer:
    {"ev": "log", "level", "name", "msg"}                        re-logged by the trainer
    {"ev": "done", "id", ...}     an op finished; an upload adds "record" (its COMPLETE) or
                                  "error", "removed" (pruned checkpoints), "t0"/"t1"
Ops run one at a time in the order sent: uploads land in step order, and a manifest write
sent after an upload's answer lands after that upload.

The worker dies with the training process: at once on Linux (PR_SET_PDEATHSIG), else within
0.2 s (its parent pid changes). An upload it was in the middle of then has no COMPLETE, as
if it had run inside the killed trainer. Secrets come from the inherited environment.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("skytune")


class _Channel:
    """Answers to the trainer on the process's original stdout, one line per message."""

    def __init__(self, out):
        self.out, self.lock = out, threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        line = (json.dumps(msg) + "\n").encode()
        with self.lock:
            try:
                self.out.write(line)
                self.out.flush()
            except OSError:  # the trainer is gone: nothing left to report to
                os._exit(1)


class _ToTrainer(logging.Handler):
    """Log records go to the trainer, which logs them with its own handlers and format."""

    def __init__(self, chan: _Channel):
        super().__init__()
        self.chan = chan

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.chan.send({"ev": "log", "level": record.levelno, "name": record.name,
                            "msg": msg})
        except Exception:  # noqa: BLE001 - logging must never take the worker down
            self.handleError(record)


def main(parent: int) -> None:
    _die_with(parent)
    try:
        # Before any thread starts: s3transfer's threads inherit it. Hashing and sending must
        # not take CPU from the training loop on a VM with few cores.
        os.nice(10)
    except OSError:
        pass
    # Ctrl-C and SIGTERM reach the whole process group; the trainer decides (it waits for
    # pending uploads on both), and this process ends with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Keep stdout for the protocol: anything a library prints goes to stderr instead.
    chan = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    ops: queue.SimpleQueue = queue.SimpleQueue()
    # Read stdin on its own thread: the trainer's writes (a manifest, a metrics snapshot)
    # then never wait on an upload in progress.
    threading.Thread(target=_read, args=(ops,), daemon=True, name="stdin").start()
    Worker(chan, ops.get()).run(ops)


def _read(ops: queue.SimpleQueue) -> None:
    for line in sys.stdin.buffer:
        ops.put(json.loads(line))
    ops.put({"op": "exit"})


def _die_with(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watch below is enough
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


class Worker:
    def __init__(self, chan: _Channel, cfg: dict[str, Any]):
        root = logging.getLogger()
        root.handlers[:] = [_ToTrainer(chan)]
        root.setLevel(logging.WARNING)
        log.setLevel(cfg.get("log_level", logging.INFO))
        self.chan, self.run_id = chan, cfg["run_id"]
        self.keep_last = cfg["keep_last"]
        self.attempts, self.backoff = cfg["attempts"], cfg["backoff"]
        self.store = None
        self.error = ""
        try:
            from skytune.store import open_store

            self.store = open_store(cfg["url"], **{k: cfg[k] for k in ("endpoint_url", "private")
                                                   if k in cfg})
        except Exception as e:  # noqa: BLE001 - reported with every op; the run fails at the end
            self.error = f"cannot open {cfg['url']} in the upload worker: {e}"
            log.error("%s", self.error)

    def run(self, ops: queue.SimpleQueue) -> None:
        while (op := ops.get())["op"] != "exit":
            if op["op"] == "upload":
                answer = self.upload(op)
            else:
                answer = self.put(op)
            self.chan.send({"ev": "done", "id": op["id"], **answer})
        if self.store is not None:
            self.store.close()
        # Not a normal interpreter exit: that would wait on the stdin reader, still blocked
        # in read() (a fatal error at shutdown). Everything is sent; nothing else is pending.
        os._exit(0)

    def put(self, op: dict[str, Any]) -> dict[str, Any]:
        if self.store is None:
            return {"error": self.error}
        try:
            self.store.put_bytes(op["key"], op["data"].encode())
        except Exception as e:  # noqa: BLE001 - the next manifest write supersedes this one
            log.warning("could not write %s/%s: %s", self.store.url, op["key"], e)
            return {"error": str(e)}
        return {}

    def upload(self, op: dict[str, Any]) -> dict[str, Any]:
        from skytune.store import upload_artifact
        from skytune.sync import retry

        step, local = op["step"], Path(op["dir"])
        name = f"checkpoints/step-{step}"
        t0 = time.monotonic()
        if self.store is None:
            return {"error": self.error, "t0": t0, "t1": t0}
        store, run = self.store, self.run_id

        def attempt() -> dict:
            # Stamped here, not by the trainer: writing a few files is cheap, but not free.
            for rel, text in op.get("files", {}).items():
                (local / rel).write_text(text)
            if op.get("metrics") is not None:
                store.put_bytes(f"{run}/metrics.jsonl", op["metrics"].encode())
            return upload_artifact(store, local, f"{run}/{name}", meta=op["meta"],
                                   progress=fault_hook())

        try:
            record = retry(attempt, f"upload of checkpoint step {step}", self.attempts,
                           self.backoff)
        except Exception as e:  # noqa: BLE001 - training goes on; the run fails at the end
            log.error("checkpoint step %d: upload failed after %d attempts: %s", step,
                      self.attempts, e)
            return {"error": str(e), "t0": t0, "t1": time.monotonic()}
        size = sum(f["size"] for f in record["files"].values())
        log.info("checkpoint step %d uploaded to %s/%s/%s (%.1f MB in %.1fs)", step, store.url,
                 run, name, size / 1e6, time.monotonic() - t0)
        removed: list[str] = []
        try:
            removed = self.prune(step, local)
        except Exception as e:  # noqa: BLE001 - a failed cleanup costs storage, not the run
            log.warning("checkpoint step %d: could not delete older checkpoints: %s", step, e)
        return {"record": record, "removed": removed, "t0": t0, "t1": time.monotonic()}

    def prune(self, step: int, local_dir: Path) -> list[str]:
        """Keep the newest keep_last COMPLETE checkpoints up to `step`; delete the rest below
        it, including leftovers of uploads that were killed before their COMPLETE. Local
        copies older than `step` go too, so the VM's disk does not fill up."""
        from skytune.sync import checkpoint_steps, complete_checkpoints

        store, run = self.store, self.run_id
        steps = checkpoint_steps(store, run)
        complete = [s for s in complete_checkpoints(store, run) if s <= step]
        keep = set(complete[: self.keep_last])  # newest first
        removed = []
        for old in sorted(s for s in steps if s < step and s not in keep):
            store.delete(f"{run}/checkpoints/step-{old}")
            removed.append(f"checkpoints/step-{old}")
        for d in local_dir.parent.glob("checkpoint-*"):
            if d.name.split("-")[-1].isdigit() and int(d.name.split("-")[-1]) < step:
                shutil.rmtree(d, ignore_errors=True)
        return removed


def fault_hook():
    """The SKYTUNE_FAULT_DELAY_UPLOAD test hook: sleep once per checkpoint after its first
    bytes are sent and before COMPLETE, to widen the "killed mid-upload" window."""
    delay = float(os.environ.get("SKYTUNE_FAULT_DELAY_UPLOAD") or 0)
    if not delay:
        return None
    fired = threading.Event()

    def on_progress(_n: int) -> None:
        if not fired.is_set():
            fired.set()
            log.info("fault hook: checkpoint upload in progress; sleeping %.1fs", delay)
            time.sleep(delay)

    return on_progress
