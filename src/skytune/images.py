"""Which Docker image a recipe runs in. The image tags are defined here and nowhere else.

    from skytune.images import image_for
    image_for(recipe)            # 'ghcr.io/skytune/skytune:0.1.0-default'
                                 # or ':0.1.0-unsloth' when adapter.backend is unsloth

Each image is built from a locked dependency set under images/<name>/ (requirements.in ->
requirements.lock); the root Dockerfile builds either (`--build-arg IMAGE=unsloth`). Set SKYTUNE_IMAGE_REPO to use images you pushed to your own registry
(e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/skytune); images/README.md says how.
SkyPilot wants `docker:<ref>` in `image_id`; launch.py adds that prefix.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from skytune import __version__

if TYPE_CHECKING:
    from skytune.recipe import Recipe

IMAGE_REPO = "ghcr.io/skytune/skytune"
# Image name -> the directory holding its requirements.in / requirements.lock.
IMAGES = {"default": "images/default", "unsloth": "images/unsloth"}


def image_repo() -> str:
    return os.environ.get("SKYTUNE_IMAGE_REPO", "").strip().rstrip("/") or IMAGE_REPO


def image_tag(name: str = "default", version: str = __version__) -> str:
    """'ghcr.io/skytune/skytune:0.1.0-default'. Tags carry the skytune version because the
    image holds that skytune, and a lock change ships as a new skytune release."""
    if name not in IMAGES:
        from skytune.errors import SkytuneError

        raise SkytuneError(f"unknown image {name!r}; choose one of {', '.join(IMAGES)}")
    return f"{image_repo()}:{version}-{name}"


def image_name(recipe: Recipe | None) -> str:
    """'unsloth' for adapter.backend: unsloth (its pins conflict with the default stack)."""
    if recipe is not None and recipe.adapter.backend == "unsloth":
        return "unsloth"
    return "default"


def image_for(recipe: Recipe | None) -> str:
    """The image a recipe's SkyPilot task runs in; None: the default image."""
    return image_tag(image_name(recipe))
