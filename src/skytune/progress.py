"""Progress bars for long transfers (uploads, downloads, merges), on stderr.

    with bytes_bar("pull demo/adapter") as bar:
        download_artifact(store, key, dst, progress=bar.update, on_total=bar.total)

Bars are hidden when stderr is not a terminal (CI logs, SkyPilot log files), except for a
final one-line summary, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task
        self._lock = threading.Lock()  # s3 callbacks arrive from transfer threads
        self.done = 0

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._p is not None:
                self._p.update(self._t, advance=n)

    def total(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._t, total=n)


@contextmanager
def bytes_bar(description: str) -> Iterator[_Bar]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    start = time.monotonic()
    if not sys.stderr.isatty():
        bar = _Bar(None, None)
        yield bar
        secs = time.monotonic() - start
        console.print(f"{description}: {bar.done / 1e6:.1f} MB in {secs:.1f}s", highlight=False)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console) as p:
        yield _Bar(p, p.add_task(description, total=None))
