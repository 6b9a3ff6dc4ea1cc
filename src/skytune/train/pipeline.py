"""Multi-stage pipelines (sft -> dpo, sft -> grpo) and where a stage starts from.

    # recipe: name: qa, model: ..., stages: [{name: sft, method: sft, data: ...},
    #                                         {name: dpo, method: dpo, data: ..., train: ...}]
    result = run_pipeline(load_recipe("jobs/recipes/hallucination-sft-dpo.yaml"))
    result["stages"][1]["run_url"]        # file:///.../runs/qa-dpo-1a2b3c4d

Each stage's keys deep-merge over the top-level recipe (without `stages`), `--set` overrides
win over both, and the result is validated as a full Recipe named `<name>-<stage>`, with its
own run id, checkpoints and final artifact. A stage without init_from starts from the
previous stage's run. Rerunning the pipeline skips stages that completed (Session.start
returns their result) and resumes the one that was interrupted.

`fetch_start` / `load_start` are the hand-off: init_from (a run URL in any store, a local run
dir, adapter dir or model dir) becomes a base model plus, when the previous stage trained an
adapter, that adapter loaded as the trainable one. TRL's DPO and GRPO trainers then keep a
frozen copy of it under the name "ref" (dpo_trainer.py, "pretrained adapter"), so the
reference model is base + previous adapter without a second copy of the base weights, and it
works on a 4-bit base where merging is impossible. The adapter a stage saves is therefore
a complete delta over the base model named in its skytune.json: merge needs nothing else.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune.errors import SkytuneError
from skytune.recipe import Recipe, apply_overrides, deep_merge, recipe_from_dict

log = logging.getLogger("skytune")

_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


# ---------------------------------------------------------------------------------------
# Stages


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """Every stage as a validated Recipe; stage i > 0 starts from stage i-1's run by default.
    Fails before anything trains if any stage is invalid, naming it: stages[1].train.lr: ..."""
    from skytune.sync import run_id

    base = {k: v for k, v in (recipe._raw or recipe.to_dict()).items() if k != "stages"}
    out: list[Recipe] = []
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise SkytuneError(f"{where}: a stage is a mapping like {{name: sft, method: sft, "
                               "data: {...}}}")
        stage = dict(stage)
        name = str(stage.pop("name", None) or stage.get("method") or f"stage{i + 1}")
        if not _STAGE_NAME.match(name):
            raise SkytuneError(f"{where}.name: {name!r}: use lowercase letters, digits, '_', '-'")
        if "stages" in stage:
            raise SkytuneError(f"{where}.stages: stages cannot be nested")
        data = apply_overrides(deep_merge(base, stage), recipe._overrides)
        data["name"] = f"{recipe.name}-{name}"
        if out and "init_from" not in stage:
            prev = out[-1]
            data["init_from"] = f"{prev.store_url()}/{run_id(prev)}"
        try:
            r = recipe_from_dict(data, base_dir=recipe.base_dir, source=where)
        except SkytuneError as e:
            # "stages[1]: train.lr: must be > 0" -> "stages[1].train.lr: must be > 0"
            raise SkytuneError(re.sub(rf"^({re.escape(where)}): ([a-z_]+(?:\.[a-z_0-9]+)*): ",
                                      r"\1.\2: ", str(e))) from None
        out.append(r)
    if not out:
        raise SkytuneError("stages: empty list; remove it or list at least one stage")
    return out


def run_pipeline(recipe: Recipe, resume: str = "auto", dry_run: bool = False) -> dict[str, Any]:
    """Run the stages in order; each stage's run URL is the next one's init_from."""
    from skytune.train import run

    stages = stage_recipes(recipe)
    explicit = [isinstance(s, dict) and "init_from" in s for s in recipe.stages]
    results: list[dict[str, Any]] = []
    for i, stage in enumerate(stages):
        if i > 0 and not explicit[i] and results[-1].get("run_url") \
                and stage.init_from != results[-1]["run_url"]:
            # --resume never gives the previous stage a fresh (timestamped) run id
            stage = stage.model_copy(update={"init_from": results[-1]["run_url"]})
        log.info("stage %d/%d: %s (%s)", i + 1, len(stages), stage.name, stage.method)
        result = run(stage, resume=resume, dry_run=dry_run)
        results.append({"stage": stage.name, **result})
    last = results[-1]
    return {"pipeline": recipe.name, "stages": results, "status": last.get("status"),
            "run_id": last.get("run_id"), "run_url": last.get("run_url"), "step": last.get("step")}


# ---------------------------------------------------------------------------------------
# Where a stage starts


@dataclass(frozen=True)
class Start:
    """A base model directory or hub id, and an adapter to keep training (None: fresh)."""

    model_path: str
    adapter_dir: Path | None = None
    init_from: str | None = None


def fetch_start(recipe: Recipe, work_dir: Path) -> Start:
    """Resolve recipe.init_from to local files: <run>/adapter (preferred) or <run>/merged."""
    from skytune.train.common import resolve_model

    if not recipe.init_from:
        return Start(resolve_model(recipe.model))
    src = _location(recipe)
    local = Path(src.removeprefix("file://"))
    if "://" not in src or src.startswith("file://"):
        if (local / "adapter_config.json").is_file():
            return _adapter_start(recipe, local)
        if (local / "config.json").is_file():
            return Start(str(local), None, recipe.init_from)
    from skytune.sync import fetch_run_artifact, split_run_url

    store, rid = split_run_url(src)
    got = fetch_run_artifact(store, rid, ["adapter", "merged"], work_dir)
    if got is None:
        raise SkytuneError(f"init_from {recipe.init_from}: no complete adapter/ or merged/ in "
                           f"{store.url}/{rid}; did that run finish? (`skytune runs {store.url}`)")
    name, dst = got
    if name == "adapter":
        return _adapter_start(recipe, dst)
    return Start(str(dst), None, recipe.init_from)


def _location(recipe: Recipe) -> str:
    """init_from with a relative local path (or file://relative) made relative to the recipe."""
    src = recipe.init_from or ""
    if src.startswith("file://") and not src.startswith("file:///"):
        return "file://" + recipe.path(src.removeprefix("file://"))
    return recipe.path(src)


def _adapter_start(recipe: Recipe, adapter_dir: Path) -> Start:
    from skytune.train.common import resolve_model

    meta_file = adapter_dir / "skytune.json"
    base = json.loads(meta_file.read_text()).get("base_model") if meta_file.is_file() else None
    if base and base != recipe.model:
        raise SkytuneError(f"init_from {recipe.init_from}: its adapter was trained on {base} but "
                           f"model: is {recipe.model}; set model: {base}")
    return Start(resolve_model(base or recipe.model), adapter_dir, recipe.init_from)


def load_start(recipe: Recipe, start: Start, dev, cls: Any = None, reference: bool = False,
               tuned: Any = None):
    """(model, peft_config, ref_model) for the trainer.

    No adapter to start from: the base (quantized for qlora) and a fresh LoRA config.
    An adapter with lora/qlora: base + that adapter, trainable; TRL adds the frozen "ref" copy.
    An adapter with a full fine-tune: merged into the base in memory; with `reference` (DPO)
    a frozen copy of that merged model is the reference, as there is no adapter to switch off."""
    from skytune.train import common

    model = common.load_model(recipe, start.model_path, dev, cls,
                              attention=tuned.attention if tuned else "sdpa",
                              checkpointing=bool(tuned and tuned.checkpointing))
    if start.adapter_dir is None:
        return model, common.lora_config(recipe.adapter), None
    from peft import PeftModel

    if recipe.adapter.type == "full":
        model = PeftModel.from_pretrained(model, str(start.adapter_dir)).merge_and_unload()
        ref = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        return model, None, ref
    log.info("continuing the adapter from %s (its r/alpha/targets apply; adapter.r etc. in "
             "this recipe are not used)", start.init_from)
    model = PeftModel.from_pretrained(model, str(start.adapter_dir), is_trainable=True)
    return model, None, None
