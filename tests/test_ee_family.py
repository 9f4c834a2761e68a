"""The LayerSkip-trained early-exit family: schedules against hand-computed values, and a real tiny build.

    python -m pytest -q tests/test_ee_family.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helios import corpus, ee_family

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = "helios-ee-tiny"


# --- schedules, against values worked out by hand from the formulas in the module docstring ---


def test_layer_dropout_rises_from_zero_at_first_layer_to_p_max_at_last() -> None:
    # 4 layers, p_max 0.2, last step (S = 1): 0.2 * (2^(l/3) - 1) = 0, 0.0519842, 0.1174802, 0.2
    rates = ee_family.layer_dropout_rates(num_layers=4, step=99, total_steps=100, p_max=0.2)
    assert rates == pytest.approx([0.0, 0.0519842, 0.1174802, 0.2], abs=1e-7)
    # The exponential time curriculum starts at 0 and is sqrt(2) - 1 halfway (t / (T - 1) = 1/2).
    assert ee_family.layer_dropout_rates(4, 0, 100, 0.2) == [0.0, 0.0, 0.0, 0.0]
    halfway = ee_family.layer_dropout_rates(4, 33, 67, 0.2)
    assert halfway[3] == pytest.approx(0.2 * 0.41421356, abs=1e-7)
    assert ee_family.layer_dropout_rates(4, 0, 100, 0.2, "constant") == pytest.approx(rates, abs=1e-12)


def test_rotational_curriculum_hand_schedule() -> None:
    enabled = [ee_family.exits_enabled(4, step, 100, "rotational", rotation_period=2) for step in range(3)]
    assert enabled == [[True, False, True, True], [False, True, False, True], [True, False, True, True]]
    assert ee_family.exits_enabled(4, 2, 100, "rotational", rotation_period=3) == [False, False, True, True]


def test_gradual_curriculum_hand_schedule() -> None:
    # 4 layers, 100 steps, all on by half: layer 2 joins at 16.7, layer 1 at 33.3, layer 0 at 50.
    def at(step: int) -> list[bool]:
        return ee_family.exits_enabled(4, step, 100, "gradual", gradual_fraction=0.5)

    assert at(0) == at(16) == [False, False, False, True]
    assert at(17) == at(33) == [False, False, True, True]
    assert at(34) == at(49) == [False, True, True, True]
    assert at(50) == at(99) == [True, True, True, True]


def test_exit_loss_weights_hand_values() -> None:
    # e(n) = e_scale * (1 + ... + n), e(L) = L + e_scale * (1 + ... + (L-1)); L = 4 -> 1, 3, 6, 10
    assert ee_family.exit_loss_weights([True, False, True, True]) == pytest.approx([1 / 17, 0, 6 / 17, 10 / 17])
    assert ee_family.exit_loss_weights([True] * 4, e_scale=2.0) == pytest.approx([2 / 36, 6 / 36, 12 / 36, 16 / 36])


def test_unknown_name_lists_valid_names() -> None:
    assert {"helios-ee-tiny", "helios-ee-4l", "helios-ee-8l"} <= set(ee_family.EE_NAMES)
    with pytest.raises(ValueError) as error:
        ee_family.ensure_checkpoint("helios-ee-99l")
    for name in ee_family.EE_NAMES:
        assert name in str(error.value)


def test_family_shapes() -> None:
    four, eight = ee_family.get_spec("helios-ee-4l"), ee_family.get_spec("helios-ee-8l")
    assert (four.num_layers, eight.num_layers) == (4, 8)
    for spec in (four, eight):
        # Decoder layers, not the LM head, dominate per-token compute.
        layer_params = 4 * spec.hidden_size**2 + 3 * spec.hidden_size * spec.intermediate_size
        assert spec.num_layers * layer_params > 4 * spec.vocab_size * spec.hidden_size


# --- the training step ---


def _random_tiny_model(num_layers: int = 3) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def test_early_exit_loss_is_weighted_ce_through_the_shared_head() -> None:
    model = _random_tiny_model()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    weights = [0.2, 0.0, 0.8]
    loss, per_exit = ee_family._early_exit_loss(model, inputs, labels, weights, [0.0] * 3, torch.Generator())
    # Reference from transformers' own forward: intermediate hidden states through the final norm + tied head.
    with torch.no_grad():
        out = model(inputs, output_hidden_states=True)
    first = model.lm_head(model.model.norm(out.hidden_states[1]))
    ce_first = F.cross_entropy(first.reshape(-1, 50), labels.reshape(-1))
    ce_last = F.cross_entropy(out.logits.reshape(-1, 50), labels.reshape(-1))
    assert set(per_exit) == {0, 2}
    assert loss.item() == pytest.approx(0.2 * ce_first.item() + 0.8 * ce_last.item(), rel=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_layer_dropout_skips_layers_per_sample() -> None:
    model = _random_tiny_model()
    batch_sizes: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: batch_sizes[index].append(output.shape[0]))
    ids = torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(1))
    ee_family._early_exit_loss(model, ids[:, :-1], ids[:, 1:], [0, 0, 1.0], [0.0, 1.0, 0.5], torch.Generator().manual_seed(7))
    assert batch_sizes[0] == [6]  # rate 0: every sample
    assert batch_sizes[1] == []  # rate 1: dropped for all samples, never run
    generator = torch.Generator().manual_seed(7)
    torch.rand(6, generator=generator)  # layer 1's draw (p > 0 draws, even at p = 1)
    draws = torch.rand(6, generator=generator)  # layer 2's
    assert batch_sizes[2] == [int((draws >= 0.5).sum())]


def test_training_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    spec = dataclasses.replace(ee_family.get_spec(TINY), train_steps=12, warmup_steps=2, eval_tokens=256)
    digests = []
    for run in ("a", "b"):
        ee_family.train(spec, tmp_path / run, progress=False)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# --- a real build of the tiny model into a temporary cache ---


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("helios-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELIOS_CACHE_DIR", str(cache))
        ee_family.ensure_checkpoint(TINY, progress=False)
        yield cache


@pytest.fixture(scope="module")
def tiny_record(tiny_cache: Path) -> dict:
    return json.loads((tiny_cache / "checkpoints" / TINY / "ee_training.json").read_text())


def test_checkpoint_lands_in_the_cache_with_hf_files(tiny_cache: Path) -> None:
    path = tiny_cache / "checkpoints" / TINY
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "ee_training.json"):
        assert (path / name).is_file(), name
    assert not [entry for entry in path.parent.iterdir() if ".tmp-" in entry.name]  # atomic: no leftovers
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELIOS_CACHE_DIR", str(tiny_cache))
        assert ee_family.ensure_checkpoint(TINY, progress=False) == path  # second call: no rebuild
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_loads_with_auto_classes_and_tokenizer_round_trips(tiny_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_cache / "checkpoints" / TINY
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "To be, or not to be:\n    def f(x):\n\treturn x  # naïve — 日本語 ✓  "
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # BPE merges, not raw bytes
    assert len(tokenizer) == ee_family.get_spec(TINY).vocab_size


def test_record_is_labelled_toy_and_complete(tiny_record: dict) -> None:
    spec = ee_family.get_spec(TINY)
    assert tiny_record["quality"] == "toy"
    assert tiny_record["seed"] == spec.seed
    assert tiny_record["recipe"]["layer_dropout"]["p_max"] == spec.p_max
    assert tiny_record["recipe"]["early_exit_loss"]["curriculum"] == spec.curriculum
    assert tiny_record["train_wall_seconds"] > 0
    # Trains in well under 40 s of CPU time (wall time depends on what else runs on the box).
    assert tiny_record["train_cpu_seconds"] < 40
    assert [row["layer"] for row in tiny_record["per_layer"]] == [1, 2, 3, 4]


def test_every_exit_learned_and_the_last_is_best(tiny_record: dict) -> None:
    untrained_nats = math.log(ee_family.get_spec(TINY).vocab_size)  # uniform prediction
    losses = [row["val_loss"] for row in tiny_record["per_layer"]]
    assert all(loss < untrained_nats - 1.0 for loss in losses), losses
    assert losses[-1] <= min(losses) + 0.02
    assert tiny_record["per_layer"][-1]["agreement_with_final"] == 1.0
    assert all(0.0 < row["agreement_with_final"] <= 1.0 for row in tiny_record["per_layer"])


def test_recorded_final_loss_matches_transformers_forward(tiny_cache: Path, tiny_record: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_cache / "checkpoints" / TINY
    spec = ee_family.get_spec(TINY)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The same held-out windows the builder scored: held-out passages, EOS after each, cut into context+1 windows.
    ids: list[int] = []
    for passage in corpus.mixed_passages(spec.seed, 6 * spec.eval_tokens, "heldout"):
        ids += tokenizer(passage, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    window = spec.context_tokens + 1
    windows = torch.tensor(ids[: (len(ids) // window) * window]).view(-1, window)[: spec.eval_tokens // spec.context_tokens]
    assert windows.shape[0] * spec.context_tokens == tiny_record["eval_tokens"]
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    final_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert final_loss == pytest.approx(tiny_record["per_layer"][-1]["val_loss"], abs=2e-4)


def test_script_runs_from_another_cwd_and_prints_the_table(tiny_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HELIOS_CACHE_DIR": str(tiny_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_ee.py"), f"name={TINY}", "progress=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    assert str(tiny_cache / "checkpoints" / TINY) in result.stdout
    assert "agree_final" in result.stdout and "toy" in result.stdout
    assert list(tmp_path.iterdir()) == []  # hydra wrote nothing into the caller's cwd
