"""One training run's life around `trainer.train()`, the same for every method: the store,
resume from the newest complete checkpoint, checkpoint upload, metrics, the final artifact.

    session = Session(recipe, resume="auto")
    if done := session.start():           # the run already finished: nothing to do
        return done
    trainer = SFTTrainer(..., callbacks=session.callbacks())
    return session.train(trainer)         # resumes, trains, saves adapter/ (or merged/)

Only the main process (RANK 0) writes to the store; every process resumes from the same
checkpoint.

SIGTERM during training (a spot VM's preemption notice: SkyPilot and the clouds send it
before the VM goes away) saves a checkpoint at the next step boundary, uploads it within
SKYTUNE_TERM_GRACE seconds (default 90), records status "preempted" and raises Preempted
(exit 143), so that the recovered job resumes from that step rather than the last save_every.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from skytune import __version__
from skytune.errors import Preempted, SkytuneError, TrainingFailed
from skytune.recipe import Recipe
from skytune.store import open_store, read_complete
from skytune.sync import (
    CheckpointUploader,
    RunWriter,
    fetch_latest_checkpoint,
    read_manifest,
    retry,
    run_id,
)
from skytune.train import common

log = logging.getLogger("skytune")


def work_root() -> Path:
    return Path(os.environ.get("SKYTUNE_WORK_DIR", Path.home() / ".cache" / "skytune" / "work"))


def final_artifact(recipe: Recipe) -> str:
    """A full fine-tune's result is a whole model (merged/); otherwise an adapter."""
    return "merged" if recipe.adapter.type == "full" else "adapter"


