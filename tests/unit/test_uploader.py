"""CheckpointUploader and its worker process, on the file store: order, COMPLETE last, pruning,
the manifest's one writer, retries and failures, timeouts, and a worker that dies with its
trainer. (Against S3 and real training: tests/integration/test_faults.py.)

    .venv/bin/python -m pytest -q tests/unit/test_uploader.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skytune.recipe import load_recipe
from skytune.store import COMPLETE, FileStore, read_complete
from skytune.sync import CheckpointUploader, RunWriter, complete_checkpoints, fetch_run_artifact

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def writer(tmp_path):
    recipe = load_recipe(REPO / "jobs/recipes/demo.yaml", [f"output.store=file://{tmp_path}/s"])
    w = RunWriter(FileStore(tmp_path / "s"), "r1", recipe)
    w.start()
    return w


def checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(3000))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def manifest(writer: RunWriter) -> dict:
    return json.loads(writer.store.get_bytes("r1/manifest.json"))


def test_uploads_in_order_stamped_complete_and_pruned(writer, tmp_path):
    up = CheckpointUploader(writer, keep_last=2)
    local = tmp_path / "work"
    for step in (2, 4, 6):
        writer.log_metrics({"step": step, "loss": 1.0 / step})
        up.submit(checkpoint(local, step), step, {"kind": "checkpoint", "step": step},
                  files={"skytune.json": json.dumps({"step": step})})
    assert up.close() == []
    store = writer.store
    assert complete_checkpoints(store, "r1") == [6, 4]  # keep_last=2: step-2 deleted
    assert not store.list("r1/checkpoints/step-2")
    rec = read_complete(store, "r1/checkpoints/step-6")
    assert rec["step"] == 6 and set(rec["files"]) == {
        "adapter_model.safetensors", "trainer_state.json", "skytune.json"}
    assert json.loads(store.get_bytes("r1/checkpoints/step-6/skytune.json")) == {"step": 6}
    assert [s for s, _, _ in up.uploads] == [2, 4, 6]  # one at a time, in step order
    assert all(end <= start for (_, _, end), (_, start, _) in zip(up.uploads, up.uploads[1:],
                                                                strict=False))
    # The manifest: the worker's answers recorded by this process, written through the worker.
    m = manifest(writer)
    assert m == writer.manifest
    assert m["step"] == 6 and m["last_checkpoint"] == "checkpoints/step-6"
    assert sorted(m["artifacts"]) == ["checkpoints/step-4", "checkpoints/step-6"]
    assert m["artifacts"]["checkpoints/step-6"]["files"] == rec["files"]
    # metrics flushed with each checkpoint; local copies older than the newest upload gone
    rows = store.get_bytes("r1/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6]
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint-6"]
    # after close, writes go straight to the store from this process
    writer.note(extra=1)
    assert manifest(writer)["extra"] == 1


def test_failed_upload_retries_then_is_reported(writer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SKYTUNE_UPLOAD_ATTEMPTS", "2")
    monkeypatch.setenv("SKYTUNE_UPLOAD_BACKOFF", "0.05")
    caplog.set_level(logging.INFO, logger="skytune")
    up = CheckpointUploader(writer)
    up.submit(tmp_path / "work" / "checkpoint-3", 3, {"step": 3}, files={"x.json": "{}"})  # gone
    up.submit(checkpoint(tmp_path / "work", 5), 5, {"step": 5})
    assert up.close() == [3]
    assert "upload of checkpoint step 3 failed" in caplog.text and "retry 1/1" in caplog.text
    assert "checkpoint step 3: upload failed after 2 attempts" in caplog.text
    assert "checkpoint step 5 uploaded" in caplog.text  # the worker's log, through this process
    assert complete_checkpoints(writer.store, "r1") == [5]


def test_wait_timeout_and_close_stop_a_slow_upload(writer, tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_FAULT_DELAY_UPLOAD", "60")
    up = CheckpointUploader(writer)
    up.submit(checkpoint(tmp_path / "work", 7), 7, {"step": 7})
    t0 = time.monotonic()
    assert up.wait(timeout=0.5) == [7]  # still pending
    assert up.close(timeout=0) == [7]
    assert time.monotonic() - t0 < 10
    assert up._proc.poll() is not None
    assert read_complete(writer.store, "r1/checkpoints/step-7") is None


def test_worker_that_dies_fails_its_pending_uploads(writer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SKYTUNE_FAULT_DELAY_UPLOAD", "60")
    up = CheckpointUploader(writer)
    up.submit(checkpoint(tmp_path / "work", 8), 8, {"step": 8})
    deadline = time.monotonic() + 30
    while not list((writer.store.root / "r1/checkpoints").glob("step-8/*")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    up._proc.kill()
    assert up.wait() == [8]
    assert "upload worker exited" in caplog.text
    up.submit(checkpoint(tmp_path / "work", 9), 9, {"step": 9})  # refused, counted as failed
    assert up.close() == [8, 9]
    writer.note(after="crash")  # writes go straight to the store again
    assert manifest(writer)["after"] == "crash"


_TRAINER = """
import logging, sys, time
from pathlib import Path
from skytune.recipe import load_recipe
from skytune.store import FileStore
from skytune.sync import CheckpointUploader, RunWriter
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
root = Path(sys.argv[1])
w = RunWriter(FileStore(root / "s"), "r1", load_recipe(sys.argv[2]))
w.start()
up = CheckpointUploader(w)
print("worker", up._proc.pid, flush=True)
d = root / "work" / "checkpoint-4"
d.mkdir(parents=True)
(d / "model.bin").write_bytes(b"x" * 1000)
up.submit(d, 4, {"step": 4})
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited, waiting for init to reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_with_a_killed_trainer_and_writes_no_complete(tmp_path):
    env = {**os.environ, "SKYTUNE_FAULT_DELAY_UPLOAD": "5", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(tmp_path),
                             str(REPO / "jobs/recipes/demo.yaml")],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = iter(proc.stdout)
        pid = int(next(line for line in lines if line.startswith("worker")).split()[1])
        next(line for line in lines if "fault hook" in line)  # mid-upload, before COMPLETE
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 2
        while _alive(pid):
            assert time.monotonic() < deadline, "the worker outlived its trainer"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.3)
    store = FileStore(tmp_path / "s")
    assert store.list("r1/checkpoints/step-4")  # its files were on the way
    assert read_complete(store, "r1/checkpoints/step-4") is None


def test_fetch_run_artifact_takes_the_first_complete(tmp_path):
    from skytune.store import upload_artifact

    store = FileStore(tmp_path / "s")
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    store.put_bytes("r1/adapter/adapter_config.json", b"{}")  # no COMPLETE: skipped
    assert fetch_run_artifact(store, "r1", ["adapter"], tmp_path / "dst") is None
    upload_artifact(store, src, "r1/merged")
    name, path = fetch_run_artifact(store, "r1", ["adapter", "merged"], tmp_path / "dst")
    assert name == "merged" and path == tmp_path / "dst" / "merged"
    assert (path / "config.json").read_text() == "{}" and not (path / COMPLETE).exists()
