"""Merge a LoRA adapter into its full-precision base, shard by shard, and verify the result.

    skytune merge s3://bucket/skytune/demo-1a2b3c4d          # -> <run>/merged/ (COMPLETE last)
    skytune merge models/demo/adapter --out models/demo-merged --no-upload --dtype fp32

    from skytune.merge import merge
    merge("file://runs/demo-1a2b3c4d", out=Path("merged"), dtype="bf16")

Why it is done this way (seed 001: a run lost to merging LoRA into a 4-bit base):
- The base is always the full-precision checkpoint. A base whose config.json carries a
  `quantization_config` (unsloth/...-bnb-4bit) is refused: its weights are not the ones
  W' = W + scale * B @ A needs.
- The merge streams the base's safetensors tensor by tensor (safetensors.safe_open) and writes
  output shards of at most `max_shard_bytes`, so peak memory is about one output shard plus
  the adapter: an 8B model merges on a machine with less RAM than the fp32 model. Each delta
  is computed in fp32 (on the GPU when there is one) and only the sum is cast to the dtype.
- Verification (on by default) compares logits of base + adapter (unmerged, PEFT) with the
  merged model on fixed prompts. The two models are loaded one after the other, never
  together, so it needs memory for one model in the compute dtype (fp32 when it fits on the
  GPU or in RAM, else the target dtype with looser tolerances). A mismatch raises before
  anything is uploaded: no COMPLETE marker, so `pull --what merged` never sees a bad model.
- QLoRA adapters were trained against NF4-round-tripped base weights. `qlora_base="nf4"`
  merges into dequantize(quantize_nf4(W)) (bitsandbytes, GPU) — what the adapter saw; the
  default "auto" picks it when bitsandbytes and a GPU are present (chosen by measurement: its
  logits match the trained, unmerged QLoRA model far more closely than the original weights'
  do: mean KL 4.7e-4 vs 0.15 on a random 1.14B Llama, H200, tests/gpu/test_merge_gpu.py,
  bench/results/merge_gpu_h200_*.json), else the original weights, with a note in the card.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skytune import __version__
from skytune.errors import SkytuneError

log = logging.getLogger("skytune")

DTYPES = ("bf16", "fp16", "fp32")
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Verification tolerances, by the merged model's storage dtype, for logits computed in fp32.
# The only legitimate difference between merged and unmerged is rounding W + dW once to the
# storage dtype: fp32 leaves only summation-order noise; bf16 (8 mantissa bits, relative
# error <= 2^-9 per weight) and fp16 (11 bits) perturb every weight like re-saving the base
# in that dtype would. Merging into NF4-quantized weights (seed 001) perturbs each weight by
# ~5-10% of its magnitude: KL one to several orders of magnitude above these limits.
# max_abs is relative to the reference logits' standard deviation (logit scales differ).
# Measured (random LoRA on tiny:llama / tiny:llama-h512-l4, fp32 logits): a correct bf16
# merge gives max|d|/std <= 0.09, KL <= 1.5e-4; the NF4 mistake >= 1.19 and >= 7e-3.
TOLERANCES = {  # dtype: (max |dlogit| / std(logits), mean KL)
    "fp32": (1e-3, 1e-6),
    "bf16": (0.25, 1e-3),
    "fp16": (0.08, 2.5e-4),
}
HALF_COMPUTE_FACTOR = 4.0  # when memory forces half-precision logits: both sides carry noise

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is two plus three? Answer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paris is the capital of France. Water boils at",
]


# ---------------------------------------------------------------------------------------
# Inputs: the adapter and its base


@dataclass
class LoraWeights:
    """What the adapter changes, keyed by the base checkpoint's tensor names."""

    deltas: dict[str, tuple[Any, Any, float, str]] = field(default_factory=dict)  # A, B, scale, kind
    replace: dict[str, Any] = field(default_factory=dict)  # modules_to_save: whole tensors
    nonzero: bool = False  # at least one lora_B is nonzero (else the merge is a no-op)


