"""Batched decoding (greedy or sampled) with a KV cache over a model truncated to depth k, with per-token early exit.

    python -m helios.engine smollm2-135m --depth 20 --criterion max_prob --threshold 0.8 --exit-points 12,16

Step API (continuous batching, after Orca, OSDI 2022): `batch = engine.batch(exit_config)`; `batch.add(ids, prompts,
max_new_tokens)` prefills sequences into a running batch; `batch.step()` advances every running sequence by one
token; `batch.remove(ids)` retires any of them at any step. `generate` is a short loop over it. DecodeBatch's
docstring gives the K/V layout.

The engine drives the decoder layers of any Hugging Face causal LM itself (embed -> layers -> norm -> head), so that
rows of a batch whose token has exited stop costing compute in deeper layers (row compaction).

Early exit (Schuster et al. 2022, CALM; Elhoushi et al. 2024, LayerSkip):
  * Exit decisions happen only at configured exit points (layer counts e < depth). A full-vocabulary head at every
    layer costs more than the layers it skips (SmolLM2's head is ~21% of its multiply-adds; Gemma-3-270M's head
    outweighs all 18 layers), so criteria are: `max_prob` and `margin` (CALM's top-1 minus top-2), which need the
    head at each exit point, and `cosine` (CALM's hidden-state saturation: cos(h_e, h_{e-1}) >= threshold), which
    needs no head at all until a row actually exits, and `probe`, a learned per-exit classifier of "this exit gives
    the final layer's token" (helios.probes, trained by scripts/tune_exits.py probes=true), equally head-free.
  * The exit token is argmax(head(norm(adapter_e(h_e)))), where adapter_e is a tuned exit head (helios.exits) when
    one was trained for this checkpoint, else the identity (LayerSkip's shared head). Under sampling
    (helios.sampling) it is drawn from that exit head's tempered, top-k/top-p-filtered distribution instead, while
    the exit criteria keep reading the untempered one (CALM's confidence); see helios/sampling.py.
  * KV for exited tokens: deeper layers still need K/V at that position for later tokens. We propagate the exited
    hidden state (CALM): layer j > e gets K/V computed from h_e through its own input norm and K/V projections.
    That costs ~2 small matmuls per deeper layer instead of a whole layer, and it is what the model would see if
    the exited state were copied upwards. Tests check it against the model's own attention modules run on h_e.
  * `compact=True` gathers the still-active rows before each layer; `compact=False` runs every row through every
    layer and freezes exited rows' hidden states (which writes the same propagated K/V). Both give the same tokens;
    only compaction saves compute. Compaction needs the exit count on the host, i.e. one device sync per exit
    point; on CUDA the default is therefore `compact=False` (no host round-trips inside a decode step; one per step
    to hand the tokens to the caller), where truncation, not per-row exit, is the knob that saves time.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import time
from pathlib import Path
from collections.abc import Hashable
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from helios.costmodel import COST_FEATURES  # the work counters: one list, shared with the cost model and replay
from helios.exit_config import CRITERIA, ExitConfig  # noqa: F401  (re-exported; torch-free home)
from helios.models import LoadedModel, load_candidate, text_config
from helios.sampling import BatchSampler, SamplingParams, TokenLogprob, per_row


@dataclasses.dataclass
class GenerationResult:
    """What one `generate` call produced and what it cost. Times are seconds of wall clock on the engine's device.

    `exit_layers[i][t]` is the number of layers that produced request i's t-th generated token (the loaded depth
    when it did not exit early; the first token comes from prefill at full loaded depth).
    """

    tokens: list[list[int]]
    exit_layers: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    ttft_s: float
    e2e_s: list[float]
    weight_bytes: int
    kv_cache_bytes: int
    depth: int
    batch_size: int
    layer_evals: int  # sum over decode steps of (rows x layers) actually computed: the compute the engine paid
    layer_evals_full: int  # the same without exits: rows x depth per step
    exit_decision_s: float  # measured only when `measure_decisions=True`, else 0
    exit_decision_macs: int  # multiply-adds spent on exit decisions (analytic)
    decode_macs: int  # multiply-adds of decoding (layers + heads + decisions, analytic; attention excluded)
    # Counts of the work the call did, by kind (layer calls, row-evaluations, head rows, ...): what the calibrated
    # cost model (helios.costmodel) regresses time on, and what replay reconstructs from traces.
    cost_features: dict[str, float] = dataclasses.field(default_factory=dict)
    # Per row, per returned token (aligned with `tokens`), when some row's SamplingParams asked for logprobs (rows
    # that did not get []); None otherwise. See helios.sampling for what they are (raw distribution of the deciding
    # layer: the exit head's for exited tokens).
    logprobs: list[list[TokenLogprob]] | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.prefill_s + self.decode_s, 1e-12)

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.generated_tokens - len(self.tokens)
        return decoded / max(self.decode_s, 1e-12)


class EngineKVCache:
    """Per-layer K/V of shape [slots, kv_heads, capacity, head_dim], written in place.

    HF attention modules call `update(k, v, layer_idx)`; `rows` (set by the engine before each layer) says which
    batch rows the call's tensors belong to, so that compacted batches read and write their own rows only.
    `write_pos` is either one cache index for every row (prefill, and static batches that share positions) or a
    LongTensor of one index per slot (continuous batching: each sequence writes its next token at its own length);
    then `read_len` says how many positions an attention call reads. `active` is the number of leading slots in use
    (rows=None means slots 0..active-1). `grow` enlarges slots and capacity, keeping what is stored.
    """

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size = batch_size  # slots
        self.max_len = max_len  # capacity, in positions
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # None: all active rows, in order
        self.write_pos: int | torch.Tensor = 0
        self.read_len: int = 0
        self.active = batch_size

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        shape = (self.batch_size, like.shape[1], self.max_len, like.shape[3])
        self.keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    # Growth factor of slots and positions. Amortised O(1) per slot either way; 2 (doubling) left up to 2x idle in each
    # dimension, which on a GPU put physical K/V at ~7x what the scheduler reserved (benchmarks/RESULTS.md, the serving
    # core on a GPU). 1.25 copies at most 4x the final cache over a run's growth (doubling: 1x) and bounds each
    # dimension's idle share to 1.25x; measured 1.11x faster on a CPU (less memory to zero; benchmarks/kv_growth.py).
    GROWTH = 1.25

    def grow(self, slots: int, max_len: int) -> None:
        """At least `slots` slots of `max_len` positions (amortised: a size that grows grows by >= GROWTH)."""
        if slots <= self.batch_size and max_len <= self.max_len:
            return
        new_slots = max(slots, math.ceil(self.GROWTH * self.batch_size)) if slots > self.batch_size else self.batch_size
        new_len = max(max_len, math.ceil(self.GROWTH * self.max_len)) if max_len > self.max_len else self.max_len
        for store in (self.keys, self.values):
            for layer_idx, old in store.items():
                grown = old.new_zeros((new_slots, old.shape[1], new_len, old.shape[3]))
                grown[: old.shape[0], :, : old.shape[2]] = old
                store[layer_idx] = grown
        self.batch_size, self.max_len = new_slots, new_len

    def move_slot(self, src: int, dst: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[dst] = tensor[src]

    def write(self, layer_idx: int, rows: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer_idx not in self.keys:
            self._allocate(layer_idx, key)
        if isinstance(self.write_pos, torch.Tensor):  # one new position per row, each at its own index
            slots = torch.arange(key.shape[0], device=key.device) if rows is None else rows
            positions = self.write_pos[slots]
            self.keys[layer_idx][slots, :, positions] = key[:, :, 0]
            self.values[layer_idx][slots, :, positions] = value[:, :, 0]
            return
        end = self.write_pos + key.shape[2]
        if rows is None:
            self.keys[layer_idx][: key.shape[0], :, self.write_pos : end] = key
            self.values[layer_idx][: key.shape[0], :, self.write_pos : end] = value
        else:
            self.keys[layer_idx][rows, :, self.write_pos : end] = key
            self.values[layer_idx][rows, :, self.write_pos : end] = value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.write(layer_idx, self.rows, key_states, value_states)
        if isinstance(self.write_pos, torch.Tensor):
            end = self.read_len
        else:
            end = self.write_pos + key_states.shape[2]
        if self.rows is None:
            return self.keys[layer_idx][: self.active, :, :end], self.values[layer_idx][: self.active, :, :end]
        return self.keys[layer_idx][self.rows, :, :end], self.values[layer_idx][self.rows, :, :end]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])


class _Clock:
    """Host clock on CPU; CUDA events on GPU so that timestamps inside the loop need no synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds since the first mark, for every mark (synchronises once, at the end)."""
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks]
        return [m - self.marks[0] for m in self.marks]


class EarlyExitEngine:
    """Batched decoding on a `LoadedModel` (see module docstring). Knows nothing of RL or HTTP."""

    def __init__(self, loaded: LoadedModel, exit_heads: Any | None = None, *, load_tuned_heads: bool = True,
                 exit_probes: Any | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        decoder = self.model.get_decoder()
        self.embed = decoder.embed_tokens
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.head = self.model.get_output_embeddings()
        self.rotary = decoder.rotary_emb
        self.config = text_config(self.model.config)
        self.depth = len(self.layers)
        self.layer_types: list[str] = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.depth)
        self.sliding_window: int | None = getattr(self.config, "sliding_window", None)
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        # transformers 5.24 renamed decoder layers' `past_key_values` to `cache` (the old name warns, and goes in
        # 5.40); older 5.x only know the old name.
        layer_params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kwarg = "cache" if "cache" in layer_params else "past_key_values"
        self.eager_masks = self.config._attn_implementation == "eager"
        is_prefix = tuple(loaded.layer_indices or range(self.depth)) == tuple(range(self.depth))
        heads_given = exit_heads is not None
        if exit_heads is None and load_tuned_heads and is_prefix:  # heads are trained per prefix layer count
            from helios.exits import load_exit_heads

            exit_heads = load_exit_heads(loaded.checkpoint, device=self.device, dtype=loaded.dtype)
        self.exit_heads = exit_heads
        # Probes are labelled by the heads they were trained with: load them only for the saved heads (or for the
        # shared head when none are saved), never for heads passed in by the caller.
        if exit_probes is None and is_prefix and not heads_given and not (exit_heads is None and
                                                                          self._has_saved_heads()):
            from helios.probes import load_exit_probes

            exit_probes = load_exit_probes(loaded.checkpoint, device=self.device)
        self.exit_probes = exit_probes
        self.eos_ids = self._eos_ids()
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._macs = self._mac_counts()

    # ------------------------------------------------------------------------------------------ helpers

    def _has_saved_heads(self) -> bool:
        from helios.exits import HEADS_FILE

        return self.loaded.checkpoint is not None and (Path(self.loaded.checkpoint) / HEADS_FILE).exists()

    def _eos_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.loaded.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return ids

    def _mac_counts(self) -> dict[str, int]:
        per_layer = sum(p.numel() for p in self.layers[0].parameters() if p.dim() == 2)
        head = self.head.weight.numel()
        hidden = int(self.config.hidden_size)
        return {"layer": per_layer, "head": head, "hidden": hidden}

    def logits(self, hidden: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """Vocabulary logits from a hidden state after `exit_layer` layers.

        A tuned head exists per layer count of the full model, so it also serves the last layer of a prefix
        truncation (a model loaded to k < L layers exits at k through head k); the full model's last layer and
        `exit_layer=None` use the shared norm + head alone.
        """
        if exit_layer is not None and exit_layer < self.loaded.num_layers and self.exit_heads is not None:
            hidden = self.exit_heads.transform(exit_layer, hidden)
        logits = self.head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple]:
        if self._rotary_takes_layer_type:
            return {lt: self.rotary(hidden, position_ids, lt) for lt in set(self.layer_types)}
        shared = self.rotary(hidden, position_ids)
        return {lt: shared for lt in set(self.layer_types)}

    def _masks(self, valid: torch.Tensor, start: int, q_len: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Boolean attention masks [B, 1, q_len, start + q_len] per layer type (True = attend).

        Key j is visible from query i (cache index start + i) when j is a real token, j <= start + i, and, for
        sliding layers, j > start + i - window. A query on a padding slot sees itself, so no softmax row is empty.
        """
        end = start + q_len
        query_idx = torch.arange(start, end, device=valid.device)[:, None]
        key_idx = torch.arange(end, device=valid.device)[None, :]
        causal = key_idx <= query_idx
        base = valid[:, None, None, :end] & causal[None, None]
        self_slot = (key_idx == query_idx)[None, None]
        return self.masks_by_layer_type(base, key_idx[None, None], query_idx[None, None], dtype, always=self_slot)

    def masks_by_layer_type(self, base: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor, dtype: torch.dtype,
                            always: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`base` [B, 1, q, k] (True = attend), narrowed to the sliding window on sliding layers (`keys`, `queries`:
        broadcastable indices in the unit the window is counted in), OR `always`; float additive masks for eager
        attention."""
        masks: dict[str, torch.Tensor] = {}
        for layer_type in set(self.layer_types):
            mask = base
            if layer_type == "sliding_attention" and self.sliding_window:
                mask = mask & (keys > queries - self.sliding_window)
            if always is not None:
                mask = mask | always
            if self.eager_masks:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(dtype).min
                )
            masks[layer_type] = mask
        return masks

    def _run_layer(self, i: int, hidden, rows, masks, pos_emb, position_ids, cache, slots=None) -> torch.Tensor:
        """Layer i on `hidden`, whose rows are cache rows `rows` (None: all, in order; masks and positions are
        per batch row and get narrowed to `rows`), or, for a prefill into other slots, cache rows `slots` (masks and
        positions already per hidden row)."""
        layer_type = self.layer_types[i]
        cache.rows = rows if slots is None else slots
        mask, (cos, sin) = masks[layer_type], pos_emb[layer_type]
        if rows is not None:
            mask, cos, sin, position_ids = mask[rows], cos[rows], sin[rows], position_ids[rows]
        out = self.layers[i](
            hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids,
            **{self._cache_kwarg: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def _propagate_kv(self, i: int, hidden, rows, pos_emb, cache, masks, position_ids) -> None:
        """Write layer i's K/V for exited rows from their frozen hidden state (CALM state propagation)."""
        layer = self.layers[i]
        attn = layer.self_attn
        cos, sin = pos_emb[self.layer_types[i]]
        cos, sin = cos[rows], sin[rows]
        if hasattr(layer, "input_layernorm") and hasattr(attn, "k_proj") and hasattr(attn, "v_proj"):
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            key = attn.k_proj(x).view(shape).transpose(1, 2)
            value = attn.v_proj(x).view(shape).transpose(1, 2)
            if hasattr(attn, "k_norm"):
                key = attn.k_norm(key)
            rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            _, key = rotate(key, key, cos, sin)
            cache.write(i, rows, key, value)
        else:  # Unknown layer layout: run the whole layer on the frozen state, discard the output, keep its K/V.
            self._run_layer(i, hidden, rows, masks, pos_emb, position_ids, cache)

    # ------------------------------------------------------------------------------------------ generation

    @property
    def max_context(self) -> int:
        """Positions the model was trained for (prompt + generated tokens must fit)."""
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    def encode(self, prompts: list[str], *, chat: bool = False) -> list[list[int]]:
        tokenizer = self.loaded.tokenizer
        if chat:
            return [
                list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
                for p in prompts
            ]
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    def batch(self, exit_config: ExitConfig = ExitConfig(), *, compact: bool | None = None) -> DecodeBatch:
        """An empty running batch on this engine (the step API: `add`, `step`, `remove`; see DecodeBatch)."""
        return DecodeBatch(self, exit_config, compact=compact)

    def check_exit_config(self, exit_config: ExitConfig) -> None:
        exit_config.validate(self.depth)
        if exit_config.criterion == "probe":
            trained = self.exit_probes.exit_layers if self.exit_probes is not None else []
            missing = [e for e in exit_config.exit_points if e not in trained]
            if missing:
                raise ValueError(
                    f"criterion 'probe' needs exit probes at layers {missing} for these exit heads (trained: "
                    f"{trained}); run: python scripts/tune_exits.py candidate=<name> heads=false probes=true")

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]] | list[str],
        max_new_tokens: int,
        exit_config: ExitConfig = ExitConfig(),
        *,
        compact: bool | None = None,
        stop_at_eos: bool = True,
        measure_decisions: bool = False,
        forced_tokens: list[list[int]] | None = None,
        on_token: Callable[[int, torch.Tensor], None] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> GenerationResult:
        """Decoding of `max_new_tokens` per prompt (fewer when EOS comes first and `stop_at_eos`).

        `sampling`: None (greedy for every row), one SamplingParams for all rows, or one per prompt; rows may mix
        greedy and sampled settings. A row's sampled tokens depend on its seed and prompt, not on the other rows; so
        one seeded SamplingParams shared by several rows gives them one noise stream (correlated draws): give rows
        distinct seeds (e.g. seed + i) for independent samples.
        Logprobs, when asked, come back in `GenerationResult.logprobs`.

        A short loop over the step API: every prompt joins one batch, then one decode step at a time, retiring each
        sequence as it finishes (so finished rows cost nothing).

        `forced_tokens` (teacher forcing): per prompt, the continuation to feed back instead of the engine's own
        predictions; the predictions and their exit layers are still what is returned. Replay traces are recorded
        this way, and it is how live runs are compared with them token for token.

        `on_token(step, tokens)` (streaming): called with each step's token per row (a device tensor of shape
        [batch]; step 0 is the prefill's token, rows that have finished hold the pad id) as soon as it is decided.
        """
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if prompts and isinstance(prompts[0], str):
            prompts = self.encode(list(prompts))  # type: ignore[arg-type]
        prompts = [list(map(int, p)) for p in prompts]  # type: ignore[union-attr]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        if forced_tokens is not None and (
                len(forced_tokens) != len(prompts) or any(len(f) < max_new_tokens - 1 for f in forced_tokens)):
            raise ValueError("forced_tokens needs one continuation of >= max_new_tokens - 1 tokens per prompt")
        prompt_len = max(len(p) for p in prompts) if all(prompts) else 0
        if prompt_len + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                f"of {self.max_context} tokens"
            )
        n = len(prompts)
        row_params = per_row(sampling, n)
        running = self.batch(exit_config, compact=compact)
        running.measure_decisions = measure_decisions
        clock = _Clock(self.device)
        clock.mark()
        first = running.add(list(range(n)), prompts, max_new_tokens, row_params)
        clock.mark()
        tokens: list[list[int]] = [[t] for t in first.tokens]
        exits: list[list[int]] = [[e] for e in first.exit_layers]
        asked = any(p.logprobs is not None for p in row_params)
        logprobs: list[list[TokenLogprob]] = [[lp] if lp is not None else [] for lp in first.logprobs] if asked else []
        finished_mark = [1 if stop_at_eos and t in self.eos_ids else -1 for t in first.tokens]
        if on_token is not None:
            on_token(0, torch.tensor(first.tokens, device=self.device))
        running.remove([i for i in range(n) if finished_mark[i] >= 0])
        kv_bytes = running.cache.nbytes
        for step in range(1, max_new_tokens):
            if not running.seq_ids:
                break
            feed = None if forced_tokens is None else [forced_tokens[i][step - 1] for i in running.seq_ids]
            out = running.step(feed)
            clock.mark()
            done = []
            for r, (i, token, layer) in enumerate(zip(out.seq_ids, out.tokens, out.exit_layers)):
                tokens[i].append(token)
                exits[i].append(layer)
                if asked and out.logprobs[r] is not None:
                    logprobs[i].append(out.logprobs[r])
                if (stop_at_eos and token in self.eos_ids) or step == max_new_tokens - 1:
                    finished_mark[i] = len(clock.marks) - 1
                    done.append(i)
            if on_token is not None:
                row = dict(zip(out.seq_ids, out.tokens))
                on_token(step, torch.tensor([row.get(i, self.pad_id) for i in range(n)], device=self.device))
            kv_bytes = max(kv_bytes, running.cache.nbytes)
            running.remove(done)
        marks = clock.seconds()
        last = len(marks) - 1
        feats = running.features
        generated_decode = sum(len(t) - 1 for t in tokens)
        decode_macs = (running.layer_evals * self._macs["layer"] + generated_decode * self._macs["head"]
                       + running.decision_macs)
        return GenerationResult(
            tokens=tokens,
            exit_layers=exits,
            prompt_tokens=[len(p) for p in prompts],
            prefill_s=marks[1],
            decode_s=marks[-1] - marks[1],
            ttft_s=marks[1],
            e2e_s=[marks[m if m >= 0 else last] for m in finished_mark],
            weight_bytes=self.loaded.weight_bytes,
            kv_cache_bytes=kv_bytes,
            depth=self.depth,
            batch_size=n,
            layer_evals=running.layer_evals,
            layer_evals_full=running.layer_evals_full,
            exit_decision_s=running.decision_s,
            exit_decision_macs=running.decision_macs,
            decode_macs=decode_macs,
            cost_features=feats,
            logprobs=logprobs if asked else None,
        )

    def _decide(self, exit_config: ExitConfig, hidden, before, layer_count: int):
        """Exit mask over the active rows, the logits if the criterion computed them, and the per-row MACs spent."""
        h = hidden[:, -1]
        if exit_config.criterion == "cosine":
            similarity = F.cosine_similarity(h, before[:, -1], dim=-1)
            return similarity >= exit_config.threshold, None, 2 * self._macs["hidden"]
        if exit_config.criterion == "probe":
            prev = before[:, -1] if layer_count > 1 else h  # the probe saw cos = 1 at layer 1 (no state before it)
            confidence = self.exit_probes.confidence(layer_count, h, prev)
            return confidence >= exit_config.threshold, None, self.exit_probes.macs()
        logits = self.logits(h, layer_count)
        probs = torch.softmax(logits.float(), dim=-1)
        macs = self._macs["head"] + (self.exit_heads.macs(layer_count) if self.exit_heads is not None else 0)
        if exit_config.criterion == "max_prob":
            return probs.max(-1).values >= exit_config.threshold, logits, macs
        top2 = probs.topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) >= exit_config.threshold, logits, macs


