"""Where the ONNX commands write: never over an input or an unrelated file, and never half a result.

* An export directory is built as a new directory beside the target and renamed onto it
  (:func:`swap_in_directory`); a target that already holds files is refused unless ``force``
  (:func:`check_export_dir`), and never when it is, or contains, the model being exported.
* An injected graph goes to a temporary file that is renamed onto the destination (:func:`atomic_write`);
  the destination may not be the input graph, and an existing file there is replaced only when it is an
  earlier injected graph, or with ``force`` (:func:`check_inject_destination`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvcache.errors import KVCacheError
from kvcache.files import atomic_write
from kvcache.onnx import names


def _listing(directory: Path, limit: int = 4) -> str:
    entries = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(entries[:limit])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")


def _contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved)."""
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def check_export_dir(out: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse an export target that would lose files.

    Raises
    ------
    KVCacheError
        ``out`` is a file; it is (or contains) ``source``, the model being exported; or it already holds
        files and ``force`` is not set.
    """
    if out.exists() and not out.is_dir():
        raise KVCacheError(f"--out {out} is a file, not a directory; give a new directory (it is created)")
    if source is not None and _contains(out, source):
        raise KVCacheError(f"--out {out} holds the model being exported ({source}); give another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KVCacheError(f"{out} already holds files ({_listing(out)}); give a new or empty directory, or "
                           "pass --force to replace it as a whole")


def swap_in_directory(new: Path, out: Path) -> None:
    """Move the finished directory ``new`` to ``out``, replacing whatever ``out`` was as a whole.

    ``new`` must be a sibling of ``out`` (same file system): each step is a rename. An existing ``out`` is
    renamed aside first and deleted only once ``new`` is in place.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual permissions of a new directory
    if not out.exists():
        os.replace(new, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        os.rmdir(out)
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def is_injected_graph(path: Path) -> bool:
    """Whether ``path`` is an ONNX graph that ``kvcache onnx inject`` wrote (its metadata says so)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable as ONNX is not one of ours
        return False
    return any(p.key == names.META_INJECTED for p in model.metadata_props)


def check_inject_destination(dest: Path, src: Path, *, force: bool) -> None:
    """Refuse a destination that is the input graph, a directory, or an unrelated existing file.

    Raises
    ------
    KVCacheError
        Naming the path and how to choose another.
    """
    if dest.exists() and dest.resolve() == src.resolve():
        raise KVCacheError(f"--out {dest} is the input graph; it is overwritten only with --force "
                           "(force=True): give another file name (default: <name>_kvcache.onnx beside it)")
    if dest.is_dir():
        raise KVCacheError(f"--out {dest} is a directory; give a file name")
    if dest.exists() and not force and not is_injected_graph(dest):
        raise KVCacheError(f"--out {dest} already exists and is not a graph `kvcache onnx inject` wrote; "
                           "give another file name, or pass --force to overwrite it")


def copy_atomic(src: Path, dest: Path, copy: Callable[[str, str], object] = shutil.copyfile) -> None:
    """Copy ``src`` to ``dest`` through a temporary file, so ``dest`` is never half written."""
    with atomic_write(dest) as tmp:
        copy(str(src), str(tmp))
