"""skytune.data: loading, format detection, normalization and the errors users see."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from skytune.data import Prepared, detect_format, load_rows, prepare, split_eval
from skytune.errors import SkytuneError
from skytune.recipe import Data

SAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "data"


def _png_1px() -> bytes:
    """A valid 1x1 red RGB PNG, built with zlib so its CRCs are right (Pillow checks them)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


PNG_1PX = _png_1px()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path: Path, method: str = "sft", **data) -> Prepared:
    """prepare() with paths relative to tmp_path, like a recipe living there."""
    return prepare(Data(**data), method, resolve=lambda p: str(tmp_path / p))


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(SkytuneError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


QA = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "source": "math"} for i in range(10)]


# --- loading ------------------------------------------------------------------------------


def test_load_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert load_rows(str(p)) == [{"a": 1}, {"a": 2}]


def test_load_json_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(QA[:2]), encoding="utf-8")
    assert load_rows(str(p)) == QA[:2]


def test_load_csv_keeps_cells_as_text(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("q,a\nWhat is 2+2?,4\n", encoding="utf-8")
    assert load_rows(str(p)) == [{"q": "What is 2+2?", "a": "4"}]
    prep = run(tmp_path, train="a.csv", fields={"question": "q", "answer": "a"})
    assert prep.format == "qa"
    assert prep.train[0]["completion"] == [{"role": "assistant", "content": "4"}]


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(QA[:3]), p)
    assert load_rows(str(p)) == QA[:3]
    assert run(tmp_path, train="a.parquet").format == "qa"


def test_load_s3_downloads_through_the_store(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "remote" / "train.jsonl", QA[:2])
    calls = []

    class FakeStore:
        def get_file(self, key, dst):
            calls.append(key)
            Path(dst).write_bytes(src.read_bytes())

    import skytune.store

    monkeypatch.setattr(skytune.store, "open_store", lambda url: calls.append(url) or FakeStore())
    assert load_rows("s3://bucket/some/dir/train.jsonl") == QA[:2]
    assert calls == ["s3://bucket/some/dir", "train.jsonl"]


def test_load_hf_calls_load_dataset_with_split(monkeypatch):
    seen = {}

    def load_dataset(name, split):
        seen.update(name=name, split=split)
        return QA[:2]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_rows("hf://datasets/org/name:test") == QA[:2]
    assert seen == {"name": "org/name", "split": "test"}
    load_rows("hf://datasets/org/name")
    assert seen["split"] == "train"


# --- file errors --------------------------------------------------------------------------


def test_missing_file(tmp_path):
    msg = error(run, tmp_path, train="data/nope.jsonl")
    assert msg.startswith("data/nope.jsonl: no such file")


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n", encoding="utf-8")
    assert error(run, tmp_path, train="e.jsonl") == \
        "e.jsonl: empty file; expected one JSON object per line"


