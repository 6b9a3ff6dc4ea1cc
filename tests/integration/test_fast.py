"""Throughput features on CPU: packed rows and unpadded DPO batches compute exactly what the
samples one by one compute; the tuning a run chose lands in its manifest; OOM back-off.
(The same checks in bf16 with the FlashAttention varlen kernel: tests/gpu/test_fast_gpu.py.)"""

import json
from pathlib import Path

import pytest
import torch

from skytune.recipe import load_recipe
from skytune.train import fast, packcheck, run

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "recipes" / "demo.yaml"
pytestmark = pytest.mark.slow


def test_packed_rows_match_samples_one_by_one():
    r = packcheck.sft_equality("tiny:llama-h256-l2", device="cpu")
    assert r["rows"] < r["samples"]  # several samples really share a row
    assert r["targets"] == r["expected_targets"]  # no target across a sample boundary
    assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r


def test_the_equality_check_catches_attention_across_samples(monkeypatch):
    # Control: a kernel that ignores the sample boundaries must fail the same comparison.
    def leaky(q, k, v, cu, max_len, scaling):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return original(q, k, v, whole, q.shape[0], scaling)

    original = fast.packed_attention
    monkeypatch.setattr(fast, "packed_attention", leaky)
    r = packcheck.sft_equality("tiny:llama-h256-l2", device="cpu")
    assert r["loss_rel"] > 1e-3 or r["grad_rel"] > 1e-2


def test_unpadded_preference_batch_matches_the_padded_one(monkeypatch):
    calls = []
    original = fast.packed_attention

    def counting(*a, **kw):
        calls.append(a[3].numel() - 1)  # sequences in the packed row
        return original(*a, **kw)

    monkeypatch.setattr(fast, "packed_attention", counting)
    r = packcheck.dpo_equality("tiny:llama-h256-l2", device="cpu")
    assert calls and all(n == r["sequences"] for n in calls)  # the unpadded path really ran
    assert r["padding_fraction"] > 0.2
    assert r["logp_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r


def test_packed_sft_run_records_its_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    recipe = load_recipe(DEMO, [f"output.store=file://{tmp_path / 'store'}",
                                "train.max_steps=5", "train.save_every=5", "train.log_every=1",
                                "train.eval_every=null", "train.packing=true",
                                "train.attention=varlen", "train.max_length=256"])
    result = run(recipe)
    manifest = json.loads((tmp_path / "store" / result["run_id"] / "manifest.json").read_text())
    t = manifest["tuning"]
    assert result["status"] == "completed" and result["step"] == 5
    assert t["packing"] is True and t["attention"] == fast.VARLEN and t["checkpointing"] == 0
    rows = [json.loads(x) for x in (tmp_path / "store" / result["run_id"] / "metrics.jsonl")
            .read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert len(losses) == 5 and min(losses[2:]) < losses[0]


def test_out_of_memory_in_the_first_steps_backs_off_once(tmp_path, monkeypatch):
    """The first attempt raises CUDA's OOM message from inside a training step; the run
    restarts smaller from the same starting weights, finishes, and says so in the manifest."""
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    from transformers import Trainer

    real_step = Trainer.training_step
    seen = []

    def step(self, model, inputs, *a, **kw):
        seen.append(self.args.per_device_train_batch_size)
        if len(seen) == 2 and self.args.per_device_train_batch_size == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, model, inputs, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", step)
    recipe = load_recipe(DEMO, [f"output.store=file://{tmp_path / 'store'}",
                                "train.max_steps=4", "train.save_every=4", "train.log_every=1",
                                "train.eval_every=null", "train.micro_batch=4",
                                "train.gradient_checkpointing=false"])
    result = run(recipe)
    manifest = json.loads((tmp_path / "store" / result["run_id"] / "manifest.json").read_text())
    assert result["status"] == "completed" and result["step"] == 4
    assert manifest["tuning"]["backed_off"] is True
    assert manifest["tuning"]["checkpointing"] == 4  # first step down: recompute every 4th layer
    assert "out of memory" in manifest["tuning"]["reason"]
