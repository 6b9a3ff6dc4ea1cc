"""Unit tests of skytune.merge: the streaming merge against PEFT's own merge, refusal of
quantized bases, the verification catching a merge into NF4 weights (simulated in torch on
CPU), the artifact protocol (no COMPLETE on failure), and the Hub push path logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from skytune import merge as M
from skytune.errors import SkytuneError

# NF4 code book (QLoRA paper, bitsandbytes): blockwise absmax, nearest of these 16 levels.
NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500,
                    0.0, 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170,
                    0.7229568, 1.0])


def nf4_roundtrip_cpu(w, block: int = 64):
    flat = w.float().reshape(-1, block)
    absmax = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    idx = ((flat / absmax).unsqueeze(-1) - NF4).abs().argmin(-1)
    return (NF4[idx] * absmax).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny:llama + a random LoRA adapter (nonzero B, rsLoRA off, alpha 16, r 8)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skytune.tiny import resolve

    base = Path(resolve("tiny:llama"))
    d = tmp_path_factory.mktemp("merge")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            modules_to_save=["lm_head"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "modules_to_save" in n:
                p.add_(0.01)
    peft.save_pretrained(d / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(d / "adapter")
    (d / "adapter" / "skytune.json").write_text(json.dumps({
        "kind": "adapter", "run_id": "t-1", "step": 3, "method": "sft",
        "base_model": "tiny:llama", "adapter_type": "lora",
        "recipe": {"name": "t", "adapter": {"type": "lora", "r": 8, "alpha": 16},
                   "data": {"train": "x.jsonl"}}}))
    (d / "adapter" / "recipe.yaml").write_text("name: t\nmodel: tiny:llama\n")
    expected = peft.merge_and_unload(safe_merge=True).state_dict()
    return base, d, expected


def test_stream_merge_matches_peft_merge_and_shards(tiny, tmp_path):
    base, d, expected = tiny
    cfg, _ = M.read_adapter_meta(d / "adapter")
    lora = M.load_lora(d / "adapter", cfg)
    assert lora.nonzero and "lm_head.weight" in lora.replace
    stats = M.stream_merge(base, lora, tmp_path / "out", "fp32", max_shard_bytes=200_000)
    assert stats["shards"] > 1 and stats["tensors_merged"] == len(lora.deltas) == 14
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / "out" / f))
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not list((tmp_path / "out").glob("part-*"))


def test_merge_end_to_end_local_fp32_and_bf16(tiny, tmp_path):
    _, d, _ = tiny
    for dtype in ("fp32", "bf16"):
        res = M.merge(str(d / "adapter"), out=tmp_path / dtype, dtype=dtype, upload=False)
        v = res["verification"]
        assert v["passed"] and v["compute_dtype"] == "fp32", v
        out = tmp_path / dtype
        for f in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md",
                  "skytune.json", "recipe.yaml", "model.safetensors"):
            assert (out / f).is_file(), f
        assert json.loads((out / "config.json").read_text())["dtype"] == \
            {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        card = (out / "README.md").read_text()
        assert "base_model: tiny:llama" in card and "passed" in card and "```yaml" in card
    assert v["kl_mean"] < 1e-3  # bf16


def test_merge_into_nf4_weights_fails_verification(tiny, tmp_path):
    """Seed 001, simulated on CPU: the LoRA delta added to NF4-dequantized weights, checked
    against the full-precision base + adapter."""
    base, d, _ = tiny
    cfg, _ = M.read_adapter_meta(d / "adapter")
    lora = M.load_lora(d / "adapter", cfg)
    names = M.quantized_weight_names(base)
    assert "lm_head.weight" not in names and "model.layers.0.mlp.up_proj.weight" in names
    out = tmp_path / "bad"
    M.stream_merge(base, lora, out, "bf16", roundtrip=nf4_roundtrip_cpu, roundtrip_names=names)
    M.write_companions(base, d / "adapter", out, "bf16")
    report = M.verify_merge(base, d / "adapter", out, "bf16")
    assert not report["passed"] and report["kl_mean"] > 10 * report["tol_kl"]
    # ...and the same reference, round-tripped like QLoRA training saw it, agrees:
    ok = M.verify_merge(base, d / "adapter", out, "bf16", roundtrip=nf4_roundtrip_cpu,
                        roundtrip_names=names)
    assert ok["passed"], ok


def test_failed_verification_uploads_nothing(tiny, tmp_path, monkeypatch):
    from skytune.store import open_store, read_complete, upload_artifact

    _, d, _ = tiny
    store = open_store(f"file://{tmp_path / 'store'}")
    upload_artifact(store, d / "adapter", "run-1/adapter", meta={"kind": "adapter"})
    real = M.verify_merge
    monkeypatch.setattr(M, "verify_merge", lambda *a, **k: {**real(*a, **k), "passed": False})
    with pytest.raises(SkytuneError, match="verification failed.*nothing was uploaded"):
        M.merge(f"file://{tmp_path / 'store'}/run-1")
    assert read_complete(store, "run-1/merged") is None
    assert not store.list("run-1/merged")
    monkeypatch.setattr(M, "verify_merge", real)
    res = M.merge(f"file://{tmp_path / 'store'}/run-1", dtype="fp32")
    rec = read_complete(store, "run-1/merged")
    assert rec and "README.md" in rec["files"] and res["uploaded"].endswith("run-1/merged")


def test_quantized_base_refused_with_the_fix(tmp_path):
    base = tmp_path / "unsloth-bnb"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(SkytuneError, match="quantization_config.*full-precision"):
        M.resolve_base(str(base))
    with pytest.raises(SkytuneError, match="--base unsloth/meta-llama-3.1-8b-instruct$"):
        M.check_full_precision({"quantization_config": {"load_in_4bit": True}},
                               "unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit")
    assert M.guess_full_precision("unsloth/Llama-3.2-1B-bnb-4bit") == "unsloth/Llama-3.2-1B"
    assert M.guess_full_precision("meta-llama/Llama-3.1-8B") is None


def test_wrong_base_and_bad_inputs(tiny, tmp_path):
    _, d, _ = tiny
    with pytest.raises(SkytuneError, match="--dtype"):
        M.merge(str(d / "adapter"), out=tmp_path / "x", dtype="int8")
    with pytest.raises(SkytuneError, match="does not match the base"):
        M.merge(str(d / "adapter"), out=tmp_path / "x", base="tiny:llama-h128-l2", upload=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".merge-*"))
    with pytest.raises(SkytuneError, match="--out"):
        M.merge(str(d / "adapter"))
    with pytest.raises(SkytuneError, match="no such adapter"):
        M.merge(str(tmp_path / "nope"), out=tmp_path / "y")


def test_scale_patterns_and_rslora():
    assert M._pattern_value({"q_proj": 64}, "model.layers.0.self_attn.q_proj", 16) == 64
    assert M._pattern_value({"q_proj": 64}, "model.layers.0.self_attn.k_proj", 16) == 16


def test_qlora_plan_without_gpu(monkeypatch):
    monkeypatch.setattr(M, "nf4_available", lambda: False)
    q = {"adapter_type": "qlora", "recipe": {"adapter": {"bits": 4}}}
    mode, note = M.qlora_plan(q, "auto")
    assert mode == "original" and "GPU" in note
    assert M.qlora_plan({"adapter_type": "lora"}, "auto") == (None, None)
    with pytest.raises(SkytuneError, match="needs a CUDA GPU"):
        M.qlora_plan(q, "nf4")
    monkeypatch.setattr(M, "nf4_available", lambda: True)
    assert M.qlora_plan(q, "auto")[0] == "nf4"
    assert M.qlora_plan({**q, "recipe": {"adapter": {"bits": 8}}}, "auto")[0] == "original"


def test_compare_logits_metrics():
    a = torch.randn(5, 11)
    s = M.compare_logits([a], [a.clone()])
    assert s["max_abs"] == 0 and abs(s["kl_mean"]) < 1e-7 and s["top1_agree"] == 1
    s = M.compare_logits([a], [a + 0.5 * torch.randn(5, 11)])
    assert s["kl_mean"] > 1e-3


# -- Hub push: path logic with a fake client; live only with HF_TOKEN -------------------

class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))


def test_push_target_and_calls(tmp_path):
    assert M.push_target("hf://me/math-qa-7b") == "me/math-qa-7b"
    for bad in ("s3://b/x", "hf://me", "hf://me/a/b", "hf://datasets/me/x", "hf://me/../x"):
        with pytest.raises(SkytuneError, match="output.push"):
            M.push_target(bad)
    api = FakeApi()
    url = M.push_to_hub(tmp_path, "hf://me/m", private=True, api=api)
    assert url == "https://huggingface.co/me/m"
    (c1, _, kw1), (c2, _, kw2) = api.calls
    assert c1 == "create_repo" and kw1["private"] is True and kw1["exist_ok"] is True
    assert c2 == "upload_folder" and "COMPLETE" in kw2["ignore_patterns"]


@pytest.mark.skipif(not __import__("os").environ.get("HF_TOKEN"), reason="needs HF_TOKEN")
def test_push_live_is_idempotent(tiny):  # pragma: no cover - live Hub
    import uuid

    from huggingface_hub import HfApi

    _, d, _ = tiny
    user = HfApi().whoami()["name"]
    repo = f"hf://{user}/skytune-push-test-{uuid.uuid4().hex[:8]}"
    try:
        M.push_to_hub(d / "adapter", repo, private=True)
        M.push_to_hub(d / "adapter", repo, private=True)  # again: no error, no change
        assert HfApi().model_info(repo[5:]).private
    finally:
        HfApi().delete_repo(repo[5:])
