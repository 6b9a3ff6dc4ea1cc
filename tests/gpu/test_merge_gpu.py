"""GPU merge tests: a random ~1.14B Llama merged in bf16 with verification, the seed-001 mistake
(merging into NF4-quantized weights) caught by verification, and the measurement behind the
QLoRA default (merge into the NF4-round-tripped base vs the original weights).

    PYTHONPATH=src python -m pytest tests/gpu/test_merge_gpu.py -v -s    # on the GPU machine

Needs CUDA, bitsandbytes, peft, transformers. Numbers go to stdout (-s) and, when
SKYTUNE_BENCH_OUT is set, to that directory as merge_gpu.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]
RESULTS: dict = {}


def _record(key, value):
    RESULTS[key] = value
    print(f"\n{key}: {json.dumps(value, default=str)}")
    if os.environ.get("SKYTUNE_BENCH_OUT"):
        out = Path(os.environ["SKYTUNE_BENCH_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "merge_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    import merge_bench

    d = tmp_path_factory.mktemp("merge1b")
    info = merge_bench.build(d, hidden=2048, layers=16, inter=8192, vocab=32000)
    assert info["params"] >= 1_000_000_000
    _record("build", info)
    torch.cuda.empty_cache()
    return d


def test_merge_1b_bf16_verified(bench_dir):
    """Done-criterion: >=1B random model, bf16, verification on; time + peak RSS/CUDA memory,
    measured in a fresh process."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_bench.py"), "merge",
                        "--dir", str(bench_dir), "--dtype", "bf16"],
                       capture_output=True, text=True, check=False, env={**os.environ,
                                                            "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])["merge"]
    _record("merge_1b_bf16", res)
    assert res["verification"]["passed"]
    assert res["verification"]["compute_dtype"] == "fp32"
    assert res["shards"] >= 2  # streamed into several shards
    merged = bench_dir / "merged-bf16"
    assert (merged / "model.safetensors.index.json").is_file()
    assert (merged / "README.md").is_file() and (merged / "generation_config.json").is_file()


def _nf4_merge(bench_dir: Path, name: str, roundtrip_base: bool, adapter: Path | None = None):
    from skytune import merge as M

    adapter = adapter or bench_dir / "adapter"
    cfg, _ = M.read_adapter_meta(adapter)
    lora = M.load_lora(adapter, cfg)
    out = bench_dir / name
    names = M.quantized_weight_names(bench_dir / "base")
    M.stream_merge(bench_dir / "base", lora, out, "bf16",
                   roundtrip=M.nf4_roundtrip_fn() if roundtrip_base else None,
                   roundtrip_names=names if roundtrip_base else frozenset())
    M.write_companions(bench_dir / "base", adapter, out, "bf16")
    return out, names


def test_merge_into_4bit_base_is_caught(bench_dir):
    """Seed 001: LoRA merged into dequantized NF4 weights (real bitsandbytes), checked against
    the full-precision base + adapter. Verification must fail."""
    pytest.importorskip("bitsandbytes")
    from skytune import merge as M

    out, _ = _nf4_merge(bench_dir, "merged-into-nf4", roundtrip_base=True)
    report = M.verify_merge(bench_dir / "base", bench_dir / "adapter", out, "bf16")
    _record("nf4_mistake_verification", report)
    assert not report["passed"], report


def test_qlora_default_by_measurement(bench_dir):
    """Which merge base matches the trained QLoRA model (4-bit base + adapter, unmerged)?
    The answer is the default of merge(qlora_base='auto') on a GPU."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from skytune import merge as M

    qa = bench_dir / "adapter-qlora"
    if not qa.exists():
        import shutil

        shutil.copytree(bench_dir / "adapter", qa)
        meta = json.loads((qa / "skytune.json").read_text())
        meta["adapter_type"] = "qlora"
        (qa / "skytune.json").write_text(json.dumps(meta))
    assert M.qlora_plan(json.loads((qa / "skytune.json").read_text()), "auto")[0] == "nf4"

    prompts = M.prompt_ids(AutoTokenizer.from_pretrained(str(bench_dir / "base")))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(bench_dir / "base"), quantization_config=q,
                                                 dtype=torch.bfloat16, device_map={"": 0})
    model = PeftModel.from_pretrained(model, str(qa)).eval()
    with torch.no_grad():
        trained = [model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float().cpu()
                   for ids in prompts]
    del model
    torch.cuda.empty_cache()

    # merge() end to end in the default mode (nf4 on GPU), with its own verification
    res = M.merge(str(qa), out=bench_dir / "merged-qlora-auto", base=str(bench_dir / "base"),
                  dtype="bf16", upload=False)
    assert res["qlora_base"] == "nf4" and res["verification"]["passed"], res["verification"]
    orig, _ = _nf4_merge(bench_dir, "merged-qlora-original", roundtrip_base=False, adapter=qa)
    rows = {}
    for mode, d in (("nf4", bench_dir / "merged-qlora-auto"), ("original", orig)):
        rows[mode] = M.compare_logits(trained, M.model_logits(d, prompts, "bf16", "cuda"))
    _record("qlora_default_measurement", rows)
    assert rows["nf4"]["kl_mean"] < rows["original"]["kl_mean"]
