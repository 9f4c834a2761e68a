"""Lossless self-speculative decoding: draft with the first E layers, verify with the rest (LayerSkip, sec. 4).

    python -m helios.speculative helios-ee-8l --draft-layers 4 --draft-tokens 3

Elhoushi et al. 2024 (LayerSkip, arXiv 2404.16710): the model's own early exit at layer E drafts k tokens one at a
time (layers 1..E plus the exit head, tuned when the checkpoint has tuned heads); one pass of layers E+1..L over the
k drafted positions, starting from the drafts' cached layer-E states, verifies them all; the longest verified prefix
is kept, plus the full model's own token at the first disagreement. The output is the full-depth greedy output:
every emitted token is the full model's prediction after a prefix of tokens the full model itself chose.

Reuse (LayerSkip's "exit query cache"): drafting has already computed layers 1..E for the drafted positions, so their
K/V there are final and verification starts at layer E+1 from the cached states; the K/V that verification writes
beyond the accepted tokens are overwritten by the next round.

Batches: rows accept different numbers of drafts; a round keeps the smallest accepted prefix over the unfinished rows
(plus one verified token), so positions stay aligned and the output stays exact, at the price of discarding some
rows' extra accepted drafts. Reading that minimum is one host sync per round (k tokens), not per token.
Cost per round: k draft steps of E layers + head, one verify call per deeper layer over k positions, one head over k
positions. It pays when verifying k positions costs about one decode step (memory-bound decoding: GPUs, large models)
and the exit at E agrees with the final layer often; see benchmarks/RESULTS.md for what it does on CPU here.
"""

from __future__ import annotations

import argparse

import torch

from helios.engine import COST_FEATURES, EarlyExitEngine, EngineKVCache, GenerationResult, _Clock
from helios.models import load_candidate


