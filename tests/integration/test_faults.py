"""Fault injection: `skytune train` SIGKILLed at seeded random moments, the store cut mid-run.

    .venv/bin/python -m pytest -q tests/integration/test_faults.py      # ~2-4 min on 2 CPUs

Each training process is the real CLI (`skytune.cli.main` with `train RECIPE` argv) in its own
process, killed with SIGKILL like a preempted spot VM. Processes are forked from a
multiprocessing forkserver that has torch/transformers/trl imported once, so a restart costs
a fork instead of ~6 s of imports; nothing is shared after the fork. The local work dir is
wiped before each restart (a recovered spot job lands on a fresh VM), so every resume must
come from the S3 store (moto_server over HTTP).

Kill points: during a step, as soon as a checkpoint directory appears locally (while the
trainer writes it), and while a checkpoint is being uploaded (SKYTUNE_FAULT_DELAY_UPLOAD
holds the upload open between its first bytes and COMPLETE). The upload worker process dies
with its trainer, so a kill mid-upload leaves that checkpoint without COMPLETE.

SIGTERM (a spot VM's preemption notice) instead: a checkpoint at the next step boundary,
uploaded within SKYTUNE_TERM_GRACE, status "preempted", exit 143, and the restart resumes there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 24
PRELOAD = ["torch", "transformers", "peft", "datasets", "trl", "trl.trainer.sft_trainer",
           "boto3", "skytune.cli", "skytune.train.sft", "skytune.stores.s3"]


# -- the training process ----------------------------------------------------------------------

def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for k in [k for k in os.environ if k.startswith(("AWS_", "SKYTUNE_"))]:
        del os.environ[k]
    os.environ.update(env)
    sys.argv = ["skytune", *argv]
    from skytune.cli import main

    main()


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # The server imports this module to find _child: make it importable there.
    sys.path.insert(0, str(Path(__file__).parent))
    from skytune.tiny import resolve

    resolve("tiny:llama")  # build the tiny model once, before processes race for it
    return ctx


class Trainer:
    """One `skytune train` process; its stderr+stdout go to a log file we poll."""

    def __init__(self, ctx, recipe: Path, env: dict[str, str], log: Path, args=()):
        self.log = log
        log.write_text("")
        self.t0 = time.monotonic()
        self.proc = ctx.Process(target=_child, args=(["train", str(recipe), *args], env,
                                                     str(log)))
        self.proc.start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = 120) -> bool:
        """Poll until predicate() is true (True) or the process ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.proc.is_alive():
                return predicate()
            time.sleep(0.02)
        raise AssertionError(f"timed out; log tail:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def exit_code(self, timeout: float = 180) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"still running; log:\n{self.text()[-3000:]}"
        return self.proc.exitcode


def write_recipe(path: Path, store: str, **train) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "name": "faults", "model": "tiny:llama", "method": "sft", "preset": "fast_test",
        "adapter": {"type": "lora", "r": 8},
        "data": {"train": str(REPO / "jobs/recipes/data/demo_qa.jsonl"), "format": "qa",
                 "max_rows": 96},
        "train": {"max_steps": MAX_STEPS, "save_every": 2, "log_every": 1, "micro_batch": 2,
                  "max_length": 128, **train},
        "output": {"store": store, "keep_last": 2},
    }))
    return path


