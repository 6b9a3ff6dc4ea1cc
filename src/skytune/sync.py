"""A run in a store: run id, manifest, metrics, checkpoint upload during training, resume, pull.

    run = RunWriter(open_store(recipe.store_url()), run_id(recipe), recipe)
    run.start()                                   # checks the store, writes recipe.yaml + manifest
    up = CheckpointUploader(run, keep_last=3)     # a worker process: uploads, COMPLETE, prune
    up.submit(Path("work/checkpoint-40"), 40, meta)  # as checkpoints/step-40; returns at once
    up.close()
    run.upload_artifact(Path("out/final"), "adapter", meta)   # COMPLETE last, in the manifest
    run.finish("completed")
    pull("file://runs/demo-1a2b3c4d", what="adapter", to=Path("models/demo/adapter"))

Store layout (one run = one prefix):
    <run>/recipe.yaml  <run>/manifest.json  <run>/metrics.jsonl
    <run>/checkpoints/step-N/   <run>/adapter/   <run>/merged/   (each with COMPLETE last)
The training process (rank 0) owns the manifest: it alone changes it, and one writer at a
time puts it (its checkpoint upload worker while that runs, see CheckpointUploader).
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skytune import __version__
from skytune.errors import SkytuneError
from skytune.store import (
    Store,
    download_artifact,
    iter_dirs,
    open_store,
    read_complete,
    upload_artifact,
)

if TYPE_CHECKING:
    from skytune.recipe import Recipe

log = logging.getLogger("skytune")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_id(recipe: Recipe, fresh: bool = False) -> str:
    """Stable run id: the same across SkyPilot managed-job recoveries (SKYPILOT_TASK_ID is
    kept on recovery) and across plain restarts of the same recipe (recipe hash).
    `fresh` (--resume never) adds a UTC timestamp so nothing old is picked up."""
    if recipe.output.run_id:
        return recipe.output.run_id
    task = os.environ.get("SKYPILOT_TASK_ID")
    suffix = hashlib.sha256(task.encode()).hexdigest()[:8] if task else recipe.config_hash()
    rid = f"{recipe.name}-{suffix}"
    return f"{rid}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}" if fresh else rid


class RunWriter:
    """Writes one run's files to its store. Thread-safe: upload answers arrive on a thread.

    While a CheckpointUploader is attached (`attach`), manifest.json and metrics.jsonl go
    through its worker process, queued behind the uploads before them: the store sees one
    writer at a time, and a manifest never lands before the upload it describes."""

    def __init__(self, store: Store, run_id: str, recipe: Recipe):
        self.store, self.run_id, self.recipe = store, run_id, recipe
        self._lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._metrics: list[str] = []
        self._sink: Callable[[str, bytes], None] | None = None
        self.manifest: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"{self.store.url}/{self.run_id}"

    def key(self, rel: str) -> str:
        return f"{self.run_id}/{rel}"

    def start(self) -> None:
        """Check the store is reachable (before any training) and open the manifest."""
        self.store.check()
        old = read_manifest(self.store, self.run_id) or {}
        self.manifest = {
            **old,
            "run_id": self.run_id, "name": self.recipe.name, "method": self.recipe.method,
            "model": self.recipe.model, "recipe_hash": self.recipe.config_hash(),
            "skytune_version": __version__, "status": "running",
            "artifacts": old.get("artifacts", {}),
            "timings": {**old.get("timings", {}), "started_at": old.get("timings", {}).get(
                "started_at", _now()), "updated_at": _now()},
        }
        raw = self.store.get_bytes(self.key("metrics.jsonl"))
        self._metrics = raw.decode().splitlines() if raw else []
        self.store.put_bytes(self.key("recipe.yaml"), self.recipe.to_yaml().encode())
        self._write_manifest()

    def attach(self, sink: Callable[[str, bytes], None] | None) -> None:
        """Send manifest and metrics writes to sink(key, data) from now on (None: the store)."""
        with self._put_lock:
            self._sink = sink

    def _put(self, rel: str, data: bytes) -> None:
        # Called under _put_lock: writes leave in the order they were made.
        if self._sink is not None:
            self._sink(self.key(rel), data)
        else:
            self.store.put_bytes(self.key(rel), data)

    def _write_manifest(self) -> None:
        # Several threads write it: serialize and send under one lock, or an older snapshot
        # could land after a newer one.
        with self._put_lock:
            with self._lock:
                self.manifest["timings"]["updated_at"] = _now()
                data = json.dumps(self.manifest, indent=1).encode()
            self._put("manifest.json", data)

    def note_resume(self, step: int) -> None:
        """Record a resume in the manifest; drop metrics rows from the lost steps after it."""
        with self._lock:
            self._metrics = [m for m in self._metrics if json.loads(m).get("step", 0) <= step]
            self.manifest.setdefault("resumes", []).append({"from_step": step, "at": _now()})
        self._write_manifest()

    def log_metrics(self, row: dict[str, Any], flush: bool = False) -> None:
        with self._lock:
            self._metrics.append(json.dumps(row))
        if flush:
            self.flush_metrics()

    def metrics_text(self) -> str:
        with self._lock:
            return "\n".join(self._metrics) + "\n" if self._metrics else ""

    def flush_metrics(self) -> None:
        data = self.metrics_text().encode()
        with self._put_lock:
            self._put("metrics.jsonl", data)

    def upload_artifact(self, local_dir: Path, name: str, meta: dict[str, Any],
                        progress=None) -> dict:
        """Upload local_dir as <run>/<name> (COMPLETE last) and record it in the manifest."""
        record = upload_artifact(self.store, local_dir, self.key(name), meta=meta,
                                 progress=progress)
        self.record_artifact(name, record)
        return record

    def record_artifact(self, name: str, record: dict[str, Any],
                        removed: Iterable[str] = ()) -> None:
        """An artifact that is COMPLETE in the store (and artifacts that are gone from it)."""
        with self._lock:
            self.manifest["artifacts"][name] = record
            if name.startswith("checkpoints/"):
                step = int(record.get("step", 0))
                if step >= int(self.manifest.get("step") or 0):
                    self.manifest["step"] = step
                    self.manifest["last_checkpoint"] = name
            for gone in removed:
                self.manifest["artifacts"].pop(gone, None)
        self._write_manifest()

    def note(self, **fields: Any) -> None:
        with self._lock:
            self.manifest.update(fields)
        self._write_manifest()

    def finish(self, status: str, **fields: Any) -> None:
        self.flush_metrics()
        with self._lock:
            self.manifest.update(status=status, **fields)
            self.manifest["timings"]["finished_at"] = _now()
        self._write_manifest()


# ---------------------------------------------------------------------------------------
# Reading runs


def read_manifest(store: Store, run: str) -> dict[str, Any] | None:
    raw = store.get_bytes(f"{run}/manifest.json")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def checkpoint_steps(store: Store, run: str) -> list[int]:
    """Steps of every checkpoint directory of this run, complete or not, newest first."""
    prefix = f"{run}/checkpoints"
    return sorted((int(d[5:]) for d in iter_dirs(store.list(prefix), prefix)
                   if d.startswith("step-") and d[5:].isdigit()), reverse=True)


def complete_checkpoints(store: Store, run: str) -> list[int]:
    """Steps of this run's checkpoints that have a COMPLETE marker, newest first."""
    return [s for s in checkpoint_steps(store, run)
            if read_complete(store, f"{run}/checkpoints/step-{s}") is not None]