@dataclasses.dataclass
class StepOutput:
    """One token per sequence, in the batch's order at the time of the call."""

    seq_ids: list[Hashable]
    tokens: list[int]
    exit_layers: list[int]
    logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)  # per row, where asked


class DecodeBatch:
    """The running set of a continuous batch on one engine: sequences join after their prefill (`add`), every running
    sequence advances one token per `step`, and any can leave at any step (`remove`). Knows nothing of queues,
    clocks or budgets: a scheduler (helios.scheduler) decides who runs, this runs them.

    K/V layout: dense slots. Each running sequence owns one slot (a row of every layer's [slots, kv_heads, capacity,
    head_dim] cache) and keeps its own positions: token t of a sequence is at cache index t and RoPE position t, so
    no sequence is padded against another. Running sequences always occupy slots 0..n-1 (a leaving sequence's slot
    is refilled by moving the last one into it), so a decode step reads a view of the cache, never a gather. Slots
    and capacity grow geometrically (EngineKVCache.GROWTH). Why not pages (vLLM): paging saves the memory that one
    long sequence forces on every slot, but attention over pages needs a kernel that reads them; HF's attention
    modules read one dense tensor. The memory budget is the scheduler's (it reserves prompt + max_tokens per sequence); `cache.nbytes`
    is what is physically allocated.

    Host syncs: one per step (the tokens, which the caller needs for EOS, stop strings and streaming), plus one per
    exit point when compacting rows (CPU default).
    """

    def __init__(self, engine: EarlyExitEngine, exit_config: ExitConfig, *, compact: bool | None = None) -> None:
        engine.check_exit_config(exit_config)
        self.engine = engine
        self.exit_config = exit_config
        self.exit_points = set(exit_config.exit_points) if exit_config.enabled else set()
        self.compact = (engine.device.type == "cpu") if compact is None else compact
        self.cache = EngineKVCache(0, 0)
        self.seq_ids: list[Hashable] = []
        self.lengths: list[int] = []  # tokens in the cache per slot
        self.limits: list[int] = []  # prompt + max_new_tokens per slot (capacity this sequence may need)
        self.last = torch.zeros(0, dtype=torch.long, device=engine.device)  # next token to feed, per slot
        self.sampling: list[SamplingParams] = []  # per slot
        self.generators: list[torch.Generator | None] = []  # per slot: a sampled sequence's own noise stream
        self._sampler: BatchSampler | None = None  # the current call's
        self._vocab = int(engine.head.weight.shape[0])
        self.features = dict.fromkeys(COST_FEATURES, 0.0)
        self.layer_evals = 0
        self.layer_evals_full = 0
        self.decision_macs = 0
        self.decision_s = 0.0
        self.measure_decisions = False

    def __len__(self) -> int:
        return len(self.seq_ids)

    # ------------------------------------------------------------------------------------------ membership

    @torch.inference_mode()
    def add(self, seq_ids: list[Hashable], prompts: list[list[int]], max_new_tokens: int | list[int],
            sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> StepOutput:
        """Prefill `prompts` together (right-padded among themselves) into new slots; returns each one's first token
        (from the full loaded depth). `max_new_tokens` sizes the cache, per sequence or for all. `sampling`: None
        (greedy), one SamplingParams for all, or one per prompt (helios.sampling)."""
        engine = self.engine
        if len(seq_ids) != len(prompts):
            raise ValueError(f"{len(seq_ids)} sequence ids for {len(prompts)} prompts")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"empty prompt(s) at index {empty}: every prompt needs at least one token")
        clash = set(seq_ids) & set(self.seq_ids) or len(set(seq_ids)) != len(seq_ids)
        if clash:
            raise ValueError(f"sequence ids must be unique in a batch; repeated: {clash}")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        limits = [len(p) + m for p, m in zip(prompts, limits)]
        too_long = [i for i, lim in enumerate(limits) if lim > engine.max_context]
        if too_long:
            raise ValueError(f"prompt + max_new_tokens exceeds the context window of {engine.max_context} tokens "
                             f"for prompt(s) {too_long}")
        params = per_row(sampling, len(prompts))
        if not prompts:
            return StepOutput([], [], [])
        generators = [None if p.greedy else BatchSampler.generator(p.seed, engine.device) for p in params]
        device, dtype, count, start = engine.device, engine.loaded.dtype, len(prompts), len(self.seq_ids)
        prompt_len = max(len(p) for p in prompts)
        self.cache.grow(start + count, max([prompt_len, *limits, *self.limits]))
        ids = torch.full((count, prompt_len), engine.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p)
        ids, lengths = ids.to(device), lengths.to(device)
        slots = torch.arange(start, start + count, device=device)
        positions = torch.arange(prompt_len, device=device)[None].expand(count, -1)
        query = positions[:, None, :, None]
        key = torch.arange(prompt_len, device=device)[None, None, None, :]
        base = (key <= query) & (key < lengths[:, None, None, None])
        masks = engine.masks_by_layer_type(base, key, query, dtype, always=key == query)
        hidden = engine.embed(ids)
        pos_emb = engine._position_embeddings(hidden, positions)
        self.cache.write_pos = 0
        self.cache.active = start + count
        for i in range(engine.depth):
            hidden = engine._run_layer(i, hidden, None, masks, pos_emb, positions, self.cache, slots=slots)
        last_hidden = hidden[torch.arange(count, device=device), lengths - 1]
        self._sampler = BatchSampler(params, self._vocab, 1, device, generators=dict(enumerate(generators)))
        self._sampler.begin_step()
        token = self._choose(engine.logits(last_hidden, engine.depth))
        logprobs = self._logprobs(token)
        self.features["prefill_calls"] += 1
        self.features["prefill_token_layers"] += float(count * prompt_len * engine.depth)
        self.features["prefill_attention"] += float(count * prompt_len * prompt_len * engine.depth)
        self.seq_ids += list(seq_ids)
        self.lengths += [len(p) for p in prompts]
        self.limits += limits
        self.sampling += params
        self.generators += generators
        self.last = torch.cat([self.last, token])
        return StepOutput(list(seq_ids), token.tolist(), [engine.depth] * count, logprobs)

    @torch.inference_mode()
    def remove(self, seq_ids: list[Hashable]) -> None:
        """Retire sequences: each hole below the new end is refilled by a survivor from beyond it (one slot copy
        per hole), so running slots stay 0..n-1."""
        if not seq_ids:
            return
        unknown = set(seq_ids) - set(self.seq_ids)
        if unknown:
            raise ValueError(f"unknown sequence id(s) {sorted(map(str, unknown))}; running: {self.seq_ids}")
        gone = set(seq_ids)
        new_n = len(self.seq_ids) - len(gone)
        order = list(range(len(self.seq_ids)))  # order[dst] = src
        holes = [s for s in range(new_n) if self.seq_ids[s] in gone]
        tail = [s for s in range(new_n, len(self.seq_ids)) if self.seq_ids[s] not in gone]
        for dst, src in zip(holes, tail):
            self.cache.move_slot(src, dst)
            order[dst] = src
        order = order[:new_n]
        self.last = self.last[torch.tensor(order, dtype=torch.long, device=self.last.device)]
        self.seq_ids = [self.seq_ids[s] for s in order]
        self.lengths = [self.lengths[s] for s in order]
        self.limits = [self.limits[s] for s in order]
        self.sampling = [self.sampling[s] for s in order]
        self.generators = [self.generators[s] for s in order]

    # ------------------------------------------------------------------------------------------ decoding

    def _choose(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
                where: torch.Tensor | None = None) -> torch.Tensor:
        """The emitted token per row of `logits` (rows: their slots, None = all in order; `where`: with rows=None,
        the rows that take their token from these logits now), by the current call's sampler (helios.sampling)."""
        return self._sampler.choose(logits, rows, 0, where)

    def _logprobs(self, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """This call's logprobs per row (None where not asked); empty when no row asked (no host copy then)."""
        rows = self._sampler.logprobs([[t] for t in tokens.tolist()]) if self._sampler.top_logprobs is not None else None
        if rows is None:
            return []
        return [row[0] if row else None for row in rows]

    @torch.inference_mode()
    def step(self, feed: list[int] | None = None) -> StepOutput:
        """One decode step for every running sequence: feed each its last token (or `feed`, teacher forcing) and
        decide its next one, exiting early where the exit setting says so (see the module docstring)."""
        engine, exit_config = self.engine, self.exit_config
        batch = len(self.seq_ids)
        if batch == 0:
            return StepOutput([], [], [])
        device, dtype, depth = engine.device, engine.loaded.dtype, engine.depth
        if max(self.lengths) + 1 > self.cache.max_len:
            self.cache.grow(batch, max(self.lengths) + 1)
        positions_host = self.lengths
        positions = torch.tensor(positions_host, device=device)
        token = self.last if feed is None else torch.tensor(feed, dtype=torch.long, device=device)
        hidden = engine.embed(token[:, None])
        step_positions = positions[:, None]
        pos_emb = engine._position_embeddings(hidden, step_positions)
        read_len = max(positions_host) + 1
        query = positions[:, None, None, None]
        key = torch.arange(read_len, device=device)[None, None, None, :]
        masks = engine.masks_by_layer_type(key <= query, key, query, dtype)
        cache = self.cache
        cache.write_pos, cache.read_len, cache.active = positions, read_len, batch
        feats = self.features
        feats["steps"] += 1
        feats["step_rows"] += batch
        # The step's noise is drawn before any layer runs and read by whichever layer decides each row's token.
        self._sampler = BatchSampler(self.sampling, self._vocab, 1, device, generators=dict(enumerate(self.generators)))
        self._sampler.begin_step()
        compact = self.compact
        rows: torch.Tensor | None = None
        next_token = torch.full((batch,), engine.pad_id, dtype=torch.long, device=device)
        exit_layer = torch.full((batch,), depth, dtype=torch.long, device=device)
        exited = torch.zeros(batch, dtype=torch.bool, device=device)  # for compact=False
        frozen = hidden
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, hidden) of tokens that exited
        active_rows = batch
        # Attention reads read_len positions per active row (dense slots: a shorter row's extra keys are masked, not
        # skipped), so that is the work counted.
        row_positions = float(batch * read_len)
        self.layer_evals_full += batch * depth
        for i in range(depth):
            for p_rows, p_hidden in pending:
                engine._propagate_kv(i, p_hidden, p_rows, pos_emb, cache, masks, step_positions)
                feats["propagate_calls"] += 1
                feats["propagate_rows"] += int(p_rows.numel())
            if active_rows == 0:
                continue  # every row has exited: only the propagated K/V of deeper layers remain to write
            before = hidden
            hidden = engine._run_layer(i, hidden, rows, masks, pos_emb, step_positions, cache)
            self.layer_evals += active_rows
            feats["layer_calls"] += 1
            feats["layer_rows"] += active_rows
            feats["attention_row_positions"] += row_positions
            if not compact and self.exit_points:
                hidden = torch.where(exited[:, None, None], frozen, hidden)
            layer_count = i + 1
            if layer_count not in self.exit_points:
                continue
            t0 = time.perf_counter() if self.measure_decisions else 0.0
            exits, exit_logits, macs = engine._decide(exit_config, hidden, before, layer_count)
            self.decision_macs += macs * active_rows
            kind = exit_config.criterion if exit_config.criterion in ("cosine", "probe") else "head"
            feats[f"decision_{kind}_calls"] += 1
            feats[f"decision_{kind}_rows"] += active_rows
            if self.measure_decisions:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.decision_s += time.perf_counter() - t0
            if compact:
                if not bool(exits.any()):
                    continue
                row_ids = torch.arange(batch, device=device) if rows is None else rows
                leaving = row_ids[exits]
                if exit_logits is None:
                    exit_logits = engine.logits(hidden[exits][:, -1], layer_count)
                    feats["exit_head_calls"] += 1
                    feats["exit_head_rows"] += int(exits.sum())
                else:
                    exit_logits = exit_logits[exits]
                feats["compactions"] += 1
                next_token[leaving] = self._choose(exit_logits, leaving)
                exit_layer[leaving] = layer_count
                pending.append((leaving, hidden[exits]))
                rows, hidden = row_ids[~exits], hidden[~exits]
                active_rows = int(rows.numel())
                row_positions = float(active_rows * read_len)
            else:
                newly = exits & ~exited
                if exit_logits is None:
                    exit_logits = engine.logits(hidden[:, -1], layer_count)
                    feats["exit_head_calls"] += 1
                    feats["exit_head_rows"] += batch
                next_token = torch.where(newly, self._choose(exit_logits, None, newly), next_token)
                exit_layer = torch.where(newly, layer_count, exit_layer)
                exited = exited | newly
                frozen = torch.where(newly[:, None, None], hidden, frozen)
        if active_rows > 0:
            last_logits = engine.logits(hidden[:, -1], depth)
            feats["head_calls"] += 1
            feats["head_rows"] += active_rows
            if compact:
                row_ids = torch.arange(batch, device=device) if rows is None else rows
                next_token[row_ids] = self._choose(last_logits, row_ids)
            else:
                last_tokens = self._choose(last_logits, None, None if not self.exit_points else ~exited)
                next_token = torch.where(exited, next_token, last_tokens)
        self.last = next_token
        self.lengths = [n + 1 for n in self.lengths]
        return StepOutput(list(self.seq_ids), next_token.tolist(), exit_layer.tolist(), self._logprobs(next_token))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default="smollm2-135m")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--criterion", default="none", choices=CRITERIA)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--exit-points", default="")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args()
    loaded = load_candidate(args.name, args.depth)
    engine = EarlyExitEngine(loaded)
    points = tuple(int(x) for x in args.exit_points.split(",") if x)
    prompts = args.prompt or ["The capital of France is", "def fibonacci(n):"]
    result = engine.generate(prompts, args.max_new_tokens, ExitConfig(args.criterion, args.threshold, points))
    for prompt, tokens, exits in zip(prompts, result.tokens, result.exit_layers):
        print(f"--- {prompt!r}\n{loaded.tokenizer.decode(tokens)!r}\n    exit layers: {exits}")
    print(
        f"depth {loaded.depth}/{loaded.num_layers}, {result.tokens_per_s:.1f} tok/s, ttft {result.ttft_s * 1e3:.0f} ms, "
        f"weights {result.weight_bytes / 2**20:.1f} MiB, kv {result.kv_cache_bytes / 2**20:.2f} MiB, "
        f"compute {result.layer_evals / max(result.layer_evals_full, 1):.2f} of full"
    )


if __name__ == "__main__":
    main()
