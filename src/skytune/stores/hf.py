"""A Hugging Face Hub repository as a Store: checkpoints and models land in a (private) repo.

    from skytune.store import open_store
    store = open_store("hf://me/math-qa-runs")          # model repo, created private on first write
    store = open_store("hf://datasets/me/ckpts/skytune") # a dataset repo, under a subfolder
    store.put_many([(Path("out/adapter/model.safetensors"), "run/adapter/model.safetensors")])

The token comes from HF_TOKEN (or `hf auth login`); it needs write access. Every write is a
commit: `put_many` commits its files together (large files go through LFS/Xet in parallel,
inside huggingface_hub), so a checkpoint costs one commit plus one for its COMPLETE marker.
A store key 'run/adapter/x' is the file '<subdir>/run/adapter/x' in the repo.
"""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from skytune.errors import SkytuneError
from skytune.store import Entry, Progress, Store, _short

# The Hub handles a few hundred operations per commit well; bigger commits time out server-side.
_OPS_PER_COMMIT = 200
_NOT_FOUND = (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
_REPO_TYPES = {"datasets": "dataset", "models": "model"}


def parse_hf_url(url: str) -> tuple[str, str, str]:
    """'hf://org/repo/sub/dir' -> ('model', 'org/repo', 'sub/dir');
    'hf://datasets/org/repo' -> ('dataset', 'org/repo', '')."""
    if not url.startswith("hf://"):
        raise SkytuneError(f"{url!r}: not an hf:// URL; use hf://org/repo[/subdir]")
    parts = [p for p in url[len("hf://"):].split("/") if p]
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 2:
        raise SkytuneError(f"{url!r}: needs an org and a repo name: hf://org/repo[/subdir]")
    if any(p in (".", "..") for p in parts):
        raise SkytuneError(f"{url!r}: '.' and '..' are not allowed in a Hub path")
    return repo_type, f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


class HFStore(Store):
    def __init__(self, url: str, private: bool = True):
        self.repo_type, self.repo_id, self.subdir = parse_hf_url(url)
        kind = "datasets/" if self.repo_type == "dataset" else ""
        self.url = f"hf://{kind}{self.repo_id}" + (f"/{self.subdir}" if self.subdir else "")
        self.private = private
        # token=None lets huggingface_hub read HF_TOKEN (or the `hf auth login` file) itself;
        # the token then never passes through skytune code and cannot leak into a message.
        self.api = HfApi()
        self._repo_ready = False
        # Commits to one branch from several threads of this process would race on the parent
        # commit; the sync thread and the main thread both write, so commits are serialized.
        self._commit_lock = threading.Lock()

    # -- paths --------------------------------------------------------------------------------

    def path_in_repo(self, key: str) -> str:
        key = key.strip("/")
        if any(p in (".", "..") for p in key.split("/")):
            raise SkytuneError(f"store key {key!r}: '.' and '..' are not allowed")
        return "/".join(p for p in (self.subdir, key) if p)

    def key_of(self, path: str) -> str:
        return path[len(self.subdir) + 1:] if self.subdir else path

    # -- Store --------------------------------------------------------------------------------

    def put_file(self, src: Path, key: str, progress: Progress | None = None) -> None:
        self.put_many([(Path(src), key)], progress)

    def put_many(self, items: list[tuple[Path, str]], progress: Progress | None = None) -> None:
        for i in range(0, len(items), _OPS_PER_COMMIT):
            batch = items[i:i + _OPS_PER_COMMIT]
            ops = [CommitOperationAdd(path_in_repo=self.path_in_repo(k), path_or_fileobj=str(src))
                   for src, k in batch]
            self._commit(ops, f"skytune: upload {len(ops)} file(s) under {batch[0][1]}")
            if progress:  # huggingface_hub reports no per-byte progress for a commit
                progress(sum(Path(src).stat().st_size for src, _ in batch))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._commit([CommitOperationAdd(path_in_repo=self.path_in_repo(key),
                                         path_or_fileobj=data)], f"skytune: write {key}")

    def get_file(self, key: str, dst: Path, progress: Progress | None = None) -> None:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Download into a temp dir next to dst (same file system), then rename: no
            # truncated file under the final name, no second copy in the HF cache.
            with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".hf-download-") as tmp:
                got = self._download(key, tmp)
                os.replace(got, dst)
        except _NOT_FOUND:
            raise SkytuneError(f"{self.url}/{key}: no such object") from None
        if progress:
            progress(dst.stat().st_size)

    def get_many(self, items: list[tuple[str, Path]], progress: Progress | None = None) -> None:
        # hf_hub_download fetches one file; 8 at a time keeps small files from serializing.
        with ThreadPoolExecutor(8) as ex:
            for f in [ex.submit(self.get_file, k, d, progress) for k, d in items]:
                f.result()

    def get_bytes(self, key: str) -> bytes | None:
        try:
            with tempfile.TemporaryDirectory(prefix="skytune-hf-") as tmp:
                return Path(self._download(key, tmp)).read_bytes()
        except _NOT_FOUND:
            return None

    def list(self, prefix: str = "") -> list[Entry]:
        path = self.path_in_repo(prefix)
        # List the parent folder: `path` may name a file or a folder, and a key's 'directory'
        # must not match its siblings by string prefix (step-1 vs step-10).
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            tree = self._call("list", lambda: list(self.api.list_repo_tree(  # a lazy pager
                self.repo_id, path_in_repo=parent or None, recursive=True,
                repo_type=self.repo_type)))
        except _NOT_FOUND:
            return []
        out = [
            Entry(self.key_of(f.path), f.size) for f in tree
            if isinstance(f, RepoFile) and f.path != ".gitattributes"  # the Hub's, not ours
            and (not path or f.path == path or f.path.startswith(path + "/"))
        ]
        return sorted(out, key=lambda e: e.key)

    def delete(self, prefix: str) -> None:
        entries = self.list(prefix)
        if entries:
            self._commit([CommitOperationDelete(path_in_repo=self.path_in_repo(e.key))
                          for e in entries], f"skytune: delete {prefix}")

    def open_args(self) -> dict:
        return {"url": self.url, "private": self.private}

    def check(self) -> None:
        try:
            self.api.whoami()
        except (HfHubHTTPError, LocalTokenNotFoundError):
            raise SkytuneError(
                f"store {self.url}: no valid Hugging Face token; set HF_TOKEN to a token with "
                "write access (https://huggingface.co/settings/tokens)") from None
        except OSError as e:
            raise SkytuneError(f"store {self.url} is not reachable: {_short(e)}") from None
        super().check()

    # -- helpers ------------------------------------------------------------------------------

    def _download(self, key: str, local_dir: str) -> str:
        return self._call("read", self.api.hf_hub_download, self.repo_id, self.path_in_repo(key),
                          repo_type=self.repo_type, local_dir=local_dir)

    def _commit(self, ops: list, message: str) -> None:
        with self._commit_lock:
            if not self._repo_ready:
                self._call("create", self.api.create_repo, self.repo_id, private=self.private,
                           repo_type=self.repo_type, exist_ok=True)
                self._repo_ready = True
            self._call("write to", self.api.create_commit, self.repo_id, ops,
                       commit_message=message, repo_type=self.repo_type)

    def _call(self, doing: str, fn, *args, **kwargs):
        """Call the Hub; turn auth errors into a SkytuneError that says what to do."""
        try:
            return fn(*args, **kwargs)
        except LocalEntryNotFoundError:
            # hf_hub_download's "offline and not cached": the Hub is unreachable, which must
            # not read as "no such file" (a missing COMPLETE would hide a finished checkpoint).
            raise SkytuneError(f"cannot {doing} {self.url}: the Hub is not reachable") from None
        except _NOT_FOUND:
            raise
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status in (401, 403):
                raise SkytuneError(
                    f"cannot {doing} {self.url}: the Hub refused ({status}); set HF_TOKEN to a "
                    f"token with write access to {self.repo_id}") from None
            raise SkytuneError(f"cannot {doing} {self.url}: {_short(e)}") from None
        except OSError as e:  # connection errors (httpx's are OSErrors here)
            raise SkytuneError(f"cannot {doing} {self.url}: {_short(e)}") from None
