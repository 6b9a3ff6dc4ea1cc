"""Do packed rows train exactly like the same samples one by one? (issue: throughput, item 2)

    report = sft_equality("tiny:llama-h256-l2", device="cpu")      # CI, fp32
    report = sft_equality("tiny:llama-h512-l4", device="cuda")     # GPU, bf16, varlen kernel
    report["loss_rel"], report["grad_rel"]                          # relative differences

The packed side is what training runs: TRL's best-fit packer and padding-free collator, the
model with attention "skytune_varlen". The reference is each sample alone through SDPA. Both
sum token losses over the same tokens, so loss and every LoRA gradient must agree up to
rounding. `dpo_equality` does the same for the padded chosen/rejected batch that
fast.padding_free_backbone unpads.
"""

from __future__ import annotations

from typing import Any


def _model(name: str, device: str, attention: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from skytune.train import fast
    from skytune.train.common import resolve_model

    fast.register_attention()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype,
                                                attn_implementation=attention).to(device)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                     init_lora_weights=False)  # non-zero B: gradients reach both A and B
    torch.manual_seed(1)
    return get_peft_model(base, cfg)


def _samples(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 60))] for _ in range(n)]


def _grads(model) -> dict[str, Any]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def sft_equality(name: str = "tiny:llama-h256-l2", device: str = "cpu", n: int = 12,
                 max_length: int = 128) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from skytune.train.fast import VARLEN

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    packed_model = _model(name, device, VARLEN, dtype)
    ref_model = _model(name, device, "sdpa", dtype)
    vocab = packed_model.config.vocab_size
    samples = _samples(n, vocab)

    # Reference: each sample alone; sum of its token losses (first token has no target).
    total = sum(len(s) - 1 for s in samples)
    ref_loss = 0.0
    for s in samples:
        ids = torch.tensor([s], device=device)
        out = ref_model(input_ids=ids, labels=ids)
        loss = out.loss * (len(s) - 1) / total
        loss.backward()
        ref_loss += float(loss)

    # Packed: TRL's BFD packing into max_length bins, its padding-free collator (one row,
    # position_ids restarting per sample, cu_seq_lens), labels masked at sample starts.
    ds = pack_dataset(Dataset.from_dict({"input_ids": samples}), max_length, strategy="bfd")
    rows = list(ds)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]}
                     for r in rows])
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    out = packed_model(**batch)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    out.loss.backward()
    packed_loss = float(out.loss)
    ref, got = _grads(ref_model), _grads(packed_model)
    worst = max(_rel(got[k], ref[k]) for k in ref)
    return {"device": device, "dtype": str(dtype), "samples": n, "rows": len(rows),
            "tokens": int(batch["input_ids"].numel()), "targets": n_targets,
            "expected_targets": total, "loss_packed": packed_loss, "loss_ref": ref_loss,
            "loss_rel": abs(packed_loss - ref_loss) / abs(ref_loss),
            "grad_rel": worst, "grads_compared": len(ref)}


def dpo_equality(name: str = "tiny:llama-h256-l2", device: str = "cpu",
                 n: int = 6) -> dict[str, Any]:
    """A right-padded batch through the unpadding backbone vs the stock padded forward:
    hidden states at real tokens, per-sequence log-prob sums, and LoRA gradients."""
    import torch

    from skytune.train import fast

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = {"unpadded": _model(name, device, fast.VARLEN, dtype),
              "padded": _model(name, device, "sdpa", dtype)}
    fast.padding_free_backbone(models["unpadded"].get_base_model())
    samples = _samples(2 * n, models["padded"].config.vocab_size, seed=3)
    width = max(map(len, samples))
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    result: dict[str, Any] = {"device": device, "sequences": len(samples),
                              "padding_fraction": 1 - float(mask.float().mean())}
    logps, grads = {}, {}
    for key, model in models.items():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        seq = (lp * mask[:, 1:]).sum(1)  # what DPO sums per sequence
        seq.sum().backward()
        logps[key], grads[key] = seq.detach(), _grads(model)
    result["logp_max_abs"] = float((logps["unpadded"] - logps["padded"]).abs().max())
    result["logp_rel"] = _rel(logps["unpadded"], logps["padded"])
    result["grad_rel"] = max(_rel(grads["unpadded"][k], grads["padded"][k])
                             for k in grads["padded"])
    return result
