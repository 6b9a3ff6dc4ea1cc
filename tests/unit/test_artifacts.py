"""The artifact protocol on the file store: COMPLETE last, sha256 verified, resumable pulls."""

import json

import pytest

from skytune.errors import SkytuneError
from skytune.store import (
    COMPLETE,
    FileStore,
    download_artifact,
    open_store,
    read_complete,
    sha256_file,
    upload_artifact,
)


@pytest.fixture
def art(tmp_path):
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"x" * 5000)
    (d / "sub" / "b.json").write_text('{"k": 1}')
    return d


def test_upload_writes_complete_with_hashes(tmp_path, art):
    store = FileStore(tmp_path / "store")
    record = upload_artifact(store, art, "run/adapter", meta={"step": 7})
    assert record["files"]["a.bin"] == {"sha256": sha256_file(art / "a.bin"), "size": 5000}
    assert set(record["files"]) == {"a.bin", "sub/b.json"}
    stored = json.loads(store.get_bytes(f"run/adapter/{COMPLETE}"))
    assert stored["step"] == 7 and stored["files"] == record["files"]


def test_download_roundtrip_and_self_description(tmp_path, art):
    store = open_store(f"file://{tmp_path / 'store'}")
    upload_artifact(store, art, "run/adapter")
    dst = tmp_path / "out"
    download_artifact(store, "run/adapter", dst)
    assert (dst / "a.bin").read_bytes() == b"x" * 5000
    assert json.loads((dst / "skytune-artifact.json").read_text())["prefix"] == "run/adapter"


def test_incomplete_artifact_is_refused(tmp_path, art):
    store = FileStore(tmp_path / "store")
    upload_artifact(store, art, "run/adapter")
    store.delete(f"run/adapter/{COMPLETE}")
    assert read_complete(store, "run/adapter") is None
    with pytest.raises(SkytuneError, match="incomplete artifact"):
        download_artifact(store, "run/adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_file_fails_sha_and_is_not_kept(tmp_path, art):
    store = FileStore(tmp_path / "store")
    upload_artifact(store, art, "run/adapter")
    (store.root / "run/adapter/a.bin").write_bytes(b"y" * 5000)
    with pytest.raises(SkytuneError, match="sha256 mismatch"):
        download_artifact(store, "run/adapter", tmp_path / "out")
    assert not (tmp_path / "out" / "a.bin").exists()


def test_partial_download_resumes(tmp_path, art):
    store = FileStore(tmp_path / "store")
    upload_artifact(store, art, "run/adapter")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "a.bin").write_bytes(b"x" * 5000)  # already there and correct
    (dst / "sub").mkdir()
    (dst / "sub" / "b.json").write_text("half")  # a torn file from an interrupted pull
    fetched = []
    store.get_many = lambda items, progress=None: (fetched.extend(k for k, _ in items),
                                                   FileStore.get_many(store, items, progress))
    download_artifact(store, "run/adapter", dst)
    assert fetched == ["run/adapter/sub/b.json"]
    assert (dst / "sub" / "b.json").read_text() == '{"k": 1}'


def test_reupload_removes_old_marker_first(tmp_path, art):
    store = FileStore(tmp_path / "store")
    upload_artifact(store, art, "run/adapter")
    seen = []
    real_put_many = store.put_many
    store.put_many = lambda items, progress=None: (
        seen.append(store.get_bytes(f"run/adapter/{COMPLETE}")), real_put_many(items, progress))
    upload_artifact(store, art, "run/adapter")
    assert seen == [None]  # no marker vouched for the files while they were being replaced


def test_file_store_keys_cannot_escape_root(tmp_path):
    store = FileStore(tmp_path / "store")
    with pytest.raises(SkytuneError, match="escapes"):
        store.put_bytes("../evil", b"x")


def test_unknown_scheme(tmp_path):
    with pytest.raises(SkytuneError, match="unknown scheme"):
        open_store("gs://bucket")


def test_check_reports_unwritable_store(tmp_path):
    (tmp_path / "afile").write_text("not a directory")  # fails for root too
    store = FileStore(tmp_path / "afile" / "store")
    with pytest.raises(SkytuneError, match="cannot create it"):
        store.check()
