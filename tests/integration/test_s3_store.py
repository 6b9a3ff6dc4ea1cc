"""S3Store against a real S3-compatible server (moto_server, see tests/conftest.py).

    .venv/bin/python -m pytest -q tests/integration/test_s3_store.py
"""

from __future__ import annotations

import os
import time

import pytest

from skytune.errors import SkytuneError
from skytune.store import (
    COMPLETE,
    download_artifact,
    open_store,
    read_complete,
    sha256_file,
    upload_artifact,
)
from skytune.stores.s3 import PART_SIZE, S3Store


def _checkpoint(d, big=PART_SIZE + 1234):
    """A checkpoint-like dir: one file over the multipart threshold, a few small ones."""
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big))
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "sub" / "trainer_state.json").write_text('{"global_step": 10}')
    (d / "empty.txt").write_bytes(b"")
    return d


def test_bytes_roundtrip_and_missing_key(s3_url):
    store = open_store(s3_url)
    assert isinstance(store, S3Store)
    store.put_bytes("a/b.json", b"{}")
    assert store.get_bytes("a/b.json") == b"{}"
    assert store.get_bytes("a/missing.json") is None
    assert store.get_bytes("nothing/here") is None


def test_list_is_path_prefix_not_string_prefix(s3_url):
    store = open_store(s3_url)
    for k in ("run/checkpoints/step-1/x", "run/checkpoints/step-10/x", "run/checkpoints/step-1"):
        store.put_bytes(k, b"1")
    keys = [e.key for e in store.list("run/checkpoints/step-1")]
    assert keys == ["run/checkpoints/step-1", "run/checkpoints/step-1/x"]
    store.delete("run/checkpoints/step-1")
    assert [e.key for e in store.list("run")] == ["run/checkpoints/step-10/x"]


def test_list_paginates_and_delete_batches(s3_url):
    store = open_store(s3_url)
    # 1,100 keys: two list pages (1,000 per page) and two DeleteObjects batches.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: store.put_bytes(f"many/{i:05d}", b"x"), range(1100)))
    entries = store.list("many")
    assert len(entries) == 1100 and entries[0].key == "many/00000" and entries[0].size == 1
    store.delete("many")
    assert store.list("many") == []


def test_artifact_roundtrip_multipart_with_progress(s3_url, tmp_path):
    src = _checkpoint(tmp_path / "ckpt")
    store = open_store(s3_url)
    up: list[int] = []
    record = upload_artifact(store, src, "run/checkpoints/step-10", meta={"step": 10},
                             progress=up.append)
    total = sum(f["size"] for f in record["files"].values())
    assert sum(up) == total
    sizes = {e.key: e.size for e in store.list("run/checkpoints/step-10")}
    assert sizes["run/checkpoints/step-10/adapter_model.safetensors"] == PART_SIZE + 1234
    assert f"run/checkpoints/step-10/{COMPLETE}" in sizes

    down: list[int] = []
    got = download_artifact(store, "run/checkpoints/step-10", tmp_path / "out",
                            progress=down.append)
    assert got["step"] == 10 and sum(down) == total
    for rel, info in record["files"].items():
        assert sha256_file(tmp_path / "out" / rel) == info["sha256"]
    # no temp files left next to the downloads
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "sub", "empty.txt",
         "skytune-artifact.json"])


def test_pull_resumes_and_refuses_incomplete(s3_url, tmp_path):
    src = _checkpoint(tmp_path / "ckpt", big=3 * 1024 * 1024)
    store = open_store(s3_url)
    upload_artifact(store, src, "r/adapter")
    out = tmp_path / "out"
    download_artifact(store, "r/adapter", out)
    (out / "adapter_config.json").write_text("corrupted locally")
    down: list[int] = []
    download_artifact(store, "r/adapter", out, progress=down.append)
    assert sum(down) == len('{"r": 8}')  # only the damaged file was fetched again

    store.delete(f"r/adapter/{COMPLETE}")
    assert read_complete(store, "r/adapter") is None
    with pytest.raises(SkytuneError, match="incomplete artifact"):
        download_artifact(store, "r/adapter", tmp_path / "out2")


def test_corrupt_object_is_detected(s3_url, tmp_path):
    src = _checkpoint(tmp_path / "ckpt", big=1024)
    store = open_store(s3_url)
    upload_artifact(store, src, "r/adapter")
    store.put_bytes("r/adapter/adapter_config.json", b'{"r": 9}')
    with pytest.raises(SkytuneError, match="sha256 mismatch"):
        download_artifact(store, "r/adapter", tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_get_missing_object_is_a_clear_error(s3_url, tmp_path):
    store = open_store(s3_url)
    with pytest.raises(SkytuneError, match="no such object"):
        store.get_file("nope/model.safetensors", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_prefixless_store_and_endpoint_argument(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    # The recipe's endpoint_url is used when AWS_ENDPOINT_URL is absent.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = open_store(f"s3://{bucket}", endpoint_url=s3_server.endpoint_url)
    store.check()
    store.put_bytes("k", b"v")
    assert [e.key for e in store.list()] == ["k"]
    assert open_store(f"s3://{bucket}/", endpoint_url=s3_server.endpoint_url).get_bytes("k") == b"v"


def test_check_passes_and_missing_bucket_says_how_to_fix(s3_server):
    open_store(f"s3://{s3_server.new_bucket()}/p").check()
    with pytest.raises(SkytuneError, match=r"does not exist.*aws s3 mb s3://no-such-bucket-x1"):
        open_store("s3://no-such-bucket-x1/p").check()
    with pytest.raises(SkytuneError, match="aws s3 mb"):
        open_store("s3://no-such-bucket-x1/p").put_bytes("k", b"v")


def test_unreachable_endpoint_fails_check_fast(s3_server, dead_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETSHOULDNOTSHOW")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-value")
    store = open_store("s3://some-bucket/p", endpoint_url=dead_endpoint)
    t0 = time.monotonic()
    with pytest.raises(SkytuneError) as err:
        store.check()
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "not reach" in msg or "Could not connect" in msg, msg
    assert "\n" not in msg
    assert "SECRET" not in msg and "very-secret" not in msg


def test_bad_credentials_say_so_without_leaking_them(s3_url, monkeypatch):
    # moto accepts any key by default; its server-mode auth check is off, so only assert the
    # message shape for the no-credentials case, which boto3 detects locally.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SkytuneError, match="no AWS credentials"):
        open_store(s3_url).put_bytes("k", b"v")
