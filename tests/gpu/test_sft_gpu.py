"""The demo recipe in bf16 on a GPU with a small random model (4 layers, hidden 512).

    python -m pytest tests/gpu/test_sft_gpu.py -s      # on the GPU machine
"""

import json
import time
from pathlib import Path

import torch

from skytune.recipe import load_recipe
from skytune.train import run

REPO = Path(__file__).resolve().parents[2]


def test_demo_recipe_trains_in_bf16_and_loss_falls(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    recipe = load_recipe(REPO / "jobs/recipes/demo.yaml", [
        "model=tiny:llama-h512-l4", f"output.store=file://{tmp_path / 'store'}",
        "train.max_steps=120", "train.log_every=5", "train.eval_every=null", "train.lr=5e-4",
    ])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    result = run(recipe)
    secs = time.monotonic() - t0
    rows = [json.loads(x) for x in
            (tmp_path / "store" / result["run_id"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    adapter = json.loads((tmp_path / "store" / result["run_id"] / "adapter/skytune.json").read_text())
    report = {"device": torch.cuda.get_device_name(), "steps": result["step"],
              "first_loss": losses[0], "last_loss": losses[-1], "seconds": round(secs, 1),
              "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)}
    print("GPU_SFT_RESULT", json.dumps(report))
    assert result["step"] == 120
    assert adapter["recipe"]["train"]["precision"] == "auto"
    assert torch.cuda.is_bf16_supported()
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
