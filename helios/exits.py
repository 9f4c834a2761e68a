"""Tuned exit heads: a light adapter per exit point that maps an intermediate hidden state into the space the
model's own final norm + LM head expect (the head stays shared, as in LayerSkip; the adapter is what is trained).

    python scripts/tune_exits.py candidate=smollm2-135m     # trains and saves heads beside the cached checkpoint

Saved as `exit_heads.safetensors` (+ `exit_heads.json` metadata) in the candidate's checkpoint directory; the
engine loads them when present. Only safetensors and JSON: no pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from helios.paths import atomic_file, write_json

HEADS_FILE = "exit_heads.safetensors"
META_FILE = "exit_heads.json"
FORMAT_VERSION = 1


class ExitAdapter(nn.Module):
    """h -> h + up(down(norm(h))): a residual low-rank (rank < hidden) or full (rank == hidden) linear map.

    Initialised to the identity (up = 0), so an untrained adapter is exactly the shared head.
    """

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(self.norm(hidden)))

    @property
    def macs(self) -> int:
        return self.down.weight.numel() + self.up.weight.numel()


class TunedExitHeads(nn.Module):
    """One `ExitAdapter` per exit point, keyed by layer count (number of layers that produced the hidden state)."""

    def __init__(self, hidden_size: int, rank: int, exit_layers: list[int]) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.adapters = nn.ModuleDict({str(layer): ExitAdapter(hidden_size, rank) for layer in exit_layers})

    @property
    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.adapters)

    def transform(self, layer_count: int, hidden: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[str(layer_count)] if str(layer_count) in self.adapters else None
        return hidden if adapter is None else adapter(hidden)

    def macs(self, layer_count: int) -> int:
        key = str(layer_count)
        return self.adapters[key].macs if key in self.adapters else 0

    def save(self, checkpoint_dir: str | Path, metadata: dict | None = None) -> Path:
        checkpoint_dir = Path(checkpoint_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "exit_layers": self.exit_layers,
            **(metadata or {}),
        }
        # Heads first, metadata last: a reader only trusts heads whose metadata exists and matches.
        with atomic_file(checkpoint_dir / HEADS_FILE) as handle:
            handle.write(_safetensors_bytes(state))
        write_json(checkpoint_dir / META_FILE, meta, indent=2)
        return checkpoint_dir / HEADS_FILE


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state)


def load_exit_heads(
    checkpoint_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TunedExitHeads | None:
    """Tuned heads saved beside a checkpoint, or None when there are none (the engine then uses the shared head).

    Raises ValueError (naming the file and the fix) when the metadata is unreadable, of another format version, or
    does not match the saved tensors.
    """
    checkpoint_dir = Path(checkpoint_dir)
    heads, meta_path = checkpoint_dir / HEADS_FILE, checkpoint_dir / META_FILE
    if not heads.exists() or not meta_path.exists():
        return None
    fix = "delete both exit_heads files or re-run scripts/tune_exits.py"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path}: corrupt exit-head metadata ({error}); {fix}") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: exit-head metadata is not a JSON object; {fix}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: exit-head format version {meta.get('format_version')!r}, this helios reads "
            f"{FORMAT_VERSION}; re-run scripts/tune_exits.py"
        )
    try:
        module = TunedExitHeads(int(meta["hidden_size"]), int(meta["rank"]), [int(x) for x in meta["exit_layers"]])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{meta_path}: exit-head metadata lacks or garbles {error}; {fix}") from error
    try:
        module.load_state_dict(load_file(str(heads)))
    except Exception as error:  # safetensors header errors, missing/unexpected keys, shape mismatches
        raise ValueError(f"{heads}: exit-head tensors do not match {meta_path.name} ({error}); {fix}") from error
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


# =====================================================================================================================
# Training and evaluation (self-distillation from the frozen model's final layer)
#
# Everything below is teacher-forced over offline text (helios.corpus): the model runs once over the training tokens
# and the hidden state after every exit layer is cached, together with the final layer's pre-norm state (the teacher)
# and the teacher's top-k ids. Each adapter is then trained on the cache alone, the frozen model's final norm + LM
# head turning adapter outputs into logits, with a KL loss against the teacher that sees negatives:
#
#   candidate set S = (teacher top-k of every token in the batch) U (n_random uniformly drawn vocabulary ids),
#   loss = mean over tokens of KL(softmax(z_teacher[S] / T) || softmax(z_student[S] / T)),
#
# where both logit vectors are exact over S (the teacher's from the cached final state, never approximated). A loss
# over the teacher's top-k alone never pushes the rest of the vocabulary down and collapses the full-vocabulary
# argmax; with S covering the whole vocabulary (n_random >= vocab) this is the full-vocabulary KL.
#
# Full-vocabulary argmaxes (agreement, oracle) are those of the float32 logits: on hardware with fast bf16 matmuls
# (AMX / AVX512-BF16 / CUDA) the vocabulary is screened in bf16 and the best `screen` (32) candidates rescored in
# float32, which differs only if bf16 rounding pushes the true best below 31 others (not seen once when checked
# against plain float32 on SmolLM2 and Gemma-3 hidden states); otherwise the float32 logits are computed directly.
# Either way at most `block` tokens' logits exist at once (Gemma-3's 262k-id head would otherwise need gigabytes).
# =====================================================================================================================

DEFAULT_SEQ_LEN = 256


@dataclasses.dataclass
class TuneConfig:
    """Hyper-parameters of `train_exit_heads` (the Hydra config `conf/tune_exits.yaml` mirrors these)."""

    rank: int | None = None  # None: hidden size (a full H x H adapter)
    exit_layers: list[int] | None = None  # layer counts to train; None: every layer 1..L-1
    train_seconds: float = 180.0  # wall-clock budget of the optimisation loop (caching excluded)
    max_steps: int | None = None  # optional step budget; training stops at whichever budget ends first
    batch_tokens: int = 256  # tokens per step (each step trains every adapter on the same tokens)
    topk: int = 8  # teacher top-k ids per token that enter the candidate set
    n_random: int = 1024  # uniformly drawn negatives per step (>= vocab: full-vocabulary KL)
    temperature: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    init: str = "lstsq"  # "lstsq": ridge-regression start (see `lstsq_init_`), "identity": the shared head
    ridge: float = 1e-3
    amp: bool = True  # bf16 matmuls for the students where bf16 is fast (teacher logits stay float32)
    seq_len: int = DEFAULT_SEQ_LEN
    batch_chunks: int = 8  # sequences per forward pass while caching
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("lstsq", "identity"):
            raise ValueError(f"init must be 'lstsq' or 'identity'; got {self.init!r}")
        for key in ("batch_tokens", "topk", "seq_len", "batch_chunks"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)!r}")
        if self.n_random < 0 or self.train_seconds <= 0 or self.temperature <= 0 or self.lr <= 0:
            raise ValueError("n_random must be >= 0 and train_seconds, temperature, lr > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None; got {self.max_steps!r}")


# ------------------------------------------------------------------------------------------------ the frozen head


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 on `device` (CUDA, or a CPU with AMX / AVX512-BF16)."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())


class FrozenHead:
    """The model's own final norm + LM head (+ final-logit softcap), exactly as `EarlyExitEngine.logits` applies
    them, with helpers for exact argmax / top-k over the full vocabulary and exact logits over a subset of ids."""

    def __init__(self, loaded: Any, *, screen: int | None = 32, block: int = 256) -> None:
        from helios.models import text_config

        decoder = loaded.model.get_decoder()
        head = loaded.model.get_output_embeddings()
        self.norm: nn.Module = decoder.norm
        self.weight: torch.Tensor = head.weight.detach()
        bias = getattr(head, "bias", None)
        self.bias: torch.Tensor | None = None if bias is None else bias.detach()
        self.softcap: float | None = getattr(text_config(loaded.model.config), "final_logit_softcapping", None)
        self.vocab_size, self.hidden_size = self.weight.shape
        self.block = block
        # Screening only pays for a big vocabulary on bf16-fast hardware; `screen=None` forces plain float32.
        self.screen = screen if screen and self.vocab_size > 4 * screen and fast_bf16(self.weight.device) else None
        self._weight_bf16: torch.Tensor | None = None

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def subset_logits(self, normed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact logits [N, |ids|] of already-normed hidden states over the vocabulary ids `ids`."""
        logits = normed @ self.weight[ids].to(normed.dtype).T
        if self.bias is not None:
            logits = logits + self.bias[ids].to(logits.dtype)
        return self._cap(logits)

    def full_logits(self, normed: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(normed.dtype)
        return self._cap(F.linear(normed, self.weight.to(normed.dtype), bias))

    def _screen_weight(self) -> torch.Tensor:
        if self._weight_bf16 is None:
            self._weight_bf16 = self.weight.to(torch.bfloat16)
        return self._weight_bf16

    @torch.no_grad()
    def argmax(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary argmax of the head's float32 logits, `block` tokens at a time."""
        out = []
        for start in range(0, normed.shape[0], self.block):
            x = normed[start : start + self.block].float()
            if self.screen is None:
                out.append(self.full_logits(x).argmax(-1))
                continue
            scores = x.to(torch.bfloat16) @ self._screen_weight().T  # softcap and bias-free screening:
            if self.bias is not None:  # tanh is monotone, the bias is added before it
                scores = scores + self.bias.to(torch.bfloat16)
            candidates = scores.topk(self.screen, dim=-1).indices  # [n, screen]
            exact = torch.einsum("nh,nmh->nm", x, self.weight[candidates].float())
            if self.bias is not None:
                exact = exact + self.bias[candidates].float()
            out.append(candidates.gather(1, exact.argmax(-1, keepdim=True)).squeeze(1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=normed.device)

    @torch.no_grad()
    def topk_ids(self, normed: torch.Tensor, k: int) -> torch.Tensor:
        """Ids of (about: bf16-screened where that is fast) the k largest logits; used only to build candidate
        sets, whose logits are then computed exactly."""
        k = min(k, self.vocab_size)
        out = []
        for start in range(0, normed.shape[0], self.block):
            x = normed[start : start + self.block]
            if self.screen is not None:
                scores = x.to(torch.bfloat16) @ self._screen_weight().T
            else:
                scores = self.full_logits(x.float())
            out.append(scores.topk(k, dim=-1).indices)
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=normed.device)


def mac_counts(loaded: Any) -> dict[str, int]:
    """Multiply-adds per token of one decoder layer (its matrices) and of the LM head (as the engine counts)."""
    layers = loaded.model.get_decoder().layers
    per_layer = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    return {"layer": int(per_layer), "head": int(loaded.model.get_output_embeddings().weight.numel())}


# ------------------------------------------------------------------------------------------------ tokens and states


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds a BOS by default (Gemma), else [] (SmolLM2, the byte tokenizer)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return [int(bos)]
    return []


def token_chunks(
    tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None, seq_len: int = DEFAULT_SEQ_LEN
) -> tuple[list[torch.Tensor], int]:
    """Texts joined by blank lines, tokenized, cut into sequences of at most `seq_len` ids (each starting with the
    BOS the tokenizer would add). Returns (sequences, prefix), where the first `prefix` ids of every sequence are
    that BOS: they are fed to the model but never scored. At most `max_tokens` ids are scored in all."""
    prefix = _bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len {seq_len} is too short")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = [torch.tensor(prefix + ids[i : i + body], dtype=torch.long) for i in range(0, len(ids), body)]
    return [c for c in chunks if c.numel() - len(prefix) >= 1], len(prefix)


def iter_hidden_states(
    loaded: Any,
    chunks: Sequence[torch.Tensor],
    prefix: int,
    layers: Sequence[int],
    *,
    batch_chunks: int = 8,
    progress: bool = False,
    desc: str = "forward",
) -> Iterator[dict[int, torch.Tensor]]:
    """Teacher-forced forward passes over `chunks`; yields, per batch of sequences, {layer count: [n_tokens, H]} for
    the requested layer counts (pre-norm residual stream after that many layers; prefix positions dropped).
    The LM head is never run here."""
    from tqdm.auto import tqdm

    decoder = loaded.model.get_decoder()
    wanted = sorted(set(int(x) for x in layers))
    if any(not 1 <= x <= len(decoder.layers) for x in wanted):
        raise ValueError(f"layer counts must be in 1..{len(decoder.layers)}; got {wanted}")
    captured: dict[int, torch.Tensor] = {}

    def hook(count: int):
        def fn(_module, _inputs, output):
            captured[count] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [decoder.layers[count - 1].register_forward_hook(hook(count)) for count in wanted]
    try:
        # Equal-length sequences batch together (all but possibly the last are seq_len long).
        batches: list[list[torch.Tensor]] = []
        for chunk in chunks:
            if batches and len(batches[-1]) < batch_chunks and batches[-1][0].numel() == chunk.numel():
                batches[-1].append(chunk)
            else:
                batches.append([chunk])
        bar = tqdm(total=sum(c.numel() - prefix for c in chunks), desc=desc, unit="tok", disable=not progress)
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                ids = torch.stack(batch).to(loaded.device)
                decoder(input_ids=ids, use_cache=False)
                yield {count: captured[count][:, prefix:].reshape(-1, captured[count].shape[-1]) for count in wanted}
                bar.update(ids[:, prefix:].numel())
        bar.close()
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def exit_matches(
    loaded: Any,
    texts: Sequence[str],
    heads_list: Sequence[TunedExitHeads | None] = (None,),
    *,
    max_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_chunks: int = 8,
    progress: bool = False,
) -> list[torch.Tensor]:
    """For each entry of `heads_list` (None: the shared head), a bool matrix [n_tokens, L] whose column l-1 says
    whether exiting after l layers gives the same full-vocabulary argmax as the final layer (column L is all True).
    One forward pass serves every entry."""
    head = FrozenHead(loaded)
    depth = len(loaded.model.get_decoder().layers)
    chunks, prefix = token_chunks(loaded.tokenizer, texts, max_tokens, seq_len)
    results: list[list[torch.Tensor]] = [[] for _ in heads_list]
    for states in iter_hidden_states(
        loaded, chunks, prefix, range(1, depth + 1), batch_chunks=batch_chunks, progress=progress, desc="eval"
    ):
        final = head.argmax(head.norm(states[depth]))
        for result, heads in zip(results, heads_list):
            columns = []
            for layer in range(1, depth):
                hidden = states[layer] if heads is None else heads.transform(layer, states[layer])
                columns.append(head.argmax(head.norm(hidden)) == final)
            columns.append(torch.ones_like(final, dtype=torch.bool))
            result.append(torch.stack(columns, dim=1).cpu())
    return [torch.cat(r) if r else torch.zeros(0, depth, dtype=torch.bool) for r in results]


def agreement_by_layer(
    loaded: Any, texts: Sequence[str], heads: TunedExitHeads | None = None, **kwargs: Any
) -> list[float]:
    """Fraction of the texts' tokens whose exit-after-l-layers argmax equals the final layer's, for l = 1..L
    (heads=None: the shared head; otherwise the tuned adapter where one exists for l). kwargs: see exit_matches."""
    (matches,) = exit_matches(loaded, texts, [heads], **kwargs)
    return matches.float().mean(0).tolist()


def oracle_bound(
    matches: torch.Tensor, *, layer_macs: int | None = None, head_macs: int = 0, adapter_macs: int = 0
) -> dict[str, float]:
    """What a perfect exit oracle could save, from an `exit_matches` matrix [n_tokens, L].

    Each token exits at the first layer whose exit argmax equals the final argmax (L if none: column L is the final
    layer itself). `speedup_layers` = L / mean first-agree layer counts decoder-layer multiply-adds only;
    `speedup_with_head` (when `layer_macs` is given) adds one LM-head evaluation per token on both sides, plus the
    adapter's multiply-adds for tokens that exit before L: the oracle knows where to exit, so it pays for one head.
    """
    if matches.dim() != 2 or matches.shape[0] == 0:
        raise ValueError("oracle_bound needs a non-empty [n_tokens, L] match matrix")
    depth = matches.shape[1]
    agrees = matches.clone()
    agrees[:, -1] = True
    first = agrees.float().argmax(dim=1) + 1  # argmax returns the first maximal index
    mean_first = float(first.float().mean())
    out = {
        "num_layers": depth,
        "tokens": int(matches.shape[0]),
        "mean_first_agree_layer": mean_first,
        "speedup_layers": depth / mean_first,
        "fraction_exiting_early": float((first < depth).float().mean()),
    }
    if layer_macs is not None:
        full = depth * layer_macs + head_macs
        early = float((first < depth).float().mean())
        oracle = mean_first * layer_macs + head_macs + early * adapter_macs
        out["speedup_with_head"] = full / oracle
    return out


# ------------------------------------------------------------------------------------------------ the loss


def candidate_ids(teacher_topk: torch.Tensor, vocab_size: int, n_random: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted unique union of the batch's teacher top-k ids and `n_random` uniformly drawn ids (all ids when
    n_random >= vocab_size: the full vocabulary)."""
    if n_random >= vocab_size:
        return torch.arange(vocab_size, device=teacher_topk.device)
    drawn = torch.randint(vocab_size, (n_random,), generator=generator).to(teacher_topk.device)
    return torch.unique(torch.cat([teacher_topk.reshape(-1), drawn]))


def sampled_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), both restricted to the same candidate
    columns, times T^2 (Hinton's scaling; 1 at T = 1)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class HiddenCache:
    """Cached training states: hidden[l] = [N, H] after l layers for each exit layer, final = [N, H] pre-norm
    state after all L layers (the teacher), topk = [N, k] teacher top-k ids."""

    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    topk: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.final.shape[0])


@torch.no_grad()
def build_cache(
    loaded: Any,
    texts: Sequence[str],
    exit_layers: Sequence[int],
    *,
    max_tokens: int | None = None,
    topk: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_chunks: int = 8,
    progress: bool = False,
) -> HiddenCache:
    """Teacher-forced pass over `texts` (at most `max_tokens` scored tokens), keeping the float32 states after each
    exit layer, the final pre-norm state and the teacher's top-k ids: N * (len(exit_layers) + 1) * H * 4 bytes
    (40k tokens of SmolLM2, 29 exit layers: 2.8 GB). The full-vocabulary logits are never held for more than
    FrozenHead.block tokens."""
    head = FrozenHead(loaded)
    depth = len(loaded.model.get_decoder().layers)
    chunks, prefix = token_chunks(loaded.tokenizer, texts, max_tokens, seq_len)
    total = sum(c.numel() - prefix for c in chunks)
    hidden = {layer: torch.empty(total, head.hidden_size) for layer in exit_layers}
    final = torch.empty(total, head.hidden_size)
    top = torch.empty(total, min(topk, head.vocab_size), dtype=torch.long)
    pos = 0
    for states in iter_hidden_states(
        loaded, chunks, prefix, [*exit_layers, depth], batch_chunks=batch_chunks, progress=progress, desc="cache"
    ):
        n = states[depth].shape[0]
        for layer in exit_layers:
            hidden[layer][pos : pos + n] = states[layer].float().cpu()
        final[pos : pos + n] = states[depth].float().cpu()
        top[pos : pos + n] = head.topk_ids(head.norm(states[depth]), top.shape[1]).cpu()
        pos += n
    return HiddenCache(hidden=hidden, final=final, topk=top)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


@torch.no_grad()
def lstsq_init_(heads: TunedExitHeads, cache: HiddenCache, ridge: float = 1e-3) -> None:
    """Closed-form start. The final norm is scale-invariant, so only the direction of the adapter output matters:
    per exit layer, ridge-regress the direction change u_L - u_l (u = h / rms(h), per token) on the adapter's input
    LN(h_l), and scale the fit by the layer's median rms(h_l), so that h_l + correction ~ rms(h_l) * u_L for tokens
    of typical norm. Regressing the unnormalised change instead lets the few tokens with huge residual norms (SmolLM2
    has them) dominate the fit, which then loses to the shared head at middle layers. Rank r < H keeps the top-r
    directions of the fitted corrections (reduced-rank regression). The KL loss then refines this start."""
    hidden_size = heads.hidden_size
    unit_final = cache.final / _rms(cache.final)
    for layer in heads.exit_layers:
        adapter: ExitAdapter = heads.adapters[str(layer)]  # type: ignore[assignment]
        h = cache.hidden[layer].float()
        rms = _rms(h)
        norm_weight, norm_bias = adapter.norm.weight.float().cpu(), adapter.norm.bias.float().cpu()
        x = F.layer_norm(h, (hidden_size,), norm_weight, norm_bias, adapter.norm.eps)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        target = unit_final - h / rms
        gram = (x.T @ x).double()  # float32 products of O(1) features, solved in float64
        reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        solution = torch.linalg.solve(gram + reg, (x.T @ target).double()) * rms.median().double()
        matrix, bias = solution[:-1], solution[-1]  # x_ln @ matrix + bias ~ median rms * (u_L - u_l)
        if heads.rank < hidden_size:
            fitted = (x @ solution.float()).double()
            _, eigvecs = torch.linalg.eigh(fitted.T @ fitted)
            basis = eigvecs[:, -heads.rank :]  # [H, r]: top-r directions of the fitted corrections
        else:
            basis = torch.eye(hidden_size, dtype=matrix.dtype)
        down = matrix @ basis  # [H, r]
        scale = down.norm(dim=0).clamp_min(1e-12).sqrt()  # balance the two factors' magnitudes
        adapter.down.weight.copy_((down / scale).T.to(adapter.down.weight.dtype))
        adapter.up.weight.copy_((basis * scale).to(adapter.up.weight.dtype))
        adapter.up.bias.copy_(bias.to(adapter.up.bias.dtype))


def distillation_loss(
    heads: TunedExitHeads,
    head: FrozenHead,
    cache: HiddenCache,
    index: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    amp: bool = False,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Sampled-negative KL of every adapter on the cached tokens `index` over candidate ids `ids`; returns the mean
    over exit layers and the per-layer values. With `amp`, the students' logit matmul runs in bf16 (the teacher's
    logits are always float32)."""
    layers = heads.exit_layers
    device = head.weight.device
    ids = ids.to(device)
    with torch.no_grad():
        final = cache.final[index].to(device)
        teacher = head.subset_logits(head.norm(final.to(head.weight.dtype)).float(), ids)  # [B, S]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # the adapters' matmuls
        students = torch.stack([heads.transform(layer, cache.hidden[layer][index].to(device)) for layer in layers])
    normed = head.norm(students.float())
    weight = head.weight[ids]
    if amp:
        logits = (normed.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float()
    else:
        logits = normed.float() @ weight.float().T
    if head.bias is not None:
        logits = logits + head.bias[ids].float()
    logits = head._cap(logits)  # [n, B, S]
    t = F.log_softmax(teacher / temperature, dim=-1)
    s = F.log_softmax(logits / temperature, dim=-1)
    per_layer = (t.exp() * (t - s)).sum(-1).mean(-1) * temperature**2  # [n]: sampled_kl per layer
    return per_layer.mean(), {layer: float(v) for layer, v in zip(layers, per_layer.detach())}


def train_exit_heads(
    loaded: Any,
    train_texts: Sequence[str],
    config: TuneConfig | None = None,
    *,
    train_tokens: int | None = None,
    cache: HiddenCache | None = None,
    progress: bool = False,
) -> tuple[TunedExitHeads, dict[str, Any]]:
    """Train one adapter per exit layer by self-distillation from the frozen model's final layer; returns the heads
    (eval mode, no grad) and training statistics. The model is never modified. `cache` reuses states from
    `build_cache` (then `train_texts` and `train_tokens` are ignored)."""
    from tqdm.auto import tqdm

    config = config or TuneConfig()
    depth = len(loaded.model.get_decoder().layers)
    hidden_size = int(loaded.model.get_output_embeddings().weight.shape[1])
    exit_layers = sorted(set(int(x) for x in (config.exit_layers or range(1, depth))))
    if not exit_layers or exit_layers[0] < 1 or exit_layers[-1] >= depth:
        raise ValueError(f"exit layers must be layer counts in 1..{depth - 1}; got {config.exit_layers}")
    rank = hidden_size if config.rank is None else int(config.rank)
    if not 1 <= rank <= hidden_size:
        raise ValueError(f"rank must be in 1..{hidden_size} (hidden size); got {config.rank}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = FrozenHead(loaded)

    t0 = time.perf_counter()
    if cache is None:
        cache = build_cache(
            loaded, train_texts, exit_layers, max_tokens=train_tokens, topk=config.topk, seq_len=config.seq_len,
            batch_chunks=config.batch_chunks, progress=progress,
        )
    cache_s = time.perf_counter() - t0
    if cache.num_tokens < 1:
        raise ValueError("no training tokens")

    heads = TunedExitHeads(hidden_size, rank, exit_layers).to(device=loaded.device)
    t1 = time.perf_counter()
    if config.init == "lstsq":
        lstsq_init_(heads, cache, config.ridge)
    init_s = time.perf_counter() - t1

    amp = bool(config.amp) and fast_bf16(loaded.device)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    batch = min(config.batch_tokens, cache.num_tokens)
    start = time.perf_counter()
    step, history, last_layer_losses = 0, [], {}
    bar = tqdm(total=config.max_steps, desc="train", unit="step", disable=not progress)
    heads.train()
    while True:
        elapsed = time.perf_counter() - start
        done = elapsed / config.train_seconds
        if config.max_steps is not None:
            done = max(done, step / config.max_steps)
        if done >= 1.0:
            break
        warmup = min(1.0, (step + 1) / max(config.warmup_steps, 1))
        for group in optimizer.param_groups:  # linear warm-up, cosine decay over whichever budget ends first
            group["lr"] = config.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * done))
        index = torch.randint(cache.num_tokens, (batch,), generator=generator)
        ids = candidate_ids(cache.topk[index], head.vocab_size, config.n_random, generator)
        loss, last_layer_losses = distillation_loss(
            heads, head, cache, index, ids, temperature=config.temperature, amp=amp
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(history[-10:]) / len(history[-10:]):.3f}", candidates=int(ids.numel()))
    bar.close()
    heads.eval().requires_grad_(False)
    stats = {
        "train_tokens": cache.num_tokens,
        "steps": step,
        "tokens_seen_per_adapter": step * batch,
        "epochs": step * batch / cache.num_tokens,
        "cache_seconds": round(cache_s, 2),
        "init_seconds": round(init_s, 2),
        "train_seconds": round(time.perf_counter() - start, 2),
        "loss_first": history[0] if history else None,
        "loss_last": sum(history[-20:]) / len(history[-20:]) if history else None,
        "loss_by_layer_last_step": {str(k): round(v, 4) for k, v in last_layer_losses.items()},
        "amp_bf16": amp,
        "config": dataclasses.asdict(config) | {"exit_layers": exit_layers, "rank": rank},
    }
    return heads, stats


__all__ = [
    "ExitAdapter", "TunedExitHeads", "load_exit_heads", "save_file", "TuneConfig", "FrozenHead", "HiddenCache",
    "token_chunks", "iter_hidden_states", "exit_matches", "agreement_by_layer", "oracle_bound", "mac_counts",
    "candidate_ids", "sampled_kl", "build_cache", "lstsq_init_", "distillation_loss", "train_exit_heads",
]
