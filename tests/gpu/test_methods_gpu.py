"""Every method on a GPU with a ~80M-parameter random Llama (tiny:llama-h768-l12) in bf16,
plus QLoRA 4-bit and 8-bit with gradient checkpointing for SFT, DPO and GRPO: the seed-000
combination ("element 0 of tensors does not require grad") must train.

    pip install bitsandbytes==0.50.2          # the image has it; a bare venv may not
    python -m pytest -q -s tests/gpu/test_methods_gpu.py     # -s shows the timings

Skipped without CUDA. Each test asserts finite losses, the artifact in the store and,
where a few dozen steps can show it, that the loss goes down; each prints its time.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "jobs" / "recipes" / "data"
MODEL = "tiny:llama-h768-l12"


@pytest.fixture(autouse=True)
def work_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))


def train(tmp_path: Path, text: str, label: str, *overrides: str) -> dict:
    from skytune.recipe import load_recipe
    from skytune.train import run

    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text).replace("DATA", str(DATA)).replace("MODEL", MODEL))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    result = run(load_recipe(p, [f"output.store=file://{tmp_path}/runs", *overrides]))
    peak = torch.cuda.max_memory_allocated() / 2**30
    last = result["stages"][-1] if "stages" in result else result
    print(f"\n[gpu] {label}: {time.monotonic() - t0:.1f}s, {last['step']} steps, "
          f"peak {peak:.2f} GiB, {torch.cuda.get_device_name()}")
    return result


def losses(run_url: str) -> list[float]:
    path = Path(run_url.removeprefix("file://")) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = [float(r["loss"]) for r in rows if "loss" in r]
    assert out and all(math.isfinite(v) for v in out), out
    return out


def assert_decreasing(values: list[float]) -> None:
    k = max(1, len(values) // 4)
    assert sum(values[-k:]) / k < sum(values[:k]) / k, values


def artifact(run_url: str, name: str = "adapter") -> Path:
    d = Path(run_url.removeprefix("file://")) / name
    assert (d / "COMPLETE").is_file(), d
    return d


SFT = """
name: gpu-sft
model: MODEL
data: {train: DATA/demo_qa.jsonl}
train: {max_steps: 30, save_every: 15, log_every: 1, micro_batch: 8, max_length: 256,
        lr: 1.0e-3, warmup_ratio: 0.0}
"""

PIPELINE = """
name: gpu-pipe
model: MODEL
data: {train: DATA/demo_qa.jsonl}
train: {save_every: 10, log_every: 1, micro_batch: 8, max_length: 256, warmup_ratio: 0.0}
stages:
  - {name: sft, method: sft, train: {max_steps: 20, lr: 1.0e-3}}
  - name: dpo
    method: dpo
    data: {train: DATA/dpo_pairs.jsonl}
    train: {max_steps: 20, lr: 2.0e-4}
"""

GRPO = """
name: gpu-grpo
model: MODEL
method: grpo
rewards: [math_exact, format, length_penalty]
data: {train: DATA/math_prompts.jsonl}
grpo: {num_generations: 8, max_completion_length: 64}
train: {max_steps: 6, save_every: 3, log_every: 1, micro_batch: 16, max_length: 256,
        lr: 1.0e-5}
"""


def test_sft_lora_bf16(tmp_path):
    r = train(tmp_path, SFT, "sft lora bf16")
    assert_decreasing(losses(r["run_url"]))
    artifact(r["run_url"])


def test_sft_full_bf16(tmp_path):
    r = train(tmp_path, SFT, "sft full bf16", "adapter.type=full", "train.lr=1e-4")
    assert_decreasing(losses(r["run_url"]))
    artifact(r["run_url"], "merged")


def test_sft_then_dpo_bf16(tmp_path):
    r = train(tmp_path, PIPELINE, "sft -> dpo lora bf16")
    sft, dpo = r["stages"]
    dpo_losses = losses(dpo["run_url"])
    assert dpo_losses[0] == pytest.approx(math.log(2), abs=1e-2)  # reference = SFT policy
    assert_decreasing(dpo_losses)
    artifact(dpo["run_url"])


def test_grpo_lora_bf16(tmp_path):
    r = train(tmp_path, GRPO, "grpo lora bf16")
    losses(r["run_url"])
    artifact(r["run_url"])


def test_vision_sft_bf16(tmp_path):
    r = train(tmp_path, """
        name: gpu-vlm
        model: tiny:vlm
        data: {train: DATA/vision/vqa.jsonl}
        train: {max_steps: 20, save_every: 10, log_every: 1, micro_batch: 4, lr: 1.0e-3,
                warmup_ratio: 0.0}
    """, "vision sft lora bf16")
    assert_decreasing(losses(r["run_url"]))
    artifact(r["run_url"])


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_sft_with_checkpointing(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    r = train(tmp_path, SFT, f"sft qlora {bits}-bit + checkpointing", "adapter.type=qlora",
              f"adapter.bits={bits}", "train.gradient_checkpointing=true")
    assert_decreasing(losses(r["run_url"]))
    artifact(r["run_url"])


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_sft_then_dpo_with_checkpointing(tmp_path, bits):
    """The seed-000 failure: 8-bit base + LoRA + gradient checkpointing + DPO."""
    pytest.importorskip("bitsandbytes")
    r = train(tmp_path, PIPELINE, f"sft -> dpo qlora {bits}-bit + checkpointing",
              "adapter.type=qlora", f"adapter.bits={bits}", "train.gradient_checkpointing=true")
    dpo = r["stages"][1]
    dpo_losses = losses(dpo["run_url"])
    assert dpo_losses[0] == pytest.approx(math.log(2), abs=1e-2)
    artifact(dpo["run_url"])


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_grpo_with_checkpointing(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    r = train(tmp_path, GRPO, f"grpo qlora {bits}-bit + checkpointing", "adapter.type=qlora",
              f"adapter.bits={bits}", "train.gradient_checkpointing=true")
    losses(r["run_url"])
    artifact(r["run_url"])