def locate_adapter(spec: str, work: Path) -> tuple[Path, Any, str | None]:
    """(adapter dir, store or None, run id or None) for a local adapter dir or a run URL."""
    p = Path(spec).expanduser()
    if "://" not in spec and (p / "adapter_config.json").is_file():
        return p.resolve(), None, None
    if "://" not in spec and (p / "adapter" / "adapter_config.json").is_file():
        return (p / "adapter").resolve(), None, None
    if "://" not in spec and not p.exists():
        raise SkytuneError(f"{spec}: no such adapter directory or run; pass a run URL "
                           "(s3://bucket/skytune/RUN_ID) or a dir with adapter_config.json")
    from skytune.sync import fetch_run_artifact, split_run_url

    store, rid = split_run_url(spec)
    got = fetch_run_artifact(store, rid, ["adapter"], work)
    if got is None:
        raise SkytuneError(f"{store.url}/{rid}/adapter: no complete adapter in this run (a full "
                           "fine-tune has merged/ already; `skytune runs` lists artifacts)")
    return got[1], store, rid


def read_adapter_meta(adapter_dir: Path) -> tuple[dict, dict]:
    """(adapter_config.json, skytune.json or {})."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise SkytuneError(f"{adapter_dir}: no adapter_config.json; not a PEFT adapter")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SkytuneError(f"{cfg_path}: peft_type {cfg.get('peft_type')}: only LoRA adapters "
                           "merge (skytune trains lora/qlora)")
    if cfg.get("use_dora"):
        raise SkytuneError(f"{cfg_path}: use_dora: DoRA merges need the column norms of the "
                           "full weight; not supported by the streaming merge")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise SkytuneError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters "
                           "merge; re-save with save_pretrained(safe_serialization=True))")
    meta_path = adapter_dir / "skytune.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return cfg, meta


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def load_lora(adapter_dir: Path, cfg: dict) -> LoraWeights:
    """Group the adapter's tensors by module; scale = alpha / r (alpha / sqrt(r) for rsLoRA)."""
    from safetensors.torch import load_file

    sd = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    prefix = "base_model.model."
    mods: dict[str, dict[str, Any]] = {}
    out = LoraWeights()
    for key, t in sd.items():
        k = key.removeprefix(prefix)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)",
                         k)
        if m:
            mod, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            mods.setdefault(mod, {})[part] = t
        elif ".lora_" in k or "lora_magnitude_vector" in k:
            raise SkytuneError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key}: unsupported LoRA "
                               "variant (lora_bias/DoRA); merge it with PEFT instead")
        else:  # modules_to_save / resized embeddings: whole tensors that replace the base's
            out.replace[k] = t
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for mod, parts in mods.items():
        emb = "lora_embedding_A" in parts
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if emb else \
            (parts.get("lora_A"), parts.get("lora_B"))
        if a is None or b is None:
            raise SkytuneError(f"{adapter_dir / ADAPTER_WEIGHTS}: {mod} has only one of lora_A/"
                               "lora_B; the adapter file is truncated")
        r = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), mod, cfg.get("lora_alpha", r))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        kind = "embedding" if emb else ("conv1d" if fan_in_fan_out else "linear")
        out.deltas[f"{mod}.weight"] = (a, b, float(scale), kind)
        out.nonzero = out.nonzero or bool(b.abs().max() > 0)
    return out


def guess_full_precision(name: str) -> str | None:
    """'unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit' -> 'unsloth/meta-llama-3.1-8b-instruct'."""
    stripped = re.sub(r"(-unsloth)?-bnb-(4|8)bit$|-(4|8)bit$|-(awq|gptq|AWQ|GPTQ)(-int4)?$", "",
                      name)
    return stripped if stripped != name else None


def check_full_precision(config: dict, name: str) -> None:
    q = config.get("quantization_config")
    if not q:
        return
    guess = guess_full_precision(name)
    method = q.get("quant_method") or ("bitsandbytes" if "load_in_4bit" in q else "quantized")
    raise SkytuneError(
        f"base {name}: config.json has quantization_config ({method}); merging LoRA into "
        "quantized weights corrupts the model. Pass the full-precision base: --base "
        + (guess if guess else "ORG/MODEL (the original, unquantized checkpoint)")
    )


