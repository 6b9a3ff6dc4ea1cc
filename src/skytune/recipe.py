"""The recipe: one YAML file describes a fine-tuning job. This schema is the one source of truth.

    from skytune.recipe import load_recipe
    recipe = load_recipe("jobs/recipes/demo.yaml", overrides=["train.max_steps=20"])
    recipe.train.lr          # 0.0002, filled by the preset and method defaults

Every field has a description (it feeds the docs and `--help`), choices are Literals,
unknown keys fail with a did-you-mean, and defaults that depend on other fields
(learning rate by method and adapter, LoRA alpha) are filled in one validator.
Relative paths in a recipe are relative to the recipe file, not the working directory.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from skytune.errors import SkytuneError

Method = Literal["sft", "dpo", "grpo"]
PresetName = Literal["fast_test", "default", "low_memory"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Adapter(_Section):
    type: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora: bf16 base + LoRA; qlora: quantized base (adapter.bits) + LoRA; "
        "full: every weight trains, no adapter.",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2*r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout (PEFT's default 0: dropout copies every "
        "adapted input, in memory and time).")
    targets: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' or a list of names."
    )
    bits: Literal[4, 8] = Field(
        4, description="qlora only: 4 = NF4 with double quantization, 8 = LLM.int8."
    )
    backend: Literal["peft", "unsloth"] = Field(
        "peft", description="peft (default image) or unsloth (images/unsloth)."
    )


class Data(_Section):
    train: str = Field(..., description="Training data: local path (relative to the recipe), "
                       "s3://bucket/key or hf://datasets/org/name[:split].")
    eval: str | None = Field(None, description="Evaluation data, same forms as train.")
    format: Literal[
        "auto", "messages", "prompt_completion", "qa", "preference", "prompt", "vision"
    ] = Field("auto", description="Row format; auto detects it from the first row's keys.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map skytune's field names to your columns, e.g. {question: q, answer: a}.",
    )
    system_prompt: str | None = Field(None, description="System message prepended to each prompt.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train for eval when eval is unset."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (smoke tests).")


class Train(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float | None = Field(
        None, gt=0, description="Learning rate; default by method and adapter (see DEFAULT_LR)."
    )
    micro_batch: int | Literal["auto"] = Field(
        "auto", description="Sequences per GPU per forward pass; auto picks from memory."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, gt=0, description="Tokens per sequence; longer ones are cut.")
    save_every: int = Field(200, gt=0, description="Checkpoint every N optimizer steps.")
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (needs eval).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps warming up lr.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    optimizer: str = Field("adamw_torch", description="A transformers optim name.")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward to save memory; auto decides."
    )
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack short sequences into full rows (SFT); attention stays per sample."
    )
    attention: Literal["auto", "varlen", "sdpa", "eager", "flex_attention",
                       "flash_attention_2"] = Field(
        "auto", description="auto: varlen (FlashAttention's per-sample kernel in torch) for "
        "SFT/DPO on GPUs, else sdpa.")
    liger: bool | Literal["auto"] = Field(
        "auto", description="Liger's RMSNorm/SwiGLU/RoPE kernels; auto: on GPUs where installed.")


class DPO(_Section):
    beta: float = Field(0.1, gt=0, description="Strength of the KL pull to the reference model.")
    loss_type: str = Field("sigmoid", description="TRL DPO loss type.")
    max_prompt_length: int | None = Field(None, gt=0)


class GRPO(_Section):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt.")
    max_completion_length: int = Field(256, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient (0 = no reference model).")
    temperature: float = Field(1.0, gt=0)
    reward_weights: list[float] | None = Field(None, description="One weight per reward.")


class Output(_Section):
    store: str = Field(
        "file://runs",
        description="Where runs live: file://DIR (relative to the recipe), s3://bucket/prefix, "
        "hf://org/repo.",
    )
    run_id: str | None = Field(
        None, description="Run id; default: name + SkyPilot task id or recipe hash (stable)."
    )
    keep_last: int = Field(3, gt=0, description="Checkpoints kept in the store.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (R2, MinIO); else AWS_ENDPOINT_URL or AWS."
    )
    merge: bool = Field(False, description="Merge the adapter into the full-precision base.")
    merge_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    push: str | None = Field(None, description="hf://org/name: push the final model to the Hub.")
    private: bool = Field(True, description="Hub repos are created private.")


class Launch(_Section):
    gpus: str | list[str] | None = Field(
        None, description="e.g. 'H100:1' or a list of choices; default from the method."
    )
    clouds: list[str] | None = Field(None, description="Allowed clouds; default: all enabled.")
    spot: bool = Field(True, description="Prefer spot, fall back to on-demand.")
    managed: bool = Field(False, description="Managed job: SkyPilot recovers from preemption.")
    disk_gb: int | None = Field(None, gt=0, description="Disk; default sized from the model.")
    image: str | None = Field(None, description="Docker image; default skytune's pinned image.")
    num_nodes: int = Field(1, gt=0)
    idle_minutes_to_autostop: int = Field(
        5, ge=0, description="Tear the cluster down after this many idle minutes."
    )


class Recipe(_Section):
    name: str = Field(
        ..., pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Run name: lowercase letters, digits, '.', '_', '-'.",
    )
    model: str = Field(..., description="Hub id, local path, tiny:llama / tiny:qwen (tests), or random:<hub id> (random weights, for benchmarks).")
    method: Method = "sft"
    preset: PresetName = Field("default", description="Fills defaults; your keys still win.")
    init_from: str | None = Field(
        None, description="Start from a previous run (store URL or run dir), adapter or merged."
    )
    adapter: Adapter = Field(default_factory=Adapter)
    data: Data
    train: Train = Field(default_factory=Train)
    dpo: DPO = Field(default_factory=DPO)
    grpo: GRPO = Field(default_factory=GRPO)
    rewards: list[str] = Field(
        default_factory=list,
        description="GRPO rewards: built-in names or module:function in the recipe's directory.",
    )
    output: Output = Field(default_factory=Output)
    launch: Launch = Field(default_factory=Launch)
    stages: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Pipeline: each stage overrides keys of this recipe; a stage's output "
        "is the next stage's init_from.",
    )

    # Where the recipe file lives; relative paths resolve against it.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    # The recipe as written (before presets and dependent defaults) and its --set overrides:
    # pipeline stages merge over this, so a dpo stage gets dpo's defaults, not sft's.
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _dependent_defaults(self) -> Recipe:
        if self.adapter.alpha is None:
            self.adapter.alpha = 2 * self.adapter.r
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method]["full" if self.adapter.type == "full" else "lora"]
        if self.method == "grpo" and not self.rewards and not self.stages:
            raise ValueError("method grpo needs rewards: e.g. rewards: [math_exact]")
        return self

    def path(self, p: str) -> str:
        """A data/store path as written in the recipe, made absolute if it is local."""
        if "://" in p or p.startswith(("tiny:", "random:")):
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (self.base_dir / q).resolve())

    def store_url(self) -> str:
        url = self.output.store
        if url.startswith("file://"):
            return "file://" + self.path(url[len("file://"):])
        return url

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"base_dir"})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Short hash of everything that changes training (not output/launch placement)."""
        d = self.to_dict()
        for k in ("output", "launch"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


# Learning rates that work for most 1-13B models (TRL and Axolotl examples agree on these).
DEFAULT_LR: dict[str, dict[str, float]] = {
    "sft": {"lora": 2e-4, "full": 1e-5},
    "dpo": {"lora": 5e-6, "full": 5e-7},
    "grpo": {"lora": 1e-6, "full": 1e-6},
}

# Presets fill defaults under the user's keys (user values always win).
_FAST = {"train": {"max_steps": 10, "save_every": 5, "log_every": 1, "max_length": 256,
                   "micro_batch": 2, "warmup_ratio": 0.0}}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"sft": {}, "dpo": {}, "grpo": {}},
    "fast_test": {
        "sft": _FAST,
        "dpo": _FAST,
        "grpo": {**_FAST, "grpo": {"num_generations": 2, "max_completion_length": 32}},
    },
    "low_memory": {
        m: {"adapter": {"type": "qlora", "bits": 4},
            "train": {"micro_batch": 1, "grad_accum": 16, "gradient_checkpointing": True,
                      "max_length": 1024}}
        for m in ("sft", "dpo", "grpo")
    },
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested dicts merge; lists and scalars replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002). Values are YAML: 3, true, [a, b], null."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SkytuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 as a string; a number is what the user meant
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def recipe_from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "recipe",
    lines: dict[tuple[str, ...], int] | None = None, set_keys: list[list[str]] | None = None,
) -> Recipe:
    """Validate a recipe dict (presets applied) or raise SkytuneError naming the field."""
    if not isinstance(data, dict):
        raise SkytuneError(f"{source}: a recipe is a YAML mapping (name:, model:, data:, ...)")
    raw = copy.deepcopy(data)
    method = data.get("method", "sft")
    preset = data.get("preset", "default")
    if preset in PRESETS and method in PRESETS[preset]:
        data = deep_merge(PRESETS[preset][method], data)
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as e:
        raise SkytuneError(_explain(e, source, lines or {}, set_keys or [])) from None
    recipe._raw = raw
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply `--set` overrides and presets, validate."""
    p = Path(path)
    if not p.is_file():
        raise SkytuneError(f"{path}: no such recipe file")
    try:
        text = p.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise SkytuneError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SkytuneError(f"{path}{where}: invalid YAML: {problem}") from None
    overrides = overrides or []
    if isinstance(data, dict):
        data = apply_overrides(data, overrides)
    recipe = recipe_from_dict(
        data, base_dir=p.resolve().parent, source=str(path), lines=_line_map(node),
        set_keys=[parse_override(o)[0] for o in overrides],
    )
    recipe._overrides = list(overrides)
    return recipe


def _line_map(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """YAML node tree -> {('train', 'lr'): 12, ...} (1-based lines of each key)."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (str(k.value),)
            out[key] = k.start_mark.line + 1
            out.update(_line_map(v, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = prefix + (str(i),)
            out[key] = v.start_mark.line + 1
            out.update(_line_map(v, key))
    return out


_SECTIONS: dict[str, type[BaseModel]] = {
    "adapter": Adapter, "data": Data, "train": Train, "dpo": DPO, "grpo": GRPO,
    "output": Output, "launch": Launch,
}


def _explain(e: ValidationError, source: str, lines: dict, set_keys: list[list[str]]) -> str:
    err = e.errors()[0]
    loc = tuple(str(x) for x in err["loc"] if not str(x).startswith(("int", "literal", "list[")))
    loc = tuple(x for x in loc if x not in ("str", "bool", "float", "function-after[_check()]"))
    field = ".".join(loc) or "recipe"
    where = f"{source}"
    if any(list(loc[: len(k)]) == k for k in set_keys):
        where = "--set"
    elif loc in lines:
        where = f"{source}: line {lines[loc]}"
    elif loc[:-1] in lines:
        where = f"{source}: line {lines[loc[:-1]]}"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _SECTIONS.get(loc[0], Recipe) if len(loc) > 1 else Recipe
        names = [n for n in model.model_fields if n != "base_dir"]
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
        section = f" in {'.'.join(loc[:-1])}" if len(loc) > 1 else ""
        return f"{where}: unknown key '{loc[-1]}'{section}; {hint}{more}"
    if kind == "missing":
        return f"{where}: {field} is required; add it to the recipe{more}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if isinstance(got, dict) or kind == "value_error" else f" (got {got!r})"
    return f"{where}: {field}: {msg}{got_s}{more}"
