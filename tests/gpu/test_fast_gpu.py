"""Packed rows and unpadded DPO batches on the GPU: the FlashAttention varlen kernel in bf16
computes what the samples one by one compute (SDPA), and `skytune train` picks it by itself.

    python -m pytest tests/gpu/test_fast_gpu.py -s      # on the GPU machine
"""

import json
from pathlib import Path

from skytune.recipe import load_recipe
from skytune.train import fast, packcheck, run

REPO = Path(__file__).resolve().parents[2]
BF16 = 2e-2  # relative: bf16 keeps 8 bits of mantissa; both sides round differently


def test_varlen_kernel_is_there():
    assert fast.varlen_kernel() is not None, "torch.nn.attention.varlen missing on this torch"


def test_packed_rows_match_samples_one_by_one_in_bf16():
    r = packcheck.sft_equality("tiny:llama-h512-l4", device="cuda", n=24, max_length=512)
    print("GPU_PACKED_EQUALITY", json.dumps(r))
    assert r["rows"] < r["samples"] and r["targets"] == r["expected_targets"]
    assert r["loss_rel"] < 5e-3 and r["grad_rel"] < BF16 * 2, r


def test_unpadded_preference_batch_matches_padded_in_bf16():
    r = packcheck.dpo_equality("tiny:llama-h512-l4", device="cuda", n=8)
    print("GPU_UNPAD_EQUALITY", json.dumps(r))
    assert r["logp_rel"] < 5e-3 and r["grad_rel"] < BF16 * 2, r


def test_auto_tuning_packs_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    recipe = load_recipe(REPO / "jobs/recipes/demo.yaml", [
        "model=tiny:llama-h512-l4", f"output.store=file://{tmp_path / 'store'}",
        "train.max_steps=30", "train.log_every=5", "train.eval_every=null", "train.lr=5e-4",
        "train.micro_batch=auto",
    ])
    result = run(recipe)
    run_dir = tmp_path / "store" / result["run_id"]
    tuning = json.loads((run_dir / "manifest.json").read_text())["tuning"]
    losses = [json.loads(x).get("loss") for x in (run_dir / "metrics.jsonl").read_text()
              .splitlines()]
    losses = [x for x in losses if x is not None]
    print("GPU_AUTO_TUNING", json.dumps(tuning), losses[0], losses[-1])
    assert tuning["packing"] and tuning["attention"] == fast.VARLEN
    assert tuning["checkpointing"] == 0 and not tuning["lora_cast"]
    assert losses[-1] < losses[0]
