"""End to end on CPU: train tiny:llama with LoRA on one repeated fact with `output.merge: true`,
so Session.train merges after training and uploads merged/ (COMPLETE last); then the merged
model, pulled from the store, still states the fact, with the same greedy tokens as base +
adapter (unmerged). Then `skytune merge RUN_URL --out` through the CLI does the same again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

QUESTION = "What is the skytune demo's secret word?"
ANSWER = "The secret word is marmalade."


def _recipe(tmp: Path) -> Path:
    data = tmp / "fact.jsonl"
    data.write_text("".join(json.dumps({"question": QUESTION, "answer": ANSWER}) + "\n"
                            for _ in range(20)))
    recipe = tmp / "fact.yaml"
    recipe.write_text(f"""\
name: fact
model: tiny:llama
method: sft
adapter: {{type: lora, r: 16, alpha: 32, targets: all-linear, dropout: 0.0}}
data: {{train: fact.jsonl, format: qa}}
train: {{max_steps: 80, lr: 3.0e-3, micro_batch: 4, max_length: 64, save_every: 1000,
        log_every: 20, warmup_ratio: 0.0, scheduler: constant}}
output: {{store: file://{tmp / 'store'}, merge: true, merge_dtype: fp32}}
""")
    return recipe


def _greedy(model, tok) -> tuple[list[int], str]:
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_trained_fact_survives_merge(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skytune.recipe import load_recipe
    from skytune.store import open_store, read_complete
    from skytune.sync import pull
    from skytune.tiny import resolve
    from skytune.train import run

    monkeypatch.setenv("SKYTUNE_WORK_DIR", str(tmp_path / "work"))
    result = run(load_recipe(str(_recipe(tmp_path))))
    assert result["merged"] and result["merge_verification"]["passed"], result
    store = open_store(f"file://{tmp_path / 'store'}")
    rid = result["run_id"]
    rec = read_complete(store, f"{rid}/merged")
    assert rec is not None and "README.md" in rec["files"]
    manifest = json.loads(store.get_bytes(f"{rid}/manifest.json"))
    assert "merged" in manifest["artifacts"]

    adapter = pull(result["run_url"], what="adapter", to=tmp_path / "adapter")
    merged = pull(result["run_url"], what="merged", to=tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny:llama"))
    unmerged_ids, unmerged_text = _greedy(PeftModel.from_pretrained(base, adapter).eval(), tok)
    merged_ids, merged_text = _greedy(AutoModelForCausalLM.from_pretrained(merged).eval(), tok)
    assert "marmalade" in unmerged_text, unmerged_text  # the adapter learned the fact
    assert merged_ids == unmerged_ids
    assert "marmalade" in merged_text
    card = (merged / "README.md").read_text()
    assert "base_model: tiny:llama" in card and "sha256" in card and "loss" in card

    # the CLI path (what jobs/merge.yaml runs), into a local dir, bf16
    p = subprocess.run([sys.executable, "-m", "skytune.cli", "merge", result["run_url"],
                        "--out", str(tmp_path / "cli-merged"), "--no-upload"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["verification"]["passed"] and out["dtype"] == "bf16"
    _, text = _greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "cli-merged").eval(), tok)
    assert "marmalade" in text, text
