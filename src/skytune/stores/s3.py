"""S3 and S3-compatible object storage (AWS, Cloudflare R2, MinIO, Backblaze...) as a Store.

    from skytune.store import open_store
    store = open_store("s3://my-bucket/skytune", endpoint_url="https://<acct>.r2.cloudflarestorage.com")
    store.check()                                     # fails in seconds if unreachable
    store.put_many([(Path("ckpt/model.safetensors"), "run/checkpoints/step-10/model.safetensors")])

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, instance role). The endpoint is `endpoint_url` (the recipe's
`output.endpoint_url`), else AWS_ENDPOINT_URL, else AWS. The bucket must exist: skytune never
creates buckets, because the bucket's region, lifecycle and access policy are the owner's call.

Transfers go through s3transfer, the engine behind `aws s3 cp`: files above 16 MB upload and
download as parallel multipart parts, and `put_many`/`get_many` submit every file to one
transfer manager so small and large files share one pool of 16 connections.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from skytune.errors import SkytuneError
from skytune.store import Entry, Progress, Store, _short

MB = 1024 * 1024
# 16 MB parts, 16 at a time. Smaller parts mean more parallel streams per file: a 100 MB
# LoRA checkpoint goes up as 7 parallel parts instead of 2, and one retried part costs little.
# 10,000 parts (S3's limit) x 16 MB = 160 GB per object, far above any safetensors shard.
# Measured against 64 MB parts (bench/s3_bench.py, local S3 server): 64 MB was 15-40% slower
# on upload and no faster on download; awscli's defaults are 8 MB x 10.
PART_SIZE = 16 * MB
CONCURRENCY = 16

# Short connect timeout so a wrong or dead endpoint shows up fast; the read timeout covers the
# server's reply to one part, which slow S3-compatible providers can take a while on.
_CONNECT_TIMEOUT = 5
_READ_TIMEOUT = 120
# Transfers retry hard (a spot VM's network blips; R2 returns 5xx under load): botocore's
# "standard" mode backs off exponentially with jitter on throttling, 5xx and connection errors.
# AWS's own AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still win (the fault tests lower them).
def _retries() -> dict:
    return {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))}
# check() must answer in a few seconds when the endpoint is unreachable, so it uses a client
# that gives up after 2 attempts instead of backing off through 10.
_QUICK = dict(connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b'); the prefix has no leading or trailing '/'."""
    if not url.startswith("s3://"):
        raise SkytuneError(f"{url!r}: not an s3:// URL; use s3://bucket[/prefix]")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise SkytuneError(f"{url!r}: no bucket name; use s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


class S3Store(Store):
    def __init__(self, url: str, endpoint_url: str | None = None):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url  # None: botocore reads AWS_ENDPOINT_URL itself
        self.client = self._client(
            connect_timeout=_CONNECT_TIMEOUT, read_timeout=_READ_TIMEOUT, retries=_retries(),
            # One connection per concurrent part, plus room for list/put_bytes from other threads.
            max_pool_connections=CONCURRENCY + 8,
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
            max_concurrency=CONCURRENCY,
        )

    def _client(self, **config):
        # A session per store: boto3's default session is shared module state and not thread-safe
        # to create clients from.
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, config=Config(**config))

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    # -- Store --------------------------------------------------------------------------------

    def put_file(self, src: Path, key: str, progress: Progress | None = None) -> None:
        self.put_many([(Path(src), key)], progress)

    def get_file(self, key: str, dst: Path, progress: Progress | None = None) -> None:
        self.get_many([(key, Path(dst))], progress)

    def put_many(self, items: list[tuple[Path, str]], progress: Progress | None = None) -> None:
        subs = [ProgressCallbackInvoker(progress)] if progress else None
        with self._errors(f"upload to {self.url}"), \
                create_transfer_manager(self.client, self.transfer_config) as tm:
            futures = [tm.upload(str(src), self.bucket, self._key(key), subscribers=subs)
                       for src, key in items]
            for f in futures:
                f.result()  # the first failure leaves the `with`, which cancels the rest

    def get_many(self, items: list[tuple[str, Path]], progress: Progress | None = None) -> None:
        subs = [ProgressCallbackInvoker(progress)] if progress else None
        for _, dst in items:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
        # s3transfer writes each download to '<dst>.<random>' and renames it when complete, so
        # an interrupted pull never leaves a truncated file under the final name.
        with self._errors(f"download from {self.url}"), \
                create_transfer_manager(self.client, self.transfer_config) as tm:
            futures = [tm.download(self.bucket, self._key(key), str(dst), subscribers=subs)
                       for key, dst in items]
            for (key, _), f in zip(items, futures, strict=True):
                try:
                    f.result()
                except ClientError as e:
                    if _code(e) in ("404", "NoSuchKey"):
                        raise SkytuneError(f"{self.url}/{key}: no such object") from None
                    raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"write {self.url}/{key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        with self._errors(f"read {self.url}/{key}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as e:
                if _code(e) in ("404", "NoSuchKey"):
                    return None
                raise

    def list(self, prefix: str = "") -> list[Entry]:
        return sorted(self._list(prefix), key=lambda e: e.key)

    def _list(self, prefix: str) -> list[Entry]:
        prefix = prefix.strip("/")
        full = self._key(prefix)
        # S3 prefixes are plain string prefixes: 'step-1' also matches 'step-10/...'. A store
        # prefix is a path, so keep only the key itself and keys below it.
        query = full + "/" if full else ""
        out = []
        with self._errors(f"list {self.url}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"] == full or obj["Key"].startswith(query):
                        out.append(Entry(self._rel(obj["Key"]), obj["Size"]))
        return out

    def delete(self, prefix: str) -> None:
        keys = [self._key(e.key) for e in self._list(prefix)]
        with self._errors(f"delete {self.url}/{prefix}"):
            for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
                if resp.get("Errors"):
                    err = resp["Errors"][0]
                    raise SkytuneError(
                        f"{self.url}: could not delete {len(resp['Errors'])} object(s), e.g. "
                        f"{err.get('Key')}: {err.get('Code')} {err.get('Message', '')}".rstrip())

    def open_args(self) -> dict:
        return {"url": self.url, "endpoint_url": self.endpoint_url}

    def check(self) -> None:
        """Bucket reachable, present and writable — within a few seconds, or a SkytuneError."""
        quick = self._client(**_QUICK)
        with self._errors(f"reach {self.url}"):
            quick.head_bucket(Bucket=self.bucket)
        super().check()

    # -- errors -------------------------------------------------------------------------------

    def _errors(self, doing: str) -> _S3Errors:
        return _S3Errors(self, doing)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class _S3Errors:
    """Turn boto errors into one-line SkytuneErrors that say what to do.

    botocore's messages name the operation, bucket and key but never the credentials, so the
    short form of them is safe to show.
    """

    def __init__(self, store: S3Store, doing: str):
        self.store, self.doing = store, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, e, tb) -> bool:
        if e is None or isinstance(e, SkytuneError):
            return False
        s = self.store
        if isinstance(e, NoCredentialsError):
            raise SkytuneError(
                f"cannot {self.doing}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        if isinstance(e, ClientError):
            code = _code(e)
            if code in ("NoSuchBucket",) or (code == "404" and "HeadBucket" in str(e)):
                raise SkytuneError(
                    f"cannot {self.doing}: bucket {s.bucket!r} does not exist"
                    f"{_at(s)}; create it: aws s3 mb s3://{s.bucket}") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "ExpiredToken", "InvalidToken"):
                raise SkytuneError(
                    f"cannot {self.doing}: access denied ({code}){_at(s)}; check the credentials "
                    f"and that they may read and write s3://{s.bucket}") from None
            raise SkytuneError(f"cannot {self.doing}: {_short(e)}") from None
        if isinstance(e, (BotoCoreError, OSError)):
            raise SkytuneError(f"cannot {self.doing}: {_short(e)}{_at(s)}") from None
        return False


def _at(s: S3Store) -> str:
    ep = urlsplit(s.endpoint_url or s.client.meta.endpoint_url or "")
    # Only scheme and host: an endpoint URL may carry user:password@ and that must not be shown.
    return f" (endpoint {ep.scheme}://{ep.hostname}{f':{ep.port}' if ep.port else ''})" \
        if ep.hostname else ""
