"""Lossless self-speculative decoding: draft with the first E layers, verify with the rest (LayerSkip, sec. 4).

    python -m helios.speculative helios-ee-8l --draft-layers 4 --draft-tokens 3

Elhoushi et al. 2024 (LayerSkip, arXiv 2404.16710): the model's own early exit at layer E drafts k tokens one at a
time (layers 1..E plus the exit head, tuned when the checkpoint has tuned heads); one pass of layers E+1..L over the
k drafted positions, starting from the drafts' cached layer-E states, verifies them all; the longest verified prefix
is kept, plus the full model's own token at the first disagreement. The output is the full-depth greedy output:
every emitted token is the full model's prediction after a prefix of tokens the full model itself chose.

Reuse (LayerSkip's "exit query cache"): drafting has already computed layers 1..E for the drafted positions, so their
K/V there are final and verification starts at layer E+1 from the cached states; the slots of rejected drafts are
marked empty and never attended again.

Batches: rows accept different numbers of drafts. Every row writes k cache slots a round and keeps its own accepted
prefix plus the full model's next token; the slots of its rejected drafts become holes that no later query attends
(masks and sliding windows are computed from each slot's logical position, RoPE from each row's own position). The
price is cache slots: up to k per generated token in the worst case (all drafts rejected). Reading the kept counts
is one host sync per round (k tokens), not per token.
Cost per round: k draft steps of E layers + head, one verify call per deeper layer over k positions, one head over k
positions. It pays when verifying k positions costs about one decode step (memory-bound decoding: GPUs, large models)
and the exit at E agrees with the final layer often; see benchmarks/RESULTS.md for what it does on CPU here.
"""

from __future__ import annotations

import argparse

import torch

from helios.engine import COST_FEATURES, EarlyExitEngine, EngineKVCache, GenerationResult, _Clock
from helios.models import load_candidate
from helios.sampling import SamplingParams


