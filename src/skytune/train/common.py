"""Small helpers shared by the method modules: device, model and tokenizer loading, PEFT
config, the TrainingArguments every method shares, and the gradient guard.

    dev = detect_device()
    tokenizer = load_tokenizer(recipe)
    model = load_model(recipe, dev)          # bf16 on GPU, fp32 on CPU, NF4/int8 for qlora
    peft_config = lora_config(recipe.adapter)  # None for a full fine-tune

Each reads the recipe once and returns library objects; nothing below sees the recipe.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune.errors import SkytuneError, TrainingFailed
from skytune.recipe import Recipe

log = logging.getLogger("skytune")


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "cpu"
    name: str
    bf16: bool
    mem_bytes: int  # free GPU memory at start; 0 on CPU
    count: int  # GPUs visible to this process


def detect_device() -> Device:
    """The device this process trains on. SKYTUNE_GPU_MEMORY_GIB caps the GPU memory skytune
    plans for and may use (sharing a GPU, or planning an 80 GB card's run on a larger one)."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        free, total = torch.cuda.mem_get_info()
        cap = os.environ.get("SKYTUNE_GPU_MEMORY_GIB")
        if cap:
            limit = float(cap) * 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
            free = min(free, int(limit))
        return Device("cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(),
                      int(free), torch.cuda.device_count())
    return Device("cpu", "cpu", False, 0, 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_model(name: str) -> str:
    """tiny:* -> a locally built model dir; local paths made absolute; hub ids unchanged."""
    if name.startswith("tiny:"):
        from skytune.tiny import resolve

        return resolve(name)
    if name.startswith("random:"):
        from skytune.tiny import resolve_random

        return resolve_random(name)
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def dtype_name(recipe: Recipe, dev: Device) -> str:
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if dev.kind == "cuda" and dev.bf16 else ("fp16" if dev.kind == "cuda"
                                                               else "fp32")
    if p in ("bf16", "fp16") and dev.kind == "cpu":
        return "fp32"  # half-precision training on CPU is slow and unsupported by autocast here
    return p


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = _hub_call(model_path, lambda: AutoTokenizer.from_pretrained(model_path))
    if tok.pad_token is None:
        # Reusing EOS as pad is safe: padded positions are masked out of the loss.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(recipe: Recipe, dev: Device):
    """BitsAndBytes config for qlora (NF4 + double quant, bf16 compute) or int8; else None."""
    if recipe.adapter.type != "qlora":
        return None
    if dev.kind != "cuda":
        raise SkytuneError("adapter.type qlora needs a CUDA GPU (bitsandbytes); on CPU use "
                           "adapter.type: lora (or launch on a GPU)")
    from transformers import BitsAndBytesConfig

    if recipe.adapter.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype("bf16" if dev.bf16 else "fp16"),
    )


def tuning(recipe: Recipe, dev: Device, model_path: str, packable: bool = False,
           vision: bool = False):
    """How this run trains (micro-batch, packing, checkpointing, kernels): train/fast.py."""
    from skytune.plan import auto_tuning
    from skytune.train import fast

    # The varlen kernel and Liger serve text SFT and DPO, where they were measured; GRPO
    # (generation with padded prompts) and vision models keep SDPA and stock layers.
    measured = recipe.method in ("sft", "dpo") and not vision
    varlen = dev.kind == "cuda" and fast.varlen_kernel() is not None and measured
    t = auto_tuning(recipe, dev, packable=packable, varlen=varlen,
                    liger=measured and fast.liger_available(dev, model_path))
    if t.attention == fast.VARLEN:
        fast.register_attention()
    log.info("tuning: %s", ", ".join(f"{k}={v}" for k, v in t.to_dict().items()
                                     if v not in (None, "")))
    return t


def load_model(recipe: Recipe, model_path: str, dev: Device, cls: Any = None,
               attention: str = "sdpa", checkpointing: bool = False):
    """The base model in full precision (or quantized for qlora), on one device.

    Never device_map="auto" with CPU offload: offloaded (meta) weights break gradient
    checkpointing in backward ("expected device meta but got cuda:0", seed 002)."""
    from transformers import AutoModelForCausalLM

    cls = cls or AutoModelForCausalLM
    quant = quantization_config(recipe, dev)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype_name(recipe, dev)),
        "attn_implementation": attention,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if Path(model_path, "skytune-random.json").is_file():  # random:<arch>, for benchmarks
        return _random_init(model_path, cls, dev, kwargs)
    model = _hub_call(model_path, lambda: cls.from_pretrained(model_path, **kwargs))
    if quant is not None:
        model = prepare_quantized(model, checkpointing)
    return model