def child_env(s3_server, work: Path, **extra) -> dict[str, str]:
    return {**s3_server.env, "SKYTUNE_WORK_DIR": str(work), "COLUMNS": "400",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def corrupt_newest(store, run: str, complete: list[int]) -> tuple[int, int]:
    """Bit rot in the newest COMPLETE checkpoint: resume must skip it for the next older."""
    store.put_bytes(f"{run}/checkpoints/step-{complete[0]}/adapter_model.safetensors", b"rot")
    return complete[0], complete[1]


def adapter_tensors(store, run: str, dst: Path) -> dict:
    from safetensors.torch import load_file

    from skytune.store import download_artifact

    download_artifact(store, f"{run}/adapter", dst)
    return load_file(dst / "adapter_model.safetensors")


def metric_steps(store, run: str) -> list[int]:
    raw = store.get_bytes(f"{run}/metrics.jsonl") or b""
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


# -- kills ----------------------------------------------------------------------------------------

def test_sigkill_at_random_moments_resumes_and_matches_uninterrupted(
        forkserver, s3_server, s3_url, tmp_path):
    from skytune.store import open_store, read_complete
    from skytune.sync import complete_checkpoints, read_manifest

    store = open_store(s3_url)
    recipe = write_recipe(tmp_path / "recipe.yaml", s3_url)
    work = tmp_path / "work"
    run = "faults-killed"
    args = ("--set", f"output.run_id={run}")

    # The reference: the same recipe, never interrupted.
    ref = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "ref-work"),
                  tmp_path / "ref.log", args=("--set", "output.run_id=faults-ref"))
    assert ref.exit_code() == 0, ref.text()[-3000:]
    want = adapter_tensors(store, "faults-ref", tmp_path / "ref-adapter")

    rng = random.Random(20261121)
    plan = ["step", "save", "upload"] * 4
    rng.shuffle(plan)
    kills, resumes_expected, partial_seen, corrupted = [], [], 0, None
    for i, mode in enumerate(plan):
        shutil.rmtree(work, ignore_errors=True)  # a fresh VM: only the store survives
        complete = complete_checkpoints(store, run)
        expected = complete[0] if complete else None
        corrupt_now = corrupted is None and len(complete) >= 2 and i >= 4
        if corrupt_now:
            corrupted, expected = corrupt_newest(store, run, complete)
        if expected is not None:
            resumes_expected.append(expected)
        extra = {"SKYTUNE_FAULT_DELAY_UPLOAD": "2"} if mode == "upload" else {}
        t = Trainer(forkserver, recipe, child_env(s3_server, work, **extra),
                    tmp_path / f"run-{i}.log", args=args)
        local = work / run / "checkpoints"
        if mode == "step":  # mid-training, once a newer checkpoint is COMPLETE in the store:
            # every such kill then guarantees progress, however slow the machine is
            floor = expected or 0
            hit = t.wait_for(lambda t=t, floor=floor: any(
                int(m) > floor for m in re.findall(r"checkpoint step (\d+)\s+uploaded", t.text())))
            time.sleep(rng.uniform(0.0, 0.8))
        elif mode == "save":
            floor = expected or 0
            hit = t.wait_for(lambda floor=floor, local=local: any(
                int(p.name.split("-")[1]) > floor for p in local.glob("checkpoint-*")))
        else:
            hit = t.wait_for(lambda t=t: "fault hook: checkpoint upload in progress" in t.text())
            time.sleep(rng.uniform(0.0, 1.0))
        if not hit or not t.proc.is_alive():
            assert t.exit_code() == 0, t.text()[-3000:]
            break
        t.kill()
        kills.append((mode, t.proc.exitcode, complete[:3]))
        if expected is not None:
            assert f"resuming {run} from step {expected}" in t.text(), t.text()[-3000:]
        if corrupt_now:  # skipped with a warning, the next older one used
            assert f"skipping checkpoint step {corrupted}" in t.text()
            assert "sha256 mismatch" in t.text()
        if mode == "upload":
            steps = {int(e.key.split("/")[2][5:]) for e in store.list(f"{run}/checkpoints")}
            partial_seen += any(read_complete(store, f"{run}/checkpoints/step-{s}") is None
                                for s in steps)
        m = read_manifest(store, run)
        assert [r["from_step"] for r in m.get("resumes", [])] == resumes_expected

    assert len(kills) >= 10, kills
    assert all(code == -signal.SIGKILL for _, code, _ in kills)
    assert partial_seen >= 1  # an upload was cut between its files and COMPLETE

    # Let it finish (corrupting a checkpoint first if the loop never had two to choose from).
    shutil.rmtree(work, ignore_errors=True)
    complete = complete_checkpoints(store, run)
    expected = complete[0] if complete else None
    if corrupted is None and len(complete) >= 2:
        corrupted, expected = corrupt_newest(store, run, complete)
    last = Trainer(forkserver, recipe, child_env(s3_server, work), tmp_path / "last.log",
                   args=args)
    assert last.exit_code() == 0, last.text()[-3000:]
    assert corrupted is not None, kills
    if expected is not None:
        assert f"resuming {run} from step {expected}" in last.text()
    m = read_manifest(store, run)
    assert m["status"] == "completed" and m["step"] == MAX_STEPS
    # global step continued: each step trained and logged exactly once, in order
    assert metric_steps(store, run) == list(range(1, MAX_STEPS + 1))
    # keep_last: only the 2 newest checkpoints remain
    assert complete_checkpoints(store, run)[:2] == [MAX_STEPS, MAX_STEPS - 2]
    got = adapter_tensors(store, run, tmp_path / "adapter")
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k] - want[k]).abs().max().item()
        assert diff <= 1e-5 + 1e-4 * want[k].abs().max().item(), (k, diff)


