"""Training data: load rows from a file or URL, detect their format, normalize them to TRL's.

    from skytune.data import prepare
    prep = prepare(recipe.data, recipe.method, resolve=recipe.path, seed=recipe.train.seed)
    prep.format                   # 'qa'
    prep.train[0]                 # {'prompt': [{'role': 'user', 'content': 'What is 2+3?'}],
                                  #  'completion': [{'role': 'assistant', 'content': '5'}]}

Sources: local .jsonl / .json (a list of objects) / .csv / .parquet, s3://bucket/key and
hf://datasets/org/name[:split]. Row formats (keys a row has; data.fields renames columns):

    messages           {"messages": [{"role": "user", "content": "..."}, ...]}
    prompt_completion  {"prompt": ..., "completion": ...}        (text or message lists)
    qa                 {"question": "...", "answer": "..."}
    preference         {"prompt": ..., "chosen": ..., "rejected": ...}
    prompt             {"prompt": ...}                           (grpo; other columns kept)
    vision             {"image": "img/1.png" | "images": [...], "question": ..., "answer": ...}

Output rows are TRL 1.16 dataset formats, conversational wherever the input allows. Every
problem is found here, before a GPU is rented, and raised as one SkytuneError naming the file,
the row (for .jsonl the line number), the field and the fix.
"""

from __future__ import annotations

import difflib
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skytune.errors import SkytuneError

if TYPE_CHECKING:
    from skytune.recipe import Data

# format -> the keys that identify it (also the error text listing formats).
FORMATS: dict[str, str] = {
    "messages": "messages",
    "prompt_completion": "prompt, completion",
    "qa": "question, answer",
    "preference": "prompt, chosen, rejected",
    "prompt": "prompt",
    "vision": "image or images, question, answer",
}

# Which formats each method can train on, and how to say what it needs.
METHOD_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "sft": (("messages", "prompt_completion", "qa", "vision"),
            "messages, prompt/completion, question/answer or image/question/answer"),
    "dpo": (("preference",), "prompt/chosen/rejected"),
    "grpo": (("prompt", "qa"), "prompt or question/answer"),
}

FIELD_NAMES = ("messages", "prompt", "completion", "chosen", "rejected",
               "question", "answer", "image", "images")
ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = dict[str, Any]


@dataclass
class Prepared:
    """Normalized rows ready for `datasets.Dataset.from_list`."""

    train: list[Row]
    eval: list[Row] | None
    format: str
    source: str


class _Bad(Exception):
    """A problem with one row; `prepare` adds the file and row number."""


# ---------------------------------------------------------------------------------------
# Loading


def load_rows(path: str) -> list[Row]:
    """Every row of a local file, s3:// object or hf://datasets/org/name[:split] as dicts."""
    return [row for _, row in _read(path, path)]


def _read(location: str, label: str) -> list[tuple[int, Row]]:
    """(row number, row) pairs; `label` is how errors name the file (as the user wrote it)."""
    if location.startswith("hf://"):
        rows = list(enumerate(_read_hf(location, label), start=1))
    elif location.startswith("s3://"):
        rows = _read_s3(location, label)
    elif "://" in location and not location.startswith("file://"):
        raise SkytuneError(f"{label}: unknown scheme; use a local path, s3:// or hf://datasets/")
    else:
        rows = _read_local(Path(location.removeprefix("file://")), label)
    if not rows:
        raise SkytuneError(f"{label}: no rows; add at least one example")
    return rows