def _random_init(model_path: str, cls: Any, dev: Device, kwargs: dict[str, Any]):
    """A random-init model from config.json, initialised directly on the GPU (an 8B model in
    seconds, nothing written to disk)."""
    import torch
    from transformers import AutoConfig

    if "quantization_config" in kwargs:
        raise SkytuneError("random:* models are for benchmarks of lora/full; use adapter.type "
                           "lora")
    config = AutoConfig.from_pretrained(model_path)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if dev.kind == "cuda" else "cpu"
    with torch.device(device):
        return cls.from_config(config, dtype=kwargs["dtype"],
                               attn_implementation=kwargs["attn_implementation"])


def prepare_quantized(model, checkpointing: bool):
    """PEFT's k-bit preparation: freeze the base, keep norms/embeddings in fp32, make inputs
    require grad, and checkpoint non-reentrantly. Without it, 8-bit + LoRA + checkpointing
    is the combination that raised "element 0 of tensors does not require grad" (seed 000)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_config(adapter) -> Any:
    if adapter.type == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=adapter.targets, bias="none", task_type="CAUSAL_LM",
    )


def training_kwargs(recipe: Recipe, dev: Device, output_dir: Path, tuned) -> dict[str, Any]:
    """TrainingArguments fields every method shares: the recipe's train section, with
    micro-batch, checkpointing and kernels from `tuned` (a fast.Tuning)."""
    t = recipe.train
    dt = dtype_name(recipe, dev)
    return dict(
        output_dir=str(output_dir),
        **tuned.trainer_kwargs(),
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dt == "bf16",
        fp16=dt == "fp16",
        use_cpu=dev.kind == "cpu",
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=None,  # the store keeps keep_last; local dirs are pruned after upload
        logging_steps=t.log_every,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every,
        report_to=_report_to(),
        run_name=recipe.name,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Every LoRA weight of a text model takes part in every step: DDP can skip its
        # per-step search for unused parameters (transformers turns it on when
        # checkpointing is off).
        ddp_find_unused_parameters=False if recipe.adapter.type != "full"
        and recipe.method in ("sft", "dpo") else None,
    )


def _report_to() -> list[str]:
    return ["wandb"] if os.environ.get("WANDB_API_KEY") else []


def _hub_call(model_path: str, fn):
    """Turn the hub's gated/missing-model errors into one line with the fix."""
    try:
        return fn()
    except OSError as e:
        msg = str(e)
        if "gated" in msg or "401" in msg or "403" in msg:
            raise SkytuneError(f"model {model_path}: gated on the Hub; accept its license on "
                               "huggingface.co and set HF_TOKEN") from None
        if not Path(model_path).exists() and ("not a valid model identifier" in msg
                                             or "404" in msg or "offline" in msg.lower()
                                             or "connect" in msg.lower()):
            raise SkytuneError(f"model {model_path}: not found locally and the Hub is not "
                               "reachable or has no such model; check the id or use a local "
                               "path") from None
        raise


# ---------------------------------------------------------------------------------------
# The gradient guard


def gradient_guard(zero_ok: bool = False):
    """A TrainerCallback that stops at the first optimizer step if nothing can learn:
    no trainable parameters, no gradient reaching them, or a zero/NaN gradient norm."""
    from transformers import TrainerCallback

    class GradientGuard(TrainerCallback):
        checked = False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.checked or model is None:
                return
            self.checked = True
            check_gradients(model, zero_ok)

    return GradientGuard()


