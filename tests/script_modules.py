"""Import the project's scripts (``scripts/*.py``) as modules, for tests of their pieces.

Reuse from any test module (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from script_modules import import_script
    tdm = import_script("train_default_model")
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def import_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module; ``scripts/`` is on ``sys.path`` only while it imports (the scripts
    import their neighbour ``standalone``), and a second call returns the same module."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))
