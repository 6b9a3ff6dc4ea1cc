"""Useful tokens per second: plain TRL against skytune's `micro_batch: auto`, same model, same data.

    make bench                                    # on a GPU machine: every row, ~8 minutes
    python bench/throughput.py --rows trl-sft,skytune-sft --steps 12
    torchrun --nproc-per-node 2 bench/throughput.py --rows skytune-sft   # DDP scaling

Model: random-init Llama-3.1-8B architecture (`random:meta-llama/Llama-3.1-8B`: weights made
on the GPU, no download), bf16, LoRA r=16 alpha 32 on all linear layers, dropout 0 (PEFT's
default, the same on both sides). Data: chat rows whose tokenized length is lognormal around
a median of ~490 tokens, clipped to 64-2048 (prompt ~30%, answer ~70%); DPO rows have a
~150-token prompt and ~340-token chosen/rejected answers. Seeded: every row sees the same data.

Rows:
  trl-sft          plain TRL SFTTrainer: micro-batch 4, max_length 2048, gradient
                   checkpointing, no packing, SDPA (the issue's 2,500-3,400 tokens/s row)
  trl-sft-flex     TRL hand-tuned: packing into 8192-token rows, flex attention, no
                   checkpointing (the issue's best hand-tuned row, 10,500 tokens/s)
  skytune-sft      `skytune train` of a recipe with micro_batch: auto and nothing else tuned,
                   planning for an 80 GB H100 (SKYTUNE_GPU_MEMORY_GIB=79.2)
  skytune-sft-*    one change to the auto choice (ablations): -noliger (no Liger kernels),
                   -cast (PEFT's LoRA input cast kept), -ckpt (checkpoint every layer),
                   -rows16k (micro_batch 8 = 16k-token rows; auto checkpointing),
                   -fusedadam (adamw_torch_fused), -noexpand (allocator without expandable
                   segments), -compile (torch.compile through TrainingArguments)
  trl-dpo          plain TRL DPOTrainer: micro-batch 4 pairs, max_length 2048, checkpointing
  skytune-dpo      `skytune train` of the DPO recipe, micro_batch: auto, 80 GB plan

Useful tokens are the non-padding tokens the model ran (DPO: chosen + rejected). Each row
runs in its own process (clean peak memory), `--steps` optimizer steps; the first 3 are
warm-up and not timed; steps are timed with torch.cuda.synchronize() at both ends.
MFU = useful tokens/s x 4 x N / peak, N = 7.50e9 matmul parameters per token (decoder
linears + lm_head; LoRA: forward 2N + backward to activations 2N, no weight gradients;
attention score FLOPs and recomputation are not counted as useful), peak = 989 TFLOP/s
(H100/H200 SXM dense bf16 datasheet); `mfu_790` uses the ~790 TFLOP/s measured on the H200.
Results: bench/results/throughput-<gpu>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = "random:meta-llama/Llama-3.1-8B"
WARMUP = 3
H100_GIB = 79.2  # what an 80 GB H100 shows to torch
PEAK = 989e12
PEAK_MEASURED = 790e12
ROWS = ("trl-sft", "skytune-sft", "trl-dpo", "skytune-dpo", "trl-sft-flex",
        "skytune-sft-noliger", "skytune-sft-cast", "skytune-sft-ckpt", "skytune-sft-rows16k",
        "skytune-sft-fusedadam", "skytune-sft-noexpand", "skytune-sft-compile")


# ---------------------------------------------------------------------------------------
# Data


def sample_lengths(n: int, median: float, seed: int, lo: int = 64, hi: int = 2048) -> list[int]:
    rng = random.Random(seed)
    return [min(hi, max(lo, int(rng.lognormvariate(math.log(median), 0.6)))) for _ in range(n)]


def text_of(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Text that tokenizes to about n_tokens: random vocabulary pieces, decoded."""
    ids = [rng.randrange(64, tokenizer.vocab_size) for _ in range(n_tokens)]
    return tokenizer.decode(ids)


