"""Training entry point: one module per method, picked by the recipe.

    from skytune.train import run
    result = run(load_recipe("jobs/recipes/demo.yaml"))   # {"run_id", "run_url", "step", ...}

Modules are imported on use so that importing skytune.train stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from skytune.recipe import Recipe

METHODS = {"sft": "skytune.train.sft", "dpo": "skytune.train.dpo", "grpo": "skytune.train.grpo"}


def run(recipe: Recipe, resume: str = "auto", dry_run: bool = False) -> dict[str, Any]:
    if recipe.stages:
        from skytune.train.pipeline import run_pipeline

        return run_pipeline(recipe, resume=resume, dry_run=dry_run)
    module = importlib.import_module(METHODS[recipe.method])
    return module.train(recipe, resume=resume, dry_run=dry_run)
