"""Model architectures as plain numbers, for the memory and throughput model in `plan.py`.

    from skytune.models_catalog import arch_for
    arch = arch_for("meta-llama/Llama-3.1-8B-Instruct")
    arch.n_params()                    # 8_030_261_248
    arch.lora_params(r=16)             # 41_943_040 (all-linear)

`arch_for` knows tiny:* models (from skytune.tiny's spec, no transformers import), local
model directories (config.json), a built-in table of common hub models, and, for other hub
ids, the hub's config.json (needs network and huggingface_hub). Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skytune.errors import SkytuneError

# The linear modules PEFT's "all-linear" wraps in a llama-style decoder block (lm_head excluded).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer (llama / qwen2 / mistral / gemma style, SwiGLU MLP)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # qwen2 has biases on q, k, v
    extra_params: int = 0  # frozen parts outside the decoder (e.g. a vision tower)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_linear_params(self) -> int:
        """Weights of all linears in all blocks: what QLoRA quantizes."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def n_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.hd if self.qkv_bias else 0
        norms = self.layers * 2 * self.hidden + self.hidden
        return (self.block_linear_params() + self.layers * bias + norms
                + self.embedding_params() + self.extra_params)

    def compute_params(self) -> int:
        """Parameters that cost matmul FLOPs per token: blocks + lm_head (not the lookup)."""
        return self.block_linear_params() + self.vocab * self.hidden

    def lora_params(self, r: int, targets: str | list[str] = "all-linear") -> int:
        """LoRA A and B matrices: r * (in + out) per wrapped linear."""
        shapes = self.linear_shapes()
        names = ALL_LINEAR if targets == "all-linear" else [t for t in targets if t in shapes]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.n_params()}


def _a(name: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int,
       **kw: Any) -> Arch:
    return Arch(name, vocab, hidden, inter, layers, heads, kv, **kw)


# Numbers copied from each model's config.json on the Hub (so plan works offline).
KNOWN: dict[str, Arch] = {a.name.lower(): a for a in [
    _a("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8),
    _a("Llama-3.1-70B", 128256, 8192, 28672, 80, 64, 8),
    _a("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, head_dim=64, tied=True),
    _a("Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, tied=True),
    _a("Qwen2.5-0.5B", 151936, 896, 4864, 24, 14, 2, tied=True, qkv_bias=True),
    _a("Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, tied=True, qkv_bias=True),
    _a("Qwen2.5-3B", 151936, 2048, 11008, 36, 16, 2, tied=True, qkv_bias=True),
    _a("Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4, qkv_bias=True),
    _a("Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8, qkv_bias=True),
    _a("Mistral-7B", 32768, 4096, 14336, 32, 32, 8),
    _a("deepseek-math-7b", 102400, 4096, 11008, 30, 32, 32),
    # gemma-3-12b-it is multimodal: the SigLIP vision tower (~0.42B) loads and stays frozen.
    _a("gemma-3-12b", 262208, 3840, 15360, 48, 16, 8, head_dim=256, tied=True,
       extra_params=417_000_000),
]}

# Hub names differ only by org, an "-Instruct"/"-it" suffix or Meta's old "Meta-" prefix.
_SUFFIX = re.compile(r"-(instruct|it|chat|base|rl|v0\.\d)$")


def _known_key(model: str) -> str:
    key = model.rstrip("/").split("/")[-1].lower()
    key = key.removeprefix("meta-")
    while _SUFFIX.search(key):
        key = _SUFFIX.sub("", key)
    return key


def arch_for(model: str, base_dir: Path | None = None) -> Arch:
    """Architecture of a recipe's `model`: tiny:*, a local directory, or a hub id."""
    if model.startswith("tiny:"):
        return _tiny(model)
    if model.startswith("random:"):  # random weights, the named model's architecture
        return arch_for(model.removeprefix("random:"), base_dir)
    local = Path(model).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    if local.is_dir():
        return from_config(_read_config(local / "config.json"), name=model)
    if (known := KNOWN.get(_known_key(model))) is not None:
        return known
    return from_config(_hub_config(model), name=model)


def _tiny(model: str) -> Arch:
    from skytune import tiny  # parse() needs no transformers; config_for() would import it

    spec = tiny.parse(model)
    return Arch(model, tiny.VOCAB_SIZE, spec.hidden, spec.intermediate, spec.layers,
                spec.heads, spec.kv_heads, qkv_bias=spec.family == "qwen")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SkytuneError(f"{path.parent}: no config.json; is this a transformers model dir?")
    return json.loads(path.read_text(encoding="utf-8"))


def _hub_config(model: str) -> dict[str, Any]:
    fix = ("download it and set model: to the local directory, or add it to "
           "skytune.models_catalog.KNOWN")
    try:
        from huggingface_hub import hf_hub_download

        return _read_config(Path(hf_hub_download(model, "config.json")))
    except ImportError:
        raise SkytuneError(f"model {model!r}: not in skytune's table and huggingface_hub "
                           f"is not installed (pip install 'skytune[hub]'); or {fix}") from None
    except SkytuneError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, gated, typo: the same fix for the user
        raise SkytuneError(f"model {model!r}: cannot read its config.json from the Hub "
                           f"({type(e).__name__}); {fix}") from None


def from_config(cfg: dict[str, Any], name: str) -> Arch:
    """An Arch from a transformers config.json dict (multimodal ones: their text_config)."""
    text = cfg.get("text_config") or cfg
    try:
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        return Arch(
            name=name, vocab=int(text.get("vocab_size") or cfg["vocab_size"]), hidden=hidden,
            intermediate=int(text["intermediate_size"]),
            layers=int(text["num_hidden_layers"]), heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SkytuneError(f"model {name!r}: config.json lacks {e}; skytune's plan models "
                           "llama-style decoders (hidden_size, num_hidden_layers, ...)") from None
