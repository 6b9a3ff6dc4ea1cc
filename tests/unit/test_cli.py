"""The CLI: instant help, one-line errors with exit code 2, no tracebacks."""

import subprocess
import sys

import pytest

COMMANDS = ["train", "launch", "plan", "merge", "pull", "runs", "doctor"]


def skytune(*args, env=None):
    return subprocess.run([sys.executable, "-m", "skytune.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_importing_the_cli_does_not_import_heavy_libraries():
    code = ("import sys, skytune.cli; heavy = [m for m in ('torch', 'transformers', 'trl', "
            "'sky', 'boto3', 'huggingface_hub', 'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_an_example(cmd):
    out = skytune(cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "Example: skytune " + cmd in " ".join(out.stdout.split())


def test_missing_recipe_is_one_line_exit_2(tmp_path):
    out = skytune("train", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr == f"error: {tmp_path / 'nope.yaml'}: no such recipe file\n"


def test_bad_recipe_key_is_one_line_exit_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel: tiny:llama\ndata: {train: x.jsonl}\ntrian: {}\n")
    out = skytune("train", str(p))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {p}: line 4: unknown key 'trian'; did you mean 'train'?"
    assert "Traceback" not in out.stderr


def test_pull_unknown_run(tmp_path):
    out = skytune("pull", f"file://{tmp_path}/nope")
    assert out.returncode == 2
    assert "no run 'nope'" in out.stderr and out.stderr.count("\n") == 1


def test_usage_error_exit_2():
    out = skytune("pull")
    assert out.returncode == 2 and "Missing argument" in out.stderr
