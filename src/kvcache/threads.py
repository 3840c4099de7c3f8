"""How many CPU threads torch uses for a generation.

A small model's matrices are too small for torch's intra-op thread pool to pay off on CPU, and the pool's
workers spin while they wait: when any other process keeps one core busy, a 2-thread decode of the bundled
model ran 45x slower than a 1-thread one (5-7 against 310-340 tokens/s, measured with ``kvcache generate``
while a single-threaded job ran on the other core). So the default (``None``) is one thread for models under
:data:`SMALL_MODEL_PARAMETERS` on CPU, and torch's own default otherwise; ``--threads N`` overrides it.
"""

from __future__ import annotations

from typing import Any

import torch

#: below this many parameters, a model runs on one CPU thread unless asked otherwise
SMALL_MODEL_PARAMETERS = 100_000_000


def choose_threads(model: Any, requested: int | None) -> int:
    """Set and return torch's intra-op thread count for running ``model``.

    Parameters
    ----------
    requested:
        Threads asked for (``--threads``), or ``None``: one for a small model on CPU, else torch's default.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    param = next(model.parameters(), None)
    on_cpu = param is None or param.device.type == "cpu"
    if on_cpu and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return torch.get_num_threads()
