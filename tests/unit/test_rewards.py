"""Built-in GRPO rewards, the answer normalizer, and user `module:function` loading."""

from __future__ import annotations

import pytest

from skytune.errors import SkytuneError, TrainingFailed
from skytune.rewards import (
    extract_answer,
    format_reward,
    length_penalty,
    load_rewards,
    math_exact,
    normalize_answer,
)


def msg(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("raw, want", [
    ("\\boxed{42}", "42"),
    ("The answer is 1,000.", "1000"),
    ("$1,000.00", "1000"),
    ("600 km", "600"),
    ("15 muffins.", "15"),
    ("3.50", "3.5"),
    ("-7", "-7"),
    ("Answer: 12", "12"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Paris.", "paris"),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_extract_answer_prefers_boxed_then_phrase_then_last_line():
    assert extract_answer("so x = 3 and \\boxed{4}. The answer is 5") == "4"
    assert extract_answer("59 + 62 = 121, so the answer is 121.") == "121."
    assert extract_answer("work\nwork\nAnswer: 7\n") == "7"
    assert extract_answer("just 9") == "just 9"


def test_math_exact_compares_numbers_as_numbers():
    completions = [msg("Reasoning...\nAnswer: 1,000"), msg("The answer is \\boxed{999}"),
                   "plain text completion: the answer is 54 pages."]
    assert math_exact([], completions, answer=["1000", "1000", "54"]) == [1.0, 0.0, 1.0]


def test_math_exact_without_answer_column_names_the_fix():
    with pytest.raises(SkytuneError, match="answer"):
        math_exact([], [msg("1")])


def test_format_and_length():
    assert format_reward([], [msg("Add them: 2+2.\nAnswer: 4"), msg("4")]) == [1.0, 0.0]
    assert format_reward([], [msg("A:1")], pattern=r"^A:\d$") == [1.0]
    assert length_penalty([], [msg("x" * 100), msg("x" * 768), msg("x" * 5000)]) == [
        0.0, -0.5, -1.0]


def test_user_reward_loaded_from_recipe_dir(tmp_path):
    (tmp_path / "my_rewards_ok.py").write_text(
        "def brevity(prompts, completions, **kw):\n"
        "    return [1.0 / (1 + len(str(c))) for c in completions]\n"
        "def wrong_count(prompts, completions, **kw):\n    return [1.0]\n"
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    ok, wrong, boom = load_rewards(
        ["my_rewards_ok:brevity", "my_rewards_ok:wrong_count", "my_rewards_ok:boom"],
        base_dir=tmp_path)
    assert len(ok(prompts=["p", "p"], completions=["a", "bb"], answer=["1", "2"])) == 2
    assert ok.__name__ == "my_rewards_ok.brevity"
    with pytest.raises(TrainingFailed, match="reward my_rewards_ok:wrong_count returned 1 "
                                             "values for 2 completions"):
        wrong(prompts=["p", "p"], completions=["a", "b"])
    with pytest.raises(TrainingFailed, match="reward my_rewards_ok:boom raised KeyError"):
        boom(prompts=["p"], completions=["a"])


@pytest.mark.parametrize("name, match", [
    ("math_exactt", "unknown reward 'math_exactt'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("skytune.rewards:nope", "has no function 'nope'"),
])
def test_bad_reward_names(name, match):
    with pytest.raises(SkytuneError, match=match):
        load_rewards([name])
