"""Helpers shared by the default-model scripts: import single kvcache modules by path, write files atomically.

The training and evaluation jobs must run where only torch, transformers and tokenizers are installed,
possibly at releases older than the package supports, so they load just the self-contained modules they
need (``bench/tasks.py``, ``models/corpus.py``) instead of ``import kvcache``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_module(name: str, relpath: str) -> ModuleType:
    """Import ``src/kvcache/<relpath>`` under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "src" / "kvcache" / relpath)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {relpath} from {ROOT / 'src' / 'kvcache'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


_files = load_module("kvcache_files", "files.py")  # the package's atomic writer, standard library only


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (a temporary file beside it, then a rename)."""
    _files.write_text_atomic(path, text)
