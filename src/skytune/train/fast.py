"""What makes a skytune step faster than plain TRL, and the per-run choice (`micro_batch: auto`).

    register_attention()                      # adds "skytune_varlen" to transformers
    tuning = choose(recipe, dev)              # packing, micro-batch, checkpointing, kernels
    model = load_model(..., attn_implementation=tuning.attention)
    trainer = SFTTrainer(..., args=SFTConfig(**tuning.trainer_kwargs(), ...))
    apply(trainer.model, tuning)              # after PEFT wrapped the model

The pieces, each measured against plain TRL in bench/throughput.py (results in bench/results):
- Packed rows with per-sample attention. TRL packs samples best-fit into max_length bins and,
  padding-free, flattens a micro-batch into one row with `cu_seq_lens`. "skytune_varlen"
  sends that row to FlashAttention-2's variable-length kernel, which ships inside torch
  (torch.nn.attention.varlen): each sample attends only to itself, with no padding, no mask
  tensor and no flash-attn build. Where no such kernel exists (CPU, old torch) the same
  semantics run as one SDPA call per sample, which is what the CPU equality test checks.
- Padding-free preference batches: DPO's chosen/rejected rows are padded to the longest; the
  backbone wrapper here removes the padding before the decoder and puts it back after, so the
  matmuls see only real tokens (TRL 1.16 disables DPO's own padding_free).
- LoRA without input copies: under bf16 autocast PEFT first casts each LoRA input to the
  adapter's fp32 and autocast casts it back to bf16, two copies of every linear's input per
  layer, kept for backward. Autocast alone gives the same bf16 matmul, so the cast is off.
- Liger's RMSNorm, SwiGLU and RoPE kernels (memory and time); TRL's chunked LM head computes
  the loss without full logits.
- Gradient checkpointing only where memory needs it: off, or every n-th layer.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

log = logging.getLogger("skytune")

VARLEN = "skytune_varlen"


# ---------------------------------------------------------------------------------------
# Attention: packed rows through FlashAttention's varlen kernel, SDPA for everything else


@functools.cache
def varlen_kernel():
    """torch's FlashAttention varlen function and how to call it causally, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return varlen_attn, kw


