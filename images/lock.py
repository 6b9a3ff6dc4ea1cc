"""Compile and check the images' locked dependency sets (stdlib + `packaging` only).

    python images/lock.py compile            # `make lock`: every images/*/requirements.in
    python images/lock.py check              # offline: each lock is fresh and covers its .in
    python images/lock.py cpu-subset images/default/requirements.lock > /tmp/cpu.lock

A lock is for the image, not for this machine: Linux x86_64 (manylinux_2_28), CPython 3.12,
every package pinned with `==` and its sha256 hashes, so `pip install --require-hashes`
installs exactly it. Its header records a hash of the requirements in requirements.in plus
the target; `check` recomputes it without network, so editing the .in without re-running
`make lock` fails `make test` (tests/unit/test_images.py).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = ROOT / "images"
# The image's platform. Changing it changes every lock's input hash, so locks go stale.
TARGET = ["--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.12"]
HASH_PREFIX = "# input-sha256: "
# Packages that only make sense with a CUDA GPU (multi-GB downloads): left out of the
# fresh-venv install check that `make lock-check` runs on CPU machines.
GPU_ONLY = re.compile(r"^(torch|torchvision|triton|xformers|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    """PEP 503 name: 'Hugging_Face.Hub' -> 'hugging-face-hub'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(in_path: Path) -> list[str]:
    """The requirement lines of a .in file, comments and blank lines dropped."""
    out = []
    for raw in in_path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            # -r/-c/-e would hide requirements from the offline check; keep .in files flat.
            raise ValueError(f"{in_path}: options like {line.split()[0]} are not supported")
        out.append(re.sub(r"\s+", "", line))
    return out


def input_hash(in_path: Path) -> str:
    """sha256 of the sorted requirements + the target: comment edits do not stale a lock."""
    text = "\n".join(sorted(requirement_lines(in_path))) + "\n" + " ".join(TARGET) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Pin:
    name: str
    version: str
    hashes: int
    block: str  # the lock's lines for this package, hashes included


def parse_lock(lock_path: Path) -> dict[str, Pin]:
    """Normalized name -> Pin. Raises ValueError on a line that is not `name==version`."""
    pins: dict[str, Pin] = {}
    cur: list[str] = []

    def flush() -> None:
        if not cur:
            return
        head = cur[0].split("\\")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", head)
        if not m:
            raise ValueError(f"{lock_path}: not pinned with ==: {head!r}")
        block = "\n".join(cur)
        pins[norm(m.group(1))] = Pin(m.group(1), m.group(3), block.count("--hash=sha256:"), block)

    for line in lock_path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith((" ", "\t")):  # continuation: hashes of the package above
            cur.append(line)
            continue
        flush()
        cur = [line]
    flush()
    return pins


def recorded_hash(lock_path: Path) -> str | None:
    for line in lock_path.read_text().splitlines():
        if line.startswith(HASH_PREFIX):
            return line[len(HASH_PREFIX):].strip()
    return None


def check(image_dir: Path) -> list[str]:
    """Problems with one image's lock, each a line saying what to do; [] when fresh."""
    from packaging.requirements import Requirement

    in_path, lock_path = image_dir / "requirements.in", image_dir / "requirements.lock"
    rel = lock_path.relative_to(ROOT) if lock_path.is_relative_to(ROOT) else lock_path
    if not lock_path.exists():
        return [f"{rel}: missing; run `make lock`"]
    problems = []
    if recorded_hash(lock_path) != input_hash(in_path):
        problems.append(f"{rel}: stale (requirements.in changed since it was compiled); "
                        "run `make lock`")
    try:
        pins = parse_lock(lock_path)
    except ValueError as e:
        return problems + [f"{e}; run `make lock`"]
    for line in requirement_lines(in_path):
        req = Requirement(line)
        pin = pins.get(norm(req.name))
        if pin is None:
            problems.append(f"{rel}: {req.name} is in requirements.in but not locked; "
                            "run `make lock`")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{rel}: {req.name}=={pin.version} does not satisfy "
                            f"{req.specifier} from requirements.in; run `make lock`")
    for pin in pins.values():
        if pin.hashes == 0:
            problems.append(f"{rel}: {pin.name} has no --hash; run `make lock`")
    return problems


def image_dirs(names: list[str]) -> list[Path]:
    dirs = sorted(p.parent for p in IMAGES_DIR.glob("*/requirements.in"))
    return [d for d in dirs if d.name in names] if names else dirs


def compile_lock(image_dir: Path, uv: str) -> None:
    in_path, lock_path = image_dir / "requirements.in", image_dir / "requirements.lock"
    # Relative paths and --no-header keep the lock identical whoever runs `make lock`.
    cmd = [uv, "pip", "compile", str(in_path.relative_to(ROOT)), *TARGET, "--generate-hashes",
           "--no-header", "--quiet", "--index-url", "https://pypi.org/simple"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"uv pip compile failed for {in_path}:\n{out.stderr}")
    uv_version = subprocess.run([uv, "--version"], capture_output=True, text=True,
                                check=False).stdout.strip()
    header = (
        f"# {lock_path.relative_to(ROOT)}: generated by `make lock` ({uv_version}); do not edit,\n"
        f"# edit {in_path.name} and re-run `make lock`. Target: Linux x86_64 "
        "(manylinux_2_28), CPython 3.12.\n"
        "# Install: pip install --require-hashes --no-deps -r requirements.lock\n"
        f"{HASH_PREFIX}{input_hash(in_path)}\n"
    )
    lock_path.write_text(header + out.stdout)


def cpu_subset(lock_path: Path) -> str:
    """The lock without GPU-only packages, for the fresh-venv install check."""
    return "\n".join(p.block for n, p in parse_lock(lock_path).items()
                     if not GPU_ONLY.match(n)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="re-lock images (default: all)")
    c.add_argument("images", nargs="*")
    c.add_argument("--uv", default=shutil.which("uv") or "uv")
    k = sub.add_parser("check", help="offline freshness check (default: all)")
    k.add_argument("images", nargs="*")
    s = sub.add_parser("cpu-subset", help="print a lock without GPU-only packages")
    s.add_argument("lock", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "compile":
        for d in image_dirs(a.images):
            compile_lock(d, a.uv)
            print(f"locked {d.relative_to(ROOT)}/requirements.lock "
                  f"({len(parse_lock(d / 'requirements.lock'))} packages)")
        return 0
    if a.cmd == "check":
        problems = [p for d in image_dirs(a.images) for p in check(d)]
        print("\n".join(problems) or "locks are fresh")
        return 1 if problems else 0
    sys.stdout.write(cpu_subset(a.lock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