def sft_rows(tokenizer, n: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for total in sample_lengths(n, 490, seed=0):
        prompt = max(8, int(total * 0.3))
        rows.append({"messages": [
            {"role": "user", "content": text_of(tokenizer, prompt, rng)},
            {"role": "assistant", "content": text_of(tokenizer, total - prompt - 8, rng)}]})
    return rows


def dpo_rows(tokenizer, n: int) -> list[dict]:
    rng = random.Random(2)
    prompts = sample_lengths(n, 150, seed=3, hi=1024)
    chosen = sample_lengths(n, 340, seed=4, hi=1024)
    rejected = sample_lengths(n, 340, seed=5, hi=1024)
    return [{"prompt": [{"role": "user", "content": text_of(tokenizer, p, rng)}],
             "chosen": [{"role": "assistant", "content": text_of(tokenizer, c, rng)}],
             "rejected": [{"role": "assistant", "content": text_of(tokenizer, r, rng)}]}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


# ---------------------------------------------------------------------------------------
# Timing: a callback around optimizer steps, token counts from the batches


class Meter:
    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0 = 0.0
        self._tokens = 0

    def count(self, inputs: dict) -> None:
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            self._tokens += int(inputs["attention_mask"].sum())
        elif "position_ids" in inputs:
            self._tokens += int(inputs["position_ids"].numel())
        else:
            self._tokens += int(inputs["input_ids"].numel())

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter._t0, meter._tokens = time.perf_counter(), 0

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.times.append(time.perf_counter() - meter._t0)
                meter.tokens.append(meter._tokens)

        return StepTimer()


def instrument(meter: Meter) -> None:
    """Count each micro-batch's tokens; add the step timer to every trainer."""
    from transformers import Trainer

    step, init = Trainer.training_step, Trainer.__init__

    def training_step(self, model, inputs, *a, **kw):
        meter.count(inputs)
        return step(self, model, inputs, *a, **kw)

    def __init__(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(meter.callback())

    Trainer.training_step, Trainer.__init__ = training_step, __init__


# ---------------------------------------------------------------------------------------
# Rows


def plain_model(attention: str, checkpointing: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from skytune.train.common import resolve_model

    path = resolve_model(MODEL)
    with torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path),
                                                 dtype=torch.bfloat16,
                                                 attn_implementation=attention)
    return model, path


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def run_trl(row: str, steps: int, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    flex = row == "trl-sft-flex"
    model, path = plain_model("flex_attention" if flex else "sdpa", checkpointing=not flex)
    tok = AutoTokenizer.from_pretrained(path)
    common = dict(output_dir=str(out_dir), max_steps=steps, learning_rate=1e-4, bf16=True,
                  logging_steps=1, save_strategy="no", report_to=[], dataset_num_proc=None,
                  activation_checkpointing=not flex,
                  activation_checkpointing_kwargs={"use_reentrant": False})
    if row.endswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(per_device_train_batch_size=4, max_length=2048, **common)
        trainer = DPOTrainer(model=model, args=args, peft_config=lora(), processing_class=tok,
                             train_dataset=Dataset.from_list(dpo_rows(tok, 400)))
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(per_device_train_batch_size=1 if flex else 4,
                         max_length=8192 if flex else 2048, packing=flex,
                         assistant_only_loss=True, **common)
        trainer = SFTTrainer(model=model, args=args, peft_config=lora(), processing_class=tok,
                             train_dataset=Dataset.from_list(sft_rows(tok, 1200)))
    trainer.train()
    return {"config": {"micro_batch": args.per_device_train_batch_size,
                       "max_length": args.max_length, "packing": bool(getattr(args, "packing",
                                                                               False)),
                       "checkpointing": not flex, "attention": "flex_attention" if flex
                       else "sdpa"}}


def run_skytune(row: str, steps: int, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from skytune.recipe import recipe_from_dict
    from skytune.train import run
    from skytune.train.common import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    dpo = row.startswith("skytune-dpo")
    data = out_dir / "train.jsonl"
    rows = dpo_rows(tok, 400) if dpo else sft_rows(tok, 1200)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"max_steps": steps, "save_every": 100000, "log_every": 1, "lr": 1e-4,
             "max_length": 2048, "warmup_ratio": 0.0}
    variant = row.removeprefix("skytune-dpo").removeprefix("skytune-sft")
    train.update({"-noliger": {"liger": False}, "-ckpt": {"gradient_checkpointing": True},
                  "-fusedadam": {"optimizer": "adamw_torch_fused"},
                  "-rows16k": {"micro_batch": 8}}.get(variant, {}))
    if variant == "-compile":  # torch.compile through TrainingArguments
        from skytune.train import common

        kwargs = common.training_kwargs
        common.training_kwargs = lambda *a, **k: {**kwargs(*a, **k), "torch_compile": True}
    recipe = recipe_from_dict({
        "name": row, "model": MODEL, "method": "dpo" if dpo else "sft",
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data)}, "train": train,
        "output": {"store": f"file://{out_dir / 'store'}"},
    }, base_dir=out_dir)
    if row.endswith("-cast"):  # keep PEFT's LoRA input cast (the ablation)
        from skytune.train import fast

        fast.skip_lora_input_cast = lambda model: 0
    os.environ.setdefault("SKYTUNE_GPU_MEMORY_GIB", str(H100_GIB))
    result = run(recipe, resume="never")
    config: dict = {}
    if int(os.environ.get("RANK", "0")) == 0:  # the manifest's writer; other ranks only train
        manifest = json.loads((out_dir / "store" / result["run_id"] / "manifest.json")
                              .read_text())
        config = manifest.get("tuning") or {}
    if variant == "-cast":
        config["lora_cast"] = True  # the tuning chose False; the ablation kept PEFT's cast
    if variant:
        config["ablation"] = variant[1:]
    return {"config": config, "status": result.get("status")}


def one_row(row: str, steps: int, out: Path) -> dict:
    import tempfile

    import torch

    if row.startswith("skytune"):  # what `skytune train` sets, unless the ablation drops it
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = (
            "" if row.endswith("-noexpand") else "expandable_segments:True")
    meter = Meter()
    instrument(meter)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        info = (run_trl if row.startswith("trl") else run_skytune)(row, steps, Path(tmp))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    times, tokens = meter.times[WARMUP:], meter.tokens[WARMUP:]
    tps = sum(tokens) / sum(times) if times else 0.0
    result = {
        "row": row, "gpus": world, **info, "steps_timed": len(times),
        "useful_tokens_per_s": round(tps * world, 1),
        "useful_tokens_per_s_per_gpu": round(tps, 1),
        "tokens_per_step": round(statistics.mean(tokens), 1) if tokens else 0,
        "step_s_median": round(statistics.median(times), 4) if times else None,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "mfu": round(tps * 4 * 7.50e9 / PEAK, 4),
        "mfu_790": round(tps * 4 * 7.50e9 / PEAK_MEASURED, 4),
    }
    if world > 1 and int(os.environ.get("RANK", "0")) == 0:
        (out / f"throughput-{row}-{world}gpu.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS[:4]), help=f"comma list of {ROWS}")
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per row (3 warm-up)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per row")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = a.rows.split(",")
    if a.one or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every rank runs it
        for row in rows:
            print("RESULT", json.dumps(one_row(row, a.steps, out)), flush=True)
        return
    import torch

    device = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    path = out / f"throughput-{device.replace('NVIDIA ', '').replace(' ', '')}-{date}.json"
    results: list[dict] = []
    for row in rows:  # one process per row: clean peak memory, no state carried over
        cmd = [sys.executable, __file__, "--one", "--rows", row, "--steps", str(a.steps),
               "--out", str(out)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {
                "row": row, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
            r = {"row": row, "error": f"timeout after {a.timeout}s"}
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
        base = {x["row"]: x.get("useful_tokens_per_s") for x in results}
        for x in results:
            ref = base.get("trl-dpo" if "dpo" in x["row"] else "trl-sft")
            if ref and x.get("useful_tokens_per_s"):
                x["vs_plain_trl"] = round(x["useful_tokens_per_s"] / ref, 2)
        report = {"device": device, "date": date, "model": MODEL, "torch": torch.__version__,
                  "versions": _versions(), "rows": results}
        path.write_text(json.dumps(report, indent=1))  # after every row: a cut run keeps some
    print("\n%-22s %12s %8s %9s %7s %s" % ("row", "tokens/s", "vs TRL", "peak GiB", "MFU",
                                            "config"))
    for r in results:
        print("%-22s %12s %8s %9s %7s %s" % (
            r["row"], r.get("useful_tokens_per_s", r.get("error", "")), r.get("vs_plain_trl", ""),
            r.get("peak_reserved_gib", ""), r.get("mfu", ""), json.dumps(r.get("config"))))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("transformers", "trl", "peft", "accelerate", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
