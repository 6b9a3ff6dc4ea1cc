"""Tiny random models with a real tokenizer, built locally, so tests and the demo run offline.

    from skytune.tiny import resolve
    path = resolve("tiny:llama")            # builds once into ~/.cache/skytune/tiny/, returns dir
    AutoModelForCausalLM.from_pretrained(path)  # a normal hub-style model directory

Names: tiny:llama, tiny:qwen, optionally sized: tiny:llama-h512-l4 (hidden 512, 4 layers);
tiny:vlm is a vision-language model (Llava: a 1-layer CLIP vision tower on tiny:llama) saved
with a processor, loaded by AutoModelForImageTextToText + AutoProcessor like a hub VLM.
The tokenizer is a byte-level BPE trained on the repo's sample data (plus a built-in corpus,
so it also works from an installed wheel), with a ChatML chat template that marks assistant
turns with {% generation %} so TRL can compute assistant-only loss.
Building is deterministic (fixed seed) and atomic (temp dir + rename), so parallel
processes (torchrun ranks, test workers) can race safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skytune.errors import SkytuneError

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = namespace(v='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set text.v = text.v + '<image>' %}"
    "{% else %}{% set text.v = text.v + part['text'] %}{% endif %}{% endfor %}"
    "{% set text = text.v %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ text + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ text + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
VOCAB_SIZE = 2048

_CORPUS = """
The quick brown fox jumps over the lazy dog. A language model predicts the next token.
Question: What is two plus three? Answer: Two plus three is five.
Fine-tuning adapts a pretrained model to a task with a small learning rate.
LoRA adds low-rank matrices to linear layers; only they are trained.
Paris is the capital of France. Water boils at 100 degrees Celsius at sea level.
0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 + - * / = ( ) . , ; : ? ! ' " # % & @
"""


@dataclass(frozen=True)
class TinySpec:
    family: str  # llama | qwen | vlm
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    @property
    def intermediate(self) -> int:
        return self.hidden * 2 if self.hidden <= 128 else int(self.hidden * 8 / 3) // 64 * 64

    @property
    def name(self) -> str:
        return f"{self.family}-h{self.hidden}-l{self.layers}"


def parse(name: str) -> TinySpec:
    m = re.fullmatch(r"tiny:(llama|qwen|vlm)(?:-h(\d+))?(?:-l(\d+))?", name)
    if not m:
        raise SkytuneError(f"model {name!r}: tiny models are tiny:llama, tiny:qwen or tiny:vlm "
                           "(optionally sized, e.g. tiny:llama-h512-l4)")
    hidden = int(m.group(2) or 64)
    heads = max(4, hidden // 64)
    return TinySpec(m.group(1), hidden, int(m.group(3) or 2), heads, max(1, heads // 2))


def cache_dir() -> Path:
    return Path(os.environ.get("SKYTUNE_CACHE", Path.home() / ".cache" / "skytune")) / "tiny"


def config_for(name: str):
    """The transformers config of a tiny model (no weights built)."""
    spec = parse(name)
    if spec.family == "vlm":
        return vlm_config(spec)
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if spec.family == "llama" else Qwen2Config
    return cls(
        vocab_size=VOCAB_SIZE, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
        rope_theta=10000.0,
        # Larger than real models' 0.02: a 2-layer random model then has non-flat logits,
        # so a LoRA adapter visibly lowers the loss within a few dozen CPU steps.
        initializer_range=0.2 if spec.hidden <= 128 else 0.02,
    )


def resolve(name: str) -> str:
    """Directory of the tiny model `name`, built on first use."""
    spec = parse(name)
    texts = _corpus_texts()
    digest = hashlib.sha256(("\n".join(texts) + spec.name + "v2").encode()).hexdigest()[:10]
    target = cache_dir() / f"{spec.name}-{digest}"
    if (target / "config.json").is_file():
        return str(target)

    def fill(tmp: Path) -> None:
        tokenizer = build_tokenizer(texts)
        (build_processor(tokenizer) if spec.family == "vlm" else tokenizer).save_pretrained(tmp)
        build_model(name).save_pretrained(tmp)
        (tmp / "skytune-tiny.json").write_text(json.dumps({"name": name, "spec": spec.name}))

    return _build_atomically(target, fill)


def _build_atomically(target: Path, fill) -> str:
    """fill(tmp) in a temp dir beside target, then rename: racing processes are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_random(name: str) -> str:
    """Directory of `random:<model>`: that model's architecture (from skytune's catalog, no
    download) with random weights made at load time on the GPU, and the tiny tokenizer. For
    throughput benchmarks: the FLOPs and memory of an 8B model without its weights."""
    from skytune.models_catalog import arch_for

    arch = arch_for(name.removeprefix("random:"))
    digest = hashlib.sha256(json.dumps(arch.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / f"random-{re.sub(r'[^A-Za-z0-9.-]', '-', arch.name)}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch.qkv_bias else LlamaConfig
    config = cls(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads, head_dim=arch.hd, tie_word_embeddings=arch.tied,
        max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=None,
        eos_token_id=2, pad_token_id=0,
    )

    def fill(tmp: Path) -> None:
        build_tokenizer(_corpus_texts()).save_pretrained(tmp)
        config.save_pretrained(tmp)
        (tmp / "skytune-random.json").write_text(json.dumps({"name": name}))

    return _build_atomically(target, fill)


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>", "<image>"],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(name: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = config_for(name)
    cls = AutoModelForImageTextToText if parse(name).family == "vlm" else AutoModelForCausalLM
    torch.manual_seed(seed)
    return cls.from_config(cfg, dtype=torch.float32)


def _corpus_texts() -> list[str]:
    """The built-in corpus plus every text file shipped under jobs/recipes/data (if present)."""
    texts = [_CORPUS]
    root = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "data"
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.suffix in (".jsonl", ".json", ".txt", ".csv") and p.stat().st_size < 4_000_000:
                texts.append(p.read_text(encoding="utf-8", errors="ignore"))
    return texts


# ---------------------------------------------------------------------------------------
# tiny:vlm — Llava (CLIP vision tower + projector + the tiny Llama), 32x32 images, 16 image
# tokens each. Llava because transformers builds it from a config alone, offline, and its
# processor needs only a PIL image processor (no torchvision).

VLM_IMAGE_SIZE, VLM_PATCH = 32, 8


def vlm_config(spec: TinySpec):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2 if spec.hidden <= 128 else 0.02,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=VLM_IMAGE_SIZE, patch_size=VLM_PATCH, projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def build_processor(tokenizer):
    """LlavaProcessor: PIL image processor (32x32) + the tiny tokenizer (it has <image>)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": VLM_IMAGE_SIZE},
                                   crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE})
    # "default" drops CLIP's CLS token: (32/8)^2 + 1 - 1 = 16 <image> tokens per image.
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=VLM_PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