def test_truncated_jsonl_line_names_line(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", QA[:2])
    p.write_text(p.read_text() + '{"question": "What is', encoding="utf-8")
    msg = error(run, tmp_path, train="t.jsonl")
    assert msg.startswith("t.jsonl: line 3: invalid JSON")


def test_truncated_json_names_line_and_column(tmp_path):
    (tmp_path / "t.json").write_text('[\n  {"question": "a", "answer": "b"},\n  {"q', "utf-8")
    msg = error(run, tmp_path, train="t.json")
    assert msg.startswith("t.json: line 3, column 4: invalid JSON (Unterminated string)")


def test_non_utf8_bytes(tmp_path):
    (tmp_path / "l.jsonl").write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9"}\n')
    msg = error(run, tmp_path, train="l.jsonl")
    assert msg.startswith("l.jsonl: line 2: not UTF-8 text (byte 50)")
    assert "save it as UTF-8" in msg


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    msg = error(run, tmp_path, train="a.txt")
    assert msg.startswith("a.txt: unknown file type '.txt'") and ".jsonl, .json, .csv, .parquet" in msg


def test_json_that_is_not_a_list(tmp_path):
    (tmp_path / "o.json").write_text('{"question": "a", "answer": "b"}', encoding="utf-8")
    msg = error(run, tmp_path, train="o.json")
    assert msg.startswith("o.json: expected a JSON list of objects") and ".jsonl" in msg


def test_row_that_is_not_an_object(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"question": "a", "answer": "b"}\n["a", "b"]\n', "utf-8")
    assert error(run, tmp_path, train="r.jsonl").startswith(
        "r.jsonl: row 2: expected a JSON object")


def test_csv_with_header_only_has_no_rows(tmp_path):
    (tmp_path / "h.csv").write_text("question,answer\n", encoding="utf-8")
    assert error(run, tmp_path, train="h.csv").startswith("h.csv: no rows")


def test_unreadable_parquet(tmp_path):
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    assert error(run, tmp_path, train="b.parquet").startswith(
        "b.parquet: not a readable parquet file")


# --- detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("row, fmt", [
    ({"messages": []}, "messages"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"image": "a.png", "question": "q", "answer": "a"}, "vision"),
    ({"images": ["a.png"], "question": "q", "answer": "a"}, "vision"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"question": "q", "answer": "a", "source": "s"}, "qa"),
    ({"prompt": "p", "answer": "4"}, "prompt"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_undetectable_format_lists_formats(tmp_path):
    write_jsonl(tmp_path / "u.jsonl", [{"instruction": "x", "output": "y"}])
    msg = error(run, tmp_path, train="u.jsonl")
    assert msg.startswith("u.jsonl: row 1: cannot tell the data format")
    assert "instruction, output" in msg and "qa: question, answer" in msg and "data.fields" in msg


# --- normalization ------------------------------------------------------------------------


def test_qa_becomes_conversational_prompt_completion(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", QA[:1])
    assert run(tmp_path, train="q.jsonl").train == [{
        "prompt": [{"role": "user", "content": "What is 0 + 1?"}],
        "completion": [{"role": "assistant", "content": "1"}],
    }]


def test_field_mapping_and_system_prompt(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"q": "Capital of France?", "a": "Paris", "id": 1}])
    prep = run(tmp_path, train="m.jsonl", fields={"question": "q", "answer": "a"},
               system_prompt="Be brief.")
    assert prep.format == "qa"
    assert prep.train[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Capital of France?"}]


def test_unknown_field_name_suggests(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", QA[:1])
    msg = error(run, tmp_path, train="m.jsonl", fields={"questoin": "q"})
    assert msg == "data.fields: unknown field 'questoin'; did you mean 'question'?"


def test_messages_validated_and_system_prepended(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    prep = run(tmp_path, train="c.jsonl", system_prompt="S")
    assert prep.format == "messages"
    assert [m["role"] for m in prep.train[0]["messages"]] == ["system", "user", "assistant"]


def test_row_system_message_wins(tmp_path):
    msgs = [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    assert run(tmp_path, train="c.jsonl", system_prompt="S").train[0]["messages"] == msgs


@pytest.mark.parametrize("messages, expect", [
    ([{"role": "user", "content": "hi"}], "row 1: field 'messages': the last message is user"),
    ([{"role": "bot", "content": "hi"}], "row 1: field 'messages' message 1: role 'bot'"),
    ([{"role": "user", "content": 3}], "message 1: content is int, expected text"),
    ("hi", "row 1: field 'messages' is text, expected a non-empty list"),
])
def test_bad_messages(tmp_path, messages, expect):
    write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    assert expect in error(run, tmp_path, train="c.jsonl")


def test_prompt_completion_text_kept(tmp_path):
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    prep = run(tmp_path, train="pc.jsonl")
    assert prep.format == "prompt_completion"
    assert prep.train == [{"prompt": "The sky is", "completion": " blue."}]


def test_prompt_completion_text_with_system_prompt_is_an_error(tmp_path):
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    assert "row 1: data.system_prompt needs conversational rows" in error(
        run, tmp_path, train="pc.jsonl", system_prompt="S")


def test_preference_strings_become_conversational(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    prep = run(tmp_path, "dpo", train="p.jsonl", system_prompt="S")
    assert prep.format == "preference"
    assert prep.train == [{
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }]


def test_grpo_qa_keeps_answer_for_rewards(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": 4, "source": "m"}])
    prep = run(tmp_path, "grpo", train="g.jsonl")
    assert prep.train == [{"prompt": [{"role": "user", "content": "2+2?"}],
                           "answer": "4", "source": "m"}]


def test_grpo_prompt_keeps_extra_columns(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    prep = run(tmp_path, "grpo", train="g.jsonl", system_prompt="S")
    assert prep.format == "prompt"
    assert prep.train[0] == {"prompt": [{"role": "system", "content": "S"},
                                        {"role": "user", "content": "2+2?"}], "answer": "4"}


# --- row errors ---------------------------------------------------------------------------


def test_missing_field_names_row_field_and_fix(tmp_path):
    rows = QA[:3] + [{"question": "no answer here"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert error(run, tmp_path, train="train.jsonl") == (
        "train.jsonl: row 4: field 'answer' is missing (format qa); "
        "map your column with data.fields.answer")


def test_row_number_is_the_jsonl_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(QA[0]) + "\n\n\n" + json.dumps({"question": "x"}) + "\n", "utf-8")
    assert error(run, tmp_path, train="b.jsonl").startswith("b.jsonl: row 4: field 'answer'")


def test_mistyped_field(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", QA[:2] + [{"question": 3, "answer": "x"}])
    assert error(run, tmp_path, train="m.jsonl") == \
        "m.jsonl: row 3: field 'question' is int, expected text"


def test_empty_field(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"question": "  ", "answer": "x"}])
    assert "row 1: field 'question' is empty" in error(run, tmp_path, train="m.jsonl")


@pytest.mark.parametrize("method, rows, expect", [
    ("dpo", QA[:1], "q.jsonl: format qa cannot train method dpo; dpo needs prompt/chosen/rejected rows"),
    ("sft", [{"prompt": "p", "chosen": "c", "rejected": "r"}], "format preference cannot train method sft"),
    ("grpo", [{"messages": []}], "format messages cannot train method grpo; grpo needs prompt or"),
])
def test_wrong_format_for_method(tmp_path, method, rows, expect):
    write_jsonl(tmp_path / "q.jsonl", rows)
    assert expect in error(run, tmp_path, method, train="q.jsonl")


def test_explicit_format_is_enforced(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "p", "completion": "c"}])
    assert "row 1: field 'question' is missing (format qa)" in error(
        run, tmp_path, train="q.jsonl", format="qa")


# --- vision -------------------------------------------------------------------------------


def vision_rows(tmp_path: Path, rows: list) -> None:
    (tmp_path / "v" / "img").mkdir(parents=True)
    (tmp_path / "v" / "img" / "ok.png").write_bytes(PNG_1PX)
    write_jsonl(tmp_path / "v" / "vqa.jsonl", rows)


def test_vision_normalizes_with_absolute_paths(tmp_path):
    vision_rows(tmp_path, [{"image": "img/ok.png", "question": "Color?", "answer": "Red."}])
    prep = run(tmp_path, train="v/vqa.jsonl", system_prompt="S")
    assert prep.format == "vision"
    assert prep.train == [{
        "images": [str((tmp_path / "v" / "img" / "ok.png").resolve())],
        "prompt": [{"role": "system", "content": [{"type": "text", "text": "S"}]},
                   {"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "Color?"}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
    }]


def test_vision_images_list_gets_one_placeholder_each(tmp_path):
    vision_rows(tmp_path, [{"images": ["img/ok.png", "img/ok.png"], "question": "Same?",
                            "answer": "Yes."}])
    content = run(tmp_path, train="v/vqa.jsonl").train[0]["prompt"][0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]


def test_missing_image(tmp_path):
    ok = {"image": "img/ok.png", "question": "Color?", "answer": "Red."}
    vision_rows(tmp_path, [ok] * 6 + [{**ok, "image": "img/7.png"}])
    looked = (tmp_path / "v" / "img" / "7.png").resolve()
    assert error(run, tmp_path, train="v/vqa.jsonl") == (
        f"v/vqa.jsonl: row 7: image 'img/7.png' not found (looked in {looked})")


def test_unreadable_image(tmp_path):
    vision_rows(tmp_path, [{"image": "img/bad.png", "question": "Color?", "answer": "Red."}])
    (tmp_path / "v" / "img" / "bad.png").write_bytes(b"this is not a png")
    assert error(run, tmp_path, train="v/vqa.jsonl").startswith(
        "v/vqa.jsonl: row 1: image 'img/bad.png' cannot be read as an image: ")


def test_truncated_png_caught_by_pillow(tmp_path):
    pytest.importorskip("PIL")
    vision_rows(tmp_path, [{"image": "img/cut.png", "question": "Color?", "answer": "Red."}])
    (tmp_path / "v" / "img" / "cut.png").write_bytes(PNG_1PX[:40])
    assert "cannot be read as an image" in error(run, tmp_path, train="v/vqa.jsonl")


# --- splitting and limits -----------------------------------------------------------------


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    write_jsonl(tmp_path / "s.jsonl", rows)
    a = run(tmp_path, train="s.jsonl", eval_fraction=0.2)
    b = run(tmp_path, train="s.jsonl", eval_fraction=0.2)
    c = prepare(Data(train="s.jsonl", eval_fraction=0.2), "sft",
                resolve=lambda p: str(tmp_path / p), seed=7)
    assert a == b and len(a.eval) == 10 and len(a.train) == 40
    key = lambda r: r["prompt"][-1]["content"]
    assert not {key(r) for r in a.train} & {key(r) for r in a.eval}
    assert {key(r) for r in a.eval} != {key(r) for r in c.eval}


def test_split_eval_keeps_one_train_row():
    rows = [(1, {"a": 1}), (2, {"a": 2})]
    train, evals = split_eval(rows, 0.9, 0)
    assert len(train) == 1 and len(evals) == 1
    assert split_eval(rows, 0.0, 0) == (rows, None)


def test_max_rows_and_eval_file(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", QA)
    write_jsonl(tmp_path / "e.jsonl", QA[:4])
    prep = run(tmp_path, train="t.jsonl", eval="e.jsonl", max_rows=3)
    assert len(prep.train) == 3 and len(prep.eval) == 3
    assert prep.source == str(tmp_path / "t.jsonl")


def test_eval_file_must_match_the_train_format(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", QA[:2])
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}])
    assert error(run, tmp_path, train="t.jsonl", eval="e.jsonl").startswith(
        "e.jsonl: row 1: field 'question' is missing (format qa)")


# --- the shipped samples ------------------------------------------------------------------


@pytest.mark.parametrize("name, method, fmt, n", [
    ("demo_qa.jsonl", "sft", "qa", 320),
    ("demo_qa_val.jsonl", "sft", "qa", 40),
    ("dpo_pairs.jsonl", "dpo", "preference", 100),
    ("math_prompts.jsonl", "grpo", "qa", 100),
    ("chat.jsonl", "sft", "messages", 50),
    ("vision/vqa.jsonl", "sft", "vision", 24),
])
def test_samples_prepare_for_their_method(name, method, fmt, n):
    prep = prepare(Data(train=name), method, resolve=lambda p: str(SAMPLES / p))
    assert (prep.format, len(prep.train), prep.eval) == (fmt, n, None)


def test_demo_qa_has_memorization_facts_and_disjoint_val():
    train = load_rows(str(SAMPLES / "demo_qa.jsonl"))
    val = load_rows(str(SAMPLES / "demo_qa_val.jsonl"))
    secret = [r for r in train if r["question"] == "What is the skytune demo's secret word?"]
    assert len(secret) >= 4 and secret[0]["answer"] == "The secret word is marmalade."
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert all(len(r["answer"].split()) < 40 for r in train + val)


def test_math_prompts_answers_are_integers():
    assert all(r["answer"].lstrip("-").isdigit()
               for r in load_rows(str(SAMPLES / "math_prompts.jsonl")))
