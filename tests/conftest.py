"""Test-wide settings: offline, two threads, and shared loaded models (loading is the slow part)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # one process per core pair in CI; a second thread only adds sync overhead for these sizes

_LOADED: dict = {}


def load_cached(name: str, depth: int | None = None, **kwargs):
    """Load a candidate once per test session (the models are read-only in tests)."""
    from helios.models import load_candidate

    key = (name, depth, tuple(sorted(kwargs.items())))
    if key not in _LOADED:
        _LOADED[key] = load_candidate(name, depth, **kwargs)
    return _LOADED[key]


@pytest.fixture
def loaded_model():
    return load_cached
