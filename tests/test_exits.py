"""Tuned exit heads (helios/exits.py): identity at init, save/load, the sampled-negative loss against a hand
computation, training that beats the shared head, the oracle bound, clear errors, and the Hydra entry point.

All on `tiny-llama` (random init, 6 layers, hidden 64, 259-id byte vocabulary) in a private cache directory.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helios import exits
from helios.engine import EarlyExitEngine
from helios.exits import (
    META_FILE,
    FrozenHead,
    HiddenCache,
    TuneConfig,
    TunedExitHeads,
    agreement_by_layer,
    build_cache,
    candidate_ids,
    distillation_loss,
    exit_matches,
    load_exit_heads,
    oracle_bound,
    sampled_kl,
    token_chunks,
    train_exit_heads,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from it his an were are which this be or has".split()


def _toy_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def _random_heads(hidden: int, rank: int, layers: list[int], seed: int = 0) -> TunedExitHeads:
    heads = TunedExitHeads(hidden, rank, layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return heads.eval().requires_grad_(False)


def test_untrained_adapter_is_exactly_the_shared_head(tiny) -> None:
    layers = list(range(1, tiny.depth))
    heads = TunedExitHeads(64, 16, layers)
    with_heads = EarlyExitEngine(tiny, exit_heads=heads)
    shared = EarlyExitEngine(tiny, load_tuned_heads=False)
    assert shared.exit_heads is None
    hidden = torch.randn(3, 5, 64) * 4
    for layer in layers:
        assert torch.equal(with_heads.logits(hidden, layer), shared.logits(hidden, layer))
    # ... and so the agreement table is the shared head's too.
    texts = _toy_texts(7, 6)
    assert agreement_by_layer(tiny, texts, heads, max_tokens=300) == agreement_by_layer(tiny, texts, max_tokens=300)


def test_save_load_round_trip_and_engine_picks_heads_up(tiny) -> None:
    heads = _random_heads(64, 64, [2, 4])
    checkpoint = Path(tiny.checkpoint)
    try:
        heads.save(checkpoint, {"note": "test"})
        meta = json.loads((checkpoint / META_FILE).read_text())
        assert meta["exit_layers"] == [2, 4] and meta["rank"] == 64 and meta["note"] == "test"
        engine = EarlyExitEngine(tiny)  # loads the saved heads by itself
        assert engine.exit_heads is not None and engine.exit_heads.exit_layers == [2, 4]
        reference = EarlyExitEngine(tiny, exit_heads=heads)
        shared = EarlyExitEngine(tiny, load_tuned_heads=False)
        hidden = torch.randn(2, 3, 64)
        for layer in (2, 4):
            assert torch.equal(engine.logits(hidden, layer), reference.logits(hidden, layer))
            assert not torch.allclose(engine.logits(hidden, layer), shared.logits(hidden, layer))
        for layer in (1, 3, tiny.depth):  # no adapter there: the shared head
            assert torch.equal(engine.logits(hidden, layer), shared.logits(hidden, layer))
    finally:
        for name in (exits.HEADS_FILE, exits.META_FILE):
            (checkpoint / name).unlink(missing_ok=True)


def test_corrupt_or_mismatched_metadata_raises_a_clear_error(tmp_path: Path) -> None:
    heads = _random_heads(64, 8, [1, 2])
    heads.save(tmp_path)
    assert load_exit_heads(tmp_path) is not None
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": 999}))
    with pytest.raises(ValueError, match="format version 999"):
        load_exit_heads(tmp_path)
    meta_path.write_text('{"format_version": 1, "hidden_size": ')  # truncated
    with pytest.raises(ValueError, match="corrupt exit-head metadata"):
        load_exit_heads(tmp_path)
    meta_path.write_text(json.dumps({**meta, "hidden_size": 32}))  # tensors are 64 wide
    with pytest.raises(ValueError, match="do not match"):
        load_exit_heads(tmp_path)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "rank"}))
    with pytest.raises(ValueError, match="rank"):
        load_exit_heads(tmp_path)
    (tmp_path / exits.HEADS_FILE).unlink()  # nothing saved: the shared head, not an error
    assert load_exit_heads(tmp_path) is None


def test_sampled_negative_loss_matches_a_hand_computation(tiny) -> None:
    torch.manual_seed(0)
    head = FrozenHead(tiny)
    shared = EarlyExitEngine(tiny, load_tuned_heads=False)
    heads = _random_heads(64, 16, [1, 3], seed=1).requires_grad_(True)
    n = 12
    cache = HiddenCache(
        hidden={1: torch.randn(n, 64) * 3, 3: torch.randn(n, 64) * 3}, final=torch.randn(n, 64) * 3,
        topk=torch.empty(0),
    )
    with torch.no_grad():
        cache.topk = head.topk_ids(head.norm(cache.final), 4)
        full_teacher = shared.logits(cache.final)
    assert torch.equal(cache.topk, full_teacher.topk(4, dim=-1).indices)
    index = torch.tensor([0, 3, 5, 7, 11])
    ids = candidate_ids(cache.topk[index], head.vocab_size, 20, torch.Generator().manual_seed(3))
    assert torch.equal(ids, torch.unique(ids)) and set(cache.topk[index].flatten().tolist()) <= set(ids.tolist())
    assert 20 <= ids.numel() < head.vocab_size

    total, per_layer = distillation_loss(heads, head, cache, index, ids, amp=False)

    hand = {}
    for layer in (1, 3):
        with torch.no_grad():
            student_full = EarlyExitEngine(tiny, exit_heads=heads).logits(cache.hidden[layer][index], layer)
        teacher_sub, student_sub = full_teacher[index][:, ids], student_full[:, ids]
        rows = []
        for t_row, s_row in zip(teacher_sub, student_sub):  # KL(p || q) over the chosen ids, one token at a time
            log_p, log_q = torch.log_softmax(t_row.double(), -1), torch.log_softmax(s_row.double(), -1)
            rows.append(sum(float(log_p[j].exp() * (log_p[j] - log_q[j])) for j in range(ids.numel())))
        hand[layer] = sum(rows) / len(rows)
        assert per_layer[layer] == pytest.approx(hand[layer], rel=1e-4, abs=1e-6)
    assert float(total.detach()) == pytest.approx((hand[1] + hand[3]) / 2, rel=1e-4)
    assert total.requires_grad  # it trains the adapters

    # With every id in the candidate set it is the full-vocabulary KL.
    everything = candidate_ids(cache.topk[index], head.vocab_size, head.vocab_size, torch.Generator())
    assert torch.equal(everything, torch.arange(head.vocab_size))
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert float(sampled_kl(s, t)) == pytest.approx(float(expected), rel=1e-5)


def test_screened_argmax_is_exact(tiny) -> None:
    head = FrozenHead(tiny)
    x = torch.randn(300, 64)
    exact = head.full_logits(x).argmax(-1)
    head.screen, head.block = 8, 64  # force bf16 screening + float32 rescoring on the small vocabulary
    assert torch.equal(head.argmax(x), exact)


def test_oracle_bound_by_hand() -> None:
    matches = torch.tensor(
        [[False, True, False, True], [False, False, False, True], [True, True, True, True]]
    )  # first agreeing layers: 2, 4, 1
    stats = oracle_bound(matches, layer_macs=10, head_macs=20, adapter_macs=3)
    assert stats["mean_first_agree_layer"] == pytest.approx(7 / 3)
    assert stats["speedup_layers"] == pytest.approx(4 / (7 / 3))
    assert stats["fraction_exiting_early"] == pytest.approx(2 / 3)
    assert stats["speedup_with_head"] == pytest.approx((4 * 10 + 20) / (7 / 3 * 10 + 20 + 2 / 3 * 3))


def test_token_chunks_and_match_matrix(tiny) -> None:
    chunks, prefix = token_chunks(tiny.tokenizer, ["abc " * 100], max_tokens=250, seq_len=64)
    assert prefix == 0 and sum(c.numel() for c in chunks) == 250 and max(c.numel() for c in chunks) == 64
    (matches,) = exit_matches(tiny, ["abc " * 100], max_tokens=250, seq_len=64, batch_chunks=2)
    assert matches.shape == (250, tiny.depth) and bool(matches[:, -1].all())


def test_training_beats_the_shared_head_on_held_out_text(tiny) -> None:
    train, held = _toy_texts(0, 120), _toy_texts(1, 40)
    assert not set(train) & set(held)
    config = TuneConfig(max_steps=80, train_seconds=600, topk=4, n_random=64, batch_tokens=128, lr=3e-3, seed=0)
    cache = build_cache(tiny, train, list(range(1, tiny.depth)), max_tokens=3000, topk=config.topk)
    heads, stats = train_exit_heads(tiny, train, config, cache=cache)
    assert stats["steps"] >= 10 and stats["loss_last"] < stats["loss_first"]
    shared = agreement_by_layer(tiny, held, max_tokens=1500)
    tuned = agreement_by_layer(tiny, held, heads, max_tokens=1500)
    assert shared[-1] == tuned[-1] == 1.0
    gains = [t - s for s, t in zip(shared[:-1], tuned[:-1])]
    assert sum(gains) / len(gains) > 0.06, (shared, tuned)  # measured: +0.10..+0.13 at every layer
    assert min(gains) > 0.02, (shared, tuned)


def test_hydra_entry_point_trains_saves_and_records_the_table(tiny, tiny_cache: Path) -> None:
    from hydra import compose, initialize_config_dir

    spec = importlib.util.spec_from_file_location("tune_exits_script", REPO / "scripts" / "tune_exits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    overrides = [
        "candidate=tiny-llama", "train_tokens=600", "eval_tokens=300", "max_steps=3", "train_seconds=30",
        "progress=false", "exit_layers=[2,4]", "rank=8",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="tune_exits", overrides=overrides)
    checkpoint = Path(tiny.checkpoint)
    try:
        metadata = script.run(cfg)
        saved = json.loads((checkpoint / META_FILE).read_text())
        assert saved["exit_layers"] == [2, 4] and saved["rank"] == 8 and saved["steps"] == 3
        assert len(saved["agreement_shared"]) == len(saved["agreement_tuned"]) == tiny.depth
        assert saved["agreement_shared"] == metadata["agreement_shared"]
        assert saved["oracle_shared"]["num_layers"] == tiny.depth and "speedup_with_head" in saved["oracle_tuned"]
        assert saved["train_tokens"] == 600 and saved["eval_tokens"] == 300
        assert load_exit_heads(checkpoint).exit_layers == [2, 4]
    finally:
        for name in (exits.HEADS_FILE, exits.META_FILE):
            (checkpoint / name).unlink(missing_ok=True)