def check_gradients(model, zero_ok: bool = False) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    if n == 0:
        raise TrainingFailed(
            "no trainable parameters: every weight is frozen (a LoRA adapter that was not "
            "attached, or a quantized base without an adapter); check adapter.targets")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise TrainingFailed(
            f"{n:,} trainable parameters but no gradient reached them after the first step: "
            "the graph is cut (gradient checkpointing with use_reentrant=True on a frozen or "
            "quantized base, or inputs without requires_grad); skytune uses non-reentrant "
            "checkpointing — report this recipe as a bug")
    norm = float(torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])))
    if (not norm > 0 and not (zero_ok and norm == 0)) or norm != norm or norm == float("inf"):
        raise TrainingFailed(
            f"gradient norm is {norm} at the first step: the loss does not depend on the "
            "trainable parameters (all labels masked? check the data format) or overflowed "
            "(try precision: bf16 or a lower train.lr)")
    log.info("gradient check: %s trainable parameters, grad norm %.3g", f"{n:,}", norm)
    return norm


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def explain(e: RuntimeError) -> Exception:
    """Known PyTorch failures, rewritten as one line with the cause and the fix."""
    msg = str(e)
    if "does not require grad and does not have a grad_fn" in msg:
        return TrainingFailed(
            "the loss has no gradient path to the trainable parameters (\"element 0 of "
            "tensors does not require grad\"): with a frozen or quantized base and gradient "
            "checkpointing, inputs must require grad; set train.gradient_checkpointing: false "
            "to confirm, and report the recipe")
    if is_oom(e):
        return TrainingFailed(
            "CUDA out of memory: lower train.micro_batch (or set it to auto), set "
            "train.gradient_checkpointing: true, shorten train.max_length, or use "
            "adapter.type: qlora; `skytune plan` shows what fits")
    if "expected device meta" in msg:
        return TrainingFailed("weights were offloaded to the meta device (device_map offload), "
                              "which breaks gradient checkpointing; load the model on one GPU")
    return e


# ---------------------------------------------------------------------------------------
# --dry-run


def count_parameters(model_path: str, adapter) -> tuple[int, int]:
    """(total, trainable) parameters, on the meta device: no weights are loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = _hub_call(model_path, lambda: AutoConfig.from_pretrained(model_path))
    vision = getattr(config, "vision_config", None) is not None
    with init_empty_weights():
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_config(
            config)
    total = sum(p.numel() for p in model.parameters())
    cfg = lora_config(adapter)
    if cfg is None:
        return total, total
    from peft import get_peft_model

    peft_model = get_peft_model(model, cfg)
    return total, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def count_tokens(rows: list[dict], tokenizer, max_length: int) -> int:
    """Tokens the trainer will see (chat template applied, cut at max_length)."""
    total = 0
    for row in rows:
        if "messages" in row:
            msgs = row["messages"]
        elif isinstance(row.get("prompt"), list):
            msgs = row["prompt"] + row.get("completion", row.get("chosen", []))
        else:
            text = str(row.get("prompt", "")) + str(row.get("completion", row.get("chosen", "")))
            total += min(len(tokenizer(text).input_ids), max_length)
            continue
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # BatchEncoding in v5
        total += min(len(ids), max_length)
    return total


def describe(recipe: Recipe, dev: Device, data, model_path: str, args,
             tuned=None) -> dict[str, Any]:
    """What a run would do, without running a step (skytune train --dry-run)."""
    import math

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    total, trainable = count_parameters(model_path, recipe.adapter)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    steps = args.max_steps if args.max_steps > 0 else math.ceil(
        len(data.train) * recipe.train.epochs / per_step)
    out = {
        "run": recipe.name, "method": recipe.method, "model": recipe.model,
        "device": dev.name, "precision": dtype_name(recipe, dev), "data_format": data.format,
        "train_rows": len(data.train), "eval_rows": len(data.eval or []),
        "train_tokens_per_epoch": count_tokens(data.train, tokenizer, recipe.train.max_length),
        "micro_batch": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps, "steps": steps,
        "gradient_checkpointing": args.activation_checkpointing, "lr": args.learning_rate,
        "parameters": total, "trainable_parameters": trainable,
        "store": recipe.store_url(),
    }
    from skytune.plan import dry_run_memory

    ckpt = tuned.checkpointing if tuned else int(args.activation_checkpointing)
    out["memory_estimate_gb"] = dry_run_memory(
        recipe, args.per_device_train_batch_size, ckpt, liger=bool(tuned and tuned.liger),
        lora_cast=tuned.lora_cast if tuned else True)
    if tuned is not None:
        out["tuning"] = tuned.to_dict()
    return out
