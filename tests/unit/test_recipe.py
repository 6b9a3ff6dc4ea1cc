"""Recipe schema: loading, --set overrides, presets, and errors that name line and fix."""

from pathlib import Path

import pytest

from skytune.errors import SkytuneError
from skytune.recipe import DEFAULT_LR, load_recipe, parse_override

REPO = Path(__file__).resolve().parents[2]

BASE = """\
name: t
model: tiny:llama
data:
  train: data/x.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.method == "sft" and r.adapter.type == "lora"
    assert r.adapter.alpha == 2 * r.adapter.r
    assert r.train.lr == DEFAULT_LR["sft"]["lora"]
    # relative paths resolve against the recipe's directory, not the cwd
    assert r.path(r.data.train) == str(tmp_path / "data/x.jsonl")
    assert r.store_url() == f"file://{tmp_path / 'runs'}"


def test_unknown_key_names_line_and_suggests(tmp_path):
    p = write(tmp_path, BASE + "adapter:\n  r: 8\n  aplha: 16\n")
    with pytest.raises(SkytuneError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}: line 7: unknown key 'aplha' in adapter; did you mean 'alpha'?"


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, BASE + "epochs: 3\n")
    with pytest.raises(SkytuneError, match=r"line 5: unknown key 'epochs'; known keys: name"):
        load_recipe(p)


def test_wrong_type_names_field_and_value(tmp_path):
    p = write(tmp_path, BASE + "train:\n  max_steps: lots\n")
    with pytest.raises(SkytuneError, match=r"line 6: train.max_steps: .*integer.*'lots'"):
        load_recipe(p)


def test_missing_required_field(tmp_path):
    p = write(tmp_path, "name: t\nmodel: m\n")
    with pytest.raises(SkytuneError, match="data is required"):
        load_recipe(p)


def test_bad_choice_lists_choices(tmp_path):
    p = write(tmp_path, BASE + "method: ppo\n")
    with pytest.raises(SkytuneError, match=r"line 5: method: .*'sft', 'dpo' or 'grpo'"):
        load_recipe(p)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, BASE + "train: {lr: [1,\n")
    with pytest.raises(SkytuneError, match=r"r.yaml: line \d+: invalid YAML"):
        load_recipe(p)


def test_non_utf8_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(BASE.encode() + b"# \xff\xfe\n")
    with pytest.raises(SkytuneError, match="not UTF-8"):
        load_recipe(p)


def test_set_overrides_coerce_types(tmp_path):
    r = load_recipe(write(tmp_path, BASE), [
        "train.lr=2e-5", "train.max_steps=7", "train.gradient_checkpointing=true",
        "adapter.targets=[q_proj, v_proj]", "output.store=s3://b/p",
    ])
    assert r.train.lr == 2e-5 and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7
    assert r.train.gradient_checkpointing is True
    assert r.adapter.targets == ["q_proj", "v_proj"]
    assert r.store_url() == "s3://b/p"


def test_set_unknown_key_points_at_set(tmp_path):
    with pytest.raises(SkytuneError) as e:
        load_recipe(write(tmp_path, BASE), ["train.lrr=1"])
    assert str(e.value) == "--set: unknown key 'lrr' in train; did you mean 'lr'?"


def test_set_needs_key_value():
    with pytest.raises(SkytuneError, match="expected KEY=VALUE"):
        parse_override("train.lr")


def test_preset_fills_defaults_user_wins(tmp_path):
    r = load_recipe(write(tmp_path, BASE + "preset: fast_test\ntrain:\n  max_steps: 3\n"))
    assert r.train.max_steps == 3  # the user's key wins over the preset's 10
    assert r.train.max_length == 256  # from the preset
    low = load_recipe(write(tmp_path, BASE + "preset: low_memory\n"))
    assert low.adapter.type == "qlora" and low.train.gradient_checkpointing is True


def test_learning_rate_depends_on_method_and_adapter(tmp_path):
    assert load_recipe(write(tmp_path, BASE + "method: dpo\n")).train.lr == 5e-6
    full = load_recipe(write(tmp_path, BASE + "adapter: {type: full}\n"))
    assert full.train.lr == DEFAULT_LR["sft"]["full"]


def test_grpo_needs_rewards(tmp_path):
    with pytest.raises(SkytuneError, match="grpo needs rewards"):
        load_recipe(write(tmp_path, BASE + "method: grpo\n"))


def test_config_hash_ignores_output_and_launch(tmp_path):
    p = write(tmp_path, BASE)
    a = load_recipe(p)
    b = load_recipe(p, ["output.store=s3://x/y", "launch.gpus=H100:8"])
    c = load_recipe(p, ["train.lr=1e-3"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_name_must_be_a_safe_run_id(tmp_path):
    p = write(tmp_path, BASE.replace("name: t", "name: My Run!"))
    with pytest.raises(SkytuneError, match="line 1: name: String should match pattern"):
        load_recipe(p)


def test_shipped_recipes_load():
    recipes = sorted((REPO / "jobs" / "recipes").glob("*.yaml"))
    assert recipes, "jobs/recipes/*.yaml missing"
    for p in recipes:
        load_recipe(p)
