"""The CPU thread count chosen for a generation: one for small models unless asked, the request otherwise."""

from __future__ import annotations

import pytest
import torch

from kvcache.models.random import random_model
from kvcache.threads import SMALL_MODEL_PARAMETERS, choose_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_small_model_runs_on_one_thread_unless_asked(restore_threads) -> None:
    model = random_model("llama")
    assert sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
    torch.set_num_threads(2)
    assert choose_threads(model, None) == 1 == torch.get_num_threads()
    assert choose_threads(model, 2) == 2 == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        choose_threads(model, 0)


def test_a_large_model_keeps_torchs_default(restore_threads, monkeypatch) -> None:
    import kvcache.threads as threads_module

    model = random_model("llama")
    monkeypatch.setattr(threads_module, "SMALL_MODEL_PARAMETERS", 10)
    torch.set_num_threads(2)
    assert choose_threads(model, None) == 2
