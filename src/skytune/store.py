"""Artifact stores behind one small interface, and the artifact protocol on top of them.

    from skytune.store import open_store, upload_artifact, download_artifact
    store = open_store("file:///tmp/runs")              # or s3://bucket/prefix, hf://org/repo
    upload_artifact(store, Path("out/adapter"), "demo-1a2b/adapter", meta={"step": 40})
    download_artifact(store, "demo-1a2b/adapter", Path("models/demo/adapter"))

A store maps keys ('run/checkpoints/step-10/model.safetensors') to bytes. The protocol:
an artifact is a key prefix holding files plus a `COMPLETE` marker, written last, that lists
every file with sha256 and size. An artifact without COMPLETE does not exist for resume or
pull; a download verifies each file against the marker and skips files already present
and correct, so an interrupted pull resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune import __version__
from skytune.errors import SkytuneError

COMPLETE = "COMPLETE"
Progress = Callable[[int], None]  # called with bytes done since the last call


@dataclass(frozen=True)
class Entry:
    key: str
    size: int


class Store(ABC):
    """Keys are '/'-separated paths relative to the store's base URL."""

    url: str

    @abstractmethod
    def put_file(self, src: Path, key: str, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def get_file(self, key: str, dst: Path, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """Every object under prefix (recursive), sorted by key."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete every object under prefix (a 'directory')."""

    def check(self) -> None:
        """Raise SkytuneError unless the store can be read and written now."""
        probe = f".skytune-probe-{os.getpid()}"
        try:
            self.put_bytes(probe, b"ok")
            ok = self.get_bytes(probe) == b"ok"
            self.delete(probe)
        except SkytuneError:
            raise
        except Exception as e:  # noqa: BLE001 - any client error means "unreachable"
            raise SkytuneError(f"store {self.url} is not reachable: {_short(e)}") from None
        if not ok:
            raise SkytuneError(f"store {self.url}: wrote a probe object but could not read it back")

    def put_many(self, items: list[tuple[Path, str]], progress: Progress | None = None) -> None:
        """Upload several files; remote stores override this to run in parallel."""
        for src, key in items:
            self.put_file(src, key, progress)

    def get_many(self, items: list[tuple[str, Path]], progress: Progress | None = None) -> None:
        for key, dst in items:
            self.get_file(key, dst, progress)

    def close(self) -> None:  # noqa: B027 - optional hook; most stores hold nothing
        """Wait for and release background resources."""

    def open_args(self) -> dict[str, Any]:
        """What `open_store(**args)` needs to open this store again in another process (the
        checkpoint upload worker). No secrets: credentials come from the environment."""
        return {"url": self.url}


class FileStore(Store):
    """A directory on a local or network file system. Writes go to a temp name, then rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _p(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise SkytuneError(f"store key {key!r} escapes the store root {self.root}")
        return p

    def put_file(self, src: Path, key: str, progress: Progress | None = None) -> None:
        _copy_atomic(src, self._p(key), progress)

    def get_file(self, key: str, dst: Path, progress: Progress | None = None) -> None:
        src = self._p(key)
        if not src.is_file():
            raise SkytuneError(f"{self.url}/{key}: no such object")
        _copy_atomic(src, dst, progress)

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dst)

    def get_bytes(self, key: str) -> bytes | None:
        p = self._p(key)
        return p.read_bytes() if p.is_file() else None

    def list(self, prefix: str = "") -> list[Entry]:
        base = self._p(prefix) if prefix else self.root
        if base.is_file():
            return [Entry(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        out = [
            Entry(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        ]
        return sorted(out, key=lambda e: e.key)

    def delete(self, prefix: str) -> None:
        p = self._p(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SkytuneError(f"store {self.url}: cannot create it: {e.strerror}") from None
        super().check()


def _copy_atomic(src: Path, dst: Path, progress: Progress | None) -> None:
    """Copy to a temp name, then rename: a reader never sees a half-written file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    if progress:
        progress(dst.stat().st_size)


def open_store(url: str, *, endpoint_url: str | None = None, private: bool = True) -> Store:
    """file://DIR, s3://bucket[/prefix], hf://org/repo — or a plain local path."""
    if url.startswith("file://"):
        return FileStore(url[len("file://"):])
    if url.startswith("s3://"):
        from skytune.stores.s3 import S3Store

        return S3Store(url, endpoint_url=endpoint_url)
    if url.startswith("hf://"):
        from skytune.stores.hf import HFStore

        return HFStore(url, private=private)
    if "://" in url:
        raise SkytuneError(f"store {url!r}: unknown scheme; use file://, s3:// or hf://")
    return FileStore(url)


# ---------------------------------------------------------------------------------------
# The artifact protocol


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def describe_dir(local_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every file under local_dir."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    return {
        p.relative_to(local_dir).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in files
        if p.name != COMPLETE
    }


def upload_artifact(
    store: Store, local_dir: Path, prefix: str, meta: dict[str, Any] | None = None,
    progress: Progress | None = None, files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Upload a directory as an artifact; COMPLETE is written only after every file landed.

    Returns the COMPLETE record ({files, meta..., skytune_version, completed_at}).
    """
    local_dir = Path(local_dir)
    files = files if files is not None else describe_dir(local_dir)
    store.delete(f"{prefix}/{COMPLETE}")  # re-uploading: the old marker must not vouch for new files
    store.put_many([(local_dir / rel, f"{prefix}/{rel}") for rel in files], progress)
    record = {
        **(meta or {}),
        "files": files,
        "skytune_version": __version__,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.put_bytes(f"{prefix}/{COMPLETE}", json.dumps(record, indent=1).encode())
    return record


def read_complete(store: Store, prefix: str) -> dict[str, Any] | None:
    """The artifact's COMPLETE record, or None if it is incomplete or missing."""
    raw = store.get_bytes(f"{prefix}/{COMPLETE}")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record.get("files"), dict) else None


def download_artifact(
    store: Store, prefix: str, dst: Path, progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Download a complete artifact into dst, verifying sha256. Resumes: files already in dst
    with the right hash are kept. Raises SkytuneError for an incomplete artifact or a mismatch.
    """
    record = read_complete(store, prefix)
    if record is None:
        raise SkytuneError(
            f"{store.url}/{prefix}: incomplete artifact (no {COMPLETE} marker); it was "
            "interrupted while being written. Pick another one (`skytune runs`)."
        )
    dst = Path(dst)
    todo: list[tuple[str, Path]] = []
    for rel, info in record["files"].items():
        target = dst / rel
        if target.is_file() and target.stat().st_size == info["size"] \
                and sha256_file(target) == info["sha256"]:
            continue
        todo.append((f"{prefix}/{rel}", target))
    if on_total:
        on_total(sum(record["files"][k[len(prefix) + 1:]]["size"] for k, _ in todo))
    store.get_many(todo, progress)
    for key, target in todo:
        info = record["files"][key[len(prefix) + 1:]]
        got = sha256_file(target)
        if got != info["sha256"]:
            target.unlink(missing_ok=True)
            raise SkytuneError(
                f"{store.url}/{key}: sha256 mismatch (expected {info['sha256'][:12]}…, got "
                f"{got[:12]}…); the stored file is corrupt — pull an older checkpoint"
            )
    (dst / "skytune-artifact.json").write_text(json.dumps(
        {"store": store.url, "prefix": prefix, **{k: v for k, v in record.items() if k != "files"}},
        indent=1))
    return record


def iter_dirs(entries: Iterable[Entry], prefix: str) -> list[str]:
    """Immediate child 'directories' of prefix among entries."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out = {e.key[len(prefix):].split("/", 1)[0] for e in entries
           if e.key.startswith(prefix) and "/" in e.key[len(prefix):]}
    return sorted(out)


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
