"""S3 throughput: skytune's S3Store against `aws s3 cp --recursive`, same data, same server.

    .venv/bin/python bench/s3_bench.py                       # local moto_server, 1 GiB checkpoint
    .venv/bin/python bench/s3_bench.py --url s3://my-bucket/bench --size-gb 4  # real bucket

Builds a checkpoint-like directory (a few large random "safetensors" shards plus small json
files), then times four transfers of it, --rounds times in alternating order: upload with
skytune, upload with awscli, download with skytune, download with awscli. The ratio is
awscli's median time over skytune's (> 1.0 means skytune is faster). It also times the full
artifact protocol (upload_artifact/download_artifact: sha256 of every file + COMPLETE
marker) for reference.
Results go to bench/results/s3-<host>-<date>.json.

Against the local moto_server (the default) the server keeps every object in memory (about
3x the data size at peak) and shares the CPUs with the client, so absolute MB/s are about
the machine, and the ratio is about the clients. awscli: `pip install awscli` into the
venv, or pass --aws /path/to/aws.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def make_checkpoint(d: Path, size_gb: float, shards: int) -> int:
    """Random shards (incompressible, like weights) plus the small files a checkpoint has."""
    d.mkdir(parents=True)
    shard = int(size_gb * 1024 * MB / shards)
    for i in range(shards):
        with open(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for left in range(shard, 0, -64 * MB):
                f.write(os.urandom(min(64 * MB, left)))
    for name in ("config.json", "trainer_state.json", "adapter_config.json",
                 "tokenizer_config.json", "generation_config.json"):
        (d / name).write_text(json.dumps({"name": name, "pad": "x" * 2000}))
    (d / "rng_state.pth").write_bytes(os.urandom(15_000))
    return sum(p.stat().st_size for p in d.iterdir())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def aws_cp(aws: str, src: str, dst: str, endpoint: str | None, env: dict) -> None:
    cmd = [aws, "s3", "cp", "--recursive", "--only-show-errors", src, dst]
    if endpoint:
        cmd += ["--endpoint-url", endpoint]
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="s3://bucket/prefix to use instead of a local moto_server")
    ap.add_argument("--endpoint-url", help="S3-compatible endpoint for --url (R2, MinIO)")
    ap.add_argument("--size-gb", type=float, default=1.0, help="total checkpoint size")
    ap.add_argument("--shards", type=int, default=4, help="large files in the checkpoint")
    ap.add_argument("--rounds", type=int, default=3, help="repeats; medians are reported")
    ap.add_argument("--aws", default=shutil.which("aws", path=f"{Path(sys.executable).parent}:"
                                                  f"{os.environ.get('PATH', '')}"))
    ap.add_argument("--workdir", type=Path, default=None, help="where the data is written")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.aws:
        raise SystemExit("awscli not found: pip install awscli (or pass --aws PATH)")

    sys.path.insert(0, str(HERE.parent / "src"))
    import boto3
    import s3transfer

    from skytune.store import download_artifact, upload_artifact
    from skytune.stores.local_s3 import start_local_s3
    from skytune.stores.s3 import CONCURRENCY, PART_SIZE, S3Store

    work = Path(tempfile.mkdtemp(prefix="skytune-s3bench-", dir=args.workdir))
    env = dict(os.environ)
    moto = None
    try:
        if args.url:
            url, endpoint = args.url.rstrip("/"), args.endpoint_url
        else:
            for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                         "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_CONFIG_FILE": str(work / "none"),
                         "AWS_SHARED_CREDENTIALS_FILE": str(work / "none")}.items():
                env[k] = os.environ[k] = v
            moto, endpoint = start_local_s3(work / "moto.log")
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            url = f"s3://{bucket}"

        src = work / "ckpt"
        print(f"writing {args.size_gb} GiB checkpoint to {src} ...", file=sys.stderr)
        total = make_checkpoint(src, args.size_gb, args.shards)
        store = S3Store(url, endpoint_url=endpoint)
        run = f"bench-{uuid.uuid4().hex[:6]}"
        files = sorted(p for p in src.iterdir())
        runs: dict[str, list[float]] = {k: [] for k in (
            "upload_skytune", "upload_awscli", "download_skytune", "download_awscli",
            "upload_artifact", "download_artifact")}

        def up_sky():
            runs["upload_skytune"].append(timed(lambda: store.put_many(
                [(p, f"{run}/sky/{p.name}") for p in files])))

        def up_aws():
            runs["upload_awscli"].append(timed(lambda: aws_cp(
                args.aws, str(src), f"{url}/{run}/aws/", endpoint, env)))

        def down_sky():
            runs["download_skytune"].append(timed(lambda: store.get_many(
                [(f"{run}/sky/{p.name}", work / "d-sky" / p.name) for p in files])))
            shutil.rmtree(work / "d-sky")

        def down_aws():
            runs["download_awscli"].append(timed(lambda: aws_cp(
                args.aws, f"{url}/{run}/aws/", str(work / "d-aws"), endpoint, env)))
            shutil.rmtree(work / "d-aws")

        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr)
            # Alternate which tool goes first, so neither always meets a warmer server.
            for step in ((up_sky, up_aws, down_aws, down_sky) if r % 2 == 0
                         else (up_aws, up_sky, down_sky, down_aws)):
                step()
            store.delete(run)  # moto holds objects in memory: free them between rounds

            # The whole protocol: sha256 of each file + transfer + COMPLETE (+ verify).
            runs["upload_artifact"].append(timed(
                lambda: upload_artifact(store, src, f"{run}/artifact")))
            runs["download_artifact"].append(timed(lambda: download_artifact(
                store, f"{run}/artifact", work / "d-art")))
            shutil.rmtree(work / "d-art")
            store.delete(run)
        t = {k: statistics.median(v) for k, v in runs.items()}

        mbps = {k: round(total / MB / v, 1) for k, v in t.items()}
        result = {
            "bench": "s3_bench",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "host": socket.gethostname(), "platform": platform.platform(),
                "python": platform.python_version(), "cpus": os.cpu_count(),
                "cpu": _cpu_model(), "mem_gb": _mem_gb(),
            },
            "server": "s3 " + url.split("/")[2] + f" at {endpoint}" if args.url
            else "local moto_server (in-memory, same machine)",
            "data": {"bytes": total, "files": len(files), "large_files": args.shards},
            "skytune": {"part_size_mb": PART_SIZE // MB, "max_concurrency": CONCURRENCY,
                        "boto3": boto3.__version__, "s3transfer": s3transfer.__version__},
            "awscli": subprocess.run([args.aws, "--version"], capture_output=True,
                                     text=True, env=env).stdout.strip(),
            "rounds": args.rounds,
            "seconds_median": {k: round(v, 2) for k, v in t.items()},
            "seconds_all": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "MiB_per_s_median": mbps,
            "ratio_vs_awscli": {  # awscli seconds / skytune seconds: > 1 means skytune faster
                "upload": round(t["upload_awscli"] / t["upload_skytune"], 2),
                "download": round(t["download_awscli"] / t["download_skytune"], 2),
            },
        }
        out = args.out or HERE / "results" / (
            f"s3-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    finally:
        if moto:
            moto.terminate()
            moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_gb() -> float | None:
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        return round(kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
