"""Every method end to end on tiny random models (CPU): DPO from an SFT stage, GRPO with a
user reward, vision SFT, a full fine-tune, resume of an interrupted stage, the QLoRA wiring
as far as bitsandbytes runs on CPU, and a dry run of every seed recipe.

Each training run is 2-4 optimizer steps (preset fast_test); the module takes ~1-2 minutes
on 2 CPUs.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest

from skytune.errors import SkytuneError, TrainingFailed
from skytune.recipe import load_recipe
from skytune.train import run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "jobs" / "recipes" / "data"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def work_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))


def recipe_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text).replace("DATA", str(DATA)))
    return p


def store(tmp_path: Path) -> str:
    return f"output.store=file://{tmp_path}/runs"


def metrics(run_url: str) -> list[dict]:
    path = Path(run_url.removeprefix("file://")) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_url: str) -> dict[int, float]:
    return {m["step"]: float(m["loss"]) for m in metrics(run_url) if "loss" in m}


def artifact(run_url: str, name: str) -> Path:
    d = Path(run_url.removeprefix("file://")) / name
    assert (d / "COMPLETE").is_file(), f"{d} has no COMPLETE marker"
    return d


PIPELINE = """
name: halluc
model: tiny:llama
preset: fast_test
adapter: {type: lora, r: 8}
data: {train: DATA/demo_qa.jsonl, max_rows: 16}
train: {max_steps: 4, save_every: 2, micro_batch: 2}
stages:
  - {name: sft, method: sft, train: {lr: 1.0e-3}}
  - name: dpo
    method: dpo
    data: {train: DATA/dpo_pairs.jsonl}
    dpo: {beta: 0.1}
    train: {lr: 1.0e-4}
