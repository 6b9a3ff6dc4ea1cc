"""GRPO reward functions: built-ins by name, or your own as `module:function`.

    rewards: [math_exact, format, "my_rewards:brevity"]   # in the recipe
    funcs = load_rewards(recipe.rewards, base_dir=recipe.base_dir)   # what grpo.py does

Every reward has TRL's signature: `f(prompts, completions, **kwargs) -> list[float]`, one
value per completion; the dataset's other columns arrive as keyword lists (e.g. `answer`).
Completions are message lists ([{"role": "assistant", "content": "..."}]) for chat data,
plain strings otherwise; `completion_text` reads either.

Built-ins:
    math_exact      1.0 when the completion's final answer equals the row's `answer`
                    (\\boxed{}, "The answer is", "Answer:", commas, units, trailing periods
                    are stripped; numbers compare as numbers: "1,000.0" == "1000")
    format          1.0 when the completion has reasoning and then a final "Answer: X" line
    length_penalty  0 up to 512 characters, then down linearly to -1 at twice that

User functions `module:function` are imported from the recipe's directory (it goes on
sys.path). Each reward is wrapped so that a reward which raises, or returns the wrong number
of values, fails with one line naming it.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skytune.errors import SkytuneError, TrainingFailed

Reward = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of its message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(_content(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _content(content: Any) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


# ---------------------------------------------------------------------------------------
# Answer normalization (math_exact)

_BOXED = re.compile(r"\\boxed\s*\{")
_FINAL = re.compile(r"(?:final answer|the answer is|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.I)
_NUMBER = re.compile(r"^[-+]?(?:\d[\d,]*)?(?:\.\d+)?(?:[eE][-+]?\d+)?$")
_UNITS = re.compile(r"\s*(?:%|\$|dollars?|cents?|km|kilometers?|meters?|m|cm|kg|g|"
                    r"hours?|minutes?|seconds?|days?|years?|degrees?|°[CF]?|units?|"
                    r"[a-z]+s)\s*$", re.I)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def extract_answer(text: str) -> str:
    """The final answer in a completion: last \\boxed{}, else the last 'answer is/Answer:'
    phrase, else the last non-empty line."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hits = list(_FINAL.finditer(text))
    if hits:
        return hits[-1].group(1).strip().splitlines()[0]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_answer(text: str) -> str:
    """'$1,000.00 dollars.' -> '1000'; '\\boxed{42}' -> '42'; other text lowercased, trimmed."""
    s = str(text).strip()
    s = _last_boxed(s) or s
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s).replace("\\!", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^(?:the answer is|answer\s*[:=]?)\s*", "", s, flags=re.I).strip()
    for _ in range(2):
        unitless = _UNITS.sub("", s).strip()
        if unitless and _NUMBER.match(unitless.replace(" ", "")):
            s = unitless
    num = s.replace(",", "").replace(" ", "")
    if _NUMBER.match(num) and any(c.isdigit() for c in num):
        value = float(num)
        if math.isfinite(value):
            return str(int(value)) if value == int(value) else repr(value)
    return re.sub(r"\s+", " ", s).lower().rstrip(".")


def math_exact(prompts: list, completions: list, answer: list | None = None,
               **kwargs: Any) -> list[float]:
    """1.0 if the completion's final answer equals the reference `answer` column, else 0.0."""
    if answer is None:
        raise SkytuneError("reward math_exact needs an 'answer' column in the data (rows like "
                           '{"question": ..., "answer": "42"}); map yours with data.fields.answer')
    return [1.0 if normalize_answer(extract_answer(completion_text(c))) == normalize_answer(a)
            else 0.0 for c, a in zip(completions, answer, strict=True)]


# ---------------------------------------------------------------------------------------
# format and length

FORMAT_PATTERN = r"(?s)\S.*\n\s*Answer:\s*\S.*$"


def format_reward(prompts: list, completions: list, pattern: str = FORMAT_PATTERN,
                  **kwargs: Any) -> list[float]:
    """1.0 if the completion matches `pattern`: by default some reasoning, then a final line
    'Answer: X'. For another pattern write `my_rewards:fmt` calling this with pattern=..."""
    rx = re.compile(pattern)
    return [1.0 if rx.search(completion_text(c).strip()) else 0.0 for c in completions]


def length_penalty(prompts: list, completions: list, max_chars: int = 512,
                   **kwargs: Any) -> list[float]:
    """0 up to max_chars characters, then linearly down to -1 at 2 * max_chars (and below)."""
    return [-min(1.0, max(0, len(completion_text(c)) - max_chars) / max_chars)
            for c in completions]


BUILTIN: dict[str, Reward] = {
    "math_exact": math_exact, "format": format_reward, "length_penalty": length_penalty,
}


# ---------------------------------------------------------------------------------------
# Loading


def load_rewards(names: list[str], base_dir: Path | None = None) -> list[Reward]:
    """Each name as a checked reward function, in order."""
    if not names:
        raise SkytuneError("rewards: empty; grpo needs at least one, e.g. rewards: [math_exact]")
    return [checked(name, load_reward(name, base_dir)) for name in names]


def load_reward(name: str, base_dir: Path | None = None) -> Reward:
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, func_name = name.partition(":")
    if not sep or not module_name or not func_name:
        raise SkytuneError(f"rewards: unknown reward {name!r}; built-ins are "
                           f"{', '.join(BUILTIN)}, or write module:function for a function in "
                           "a .py file next to the recipe")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))  # the recipe's directory, as the docstring says
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = f" (looked in {base_dir})" if base_dir else ""
        raise SkytuneError(f"rewards: {name}: cannot import module {module_name!r}{where}: "
                           f"{e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed at import time
        raise SkytuneError(f"rewards: {name}: importing {module_name!r} raised "
                           f"{type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SkytuneError(f"rewards: {name}: module {module_name!r} has no function "
                           f"{func_name!r}")
    return func


def checked(name: str, func: Reward) -> Reward:
    """Wrap a reward so its failures name it; TRL logs it under `name`."""

    @functools.wraps(func)
    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        try:
            values = func(prompts=prompts, completions=completions, **kwargs)
        except SkytuneError:
            raise
        except Exception as e:  # noqa: BLE001 - any error in user code, named
            raise TrainingFailed(f"reward {name} raised {type(e).__name__}: {e}") from e
        try:
            values = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise TrainingFailed(f"reward {name} must return a list of numbers (one per "
                                 f"completion), got {type(values).__name__}") from None
        if len(values) != len(completions):
            raise TrainingFailed(f"reward {name} returned {len(values)} values for "
                                 f"{len(completions)} completions; return one per completion")
        return values

    reward.__name__ = name.replace(":", ".")
    return reward
