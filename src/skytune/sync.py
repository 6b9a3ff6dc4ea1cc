"""A run in a store: run id, manifest, metrics, checkpoint upload during training, resume, pull.

    run = RunWriter(open_store(recipe.store_url()), run_id(recipe), recipe)
    run.start()                                   # checks the store, writes recipe.yaml + manifest
    trainer.add_callback(CheckpointSync(run))     # uploads checkpoint-N as checkpoints/step-N
    run.upload_final(Path("out/final"), "adapter", step)
    run.finish("completed")
    pull("file://runs/demo-1a2b3c4d", what="adapter", to=Path("models/demo/adapter"))

Store layout (one run = one prefix):
    <run>/recipe.yaml  <run>/manifest.json  <run>/metrics.jsonl
    <run>/checkpoints/step-N/   <run>/adapter/   <run>/merged/   (each with COMPLETE last)
The training process (rank 0) is the manifest's only writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
    """Writes one run's files to its store. Thread-safe: uploads may finish in the background."""

    def __init__(self, store: Store, run_id: str, recipe: Recipe):
        self.store, self.run_id, self.recipe = store, run_id, recipe
        self._lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._metrics: list[str] = []
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

    def _write_manifest(self) -> None:
        # The upload thread and the training thread both write it: serialize and put under
        # one lock, or an older snapshot could land after a newer one.
        with self._put_lock:
            with self._lock:
                self.manifest["timings"]["updated_at"] = _now()
                data = json.dumps(self.manifest, indent=1).encode()
            self.store.put_bytes(self.key("manifest.json"), data)

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

    def flush_metrics(self) -> None:
        with self._lock:
            data = ("\n".join(self._metrics) + "\n").encode() if self._metrics else b""
        self.store.put_bytes(self.key("metrics.jsonl"), data)

    def upload_artifact(self, local_dir: Path, name: str, meta: dict[str, Any],
                        progress=None) -> dict:
        """Upload local_dir as <run>/<name> (COMPLETE last) and record it in the manifest."""
        record = upload_artifact(self.store, local_dir, self.key(name), meta=meta,
                                 progress=progress)
        with self._lock:
            self.manifest["artifacts"][name] = {
                k: v for k, v in record.items() if k != "files"
            } | {"files": record["files"]}
            if name.startswith("checkpoints/"):
                step = int(meta.get("step", 0))
                if step >= int(self.manifest.get("step") or 0):
                    self.manifest["step"] = step
                    self.manifest["last_checkpoint"] = name
        self._write_manifest()
        return record

    def remove_artifact(self, name: str) -> None:
        with self._lock:
            self.manifest["artifacts"].pop(name, None)
        self._write_manifest()
        self.store.delete(self.key(name))

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
    """Uploads checkpoints as `checkpoints/step-N` in the background and keeps the last K.

        up = CheckpointUploader(writer, keep_last=3)
        up.submit(Path("work/checkpoints/checkpoint-40"), 40, meta)   # returns at once
        failed = up.wait()                                            # before the process ends

    One worker thread: training never waits for the network, checkpoints land in step order,
    and hashing a multi-GB checkpoint (sha256 for COMPLETE) happens off the training thread.
    Each upload retries with exponential backoff on top of the store client's own retries;
    a checkpoint that still fails is recorded and the run exits non-zero at the end.
    Older checkpoints are deleted only after a newer one is COMPLETE, so the store always
    holds at least one resumable checkpoint. Local copies older than the newest uploaded one
    are removed to keep the VM's disk from filling up.

    Knobs (environment): SKYTUNE_UPLOAD_ATTEMPTS (default 5) and SKYTUNE_UPLOAD_BACKOFF
    (seconds before the first retry, doubling; default 10). Test hook:
    SKYTUNE_FAULT_DELAY_UPLOAD=SECONDS sleeps once per checkpoint after its first bytes are
    sent and before COMPLETE, to widen the "killed mid-upload" window in fault tests.
    """

    def __init__(self, writer: RunWriter, keep_last: int = 3):
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.keep_last = writer, keep_last
        self.attempts = max(1, int(os.environ.get("SKYTUNE_UPLOAD_ATTEMPTS", "5")))
        self.backoff = float(os.environ.get("SKYTUNE_UPLOAD_BACKOFF", "10"))
        self.failed: list[int] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="skytune-upload",
                                        initializer=_lower_priority)
        self._pending: list = []

    def submit(self, local_dir: Path, step: int, meta: dict[str, Any] | Callable[[], dict]
               ) -> None:
        """Queue a saved checkpoint for upload (metrics are flushed with it) and return.
        `meta` may be a function (run on the upload thread, e.g. to stamp the directory)."""
        self._pending.append(self._pool.submit(self._upload, Path(local_dir), step, meta))

    def wait(self) -> list[int]:
        """Block until pending uploads finish; return the steps that never uploaded."""
        while self._pending:
            self._pending.pop(0).result()  # _upload never raises
        return list(self.failed)

    def close(self) -> list[int]:
        failed = self.wait()
        self._pool.shutdown(wait=True)
        return failed

    def _upload(self, local_dir: Path, step: int, meta: dict[str, Any]) -> None:
        name = f"checkpoints/step-{step}"
        t0 = time.monotonic()
        if callable(meta):
            meta = meta()

        def attempt() -> dict:
            self.writer.flush_metrics()
            return self.writer.upload_artifact(local_dir, name, meta, progress=_fault_hook())

        try:
            record = retry(attempt, f"upload of checkpoint step {step}", self.attempts,
                           self.backoff)
        except Exception as e:  # noqa: BLE001 - training goes on; the run fails at the end
            log.error("checkpoint step %d: upload failed after %d attempts: %s", step,
                      self.attempts, e)
            self.failed.append(step)
            return
        size = sum(f["size"] for f in record["files"].values())
        log.info("checkpoint step %d uploaded to %s/%s (%.1f MB in %.1fs)", step,
                 self.writer.url, name, size / 1e6, time.monotonic() - t0)
        try:
            self._prune(step, local_dir)
        except Exception as e:  # noqa: BLE001 - a failed cleanup costs storage, not the run
            log.warning("checkpoint step %d: could not delete older checkpoints: %s", step, e)

    def _prune(self, step: int, local_dir: Path) -> None:
        """Keep the newest keep_last COMPLETE checkpoints up to `step`; delete the rest below
        it, including leftovers of uploads that were killed before their COMPLETE."""
        store, run = self.writer.store, self.writer.run_id
        steps = checkpoint_steps(store, run)
        complete = [s for s in complete_checkpoints(store, run) if s <= step]
        keep = set(complete[: self.keep_last])  # newest first
        for old in sorted(s for s in steps if s < step and s not in keep):
            self.writer.remove_artifact(f"checkpoints/step-{old}")
        for d in local_dir.parent.glob("checkpoint-*"):
            if d.name.split("-")[-1].isdigit() and int(d.name.split("-")[-1]) < step:
                shutil.rmtree(d, ignore_errors=True)


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


def _lower_priority() -> None:
    """Run uploads (and the s3transfer threads they start, which inherit it) at nice 10: on
    a VM with few cores, hashing and sending must not take CPU from the training loop."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _fault_hook():
    """The SKYTUNE_FAULT_DELAY_UPLOAD test hook (see CheckpointUploader), or None."""
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
