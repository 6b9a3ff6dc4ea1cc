"""Store URL parsing, key mapping, and the artifact protocol on stores that need no network.

    .venv/bin/python -m pytest -q tests/unit/test_store.py

HFStore runs against an in-memory stand-in for HfApi here (same method names and arguments),
plus one live round trip against the real Hub that runs only when HF_TOKEN is set.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from skytune.errors import SkytuneError
from skytune.store import (
    COMPLETE,
    FileStore,
    download_artifact,
    iter_dirs,
    open_store,
    read_complete,
    upload_artifact,
)


def _artifact_dir(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "config.json").write_text("{}")
    (d / "sub" / "state.json").write_text('{"step": 3}')
    return d


# -- S3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,bucket,prefix", [
    ("s3://b", "b", ""),
    ("s3://b/", "b", ""),
    ("s3://b/a/b/", "b", "a/b"),
    ("s3://my-bucket/skytune", "my-bucket", "skytune"),
])
def test_parse_s3_url(url, bucket, prefix):
    from skytune.stores.s3 import parse_s3_url

    assert parse_s3_url(url) == (bucket, prefix)


@pytest.mark.parametrize("url", ["s3://", "s3:///x", "b/x"])
def test_parse_s3_url_rejects(url):
    from skytune.stores.s3 import parse_s3_url

    with pytest.raises(SkytuneError, match="s3://bucket"):
        parse_s3_url(url)


def test_s3_key_mapping():
    from skytune.stores.s3 import S3Store

    s = S3Store("s3://b/base/", endpoint_url="http://127.0.0.1:9")  # no request is made
    assert s.url == "s3://b/base"
    assert s._key("run/x") == "base/run/x" and s._key("/run/x/") == "base/run/x"
    assert s._key("") == "base"
    assert s._rel("base/run/x") == "run/x"
    bare = S3Store("s3://b", endpoint_url="http://127.0.0.1:9")
    assert bare._key("run/x") == "run/x" and bare._key("") == "" and bare._rel("run/x") == "run/x"


def test_open_store_dispatch(tmp_path):
    from skytune.stores.hf import HFStore
    from skytune.stores.s3 import S3Store

    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    assert isinstance(open_store("s3://b/p", endpoint_url="http://127.0.0.1:9"), S3Store)
    assert isinstance(open_store("hf://org/repo"), HFStore)
    with pytest.raises(SkytuneError, match="unknown scheme"):
        open_store("gs://b")


# -- HF: path logic ---------------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("hf://org/repo", ("model", "org/repo", "")),
    ("hf://org/repo/", ("model", "org/repo", "")),
    ("hf://org/repo/runs/v1", ("model", "org/repo", "runs/v1")),
    ("hf://datasets/org/ckpts/sub", ("dataset", "org/ckpts", "sub")),
    ("hf://models/org/repo", ("model", "org/repo", "")),
])
def test_parse_hf_url(url, expected):
    from skytune.stores.hf import parse_hf_url

    assert parse_hf_url(url) == expected


@pytest.mark.parametrize("url", ["hf://org", "hf://", "hf://datasets/org", "hf://org/r/../x",
                                 "s3://org/r"])
def test_parse_hf_url_rejects(url):
    from skytune.stores.hf import parse_hf_url

    with pytest.raises(SkytuneError):
        parse_hf_url(url)


def test_hf_key_to_path_in_repo():
    from skytune.stores.hf import HFStore

    s = HFStore("hf://org/repo/runs")
    assert s.url == "hf://org/repo/runs"
    assert s.path_in_repo("r1/adapter/x.safetensors") == "runs/r1/adapter/x.safetensors"
    assert s.path_in_repo("/r1/x/") == "runs/r1/x" and s.path_in_repo("") == "runs"
    assert s.key_of("runs/r1/x") == "r1/x"
    bare = HFStore("hf://datasets/org/repo")
    assert bare.url == "hf://datasets/org/repo" and bare.repo_type == "dataset"
    assert bare.path_in_repo("r1/x") == "r1/x" and bare.key_of("r1/x") == "r1/x"
    with pytest.raises(SkytuneError, match=r"'\.\.'"):
        s.path_in_repo("../escape")


# -- HF: the store logic against an in-memory HfApi --------------------------------------------

class FakeHfApi:
    """The slice of HfApi that HFStore uses, holding one repo's files in a dict."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []
        self.repo: tuple | None = None

    def create_repo(self, repo_id, *, private, repo_type, exist_ok):
        assert exist_ok
        self.repo = (repo_id, private, repo_type)
        self.files.setdefault(".gitattributes", b"*.safetensors filter=lfs\n")

    def create_commit(self, repo_id, operations, *, commit_message, repo_type):
        from huggingface_hub import CommitOperationAdd

        assert self.repo is not None, "commit before create_repo"
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                self.files[op.path_in_repo] = data
            else:
                del self.files[op.path_in_repo]
        self.commits.append(commit_message)

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive, repo_type):
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.hf_api import RepoFile, RepoFolder

        base = (path_in_repo or "").rstrip("/")
        under = [p for p in self.files if not base or p.startswith(base + "/")]
        if base and not under:
            raise EntryNotFoundError(f"{base}: not found")
        yield RepoFolder(path=base + "/dir", oid="0")  # folders are skipped by the store
        for p in under:
            yield RepoFile(path=p, size=len(self.files[p]), oid="0")

    def hf_hub_download(self, repo_id, filename, *, repo_type, local_dir):
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in self.files:
            raise EntryNotFoundError(f"{filename}: not found")
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.files[filename])
        return str(out)


