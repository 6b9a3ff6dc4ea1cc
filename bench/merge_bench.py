"""Merge benchmark: a random ~1.14B Llama (hidden 2048, 16 layers, MLP 8192, vocab 32000) in
bf16 safetensors shards + a random LoRA (r=16, all-linear, nonzero B), merged with
verification. Prints one JSON line: seconds, peak RSS, peak CUDA memory, verification.

    python bench/merge_bench.py --dir /tmp/mb build        # base + adapter (once)
    python bench/merge_bench.py --dir /tmp/mb merge        # fresh process: clean RSS peak
    python bench/merge_bench.py --dir /tmp/mb all          # both (merge in a subprocess)

Sizes are flags (--hidden/--layers/--inter/--vocab) so the same script runs a tiny CPU
version (--hidden 256 --layers 2 --inter 512 --vocab 2048) in seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(d: Path, hidden: int, layers: int, inter: int, vocab: int, seed: int = 0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from skytune.tiny import resolve

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                      num_key_value_heads=max(2, hidden // 256), tie_word_embeddings=False,
                      eos_token_id=2, pad_token_id=0, bos_token_id=None,
                      max_position_embeddings=2048, initializer_range=0.02)
    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("tiny:llama"))  # ids < 2048 <= vocab
    model.save_pretrained(d / "base", max_shard_size="1GB")
    tok.save_pretrained(d / "base")
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # trained adapters have nonzero B; zero B would test nothing
    peft.save_pretrained(d / "adapter")
    tok.save_pretrained(d / "adapter")
    (d / "adapter" / "skytune.json").write_text(json.dumps({
        "kind": "adapter", "run_id": "bench", "step": 0, "method": "sft",
        "base_model": str(d / "base"), "adapter_type": "lora",
        "recipe": {"name": "merge-bench", "adapter": {"type": "lora", "r": 16, "alpha": 32}}}))
    return {"params": n, "base_bytes": sum(f.stat().st_size for f in (d / "base").glob(
        "*.safetensors"))}


def run_merge(d: Path, dtype: str, verify: bool) -> dict:
    import torch

    from skytune.merge import merge

    t0 = time.monotonic()
    res = merge(str(d / "adapter"), out=d / f"merged-{dtype}", base=str(d / "base"), dtype=dtype,
                verify=verify, upload=False)
    out = {"seconds": round(time.monotonic() - t0, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "verification": res["verification"], "shards": res["shards"],
           "bytes": res["bytes"], "tensors_merged": res["tensors_merged"]}
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "merge", "all"])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    result = {}
    if a.what in ("build", "all"):
        t0 = time.monotonic()
        result["build"] = build(a.dir, a.hidden, a.layers, a.inter, a.vocab)
        result["build"]["seconds"] = round(time.monotonic() - t0, 1)
    if a.what == "merge":
        result["merge"] = run_merge(a.dir, a.dtype, not a.no_verify)
    if a.what == "all":  # a fresh process, so peak RSS is the merge's alone
        cmd = [sys.executable, __file__, "merge", "--dir", str(a.dir), "--dtype", a.dtype]
        cmd += ["--no-verify"] if a.no_verify else []
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(p.returncode)
        result.update(json.loads(p.stdout.strip().splitlines()[-1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
