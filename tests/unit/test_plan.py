"""skytune.plan: memory, throughput and price arithmetic against hand-computed cases.

Memory numbers checked by hand (bytes):
  Llama-3.1-8B: 8,030,261,248 params -> bf16 weights 16.06e9.
  LoRA all-linear r=16 per layer: 16*(4096+4096)*2 (q,o) + 16*(4096+1024)*2 (k,v)
    + 16*(4096+14336)*3 (gate, up, down) = 1,310,720; x 32 layers = 41,943,040.
Prices: the minimum `Price` over the shared vast + lambda snapshots for that GPU count.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from skytune import plan as P
from skytune.errors import SkytuneError
from skytune.models_catalog import arch_for, from_config
from skytune.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
SHARED_CATALOG = REPO.parent / "shared" / "catalog"
DEMO_DATA = REPO / "jobs" / "recipes" / "data" / "demo_qa.jsonl"


@pytest.fixture
def catalog() -> Path:
    if not (SHARED_CATALOG / "v8").is_dir():
        pytest.skip(f"no SkyPilot catalog snapshot at {SHARED_CATALOG} (CI clones shared/ "
                    "beside the repo)")
    return SHARED_CATALOG


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}." * 20}
            for i in range(200)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def make(data: Path, model: str = "meta-llama/Llama-3.1-8B-Instruct", **over) -> object:
    d = {"name": "t", "model": model, "data": {"train": str(data)},
         "train": {"max_length": 2048}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        d.setdefault(section, {})[leaf] = value
    return recipe_from_dict(d, base_dir=data.parent)


H100 = P.GPUS["H100"].mem_gib * P.GiB


# --- architecture arithmetic ------------------------------------------------------------

def test_weights_of_8b_in_bf16_are_two_bytes_per_param(data):
    r = make(data)
    arch = arch_for(r.model)
    est = P.estimate_memory(arch, r.adapter, r.train, 1, 2048, True)
    assert est.parts["weights"] == pytest.approx(2 * 8.03e9, rel=0.01)


def test_lora_param_count_llama_8b_all_linear_r16():
    assert arch_for("meta-llama/Meta-Llama-3.1-8B-Instruct").lora_params(16) == \
        pytest.approx(41.9e6, rel=0.01)


@pytest.mark.parametrize("model,params", [
    ("Qwen/Qwen2.5-7B-Instruct", 7.62e9), ("google/gemma-3-12b-it", 12.2e9),
    ("deepseek-ai/deepseek-math-7b-instruct", 6.91e9), ("meta-llama/Llama-3.2-1B", 1.24e9),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.494e9), ("mistralai/Mistral-7B-Instruct-v0.3", 7.25e9),
])
def test_seed_models_have_their_published_sizes(model, params):
    assert arch_for(model).n_params() == pytest.approx(params, rel=0.01)


def test_local_config_json_is_read(tmp_path):
    cfg = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert arch_for(str(tmp_path)) == from_config(cfg, name=str(tmp_path))
    assert arch_for(str(tmp_path)).kv_heads == 2


# --- memory -------------------------------------------------------------------------------

def test_8b_lora_bf16_fits_one_h100(data):
    r = make(data)
    assert P.fit(arch_for(r.model), r, H100) is not None


def test_8b_full_fine_tune_needs_more_than_one_80gb_gpu(data):
    r = make(data, adapter__type="full")
    arch = arch_for(r.model)
    assert P.gpu_fit(arch, r, P.GPUS["H100"], 1, 2048).est is None
    sharded = P.gpu_fit(arch, r, P.GPUS["H100"], 8, 2048).est
    assert sharded is not None and sharded.strategy == "fsdp"


def test_seed_002_qwen7b_lora_r128_seq512_fits_24gb_and_qlora_uses_far_less(data):
    r = make(data, model="Qwen/Qwen2.5-7B-Instruct", adapter__r=128,
             train__micro_batch=1, train__gradient_checkpointing=True, train__max_length=512)
    arch = arch_for(r.model)
    lora = P.estimate_memory(arch, r.adapter, r.train, 1, 512, True)
    assert lora.fits(P.GPUS["RTX4090"].mem_gib * P.GiB), lora.to_dict()
    q = make(data, model="Qwen/Qwen2.5-7B-Instruct", adapter__r=128, adapter__type="qlora")
    qlora = P.estimate_memory(arch, q.adapter, q.train, 1, 512, True)
    assert qlora.total < 0.65 * lora.total
    assert qlora.parts["weights"] < 0.4 * lora.parts["weights"]


def test_checkpointing_saves_activation_memory(data):
    r = make(data)
    arch = arch_for(r.model)
    on = P.estimate_memory(arch, r.adapter, r.train, 4, 2048, True)
    off = P.estimate_memory(arch, r.adapter, r.train, 4, 2048, False)
    assert off.parts["activations"] > 3 * on.parts["activations"]


def test_choose_micro_batch_grows_with_memory_and_raises_when_nothing_fits(data):
    r = make(data)
    arch = arch_for(r.model)
    small, _ = P.choose_micro_batch(arch, r, 48 * P.GiB)
    big, _ = P.choose_micro_batch(arch, r, 140 * P.GiB)
    assert 1 <= small < big
    with pytest.raises(SkytuneError, match="qlora"):
        P.choose_micro_batch(arch, r, 12 * P.GiB)


def test_fixed_micro_batch_and_checkpointing_are_respected(data):
    r = make(data, train__micro_batch=3, train__gradient_checkpointing=True)
    assert P.choose_micro_batch(arch_for(r.model), r, H100) == (3, True)


# --- throughput -------------------------------------------------------------------------

def test_flops_per_token_rules():
    arch = arch_for("meta-llama/Llama-3.1-8B")
    full = P.flops_per_token(arch, "full", "sft", 1, False)
    assert full == pytest.approx(6 * arch.compute_params(), rel=0.01)
    assert P.flops_per_token(arch, "full", "sft", 1, True) == pytest.approx(full * 4 / 3, rel=0.01)
    assert P.flops_per_token(arch, "lora", "sft", 1, False) == pytest.approx(full * 2 / 3, rel=0.01)


# --- prices -----------------------------------------------------------------------------

def _min_price(catalog: Path, gpu: str, count: int) -> float:
    prices = []
    for cloud in ("vast", "lambda"):
        with (catalog / "v8" / cloud / "vms.csv").open(newline="") as f:
            prices += [float(r["Price"]) for r in csv.DictReader(f)
                       if r["AcceleratorName"] == gpu and r["AcceleratorCount"]
                       and int(float(r["AcceleratorCount"])) == count]
    return min(prices)


@pytest.mark.parametrize("count", [1, 8])
def test_cheapest_h100_row_matches_catalog_minimum(data, catalog, count):
    result = P.plan(make(data), gpus=[f"H100:{count}"], catalog_dir=catalog)
    assert result.rows[0].fits and result.rows[0].best
    assert result.rows[0].price_per_hour == _min_price(catalog, "H100", count)


def test_spot_row_only_when_spot_price_is_positive(data, catalog, tmp_path):
    result = P.plan(make(data), gpus=["H100:1"], catalog_dir=catalog)
    assert result.rows and not any(r.spot for r in result.rows)  # vast: 0.00, lambda: empty
    d = tmp_path / "cat" / "v8" / "mycloud"
    d.mkdir(parents=True)
    (d / "vms.csv").write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice,Region\n"
        "h1,H100,1,2.00,0.90,r1\nh1,H100,1,2.50,0.00,r2\nh2,H100,1,3.00,,r1\n")
    rows = P.plan(make(data), gpus=["H100:1"], catalog_dir=tmp_path / "cat").rows
    assert [(r.price_per_hour, r.spot) for r in rows] == [(0.90, True), (2.00, False)]
    assert rows[0].cost == pytest.approx(rows[0].hours * 0.90, abs=0.01)


def test_bundled_snapshot_is_used_without_a_catalog_dir(data, monkeypatch, tmp_path):
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))  # an empty SkyPilot cache
    monkeypatch.delenv("SKYTUNE_CATALOG_DIR", raising=False)
    offers, sources = P.load_offers()
    assert {"vast", "lambda"} <= set(sources)
    assert min(o.price for o in offers if o.gpu == "H100" and o.count == 1) == 1.87


# --- the whole plan -----------------------------------------------------------------------

def test_plan_json_parses_and_cheapest_feasible_comes_first(data, catalog):
    result = P.plan(make(data), gpus=["H100", "RTX4090", "A100-80GB"], catalog_dir=catalog)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["rows"][0]["best"] and d["rows"][0]["fits"]
    costs = [r["cost"] for r in d["rows"] if r["fits"] and r["cost"] is not None]
    assert costs == sorted(costs)
    assert d["data"]["rows"] == 200
    assert "H100:1" in P.render(result)


def test_cli_plan_json(data, catalog, monkeypatch):
    from typer.testing import CliRunner

    from skytune.cli import app

    recipe = data.parent / "r.yaml"
    recipe.write_text(f"name: t\nmodel: tiny:llama\ndata: {{train: {data.name}}}\n")
    monkeypatch.setenv("SKYTUNE_CATALOG_DIR", str(catalog))
    out = CliRunner().invoke(app, ["plan", str(recipe), "--gpu", "L4:1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["rows"][0]["gpu"] == "L4"


def test_70b_full_on_one_gpu_fits_nowhere_and_suggests_changes(data, catalog):
    r = make(data, model="meta-llama/Llama-3.1-70B-Instruct", adapter__type="full")
    result = P.plan(r, gpus=["H100:1"], catalog_dir=catalog)
    assert not any(row.fits for row in result.rows)
    changes = [s["change"] for s in result.suggestions]
    assert changes and "adapter.type=qlora" in changes[0]
    assert any(c.startswith("--gpu ") for c in changes)
    assert "Fits nowhere" in P.render(result)
    # the suggestion is real: applying it fits
    fixed = make(data, model="meta-llama/Llama-3.1-70B-Instruct", adapter__type="qlora")
    assert P.gpu_fit(arch_for(fixed.model), fixed, P.GPUS["H100"], 1, 2048).est is not None


def test_tiny_llama_demo_recipe_plans(catalog):
    demo = REPO / "jobs" / "recipes" / "demo.yaml"
    if not demo.is_file():
        pytest.skip("jobs/recipes/demo.yaml not present")
    from skytune.recipe import load_recipe

    result = P.plan(load_recipe(demo), catalog_dir=catalog)
    assert result.rows and all(r.fits for r in result.rows)
    assert result.data["rows"] == sum(1 for line in DEMO_DATA.open() if line.strip())
    assert result.rows[0].cost is not None and result.rows[0].cost < 1


def test_remote_data_without_max_steps_has_unknown_hours(catalog, tmp_path):
    r = recipe_from_dict({"name": "t", "model": "tiny:qwen",
                          "data": {"train": "s3://bucket/train.jsonl"}}, base_dir=tmp_path)
    result = P.plan(r, gpus=["L4:1"], catalog_dir=catalog)
    assert result.rows[0].fits and result.rows[0].hours is None
    assert any("not a local file" in n for n in result.notes)


def test_max_steps_sets_the_token_count(data, catalog):
    r = make(data, train__max_steps=100, train__micro_batch=2, train__max_length=512,
             train__packing=True)
    row = P.plan(r, gpus=["H100:1"], catalog_dir=catalog).rows[0]
    tokens = 100 * 2 * 1 * P.data_stats(r).seq_tokens
    assert row.hours == pytest.approx(tokens / row.tokens_per_s / 3600 + P.SETUP_MINUTES / 60,
                                      rel=0.01)


def test_grpo_and_dpo_plan(tmp_path, catalog):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    for method, extra in (("dpo", {}), ("grpo", {"rewards": ["math_exact"]})):
        r = recipe_from_dict({"name": "t", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                              "method": method, "data": {"train": str(data)}, **extra},
                             base_dir=tmp_path)
        result = P.plan(r, gpus=["L4:1"], catalog_dir=catalog)
        assert result.rows[0].fits and result.rows[0].hours > 0


def test_unknown_gpu_is_a_user_error(data):
    with pytest.raises(SkytuneError, match="known:"):
        P.lookup_gpu("H1OO")


def test_importing_plan_does_not_import_torch():
    code = "import sys, skytune.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_tuning_packs_and_checkpoints_only_what_memory_needs(data, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = make(data)
    cpu = P.auto_tuning(r, SimpleNamespace(kind="cpu", mem_bytes=0), packable=True,
                        varlen=False, liger=False)
    assert (cpu.micro_batch, cpu.packing, cpu.checkpointing, cpu.liger) == (2, False, 0, False)
    assert cpu.attention == "sdpa" and cpu.lora_cast  # no autocast on CPU: keep PEFT's cast

    def on(gib, **kw):
        return P.auto_tuning(r, SimpleNamespace(kind="cuda", mem_bytes=int(gib * P.GiB)),
                             **{"packable": True, "varlen": True, "liger": True, **kw})

    h100 = on(79)  # 8B LoRA on an 80 GB card: packed 2048-token bins, no recompute at all
    assert h100.packing and h100.attention == "skytune_varlen" and h100.liger
    assert not h100.lora_cast and h100.checkpointing == 0
    assert h100.micro_batch * 2048 >= 8192 and h100.estimate_gib <= 79 * P.USABLE_FRACTION
    # Less memory: recompute comes back, on as few layers as the budget needs (every 4th,
    # then every 2nd, then all: a smaller `checkpointing` value recomputes more).
    cards = [on(gib) for gib in (79, 40, 28, 26, 23)]
    assert all(c.estimate_gib <= gib * P.USABLE_FRACTION
               for c, gib in zip(cards, (79, 40, 28, 26, 23), strict=True))
    recompute = [32 // c.checkpointing if c.checkpointing else 0 for c in cards]
    assert recompute == sorted(recompute) and recompute[0] == 0 and recompute[-1] > 0
    assert 0 < recompute[-2] < 32 or 0 < recompute[-1] < 32  # partial, not all-or-nothing
    # Liger and no input cast free memory: without Liger the same card recomputes more
    plain = on(26, liger=False)
    assert (32 // plain.checkpointing if plain.checkpointing else 0) >= recompute[3]
    # recipe values win over auto
    fixed = P.auto_tuning(make(data, train__micro_batch=3, train__gradient_checkpointing=True,
                               train__packing=False, train__liger=False),
                          SimpleNamespace(kind="cuda", mem_bytes=int(79 * P.GiB)),
                          packable=True, varlen=True, liger=True)
    assert (fixed.micro_batch, fixed.checkpointing, fixed.packing, fixed.liger) == (
        3, 1, False, False)
    assert 16 < P.dry_run_memory(r, 1, True) < 80


def test_backoff_recomputes_more_layers_then_halves_the_batch():
    from skytune.train.fast import Tuning

    t = Tuning(micro_batch=4, packing=True, checkpointing=0, attention="sdpa", liger=False,
               lora_cast=True, padding_free=False)
    seen = []
    while t is not None:
        seen.append((t.micro_batch, t.checkpointing))
        t = t.backoff()
    assert seen == [(4, 0), (4, 4), (4, 2), (4, 1), (2, 1), (1, 1)]


def test_partial_checkpointing_memory_and_flops_sit_between_off_and_on(data):
    r = make(data)
    arch = arch_for(r.model)
    mem = [P.estimate_memory(arch, r.adapter, r.train, 4, 2048, c).total for c in (0, 4, 2, 1)]
    assert mem == sorted(mem, reverse=True)
    fl = [P.flops_per_token(arch, "lora", "sft", 2048, c) for c in (0, 4, 2, 1)]
    assert fl == sorted(fl) and fl[3] == pytest.approx(fl[0] * 1.5, rel=0.02)
    assert P.checkpointed_layers(arch, 4) == 8 and P.checkpointed_layers(arch, True) == 32