# -- the store goes away ---------------------------------------------------------------------------

def test_store_unreachable_at_start_fails_before_training(forkserver, s3_server, tmp_path,
                                                        dead_endpoint):
    recipe = write_recipe(tmp_path / "recipe.yaml", "s3://some-bucket/skytune")
    t = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "work",
                                              AWS_ENDPOINT_URL=dead_endpoint),
                tmp_path / "dead.log")
    assert t.exit_code() == 2
    assert time.monotonic() - t.t0 < 60
    err = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert err and ("not reach" in err[0] or "Could not connect" in err[0]), t.text()[-2000:]
    assert "gradient check" not in t.text()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("checkpoint-*"))


def test_missing_bucket_says_how_to_create_it(forkserver, s3_server, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", "s3://no-such-bucket-faults/skytune")
    t = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "work"), tmp_path / "nb.log")
    assert t.exit_code() == 2
    assert "aws s3 mb s3://no-such-bucket-faults" in t.text()
    assert "gradient check" not in t.text()


class FlakyProxy:
    """A TCP proxy to the S3 server that can be cut (connections dropped) and restored."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host.split("//")[-1], int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.down = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.down:
                c.close()
                continue
            u = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.down = True
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self.sock.close()


def _outage_env(s3_server, work, proxy):
    # Fail fast so the test is quick: one request attempt, two upload attempts 0.3 s apart.
    return child_env(s3_server, work, AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="1",
                     SKYTUNE_UPLOAD_ATTEMPTS="2", SKYTUNE_UPLOAD_BACKOFF="0.3")


def test_store_outage_mid_run_training_continues_and_exit_is_nonzero(
        forkserver, s3_server, s3_url, tmp_path):
    from skytune.store import open_store, read_complete
    from skytune.sync import complete_checkpoints, read_manifest

    store = open_store(s3_url)
    proxy = FlakyProxy(s3_server.endpoint_url)
    try:
        recipe = write_recipe(tmp_path / "recipe.yaml", s3_url)
        t = Trainer(forkserver, recipe, _outage_env(s3_server, tmp_path / "work", proxy),
                    tmp_path / "outage.log", args=("--set", "output.run_id=outage"))
        assert t.wait_for(lambda: "checkpoint step 2 uploaded" in t.text())
        proxy.cut()
        assert t.wait_for(lambda: "upload failed after 2 attempts" in t.text())
        proxy.restore()
        assert t.exit_code() == 1, t.text()[-3000:]
    finally:
        proxy.close()
    err = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert err and "could not be uploaded" in err[0] and "the final adapter was" in err[0]
    m = read_manifest(store, "outage")
    assert m["step"] == MAX_STEPS and m["checkpoint_upload_failed"]
    assert read_complete(store, "outage/adapter") is not None
    assert complete_checkpoints(store, "outage")[0] == MAX_STEPS  # later uploads succeeded
    assert "retry 1/1" in t.text()


def test_store_gone_until_the_end_exits_nonzero_with_local_path(
        forkserver, s3_server, s3_url, tmp_path):
    proxy = FlakyProxy(s3_server.endpoint_url)
    try:
        recipe = write_recipe(tmp_path / "recipe.yaml", s3_url, max_steps=6)
        t = Trainer(forkserver, recipe, _outage_env(s3_server, tmp_path / "work", proxy),
                    tmp_path / "gone.log", args=("--set", "output.run_id=gone"))
        assert t.wait_for(lambda: "checkpoint step 2 uploaded" in t.text())
        proxy.cut()
        assert t.exit_code() == 1, t.text()[-3000:]
    finally:
        proxy.close()
    err = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert err and "adapter could not be uploaded" in err[0] and "on this machine at" in err[0]


# -- SIGTERM: a spot VM's preemption notice -------------------------------------------------------

def test_sigterm_saves_a_checkpoint_exits_nonzero_and_the_restart_resumes_there(
        forkserver, s3_server, s3_url, tmp_path):
    from skytune.store import open_store
    from skytune.sync import complete_checkpoints, read_manifest

    store = open_store(s3_url)
    steps = 60  # room for SIGTERM to land mid-run on a slow machine (~40 steps/s here)
    recipe = write_recipe(tmp_path / "recipe.yaml", s3_url, save_every=4, max_steps=steps)
    run, grace = "faults-term", 30
    args = ("--set", f"output.run_id={run}")
    t = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "work",
                                              SKYTUNE_TERM_GRACE=str(grace)),
                tmp_path / "term.log", args=args)
    assert t.wait_for(lambda: "checkpoint step 4 uploaded" in t.text())
    assert t.proc.is_alive(), t.text()[-3000:]
    t0 = time.monotonic()
    os.kill(t.proc.pid, signal.SIGTERM)
    assert t.exit_code() == 143, t.text()[-3000:]
    assert time.monotonic() - t0 < grace
    step = int(re.search(r"SIGTERM \(preemption notice\): saving a checkpoint at step (\d+)",
                         t.text())[1])
    assert 4 < step < steps  # past the checkpoint at save_every, before the end
    assert complete_checkpoints(store, run)[0] == step
    m = read_manifest(store, run)
    assert m["status"] == "preempted" and m["preempted_at_step"] == step
    assert m["last_checkpoint"] == f"checkpoints/step-{step}"
    err = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert err and f"stopped at step {step} on SIGTERM" in err[0], t.text()[-2000:]

    # The recovered job: a fresh machine, the same run id.
    last = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "work2"),
                   tmp_path / "term-restart.log", args=args)
    assert last.exit_code() == 0, last.text()[-3000:]
    assert f"resuming {run} from step {step}" in last.text()
    m = read_manifest(store, run)
    assert m["status"] == "completed" and m["step"] == steps
    assert metric_steps(store, run) == list(range(1, steps + 1))  # each step once, in order


def test_sigterm_waits_for_the_upload_no_longer_than_the_grace_time(
        forkserver, s3_server, s3_url, tmp_path):
    from skytune.store import open_store, read_complete
    from skytune.sync import read_manifest

    store = open_store(s3_url)
    recipe = write_recipe(tmp_path / "recipe.yaml", s3_url, save_every=4)
    run = "faults-term-slow"
    t = Trainer(forkserver, recipe, child_env(s3_server, tmp_path / "work",
                                              SKYTUNE_TERM_GRACE="2",
                                              SKYTUNE_FAULT_DELAY_UPLOAD="120"),
                tmp_path / "term-slow.log", args=("--set", f"output.run_id={run}"))
    assert t.wait_for(lambda: "fault hook: checkpoint upload in progress" in t.text())
    t0 = time.monotonic()
    os.kill(t.proc.pid, signal.SIGTERM)
    assert t.exit_code() == 143, t.text()[-3000:]
    assert time.monotonic() - t0 < 20
    step = read_manifest(store, run)["preempted_at_step"]
    assert read_complete(store, f"{run}/checkpoints/step-{step}") is None
    err = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert err and "could not be uploaded within SKYTUNE_TERM_GRACE=2s" in err[0]
