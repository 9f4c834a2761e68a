"""Batched greedy decoding with a KV cache over a model truncated to depth k, with per-token early exit inside it.

    python -m helios.engine smollm2-135m --depth 20 --criterion max_prob --threshold 0.8 --exit-points 12,16

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
    one was trained for this checkpoint, else the identity (LayerSkip's shared head).
  * KV for exited tokens: deeper layers still need K/V at that position for later tokens. We propagate the exited
    hidden state (CALM): layer j > e gets K/V computed from h_e through its own input norm and K/V projections.
    That costs ~2 small matmuls per deeper layer instead of a whole layer, and it is what the model would see if
    the exited state were copied upwards. Tests check it against the model's own attention modules run on h_e.
  * `compact=True` gathers the still-active rows before each layer; `compact=False` runs every row through every
    layer and freezes exited rows' hidden states (which writes the same propagated K/V). Both give the same tokens;
    only compaction saves compute. Compaction needs the exit count on the host, i.e. one device sync per exit
    point; on CUDA the default is therefore `compact=False` (no host round-trips inside the decode loop except an
    all-finished check every `sync_every` steps), where truncation, not per-row exit, is the knob that saves time.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from helios.costmodel import COST_FEATURES  # the work counters: one list, shared with the cost model and replay
from helios.exit_config import CRITERIA, ExitConfig  # noqa: F401  (re-exported; torch-free home)
from helios.models import LoadedModel, load_candidate, text_config


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
    """Preallocated per-layer K/V of shape [batch, kv_heads, max_len, head_dim], written in place.

    HF attention modules call `update(k, v, layer_idx)`; `rows` (set by the engine before each layer) says which
    batch rows the call's tensors belong to, so that compacted batches read and write their own rows only.
    """

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # None: all rows, in order
        self.write_pos = 0  # cache index of the first query position of the current call

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        shape = (self.batch_size, like.shape[1], self.max_len, like.shape[3])
        self.keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def write(self, layer_idx: int, rows: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer_idx not in self.keys:
            self._allocate(layer_idx, key)
        end = self.write_pos + key.shape[2]
        if rows is None:
            self.keys[layer_idx][:, :, self.write_pos : end] = key
            self.values[layer_idx][:, :, self.write_pos : end] = value
        else:
            self.keys[layer_idx][rows, :, self.write_pos : end] = key
            self.values[layer_idx][rows, :, self.write_pos : end] = value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.write(layer_idx, self.rows, key_states, value_states)
        end = self.write_pos + key_states.shape[2]
        if self.rows is None:
            return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
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
    """Greedy batched decoding on a `LoadedModel` (see module docstring). Knows nothing of RL or HTTP."""

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

    def _run_layer(self, i: int, hidden, rows, masks, pos_emb, position_ids, cache) -> torch.Tensor:
        layer_type = self.layer_types[i]
        cache.rows = rows
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
        sync_every: int = 16,
        forced_tokens: list[list[int]] | None = None,
        on_token: Callable[[int, torch.Tensor], None] | None = None,
    ) -> GenerationResult:
        """Greedy decoding of `max_new_tokens` per prompt (fewer when EOS comes first and `stop_at_eos`).

        `forced_tokens` (teacher forcing): per prompt, the continuation to feed back instead of the engine's own
        predictions; the predictions and their exit layers are still what is returned. Replay traces are recorded
        this way, and it is how live runs are compared with them token for token.

        `on_token(step, tokens)` (streaming): called with each step's token per row (a device tensor of shape
        [batch]; step 0 is the prefill's token, rows that have finished hold the pad id) as soon as it is decided.
        Reading it on the host is a device sync, so on CUDA pass it only when a client streams.
        """
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if prompts and isinstance(prompts[0], str):
            prompts = self.encode(list(prompts))  # type: ignore[arg-type]
        prompts = [list(map(int, p)) for p in prompts]  # type: ignore[union-attr]
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"empty prompt(s) at index {empty}: every prompt needs at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        exit_config.validate(self.depth)
        if exit_config.criterion == "probe":
            trained = self.exit_probes.exit_layers if self.exit_probes is not None else []
            missing = [e for e in exit_config.exit_points if e not in trained]
            if missing:
                raise ValueError(
                    f"criterion 'probe' needs exit probes at layers {missing} for these exit heads (trained: "
                    f"{trained}); run: python scripts/tune_exits.py candidate=<name> heads=false probes=true")
        compact = (self.device.type == "cpu") if compact is None else compact
        if forced_tokens is not None:
            if len(forced_tokens) != len(prompts) or any(len(f) < max_new_tokens - 1 for f in forced_tokens):
                raise ValueError("forced_tokens needs one continuation of >= max_new_tokens - 1 tokens per prompt")
            forced = torch.tensor([list(f[: max_new_tokens - 1]) + [0] for f in forced_tokens], device=self.device)
        max_context = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        prompt_len = max(len(p) for p in prompts)
        if prompt_len + max_new_tokens > max_context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                f"of {max_context} tokens"
            )

        device, batch = self.device, len(prompts)
        total_len = prompt_len + max_new_tokens
        ids = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        valid = torch.zeros((batch, total_len), dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding, as HF generate does for decoder-only models
            ids[b, prompt_len - len(p) :] = torch.tensor(p)
            valid[b, prompt_len - len(p) :] = True
        ids, valid = ids.to(device), valid.to(device)
        position_ids = (valid[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)
        cache = EngineKVCache(batch, total_len)
        eos = torch.tensor(self.eos_ids or [-1], device=device)
        clock = _Clock(device)
        decision_s = 0.0
        dtype = self.loaded.dtype

        # Prefill: the whole prompt through every loaded layer (prompt K/V are needed at every depth anyway).
        clock.mark()
        hidden = self.embed(ids)
        pos_emb = self._position_embeddings(hidden, position_ids)
        masks = self._masks(valid, 0, prompt_len, dtype)
        cache.write_pos = 0
        for i in range(self.depth):
            hidden = self._run_layer(i, hidden, None, masks, pos_emb, position_ids, cache)
        token = self.logits(hidden[:, -1], self.depth).argmax(-1)
        out_tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        out_exit = torch.full((batch, max_new_tokens), self.depth, dtype=torch.long, device=device)
        out_tokens[:, 0] = token
        finished = torch.isin(token, eos) if stop_at_eos else torch.zeros(batch, dtype=torch.bool, device=device)
        finished_at = torch.where(finished, 0, max_new_tokens - 1)
        clock.mark()
        if on_token is not None:
            on_token(0, token)

        exit_points = set(exit_config.exit_points) if exit_config.enabled else set()
        feats = dict.fromkeys(COST_FEATURES, 0.0)
        feats["prefill_calls"] = 1.0
        feats["prefill_token_layers"] = float(batch * prompt_len * self.depth)
        feats["prefill_attention"] = float(batch * prompt_len * prompt_len * self.depth)
        layer_evals = 0
        layer_evals_full = 0
        decision_macs = 0
        head_macs_per_token = self._macs["head"]
        steps_done = 0
        for step in range(1, max_new_tokens):
            pos = prompt_len + step - 1  # cache index of the token being fed
            valid[:, pos] = True
            step_positions = position_ids[:, -1:] + step
            feed = token if forced_tokens is None else torch.where(finished, token, forced[:, step - 1])
            hidden = self.embed(feed[:, None])
            pos_emb = self._position_embeddings(hidden, step_positions)
            feats["steps"] += 1
            feats["step_rows"] += batch
            masks = self._masks(valid, pos, 1, dtype)
            cache.write_pos = pos
            rows: torch.Tensor | None = None
            if compact and bool(finished.any()):
                rows = (~finished).nonzero().squeeze(1)
                hidden = hidden[rows]
            next_token = torch.full((batch,), self.pad_id, dtype=torch.long, device=device)
            exited = torch.zeros(batch, dtype=torch.bool, device=device)  # for compact=False
            frozen = hidden
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, hidden) of tokens that exited
            active_rows = batch if rows is None else int(rows.numel())
            layer_evals_full += active_rows * self.depth
            for i in range(self.depth):
                for p_rows, p_hidden in pending:
                    self._propagate_kv(i, p_hidden, p_rows, pos_emb, cache, masks, step_positions)
                    feats["propagate_calls"] += 1
                    feats["propagate_rows"] += int(p_rows.numel())
                if active_rows == 0:
                    continue  # every row has exited: only the propagated K/V of deeper layers remain to write
                before = hidden
                hidden = self._run_layer(i, hidden, rows, masks, pos_emb, step_positions, cache)
                layer_evals += active_rows
                feats["layer_calls"] += 1
                feats["layer_rows"] += active_rows
                feats["attention_row_positions"] += active_rows * (pos + 1)
                if not compact and exit_points:
                    hidden = torch.where(exited[:, None, None], frozen, hidden)
                layer_count = i + 1
                if layer_count not in exit_points:
                    continue
                t0 = time.perf_counter() if measure_decisions else 0.0
                exits, exit_logits, macs = self._decide(exit_config, hidden, before, layer_count)
                decision_macs += macs * active_rows
                kind = exit_config.criterion if exit_config.criterion in ("cosine", "probe") else "head"
                feats[f"decision_{kind}_calls"] += 1
                feats[f"decision_{kind}_rows"] += active_rows
                if measure_decisions:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    decision_s += time.perf_counter() - t0
                if compact:
                    if not bool(exits.any()):
                        continue
                    row_ids = torch.arange(batch, device=device) if rows is None else rows
                    leaving = row_ids[exits]
                    if exit_logits is None:
                        exit_logits = self.logits(hidden[exits][:, -1], layer_count)
                        feats["exit_head_calls"] += 1
                        feats["exit_head_rows"] += int(exits.sum())
                    else:
                        exit_logits = exit_logits[exits]
                    feats["compactions"] += 1
                    next_token[leaving] = exit_logits.argmax(-1)
                    out_exit[leaving, step] = layer_count
                    pending.append((leaving, hidden[exits]))
                    rows, hidden = row_ids[~exits], hidden[~exits]
                    active_rows = int(rows.numel())
                else:
                    row_ids = torch.arange(batch, device=device)
                    newly = exits & ~exited & ~finished
                    if exit_logits is None:
                        exit_logits = self.logits(hidden[:, -1], layer_count)
                        feats["exit_head_calls"] += 1
                        feats["exit_head_rows"] += batch
                    next_token = torch.where(newly, exit_logits.argmax(-1), next_token)
                    out_exit[:, step] = torch.where(newly, layer_count, out_exit[:, step])
                    exited = exited | newly
                    frozen = torch.where(newly[:, None, None], hidden, frozen)
            if active_rows > 0:
                last_tokens = self.logits(hidden[:, -1], self.depth).argmax(-1)
                feats["head_calls"] += 1
                feats["head_rows"] += active_rows
                if compact:
                    next_token[torch.arange(batch, device=device) if rows is None else rows] = last_tokens
                else:
                    next_token = torch.where(exited, next_token, last_tokens)
            next_token = torch.where(finished, self.pad_id, next_token)
            out_tokens[:, step] = next_token
            if on_token is not None:
                on_token(step, next_token)
            if stop_at_eos:
                newly_finished = torch.isin(next_token, eos) & ~finished
                finished_at = torch.where(newly_finished, step, finished_at)
                finished = finished | newly_finished
            token = next_token
            steps_done = step
            clock.mark()
            # Host check of "all done": free on CPU, a sync on CUDA, so there only every `sync_every` steps.
            if stop_at_eos and (device.type == "cpu" or step % sync_every == 0) and bool(finished.all()):
                break

        marks = clock.seconds()
        prefill_s = marks[1]
        decode_s = marks[-1] - marks[1]
        finished_at_host = finished_at.clamp(max=steps_done).tolist()
        tokens_host, exits_host = out_tokens.tolist(), out_exit.tolist()
        result_tokens, result_exits = [], []
        for b in range(batch):
            n = finished_at_host[b] + 1
            result_tokens.append(tokens_host[b][:n])
            result_exits.append(exits_host[b][:n])
        generated_decode = sum(len(t) - 1 for t in result_tokens)
        decode_macs = layer_evals * self._macs["layer"] + generated_decode * head_macs_per_token + decision_macs
        return GenerationResult(
            tokens=result_tokens,
            exit_layers=result_exits,
            prompt_tokens=[len(p) for p in prompts],
            prefill_s=prefill_s,
            decode_s=decode_s,
            ttft_s=prefill_s,
            e2e_s=[marks[min(finished_at_host[b] + 1, len(marks) - 1)] for b in range(batch)],
            weight_bytes=self.loaded.weight_bytes,
            kv_cache_bytes=cache.nbytes,
            depth=self.depth,
            batch_size=batch,
            layer_evals=layer_evals,
            layer_evals_full=layer_evals_full,
            exit_decision_s=decision_s,
            exit_decision_macs=decision_macs,
            decode_macs=decode_macs,
            cost_features=feats,
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
