"""Shared fixtures. The S3 ones run a real S3-compatible server (moto_server) on loopback.

    def test_roundtrip(s3_url):            # a fresh, empty bucket per test
        store = open_store(s3_url)          # AWS_ENDPOINT_URL + dummy credentials are set

    def test_subprocess(s3_server, s3_url):
        subprocess.run([...], env={**os.environ, **s3_server.env})

boto3 is not mocked: requests go over HTTP to a moto_server process, so retries, multipart
uploads and timeouts behave as against a real endpoint. The server starts once per session.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass, field

import pytest

from skytune.stores.local_s3 import free_port, start_local_s3

# Dummy credentials, and no ~/.aws files: a developer's real profile must never be used by tests.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/skytune-tests/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/skytune-tests/credentials",
}
S3_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@dataclass
class S3Server:
    endpoint_url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # what a subprocess needs to reach it

    def new_bucket(self) -> str:
        import boto3

        name = f"skytune-test-{uuid.uuid4().hex[:12]}"
        boto3.session.Session().client("s3", endpoint_url=self.endpoint_url).create_bucket(
            Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto_server for the session; sets AWS_ENDPOINT_URL and dummy credentials."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    proc, url = start_local_s3(tmp_path_factory.mktemp("moto") / "moto.log")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": url}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    for k in S3_UNSET:
        mp.delenv(k, raising=False)
    try:
        yield S3Server(url, proc, env)
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_url(s3_server) -> str:
    """s3://<fresh bucket>/skytune on the session's moto_server."""
    return f"s3://{s3_server.new_bucket()}/skytune"


@pytest.fixture
def dead_endpoint() -> str:
    """An http:// URL on loopback where nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"