def _read_local(path: Path, label: str) -> list[tuple[int, Row]]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SkytuneError(f"{label}: unknown file type '{suffix or path.name}'; "
                           f"supported: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise SkytuneError(f"{label}: no such file (looked in {path.resolve()})")
    if suffix == ".parquet":
        return _parse_parquet(path, label)
    text = _decode(path.read_bytes(), label)
    if not text.strip():
        expected = {".jsonl": "one JSON object per line", ".json": "a JSON list of objects",
                    ".csv": "a header row, then one row per example"}[suffix]
        raise SkytuneError(f"{label}: empty file; expected {expected}")
    parse = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[suffix]
    return parse(text, label)


def _decode(raw: bytes, label: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: Excel and Notepad write a BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SkytuneError(f"{label}: line {line}: not UTF-8 text (byte {e.start}); "
                           "save it as UTF-8") from None


def _parse_jsonl(text: str, label: str) -> list[tuple[int, Row]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SkytuneError(f"{label}: line {n}: invalid JSON ({_json_msg(e)} at column {e.colno}); "
                               "each line must be one complete JSON object") from None
        rows.append((n, _object(row, label, n)))
    return rows


def _parse_json(text: str, label: str) -> list[tuple[int, Row]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SkytuneError(f"{label}: line {e.lineno}, column {e.colno}: invalid JSON "
                           f"({_json_msg(e)}); a .json file holds one list of objects") from None
    if not isinstance(data, list):
        hint = " (one object per line is .jsonl: rename the file)" if isinstance(data, dict) else ""
        raise SkytuneError(f"{label}: expected a JSON list of objects [{{...}}, ...], "
                           f"got {_kind(data)}{hint}")
    return [(n, _object(row, label, n)) for n, row in enumerate(data, start=1)]


def _parse_csv(text: str, label: str) -> list[tuple[int, Row]]:
    import io

    import pandas as pd

    try:
        # Every cell as text: pandas would turn an answer column of "42" into int64.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas raises several parser error types
        raise SkytuneError(f"{label}: not a readable CSV file: {_first_line(e)}") from None
    return list(enumerate(df.to_dict(orient="records"), start=1))


def _parse_parquet(path: Path, label: str) -> list[tuple[int, Row]]:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise SkytuneError(f"{label}: empty file; expected a parquet table")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - arrow raises ArrowInvalid, OSError, ...
        raise SkytuneError(f"{label}: not a readable parquet file: {_first_line(e)}") from None
    return list(enumerate(rows, start=1))


def _read_hf(url: str, label: str) -> list[Row]:
    """hf://datasets/org/name[:split] through `datasets.load_dataset` (needs network)."""
    ref = url.removeprefix("hf://")
    if not ref.startswith("datasets/"):
        raise SkytuneError(f"{label}: Hub data is hf://datasets/ORG/NAME[:split]")
    name, _, split = ref.removeprefix("datasets/").partition(":")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - hub, auth and split errors all mean "cannot load"
        raise SkytuneError(f"{label}: cannot load from the Hub: {_first_line(e)}") from None
    return list(ds)


def _read_s3(url: str, label: str) -> list[tuple[int, Row]]:
    """Download the object to a temp dir (keeping its name, for the extension) and load it."""
    from skytune.store import open_store

    bucket_and_dir, _, filename = url.removeprefix("s3://").rpartition("/")
    if not bucket_and_dir or not filename:
        raise SkytuneError(f"{label}: expected s3://bucket/path/file.jsonl")
    with tempfile.TemporaryDirectory(prefix="skytune-data-") as tmp:
        dst = Path(tmp) / filename
        try:
            open_store(f"s3://{bucket_and_dir}").get_file(filename, dst)
        except SkytuneError:
            raise
        except Exception as e:  # noqa: BLE001 - any client error means "cannot download"
            raise SkytuneError(f"{label}: cannot download: {_first_line(e)}") from None
        return _read_local(dst, label)


def _object(row: Any, label: str, n: int) -> Row:
    if not isinstance(row, dict):
        raise SkytuneError(f"{label}: row {n}: expected a JSON object {{\"key\": value}}, "
                           f"got {_kind(row)}")
    return row


# ---------------------------------------------------------------------------------------
# Formats


def detect_format(row: Row) -> str:
    """The format a row's keys say it has (after data.fields renamed its columns)."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if keys & {"image", "images"}:
        return "vision"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "qa"
    if "prompt" in keys:
        return "prompt"
    known = "; ".join(f"{f}: {k}" for f, k in FORMATS.items())
    cols = ", ".join(sorted(keys)) or "none"
    raise SkytuneError(f"cannot tell the data format from columns ({cols}); formats and their "
                       f"keys: {known}; rename columns with data.fields or set data.format")


def apply_fields(row: Row, fields: dict[str, str]) -> Row:
    """Rename the user's columns to skytune's names: fields {question: q} moves row['q']."""
    if not fields:
        return row
    moved = set(fields.values())
    out = {k: v for k, v in row.items() if k not in moved}
    out.update({name: row[col] for name, col in fields.items() if col in row})
    return out


def check_fields(fields: dict[str, str]) -> None:
    for name in fields:
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(FIELD_NAMES)}"
            raise SkytuneError(f"data.fields: unknown field '{name}'; {hint}")


def check_method(fmt: str, method: str, label: str) -> None:
    if method not in METHOD_FORMATS:
        raise SkytuneError(f"method {method!r} has no data rules; one of: {', '.join(METHOD_FORMATS)}")
    formats, needs = METHOD_FORMATS[method]
    if fmt not in formats:
        raise SkytuneError(f"{label}: format {fmt} cannot train method {method}; "
                           f"{method} needs {needs} rows")


def normalize_row(row: Row, fmt: str, method: str, *, system_prompt: str | None = None,
                  base_dir: Path | None = None) -> Row:
    """One row (columns already renamed) in TRL's format; raises _Bad naming the field."""
    if fmt == "messages":
        return {"messages": _messages(row, "messages", system_prompt, method == "sft")}
    if fmt == "prompt_completion":
        return _prompt_completion(row, system_prompt)
    if fmt == "qa":
        return _qa(row, system_prompt, method)
    if fmt == "preference":
        return {"prompt": _prompt(row, "prompt", system_prompt),
                "chosen": _reply(row, "chosen"), "rejected": _reply(row, "rejected")}
    if fmt == "prompt":
        return {**row, "prompt": _prompt(row, "prompt", system_prompt)}
    if fmt == "vision":
        return _vision(row, system_prompt, base_dir or Path.cwd())
    raise SkytuneError(f"unknown data.format {fmt!r}; one of: {', '.join(FORMATS)}")


def _qa(row: Row, system_prompt: str | None, method: str) -> Row:
    question = _text(row, "question", "qa")
    answer = _text(row, "answer", "qa", numbers=True)
    prompt = _with_system([{"role": "user", "content": question}], system_prompt)
    if method == "grpo":  # rewards get every other column as a keyword argument
        extra = {k: v for k, v in row.items() if k != "question"}
        return {**extra, "prompt": prompt, "answer": answer}
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}


def _prompt_completion(row: Row, system_prompt: str | None) -> Row:
    prompt, completion = _need(row, "prompt", "prompt_completion"), _need(
        row, "completion", "prompt_completion")
    if isinstance(prompt, str) != isinstance(completion, str):
        raise _Bad("fields 'prompt' and 'completion' must both be text or both message lists")
    if isinstance(prompt, str):
        if system_prompt:
            raise _Bad("data.system_prompt needs conversational rows but 'prompt' is text; "
                       "write the system text into your prompts or use messages rows")
        _text(row, "prompt", "prompt_completion")
        _text(row, "completion", "prompt_completion")
        return {"prompt": prompt, "completion": completion}
    return {"prompt": _messages(row, "prompt", system_prompt, False),
            "completion": _messages(row, "completion", None, False)}


def _prompt(row: Row, field: str, system_prompt: str | None) -> list[Row]:
    """A text prompt becomes [system?, user]; a message list is checked and kept."""
    if isinstance(row.get(field), list):
        return _messages(row, field, system_prompt, False)
    text = _text(row, field, "prompt")
    return _with_system([{"role": "user", "content": text}], system_prompt)


def _reply(row: Row, field: str) -> list[Row]:
    if isinstance(row.get(field), list):
        return _messages(row, field, None, False)
    return [{"role": "assistant", "content": _text(row, field, "preference")}]


def _messages(row: Row, field: str, system_prompt: str | None, end_assistant: bool) -> list[Row]:
    msgs = _need(row, field, "messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad(f"field '{field}' is {_kind(msgs)}, expected a non-empty list of "
                   '{"role": ..., "content": ...} messages')
    out = []
    for i, m in enumerate(msgs):
        where = f"field '{field}' message {i + 1}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _Bad(f"{where}: expected {{\"role\": ..., \"content\": ...}}, got {_short(m)}")
        if m["role"] not in ROLES:
            raise _Bad(f"{where}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise _Bad(f"{where}: content is {_kind(m['content'])}, expected text")
        out.append(dict(m))
    if end_assistant and out[-1]["role"] != "assistant":
        raise _Bad(f"field '{field}': the last message is {out[-1]['role']}; sft learns from "
                   "the final assistant message, so end each conversation with one")
    return _with_system(out, system_prompt)


def _with_system(msgs: list[Row], system_prompt: str | None, parts: bool = False) -> list[Row]:
    if not system_prompt or (msgs and msgs[0]["role"] == "system"):
        return msgs  # the row's own system message wins over the recipe's default
    content: Any = [{"type": "text", "text": system_prompt}] if parts else system_prompt
    return [{"role": "system", "content": content}, *msgs]


def _vision(row: Row, system_prompt: str | None, base_dir: Path) -> Row:
    images = row["images"] if "images" in row else [row.get("image")]
    if not isinstance(images, list) or not images:
        raise _Bad(f"field 'images' is {_kind(images)}, expected a list of image paths")
    paths = [_image(img, base_dir) for img in images]
    question = _text(row, "question", "vision")
    answer = _text(row, "answer", "vision", numbers=True)
    user = [*({"type": "image"} for _ in paths), {"type": "text", "text": question}]
    prompt = _with_system([{"role": "user", "content": user}], system_prompt, parts=True)
    return {"images": paths, "prompt": prompt,
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def _image(img: Any, base_dir: Path) -> Any:
    """A path (relative to the data file) checked to exist and decode; Hub images pass through."""
    if not isinstance(img, str):
        if img is None:
            raise _Bad("field 'image' is missing (format vision); map your column with "
                       "data.fields.image")
        return img  # a PIL image or {"bytes": ...} from a Hub dataset: the collator decodes it
    path = (base_dir / img).resolve()
    if not path.is_file():
        raise _Bad(f"image '{img}' not found (looked in {path})")
    try:
        _check_image(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise _Bad(f"image '{img}' cannot be read as an image: {_first_line(e)}") from None
    return str(path)


# File signatures of the formats vision processors read; a cheap check that works without PIL.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF")


def _check_image(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(12)
    if not head.startswith(_MAGIC) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        raise ValueError(f"not a PNG, JPEG, GIF, BMP or WebP file (starts with {head[:8]!r})")
    try:
        from PIL import Image
    except ImportError:  # the trainer image has Pillow; a bare checkout may not
        return
    with Image.open(path) as im:
        im.verify()  # reads headers and checksums without decoding every pixel


def _need(row: Row, field: str, fmt: str) -> Any:
    if field not in row:
        raise _Bad(f"field '{field}' is missing (format {fmt}); map your column with "
                   f"data.fields.{field}")
    return row[field]


def _text(row: Row, field: str, fmt: str, numbers: bool = False) -> str:
    value = _need(row, field, fmt)
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # {"answer": 42} is what people write for math data
    if not isinstance(value, str):
        raise _Bad(f"field '{field}' is {_kind(value)}, expected text")
    if not value.strip():
        raise _Bad(f"field '{field}' is empty; remove the row or fill it in")
    return value


# ---------------------------------------------------------------------------------------
# prepare: the one call a trainer makes


def prepare(data: Data, method: str, resolve: Callable[[str], str], seed: int = 42) -> Prepared:
    """Load, split, detect, normalize and check data for `method`; raise on the first problem."""
    check_fields(data.fields)
    location = resolve(data.train)
    train = _read(location, data.train)[: data.max_rows]
    if data.eval:
        evals: list[tuple[int, Row]] | None = _read(resolve(data.eval), data.eval)[: data.max_rows]
    else:
        train, evals = split_eval(train, data.eval_fraction, seed)
    first = apply_fields(train[0][1], data.fields)
    try:
        fmt = detect_format(first) if data.format == "auto" else data.format
    except SkytuneError as e:
        raise SkytuneError(f"{data.train}: row {train[0][0]}: {e}") from None
    check_method(fmt, method, data.train)
    eval_label = data.eval or data.train
    eval_location = resolve(data.eval) if data.eval else location
    return Prepared(
        train=_normalize_all(train, fmt, method, data, data.train, location),
        eval=_normalize_all(evals, fmt, method, data, eval_label, eval_location) if evals else None,
        format=fmt,
        source=location,
    )


def split_eval(rows: list[tuple[int, Row]], fraction: float,
               seed: int) -> tuple[list[tuple[int, Row]], list[tuple[int, Row]] | None]:
    """Hold out `fraction` of rows (at least one, never all) chosen by `seed`; order kept."""
    if fraction <= 0 or len(rows) < 2:
        return rows, None
    n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def _normalize_all(rows: list[tuple[int, Row]], fmt: str, method: str, data: Data,
                   label: str, location: str) -> list[Row]:
    # Image paths are relative to the data file. Remote data (s3, hf) has no directory to
    # look in: its images must be absolute paths or embedded (Hub image columns).
    local = location.removeprefix("file://")
    base_dir = Path(local).parent if "://" not in local else Path.cwd()
    out = []
    for n, row in rows:
        try:
            out.append(normalize_row(apply_fields(row, data.fields), fmt, method,
                                     system_prompt=data.system_prompt, base_dir=base_dir))
        except _Bad as e:
            raise SkytuneError(f"{label}: row {n}: {e}") from None
    return out


def _json_msg(e: json.JSONDecodeError) -> str:
    return e.msg.removesuffix(" starting at")  # "Unterminated string starting at" reads cut off


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", type(None): "null", bool: "bool"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    s = json.dumps(value, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
