"""Exit-confidence probes (helios/probes.py) and the engine's `probe` criterion.

    python -m pytest tests/test_probes.py -q

Decisions are checked against an independent reference: Hugging Face's own teacher-forced forward pass
(`output_hidden_states`), whose states at and below a single exit point are exactly those the engine decides on.
Training is checked on a toy problem with a known answer. All on `tiny-llama` in a private cache directory.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helios import probes as probes_module
from helios.engine import EarlyExitEngine, ExitConfig
from helios.probes import (
    ExitProbes,
    heads_fingerprint,
    load_exit_probes,
    precision_coverage,
    probe_features,
    train_exit_probes,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "def add(a, b):", "To be, or not to be"]


def _random_probes(hidden: int, layers: list[int], seed: int = 0) -> ExitProbes:
    probes = ExitProbes(hidden, 16, layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in probes.probes.values():
            for p in module.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return probes.eval().requires_grad_(False)


def test_probe_decisions_match_hf_hidden_states(tiny) -> None:
    """With one exit point e, the engine exits a token exactly when the probe, applied to HF's teacher-forced
    states after e and e - 1 layers at that position, says >= threshold (layers <= e never see exited states)."""
    exit_layer = 3
    probes = _random_probes(tiny.model.config.hidden_size, [exit_layer])
    engine = EarlyExitEngine(tiny, load_tuned_heads=False, exit_probes=probes)
    prompt_ids = engine.encode(PROMPTS)
    mixed = 0
    for threshold in (0.3, 0.5, 0.7):
        result = engine.generate(prompt_ids, 12, ExitConfig("probe", threshold, (exit_layer,)), stop_at_eos=False)
        for ids, tokens, exits in zip(prompt_ids, result.tokens, result.exit_layers):
            with torch.inference_mode():
                states = tiny.model(torch.tensor([ids + tokens[:-1]]), output_hidden_states=True).hidden_states
            expected = [tiny.depth]  # the first token comes from prefill, at full depth
            for t in range(1, len(tokens)):
                position = len(ids) + t - 1
                confidence = probes.confidence(exit_layer, states[exit_layer][0, position],
                                               states[exit_layer - 1][0, position])
                expected.append(exit_layer if float(confidence) >= threshold else tiny.depth)
            assert exits == expected
            mixed += len(set(exits)) > 1
    assert mixed > 0, "no setting produced both early and full-depth tokens: the test would check nothing"


def test_probe_criterion_compacted_equals_uncompacted(tiny) -> None:
    probes = _random_probes(tiny.model.config.hidden_size, [2, 4])
    engine = EarlyExitEngine(tiny, load_tuned_heads=False, exit_probes=probes)
    config = ExitConfig("probe", 0.5, (2, 4))
    compacted = engine.generate(PROMPTS, 16, config, compact=True)
    masked = engine.generate(PROMPTS, 16, config, compact=False)
    assert compacted.tokens == masked.tokens and compacted.exit_layers == masked.exit_layers
    assert len({e for row in compacted.exit_layers for e in row}) > 1
    assert compacted.cost_features["decision_probe_rows"] > 0 and compacted.cost_features["decision_head_rows"] == 0


def test_training_learns_a_known_rule() -> None:
    """Labels from a fixed hyperplane through the (rms-normalised) state: held-out accuracy >= 0.9 and the
    precision of confident exits above the base rate."""
    generator = torch.Generator().manual_seed(0)
    hidden = 32
    direction = torch.randn(hidden, generator=generator)

    def data(n: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        h = torch.randn(n, hidden, generator=generator)
        before = h + 0.1 * torch.randn(n, hidden, generator=generator)
        features = probe_features(h, before)
        return {5: features}, {5: (h / h.pow(2).mean(-1, keepdim=True).sqrt()) @ direction > 0.5}

    features, labels = data(4000)
    probes, stats = train_exit_probes(features, labels, width=16, steps=300, batch=512)
    test_features, test_labels = data(2000)
    predicted = torch.sigmoid(probes.probes["5"](test_features[5])) >= 0.5
    assert float((predicted == test_labels[5]).float().mean()) >= 0.9
    table = precision_coverage(probes, test_features, test_labels, thresholds=(0.9,))
    assert table["5"][0]["precision"] > float(test_labels[5].float().mean()) + 0.2
    assert stats["train_tokens"] == 4000 and set(stats["loss_by_layer"]) == {"5"}


def test_early_stopping_keeps_a_probe_from_memorising_noise() -> None:
    """Labels independent of the features: a probe trained to the end memorises them and turns confident on new
    tokens; with the held-out tail stopping it, it stays near the base rate and exits (almost) nothing at 0.9."""
    generator = torch.Generator().manual_seed(1)

    def data(n: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        h = torch.randn(n, 64, generator=generator)
        return {3: probe_features(h, torch.randn(n, 64, generator=generator))}, {3: torch.rand(n, generator=generator) < 0.5}

    features, labels = data(1500)
    fresh_features, fresh_labels = data(1500)
    memorised, _ = train_exit_probes(features, labels, width=64, steps=600, batch=512, validation_fraction=0.0)
    stopped, stats = train_exit_probes(features, labels, width=64, steps=600, batch=512, validation_fraction=0.2,
                                       eval_every=10, patience=3)
    overconfident = precision_coverage(memorised, fresh_features, fresh_labels, thresholds=(0.9,))["3"][0]
    calm = precision_coverage(stopped, fresh_features, fresh_labels, thresholds=(0.9,))["3"][0]
    assert overconfident["coverage"] > 0.2
    assert calm["coverage"] < 0.02
    assert stats["best_step_by_layer"]["3"] < 600


def test_save_load_fingerprint_and_errors(tiny, tmp_path: Path) -> None:
    probes = _random_probes(tiny.model.config.hidden_size, [1, 3])
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    probes.save(checkpoint, {"heads_fingerprint": heads_fingerprint(checkpoint)})
    loaded = load_exit_probes(checkpoint)
    assert loaded is not None and loaded.exit_layers == [1, 3]
    h, before = torch.randn(4, tiny.model.config.hidden_size), torch.randn(4, tiny.model.config.hidden_size)
    assert torch.equal(loaded.confidence(3, h, before), probes.confidence(3, h, before))
    # Tuned heads appear beside the checkpoint: the probes were labelled with the shared head, so they are ignored.
    (checkpoint / "exit_heads.safetensors").write_bytes(b"other heads")
    assert load_exit_probes(checkpoint) is None
    meta = checkpoint / probes_module.PROBES_META
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="re-run scripts/tune_exits.py probes=true"):
        load_exit_probes(checkpoint)


def test_probe_criterion_without_probes_names_the_command(tiny) -> None:
    engine = EarlyExitEngine(tiny, load_tuned_heads=False)
    assert engine.exit_probes is None
    with pytest.raises(ValueError, match=r"tune_exits.py candidate=<name> heads=false probes=true"):
        engine.generate(PROMPTS, 4, ExitConfig("probe", 0.9, (2,)))


def test_hydra_entry_point_trains_and_the_engine_loads_the_probes(tiny, tiny_cache: Path) -> None:
    from hydra import compose, initialize_config_dir

    spec = importlib.util.spec_from_file_location("tune_exits_script", REPO / "scripts" / "tune_exits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    overrides = ["candidate=tiny-llama", "heads=false", "probes=true", "probe_tokens=800", "eval_tokens=300",
                 "probe_steps=20", "probe_width=8", "progress=false", "exit_layers=[2,4]"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="tune_exits", overrides=overrides)
    checkpoint = Path(tiny.checkpoint)
    try:
        metadata = script.run(cfg)
        saved = json.loads((checkpoint / probes_module.PROBES_META).read_text())
        assert saved["exit_layers"] == [2, 4] and saved["width"] == 8 and saved["heads_fingerprint"] == "shared"
        assert saved["train_tokens"] == 800 and set(saved["heldout"]) == {"2", "4"}
        assert metadata["probes"]["heldout"] == saved["heldout"]
        engine = EarlyExitEngine(tiny)
        assert engine.exit_probes is not None and engine.exit_probes.exit_layers == [2, 4]
        result = engine.generate(PROMPTS, 6, ExitConfig("probe", 0.5, (2, 4)))
        assert all(e in (2, 4, tiny.depth) for row in result.exit_layers for e in row)
    finally:
        for name in (probes_module.PROBES_FILE, probes_module.PROBES_META):
            (checkpoint / name).unlink(missing_ok=True)