def fetch_latest_checkpoint(store: Store, run: str, work_dir: Path) -> tuple[Path, int] | None:
    """Download the newest complete, intact checkpoint into work_dir; skip broken ones."""
    for step in checkpoint_steps(store, run):
        dst = work_dir / f"checkpoint-{step}"
        try:
            download_artifact(store, f"{run}/checkpoints/step-{step}", dst)
        except SkytuneError as e:
            log.warning("skipping checkpoint step %d: %s", step, e)
            continue
        return dst, step
    return None


def fetch_run_artifact(store: Store, run: str, names: Iterable[str], dst: Path
                       ) -> tuple[str, Path] | None:
    """Download the first of `names` (e.g. "adapter", "merged") that is complete in the run
    to dst/<name>, sha256-verified, with a progress bar; (name, path), or None if none is."""
    from skytune.progress import bytes_bar

    for name in names:
        if read_complete(store, f"{run}/{name}") is not None:
            log.info("fetching %s/%s/%s", store.url, run, name)
            with bytes_bar(f"download {run}/{name}") as bar:
                download_artifact(store, f"{run}/{name}", dst / name, progress=bar.update,
                                  on_total=bar.total)
            return name, dst / name
    return None


def split_run_url(run: str) -> tuple[Store, str]:
    """'s3://bucket/prefix/run-id' -> (store at s3://bucket/prefix, 'run-id')."""
    if "://" not in run:
        run = f"file://{Path(run).expanduser().resolve()}"
    base, _, rid = run.rstrip("/").rpartition("/")
    if not rid or base.endswith(":/"):
        raise SkytuneError(f"{run}: expected STORE/RUN_ID, e.g. s3://bucket/skytune/demo-1a2b3c4d")
    return open_store(base), rid


