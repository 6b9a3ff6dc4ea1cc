"""A local S3-compatible server (moto's) on loopback, for tests, benchmarks and development.

    proc, url = start_local_s3(Path("/tmp/moto.log"))   # url: http://127.0.0.1:<free port>
    os.environ["AWS_ENDPOINT_URL"] = url                  # any key pair is accepted
    ...
    proc.terminate()

Needs `moto[server]` (the dev extra). 127.0.0.1 only: the server has no authentication.
For an interactive server see infra/moto-server.sh.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_s3(log: Path, port: int | None = None, nice: int = 0,
                   timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """Start moto_server on 127.0.0.1 and wait until it answers; the caller terminates it.
    `nice` lowers its priority (benchmarks: a real S3 endpoint takes no CPU from training)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()",
             "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = Path(log).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto_server did not start: {tail}") from None
            time.sleep(0.1)