class Session:
    def __init__(self, recipe: Recipe, resume: str = "auto"):
        self.recipe, self.resume = recipe, resume
        self.run_id = run_id(recipe, fresh=resume == "never")
        self.store = open_store(recipe.store_url(), endpoint_url=recipe.output.endpoint_url,
                                private=recipe.output.private)
        self.work = work_root() / self.run_id
        self.main = common.is_main_process()
        self.writer = RunWriter(self.store, self.run_id, recipe)
        self.uploader: CheckpointUploader | None = None
        self.resume_from: Path | None = None
        self.resumed_step = 0
        self.started = time.monotonic()
        self.term_at: float | None = None  # when SIGTERM came (time.monotonic)
        self.stopped_at: int | None = None  # the step training stopped at because of it

    @property
    def output_dir(self) -> Path:
        return self.work / "checkpoints"

    def start(self) -> dict[str, Any] | None:
        """Open the run in the store; return its result if it already completed."""
        # First, before any training: an unreachable store or a missing bucket fails here in
        # seconds, not after the first checkpoint (or after minutes of client retries).
        self.store.check()
        if self.main:
            done = self._already_complete()
            if done:
                return done
            self.writer.start()
        self._find_resume()
        if self.main:
            if self.resume_from is not None:
                self.writer.note_resume(self.resumed_step)
            # Last: the writes above must be in the store before training (they go straight
            # there); from here on manifest writes queue behind the uploads in its worker.
            self.uploader = CheckpointUploader(self.writer, keep_last=self.recipe.output.keep_last)
        return None

    def _already_complete(self) -> dict[str, Any] | None:
        m = read_manifest(self.store, self.run_id)
        name = final_artifact(self.recipe)
        if self.resume == "never" or not m or m.get("status") != "completed":
            return None
        if read_complete(self.store, f"{self.run_id}/{name}") is None:
            return None
        log.info("run %s already completed at step %s; nothing to do", self.run_id, m.get("step"))
        return self.result(m.get("step"), status="completed", skipped=True)

    def _find_resume(self) -> None:
        if self.resume == "never":
            return
        if self.resume == "auto":
            found = fetch_latest_checkpoint(self.store, self.run_id, self.work / "resume")
            if found:
                self.resume_from, self.resumed_step = found
                log.info("resuming %s from step %d (%s/checkpoints/step-%d)", self.run_id,
                         self.resumed_step, self.writer.url, self.resumed_step)
            return
        p = Path(self.resume)
        if "://" in self.resume:
            from skytune.store import download_artifact
            from skytune.sync import split_run_url

            store, key = split_run_url(self.resume)
            p = self.work / "resume" / Path(key).name
            download_artifact(store, key, p)
        if not (p / "trainer_state.json").is_file():
            raise SkytuneError(f"--resume {self.resume}: not a checkpoint (no trainer_state.json)")
        self.resume_from = p
        self.resumed_step = json.loads((p / "trainer_state.json").read_text())["global_step"]
        log.info("resuming from step %d (%s)", self.resumed_step, p)

    def meta(self, kind: str, step: int) -> dict[str, Any]:
        """What every artifact carries about itself (STYLE rule 10)."""
        return {"kind": kind, "run_id": self.run_id, "step": step, "method": self.recipe.method,
                "base_model": self.recipe.model, "adapter_type": self.recipe.adapter.type,
                "recipe": self.recipe.to_dict(), "skytune_version": __version__}

    def stamp_files(self, kind: str, step: int) -> tuple[dict[str, str], dict[str, Any]]:
        """({file name: text} that make an artifact describe itself, meta for its COMPLETE)."""
        meta = self.meta(kind, step)
        files = {"skytune.json": json.dumps(meta, indent=1), "recipe.yaml": self._recipe_yaml}
        return files, {k: v for k, v in meta.items() if k != "recipe"}

    @functools.cached_property
    def _recipe_yaml(self) -> str:
        return self.recipe.to_yaml()  # ~2 ms of PyYAML: once, not on every checkpoint step

    def stamp(self, local_dir: Path, kind: str, step: int) -> dict[str, Any]:
        files, meta = self.stamp_files(kind, step)
        for name, text in files.items():
            (local_dir / name).write_text(text)
        return meta

    def callbacks(self, zero_grad_ok: bool = False) -> list:
        """zero_grad_ok: GRPO, where a group whose completions all score alike gives exactly 0."""
        return [common.gradient_guard(zero_grad_ok), _StoreCallback(self)]

    def train(self, trainer, tuning=None, rebuild=None) -> dict[str, Any]:
        """Train (resuming if a checkpoint was found), upload the result, finish the run.

        `tuning` (fast.Tuning) is recorded in the manifest. After an out-of-memory before the
        first checkpoint, `rebuild(tuning.backoff(), model)` makes the smaller trainer: the
        trainable weights go back to where they started and training begins again, once."""
        snapshot = _trainable_snapshot(trainer.model) if rebuild and tuning else None
        for attempt in (0, 1):
            if self.main and tuning is not None:
                self.writer.note(tuning=tuning.to_dict())
            try:
                with self._sigterm_stops_training():
                    trainer.train(resume_from_checkpoint=str(self.resume_from)
                                  if self.resume_from else None)
                break
            except RuntimeError as e:
                down = tuning.backoff() if snapshot is not None else None
                if (attempt > 0 or down is None or not common.is_oom(e)
                        or trainer.state.global_step >= self.recipe.train.save_every):
                    self._fail(e)
                    raise common.explain(e) from None
                log.warning("out of memory at step %d (%s); retrying with %s",
                            trainer.state.global_step, tuning.to_dict(), down.to_dict())
                trainer, tuning = _restart(trainer, snapshot, rebuild, down), down
            except BaseException as e:
                self._fail(e)
                raise
        step = trainer.state.global_step
        if self.stopped_at is not None:
            self._preempted(step)
        if not self.main:
            return self.result(step, status="completed")
        final = self.work / "final"
        shutil.rmtree(final, ignore_errors=True)
        trainer.save_model(str(final))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(final))
        name = final_artifact(self.recipe)
        meta = self.stamp(final, name, step)
        failed = self.uploader.close() if self.uploader else []  # pending checkpoint uploads
        up = self.uploader
        try:
            retry(lambda: self.writer.upload_artifact(final, name, meta), f"upload of {name}",
                  up.attempts if up else 1, up.backoff if up else 0)
        except Exception as e:  # noqa: BLE001 - exit 1 with where the result is
            raise TrainingFailed(f"training finished but {name} could not be uploaded to "
                                 f"{self.store.url} ({e}); it is on this machine at {final}"
                                 ) from None
        fields = {"checkpoint_upload_failed": failed} if failed else {}
        self.writer.finish("completed", step=step,
                           train_seconds=round(time.monotonic() - self.started, 1), **fields)
        if failed:
            # The model is safe in the store, but a preemption during the run would have lost
            # more than save_every steps: say so with a non-zero exit.
            raise TrainingFailed(f"checkpoint(s) at step {', '.join(map(str, failed))} could not "
                                 f"be uploaded to {self.store.url} (the final {name} was)")
        extra: dict[str, Any] = {}
        if self.recipe.output.push or (self.recipe.output.merge and name == "adapter"):
            from skytune.merge import after_training  # merged/ (COMPLETE last), Hub push

            extra = after_training(self.recipe, self.writer, final)
        return self.result(step, status="completed", **extra)

    @contextmanager
    def _sigterm_stops_training(self) -> Iterator[None]:
        """While training, SIGTERM sets a flag that _StoreCallback turns into "save and stop"
        at the next step boundary. Single-process runs only: the ranks of a distributed run
        would have to agree on the step (a collective every step); they keep the default."""
        if threading.current_thread() is not threading.main_thread() or \
                common.world_size() > 1:
            yield
            return

        def on_term(signum, frame) -> None:
            if self.term_at is None:  # a second SIGTERM changes nothing: the grace runs
                self.term_at = time.monotonic()

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            # From here on a SIGTERM kills as usual; one during the final upload or merge
            # would otherwise be swallowed.
            signal.signal(signal.SIGTERM, old)

    def _preempted(self, step: int) -> None:
        """After SIGTERM: wait for the uploads (this step's checkpoint last) within the
        grace time, record "preempted", raise Preempted."""
        grace = float(os.environ.get("SKYTUNE_TERM_GRACE", "90"))
        left = max(0.0, (self.term_at or time.monotonic()) + grace - time.monotonic())
        missing = self.uploader.close(timeout=left) if self.uploader else []
        saved = step not in missing
        try:
            if self.main:
                self.writer.finish("preempted", preempted_at_step=step,
                                   **({"checkpoint_upload_failed": missing} if missing else {}))
        except Exception as e:  # noqa: BLE001 - the checkpoint matters, not this record
            log.warning("could not record the preemption in the store: %s", e)
        where = (f"checkpoint step {step} is in {self.writer.url}; a restart resumes from it"
                 if saved else f"checkpoint step {step} could not be uploaded within "
                 f"SKYTUNE_TERM_GRACE={grace:g}s; a restart resumes from the newest complete one")
        raise Preempted(f"stopped at step {step} on SIGTERM (preemption notice); {where}")

    def _fail(self, e: BaseException) -> None:
        if not self.main:
            return
        try:
            if self.uploader is not None:
                self.uploader.close()
            self.writer.finish("failed", error=str(e).splitlines()[0][:300] if str(e) else
                               type(e).__name__)
        except Exception as inner:  # noqa: BLE001 - never hide the training error
            log.warning("could not record the failure in the store: %s", inner)

    def result(self, step: Any, **fields: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_url": self.writer.url, "step": step,
                "resumed_from_step": self.resumed_step or None, **fields}


