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


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private cache directory per test module (exit heads and probes written there never leak into others)."""
    cache = tmp_path_factory.mktemp("helios-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELIOS_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    """tiny-llama (random init, 6 layers, hidden 64, byte vocabulary) materialised in the module's private cache."""
    from pathlib import Path

    from helios.models import load_candidate

    loaded = load_candidate("tiny-llama")
    assert Path(loaded.checkpoint).is_relative_to(tiny_cache)
    return loaded


# ------------------------------------------------------------------ scripts/train.py on the tiny replay env

TRAIN_TINY_OVERRIDES: tuple[str, ...] = (
    "env=replay", "env.candidates=tiny", "env.per_source=2", "env.new_tokens=4", "env.build_traces=false",
    "logger=none", "workload.episode_epochs=40", "workload.arrival.batch_size=4",
    "workload.phases=[{epochs:20,mixture:{qa:1.0}},{epochs:20,mixture:{code:1.0}}]",
)


@pytest.fixture(scope="session")
def tiny_train_env(tmp_path_factory) -> dict:
    """Traces of the tiny candidates for scripts/train.py runs with TRAIN_TINY_OVERRIDES (+ env.trace_dir), recorded
    once in-process (~3 s): the workload dict is the one Hydra composes, so the env finds them by the same key.
    Returns {"trace_dir", "overrides" (incl. env.trace_dir), "env_kwargs" (the same env for gymnasium.make)}."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helios.profiling import ensure_trace, trace_path

    conf = Path(__file__).resolve().parents[1] / "conf"
    trace_dir = tmp_path_factory.mktemp("train_traces")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=list(TRAIN_TINY_OVERRIDES))
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    shortlist = OmegaConf.to_container(OmegaConf.load(conf / "candidates" / "tiny.yaml"), resolve=True)["shortlist"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for entry in shortlist:
            ensure_trace(entry["name"], workload, depths=entry["depths"], per_source=2, new_tokens=4, out_dir=trace_dir,
                         progress=False, calibration_runs=4)
            assert trace_path(entry["name"], workload, 2, 4, trace_dir).exists()
    finally:
        torch.set_num_threads(before)
    return {"trace_dir": trace_dir, "overrides": [*TRAIN_TINY_OVERRIDES, f"env.trace_dir={trace_dir}"],
            "env_kwargs": {"candidates": "tiny", "per_source": 2, "new_tokens": 4, "build_traces": False,
                           "trace_dir": str(trace_dir), "workload": workload}}
