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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One thread: the tiny models gain nothing from two, and on a shared, loaded machine two OpenMP threads
    contend so badly that a 64-wide matmul takes ~10 ms instead of ~35 us."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    "env=replay", "workload=drift3", "slo=balanced", "episodes=1", "live_eval=false", "env.candidates=tiny",
    "env.per_source=2", "env.new_tokens=4", "env.build_traces=false",
    "env.judge=tiny-llama",  # judge_score (the default metric) under a judge as fast as the tiny candidates
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
                           "judge": "tiny-llama", "trace_dir": str(trace_dir), "workload": workload}}


# ------------------------------------------------------------------ the early-exit reference


def reference_logits_with_exits(loaded, prompt_ids: list[int], tokens: list[int],
                                exit_layers: list[int]) -> list[torch.Tensor]:
    """Per generated token, the logits of the layer that emitted it, from HF's forward pass with CALM's frozen states
    imposed by hooks (CALM's state propagation seen from outside the engine): the final logits for full-depth tokens, norm + head on
    the frozen layer-e state for tokens that exited after e layers."""
    model, depth = loaded.model, loaded.depth
    decoder = model.get_decoder()
    sequence = prompt_ids + tokens[:-1]
    exit_at = {len(prompt_ids) + t - 1: e for t, e in enumerate(exit_layers) if t > 0 and e < depth}
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def capture(layer_count: int):
        def hook(module, args, output):
            captured[layer_count] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    def freeze(layer_index: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0].clone()
            for position, e in exit_at.items():
                if e <= layer_index:
                    hidden[:, position] = captured[e][:, position]
            return (hidden, *args[1:]), kwargs
        return pre_hook

    for e in sorted(set(exit_at.values())):
        handles.append(decoder.layers[e - 1].register_forward_hook(capture(e)))
    for j in range(depth):
        handles.append(decoder.layers[j].register_forward_pre_hook(freeze(j), with_kwargs=True))
    try:
        with torch.inference_mode():
            final = model(torch.tensor([sequence]), use_cache=False).logits[0]
            head = model.get_output_embeddings()
            out = []
            for t in range(len(tokens)):
                position = len(prompt_ids) + t - 1
                if t == 0 or position not in exit_at:
                    out.append(final[position].double())
                else:
                    out.append(head(decoder.norm(captured[exit_at[position]][0, position])).double())
    finally:
        for handle in handles:
            handle.remove()
    return out
