"""The demo path as `make demo` runs it: launch --local, pull, load with PEFT, generate."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    env = {**os.environ, "SKYTUNE_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}
    store = f"file://{tmp_path / 'store'}"
    cli = [sys.executable, "-m", "skytune.cli"]
    launched = subprocess.run(
        [*cli, "launch", "jobs/recipes/demo.yaml", "--local", "--set", f"output.store={store}",
         "--set", "train.epochs=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    runs = list((tmp_path / "store").iterdir())
    assert len(runs) == 1
    out = tmp_path / "models" / "adapter"
    pulled = subprocess.run([*cli, "pull", f"{store}/{runs[0].name}", "--to", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    assert f"adapter in {out}" in pulled.stdout and "AutoPeftModelForCausalLM" in pulled.stdout

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    new = gen[0, prompt["input_ids"].shape[1]:]
    assert new.numel() > 0
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)
    # the adapter changed the model: LoRA B matrices moved away from their zero init
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