def _trainable_snapshot(model) -> dict[str, Any] | None:
    """A CPU copy of the trainable weights (an adapter: MBs), to restart from after an OOM;
    None for a full fine-tune, whose copy would be the whole model."""
    if getattr(model, "peft_config", None) is None:
        return None
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def _restart(trainer, snapshot: dict[str, Any], rebuild, tuning):
    """Free the failed trainer's memory, restore the weights, build the smaller trainer."""
    import gc

    import torch

    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n].to(p.device))
            p.grad = None
    trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rebuild(tuning, trainer.model)


class _StoreCallback(TrainerCallback):
    """Metrics to metrics.jsonl; each saved checkpoint to the store (COMPLETE last)."""

    def __init__(self, session: Session):
        self.s = session

    def on_log(self, args, state, control, logs=None, **kw):
        if self.s.main and logs:
            self.s.writer.log_metrics({"step": state.global_step, "epoch": state.epoch,
                                       "time": round(time.time(), 1), **logs})

    def on_step_end(self, args, state, control, **kw):
        if self.s.term_at is not None and self.s.stopped_at is None:
            # The trainer saves (on_save below uploads it) and leaves its loop after this step.
            log.warning("SIGTERM (preemption notice): saving a checkpoint at step %d and "
                        "stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.s.stopped_at = state.global_step

    def on_save(self, args, state, control, **kw):
        if not self.s.main or self.s.uploader is None:
            return
        step = state.global_step
        files, meta = self.s.stamp_files("checkpoint", step)
        # Returns at once: writing `files` into it, hashing and the upload (metrics with it)
        # happen in the upload worker process; the trainer never touches checkpoint-N again.
        self.s.uploader.submit(Path(args.output_dir) / f"checkpoint-{step}", step, meta, files)