def resolve_run(spec: str) -> tuple[Store, str]:
    """A run URL, or a recipe file (newest run of that recipe in its store)."""
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        from skytune.recipe import load_recipe

        recipe = load_recipe(spec)
        store = open_store(recipe.store_url(), endpoint_url=recipe.output.endpoint_url)
        rows = [r for r in list_runs(store) if r.get("name") == recipe.name]
        if not rows:
            raise SkytuneError(f"{spec}: no run of '{recipe.name}' in {store.url} yet; "
                               f"train it first (skytune launch {spec} --local)")
        rows.sort(key=lambda r: (r["status"] == "completed", r.get("updated_at") or ""))
        return store, rows[-1]["run_id"]
    return split_run_url(spec)


def list_runs(store: Store | str) -> list[dict[str, Any]]:
    """One row per run in the store: status, step, last checkpoint, artifacts, bytes."""
    store = open_store(store) if isinstance(store, str) else store
    entries = store.list("")
    rows = []
    for rid in iter_dirs(entries, ""):
        m = read_manifest(store, rid)
        if m is None:
            continue
        size = sum(e.size for e in entries if e.key.startswith(f"{rid}/"))
        arts = sorted(a for a in m.get("artifacts", {}) if not a.startswith("checkpoints/"))
        rows.append({
            "run_id": rid, "name": m.get("name"), "status": m.get("status", "?"),
            "step": m.get("step"), "last_checkpoint": m.get("last_checkpoint"),
            "artifacts": arts, "bytes": size,
            "updated_at": m.get("timings", {}).get("updated_at"),
        })
    return rows


def pull(run: str, what: str = "adapter", to: Path | None = None) -> Path:
    """Download an artifact of a run (adapter, merged, checkpoint[:STEP]), sha256-verified."""
    store, rid = resolve_run(run)
    if read_manifest(store, rid) is None:
        raise SkytuneError(f"no run '{rid}' in {store.url}; `skytune runs {store.url}` lists them")
    name = what
    if what.startswith("checkpoint"):
        _, _, step = what.partition(":")
        steps = complete_checkpoints(store, rid)
        if not steps:
            raise SkytuneError(f"{store.url}/{rid}: no complete checkpoint to pull")
        if step and int(step) not in steps:
            raise SkytuneError(f"{store.url}/{rid}: checkpoint {step} is not complete; complete "
                               f"ones: {', '.join(map(str, steps))}")
        name = f"checkpoints/step-{step or steps[0]}"
    elif what not in ("adapter", "merged"):
        raise SkytuneError(f"--what {what}: expected merged, adapter or checkpoint[:STEP]")
    dst = to or Path("models") / rid / what.replace(":", "-")
    from skytune.progress import bytes_bar

    with bytes_bar(f"pull {rid}/{name}") as bar:
        download_artifact(store, f"{rid}/{name}", dst, progress=bar.update, on_total=bar.total)
    return dst