def resolve_base(name: str) -> Path:
    """A local directory with config.json and *.safetensors for `name` (tiny:*, path, hub id).
    A hub id's config is checked for quantization before any weights download."""
    if name.startswith("tiny:"):
        from skytune.tiny import resolve

        return Path(resolve(name))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SkytuneError(f"base {name}: no config.json in that directory")
        check_full_precision(json.loads((p / "config.json").read_text()), name)
        return p.resolve()
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        cfg_file = hf_hub_download(name, "config.json")
        check_full_precision(json.loads(Path(cfg_file).read_text()), name)
        return Path(snapshot_download(name, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja",
            "*.txt"]))
    except SkytuneError:
        raise
    except Exception as e:  # noqa: BLE001 - gated, missing, offline: one line for the user
        raise SkytuneError(f"base {name}: cannot download from the Hub "
                           f"({str(e).splitlines()[0][:160]}); check the id, HF_TOKEN for "
                           "gated models, or pass --base LOCAL_DIR") from None


def base_shards(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / f for f in files]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise SkytuneError(f"base {base_dir}: no model.safetensors(.index.json); only safetensors "
                       "checkpoints stream. Re-save the base with save_pretrained()")


# ---------------------------------------------------------------------------------------
# The streaming merge


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SkytuneError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def compute_device(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def merged_tensor(w, delta: tuple | None, device: str, roundtrip: Callable | None = None):
    """W' = W + scale * B @ A in fp32 (optionally W := roundtrip(W) first); fp32 result."""
    import torch

    w32 = w.to(device=device, dtype=torch.float32)
    if roundtrip is not None:
        w32 = roundtrip(w32)
    if delta is not None:
        a, b, scale, kind = delta
        ba = b.to(device, torch.float32) @ a.to(device, torch.float32)
        if kind == "embedding" or kind == "conv1d":  # lora_embedding_A: (r, vocab), B: (dim, r) -> (vocab, dim)
            ba = ba.T
        if ba.shape != w32.shape:
            raise SkytuneError(f"LoRA delta shape {tuple(ba.shape)} does not match the base "
                               f"weight {tuple(w32.shape)}: the adapter was trained on another "
                               "base; pass the right one with --base")
        w32.add_(ba, alpha=scale)
    return w32


def stream_merge(base_dir: Path, lora: LoraWeights, out_dir: Path, dtype: str = "bf16", *,
                 device: str | None = None, roundtrip: Callable | None = None,
                 roundtrip_names: set[str] | frozenset = frozenset(),
                 max_shard_bytes: int = 2 << 30, progress: Callable[[int], None] | None = None,
                 ) -> dict[str, Any]:
    """Write the merged weights of base_dir + lora into out_dir as safetensors shards.
    Reads one tensor at a time; holds at most one output shard in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target, device = torch_dtype(dtype), compute_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = dict(lora.deltas)
    replaced = set()
    shard: dict[str, Any] = {}
    shard_bytes, parts, weight_map, total = 0, [], {}, 0
    merged = roundtripped = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(parts):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            parts.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for f in base_shards(base_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open handle, not a dict
                t = sf.get_tensor(name)
                nbytes = t.numel() * t.element_size()
                if name in lora.replace:
                    t, _ = lora.replace[name], replaced.add(name)
                elif name in pending or name in roundtrip_names:
                    rt = roundtrip if name in roundtrip_names else None
                    t = merged_tensor(t, pending.pop(name, None), device, rt)
                    merged += name in lora.deltas
                    roundtripped += rt is not None
                if t.is_floating_point():
                    t = t.to(device="cpu", dtype=target)
                shard[name] = t.contiguous()
                shard_bytes += t.numel() * t.element_size()
                total += t.numel() * t.element_size()
                if shard_bytes >= max_shard_bytes:
                    flush()
                if progress:
                    progress(nbytes)
    flush()
    missing = sorted(pending) + sorted(set(lora.replace) - replaced)
    if missing:
        raise SkytuneError(f"adapter changes {len(missing)} weight(s) the base does not have "
                           f"(first: {missing[0]}); it was trained on another base — pass it "
                           "with --base")
    n = len(parts)
    for i, (tmp, names) in enumerate(parts):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / tmp, out_dir / final)
        weight_map.update({k: final for k in names})
    if n > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
    return {"tensors_merged": merged, "tensors_roundtripped": roundtripped,
            "tensors_replaced": len(replaced), "shards": n, "bytes": total}


# ---------------------------------------------------------------------------------------
# QLoRA: the NF4 round trip


def nf4_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def nf4_roundtrip_fn(compute: str = "bf16") -> Callable:
    """dequantize(quantize(W)) exactly as QLoRA training saw W: the base loaded in the compute
    dtype, NF4, blocksize 64, double quantization (train/common.quantization_config)."""
    import bitsandbytes.functional as bnbf
    import torch

    half = torch_dtype(compute)

    def rt(w32):
        w = w32.to("cuda", half)
        q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).to(torch.float32).to(w32.device)

    return rt


def quantized_weight_names(base_dir: Path) -> set[str]:
    """Weights bitsandbytes quantizes when loading this base: every nn.Linear's weight but
    the modules transformers keeps in full precision (lm_head, tied outputs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    cfg = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    skip = get_keys_to_not_convert(model) or []
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)}