"""


def test_sft_then_dpo_pipeline_and_resume(tmp_path):
    """DPO starts from the SFT adapter (reference = SFT policy: first loss is ln 2), each stage
    is its own run, a rerun skips finished stages and resumes an interrupted one."""
    path = recipe_file(tmp_path, PIPELINE)
    result = run(load_recipe(path, [store(tmp_path)]))
    sft, dpo = result["stages"]
    assert [s["status"] for s in result["stages"]] == ["completed", "completed"]
    assert (sft["step"], dpo["step"]) == (4, 4)
    artifact(sft["run_url"], "adapter")
    dpo_adapter = artifact(dpo["run_url"], "adapter")
    meta = json.loads((dpo_adapter / "skytune.json").read_text())
    assert meta["base_model"] == "tiny:llama" and meta["method"] == "dpo"
    assert meta["recipe"]["init_from"] == sft["run_url"]
    # the DPO adapter continues the SFT one (same LoRA shape), and is a full delta over the base
    assert json.loads((dpo_adapter / "adapter_config.json").read_text())["r"] == 8
    dpo_loss = losses(dpo["run_url"])
    assert all(math.isfinite(v) for v in dpo_loss.values())
    # policy == reference at step 1 only if the reference is base + the SFT adapter
    assert dpo_loss[1] == pytest.approx(math.log(2), abs=1e-3)

    # interrupt the DPO stage after its step-2 checkpoint: drop step 4 and the adapter
    dpo_dir = Path(dpo["run_url"].removeprefix("file://"))
    shutil.rmtree(dpo_dir / "adapter")
    shutil.rmtree(dpo_dir / "checkpoints" / "step-4")
    manifest = json.loads((dpo_dir / "manifest.json").read_text())
    manifest["status"] = "running"
    (dpo_dir / "manifest.json").write_text(json.dumps(manifest))
    before = losses(dpo["run_url"])
    first_end = max(m["time"] for m in metrics(dpo["run_url"]))

    again = run(load_recipe(path, [store(tmp_path)]))
    sft2, dpo2 = again["stages"]
    assert sft2.get("skipped") is True and sft2["run_id"] == sft["run_id"]
    assert dpo2["run_id"] == dpo["run_id"]
    assert dpo2["resumed_from_step"] == 2 and dpo2["step"] == 4
    artifact(dpo2["run_url"], "adapter")
    rows = [m for m in metrics(dpo2["run_url"]) if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # the lost steps' rows were rewound
    resumed = [m for m in rows if m["time"] > first_end]
    assert [m["step"] for m in resumed] == [3, 4]
    for m in resumed:  # same data order, RNG and weights as the first time
        assert float(m["loss"]) == pytest.approx(before[m["step"]], rel=1e-3, abs=1e-4)


REWARD_MODULE = '''
def letter_e(prompts, completions, answer, **kwargs):
    """Varies across random completions, so GRPO has a signal (math_exact is all 0 here)."""
    assert len(answer) == len(completions)
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("e") / 10 for t in text]
'''


def test_grpo_with_builtin_and_user_rewards(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    path = recipe_file(tmp_path, """
        name: math
        model: tiny:llama
        method: grpo
        preset: fast_test
        rewards: [math_exact, "my_rewards:letter_e"]
        data: {train: DATA/math_prompts.jsonl, max_rows: 8}
        grpo: {num_generations: 4, max_completion_length: 16}
        train: {max_steps: 2, save_every: 2, micro_batch: 4, lr: 1.0e-4}
    """)
    result = run(load_recipe(path, [store(tmp_path)]))
    assert result["status"] == "completed" and result["step"] == 2
    artifact(result["run_url"], "adapter")
    rows = [m for m in metrics(result["run_url"]) if "loss" in m]
    assert all(math.isfinite(float(m["loss"])) for m in rows)
    assert "rewards/my_rewards.letter_e/mean" in rows[0] and "rewards/math_exact/mean" in rows[0]


def test_grpo_reward_that_fails_is_named(tmp_path):
    (tmp_path / "bad_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                             "    return [0.0]\n")
    path = recipe_file(tmp_path, """
        name: bad
        model: tiny:llama
        method: grpo
        preset: fast_test
        rewards: ["bad_rewards:short"]
        data: {train: DATA/math_prompts.jsonl, max_rows: 4}
        train: {max_steps: 1}
    """)
    with pytest.raises(TrainingFailed, match="reward bad_rewards:short returned 1 values"):
        run(load_recipe(path, [store(tmp_path)]))


def test_vision_sft_on_tiny_vlm(tmp_path):
    path = recipe_file(tmp_path, """
        name: vqa
        model: tiny:vlm
        preset: fast_test
        data: {train: DATA/vision/vqa.jsonl, max_rows: 8}
        train: {max_steps: 2, save_every: 2, lr: 1.0e-3}
    """)
    result = run(load_recipe(path, [store(tmp_path)]))
    adapter = artifact(result["run_url"], "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "processor_config.json").is_file() or \
        (adapter / "preprocessor_config.json").is_file()
    assert all(math.isfinite(v) for v in losses(result["run_url"]).values())


def test_full_finetune_saves_a_merged_model(tmp_path):
    path = recipe_file(tmp_path, """
        name: full
        model: tiny:llama
        preset: fast_test
        adapter: {type: full}
        data: {train: DATA/demo_qa.jsonl, max_rows: 8}
        train: {max_steps: 2, save_every: 2}
    """)
    recipe = load_recipe(path, [store(tmp_path)])
    assert recipe.train.lr == 1e-5  # full fine-tune default
    result = run(recipe)
    merged = artifact(result["run_url"], "merged")
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()


def test_qlora_on_cpu_fails_with_a_clear_error(tmp_path):
    path = recipe_file(tmp_path, """
        name: q
        model: tiny:llama
        preset: fast_test
        adapter: {type: qlora}
        data: {train: DATA/demo_qa.jsonl, max_rows: 4}
    """)
    with pytest.raises(SkytuneError, match="adapter.type qlora needs a CUDA GPU"):
        run(load_recipe(path, [store(tmp_path)]))


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_lora_checkpointing_keeps_the_graph(bits):
    """The seed-000 combination (k-bit base + LoRA + gradient checkpointing), on CPU as far as
    bitsandbytes allows: with skytune's preparation gradients reach the adapter; with the
    reentrant checkpointing the seed used they do not, and the gradient guard says so."""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from skytune.tiny import resolve
    from skytune.train.common import check_gradients, explain, prepare_quantized

    quant = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))

    def grads_after_one_step(prepare: bool) -> None:
        model = AutoModelForCausalLM.from_pretrained(resolve("tiny:llama"),
                                                     quantization_config=quant,
                                                     device_map={"": "cpu"})
        if prepare:
            model = prepare_quantized(model, checkpointing=True)
        else:  # the seed's setup: reentrant checkpointing, inputs that do not require grad
            model.gradient_checkpointing_enable({"use_reentrant": True})
            if getattr(model, "_require_grads_hook", None) is not None:
                model.disable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        model.train()
        x = torch.randint(3, 500, (2, 12))
        try:
            model(input_ids=x, labels=x).loss.backward()
        except RuntimeError as e:  # what Session.train does with it
            raise explain(e) from None
        check_gradients(model)

    grads_after_one_step(prepare=True)
    with pytest.raises(TrainingFailed, match="no gradient (reached them|path)"):
        grads_after_one_step(prepare=False)


def test_quantization_config_wiring():
    import torch

    from skytune.recipe import recipe_from_dict
    from skytune.train.common import Device, quantization_config

    gpu = Device("cuda", "H100", True, 80 << 30, 1)
    base = {"name": "q", "model": "tiny:llama", "data": {"train": "x.jsonl"}}
    q4 = quantization_config(recipe_from_dict({**base, "adapter": {"type": "qlora"}}), gpu)
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = quantization_config(recipe_from_dict({**base, "adapter": {"type": "qlora", "bits": 8}}),
                             gpu)
    assert q8.load_in_8bit
    assert quantization_config(recipe_from_dict(base), gpu) is None


SEED_RECIPES = [
    ("llama31-8b-lora.yaml", "tiny:llama", ["sft"]),
    ("qwen25-7b-r128-24gb.yaml", "tiny:qwen", ["sft"]),
    ("gemma3-12b-vision-cot.yaml", "tiny:vlm", ["sft"]),
    ("math-qa-sft-grpo.yaml", "tiny:llama", ["sft", "grpo"]),
    ("hallucination-sft-dpo.yaml", "tiny:llama", ["sft", "dpo"]),
]


@pytest.mark.parametrize("name, model, methods", SEED_RECIPES)
def test_seed_recipe_dry_runs(tmp_path, name, model, methods):
    from typer.testing import CliRunner

    from skytune.cli import app

    res = CliRunner().invoke(app, ["train", str(REPO / "jobs" / "recipes" / name), "--dry-run",
                                   "--set", f"model={model}", "--set", store(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    described = out.get("stages", [out])
    assert [d["method"] for d in described] == methods
    for d in described:
        assert d["steps"] > 0 and d["trainable_parameters"] > 0 and d["train_rows"] > 0
        assert d["train_tokens_per_epoch"] > 0 and "memory_estimate_gb" in d
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
