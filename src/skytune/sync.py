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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skytune import __version__
from skytune.errors import SkytuneError
from skytune.store import (
    Store, download_artifact, iter_dirs, open_store, read_complete, upload_artifact,
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
        with self._lock:
            self.manifest["timings"]["updated_at"] = _now()
            data = json.dumps(self.manifest, indent=1).encode()
        self.store.put_bytes(self.key("manifest.json"), data)

    def log_metrics(self, row: dict[str, Any], flush: bool = False) -> None:
        with self._lock:
            self._metrics.append(json.dumps(row))
        if flush:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        with self._lock:
            data = ("\n".join(self._metrics) + "\n").encode() if self._metrics else b""
        self.store.put_bytes(self.key("metrics.jsonl"), data)

    def upload_artifact(self, local_dir: Path, name: str, meta: dict[str, Any]) -> dict:
        """Upload local_dir as <run>/<name> (COMPLETE last) and record it in the manifest."""
        record = upload_artifact(self.store, local_dir, self.key(name), meta=meta)
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


def complete_checkpoints(store: Store, run: str) -> list[int]:
    """Steps of this run's checkpoints that have a COMPLETE marker, newest first."""
    prefix = f"{run}/checkpoints"
    steps = []
    for d in iter_dirs(store.list(prefix), prefix):
        if d.startswith("step-") and d[5:].isdigit():
            steps.append(int(d[5:]))
    return [s for s in sorted(steps, reverse=True)
            if read_complete(store, f"{prefix}/step-{s}") is not None]


def fetch_latest_checkpoint(store: Store, run: str, work_dir: Path) -> tuple[Path, int] | None:
    """Download the newest complete, intact checkpoint into work_dir; skip broken ones."""
    prefix = f"{run}/checkpoints"
    steps = sorted((int(d[5:]) for d in iter_dirs(store.list(prefix), prefix)
                    if d.startswith("step-") and d[5:].isdigit()), reverse=True)
    for step in steps:
        dst = work_dir / f"checkpoint-{step}"
        try:
            download_artifact(store, f"{prefix}/step-{step}", dst)
        except SkytuneError as e:
            log.warning("skipping checkpoint step %d: %s", step, e)
            continue
        return dst, step
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
    """Uploads checkpoints as `checkpoints/step-N` and keeps the last K in the store.

    Older checkpoints are deleted only after a newer one is COMPLETE, so the store always
    holds at least one resumable checkpoint. Local copies older than the newest uploaded one
    are removed to keep the VM's disk from filling up.
    """

    def __init__(self, writer: RunWriter, keep_last: int = 3):
        self.writer, self.keep_last = writer, keep_last
        self.failed: list[int] = []

    def submit(self, local_dir: Path, step: int, meta: dict[str, Any]) -> None:
        try:
            self.writer.upload_artifact(local_dir, f"checkpoints/step-{step}", meta)
        except Exception as e:  # noqa: BLE001 - training goes on; the run fails at the end
            log.warning("checkpoint step %d: upload failed: %s", step, e)
            self.failed.append(step)
            return
        self._prune(step, local_dir)

    def wait(self) -> list[int]:
        """Block until pending uploads finish; return the steps that never uploaded."""
        return list(self.failed)

    def _prune(self, step: int, local_dir: Path) -> None:
        done = sorted(int(a.rsplit("-", 1)[1]) for a in self.writer.manifest["artifacts"]
                      if a.startswith("checkpoints/step-"))
        for old in done[: max(0, len(done) - self.keep_last)]:
            self.writer.remove_artifact(f"checkpoints/step-{old}")
        import shutil

        for d in local_dir.parent.glob("checkpoint-*"):
            if d.name.split("-")[-1].isdigit() and int(d.name.split("-")[-1]) < step:
                shutil.rmtree(d, ignore_errors=True)
