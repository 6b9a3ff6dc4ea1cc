"""Pipeline stages: merging over the top-level recipe, names, init_from chaining, errors."""

from __future__ import annotations

import textwrap

import pytest

from skytune.errors import SkytuneError
from skytune.recipe import load_recipe
from skytune.sync import run_id
from skytune.train.pipeline import stage_recipes

RECIPE = """
name: qa
model: tiny:llama
adapter: {type: lora, r: 8}
data: {train: data.jsonl}
train: {max_length: 512}
output: {store: file://runs}
stages:
  - {name: sft, method: sft, train: {epochs: 2}}
  - name: dpo
    method: dpo
    data: {train: pairs.jsonl}
    dpo: {beta: 0.2}
"""


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_stages_merge_over_top_level_with_their_own_method_defaults(tmp_path):
    sft, dpo = stage_recipes(load_recipe(write(tmp_path, RECIPE)))
    assert (sft.name, dpo.name) == ("qa-sft", "qa-dpo")
    assert sft.train.epochs == 2 and dpo.train.epochs == 1
    assert sft.train.max_length == dpo.train.max_length == 512  # inherited
    assert sft.adapter.r == dpo.adapter.r == 8
    assert (sft.train.lr, dpo.train.lr) == (2e-4, 5e-6)  # each method's default, not sft's
    assert dpo.dpo.beta == 0.2 and dpo.data.train == "pairs.jsonl"
    assert not sft.stages and not dpo.stages


def test_each_stage_starts_from_the_previous_run(tmp_path):
    sft, dpo = stage_recipes(load_recipe(write(tmp_path, RECIPE)))
    assert sft.init_from is None
    assert dpo.init_from == f"file://{tmp_path}/runs/{run_id(sft)}"
    assert run_id(sft) != run_id(dpo)


def test_set_overrides_win_in_every_stage(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE), ["train.epochs=3", "model=tiny:qwen"])
    sft, dpo = stage_recipes(recipe)
    assert sft.train.epochs == dpo.train.epochs == 3
    assert sft.model == dpo.model == "tiny:qwen"


def test_presets_follow_the_stage_method(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE.replace("name: qa", "name: qa\npreset: fast_test")
                               .replace("{name: sft, method: sft, train: {epochs: 2}}",
                                        "{name: g, method: grpo, rewards: [math_exact]}")))
    grpo, _ = stage_recipes(recipe)
    assert grpo.grpo.num_generations == 2 and grpo.train.max_steps == 10


def test_explicit_init_from_is_kept(tmp_path):
    text = RECIPE.replace("    dpo: {beta: 0.2}", "    dpo: {beta: 0.2}\n    init_from: s3://b/p/x-1")
    _, dpo = stage_recipes(load_recipe(write(tmp_path, text)))
    assert dpo.init_from == "s3://b/p/x-1"


@pytest.mark.parametrize("change, message", [
    ("    dpo: {beta: 0.2}\n    train: {lr: -1}", r"^stages\[1\]\.train\.lr: "),
    ("    dpo: {beta: 0.2}\n    trian: {lr: 1}", r"^stages\[1\]: unknown key 'trian'; did you "
                                                 r"mean 'train'\?"),
    ("    dpo: {beta: 0.2}\n    method: ppo", r"^stages\[1\]\.method: "),
    ("    dpo: {beta: 0.2}\n    stages: []", r"^stages\[1\]\.stages: stages cannot be nested"),
])
def test_stage_errors_name_the_stage(tmp_path, change, message):
    recipe = load_recipe(write(tmp_path, RECIPE.replace("    dpo: {beta: 0.2}", change)))
    with pytest.raises(SkytuneError, match=message):
        stage_recipes(recipe)


def test_bad_stage_name(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE.replace("name: dpo", "name: 'DPO stage'")))
    with pytest.raises(SkytuneError, match=r"stages\[1\]\.name: 'DPO stage'"):
        stage_recipes(recipe)
