"""Direct preference optimization (LoRA, QLoRA or full) through TRL's DPOTrainer.

    skytune train jobs/recipes/hallucination-sft-dpo.yaml     # sft, then dpo from its adapter

Steps: prepare prompt/chosen/rejected rows -> tokenizer -> DPOConfig -> start model (base,
or init_from's adapter kept trainable) -> DPOTrainer -> Session.train.

The reference model is the frozen starting point, never a second copy of the base where an
adapter makes it unnecessary: a fresh LoRA's reference is the base with the adapter switched
off; a continued SFT adapter's reference is TRL's frozen "ref" copy of it (see
pipeline.load_start). Only a full fine-tune holds two whole models.
"""

from __future__ import annotations

from typing import Any

from skytune.data import prepare
from skytune.errors import SkytuneError
from skytune.recipe import Recipe
from skytune.train import common, fast, pipeline
from skytune.train.session import Session


def dpo_config(recipe: Recipe, dev: common.Device, session: Session, tuned):
    from trl import DPOConfig

    d = recipe.dpo
    if d.max_prompt_length is not None:
        raise SkytuneError("dpo.max_prompt_length: TRL 1.16 cuts prompt + reply together at "
                           "train.max_length; remove dpo.max_prompt_length and set that")
    return DPOConfig(
        **common.training_kwargs(recipe, dev, session.output_dir, tuned),
        beta=d.beta,
        loss_type=[d.loss_type],
        max_length=recipe.train.max_length,
        precompute_ref_log_probs=False,  # the reference runs alongside: no extra pass, no cache
        dataset_num_proc=None,
    )


def build_trainer(recipe: Recipe, dev: common.Device, session: Session, tuned, model,
                  ref_model, peft_config, tokenizer, data):
    from datasets import Dataset
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,  # None: TRL uses the adapter-disabled model or the "ref" adapter
        args=dpo_config(recipe, dev, session, tuned),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=session.callbacks(),
    )
    fast.apply(trainer.model, tuned, autocast=trainer.args.bf16 or trainer.args.fp16)
    if tuned.padding_free:
        # chosen and rejected rows pad to the longest; the decoder then sees real tokens only
        for m in (trainer.model, ref_model):
            if m is not None:
                fast.padding_free_backbone(m.get_base_model() if hasattr(m, "get_base_model")
                                           else m)
    return trainer


def train(recipe: Recipe, resume: str = "auto", dry_run: bool = False) -> dict[str, Any]:
    dev = common.detect_device()
    data = prepare(recipe.data, "dpo", recipe.path, seed=recipe.train.seed)
    model_path = common.resolve_model(recipe.model)
    tokenizer = common.load_tokenizer(model_path)
    session = Session(recipe, resume=resume)
    tuned = common.tuning(recipe, dev, model_path)
    if dry_run:
        return {**common.describe(recipe, dev, data, model_path,
                                  dpo_config(recipe, dev, session, tuned), tuned),
                "beta": recipe.dpo.beta, "init_from": recipe.init_from}
    if done := session.start():
        return done
    start = pipeline.fetch_start(recipe, session.work / "init")
    model, peft_config, ref_model = pipeline.load_start(recipe, start, dev, reference=True,
                                                        tuned=tuned)
    trainer = build_trainer(recipe, dev, session, tuned, model, ref_model, peft_config,
                            tokenizer, data)

    # after an out-of-memory in the first steps: one step smaller, same model (its adapter)
    return session.train(trainer, tuning=tuned, rebuild=lambda down, m: build_trainer(
        recipe, dev, session, down, m, ref_model, None, tokenizer, data))
