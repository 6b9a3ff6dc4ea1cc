"""Measure real peak memory and step time on this GPU and compare them with skytune.plan.

    python bench/calibrate.py                      # both cases, ~2 minutes on an H100
    python bench/calibrate.py --cases lora8b       # one case
    OUT=/tmp/out python bench/calibrate.py         # JSON goes to $OUT, else bench/results/

Cases (random weights, no download; plain PyTorch + transformers + PEFT, no TRL):
  lora8b   Llama-3.1-8B shape, bf16, LoRA r=16 all-linear, micro_batch 4 x 2048,
           gradient checkpointing, AdamW on the adapter.
  full1b   Llama-3.2-1B shape, bf16 params, full fine-tune, AdamW (moments in bf16),
           micro_batch 4 x 2048, no checkpointing.
Each runs 2 warm-up steps and 5 timed steps (torch.cuda.synchronize around each) under
bf16 autocast, like HF Trainer with bf16=True. It prints measured vs predicted and the MFU
to paste into skytune.plan.MFU. Needs torch with CUDA, transformers and peft.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # skytune need not be installed on the GPU machine

from skytune import plan as P
from skytune.models_catalog import KNOWN

CASES = {
    "lora8b": {"arch": "llama-3.1-8b", "adapter": "lora", "r": 16, "micro_batch": 4,
               "seq": 2048, "ckpt": True},
    "full1b": {"arch": "llama-3.2-1b", "adapter": "full", "r": 0, "micro_batch": 4,
               "seq": 2048, "ckpt": False},
}
WARMUP, TIMED = 2, 5


def gpu_spec(device_name: str) -> P.Gpu:
    """plan's entry for this card, matched on the CUDA device name."""
    name = device_name.upper().replace("NVIDIA ", "")
    for key in ("H200", "H100", "GH200", "B200", "L40S", "A10G", "L4", "RTX 4090", "RTX 3090",
                "RTX 5090", "A6000", "A40"):
        if key in name:
            return P.GPUS[key.replace("RTX ", "RTX")]
    if "A100" in name:
        return P.GPUS["A100-80GB" if "80GB" in name else "A100"]
    raise SystemExit(f"calibrate: no skytune.plan entry for {device_name!r}")


def build(case: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = KNOWN[case["arch"]]
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, head_dim=a.hd, tie_word_embeddings=a.tied,
                      use_cache=False, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)  # build bf16 directly: no fp32 copy of 8B params
    try:
        with torch.device(device):  # initialize on the GPU: seconds, not minutes on the CPU
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)  # LoRA adapters: fp32, as PEFT keeps them
    if case["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["adapter"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=case["r"], lora_alpha=2 * case["r"],
                                                 lora_dropout=0.05, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5), a


def run_case(name: str, case: dict, gpu: P.Gpu) -> dict:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    model, opt, arch = build(case, "cuda")
    torch.cuda.reset_peak_memory_stats()  # count the training step, not building the model
    mb, seq = case["micro_batch"], case["seq"]
    ids = torch.randint(0, arch.vocab, (mb, seq), device="cuda")
    times = []
    try:
        for i in range(WARMUP + TIMED):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as e:
        return {"case": name, "error": f"OOM: {str(e).splitlines()[0]}", **case}
    free, total = torch.cuda.mem_get_info()
    measured = {
        "max_allocated_gib": torch.cuda.max_memory_allocated() / P.GiB,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / P.GiB,
        "context_gib": (total - free - torch.cuda.memory_reserved()) / P.GiB,
        "step_s": statistics.median(times),
    }
    del model, opt
    return {"case": name, **case, "measured": measured, "predicted": predict(case, gpu, arch),
            "steps_s": times}


def predict(case: dict, gpu: P.Gpu, arch) -> dict:
    adapter = SimpleNamespace(type=case["adapter"], r=case["r"] or 16, bits=4,
                              targets="all-linear", dropout=0.05)
    train = SimpleNamespace(precision="bf16", liger=False, attention="sdpa")
    est = P.estimate_memory(arch, adapter, train, case["micro_batch"], case["seq"], case["ckpt"])
    lora = arch.lora_params(case["r"]) if case["adapter"] != "full" else 0
    tps = P.train_tokens_per_second(arch, gpu, case["adapter"], "sft", case["micro_batch"],
                                    case["seq"], case["ckpt"], lora_params=lora)
    allocated = est.total - est.parts["overhead"]
    return {"allocated_gib": allocated / P.GiB,
            "reserved_gib": allocated * (1 + P.FRAGMENTATION) / P.GiB,
            "total_gib": est.total_gib, "parts_gib": est.to_dict()["parts_gib"],
            "step_s": case["micro_batch"] * case["seq"] / tps,
            "flops_per_token": P.flops_per_token(arch, case["adapter"], "sft", case["seq"],
                                                 case["ckpt"], lora)}


def implied_mfu(r: dict, gpu: P.Gpu) -> float:
    """The MFU constant that would have predicted the measured step time."""
    tokens = r["micro_batch"] * r["seq"]
    achieved = tokens * r["predicted"]["flops_per_token"] / r["measured"]["step_s"]
    return achieved / (gpu.tflops * 1e12) / P.batch_efficiency(tokens)


def report(results: list[dict], gpu: P.Gpu) -> str:
    lines = [(f"{'case':<8} {'alloc meas/pred GiB':>20} {'reserved meas/pred':>19} "
              f"{'step s meas/pred':>17} {'implied MFU':>12}")]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<8} {r['error']}")
            continue
        m, p = r["measured"], r["predicted"]
        r["implied_mfu"] = round(implied_mfu(r, gpu), 3)
        lines.append(f"{r['case']:<8} {m['max_allocated_gib']:>9.2f}/{p['allocated_gib']:<9.2f} "
                     f"{m['max_reserved_gib']:>9.2f}/{p['reserved_gib']:<9.2f} "
                     f"{m['step_s']:>8.3f}/{p['step_s']:<8.3f} {r['implied_mfu']:>12}")
    mfu = {("lora" if r["adapter"] == "lora" else "full"): r["implied_mfu"]
           for r in results if "implied_mfu" in r}
    lines.append(f"paste into skytune/plan.py: MFU = {{**MFU, {mfu}}}  (was {P.MFU})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("calibrate: needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    gpu = gpu_spec(device)
    results = [run_case(c, CASES[c], gpu) for c in args.cases.split(",")]
    print(f"device: {device} (plan: {gpu.name}, {gpu.tflops} TFLOPs bf16, {gpu.mem_gib} GiB)")
    print(report(results, gpu))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    path = out_dir / f"calibration-{gpu.name}-{stamp}.json"
    import peft
    import transformers

    path.write_text(json.dumps({
        "device": device, "plan_gpu": gpu.name, "date_utc": stamp, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "plan_constants": {"MFU": P.MFU, "LOGITS_BYTES": P.LOGITS_BYTES,
                           "LORA_SAVED_BYTES": P.LORA_SAVED_BYTES,
                           "FRAGMENTATION": P.FRAGMENTATION},
        "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
