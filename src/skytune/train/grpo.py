"""Group relative policy optimization (LoRA, QLoRA or full) through TRL's GRPOTrainer.

    skytune train jobs/recipes/math-qa-sft-grpo.yaml    # sft, then grpo with math_exact

Steps: prepare prompt rows (other columns, e.g. `answer`, reach the rewards) -> rewards
(built-ins or module:function, each checked) -> tokenizer -> GRPOConfig -> start model ->
GRPOTrainer -> Session.train.

Each optimizer step samples grpo.num_generations completions per prompt, scores them with
the rewards, and pushes up the better-than-group-average ones. With grpo.beta 0 (the
default, as in DAPO/Dr. GRPO) there is no reference model at all; with beta > 0 the
reference is the adapter-disabled model or TRL's frozen "ref" copy of init_from's adapter.
"""

from __future__ import annotations

from typing import Any

from skytune.data import prepare
from skytune.errors import SkytuneError
from skytune.recipe import Recipe
from skytune.rewards import load_rewards
from skytune.train import common, pipeline
from skytune.train.session import Session


def generation_batch(recipe: Recipe, dev: common.Device) -> int:
    """Micro-batch so that micro_batch x grad_accum x GPUs holds whole prompt groups."""
    g = recipe.grpo.num_generations
    if recipe.train.micro_batch == "auto":
        return g  # one prompt's group per micro-batch: memory grows with completions, not prompts
    mb = recipe.train.micro_batch
    total = mb * recipe.train.grad_accum * common.world_size()
    if total % g:
        raise SkytuneError(f"train.micro_batch x train.grad_accum x GPUs = {total} must be a "
                           f"multiple of grpo.num_generations ({g}): each prompt's {g} "
                           "completions are scored as one group; set train.micro_batch: auto")
    return mb


def grpo_config(recipe: Recipe, dev: common.Device, session: Session, tuned):
    from trl import GRPOConfig

    g = recipe.grpo
    if g.reward_weights is not None and len(g.reward_weights) != len(recipe.rewards):
        raise SkytuneError(f"grpo.reward_weights: {len(g.reward_weights)} weights for "
                           f"{len(recipe.rewards)} rewards; give one weight per reward")
    mb = generation_batch(recipe, dev)
    kwargs = common.training_kwargs(recipe, dev, session.output_dir, tuned)
    kwargs.update(per_device_train_batch_size=mb, per_device_eval_batch_size=g.num_generations)
    return GRPOConfig(
        **kwargs,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        beta=g.beta,
        temperature=g.temperature,
        reward_weights=g.reward_weights,
        log_completions=False,
    )


def train(recipe: Recipe, resume: str = "auto", dry_run: bool = False) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOTrainer

    dev = common.detect_device()
    data = prepare(recipe.data, "grpo", recipe.path, seed=recipe.train.seed)
    rewards = load_rewards(recipe.rewards, base_dir=recipe.base_dir)
    model_path = common.resolve_model(recipe.model)
    tokenizer = common.load_tokenizer(model_path)
    tokenizer.padding_side = "left"  # generation appends on the right
    session = Session(recipe, resume=resume)
    tuned = common.tuning(recipe, dev, model_path)
    args = grpo_config(recipe, dev, session, tuned)
    if dry_run:
        out = common.describe(recipe, dev, data, model_path, args, tuned)
        if args.max_steps <= 0:  # each prompt fills num_generations rows of a batch
            out["steps"] *= args.num_generations
        return {**out, "rewards": recipe.rewards, "num_generations": args.num_generations,
                "init_from": recipe.init_from}
    if done := session.start():
        return done
    start = pipeline.fetch_start(recipe, session.work / "init")
    model, peft_config, _ = pipeline.load_start(recipe, start, dev, tuned=tuned)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=session.callbacks(zero_grad_ok=True),  # equal rewards in a group: no signal
    )
    return session.train(trainer, tuning=tuned)
