"""Supervised fine-tuning (LoRA, QLoRA or full) through TRL's SFTTrainer.

    skytune train jobs/recipes/demo.yaml            # what the SkyPilot task runs

Steps: prepare data -> load tokenizer and model -> build SFTConfig -> SFTTrainer ->
Session.train (resume, checkpoints to the store, final adapter). Loss is on completions
only: TRL masks the prompt for prompt/completion rows and, with the chat template's
{% generation %} marks, everything but assistant turns for messages rows.
"""

from __future__ import annotations

from typing import Any

from skytune.data import prepare
from skytune.recipe import Recipe
from skytune.train import common, fast, pipeline
from skytune.train.session import Session


def sft_config(recipe: Recipe, dev: common.Device, session: Session, fmt: str, tuned):
    from trl import SFTConfig

    return SFTConfig(
        **common.training_kwargs(recipe, dev, session.output_dir, tuned),
        max_length=recipe.train.max_length,
        # Best-fit packing into max_length bins; padding-free: a micro-batch of bins runs as
        # one row whose samples attend only to themselves (fast.VARLEN).
        packing=tuned.packing,
        completion_only_loss=None,  # TRL: on for prompt/completion rows
        assistant_only_loss=fmt == "messages",
        dataset_num_proc=None,
    )


def build_trainer(recipe: Recipe, dev: common.Device, session: Session, tuned, model,
                  peft_config, tokenizer, data):
    from datasets import Dataset
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, dev, session, data.format, tuned),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=session.callbacks(),
    )
    fast.apply(trainer.model, tuned, autocast=trainer.args.bf16 or trainer.args.fp16)
    return trainer


def train(recipe: Recipe, resume: str = "auto", dry_run: bool = False) -> dict[str, Any]:
    dev = common.detect_device()
    data = prepare(recipe.data, "sft", recipe.path, seed=recipe.train.seed)
    if data.format == "vision":  # image + question -> answer: a vision-language model
        from skytune.train import vlm

        return vlm.train(recipe, data, resume=resume, dry_run=dry_run)
    model_path = common.resolve_model(recipe.model)
    tokenizer = common.load_tokenizer(model_path)
    session = Session(recipe, resume=resume)
    tuned = common.tuning(recipe, dev, model_path, packable=True)
    if dry_run:
        return common.describe(recipe, dev, data, model_path,
                               sft_config(recipe, dev, session, data.format, tuned), tuned)
    if done := session.start():
        return done
    start = pipeline.fetch_start(recipe, session.work / "init")  # base, or init_from's run
    model, peft_config, _ = pipeline.load_start(recipe, start, dev, tuned=tuned)
    trainer = build_trainer(recipe, dev, session, tuned, model, peft_config, tokenizer, data)

    # after an out-of-memory in the first steps: one step smaller, same model (its adapter)
    return session.train(trainer, tuning=tuned, rebuild=lambda down, m: build_trainer(
        recipe, dev, session, down, m, None, tokenizer, data))