def register_attention() -> str:
    """Make "skytune_varlen" an attention implementation transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask)
    return VARLEN


def _mask(*args, attention_mask=None, **kwargs):
    # No padding mask: packed rows (cu_seq_lens) or plain causal rows, where the kernels need
    # none. A padded batch (generation, an unpacked eval) gets SDPA's mask and SDPA.
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim)
    out. Packed rows (batch 1 with cu_seq_lens, or position_ids that restart) attend within
    each sample; anything else is SDPA, unchanged."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if (cu is None and attention_mask is None and query.shape[0] == 1
            and kwargs.get("position_ids") is not None and kwargs.get("past_key_values") is None):
        cu, max_len = _cu_from_positions(kwargs["position_ids"])
    if cu is None or attention_mask is not None or query.shape[0] != 1 or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim) views
    if max_len is None or not isinstance(max_len, int):
        max_len = int((cu[1:] - cu[:-1]).max())
    out = packed_attention(q, k, v, cu, max_len, scaling)
    return out.unsqueeze(0), None


def packed_attention(q, k, v, cu, max_len: int, scaling: float | None):
    """Causal attention within each [cu[i], cu[i+1]) segment; q (T, Hq, D), k/v (T, Hkv, D)."""
    import torch

    kernel = varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        fn, kw = kernel
        cu = cu.to(device=q.device, dtype=torch.int32)
        if "enable_gqa" not in kw and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            # QLoRA keeps norms in fp32 (PEFT's k-bit preparation), so q/k/v can arrive in
            # fp32; FlashAttention is half precision only: what SDPA does under autocast.
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") \
                else torch.bfloat16
            q, k, v = q.to(half), k.to(half), v.to(half)
        return fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **kw).to(dtype)
    # The reference semantics, one SDPA per sample (CPU, or torch without the varlen kernel).
    import torch.nn.functional as F

    bounds = cu.tolist()
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e > s:
            outs.append(F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1],
            ).transpose(0, 1))
    return torch.cat(outs, 0)


_positions_cache: dict[tuple[int, int], tuple[Any, int]] = {}


def _cu_from_positions(position_ids):
    """cu_seq_lens of a packed row from position_ids that restart at 0 (computed once per
    forward: every layer passes the same tensor)."""
    import torch

    key = (position_ids.data_ptr(), position_ids.shape[-1])
    hit = _positions_cache.get(key)
    if hit is not None:
        return hit
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    _positions_cache.clear()
    _positions_cache[key] = (cu, max_len)
    return cu, max_len


# ---------------------------------------------------------------------------------------
# Padding-free padded batches (DPO): unpad before the decoder, re-pad after


def padding_free_backbone(model) -> bool:
    """Wrap the decoder (`model.base_model` of a causal LM, before PEFT) so a right- or
    left-padded batch runs as one packed row: the linears skip padding entirely, attention
    stays per sequence (varlen), and callers see the usual (batch, seq, hidden) output with
    zeros at padded positions. Returns False where the model has no such backbone."""
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or getattr(backbone, "_skytune_unpad", False):
        return False
    original = backbone.forward

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                **kwargs):
        if (input_ids is None or attention_mask is None or attention_mask.dim() != 2
                or inputs_embeds is not None or kwargs.get("past_key_values") is not None
                or position_ids is not None or bool(attention_mask.all())):
            return original(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        import torch

        mask = attention_mask.bool()
        lens = mask.sum(1)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
        max_len = int(lens.max())
        positions = (mask.long().cumsum(1) - 1)[mask][None]
        out = original(input_ids=input_ids[mask][None], position_ids=positions,
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                       max_length_k=max_len, **kwargs)
        hidden = out.last_hidden_state[0]
        full = hidden.new_zeros(*mask.shape, hidden.shape[-1])
        out.last_hidden_state = full.masked_scatter(mask[..., None], hidden)
        return out

    backbone.forward = forward
    backbone._skytune_unpad = True
    return True


# ---------------------------------------------------------------------------------------
# LoRA inputs


def skip_lora_input_cast(model) -> int:
    """Let autocast alone pick the LoRA matmul dtype (see module doc); returns layers changed.
    Only valid when training runs under bf16/fp16 autocast with fp32 adapter weights."""
    n = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


# ---------------------------------------------------------------------------------------
# The per-run choice


@dataclass(frozen=True)
class Tuning:
    """How this run trains; recorded in the run's manifest as `tuning`."""

    micro_batch: int
    packing: bool
    checkpointing: int  # 0: off; n: every n-th decoder layer (1 = all)
    attention: str
    liger: bool
    lora_cast: bool  # PEFT casts each LoRA input to the adapter dtype (off under autocast)
    padding_free: bool  # unpadded backbone for padded batches (DPO)
    estimate_gib: float | None = None  # the planner's peak-memory estimate
    memory_gib: float | None = None  # the memory it planned for
    reason: str = ""
    backed_off: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trainer_kwargs(self) -> dict[str, Any]:
        """TrainingArguments fields this choice sets."""
        ckpt = self.checkpointing > 0
        return dict(
            per_device_train_batch_size=self.micro_batch,
            per_device_eval_batch_size=self.micro_batch,
            activation_checkpointing=ckpt,
            # Non-reentrant checkpointing keeps the autograd graph connected through frozen
            # (and quantized) layers: the reentrant variant is what raised "element 0 of
            # tensors does not require grad" with 8-bit + LoRA in the seeds.
            activation_checkpointing_kwargs={"use_reentrant": False,
                                             "every_n_layers": self.checkpointing}
            if ckpt else None,
            use_liger_kernel=self.liger,
        )

    def backoff(self) -> Tuning | None:
        """The next smaller configuration after an out-of-memory in the first steps."""
        if self.checkpointing != 1:  # checkpoint more layers first: same batch, less memory
            step = {0: 4, 4: 2, 2: 1}.get(self.checkpointing, 1)
            return replace(self, checkpointing=step, backed_off=True,
                           reason=f"out of memory at checkpointing={self.checkpointing}")
        if self.micro_batch > 1:
            return replace(self, micro_batch=self.micro_batch // 2, backed_off=True,
                           reason=f"out of memory at micro_batch={self.micro_batch}")
        return None


def apply(model, tuning: Tuning, autocast: bool) -> None:
    """Changes to the (PEFT-wrapped) model the trainer built."""
    if not tuning.lora_cast and autocast:
        n = skip_lora_input_cast(model)
        log.debug("LoRA input cast off on %d layers", n)


def liger_available(dev, model_path: str) -> bool:
    """Liger is installed (it needs Triton and a GPU) and has kernels for this model type."""
    if dev.kind != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        from transformers import AutoConfig
    except ImportError:
        return False
    try:
        model_type = AutoConfig.from_pretrained(model_path).model_type
    except (OSError, ValueError):
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
