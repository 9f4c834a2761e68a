"""Per-row sampling parameters and a vectorised, per-row-seeded sampler for the early-exit engine.

    python -m helios.engine tiny-llama --temperature 0.8 --top-p 0.9 --seed 0 --criterion max_prob --exit-points 2,4

`SamplingParams` holds one sequence's decoding settings (temperature, top_p, top_k, seed, logprobs); a batch may
mix greedy and sampled rows with different settings. `BatchSampler` turns one step's logits into tokens for every
row at once, on the logits' device, with no host round-trip inside the decode loop.

How a token is drawn (the exponential race, i.e. Gumbel-max): at the start of every decode step each sampled row
draws E_v ~ Exp(1) for every vocabulary entry from its *own* `torch.Generator` (seeded from its `seed`), and the
token is argmax_v p_v / E_v, where p is softmax(logits / temperature) restricted to the top-k, then top-p set
(temperature, then top-k, then top-p: the order of Hugging Face's warpers and vLLM's sampler; top-p is measured on
the tempered, top-k-filtered distribution; top-k keeps ties at the k-th value). argmax p_v / E_v is an exact draw
from p (the first arrival of independent exponential clocks with rates p_v).

Why this shape:
  * Determinism: a row's noise depends only on its seed and the step index, never on other rows, on where its
    token exits, or on compaction (the noise is drawn once per step, before any layer runs, and read by whichever
    layer decides the row's token). The same seed and request therefore give the same text whatever else is in the
    batch (up to floating-point differences of batched kernels, the same caveat as greedy decoding). Seeds map to
    different streams on CPU and CUDA generators, so "same seed" means same device type.
  * Early exit: a token that exits after e layers is sampled from that exit head's (tempered, filtered)
    distribution, with the step's noise; had it gone on, the last layer would have read the same noise. This coupling
    (common random numbers) means that whenever the exit head's filtered distribution equals the final layer's, the
    exited token equals the one the full model would have sampled: exits under sampling cost exactly what they cost
    in distribution, nothing extra from independent randomness.
  * Exit criteria (`max_prob`, `margin`) keep reading the exit head's untempered softmax (CALM's confidence), not
    the tempered one: the confidence that the exit head agrees with the final layer is a property of the model, and
    a temperature-dependent threshold would make one exit setting mean different things for different requests.
    `cosine` and `probe` read hidden states only, so sampling cannot change them at the step being decided. A
    step's exit decision therefore never depends on the row's noise; only the token emitted at the exit does.
  * Greedy rows (temperature 0) are exactly argmax of the raw logits, and when every row is greedy and no row asks
    for logprobs the sampler is bypassed altogether (`BatchSampler.trivial`): the greedy decode path does no extra
    work.
  * The noise loop is one `exponential_` per sampled row per step: a few kernel launches, no sync. A counter-based
    RNG would vectorise it, but torch has no public per-row Philox; per-row generators are the honest way to make
    each row's randomness independent of the batch.

Logprobs (`SamplingParams.logprobs` = k, 0..20): per emitted token, the log-probability of the chosen token and the
k most likely alternatives, from log_softmax of the *raw* logits of the layer that decided the token, i.e. before
temperature, top-k and top-p. That is vLLM v1's default (`logprobs_mode="raw_logprobs"`: "computed before applying
any logit processors like temperature, penalties, top-k/p"; vLLM v0 reported the processed distribution) and what
OpenAI documents as the model's log-probability of the token. For a token that exited at layer e this is the exit
head's distribution (norm + shared head on the exit's adapter output), not the final layer's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's chat cap and vLLM's default max_logprobs
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]; hotter adds nothing a researcher needs
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one sequence. The defaults are greedy decoding without logprobs.

    temperature: 0 is greedy (argmax); (0, 2] samples from softmax(logits / temperature).
    top_p: nucleus mass in (0, 1]; 1 keeps everything.
    top_k: keep the k most likely tokens; 0 (or vLLM's -1) keeps everything.
    seed: seeds this sequence's own generator; None draws a seed from torch's default generator (so
        `torch.manual_seed` makes unseeded runs reproducible too).
    logprobs: None for none; k in 0..20 for the chosen token's log-probability and k alternatives.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t = self.temperature
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                or not 0.0 <= t <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy); got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = no nucleus filter); got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 for no top-k filter; got {k!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not SEED_RANGE[0] <= s <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None; got {s!r}")
        n = self.logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}; got {n!r}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or top_k 1 (one candidate left at any temperature)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def filters(self) -> tuple[bool, bool]:
        """(top-k active, top-p active)."""
        return self.top_k > 0, self.top_p < 1.0


GREEDY = SamplingParams()
WITH_LOGPROB = SamplingParams(logprobs=0)  # greedy, returning each chosen token's log-probability


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability and the `top` most likely alternatives [(token id, logprob)], best first,
    from the raw (untempered, unfiltered) distribution of the layer that emitted it."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def per_row(sampling: SamplingParams | Sequence[SamplingParams] | None, batch: int) -> list[SamplingParams]:
    """One SamplingParams per row: None -> greedy for all, one object -> shared, a sequence -> one per row."""
    if sampling is None:
        return [GREEDY] * batch
    if isinstance(sampling, SamplingParams):
        return [sampling] * batch
    params = list(sampling)
    if len(params) != batch or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling needs one SamplingParams per prompt ({batch}); got {len(params)} items")
    return params


class BatchSampler:
    """Chooses every row's token at one decode step from the logits of the layer that decides it (see module
    docstring). Created per `generate` call; `begin_step` draws the step's noise, `choose` picks tokens and records
    logprobs, `logprobs` returns them at the end."""

    @staticmethod
    def generator(seed: int | None, device: torch.device) -> torch.Generator:
        """A sequence's own noise stream: seeded by `seed`, or by a draw from torch's default generator (so
        `torch.manual_seed` makes unseeded runs reproducible too)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def __init__(self, params: list[SamplingParams], vocab: int, steps: int, device: torch.device,
                 generators: dict[int, torch.Generator | None] | None = None) -> None:
        """`generators` (row -> generator): streams that outlive this sampler (a continuous batch keeps each
        sequence's across steps); rows without one get a fresh generator from their seed."""
        self.params = params
        self.batch, self.vocab, self.device = len(params), vocab, device
        self.sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
        self.top_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        # The greedy fast path: nothing to draw, nothing to record, tokens = argmax (bit-identical to before).
        self.trivial = not self.sampled_rows and self.top_logprobs is None
        if self.trivial:
            return
        self.any_sampled = bool(self.sampled_rows)
        self.use_top_k = any(p.filters[0] for p in params if not p.greedy)
        self.use_top_p = any(p.filters[1] for p in params if not p.greedy)
        # Greedy rows get temperature 1 here only to keep the division finite; their token is argmax regardless.
        self.greedy_mask = torch.tensor([p.greedy for p in params], device=device)
        self.temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                        dtype=torch.float32, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device).clamp(1, vocab)
        given = generators or {}
        self.generators: dict[int, torch.Generator] = {
            b: given.get(b) or self.generator(params[b].seed, device) for b in self.sampled_rows}
        self.noise = torch.ones((self.batch, vocab), dtype=torch.float32, device=device) if self.any_sampled else None
        if self.top_logprobs is not None:
            k = self.top_logprobs
            self.chosen_lp = torch.zeros((self.batch, steps), dtype=torch.float32, device=device)
            self.top_ids = torch.zeros((self.batch, steps, k), dtype=torch.long, device=device)
            self.top_lp = torch.zeros((self.batch, steps, k), dtype=torch.float32, device=device)

    def begin_step(self) -> None:
        """Draw this step's exponential noise for every sampled row, from the row's own generator (no sync)."""
        if self.trivial or self.noise is None:
            return
        tiny = torch.finfo(torch.float32).tiny
        for b, generator in self.generators.items():
            self.noise[b].exponential_(generator=generator).clamp_(min=tiny)  # an Exp(1) draw of exactly 0 -> p/0

    def choose(self, logits: torch.Tensor, rows: torch.Tensor | None, step: int,
               where: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens for the rows `rows` (batch indices of the logits' rows; None = all rows in order) at `step`.

        `where` (only with rows=None): which rows actually take their token from these logits now; logprobs are
        recorded for those rows only (the engine's uncompacted path scores every row at an exit point).
        """
        if self.trivial:
            return logits.argmax(-1)
        logits = logits.float()
        tokens = logits.argmax(-1)
        if self.any_sampled:
            index = slice(None) if rows is None else rows
            scaled = logits / self.temperature[index, None]
            scaled = self._filter(scaled, self.top_k[index], self.top_p[index])
            race = torch.softmax(scaled, dim=-1) / self.noise[index]
            tokens = torch.where(self.greedy_mask[index], tokens, race.argmax(-1))
        if self.top_logprobs is not None:
            self._record(torch.log_softmax(logits, dim=-1), tokens, rows, step, where)
        return tokens

    def _filter(self, scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Mask (to -inf) the tokens outside each row's top-k, then outside its top-p nucleus."""
        if not (self.use_top_k or self.use_top_p):
            return scaled
        ordered, order = scaled.sort(dim=-1, descending=True)
        if self.use_top_k:
            kth = ordered.gather(1, (top_k - 1)[:, None])
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties at the k-th value stay (as vLLM)
        if self.use_top_p:
            probs = torch.softmax(ordered, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Smallest prefix whose mass reaches top_p: keep a token while the mass ranked above it is < top_p
            # (the most likely token always stays, since top_p > 0).
            ordered = ordered.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        return torch.full_like(scaled, float("-inf")).scatter(1, order, ordered)

    def _record(self, logprobs: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None, step: int,
                where: torch.Tensor | None) -> None:
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top_lp, top_ids = logprobs.topk(self.top_logprobs, dim=-1)
        if rows is not None:
            self.chosen_lp[rows, step] = chosen
            self.top_lp[rows, step] = top_lp
            self.top_ids[rows, step] = top_ids
        elif where is None:
            self.chosen_lp[:, step] = chosen
            self.top_lp[:, step] = top_lp
            self.top_ids[:, step] = top_ids
        else:
            self.chosen_lp[:, step] = torch.where(where, chosen, self.chosen_lp[:, step])
            self.top_lp[:, step] = torch.where(where[:, None], top_lp, self.top_lp[:, step])
            self.top_ids[:, step] = torch.where(where[:, None], top_ids, self.top_ids[:, step])

    def logprobs(self, tokens: list[list[int]]) -> list[list[TokenLogprob]] | None:
        """Per row, per returned token: its TokenLogprob, with the row's own number of alternatives (rows that
        asked for none get an empty list). One device-to-host copy, after decoding."""
        if self.trivial or self.top_logprobs is None:
            return None
        chosen, top_ids, top_lp = self.chosen_lp.tolist(), self.top_ids.tolist(), self.top_lp.tolist()
        out: list[list[TokenLogprob]] = []
        for b, row in enumerate(tokens):
            k = self.params[b].logprobs
            if k is None:
                out.append([])
                continue
            out.append([TokenLogprob(token, max(chosen[b][t], LOGPROB_FLOOR),
                                     [(i, max(v, LOGPROB_FLOOR)) for i, v in zip(top_ids[b][t][:k], top_lp[b][t][:k])])
                        for t, token in enumerate(row)])
        return out