def _masks(engine: EarlyExitEngine, slot_position: torch.Tensor, query_positions: torch.Tensor,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Attention masks [B, 1, q, slots] from logical positions: key slot j is visible from a query at position p when
    it holds a token (position >= 0) at or before p and, on sliding layers, within the window of p. Measured in
    positions, not slots, because rows have holes where rejected drafts were."""
    keys = slot_position[:, None, None, :]
    queries = query_positions[:, None, :, None]
    return engine.masks_by_layer_type((keys >= 0) & (keys <= queries), keys, queries, dtype)


@torch.inference_mode()
def generate_speculative(engine: EarlyExitEngine, prompts: list[list[int]] | list[str], max_new_tokens: int, *,
                         draft_layers: int, draft_tokens: int, stop_at_eos: bool = True,
                         sampling: SamplingParams | None = None) -> GenerationResult:
    """Greedy decoding of `max_new_tokens` per prompt, equal to `engine.generate(prompts, max_new_tokens)` (exits
    off), drafted with `draft_layers` layers and `draft_tokens` tokens per round. `exit_layers` of the result are
    the loaded depth for every token (all are verified at full depth); the counters record drafts and acceptance.

    `sampling` must be greedy without logprobs (None or SamplingParams() / temperature 0): acceptance here is exact
    token agreement, which is lossless only for greedy decoding (sampled speculation needs rejection sampling, which
    this does not implement), so anything else is refused rather than silently decoded greedily."""
    if sampling is not None and (not sampling.greedy or sampling.logprobs is not None):
        raise ValueError(
            f"self-speculative decoding is greedy only: got temperature={sampling.temperature}, top_p="
            f"{sampling.top_p}, top_k={sampling.top_k}, logprobs={sampling.logprobs}; valid: temperature=0 (or "
            f"top_k=1) and logprobs=None. Use EarlyExitEngine.generate(..., sampling=...) to sample.")
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
    # Cache slots: a round writes k slots per row and keeps each row's accepted ones; the rest become holes. At least
    # one token is kept per row and round, so max_new_tokens - 1 rounds fit.
    total_len = prompt_len + k * max(1, max_new_tokens - 1)
    ids = torch.full((batch, prompt_len), engine.pad_id, dtype=torch.long)
    valid = torch.zeros((batch, total_len), dtype=torch.bool)
    for b, p in enumerate(prompts):  # left padding, as the engine and HF generate do
        ids[b, prompt_len - len(p):] = torch.tensor(p)
        valid[b, prompt_len - len(p):prompt_len] = True
    ids, valid = ids.to(device), valid.to(device)
    position_ids = (valid[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)
    # Logical position of the token in each slot (-1: padding, a hole, or not written yet): what masks and sliding
    # windows are measured in once rows have holes at different slots.
    slot_position = torch.full((batch, total_len), -1, dtype=torch.long, device=device)
    slot_position[:, :prompt_len] = torch.where(valid[:, :prompt_len], position_ids, -1)
    cache = EngineKVCache(batch, total_len)
    eos_set = set(engine.eos_ids)
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
    clock.mark()
    tokens: list[list[int]] = [[t] for t in token.tolist()]
    done = [len(t) >= max_new_tokens or (stop_at_eos and t[-1] in eos_set) for t in tokens]
    done_at_mark = [1 if d else -1 for d in done]

    slot, layer_evals = prompt_len, 0
    next_position = position_ids[:, -1] + 1
    while not all(done):
        # Draft: feed the last token, then each draft, through layers 1..E; keep their layer-E states.
        states, drafts, feed = [], [], token
        for j in range(k):
            query_positions = (next_position + j)[:, None]
            slot_position[:, slot + j] = next_position + j
            h = engine.embed(feed[:, None])
            step_emb = engine._position_embeddings(h, query_positions)
            step_masks = _masks(engine, slot_position[:, : slot + j + 1], query_positions, dtype)
            cache.write_pos = slot + j
            for i in range(e):
                h = engine._run_layer(i, h, None, step_masks, step_emb, query_positions, cache)
            states.append(h)
            feed = engine.logits(h[:, -1], e).argmax(-1)
            drafts.append(feed)
        layer_evals += batch * k * e
        # Verify: layers E+1..L over the k drafted slots at once, from their cached layer-E states.
        chunk_positions = next_position[:, None] + torch.arange(k, device=device)[None, :]
        h = torch.cat(states, dim=1)
        chunk_emb = engine._position_embeddings(h, chunk_positions)
        chunk_masks = _masks(engine, slot_position[:, : slot + k], chunk_positions, dtype)
        cache.write_pos = slot
        for i in range(e, depth):
            h = engine._run_layer(i, h, None, chunk_masks, chunk_emb, chunk_positions, cache)
        layer_evals += batch * k * (depth - e)
        verified = engine.logits(h, depth).argmax(-1)  # [B, k]: the full model's token after each drafted input
        accepted = (torch.stack(drafts, dim=1) == verified).long().cumprod(dim=1).sum(dim=1)  # leading agreements
        keep = (accepted + 1).clamp(max=k)  # per row: its accepted drafts and the full model's next token
        # Slots past a row's kept tokens hold rejected drafts: holes, never attended again.
        stale = torch.arange(k, device=device)[None, :] >= keep[:, None]
        slot_position[:, slot: slot + k] = slot_position[:, slot: slot + k].masked_fill(stale, -1)
        token = verified.gather(1, (keep - 1)[:, None]).squeeze(1)
        next_position = next_position + keep
        slot += k
        clock.mark()
        verified_host, keep_host, accepted_host = verified.tolist(), keep.tolist(), accepted.tolist()  # one sync
        feats["draft_rounds"] += 1
        feats["draft_steps"] += k
        for row in range(batch):
            if done[row]:
                continue
            feats["drafted_tokens"] += k
            feats["verify_positions"] += k
            feats["accepted_drafts"] += accepted_host[row]
            for new in verified_host[row][: keep_host[row]]:
                tokens[row].append(new)
                if len(tokens[row]) >= max_new_tokens or (stop_at_eos and new in eos_set):
                    done[row], done_at_mark[row] = True, len(clock.marks) - 1
                    break

    marks = clock.seconds()
    generated = sum(len(t) for t in tokens)
    generated_decode = sum(len(t) - 1 for t in tokens)
    macs = engine._macs
    return GenerationResult(
        tokens=tokens, exit_layers=[[depth] * len(t) for t in tokens], prompt_tokens=[len(p) for p in prompts],
        prefill_s=marks[1], decode_s=marks[-1] - marks[1], ttft_s=marks[1],
        e2e_s=[marks[m] for m in done_at_mark],
        weight_bytes=engine.loaded.weight_bytes, kv_cache_bytes=cache.nbytes, depth=depth, batch_size=batch,
        layer_evals=layer_evals, layer_evals_full=(generated - batch) * depth, exit_decision_s=0.0,
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
