"""Image smoke test: every locked package is installed at its locked version and imports,
then `skytune doctor` passes. The last step of every image build (stdlib only).

    python images/smoke.py --lock /opt/skytune/requirements.lock      # in the Dockerfile
    python images/smoke.py --lock images/default/requirements.lock --no-doctor

Exit 0 when all is well; otherwise one line per problem and exit 1, which fails the build.
Without a GPU (a `docker build` has none) packages that need one at import time are only
located, not imported, and doctor's "no CUDA GPU" is a warning.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

# Packages whose import raises without a CUDA GPU (checked by name only when there is none).
NEEDS_GPU_TO_IMPORT = {"unsloth", "unsloth_zoo", "xformers"}
# Top-level modules shipped inside a distribution that are not meant to be imported.
NOT_IMPORTABLE = {"_distutils_hack", "distutils-precedence", "torchgen", "functorch"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(lock: Path) -> dict[str, str]:
    """name -> version from a `make lock` file (lines `name==version \\`)."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def import_names(dist: md.Distribution) -> list[str]:
    """Top-level import names of an installed distribution (top_level.txt, else RECORD)."""
    top = dist.read_text("top_level.txt")
    names = set(top.split()) if top else set()
    if not names:
        for f in dist.files or []:
            parts = f.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
                continue
            if len(parts) == 1 and f.suffix == ".py":
                names.add(f.stem)
            elif len(parts) > 1 and f.suffix in (".py", ".so"):
                names.add(parts[0])
            elif len(parts) == 1 and f.suffix == ".so":
                names.add(f.name.split(".")[0])
    # Private helpers (_yaml, _cffi_backend) are imported by their public packages anyway.
    # isidentifier() drops vendored-library folders such as numpy.libs/ (no Python there).
    return sorted(n for n in names
                  if n.isidentifier() and not n.startswith("_") and n not in NOT_IMPORTABLE)


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing or broken: the import loop reports it
        return False


def check_packages(pins: dict[str, str]) -> tuple[list[str], int]:
    """(problems, number of modules imported)."""
    problems, imported = [], 0
    gpu = has_gpu()
    installed = {norm(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}
    for name, version in sorted(pins.items()):
        dist = installed.get(name)
        if dist is None:
            problems.append(f"{name}=={version}: locked but not installed")
            continue
        if dist.version != version:
            problems.append(f"{name}: locked {version}, installed {dist.version}")
        for mod in import_names(dist):
            if mod in NEEDS_GPU_TO_IMPORT and not gpu:
                if importlib.util.find_spec(mod) is None:
                    problems.append(f"{name}: module {mod} not found")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(mod)
                imported += 1
            except Exception as e:  # noqa: BLE001 - any import failure is the finding
                problems.append(f"{name}: import {mod} failed: {type(e).__name__}: {e}"[:300])
    return problems, imported


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Image smoke test.")
    ap.add_argument("--lock", type=Path, required=True)
    ap.add_argument("--no-doctor", action="store_true", help="skip `skytune doctor`")
    a = ap.parse_args(argv)
    pins = locked_pins(a.lock)
    problems, imported = check_packages(pins)
    print(f"smoke: {len(pins)} locked packages, {imported} modules imported")
    if not a.no_doctor:
        out = subprocess.run([sys.executable, "-m", "skytune.cli", "doctor"],
                             capture_output=True, text=True, check=False)
        print(out.stdout + out.stderr)
        if out.returncode:
            problems.append(f"skytune doctor exited {out.returncode}")
    for p in problems:
        print(f"smoke: FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