@pytest.fixture
def hf_store():
    from skytune.stores.hf import HFStore

    store = HFStore("hf://me/runs/skytune", private=True)
    store.api = FakeHfApi()
    return store


def test_hf_repo_created_lazily_private(hf_store):
    assert hf_store.get_bytes("nothing") is None and hf_store.list() == []
    assert hf_store.api.repo is None
    hf_store.put_bytes("a/b", b"1")
    assert hf_store.api.repo == ("me/runs", True, "model")
    assert hf_store.api.files["skytune/a/b"] == b"1"


def test_hf_artifact_roundtrip_one_commit_per_put_many(hf_store, tmp_path):
    src = _artifact_dir(tmp_path / "a")
    seen: list[int] = []
    record = upload_artifact(hf_store, src, "r1/adapter", meta={"step": 3}, progress=seen.append)
    # files in one commit, then the marker: COMPLETE lands only after every file
    assert hf_store.api.commits[0].startswith("skytune: upload 3 file(s)")
    assert hf_store.api.commits[-1] == f"skytune: write r1/adapter/{COMPLETE}"
    assert sum(seen) == sum(f["size"] for f in record["files"].values())
    assert [e.key for e in hf_store.list("r1")] == [
        f"r1/adapter/{COMPLETE}", "r1/adapter/config.json", "r1/adapter/model.safetensors",
        "r1/adapter/sub/state.json"]
    got = download_artifact(hf_store, "r1/adapter", tmp_path / "out")
    assert got["step"] == 3
    assert (tmp_path / "out" / "sub" / "state.json").read_text() == '{"step": 3}'
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".hf-")]


def test_hf_list_and_delete_are_path_based(hf_store):
    for k in ("r/ckpt/step-1/x", "r/ckpt/step-10/x", "r/ckpt/step-1/y"):
        hf_store.put_bytes(k, b"1")
    assert [e.key for e in hf_store.list("r/ckpt/step-1")] == ["r/ckpt/step-1/x", "r/ckpt/step-1/y"]
    assert [e.key for e in hf_store.list("r/ckpt/step-1/x")] == ["r/ckpt/step-1/x"]
    assert iter_dirs(hf_store.list("r/ckpt"), "r/ckpt") == ["step-1", "step-10"]
    n = len(hf_store.api.commits)
    hf_store.delete("r/ckpt/step-1")
    assert len(hf_store.api.commits) == n + 1  # one commit for the whole folder
    assert [e.key for e in hf_store.list("r")] == ["r/ckpt/step-10/x"]
    hf_store.delete("not/there")  # no-op, no empty commit
    assert len(hf_store.api.commits) == n + 1
    with pytest.raises(SkytuneError, match="no such object"):
        hf_store.get_file("r/ckpt/step-1/x", Path("/tmp") / uuid.uuid4().hex)


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN (writes a repo)")
def test_hf_live_roundtrip(tmp_path):
    """Against the real Hub: a private repo created on first write, artifact in and out."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = f"{api.whoami()['name']}/skytune-test-{uuid.uuid4().hex[:8]}"
    store = open_store(f"hf://{repo}/runs", private=True)
    try:
        store.check()
        upload_artifact(store, _artifact_dir(tmp_path / "a"), "r1/adapter", meta={"step": 3})
        assert api.repo_info(repo).private
        assert read_complete(store, "r1/adapter")["step"] == 3
        assert download_artifact(store, "r1/adapter", tmp_path / "out")["step"] == 3
        store.delete("r1/adapter")
        assert store.list("r1") == []
        assert store.get_bytes(f"r1/adapter/{COMPLETE}") is None
    finally:
        api.delete_repo(repo, missing_ok=True)


# -- FileStore + protocol -----------------------------------------------------------------------

def test_file_store_artifact_protocol(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.check()
    src = _artifact_dir(tmp_path / "a")
    upload_artifact(store, src, "r/ckpt/step-1")
    assert read_complete(store, "r/ckpt/step-1") is not None
    store.delete("r/ckpt/step-1/COMPLETE")
    with pytest.raises(SkytuneError, match="incomplete"):
        download_artifact(store, "r/ckpt/step-1", tmp_path / "out")
