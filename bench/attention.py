"""Attention paths on this GPU: SDPA vs flex_attention (vs flash-attn if installed), bf16.

    python bench/attention.py                         # writes bench/results/attention-*.json
    python bench/attention.py --seq 8192 --batch 1 --iters 20

Shapes are Llama-3.1-8B's (hidden 4096, 32 query heads, 8 KV heads, head_dim 128,
MLP 14336), causal, seq 4096. Two levels, each forward+backward:
  op     the attention kernel alone on (B, H, S, D) tensors: SDPA (torch picks flash /
         cuDNN / mem-efficient) vs flex_attention compiled with a causal BlockMask;
  layer  one transformers LlamaDecoderLayer with attn_implementation sdpa / flex_attention /
         flash_attention_2 — what a training step runs, projections and MLP included.
Also checks that flex and flash-attn agree with SDPA (max abs difference of outputs).
The decision these numbers feed is in images/ATTENTION.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path


def timed(fn, warmup: int, iters: int) -> dict:
    import torch

    for _ in range(warmup):  # includes torch.compile of flex on the first call
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return {"ms": round(start.elapsed_time(end) / iters, 3),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2)}


def op_bench(a) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, dt_ = "cuda", torch.bfloat16
    q = torch.randn(a.batch, a.heads, a.seq, a.head_dim, device=dev, dtype=dt_, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device=dev, dtype=dt_,
                    requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    go = torch.randn_like(q)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, a.seq, a.seq, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)

    def sdpa_fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def flex_fwd():
        return flex(q, k, v, block_mask=mask, enable_gqa=True)

    impls = {"sdpa": sdpa_fwd, "flex": flex_fwd}
    try:
        from flash_attn import flash_attn_func  # (B, S, H, D) layout

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        impls["flash_attn"] = lambda: flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)
    except Exception as e:  # noqa: BLE001 - not installed or ABI-broken: recorded, not fatal
        print(f"flash-attn unavailable: {type(e).__name__}: {e}")

    ref = sdpa_fwd().detach()
    out = {}
    for name, fwd in impls.items():
        def step(fwd=fwd):
            fwd().backward(go)
            q.grad = k.grad = v.grad = None
        try:
            r = {"fwd": timed(lambda fwd=fwd: fwd(), a.warmup, a.iters),
                 "fwd_bwd": timed(step, a.warmup, a.iters)}
            r["max_abs_diff_vs_sdpa"] = float((fwd().detach() - ref).abs().max())
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[name] = r
    return out


def layer_bench(a) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    out = {}
    for impl in ("sdpa", "flex_attention", "flash_attention_2"):
        try:
            cfg = LlamaConfig(hidden_size=a.heads * a.head_dim, intermediate_size=a.intermediate,
                              num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                              head_dim=a.head_dim, num_hidden_layers=1, max_position_embeddings=a.seq,
                              attn_implementation=impl, torch_dtype=torch.bfloat16)
            cfg._attn_implementation = impl
            layer = LlamaDecoderLayer(cfg, layer_idx=0).cuda().to(torch.bfloat16)
            rope = LlamaRotaryEmbedding(cfg).cuda()
            x = torch.randn(a.batch, a.seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True)
            pos = torch.arange(a.seq, device="cuda").unsqueeze(0).expand(a.batch, -1)
            pe = rope(x, pos)
            # sdpa / flash: no mask means causal; flex needs its causal BlockMask explicitly.
            mask = (create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, a.seq, a.seq,
                                      device="cuda") if impl == "flex_attention" else None)

            def fwd(layer=layer, x=x, pe=pe, pos=pos, mask=mask):
                o = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                return o[0] if isinstance(o, tuple) else o

            def step(fwd=fwd, x=x, layer=layer):
                fwd().float().pow(2).mean().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)

            out[impl] = {"fwd_bwd": timed(step, a.warmup, a.iters)}
            del layer
        except Exception as e:  # noqa: BLE001 - e.g. flash_attention_2 without flash-attn
            out[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()

    import torch
    import transformers

    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    p = torch.cuda.get_device_properties(0)
    result = {
        "bench": "attention", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": p.name, "capability": f"{p.major}.{p.minor}", "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "shape": {k: getattr(a, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim",
                                              "intermediate")},
        "op": op_bench(a), "layer": layer_bench(a),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    slug = p.name.replace(" ", "-").replace("/", "-")
    path = a.out / f"attention-{slug}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
