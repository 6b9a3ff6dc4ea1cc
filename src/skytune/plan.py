"""Will it fit, how long, what will it cost: a recipe on each GPU × cloud, from plain numbers.

    from skytune.plan import plan, render
    result = plan(load_recipe("jobs/recipes/demo.yaml"), gpus=["H100", "RTX4090:1"])
    print(render(result))            # cheapest feasible first; result.to_dict() for --json

    # what the trainer uses for `micro_batch: auto`
    from skytune.plan import choose_micro_batch, estimate_memory
    mb, ckpt = choose_micro_batch(arch_for(recipe.model), recipe, gpu_mem_bytes=80e9)

The model is arithmetic, not a measurement: weights by dtype, LoRA adapters (fp32, as PEFT
keeps them), gradients and AdamW state, activations per layer (with and without gradient
checkpointing), the loss's logits, plus CUDA context and fragmentation. Throughput is peak
bf16 FLOPs × an efficiency (MFU) that `bench/calibrate.py` measures on a real GPU; paste its
numbers into MFU and the *_BYTES constants below.

Prices come from SkyPilot's catalog CSVs (schema v8), read here with the csv module rather
than through `sky.catalog`: importing it costs ~1.7 s, it reads only ~/.sky/catalogs (fixed
at import from SKY_RUNTIME_DIR) and it downloads any missing cloud file from GitHub on first
use, so plan would need network and sky's import just to print a table. Files are looked
up, per cloud, in SKYTUNE_CATALOG_DIR (or `catalog_dir=`), then SkyPilot's own cache
(~/.sky/catalogs/v8/<cloud>/vms.csv, fresh after any `sky` command), then the snapshot
shipped in skytune/assets (vast + lambda, trimmed to the cheapest row per instance type).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skytune.errors import SkytuneError
from skytune.models_catalog import Arch, arch_for

if TYPE_CHECKING:
    from skytune.recipe import Adapter, Recipe, Train

GiB = 1024**3

# ---------------------------------------------------------------------------------------
# GPUs and the knobs calibration sets


@dataclass(frozen=True)
class Gpu:
    name: str  # SkyPilot's accelerator name
    mem_gib: float  # what torch.cuda.mem_get_info reports as total, not the marketing GB
    tflops: float  # dense bf16 (fp16 where no bf16) tensor TFLOPs, fp32 accumulate
    bw_tbs: float  # HBM/GDDR bandwidth, TB/s (bounds generation speed)
    bf16: bool = True


GPUS: dict[str, Gpu] = {g.name: g for g in [
    Gpu("H100", 79.6, 989, 3.35), Gpu("H200", 140.4, 989, 4.8), Gpu("GH200", 94.5, 989, 4.0),
    Gpu("B200", 178.4, 2250, 8.0), Gpu("A100-80GB", 79.2, 312, 2.0), Gpu("A100", 39.4, 312, 1.55),
    Gpu("L40S", 44.4, 362, 0.86), Gpu("L40", 44.4, 181, 0.86), Gpu("A40", 44.4, 150, 0.70),
    Gpu("A6000", 47.5, 155, 0.77), Gpu("RTXA6000", 47.5, 155, 0.77),
    Gpu("RTX6000-Ada", 47.5, 364, 0.96), Gpu("A10G", 22.5, 125, 0.6), Gpu("A10", 22.5, 125, 0.6),
    Gpu("L4", 22.0, 121, 0.3), Gpu("RTX4090", 23.6, 165, 1.0), Gpu("RTX5090", 31.4, 210, 1.79),
    Gpu("RTX3090", 23.6, 71, 0.94), Gpu("V100-32GB", 31.7, 125, 0.9, bf16=False),
    Gpu("V100", 15.8, 125, 0.9, bf16=False), Gpu("T4", 14.6, 65, 0.32, bf16=False),
]}
GPU_ALIASES = {"A100-40GB": "A100", "A100-80G": "A100-80GB", "RTX6000ADA": "RTX6000-Ada"}
DEFAULT_GPUS = ("H100", "H200", "A100-80GB", "A100", "L40S", "A10G", "RTX4090", "RTX5090",
                "RTX3090", "A6000", "RTXA6000", "L4")
DEFAULT_COUNTS = (1, 2, 4, 8)

# Model FLOPs utilization at a large micro-batch (≥ 8k tokens), by adapter type. Measured by
# bench/calibrate.py on an H100 80GB (bench/results/calibration-H100-20261121-0922.json:
# torch 2.11, transformers 5.17, peft 0.21, SDPA, bf16 autocast): 8B LoRA r=16 with
# checkpointing 0.316, 1B full fine-tune 0.342. QLoRA is not measured (no bitsandbytes
# there): it pays for dequantizing every weight in every forward and backward.
# LoRA as skytune trains it (packed varlen rows, Liger, no input cast; bench/throughput.py
# on an H200, bench/results/throughput-*): 0.44-0.45 of 989 TFLOP/s. Kept a little lower:
# models other than Llama lose some of it (no Liger kernels, other shapes).
MFU = {"full": 0.34, "lora": 0.40, "qlora": 0.22}
BATCH_SATURATION_TOKENS = 256  # tokens per micro-batch at which matmuls run at half speed
MULTI_GPU_SCALING = {"single": 1.0, "ddp": 0.92, "fsdp": 0.85}
GEN_BW_EFFICIENCY = 0.3  # HF generate() reaches ~30% of memory bandwidth per decode step

# TRL's fused LM head (every trainer since TRL 1.x) never builds the (tokens, vocab) logits:
# it projects tiles of 4096 tokens x 32768 vocab entries (bf16 product, fp32 softmax pieces
# and the gradient tile in backward: ~10 bytes per element).
LM_HEAD_TILE_BYTES = 4096 * 32768 * 10.0
# PEFT casts each LoRA input to the adapter dtype; under bf16 autocast lora_A saves a bf16
# copy (2 bytes per input feature), plus the dropout mask (1 byte) when dropout > 0.
LORA_SAVED_BYTES = 2.0
# NF4 with double quantization: 4 bits + an 8-bit absmax per 64 + an fp32 per 256 absmaxes.
QUANT_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0 + 4 / 4096}
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace outside the allocator (0.749 on H100)
FRAGMENTATION = 0.05  # caching allocator: reserved exceeds allocated by about this much
USABLE_FRACTION = 0.95  # safety margin: plan to fill at most this much of the card
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_TOKENS_PER_MICRO_BATCH = 65536
CHARS_PER_TOKEN = 3.6  # English text on llama/qwen tokenizers, when no tokenizer is at hand
SETUP_MINUTES = 10  # provisioning, image pull, model download: billed before training starts


# ---------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training step on one GPU, by part (bytes)."""

    parts: dict[str, float]
    micro_batch: int
    seq: int
    grad_ckpt: bool
    strategy: str = "single"

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def fits(self, gpu_mem_bytes: float) -> bool:
        return self.total <= gpu_mem_bytes * USABLE_FRACTION

    def to_dict(self) -> dict[str, Any]:
        return {"total_gib": round(self.total_gib, 2), "micro_batch": self.micro_batch,
                "seq": self.seq, "grad_ckpt": self.grad_ckpt, "strategy": self.strategy,
                "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()}}


def estimate_memory(
    arch: Arch, adapter: Adapter, train_cfg: Train, micro_batch: int, seq: int,
    grad_ckpt: bool | int, *, method: str = "sft", n_gpus: int = 1, strategy: str = "single",
    kv_cache_seqs: int = 0, reference: bool | None = None, liger: bool = False,
    lora_cast: bool = True,
) -> MemoryEstimate:
    """Peak memory per GPU. `grad_ckpt`: False/0 off, True/1 every layer, n every n-th layer;
    `strategy` fsdp shards weights, grads and optimizer over n_gpus; `kv_cache_seqs` > 0 adds
    a generation KV cache of that many sequences (GRPO); `reference` (default: method is dpo)
    keeps a frozen reference copy in full fine-tuning; `liger` (RMSNorm/SwiGLU kernels) and
    `lora_cast` (PEFT's copy of each LoRA input) change what a layer keeps for backward."""
    kind = adapter.type
    shard = n_gpus if strategy == "fsdp" else 1
    ref = method == "dpo" if reference is None else reference
    parts = _state_bytes(arch, adapter, train_cfg, ref, shard)
    seqs = micro_batch * (2 if method == "dpo" else 1)  # DPO runs chosen and rejected
    acts = _activation_bytes(arch, adapter, train_cfg, seqs * seq, seq, grad_ckpt,
                             liger=liger, lora_cast=lora_cast)
    logits = LM_HEAD_TILE_BYTES * min(1.0, seqs * seq / 4096) * min(1.0, arch.vocab / 32768)
    kv = kv_cache_seqs * seq * 2 * arch.layers * arch.kv_heads * arch.hd * 2
    step = parts.pop("optimizer_step")
    # The peak is the largest of the three moments that never overlap: backward (activations
    # and logits alive), the optimizer step (foreach temporaries), generation (KV cache).
    parts["activations"] = max(acts + logits, step, kv)
    if kind == "qlora":  # one layer's weights dequantized to bf16 while it runs
        parts["activations"] += max(a * b for a, b in arch.linear_shapes().values()) * 2 * 2
    allocated = sum(parts.values())
    parts["overhead"] = allocated * FRAGMENTATION + CUDA_CONTEXT_GIB * GiB
    return MemoryEstimate(parts, micro_batch, seq, grad_ckpt, strategy)


def _state_bytes(arch: Arch, adapter: Adapter, train_cfg: Train, reference: bool,
                 shard: int) -> dict[str, float]:
    """Weights, adapter, gradients, optimizer state and its step temporaries."""
    n = arch.n_params()
    wbytes = 4 if train_cfg.precision == "fp32" else 2
    if adapter.type == "full":
        # The trainer loads bf16 weights and AdamW keeps moments in the param dtype (no fp32
        # master copy): 2 + 2 grads + 4 moments; foreach AdamW allocates one more param-size
        # temporary (sqrt of the second moment) during the step.
        layer_gather = 2 * (n - arch.embedding_params()) / arch.layers * wbytes if shard > 1 else 0
        ref = n * 2 / shard if reference else 0  # LoRA's reference: the adapter switched off
        return {"weights": n * wbytes / shard + layer_gather, "reference": ref,
                "gradients": n * wbytes / shard, "optimizer": 2 * n * wbytes / shard,
                "optimizer_step": n * wbytes / shard}
    if adapter.type == "qlora":
        lin = arch.block_linear_params()
        weights = lin * QUANT_BYTES[adapter.bits] + (n - lin) * 2
    else:
        weights = n * wbytes / shard
    lora = arch.lora_params(adapter.r, adapter.targets)
    # PEFT upcasts adapters to fp32 (autocast_adapter_dtype): 4 weights + 4 grads + 8 AdamW.
    return {"weights": weights, "adapter": lora * 4.0, "gradients": lora * 4.0,
            "optimizer": lora * 8.0, "optimizer_step": lora * 4.0}


def layer_activation_bytes_per_token(arch: Arch, adapter: Adapter, attention: str,
                                     seq: int, liger: bool = False,
                                     lora_cast: bool = True) -> float:
    """Bytes one decoder layer keeps for backward, per token (bf16, SDPA/flash attention).

    Counted from what autograd saves: RMSNorm's fp32 input (4h; Liger's kernel keeps the bf16
    input, 2h) and, when its weight trains, its bf16 output (2h); attention's q, k, v, output
    (2q + 2kv + 2kv + 2q); SwiGLU's gate, silu, up (6i; Liger recomputes silu: 4i) and
    down_proj's input (2i, only when down_proj's weight trains). Frozen linears save no input,
    so LoRA adds what lora_A keeps: with PEFT's input cast a bf16 copy per wrapped linear;
    without it, the inputs themselves, shared by q/k/v and by gate/up (o_proj's input is the
    attention output, already counted); dropout adds a dropped copy and a mask per linear.
    """
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.hd, arch.kv_heads * arch.hd
    full = adapter.type == "full"
    norm = 2 if liger else 4
    mlp = 4 if liger else 6
    per = 2 * (norm * h + (2 * h if full else 0)) + 4 * q + 4 * kv + mlp * i + (
        2 * i if full else 0)
    if not full:
        shapes = arch.linear_shapes()
        names = [n for n in (shapes if adapter.targets == "all-linear" else adapter.targets)
                 if n in shapes]
        if adapter.dropout > 0:
            per += (LORA_SAVED_BYTES + 1) * sum(shapes[n][0] for n in names)
        elif lora_cast:
            per += LORA_SAVED_BYTES * sum(shapes[n][0] for n in names)
        else:
            inputs = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
                      "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
            per += 2 * sum(shapes[n][0] for n in {inputs[n]: n for n in names
                                                  if n in inputs}.values())
    if attention == "eager":  # the seq × seq score and probability matrices, per head
        per += arch.heads * seq * (2 + 2)
    return per


def checkpointed_layers(arch: Arch, grad_ckpt: bool | int) -> int:
    """Decoder layers that recompute in backward: all (True/1), none (False/0), every n-th."""
    every = int(grad_ckpt)
    return 0 if every <= 0 else -(-arch.layers // every)


def _activation_bytes(arch: Arch, adapter: Adapter, train_cfg: Train, tokens: int, seq: int,
                      grad_ckpt: bool | int, liger: bool = False,
                      lora_cast: bool = True) -> float:
    per_layer = layer_activation_bytes_per_token(
        arch, adapter, train_cfg.attention, seq, liger, lora_cast) * tokens
    n_ckpt = checkpointed_layers(arch, grad_ckpt)
    # A checkpointed layer keeps only its bf16 input; backward recomputes one at a time (its
    # activations + their gradients, about as large again). Others keep everything.
    kept = n_ckpt * tokens * arch.hidden * 2 + (arch.layers - n_ckpt) * per_layer
    return kept + (2 * per_layer if n_ckpt else per_layer)


# ---------------------------------------------------------------------------------------
# Throughput


def flops_per_token(arch: Arch, kind: str, method: str, seq: int, grad_ckpt: bool | int,
                    lora_params: int = 0) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for activations (+2N for weight
    grads in full fine-tuning), a recomputed forward of the checkpointed layers, attention,
    DPO's reference forward."""
    n = arch.compute_params()
    attn_fwd = 2 * arch.layers * seq * arch.heads * arch.hd  # causal: QK^T and AV over s/2
    fwd = 2 * n + attn_fwd
    total = 3 * fwd if kind == "full" else 2 * fwd + 6 * lora_params
    total += fwd * checkpointed_layers(arch, grad_ckpt) / arch.layers
    if method == "dpo":
        total += fwd
    return total


def batch_efficiency(tokens: int) -> float:
    """Fraction of MFU reached at this many tokens per micro-batch (1.0 at ≥ 8k)."""
    f = lambda t: t / (t + BATCH_SATURATION_TOKENS)
    return min(1.0, f(tokens) / f(8192))


def train_tokens_per_second(arch: Arch, gpu: Gpu, kind: str, method: str, micro_batch: int,
                            seq: int, grad_ckpt: bool, n_gpus: int = 1,
                            strategy: str = "single", lora_params: int = 0) -> float:
    flops = flops_per_token(arch, kind, method, seq, grad_ckpt, lora_params)
    eff = MFU[kind] * batch_efficiency(micro_batch * seq)
    return gpu.tflops * 1e12 * eff / flops * n_gpus * MULTI_GPU_SCALING[strategy]


def generation_seconds_per_token(arch: Arch, gpu: Gpu, weights_bytes: float, batch: int) -> float:
    """Decode time per generated token, per GPU: bandwidth-bound at small batches."""
    compute = 2 * arch.compute_params() / (gpu.tflops * 1e12 * MFU["full"])
    memory = weights_bytes / (gpu.bw_tbs * 1e12 * GEN_BW_EFFICIENCY) / max(batch, 1)
    return max(compute, memory)


# ---------------------------------------------------------------------------------------
# Choosing micro-batch and checkpointing


def memory_seq(recipe: Recipe, stats: DataStats | None = None) -> int:
    """Sequence length to budget memory for: GRPO's prompt + completion; else max_length,
    or the longest row when the data is known and not packed (batches pad to the longest)."""
    t = recipe.train
    if recipe.method == "grpo":
        prompt = min(stats.max_prompt_tokens if stats else 512, t.max_length)
        return prompt + recipe.grpo.max_completion_length
    if stats is None or t.packing is True:
        return t.max_length
    return min(t.max_length, stats.max_seq_tokens)


CKPT_CHOICES = (0, 4, 2, 1)  # off, every 4th layer, every 2nd, all: the order to try


def _candidates(recipe: Recipe, seq: int) -> list[tuple[int, int]]:
    """(micro_batch, checkpoint every n-th layer) pairs the recipe allows, fixed values
    respected (gradient_checkpointing true = every layer, false = none)."""
    t = recipe.train
    mbs = [t.micro_batch] if isinstance(t.micro_batch, int) else [
        m for m in MICRO_BATCHES if m == 1 or m * seq <= MAX_TOKENS_PER_MICRO_BATCH]
    ckpts = [int(t.gradient_checkpointing)] if isinstance(t.gradient_checkpointing, bool) \
        else list(CKPT_CHOICES)
    return [(m, c) for m in mbs for c in ckpts]


def fit(arch: Arch, recipe: Recipe, gpu_mem_bytes: float, *, n_gpus: int = 1,
        strategy: str = "single", seq: int | None = None, liger: bool = False,
        lora_cast: bool = True) -> MemoryEstimate | None:
    """The fastest (micro_batch, checkpointing) that fits, as its MemoryEstimate; None if
    none. `grad_ckpt` of the result: 0 off, n = every n-th layer (1 = all).

    Faster = more tokens per micro-batch (better matmul efficiency) divided by the FLOPs
    checkpointing adds; so checkpointing is chosen only when it buys a larger batch, and
    only on as many layers as that batch needs.
    """
    seq = seq or memory_seq(recipe)
    kind = recipe.adapter.type
    lora = 0 if kind == "full" else arch.lora_params(recipe.adapter.r, recipe.adapter.targets)
    best, best_score = None, 0.0
    for mb, ckpt in _candidates(recipe, seq):
        est = estimate_memory(
            arch, recipe.adapter, recipe.train, mb, seq, ckpt, method=recipe.method,
            n_gpus=n_gpus, strategy=strategy, reference=_needs_reference(recipe),
            kv_cache_seqs=mb * recipe.train.grad_accum if recipe.method == "grpo" else 0,
            liger=liger, lora_cast=lora_cast)
        if not est.fits(gpu_mem_bytes):
            continue
        score = batch_efficiency(mb * seq) / flops_per_token(
            arch, kind, recipe.method, seq, ckpt, lora)
        if score > best_score * 1.0001:  # ties: keep the smaller batch
            best, best_score = est, score
    return best


def _needs_reference(recipe: Recipe) -> bool:
    return recipe.method == "dpo" or (recipe.method == "grpo" and recipe.grpo.beta > 0)


def choose_micro_batch(arch: Arch, recipe: Recipe, gpu_mem_bytes: float, *, n_gpus: int = 1,
                       strategy: str = "single", seq: int | None = None, liger: bool = False,
                       lora_cast: bool = True) -> tuple[int, int]:
    """(micro_batch, checkpoint every n-th layer, 0 = off) for `micro_batch: auto` here.

    `seq`: the longest tokenized sequence when the trainer knows it (default max_length).
    """
    est = fit_or_raise(arch, recipe, gpu_mem_bytes, n_gpus=n_gpus, strategy=strategy, seq=seq,
                       liger=liger, lora_cast=lora_cast)
    return est.micro_batch, est.grad_ckpt


def fit_or_raise(arch: Arch, recipe: Recipe, gpu_mem_bytes: float, *, n_gpus: int = 1,
                 strategy: str = "single", seq: int | None = None, liger: bool = False,
                 lora_cast: bool = True) -> MemoryEstimate:
    """`fit`, or a one-line error with the fixes when nothing fits this GPU."""
    seq = seq or memory_seq(recipe)
    est = fit(arch, recipe, gpu_mem_bytes, n_gpus=n_gpus, strategy=strategy, seq=seq,
              liger=liger, lora_cast=lora_cast)
    if est is None:
        need = estimate_memory(arch, recipe.adapter, recipe.train, 1, seq, True,
                               method=recipe.method, n_gpus=n_gpus, strategy=strategy,
                               reference=_needs_reference(recipe))
        raise SkytuneError(
            f"{recipe.model} ({recipe.adapter.type}) needs ~{need.total_gib:.1f} GiB per GPU "
            f"even at micro_batch 1 with gradient checkpointing; this GPU has "
            f"{gpu_mem_bytes / GiB:.1f} GiB. Run `skytune plan` for changes that fit "
            "(adapter.type=qlora, a shorter train.max_length, more or larger GPUs)")
    return est


def _trainer_strategy(recipe: Recipe) -> tuple[int, str]:
    """(GPUs, strategy) of this torchrun process group: FSDP for full fine-tuning, else DDP."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    return n, "single" if n == 1 else "fsdp" if recipe.adapter.type == "full" else "ddp"


def auto_tuning(recipe: Recipe, dev: Any, *, packable: bool, varlen: bool, liger: bool):
    """How this run trains (skytune.train.fast.Tuning), from this memory model and `dev`
    (kind 'cuda'|'cpu', mem_bytes: the GPU memory to plan for).

    packable: the data can be packed (SFT text); varlen: a per-sample attention kernel for
    packed rows exists here; liger: Liger's kernels are installed and apply to this model.
    Recipe values that are not auto are kept as given.
    """
    from skytune.train.fast import VARLEN, Tuning

    t = recipe.train
    cuda = dev.kind == "cuda"
    attention = {"auto": VARLEN if varlen else "sdpa", "varlen": VARLEN}.get(t.attention,
                                                                             t.attention)
    packing = t.packing if isinstance(t.packing, bool) else (
        packable and cuda and attention == VARLEN)
    use_liger = t.liger if isinstance(t.liger, bool) else (liger and cuda)
    # PEFT's LoRA input cast only copies under autocast: drop it where training is bf16/fp16.
    lora_cast = not (cuda and recipe.adapter.type != "full" and t.precision != "fp32")
    padding_free = recipe.method == "dpo" and attention == VARLEN
    mb = t.micro_batch
    ckpt = int(t.gradient_checkpointing) if isinstance(t.gradient_checkpointing, bool) else (
        1 if cuda else 0)
    est_gib = None
    reason = "fixed in the recipe"
    if cuda and dev.mem_bytes and (mb == "auto" or t.gradient_checkpointing == "auto"):
        n, strategy = _trainer_strategy(recipe)
        est = fit_or_raise(arch_for(recipe.model, recipe.base_dir), recipe, dev.mem_bytes,
                           n_gpus=n, strategy=strategy, liger=use_liger, lora_cast=lora_cast)
        mb, ckpt = est.micro_batch, int(est.grad_ckpt)
        est_gib = round(est.total_gib, 1)
        reason = "planner: fastest that fits"
    elif mb == "auto":
        mb = 2  # CPU runs are tiny models; memory is not what limits them
        reason = "cpu"
    return Tuning(micro_batch=int(mb), packing=packing, checkpointing=ckpt, attention=attention,
                  liger=use_liger, lora_cast=lora_cast, padding_free=padding_free,
                  estimate_gib=est_gib,
                  memory_gib=round(dev.mem_bytes / GiB, 1) if dev.mem_bytes else None,
                  reason=reason)


def dry_run_memory(recipe: Recipe, micro_batch: int, grad_ckpt: bool | int,
                   liger: bool = False, lora_cast: bool = True) -> float:
    """Estimated peak GB per GPU of this recipe at this micro-batch (for `train --dryrun`)."""
    n, strategy = _trainer_strategy(recipe)
    est = estimate_memory(arch_for(recipe.model, recipe.base_dir), recipe.adapter, recipe.train,
                          micro_batch, memory_seq(recipe), grad_ckpt, method=recipe.method,
                          n_gpus=n, strategy=strategy, reference=_needs_reference(recipe),
                          liger=liger, lora_cast=lora_cast)
    return round(est.total / 1e9, 2)


# ---------------------------------------------------------------------------------------
# Data: how many tokens one epoch is

TEMPLATE_TOKENS = 8  # chat-template role markers added to each sequence
MAX_ROWS_COUNTED = 20_000  # tokenize a prefix of large files and scale up


@dataclass
class DataStats:
    rows: int
    seq_tokens: float  # mean tokens per training sequence, capped at max_length
    max_seq_tokens: int  # the longest, capped: what an unpacked batch pads to
    seqs_per_row: int  # 2 for DPO (chosen, rejected)
    prompt_tokens: float  # mean prompt tokens (GRPO generates after these)
    max_prompt_tokens: int
    counted_by: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_stats(recipe: Recipe) -> DataStats | None:
    """Token counts of the training file, or None when it is not a local file."""
    from skytune.data import apply_fields, load_rows

    location = recipe.path(recipe.data.train)
    if "://" in location and not location.startswith("file://"):
        return None
    rows = load_rows(location)[: recipe.data.max_rows]
    sample = [apply_fields(r, recipe.data.fields) for r in rows[:MAX_ROWS_COUNTED]]
    count, counted_by = token_counter(recipe)
    prompts, seqs = zip(*(_row_texts(r, recipe.method) for r in sample), strict=True)
    per_row = len(seqs[0])
    seq_counts = count([s for row in seqs for s in row])
    prompt_counts = count(list(prompts))
    cap = recipe.train.max_length
    capped = [min(c + TEMPLATE_TOKENS, cap) for c in seq_counts]
    return DataStats(
        rows=len(rows), seq_tokens=sum(capped) / len(capped), max_seq_tokens=max(capped),
        seqs_per_row=per_row,
        prompt_tokens=sum(prompt_counts) / len(prompt_counts) + TEMPLATE_TOKENS,
        max_prompt_tokens=max(prompt_counts) + TEMPLATE_TOKENS, counted_by=counted_by)


def _flat(value: Any) -> str:
    """All text in a field: strings, message lists, nested dicts (images count as nothing)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(_flat(v) for k, v in value.items() if k not in ("role", "type"))
    if isinstance(value, list):
        return " ".join(_flat(v) for v in value)
    return ""


def _row_texts(row: dict[str, Any], method: str) -> tuple[str, list[str]]:
    """(prompt, sequences the trainer builds from this row)."""
    prompt = _flat(row.get("prompt") or row.get("question") or "")
    if method == "dpo" and "chosen" in row and "rejected" in row:
        return prompt, [prompt + _flat(row["chosen"]), prompt + _flat(row["rejected"])]
    if method == "grpo" and not prompt:
        prompt = _flat({k: v for k, v in row.items() if k not in ("answer", "solution")})
    return prompt, [_flat(row)]


def token_counter(recipe: Recipe) -> tuple[Callable[[list[str]], list[int]], str]:
    """Count with the model's tokenizer when it is on disk (local dir, built tiny model)."""
    path = _local_tokenizer(recipe)
    if path is not None:
        try:
            from tokenizers import Tokenizer  # no torch, unlike transformers.AutoTokenizer

            tok = Tokenizer.from_file(str(path))
            return (lambda texts: [len(e.ids) for e in
                                   tok.encode_batch(texts, add_special_tokens=False)],
                    f"tokenizer {path.parent.name}")
        except Exception:  # noqa: BLE001, S110 - an odd tokenizer file still leaves an estimate
            pass
    return (lambda texts: [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts],
            f"estimate: characters / {CHARS_PER_TOKEN}")


def _local_tokenizer(recipe: Recipe) -> Path | None:
    if recipe.model.startswith("tiny:"):
        from skytune import tiny

        found = sorted(tiny.cache_dir().glob(f"{tiny.parse(recipe.model).name}-*/tokenizer.json"))
        return found[0] if found else None
    p = Path(recipe.path(recipe.model)) / "tokenizer.json"
    return p if p.is_file() else None


# ---------------------------------------------------------------------------------------
# Prices: SkyPilot catalog CSVs (see the module docstring for why not sky.catalog)

ASSETS = Path(__file__).parent / "assets"


@dataclass
class Offer:
    cloud: str
    gpu: str
    count: int
    price: float  # on-demand $/h, cheapest region
    spot: float | None  # None: the cloud sells no spot for it
    instance: str
    region: str


def catalog_files(catalog_dir: str | Path | None = None) -> dict[str, Path]:
    """{cloud: vms.csv}: an explicit dir alone, else SkyPilot's cache, then the snapshot."""
    explicit = catalog_dir or os.environ.get("SKYTUNE_CATALOG_DIR")
    if explicit:
        files = _cloud_files(Path(explicit).expanduser())
        if not files:
            raise SkytuneError(f"{explicit}: no <cloud>/vms.csv (SkyPilot catalog v8 layout)")
        return files
    sky = Path(os.environ.get("SKY_RUNTIME_DIR", "~")).expanduser() / ".sky" / "catalogs"
    files = _cloud_files(sky)
    for p in sorted(ASSETS.glob("catalog-v8-*.csv")):
        files.setdefault(p.stem.removeprefix("catalog-v8-"), p)
    return files


def _cloud_files(d: Path) -> dict[str, Path]:
    if (d / "v8").is_dir():
        d = d / "v8"
    return {p.parent.name: p for p in sorted(d.glob("*/vms.csv"))}


def load_offers(catalog_dir: str | Path | None = None) -> tuple[list[Offer], dict[str, str]]:
    """Cheapest on-demand and spot price per (cloud, GPU, count), and where each came from."""
    files = catalog_files(catalog_dir)
    offers = [o for cloud, path in files.items() for o in _read_vms(cloud, path)]
    return offers, {cloud: str(path) for cloud, path in files.items()}


def _price(text: str | None) -> float | None:
    try:
        value = float(text or "nan")
    except ValueError:
        return None
    return value if value > 0 else None  # 0 or empty: not offered (vast lists spot as 0.00)


def _read_vms(cloud: str, path: Path) -> list[Offer]:
    # Rows without an InstanceType (GCP's attachable GPUs) price the GPU alone, not a
    # machine you can rent, so they are skipped.
    best: dict[tuple[str, int], Offer] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            gpu, inst = row.get("AcceleratorName") or "", row.get("InstanceType") or ""
            price = _price(row.get("Price"))
            if not gpu or not inst or price is None:
                continue
            key = (gpu, int(float(row.get("AcceleratorCount") or 0)))
            spot = _price(row.get("SpotPrice"))
            old = best.get(key)
            if old is None or price < old.price:
                best[key] = Offer(cloud, gpu, key[1], price, old.spot if old else None, inst,
                                  row.get("Region") or "")
            if spot is not None and (best[key].spot is None or spot < best[key].spot):
                best[key].spot = spot
    return list(best.values())


# ---------------------------------------------------------------------------------------
# The plan: every target × offer


@dataclass
class PlanRow:
    gpu: str
    count: int
    gpu_mem_gib: float
    cloud: str | None = None
    spot: bool = False
    price_per_hour: float | None = None
    instance: str | None = None
    fits: bool = False
    micro_batch: int | None = None
    grad_ckpt: bool | None = None
    strategy: str | None = None
    mem_gib: float | None = None  # estimated peak per GPU (the smallest, when it does not fit)
    tokens_per_s: float | None = None
    hours: float | None = None
    cost: float | None = None
    best: bool = False
    memory: dict[str, Any] | None = None


@dataclass
class PlanResult:
    model: str
    method: str
    adapter: str
    params: int
    trainable_params: int
    arch: dict[str, Any]
    data: dict[str, Any] | None
    rows: list[PlanRow]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    catalogs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Fit:
    est: MemoryEstimate | None  # None: nothing fits
    smallest: MemoryEstimate  # micro_batch 1 with checkpointing, for "needs X GiB"


def plan(recipe: Recipe, gpus: list[str] | str | None = None, *,
         catalog_dir: str | Path | None = None) -> PlanResult:
    """Memory, speed and cost of `recipe` on each GPU (all known ones by default)."""
    arch = arch_for(recipe.model, recipe.base_dir)
    stats = data_stats(recipe)
    offers, sources = load_offers(catalog_dir)
    if recipe.launch.clouds:
        allowed = {c.lower() for c in recipe.launch.clouds}
        offers = [o for o in offers if o.cloud.lower() in allowed]
    spec = gpus or recipe.launch.gpus
    targets = parse_targets(spec, offers)
    rows = [row for gpu, n in targets
            for row in _rows_for(arch, recipe, stats, gpu, n, offers, bool(spec))]
    rows.sort(key=_row_order)
    best = next((r for r in rows if r.fits and r.cost is not None), None)
    if best is not None:
        best.best = True
    result = PlanResult(
        model=recipe.model, method=recipe.method, adapter=_adapter_label(recipe),
        params=arch.n_params(), trainable_params=_trainable(arch, recipe), arch=arch.to_dict(),
        data=stats.to_dict() if stats else None, rows=rows, catalogs=sources)
    if not any(r.fits for r in rows):
        result.suggestions = suggest(arch, recipe, targets, offers, stats)
    result.notes = _notes(recipe, stats, rows, offers)
    return result


def _adapter_label(recipe: Recipe) -> str:
    a = recipe.adapter
    return {"full": "full", "lora": f"lora r={a.r}", "qlora": f"qlora {a.bits}-bit r={a.r}"}[a.type]


def _trainable(arch: Arch, recipe: Recipe) -> int:
    a = recipe.adapter
    return arch.n_params() if a.type == "full" else arch.lora_params(a.r, a.targets)


def _row_order(r: PlanRow) -> tuple[Any, ...]:
    return (not r.fits, r.cost is None, r.cost or 0.0, r.hours or math.inf,
            r.price_per_hour or math.inf, r.gpu, r.count)


def parse_targets(spec: list[str] | str | None, offers: list[Offer]) -> list[tuple[Gpu, int]]:
    """'H100' (every count on offer, and 1) or 'H100:2' -> [(Gpu, count)]."""
    offered = {(o.gpu, o.count) for o in offers}
    if not spec:
        pairs = [(GPUS[g], n) for g in DEFAULT_GPUS for n in DEFAULT_COUNTS if (g, n) in offered]
        return pairs or [(GPUS[g], 1) for g in DEFAULT_GPUS]
    out: list[tuple[Gpu, int]] = []
    for item in [spec] if isinstance(spec, str) else spec:
        name, _, count = item.partition(":")
        gpu = lookup_gpu(name)
        counts = [int(float(count))] if count else [
            n for n in DEFAULT_COUNTS if n == 1 or (gpu.name, n) in offered]
        out += [(gpu, n) for n in counts if (gpu, n) not in out]
    return out


def lookup_gpu(name: str) -> Gpu:
    key = GPU_ALIASES.get(name.strip().upper(), name.strip())
    for g in GPUS.values():
        if g.name.lower() == key.lower():
            return g
    raise SkytuneError(f"GPU {name!r}: unknown; known: {', '.join(GPUS)} "
                       "(add a count as H100:2)")


def gpu_fit(arch: Arch, recipe: Recipe, gpu: Gpu, n: int, seq: int) -> _Fit:
    """Try the strategies that make sense for n GPUs; the first that fits wins."""
    if n == 1:
        strategies = ["single"]
    else:  # full fine-tuning shards (FSDP); LoRA replicates, sharding only when it must
        strategies = {"full": ["fsdp"], "qlora": ["ddp"], "lora": ["ddp", "fsdp"]}[
            recipe.adapter.type]
    for s in strategies:
        est = fit(arch, recipe, gpu.mem_gib * GiB, n_gpus=n, strategy=s, seq=seq)
        if est is not None:
            return _Fit(est, est)
    smallest = estimate_memory(arch, recipe.adapter, recipe.train, 1, seq, True,
                               method=recipe.method, n_gpus=n, strategy=strategies[-1],
                               reference=_needs_reference(recipe))
    return _Fit(None, smallest)


def _rows_for(arch: Arch, recipe: Recipe, stats: DataStats | None, gpu: Gpu, n: int,
              offers: list[Offer], explicit: bool) -> list[PlanRow]:
    seq = memory_seq(recipe, stats)
    f = gpu_fit(arch, recipe, gpu, n, seq)
    base = PlanRow(gpu=gpu.name, count=n, gpu_mem_gib=gpu.mem_gib,
                   mem_gib=round(f.smallest.total_gib, 2), memory=f.smallest.to_dict())
    if f.est is not None:
        secs, tps = train_seconds(arch, recipe, stats, gpu, n, f.est)
        base = replace(base, fits=True, micro_batch=f.est.micro_batch, grad_ckpt=f.est.grad_ckpt,
                       strategy=f.est.strategy, mem_gib=round(f.est.total_gib, 2),
                       memory=f.est.to_dict(), tokens_per_s=round(tps),
                       hours=None if secs is None else round(secs / 3600 + SETUP_MINUTES / 60, 3))
    mine = [o for o in offers if o.gpu == gpu.name and o.count == n]
    rows = []
    for o in sorted(mine, key=lambda o: o.price):
        rows.append(_priced(base, o, o.price, False))
        if o.spot is not None:
            rows.append(_priced(base, o, o.spot, True))
    return rows or ([base] if explicit or not offers else [])


def _priced(base: PlanRow, o: Offer, price: float, spot: bool) -> PlanRow:
    cost = None if base.hours is None or not base.fits else round(base.hours * price, 2)
    return replace(base, cloud=o.cloud, spot=spot, price_per_hour=price, instance=o.instance,
                   cost=cost)


def train_seconds(arch: Arch, recipe: Recipe, stats: DataStats | None, gpu: Gpu, n: int,
                  est: MemoryEstimate) -> tuple[float | None, float]:
    """(seconds of training or None when the data size is unknown, training tokens/s)."""
    t, kind = recipe.train, recipe.adapter.type
    lora = 0 if kind == "full" else arch.lora_params(recipe.adapter.r, recipe.adapter.targets)
    if recipe.method == "grpo":
        seq_avg = (stats.prompt_tokens if stats else 256) + recipe.grpo.max_completion_length
    else:
        seq_avg = stats.seq_tokens if stats else t.max_length
    tps = train_tokens_per_second(arch, gpu, kind, recipe.method, est.micro_batch, int(seq_avg),
                                  est.grad_ckpt, n, est.strategy, lora)
    per_step = est.micro_batch * t.grad_accum * n  # sequences (GRPO: completions) per step
    if t.max_steps:
        seqs = t.max_steps * per_step * (2 if recipe.method == "dpo" else 1)
    elif stats is not None:
        per_row = recipe.grpo.num_generations if recipe.method == "grpo" else stats.seqs_per_row
        seqs = stats.rows * t.epochs * per_row
    else:
        return None, tps
    secs = seqs * seq_avg / tps
    if recipe.method == "grpo":  # every completion is generated before it is trained on
        gen = generation_seconds_per_token(arch, gpu, est.parts["weights"],
                                           est.micro_batch * t.grad_accum)
        secs += seqs * recipe.grpo.max_completion_length * gen / n
    return secs, tps


# ---------------------------------------------------------------------------------------
# When nothing fits: compute which change would


def suggest(arch: Arch, recipe: Recipe, targets: list[tuple[Gpu, int]], offers: list[Offer],
            stats: DataStats | None) -> list[dict[str, Any]]:
    """Changes that make the recipe fit, each with the cheapest place it fits; best first.

    Tried in order: a lighter adapter, a shorter max_length, a smaller rank, more GPUs of
    the same kind, a larger GPU; then QLoRA with a shorter max_length together.
    """
    gpus = list(dict.fromkeys(g for g, _ in targets))
    out = []
    for sets in _recipe_changes(recipe):
        found = _cheapest_fit(arch, _changed(recipe, sets), gpus, [n for _, n in targets],
                              offers, stats)
        if found:
            out.append({"change": " ".join(f"--set {s}" for s in sets), **found})
    out += _more_gpus(arch, recipe, gpus, offers, stats)
    if not out:
        for ml in _halvings(recipe.train.max_length, 256):
            sets = ["adapter.type=qlora", f"train.max_length={ml}"]
            found = _cheapest_fit(arch, _changed(recipe, sets), gpus, DEFAULT_COUNTS, offers,
                                  stats)
            if found:
                out.append({"change": " ".join(f"--set {s}" for s in sets), **found})
                break
    return _first_per_knob(out)


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def _recipe_changes(recipe: Recipe) -> list[list[str]]:
    a, changes = recipe.adapter, []
    if a.type == "full":
        changes.append(["adapter.type=lora"])
    if a.type != "qlora" or a.bits == 8:
        changes.append(["adapter.type=qlora", "adapter.bits=4"])
    changes += [[f"train.max_length={ml}"] for ml in _halvings(recipe.train.max_length, 256)]
    if a.type != "full":
        changes += [[f"adapter.r={r}"] for r in _halvings(a.r, 4)]
    return changes


def _first_per_knob(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the mildest change per knob: max_length=1024 fitting makes 512 noise."""
    seen, out = set(), []
    for s in found:
        knob = s["change"].split("=")[0]
        if knob not in seen:
            seen.add(knob)
            out.append(s)
    return out


def _changed(recipe: Recipe, sets: list[str]) -> Recipe:
    from skytune.recipe import apply_overrides, recipe_from_dict

    return recipe_from_dict(apply_overrides(recipe.to_dict(), sets), base_dir=recipe.base_dir)


def _cheapest_fit(arch: Arch, recipe: Recipe, gpus: list[Gpu], counts: Any,
                  offers: list[Offer], stats: DataStats | None) -> dict[str, Any] | None:
    seq = memory_seq(recipe, stats)
    price = {(o.gpu, o.count): min(o.price, o.spot or o.price) for o in offers}
    options = []
    for gpu in gpus:
        for n in sorted(set(counts)):
            f = gpu_fit(arch, recipe, gpu, n, seq)
            if f.est is not None:
                p = price.get((gpu.name, n))
                options.append((p is None, p or gpu.mem_gib * n, gpu, n, f.est))
    if not options:
        return None
    _, _, gpu, n, est = min(options, key=lambda o: o[:2])
    return {"gpu": f"{gpu.name}:{n}", "micro_batch": est.micro_batch,
            "grad_ckpt": est.grad_ckpt, "mem_gib": round(est.total_gib, 2),
            "price_per_hour": price.get((gpu.name, n))}


def _more_gpus(arch: Arch, recipe: Recipe, gpus: list[Gpu], offers: list[Offer],
               stats: DataStats | None) -> list[dict[str, Any]]:
    """More of the same GPU, else any larger GPU, keeping the recipe as it is."""
    found = _cheapest_fit(arch, recipe, gpus, DEFAULT_COUNTS, offers, stats)
    if found is None:
        bigger = [g for g in GPUS.values() if g not in gpus and g.bf16]
        found = _cheapest_fit(arch, recipe, bigger, DEFAULT_COUNTS, offers, stats)
    return [{"change": f"--gpu {found['gpu']}", **found}] if found else []


def _notes(recipe: Recipe, stats: DataStats | None, rows: list[PlanRow],
           offers: list[Offer]) -> list[str]:
    notes = []
    if stats is None and not recipe.train.max_steps:
        notes.append(f"{recipe.data.train} is not a local file: hours and $ need its size; "
                     "set train.max_steps or plan with a local copy")
    elif stats is not None:
        notes.append(f"tokens counted by {stats.counted_by}")
    if not offers:
        notes.append("no price catalog found: run any `sky` command once, or set "
                     "SKYTUNE_CATALOG_DIR")
    elif not any(o.spot for o in offers):
        notes.append("no spot prices in these catalogs (vast and lambda list none)")
    notes.append(f"hours include {SETUP_MINUTES} min of setup; throughput uses MFU "
                 f"{MFU[recipe.adapter.type]} (calibrate with bench/calibrate.py)")
    if recipe.method == "grpo":
        notes.append("GRPO time assumes every completion runs to max_completion_length")
    return notes


# ---------------------------------------------------------------------------------------
# Text output

MAX_ROWS_SHOWN = 20


def render(result: PlanResult) -> str:
    """The table `skytune plan` prints: cheapest feasible first, '*' marks the cheapest."""
    lines = [_header(result), "",
             (f"  {'GPU':<15} {'cloud':<9} {'$/h':>6}  {'fits':<4} {'mb':>3} {'ckpt':<4} "
              f"{'GiB/GPU':>13} {'tok/s':>7} {'hours':>7} {'est. $':>8}")]
    for r in result.rows[:MAX_ROWS_SHOWN]:
        lines.append(_line(r))
    if len(result.rows) > MAX_ROWS_SHOWN:
        lines.append(f"  ... {len(result.rows) - MAX_ROWS_SHOWN} more rows (--json shows all)")
    if result.suggestions:
        lines += ["", "Fits nowhere as written. Changes that fit:"]
        for s in result.suggestions:
            price = f", ${s['price_per_hour']:.2f}/h" if s["price_per_hour"] else ""
            lines.append(f"  {s['change']:<46} -> {s['gpu']} (micro_batch {s['micro_batch']}, "
                         f"{'ckpt, ' if s['grad_ckpt'] else ''}~{s['mem_gib']:.0f} GiB{price})")
    lines += [""] + [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _header(r: PlanResult) -> str:
    head = (f"{r.model}: {r.params / 1e9:.2f}B params, {r.method}, {r.adapter} "
            f"({_count(r.trainable_params)} trainable)")
    if r.data:
        d = r.data
        head += (f"; data: {d['rows']:,} rows × {d['seqs_per_row']} seq, "
                 f"~{d['seq_tokens']:.0f} tokens each")
    return head


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"



def _line(r: PlanRow) -> str:
    name = f"{'*' if r.best else ' '} {r.gpu}:{r.count}"
    cloud = (r.cloud or "-") + (" spot" if r.spot else "")
    price = f"{r.price_per_hour:.2f}" if r.price_per_hour is not None else "-"
    mem = f"{r.mem_gib:.1f}/{r.gpu_mem_gib:.0f}"
    if not r.fits:
        return f"{name:<17} {cloud:<9} {price:>6}  {'no':<4} {'':>3} {'':<4} {mem:>13}"
    hours = f"{r.hours:.2f}" if r.hours is not None else "?"
    cost = f"{r.cost:.2f}" if r.cost is not None else "?"
    return (f"{name:<17} {cloud:<9} {price:>6}  {'yes':<4} {r.micro_batch:>3} "
            f"{'on' if r.grad_ckpt else 'off':<4} {mem:>13} {_count(r.tokens_per_s or 0):>7} "
            f"{hours:>7} {cost:>8}")