def qlora_plan(meta: dict, choice: str) -> tuple[str | None, str | None]:
    """(base to merge into: 'nf4' | 'original' | None when not qlora, note for the card)."""
    if meta.get("adapter_type") != "qlora":
        return None, None
    bits = ((meta.get("recipe") or {}).get("adapter") or {}).get("bits", 4)
    if choice not in ("auto", "nf4", "original"):
        raise SkytuneError(f"--qlora-base {choice}: expected auto, nf4 or original")
    if bits == 8:
        return "original", "QLoRA with 8-bit (LLM.int8) base: merged into the original weights"
    if choice == "original":
        return "original", "QLoRA adapter merged into the original (unquantized) base weights"
    if nf4_available():
        return "nf4", ("QLoRA adapter merged into the NF4-round-tripped base (the weights it "
                       "was trained against)")
    if choice == "nf4":
        raise SkytuneError("--qlora-base nf4 needs a CUDA GPU and bitsandbytes; run the merge "
                           "on a GPU machine or use --qlora-base original")
    return "original", ("QLoRA adapter merged into the original base weights: the NF4 round "
                        "trip needs a CUDA GPU + bitsandbytes (not available where this ran)")


# ---------------------------------------------------------------------------------------
# Verification


def _available_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def pick_verify_setup(n_params: int, dtype: str, device: str | None = None) -> tuple[str, str]:
    """(device, compute dtype) for verification: fp32 where one fp32 model fits, else dtype."""
    device = compute_device(device)
    for dev in ([device, "cpu"] if device != "cpu" else ["cpu"]):
        free = _available_bytes(dev)
        if n_params * 4 * 1.15 < free:
            return dev, "fp32"
        if n_params * torch_dtype(dtype).itemsize * 1.15 < free:
            return dev, dtype
    return "cpu", dtype


def prompt_ids(tokenizer, max_tokens: int = 48) -> list[list[int]]:
    out = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            out.append(ids)
    if not out:
        raise SkytuneError("verification: the tokenizer produced no tokens for the prompts")
    return out


