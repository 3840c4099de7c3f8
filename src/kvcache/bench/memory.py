"""Peak resident memory of this process while a block runs (a sampling thread; standard library only).

The kernel's high-water mark (``ru_maxrss``) only grows over a process's life, so it cannot tell one
benchmark row from the next; this samples the current resident set size instead (``/proc/self/statm`` on
Linux, ``ru_maxrss`` elsewhere) every ``interval`` seconds and keeps the largest value seen.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The current resident set size in bytes (the peak so far where the current value is not readable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak`` (bytes), ``m.before`` (bytes at entry)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