class CheckpointUploader:
    """Uploads checkpoints as `checkpoints/step-N` from a worker process and keeps the last K.

        up = CheckpointUploader(writer, keep_last=3)       # starts the worker (nice 10)
        up.submit(Path("work/checkpoints/checkpoint-40"), 40, meta, files)  # returns at once
        failed = up.close()                                # before the process ends

    The worker (skytune.upload_worker) writes `files` into the checkpoint (its self-
    description), hashes it, uploads it, writes COMPLETE last, and deletes older checkpoints
    only after a newer one is COMPLETE, so the store always holds a resumable one. None of
    that runs in the training process: there, boto3 and sha256 competed with the training
    loop for the GIL and slowed every step that overlapped an upload (bench/
    checkpoint_stall.py). Uploads run one at a time, in step order. The worker dies with
    the training process, leaving the checkpoint it was sending without COMPLETE.

    While the worker runs, the writer's manifest and metrics writes go through it too (see
    RunWriter.attach): one writer at a time, in order. Each upload retries with exponential
    backoff on top of the store client's own retries; a checkpoint that still fails is
    recorded and the run exits non-zero at the end.

    Knobs (environment): SKYTUNE_UPLOAD_ATTEMPTS (default 5) and SKYTUNE_UPLOAD_BACKOFF
    (seconds before the first retry, doubling; default 10). Test hook:
    SKYTUNE_FAULT_DELAY_UPLOAD=SECONDS sleeps once per checkpoint after its first bytes are
    sent and before COMPLETE, to widen the "killed mid-upload" window in fault tests.
    Create it on the main thread: on Linux the worker is killed when the creating thread ends.
    """

    def __init__(self, writer: RunWriter, keep_last: int = 3):
        self.writer, self.keep_last = writer, keep_last
        self.attempts = max(1, int(os.environ.get("SKYTUNE_UPLOAD_ATTEMPTS", "5")))
        self.backoff = float(os.environ.get("SKYTUNE_UPLOAD_BACKOFF", "10"))
        self.failed: list[int] = []
        self.uploads: list[tuple[int, float, float]] = []  # (step, start, end), time.monotonic
        self._pending: dict[int, int | None] = {}  # op id -> checkpoint step (None: a write)
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = self._dead = False
        root = str(Path(__file__).resolve().parents[1])  # the skytune this process runs
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, root, str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._send({"op": "open", **writer.store.open_args(), "run_id": writer.run_id,
                    "keep_last": keep_last, "attempts": self.attempts, "backoff": self.backoff,
                    "log_level": log.getEffectiveLevel()})
        self._threads = [threading.Thread(target=fn, daemon=True, name=f"skytune-upload-{n}")
                         for n, fn in (("send", self._send_loop), ("recv", self._recv_loop))]
        for t in self._threads:
            t.start()
        writer.attach(self._write)
        atexit.register(self.close)  # an exit without close() still waits for the uploads

    def submit(self, local_dir: Path, step: int, meta: dict[str, Any],
               files: dict[str, str] | None = None) -> None:
        """Queue a saved checkpoint for upload (metrics are flushed with it) and return.
        `files` ({name: text}) are written into the checkpoint first, by the worker."""
        self._send({"op": "upload", "step": step, "dir": str(Path(local_dir).resolve()),
                    "meta": meta, "files": files or {}, "metrics": self.writer.metrics_text()},
                   step=step)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until pending uploads (and writes) finish, or `timeout` seconds; return the
        steps that did not upload: failed, or still pending at the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending and not self._dead:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
            return self.failed + sorted(s for s in self._pending.values() if s is not None)

    def close(self, timeout: float | None = None) -> list[int]:
        """wait(timeout), then stop the worker; later writes go straight to the store."""
        if self._closing:
            return list(self.failed)
        failed = self.wait(timeout)
        self._closing = True
        atexit.unregister(self.close)
        if self._pending and not self._dead:  # out of time: stop mid-upload (no COMPLETE)
            self._proc.kill()
        self.writer.attach(None)
        self._outbox.put({"op": "exit"})
        self._outbox.put(None)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for t in self._threads:
            t.join(5)
        return failed

    # -- the pipe to the worker -----------------------------------------------------------------

    def _send(self, op: dict[str, Any], step: int | None = None) -> None:
        if op["op"] in ("upload", "put"):
            with self._cv:
                if self._dead or self._closing:
                    if step is not None:
                        log.error("checkpoint step %d: not uploaded; the upload worker is gone",
                                  step)
                        self.failed.append(step)
                    return
                op["id"] = next(self._ids)
                self._pending[op["id"]] = step
        self._outbox.put(op)

    def _write(self, key: str, data: bytes) -> None:
        self._send({"op": "put", "key": key, "data": data.decode()})

    def _send_loop(self) -> None:
        # JSON-encoding and pipe writes happen here, never on the training thread.
        pipe = self._proc.stdin
        while (op := self._outbox.get()) is not None:
            try:
                pipe.write((json.dumps(op) + "\n").encode())
                pipe.flush()
            except OSError:  # the worker died; _recv_loop reports it
                break
        try:
            pipe.close()
        except OSError:
            pass

    def _recv_loop(self) -> None:
        for line in self._proc.stdout:
            try:
                ev = json.loads(line)
                if ev["ev"] == "log":
                    logging.getLogger(ev["name"]).log(ev["level"], "%s", ev["msg"])
                elif ev["ev"] == "done":
                    self._done(ev)
            except Exception as e:  # noqa: BLE001 - one bad answer must not stop the rest
                log.warning("checkpoint upload worker: %s", e)
        code = self._proc.wait()
        with self._cv:
            lost = sorted(s for s in self._pending.values() if s is not None)
            if not self._closing:
                log.error("the checkpoint upload worker exited (code %s)%s", code,
                          f"; checkpoint(s) {lost} not uploaded" if lost else "")
            self.failed += lost
            self._pending.clear()
            self._dead = True
            self._cv.notify_all()
        self.writer.attach(None)

    def _done(self, ev: dict[str, Any]) -> None:
        with self._cv:
            step = self._pending.get(ev["id"])
        try:
            if step is not None:
                self.uploads.append((step, ev["t0"], ev["t1"]))
                if "record" in ev:  # queues the manifest write before this upload is done
                    self.writer.record_artifact(f"checkpoints/step-{step}", ev["record"],
                                                removed=ev.get("removed", ()))
                else:
                    self.failed.append(step)
        finally:
            with self._cv:
                self._pending.pop(ev["id"], None)
                self._cv.notify_all()


# The worker's entry point. `root` goes on sys.path only where the interpreter would not find
# this skytune by itself (a source checkout on sys.path, as the benches use).
_BOOT = ("import sys; root, parent = sys.argv[1], int(sys.argv[2]); "
         "root in sys.path or sys.path.insert(0, root); "
         "from skytune.upload_worker import main; main(parent)")


def retry(fn, what: str, attempts: int, backoff: float):
    """fn() with up to `attempts` tries, sleeping backoff, 2*backoff, ... between them."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - store errors of any kind are worth a retry
            if i + 1 == attempts:
                raise
            delay = backoff * 2**i
            log.warning("%s failed (%s); retry %d/%d in %.0fs", what, e, i + 1, attempts - 1,
                        delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