def model_logits(model_dir: Path, prompts: list[list[int]], compute: str, device: str, *,
                 adapter_dir: Path | None = None, roundtrip: Callable | None = None,
                 roundtrip_names: set[str] | frozenset = frozenset()) -> list[Any]:
    """Logits (fp32, CPU) of one model on the prompts; the model is freed before returning."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(compute)}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if roundtrip is not None:  # QLoRA nf4: the reference sees the same round-tripped base
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in roundtrip_names:
                    p.copy_(roundtrip(p.detach().float()).to(p.dtype))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def compare_logits(ref: list[Any], got: list[Any]) -> dict[str, float]:
    """max |Δ|, max |Δ| / std(ref), mean over positions of KL(softmax ref || softmax got),
    and the fraction of positions whose argmax agrees."""
    import torch

    r, g = torch.cat(ref), torch.cat(got)
    lr, lg = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
    kl = (lr.exp() * (lr - lg)).sum(-1)
    max_abs = float((r - g).abs().max())
    return {"max_abs": max_abs, "max_abs_rel": max_abs / max(float(r.std()), 1e-6),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agree": float((r.argmax(-1) == g.argmax(-1)).float().mean()),
            "positions": int(r.shape[0])}


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str, *,
           device: str | None = None, roundtrip: Callable | None = None,
           roundtrip_names: set[str] | frozenset = frozenset(),
           n_params: int | None = None) -> dict[str, Any]:
    """Compare unmerged (base + adapter via PEFT) and merged logits; 'passed' says if they agree
    within TOLERANCES[dtype]. Loads the two models one after the other (peak: one model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    prompts = prompt_ids(tok)
    n_params = n_params or _param_count(merged_dir)
    dev, compute = pick_verify_setup(n_params, dtype, device)
    t0 = time.monotonic()
    ref = model_logits(base_dir, prompts, compute, dev, adapter_dir=adapter_dir,
                       roundtrip=roundtrip, roundtrip_names=roundtrip_names)
    got = model_logits(merged_dir, prompts, compute, dev)
    stats = compare_logits(ref, got)
    tol_rel, tol_kl = TOLERANCES[dtype]
    if compute != "fp32":
        tol_rel, tol_kl = tol_rel * HALF_COMPUTE_FACTOR, tol_kl * HALF_COMPUTE_FACTOR
    passed = stats["max_abs_rel"] <= tol_rel and stats["kl_mean"] <= tol_kl
    return {**stats, "tol_max_abs_rel": tol_rel, "tol_kl": tol_kl,
            "tol_max_abs": tol_rel * stats["max_abs"] / max(stats["max_abs_rel"], 1e-12),
            "passed": passed, "prompts": len(prompts), "compute_dtype": compute, "device": dev,
            "seconds": round(time.monotonic() - t0, 2)}


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in base_shards(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                n += _numel(sf.get_slice(k).get_shape())
    return n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------
# Around the weights: config, tokenizer, generation config, card


def write_companions(base_dir: Path, adapter_dir: Path, out: Path, dtype: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    cfg = json.loads((base_dir / "config.json").read_text())
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    else:
        from transformers import AutoConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(base_dir))) \
            .save_pretrained(str(out))


def _run_metrics(store, rid: str | None) -> dict[str, Any]:
    from skytune.modelcard import final_metrics, parse_metrics

    if store is None or rid is None:
        return {}
    raw = store.get_bytes(f"{rid}/metrics.jsonl")
    return final_metrics(parse_metrics(raw.decode())) if raw else {}


# ---------------------------------------------------------------------------------------
# The command


def merge(run_or_adapter: str, out: Path | None = None, base: str | None = None,
          dtype: str = "bf16", verify: bool = True, upload: bool = True, *,
          qlora_base: str = "auto", device: str | None = None, push: str | None = None,
          private: bool | None = None, max_shard_bytes: int = 2 << 30,
          _writer=None, _metrics: dict | None = None) -> dict[str, Any]:
    """Merge, verify, save to `out` (default: a temp dir), upload to <run>/merged, push.
    Returns a summary dict (what `skytune merge` prints)."""
    torch_dtype(dtype)  # fail on a bad --dtype before any download
    verify_flag = verify
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="skytune-merge-") as tmp:
        work = Path(tmp)
        adapter_dir, store, rid = locate_adapter(run_or_adapter, work)
        if store is None and out is None and _writer is None and not push:
            raise SkytuneError(f"{run_or_adapter}: a local adapter merges into --out DIR "
                               "(there is no run to upload merged/ to)")
        cfg, meta = read_adapter_meta(adapter_dir)
        base_name = base or meta.get("base_model") or cfg.get("base_model_name_or_path")
        if not base_name:
            raise SkytuneError(f"{adapter_dir}: the adapter does not name its base model; "
                               "pass --base ORG/MODEL")
        base_dir = resolve_base(base_name)
        lora = load_lora(adapter_dir, cfg)
        mode, note = qlora_plan(meta, qlora_base)
        rt, rt_names = None, frozenset()
        if mode == "nf4":
            rt, rt_names = nf4_roundtrip_fn(), quantized_weight_names(base_dir)
        # Write into a sibling temp dir, rename at the end: an interrupted merge leaves no
        # half-written model at `out`, and nothing is uploaded before verification passed.
        final = Path(out) if out else work / "merged"
        if final.is_dir() and any(final.iterdir()) and not (final / "skytune.json").is_file():
            raise SkytuneError(f"--out {final}: exists and is not a skytune model; pick an "
                               "empty or new directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=final.parent))
        try:
            from skytune.progress import bytes_bar

            with bytes_bar(f"merge {base_name} ({dtype})") as bar:
                bar.total(sum(f.stat().st_size for f in base_shards(base_dir)))
                stats = stream_merge(base_dir, lora, stage, dtype, device=device, roundtrip=rt,
                                     roundtrip_names=rt_names, max_shard_bytes=max_shard_bytes,
                                     progress=bar.update)
            write_companions(base_dir, adapter_dir, stage, dtype)
            report = None
            if verify_flag:
                report = verify_merge(base_dir, adapter_dir, stage, dtype, device=device,
                                      roundtrip=rt, roundtrip_names=rt_names)
                if not report["passed"]:
                    raise SkytuneError(
                        f"merge verification failed: merged vs unmerged logits differ (mean KL "
                        f"{report['kl_mean']:.3g} > {report['tol_kl']:.3g} or max |Δ|/std "
                        f"{report['max_abs_rel']:.3g} > {report['tol_max_abs_rel']:.3g}); "
                        "nothing was uploaded. Is the base the full-precision model the "
                        "adapter was trained on? (--base)")
            card_meta = {**meta, "dtype": dtype, "qlora_base": mode, "base_model": base_name,
                         "skytune_version": __version__}
            notes = [note] if note else []
            if not lora.nonzero:
                notes.append("every lora_B is zero: the adapter is a no-op (untrained?)")
            from skytune.modelcard import model_card

            recipe_yaml = (adapter_dir / "recipe.yaml").read_text() \
                if (adapter_dir / "recipe.yaml").is_file() else None
            metrics = _metrics if _metrics is not None else _run_metrics(store, rid)
            (stage / "README.md").write_text(model_card(
                card_meta, recipe_yaml=recipe_yaml, metrics=metrics, verification=report,
                notes=notes))
            (stage / "skytune.json").write_text(json.dumps({
                **{k: v for k, v in meta.items() if k != "kind"}, "kind": "merged",
                "base_model": base_name, "dtype": dtype, "qlora_base": mode,
                "verification": report, "merge": stats, "skytune_version": __version__},
                indent=1))
            if recipe_yaml:
                (stage / "recipe.yaml").write_text(recipe_yaml)
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        result: dict[str, Any] = {
            "base": base_name, "adapter": str(adapter_dir) if store is None else
            f"{store.url}/{rid}/adapter", "dtype": dtype, "qlora_base": mode, **stats,
            "verification": report, "notes": notes,
            "out": str(final) if out else None, "seconds": round(time.monotonic() - t0, 1)}
        if upload and (store is not None or _writer is not None):
            result["uploaded"] = _upload(final, store, rid, meta, _writer)
        recipe = meta.get("recipe") or {}
        target = push or ((recipe.get("output") or {}).get("push") if upload else None)
        if target:
            priv = private if private is not None else (recipe.get("output") or {}).get(
                "private", True)
            result["pushed"] = push_to_hub(final, target, private=priv)
        if not out:
            result["out"] = None  # the temp dir is gone; the model lives in the store
        return result


def _upload(local: Path, store, rid: str | None, meta: dict, writer=None) -> str:
    from skytune.progress import bytes_bar
    from skytune.store import describe_dir

    files = describe_dir(local)
    m = {k: v for k, v in meta.items() if k != "recipe"} | {"kind": "merged"}
    with bytes_bar("upload merged") as bar:
        bar.total(sum(f["size"] for f in files.values()))
        if writer is not None:  # training process: record it in the manifest as well
            writer.upload_artifact(local, "merged", m)
            return f"{writer.url}/merged"
        from skytune.store import upload_artifact

        upload_artifact(store, local, f"{rid}/merged", meta=m, progress=bar.update, files=files)
    return f"{store.url}/{rid}/merged"


# ---------------------------------------------------------------------------------------
# Hub push and the training-machine hook


def push_target(url: str) -> str:
    """'hf://org/name' -> 'org/name' (a model repo; no subfolders, no datasets)."""
    if not url.startswith("hf://"):
        raise SkytuneError(f"output.push {url!r}: expected hf://ORG/NAME")
    parts = [p for p in url[len("hf://"):].strip("/").split("/") if p]
    if len(parts) != 2 or parts[0] in ("datasets", "spaces") or any(
            not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
        raise SkytuneError(f"output.push {url!r}: expected hf://ORG/NAME (a model repo)")
    return "/".join(parts)


PUSH_IGNORE = ["COMPLETE", "skytune-artifact.json", "*.part", ".merge-*"]


def push_to_hub(local: Path, url: str, private: bool = True, api=None) -> str:
    """Upload a model (or adapter) dir to a Hub model repo, created private by default.
    Idempotent: create_repo(exist_ok) and upload_folder skips files whose hash is unchanged.
    The token is HF_TOKEN (read by huggingface_hub itself; it never passes through here)."""
    repo_id = push_target(url)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(local),
                          commit_message="skytune: upload model", ignore_patterns=PUSH_IGNORE)
    except SkytuneError:
        raise
    except Exception as e:  # noqa: BLE001 - auth, network: one line without the token
        raise SkytuneError(f"push to hf://{repo_id} failed: {str(e).splitlines()[0][:200]}; "
                           "set HF_TOKEN to a token with write access") from None
    return f"https://huggingface.co/{repo_id}"


def after_training(recipe, writer, final: Path) -> dict[str, Any]:
    """Called at the end of Session.train: output.merge -> <run>/merged (COMPLETE last);
    output.push -> the merged model, else the final artifact (adapter or full model)."""
    out: dict[str, Any] = {}
    metrics = {}
    try:
        from skytune.modelcard import final_metrics, parse_metrics

        raw = writer.store.get_bytes(writer.key("metrics.jsonl"))
        metrics = final_metrics(parse_metrics(raw.decode())) if raw else {}
    except Exception as e:  # noqa: BLE001 - a card without metrics is still a card
        log.warning("model card: no metrics (%s)", e)
    lora = recipe.adapter.type in ("lora", "qlora")
    meta_path = final / "skytune.json"
    if meta_path.is_file():  # the card's data hash: the local training files, when local
        from skytune.modelcard import data_hash

        meta = json.loads(meta_path.read_text())
        paths = [recipe.path(p) for p in (recipe.data.train, recipe.data.eval) if p]
        meta["data_hash"] = data_hash(paths)
        meta_path.write_text(json.dumps(meta, indent=1))
    if recipe.output.merge and lora:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        res = merge(str(final), dtype=recipe.output.merge_dtype, verify=True, upload=True,
                    _writer=writer, _metrics=metrics)
        out["merged"] = res.get("uploaded")
        out["merge_verification"] = res.get("verification")
        out["pushed"] = res.get("pushed")
        return out
    if recipe.output.push:
        from skytune.modelcard import model_card

        meta = json.loads((final / "skytune.json").read_text()) \
            if (final / "skytune.json").is_file() else {}
        kind = "merged" if recipe.adapter.type == "full" else "adapter"
        (final / "README.md").write_text(model_card(
            meta, recipe_yaml=recipe.to_yaml(), metrics=metrics, kind=kind))
        out["pushed"] = push_to_hub(final, recipe.output.push, private=recipe.output.private)
    return out
