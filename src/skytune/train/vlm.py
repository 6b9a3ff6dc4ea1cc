"""Vision SFT: image + question -> answer, through SFTTrainer's vision-language support.

    skytune train jobs/recipes/gemma3-12b-vision-cot.yaml   # google/gemma-3-12b-it, seed 003

sft.py hands over here when the data is in the vision format. Steps: rows (prompt with
{"type": "image"} parts, completion, absolute image paths; data.py has checked every image)
-> AutoProcessor (image processor + tokenizer + chat template) -> SFTConfig -> start model
through AutoModelForImageTextToText (Gemma 3, Qwen2-VL, Llava, tiny:vlm) -> SFTTrainer ->
Session.train. TRL's vision collator fills the image placeholders, runs the processor per
batch and masks the prompt (image tokens included) out of the loss.
"""

from __future__ import annotations

from typing import Any

from skytune.data import Prepared
from skytune.recipe import Recipe
from skytune.train import common, pipeline
from skytune.train.session import Session


def load_processor(model_path: str):
    from transformers import AutoProcessor

    processor = common._hub_call(model_path, lambda: AutoProcessor.from_pretrained(model_path))
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padded positions are masked out of the loss
    return processor


def vlm_config(recipe: Recipe, dev: common.Device, session: Session, tuned):
    from trl import SFTConfig

    return SFTConfig(
        **common.training_kwargs(recipe, dev, session.output_dir, tuned),
        max_length=recipe.train.max_length,  # keep_start: a long answer is cut, never the image
        packing=False,  # TRL cannot pack image rows
        completion_only_loss=True,
        remove_unused_columns=False,  # the collator needs the images column
        dataset_num_proc=None,
    )


def dataset(rows: list[dict]):
    """Rows with image paths -> a Dataset whose images decode to PIL lazily, per batch."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("images", datasets.List(datasets.Image()))


def train(recipe: Recipe, data: Prepared, resume: str = "auto",
          dry_run: bool = False) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText
    from trl import SFTTrainer

    dev = common.detect_device()
    model_path = common.resolve_model(recipe.model)
    processor = load_processor(model_path)
    session = Session(recipe, resume=resume)
    tuned = common.tuning(recipe, dev, model_path, vision=True)
    args = vlm_config(recipe, dev, session, tuned)
    if dry_run:
        return {**common.describe(recipe, dev, data, model_path, args, tuned),
                "processor": type(processor).__name__, "init_from": recipe.init_from}
    if done := session.start():
        return done
    start = pipeline.fetch_start(recipe, session.work / "init")
    model, peft_config, _ = pipeline.load_start(recipe, start, dev, cls=AutoModelForImageTextToText,
                                                tuned=tuned)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(data.train),
        eval_dataset=dataset(data.eval) if data.eval else None,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=session.callbacks(),
    )
    return session.train(trainer, tuning=tuned)
