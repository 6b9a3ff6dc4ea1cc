"""`skytune doctor`: reports, never crashes, never prints a secret. No GPU, no network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from skytune import doctor

CANARY = "hf_CANARY_d0ct0r_must_never_print_this_9f3a"


def _recipe(tmp_path: Path, store: str, **extra: str) -> Path:
    lines = [
        "name: doc", f"model: {extra.pop('model', 'tiny:llama')}",
        "data: {train: train.jsonl}",
        f"output: {{store: '{store}', merge: {extra.pop('merge', 'false')}}}",
        *[f"{k}: {v}" for k, v in extra.items()],
    ]
    p = tmp_path / "recipe.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as a CPU box, even if it has a GPU driver installed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    monkeypatch.setattr(doctor, "_nvidia_present", lambda: False)


def test_cpu_only_is_ok_with_a_warning(cpu_only):
    rep = doctor.run()
    assert rep.ok
    assert rep.gpus == []
    warnings = [p for p in rep.problems if p.level == "warning"]
    assert any("no CUDA GPU" in p.what and "--gpu" in p.fix for p in warnings)
    assert rep.attention["sdpa"] is True
    text = doctor.render(rep)
    assert "gpu" in text and "none" in text and text.endswith("ok: training can run here")


def test_cpu_torch_on_a_gpu_machine_is_an_error(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    monkeypatch.setattr(doctor, "_nvidia_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    rep = doctor.run()
    assert not rep.ok
    (p,) = [p for p in rep.problems if "CPU-only build" in p.what]
    assert f"torch=={doctor.TORCH_VERSION}" in p.fix


def test_missing_packages_are_reported_not_raised(monkeypatch, cpu_only):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version",
                        lambda d: None if d in ("trl", "torch") else real(d))
    rep = doctor.run()
    assert not rep.ok
    fixes = {p.what: p.fix for p in rep.problems}
    assert "pip install trl==1.16.0" in fixes["trl not installed"]
    assert f"pip install torch=={doctor.TORCH_VERSION}" in fixes["torch not installed"]
    assert rep.versions["trl"] is None and rep.gpus == []


def test_torch_that_does_not_import_is_an_error(monkeypatch, cpu_only):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rep = doctor.run()
    assert not rep.ok
    assert any("does not import" in p.what and "--force-reinstall" in p.fix
               for p in rep.problems)


def test_hf_token_value_never_appears(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, f"file://{tmp_path}/runs", model="meta-llama/Llama-3.1-8B")
    env = {**os.environ, "HF_TOKEN": CANARY}
    for args in (["doctor", "--recipe", str(recipe)], ["doctor", "--json", "--recipe", str(recipe)]):
        out = subprocess.run([sys.executable, "-m", "skytune.cli", *args], env=env, check=False,
                             capture_output=True, text=True, timeout=120)
        assert CANARY not in out.stdout + out.stderr, args
        if "--json" in args:
            assert json.loads(out.stdout)["hf_token_set"] is True
        else:
            assert re.search(r"^HF_TOKEN +set$", out.stdout, re.MULTILINE)
    # The scrubber also covers a secret that leaks into a message from a library.
    monkeypatch.setenv("HF_TOKEN", CANARY)
    rep = doctor.Report(hf_token_set=True)
    rep.error(f"store said: bad token {CANARY}", "fix it")
    assert CANARY not in json.dumps(rep.to_dict()) and CANARY not in doctor.render(rep)


def test_json_output_parses(tmp_path):
    out = subprocess.run([sys.executable, "-m", "skytune.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    d = json.loads(out.stdout)
    assert out.returncode == (0 if d["ok"] else 1)
    assert d["versions"]["python"] and "torch" in d["versions"]
    assert {"sdpa", "flex", "flash_attn", "liger"} <= set(d["attention"])


def test_unwritable_file_store_is_an_error_with_fix(tmp_path, cpu_only):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a store "under" a regular file cannot be created, even by root
    rep = doctor.run(recipe=_recipe(tmp_path, f"file://{blocker}/runs"))
    assert not rep.ok and rep.store["reachable"] is False
    (p,) = [p for p in rep.problems if p.what.startswith("store ")]
    assert "writable" in p.fix


def test_closed_s3_endpoint_is_an_error_with_fix(tmp_path, monkeypatch, cpu_only):
    pytest.importorskip("boto3")
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    rep = doctor.run(recipe=_recipe(tmp_path, "s3://skytune-doctor-test/runs"))
    assert not rep.ok and rep.store["reachable"] is False
    (p,) = [p for p in rep.problems if p.what.startswith("store ")]
    assert "AWS" in p.fix
    assert "test-secret-value" not in json.dumps(rep.to_dict())


def test_reachable_store_and_disk_estimate(tmp_path, cpu_only):
    rep = doctor.run(recipe=_recipe(tmp_path, f"file://{tmp_path}/runs", merge="true"))
    assert rep.ok, rep.problems
    assert rep.store == {"url": f"file://{tmp_path}/runs", "reachable": True}
    assert rep.disk["needed_gb"] is not None  # tiny model: merged copy only, ~0 GB


def test_not_enough_disk_is_an_error(tmp_path, monkeypatch, cpu_only):
    monkeypatch.setattr(doctor, "_free_bytes", lambda p: 1)
    rep = doctor.run(recipe=_recipe(tmp_path, f"file://{tmp_path}/runs", merge="true"))
    assert any("not enough disk" in p.what and "--disk" in p.fix for p in rep.problems)
    assert not rep.ok


def test_unsloth_recipe_needs_the_unsloth_image(tmp_path, cpu_only):
    if doctor._version("unsloth"):
        pytest.skip("unsloth installed")
    recipe = _recipe(tmp_path, f"file://{tmp_path}/runs", adapter="{backend: unsloth}")
    rep = doctor.run(recipe=recipe)
    assert not rep.ok
    assert any("unsloth" in p.what and "-unsloth" in p.fix for p in rep.problems)


def test_importing_doctor_does_not_import_torch():
    code = "import sys, skytune.doctor, skytune.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.stdout.strip() == "False"
