"""SFT end to end on CPU with a tiny model: artifacts, metrics, resume, gradient guard."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from skytune.errors import TrainingFailed
from skytune.recipe import load_recipe
from skytune.store import COMPLETE
from skytune.train import run
from skytune.train.common import check_gradients

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "recipes" / "demo.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    return tmp_path


def demo(tmp_path, *extra):
    return load_recipe(DEMO, [f"output.store=file://{tmp_path / 'store'}", "train.max_steps=6",
                              "train.save_every=3", "train.log_every=1", "train.eval_every=null",
                              *extra])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_writes_artifacts_and_loss_falls(env):
    result = run(demo(env, "train.max_steps=30", "train.save_every=10"))
    run_dir = env / "store" / result["run_id"]
    assert result["status"] == "completed" and result["step"] == 30
    for step in (10, 20, 30):
        assert (run_dir / f"checkpoints/step-{step}/{COMPLETE}").is_file()
    adapter = run_dir / "adapter"
    assert (adapter / COMPLETE).is_file() and (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "skytune.json").read_text())
    assert meta["kind"] == "adapter" and meta["step"] == 30 and meta["recipe"]["name"] == "demo"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["step"] == 30
    files = manifest["artifacts"]["adapter"]["files"]
    assert files["adapter_model.safetensors"]["size"] == \
        (adapter / "adapter_model.safetensors").stat().st_size
    assert len(files["adapter_model.safetensors"]["sha256"]) == 64
    ls = losses(run_dir)
    assert len(ls) == 30 and sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5


def test_keep_last_prunes_old_checkpoints(env):
    result = run(demo(env, "output.keep_last=1"))
    ckpts = sorted(p.name for p in (env / "store" / result["run_id"] / "checkpoints").iterdir())
    assert ckpts == ["step-6"]


def test_rerun_of_completed_run_does_nothing(env):
    first = run(demo(env))
    again = run(demo(env))
    assert again["skipped"] is True and again["run_id"] == first["run_id"]


def test_resume_after_preemption_matches_uninterrupted_run(env):
    recipe = demo(env)
    full = run(recipe)
    run_dir = env / "store" / full["run_id"]
    reference = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    # A preemption right after step 3 was uploaded: later artifacts never reached the store,
    # and step 6's upload died half way (files but no COMPLETE marker).
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "checkpoints/step-6" / COMPLETE).unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(env / "work")
    resumed = run(demo(env))
    assert resumed["resumed_from_step"] == 3 and resumed["step"] == 6
    from safetensors.torch import load

    a, b = load(reference), load((run_dir / "adapter/adapter_model.safetensors").read_bytes())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_gradient_guard_rejects_frozen_model():
    model = torch.nn.Linear(4, 4)
    model.requires_grad_(False)
    with pytest.raises(TrainingFailed, match="no trainable parameters"):
        check_gradients(model)


def test_gradient_guard_rejects_cut_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with torch.no_grad():  # the "element 0 of tensors does not require grad" situation
        hidden = model[0](torch.randn(2, 4))
    model[1](hidden).sum().backward()
    model[0].weight.grad = None
    model[0].bias.grad = None
    model[1].weight.grad = torch.zeros_like(model[1].weight)
    model[1].bias.grad = torch.zeros_like(model[1].bias)
    with pytest.raises(TrainingFailed, match="gradient norm is 0"):
        check_gradients(model)
    for p in model.parameters():
        p.grad = None
    with pytest.raises(TrainingFailed, match="no gradient reached them"):
        check_gradients(model)


def test_gradient_guard_accepts_a_healthy_step():
    model = torch.nn.Linear(4, 1)
    model(torch.randn(3, 4)).sum().backward()
    assert check_gradients(model) > 0
