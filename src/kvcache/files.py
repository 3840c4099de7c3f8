"""Writing files so that a reader never sees half of one: write beside the target, then rename onto it.

Standard library only: ``bench/kvpress_runner.py`` and ``scripts/standalone.py`` load this file by path
where kvcache itself is not importable (side environments).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "write_text_atomic"]


@contextmanager
def atomic_write(dest: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``dest`` to write; renamed onto ``dest`` when the block ends without error.

    On any error (including an interrupt) the temporary file is removed and ``dest`` is left as it was.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(dest: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` through :func:`atomic_write`, creating its folder if needed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