@torch.inference_mode()
def generate_speculative(engine: EarlyExitEngine, prompts: list[list[int]] | list[str], max_new_tokens: int, *,
                         draft_layers: int, draft_tokens: int, stop_at_eos: bool = True) -> GenerationResult:
    """Greedy decoding of `max_new_tokens` per prompt, equal to `engine.generate(prompts, max_new_tokens)` (exits
    off), drafted with `draft_layers` layers and `draft_tokens` tokens per round. `exit_layers` of the result are
    the loaded depth for every token (all are verified at full depth); the counters record drafts and acceptance."""
    depth = engine.depth
    if isinstance(draft_layers, bool) or not isinstance(draft_layers, int) or not 1 <= draft_layers < depth:
        raise ValueError(f"draft_layers must be a layer count in 1..{depth - 1}; got {draft_layers!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be a positive integer; got {draft_tokens!r}")
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if isinstance(prompts[0], str):
        prompts = engine.encode(list(prompts))  # type: ignore[arg-type]
    prompts = [list(map(int, p)) for p in prompts]  # type: ignore[union-attr]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    prompt_len = max(len(p) for p in prompts)
    if prompt_len + max_new_tokens > engine.max_context:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"window of {engine.max_context} tokens")

    device, batch, k, e = engine.device, len(prompts), draft_tokens, draft_layers
    total_len = prompt_len + max_new_tokens + k  # a last round may draft past the end
    ids = torch.full((batch, prompt_len), engine.pad_id, dtype=torch.long)
    valid = torch.zeros((batch, total_len), dtype=torch.bool)
    for b, p in enumerate(prompts):  # left padding, as the engine and HF generate do
        ids[b, prompt_len - len(p):] = torch.tensor(p)
        valid[b, prompt_len - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    position_ids = (valid[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)
    cache = EngineKVCache(batch, total_len)
    eos = torch.tensor(engine.eos_ids or [-1], device=device)
    dtype = engine.loaded.dtype
    clock = _Clock(device)
    feats = dict.fromkeys(COST_FEATURES, 0.0)
    feats.update(draft_rounds=0.0, draft_steps=0.0, drafted_tokens=0.0, accepted_drafts=0.0, verify_positions=0.0)

    clock.mark()
    hidden = engine.embed(ids)
    pos_emb = engine._position_embeddings(hidden, position_ids)
    masks = engine._masks(valid, 0, prompt_len, dtype)
    cache.write_pos = 0
    for i in range(depth):
        hidden = engine._run_layer(i, hidden, None, masks, pos_emb, position_ids, cache)
    token = engine.logits(hidden[:, -1], depth).argmax(-1)
    emitted = [token]
    finished = torch.isin(token, eos) if stop_at_eos else torch.zeros(batch, dtype=torch.bool, device=device)
    clock.mark()
    marks_at: list[int] = [1]  # clock mark index after which each emitted column exists

    pos, generated, layer_evals = prompt_len, 1, 0
    next_position = position_ids[:, -1] + 1
    while generated < max_new_tokens and not (stop_at_eos and bool(finished.all())):
        # Draft: feed the last token, then each draft, through layers 1..E; keep their layer-E states.
        states, drafts, feed = [], [], token
        for j in range(k):
            valid[:, pos + j] = True
            step_positions = (next_position + j)[:, None]
            h = engine.embed(feed[:, None])
            step_emb = engine._position_embeddings(h, step_positions)
            step_masks = engine._masks(valid, pos + j, 1, dtype)
            cache.write_pos = pos + j
            for i in range(e):
                h = engine._run_layer(i, h, None, step_masks, step_emb, step_positions, cache)
            states.append(h)
            feed = engine.logits(h[:, -1], e).argmax(-1)
            drafts.append(feed)
        layer_evals += batch * k * e
        # Verify: layers E+1..L over the k drafted positions at once, from their cached layer-E states.
        chunk_positions = next_position[:, None] + torch.arange(k, device=device)[None, :]
        h = torch.cat(states, dim=1)
        chunk_emb = engine._position_embeddings(h, chunk_positions)
        chunk_masks = engine._masks(valid, pos, k, dtype)
        cache.write_pos = pos
        for i in range(e, depth):
            h = engine._run_layer(i, h, None, chunk_masks, chunk_emb, chunk_positions, cache)
        layer_evals += batch * k * (depth - e)
        verified = engine.logits(h, depth).argmax(-1)  # [B, k]: the full model's token after each drafted input
        drafted = torch.stack(drafts, dim=1)
        agree = (drafted == verified) | finished[:, None]
        accepted = agree.long().cumprod(dim=1).sum(dim=1)  # leading agreements per row
        keep = min(int(accepted.min()) + 1, k)  # one host sync per round
        feats["draft_rounds"] += 1
        feats["draft_steps"] += k
        feats["drafted_tokens"] += batch * k
        feats["accepted_drafts"] += float(accepted.clamp(max=keep).sum())
        feats["verify_positions"] += batch * k
        valid[:, pos + keep:] = False  # K/V written beyond the kept tokens are stale; the next round overwrites them
        for column in range(keep):
            new = torch.where(finished, engine.pad_id, verified[:, column])
            emitted.append(new)
            if stop_at_eos:
                finished = finished | torch.isin(new, eos)
        token = verified[:, keep - 1]
        pos += keep
        next_position = next_position + keep
        generated += keep
        clock.mark()
        marks_at.extend([len(clock.marks) - 1] * keep)

    marks = clock.seconds()
    out = torch.stack(emitted, dim=1)[:, :max_new_tokens].tolist()
    tokens, ends = [], []
    eos_set = set(engine.eos_ids)
    for row in out:
        end = next((t + 1 for t, tok in enumerate(row) if stop_at_eos and tok in eos_set), len(row))
        tokens.append(row[:end])
        ends.append(end)
    generated_decode = sum(len(t) - 1 for t in tokens)
    macs = engine._macs
    return GenerationResult(
        tokens=tokens, exit_layers=[[depth] * len(t) for t in tokens], prompt_tokens=[len(p) for p in prompts],
        prefill_s=marks[1], decode_s=marks[-1] - marks[1], ttft_s=marks[1],
        e2e_s=[marks[marks_at[min(end, len(marks_at)) - 1]] for end in ends],
        weight_bytes=engine.loaded.weight_bytes, kv_cache_bytes=cache.nbytes, depth=depth, batch_size=batch,
        layer_evals=layer_evals, layer_evals_full=batch * (min(generated, max_new_tokens) - 1) * depth, exit_decision_s=0.0,
        exit_decision_macs=0, decode_macs=layer_evals * macs["layer"] + generated_decode * macs["head"],
        cost_features=feats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default="helios-ee-8l")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args()
    engine = EarlyExitEngine(load_candidate(args.name))
    prompts = args.prompt or ["The capital of France is", "def fibonacci(n):"]
    reference = engine.generate(prompts, args.max_new_tokens)
    result = generate_speculative(engine, prompts, args.max_new_tokens, draft_layers=args.draft_layers,
                                  draft_tokens=args.draft_tokens)
    for prompt, tokens in zip(prompts, result.tokens):
        print(f"--- {prompt!r}\n{engine.loaded.tokenizer.decode(tokens)!r}")
    f = result.cost_features
    print(f"same tokens as full-depth greedy: {result.tokens == reference.tokens}; accepted "
          f"{f['accepted_drafts'] / max(f['drafted_tokens'], 1):.2f} of drafts; {result.tokens_per_s:.1f} tok/s "
          f"vs {reference.tokens_per_s:.1f} tok/s without drafting")


if __name__ == "__main__":
    main()
